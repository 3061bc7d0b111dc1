"""Cross-entropy loss + gradient and log-softmax: fastopt against NumPy, float32.

The ``cross_entropy`` (integer targets, mean loss, gradient into a reused
array) and ``log_softmax`` (last axis) cases of ``python -m fastopt bench``:
(64, 50257), (512, 1000) and (4096, 10).  Members ``numpy``,
``numpy_inplace`` and ``fastopt`` (see conftest.py).

    PYTHONPATH=src python -m pytest benchmarks/test_bench_softmax.py --benchmark-only \\
        --benchmark-group-by=group --benchmark-columns=median,iqr,rounds
"""
import pytest

from fastopt.bench import build_cases

CASES = build_cases(["cross_entropy", "log_softmax"], [], quick=False)


@pytest.mark.parametrize("impl", ["numpy", "numpy_inplace", "fastopt"])
@pytest.mark.parametrize("case", CASES)
def test_softmax(bench_case, case, impl):
    bench_case(case, impl)
