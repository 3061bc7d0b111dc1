"""Adam over a whole model's parameter list: one fused step against loops.

One group per parameter list (float32), each with four members:

* ``numpy``: a Python loop of the course's NumPy Adam over the arrays;
* ``numpy_inplace``: a loop of careful NumPy (``out=`` into the state and a
  preallocated scratch array);
* ``fastopt_loop``: a Python loop of ``fastopt.adam_step`` calls (one native
  call and, for large arrays, one parallel region per array);
* ``fastopt``: ``fastopt.Adam.step`` (one native call, one parallel region).

Parameter lists: ResNet-18's 62 arrays (11.7M elements), 500 arrays of 1000
elements (many small arrays: per-array overhead dominates) and 10 arrays of
1M elements (bandwidth).  Every member's first step is checked against the
``numpy`` one before it is timed.

    PYTHONPATH=src python -m pytest benchmarks/test_bench_optimizers.py \\
        --benchmark-columns=median,iqr,rounds --benchmark-group-by=group
    PYTHONPATH=src python -m pytest benchmarks/test_bench_optimizers.py --benchmark-disable
"""
import numpy as np
import pytest

import fastopt

LR, B1, B2, EPS = 1e-3, 0.9, 0.999, 1e-8
DTYPE = np.float32

# torchvision.models.resnet18().parameters(), in order: 62 arrays, 11,689,512 elements.
def _resnet18_shapes():
    shapes = [(64, 3, 7, 7), (64,), (64,)]                       # conv1, bn1
    cin = 64
    for cout, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
        for block in range(2):
            c_in = cin if block == 0 else cout
            shapes += [(cout, c_in, 3, 3), (cout,), (cout,),     # conv1, bn1
                       (cout, cout, 3, 3), (cout,), (cout,)]     # conv2, bn2
            if block == 0 and (stride != 1 or c_in != cout):
                shapes += [(cout, c_in, 1, 1), (cout,), (cout,)]  # downsample conv, bn
        cin = cout
    return shapes + [(1000, 512), (1000,)]                       # fc


RESNET18 = _resnet18_shapes()
assert len(RESNET18) == 62 and sum(int(np.prod(s)) for s in RESNET18) == 11_689_512

CASES = {
    "resnet18-62x": RESNET18,
    "500x1000": [(1000,)] * 500,
    "10x1M": [(10**6,)] * 10,
}


_inputs = {}        # the last case's (params, grads), generated once


def make_inputs(shapes):
    """Fresh copies of fixed random params and grads for a parameter list."""
    key = tuple(shapes)
    if key not in _inputs:
        _inputs.clear()
        rng = np.random.default_rng(0)
        _inputs[key] = ([rng.standard_normal(s, dtype=DTYPE) for s in shapes],
                        [rng.standard_normal(s, dtype=DTYPE) for s in shapes])
    params, grads = _inputs[key]
    return [p.copy() for p in params], grads


class NumpyAdam:
    """The course's Adam, array by array."""

    def __init__(self, params):
        self.m = [np.zeros_like(p) for p in params]
        self.v = [np.zeros_like(p) for p in params]
        self.t = 0

    def step(self, params, grads):
        self.t += 1
        for i, (p, g) in enumerate(zip(params, grads)):
            self.m[i] = B1 * self.m[i] + (1 - B1) * g
            self.v[i] = B2 * self.v[i] + (1 - B2) * g ** 2
            m_hat = self.m[i] / (1 - B1 ** self.t)
            v_hat = self.v[i] / (1 - B2 ** self.t)
            p -= LR * m_hat / (np.sqrt(v_hat) + EPS)


class InplaceAdam:
    """Careful NumPy: every operation writes into state or one scratch buffer."""

    def __init__(self, params):
        self.m = [np.zeros_like(p) for p in params]
        self.v = [np.zeros_like(p) for p in params]
        scratch = np.empty(max(p.size for p in params), DTYPE)
        self.tmp = [scratch[:p.size].reshape(p.shape) for p in params]
        self.t = 0

    def step(self, params, grads):
        self.t += 1
        step_size = DTYPE(LR / (1 - B1 ** self.t))
        inv_bc2 = DTYPE(1 / np.sqrt(1 - B2 ** self.t))
        for p, g, m, v, t in zip(params, grads, self.m, self.v, self.tmp):
            m *= DTYPE(B1)
            np.multiply(g, DTYPE(1 - B1), out=t)
            m += t
            v *= DTYPE(B2)
            np.multiply(g, g, out=t)
            t *= DTYPE(1 - B2)
            v += t
            np.sqrt(v, out=t)
            t *= inv_bc2
            t += DTYPE(EPS)
            np.divide(m, t, out=t)
            t *= step_size
            p -= t


class LoopAdam:
    """A Python loop of fastopt.adam_step calls."""

    def __init__(self, params):
        self.m = [np.zeros_like(p) for p in params]
        self.v = [np.zeros_like(p) for p in params]
        self.t = 0

    def step(self, params, grads):
        self.t += 1
        for p, g, m, v in zip(params, grads, self.m, self.v):
            fastopt.adam_step(p, g, m, v, step=self.t, lr=LR, betas=(B1, B2), eps=EPS)


class FusedAdam:
    """fastopt.Adam: one native call per step."""

    def __init__(self, params):
        self.opt = fastopt.Adam(params, lr=LR, betas=(B1, B2), eps=EPS)

    def step(self, params, grads):
        self.opt.step(grads)


IMPLS = {"numpy": NumpyAdam, "numpy_inplace": InplaceAdam, "fastopt_loop": LoopAdam,
         "fastopt": FusedAdam}

_expected = {}      # case -> params after one course-NumPy step


def expected_after_one_step(case):
    if case not in _expected:
        _expected.clear()
        params, grads = make_inputs(CASES[case])
        NumpyAdam(params).step(params, grads)
        _expected[case] = params
    return _expected[case]


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("case", list(CASES))
def test_adam_model_step(benchmark, case, impl):
    params, grads = make_inputs(CASES[case])
    opt = IMPLS[impl](params)
    opt.step(params, grads)
    for i, (p, q) in enumerate(zip(params, expected_after_one_step(case))):
        np.testing.assert_allclose(p, q, rtol=1e-5, atol=1e-6, err_msg=f"{impl}: params[{i}]")
    benchmark.group = f"adam {case} float32"
    benchmark.extra_info["arrays"] = len(params)
    benchmark.extra_info["elements"] = n = sum(p.size for p in params)
    benchmark.extra_info["bytes"] = 7 * 4 * n      # read p, g, m, v; write p, m, v
    benchmark(opt.step, params, grads)
