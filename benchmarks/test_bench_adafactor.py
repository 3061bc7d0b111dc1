"""Adafactor on one matrix, float32: the ``adafactor`` cases of
``python -m fastopt bench`` (1024 x 1024 and 4096 x 4096).

Members: ``numpy``, ``numpy_inplace`` (the formulas in NumPy), ``fastopt``
(`fastopt.adafactor_step`), ``class`` (``fastopt.Adafactor.step``) and,
with torch installed, ``torch_foreach`` (``torch.optim.Adafactor(foreach=True)``,
torch's fastest CPU path for it) and ``bridge`` (``fastopt.torch.Adafactor``).
On 4096 x 4096 fastopt should be at least 2x torch_foreach.

    PYTHONPATH=src python -m pytest benchmarks/test_bench_adafactor.py --benchmark-only \\
        --benchmark-group-by=group --benchmark-columns=median,iqr,rounds
"""
import pytest

from fastopt import bench

CASES = bench.build_cases(["adafactor"], [], quick=False)


@pytest.mark.parametrize("impl", ["numpy", "numpy_inplace", "fastopt",
                                  pytest.param("Adafactor(params).step(grads)", id="class")])
@pytest.mark.parametrize("case", CASES)
def test_adafactor(bench_case, case, impl):
    bench_case(case, impl)


@pytest.mark.parametrize("case", CASES)
def test_adafactor_torch(bench_case, case):
    pytest.importorskip("torch")
    bench_case(case, bench.peers.torch_optimizer("Adafactor", {"lr": 1e-2},
                                                 ("row_var", "col_var"), {"foreach": True}))
