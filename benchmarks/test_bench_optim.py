"""One-array optimizer updates: fastopt against NumPy, float32, 1e3 ... 1e7 elements.

The one-array optimizer cases of ``python -m fastopt bench``
(`fastopt.bench.ELEMENTWISE`: ``adam``, ``adamw``, ``rmsprop``, ``sgd`` --
the course's Momentum --, ``adagrad``, ``adamax``, ``nadam``, ``radam``,
``adadelta``, ``asgd``, ``rprop``, ``lion``): one group per (kernel, size)
with the members ``numpy``, ``numpy_inplace`` and ``fastopt`` (see
conftest.py).  The
``memory copy`` group is a bandwidth probe: compare its bytes / median with
a group's ``extra_info["bytes"]`` / median.

fastopt runs on all of OpenMP's threads.  How that holds up while other
processes keep every core busy is test_bench_contention.py.

    PYTHONPATH=src python -m pytest benchmarks/test_bench_optim.py --benchmark-only \\
        --benchmark-group-by=group --benchmark-columns=median,iqr,rounds
"""
import numpy as np
import pytest

from fastopt.bench import ELEMENTWISE, SIZES, build_cases

CASES = build_cases(ELEMENTWISE, SIZES, quick=False)


@pytest.mark.parametrize("impl", ["numpy", "numpy_inplace", "fastopt"])
@pytest.mark.parametrize("case", CASES)
def test_update(bench_case, case, impl):
    bench_case(case, impl)


def test_copy_probe(benchmark):
    """np.copyto of 100 MB on one thread; bytes read + written."""
    src = np.ones(25 * 10**6, np.float32)
    dst = np.empty_like(src)
    benchmark.group = "memory copy 100 MB"
    benchmark.extra_info["bytes"] = 2 * src.nbytes
    benchmark(np.copyto, dst, src)
    assert np.array_equal(dst, src)
