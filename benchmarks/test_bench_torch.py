"""fastopt.torch.Adam, the PyTorch bridge over fastopt's fused step, float32 (needs torch).

* ``bridge`` in the ``optimizer`` groups: ``fastopt.torch.Adam`` on torch
  tensors sharing the case's arrays, gradients assigned to ``.grad`` each
  step (the ``+ fastopt torch.Adam on torch tensors`` row of
  ``python -m fastopt bench --peers``).
* Group ``torch bridge overhead 500 x 1000``: one step over 500 parameters
  of 1000 elements, with new gradient tensors before each step (set outside
  the timing, as backward does): ``numpy_api`` is ``fastopt.Adam.step(grads)``,
  ``bridge`` is ``fastopt.torch.Adam.step()``; their difference is what the
  bridge costs (reading 500 ``.grad`` s and checking them, bumping 500
  version counters).  ``torch_fused`` is ``torch.optim.Adam(fused=True)``.

    PYTHONPATH=src python -m pytest benchmarks/test_bench_torch.py --benchmark-only \\
        --benchmark-group-by=group --benchmark-columns=median,iqr,rounds
"""
import numpy as np
import pytest

from fastopt import bench

torch = pytest.importorskip("torch")
fo = pytest.importorskip("fastopt.torch")

CASES = bench.build_cases(["optimizer"], [], quick=False)


@pytest.mark.parametrize("case", CASES)
def test_bridge_model_step(bench_case, case):
    bench_case(case, bench._fastopt_torch_adam)


def _setup(n=500, m=1000):
    rng = np.random.default_rng(0)
    params = [rng.standard_normal(m).astype(np.float32) for _ in range(n)]
    grads = [[rng.standard_normal(m).astype(np.float32) * 0.01 for _ in range(n)]
             for _ in range(2)]
    return params, grads


@pytest.mark.parametrize("impl", ["numpy_api", "bridge", "torch_fused"])
def test_bridge_overhead(benchmark, impl):
    params, grads = _setup()
    benchmark.group = "torch bridge overhead 500 x 1000"
    if impl == "numpy_api":
        import fastopt
        opt = fastopt.Adam(params)
        state = {"t": 0}

        def step():
            state["t"] += 1
            opt.step(grads[state["t"] & 1])
        benchmark.pedantic(step, rounds=300, warmup_rounds=10, iterations=1)
        return
    ps = [torch.nn.Parameter(torch.from_numpy(p)) for p in params]
    gs = [[torch.from_numpy(g) for g in gl] for gl in grads]
    opt = fo.Adam(ps) if impl == "bridge" else torch.optim.Adam(ps, fused=True)
    state = {"t": 0}

    def new_grads():
        state["t"] += 1
        for p, g in zip(ps, gs[state["t"] & 1]):
            p.grad = g
    benchmark.pedantic(opt.step, setup=new_grads, rounds=300, warmup_rounds=10, iterations=1)
