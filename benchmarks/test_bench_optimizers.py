"""fastopt.Adam over a model's parameter list: one fused step against loops, float32.

The ``optimizer`` cases of ``python -m fastopt bench``: ResNet-18's 62 arrays
(11.7M elements), 500 arrays of 1000 elements (per-array overhead dominates)
and 10 arrays of 1M elements (bandwidth).  Members:

* ``numpy``, ``numpy_inplace``: Python loops of the NumPy Adam over the arrays;
* ``fastopt``: ``fastopt.Adam.step`` (one native call, one parallel region);
* ``fastopt_loop``: a Python loop of ``fastopt.adam_step`` calls (one native
  call and, for large arrays, one parallel region per array).  On 500 x 1000
  ``Adam.step`` should be at least 3x faster than it.

    PYTHONPATH=src python -m pytest benchmarks/test_bench_optimizers.py --benchmark-only \\
        --benchmark-group-by=group --benchmark-columns=median,iqr,rounds
"""
import pytest

from fastopt.bench import build_cases

CASES = build_cases(["optimizer"], [], quick=False)
IMPLS = ["numpy", "numpy_inplace", "fastopt",
         pytest.param("loop of adam_step calls", id="fastopt_loop")]   # a Work.extras entry


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES)
def test_adam_model_step(bench_case, case, impl):
    bench_case(case, impl)
