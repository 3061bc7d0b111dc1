"""Low precision against float32, on the same work: the cases of
``python -m fastopt bench --dtype float16|bfloat16``.

One group per case with the members ``float32`` and ``16-bit``:

* Adam at 1e7 elements with bfloat16 state (stochastic and nearest
  rounding) against float32 state: the state moves 2 bytes per value instead
  of 4, 20 bytes per parameter instead of 28;
* Adam on 1e7 bfloat16 / float16 parameters (float32 master and state;
  float32 or 16-bit gradients) against the float32 step;
* cross-entropy (64, 50257) and log-softmax on 16-bit logits, BatchNorm on
  16-bit activations, against float32.

Each 16-bit result is checked against the float32 one before it is timed.
bfloat16 needs ml_dtypes (``pip install "fastopt[bf16]"``); its cases skip
without it.

    PYTHONPATH=src python -m pytest benchmarks/test_bench_lowprec.py --benchmark-only \\
        --benchmark-group-by=group --benchmark-columns=median,iqr,rounds
"""
import pytest

from fastopt.bench import BadInput, half_dtype, lowp_cases

FAMILIES = ["adam", "cross_entropy", "log_softmax", "batchnorm"]
CASES = ([("bfloat16", c) for c in lowp_cases(FAMILIES, 10**7, quick=True)]
         # float16: its own parameters and logits (the state is bfloat16 either way)
         + [("float16", c) for c in lowp_cases(FAMILIES, 10**7, quick=True)
            if "state" not in c.label])


def case_id(val):
    dtype, case = val
    return f"{dtype}-{case.family}-" + case.label.replace(" ", "").replace(",", "")


@pytest.mark.parametrize("impl", ["float32", "16-bit"])
@pytest.mark.parametrize("dtype_case", CASES, ids=[case_id(c) for c in CASES])
def test_lowprec(benchmark, dtype_case, impl):
    dtype, case = dtype_case
    try:
        half = half_dtype(dtype)
    except BadInput as exc:
        pytest.skip(str(exc))
    f32, f16, check = case.make(half)
    steps = {"float32": f32(), "16-bit": f16()}
    outs = {k: [st() for _ in range(2)][-1] for k, st in steps.items()}
    error = check(outs["float32"], outs["16-bit"])
    assert error is None, error
    benchmark.group = f"{case.family} {case.label.replace('HALF', dtype)} ({dtype})"
    benchmark.extra_info["elements"] = case.elements
    benchmark(steps[impl])
