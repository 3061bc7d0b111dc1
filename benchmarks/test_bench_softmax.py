"""Cross-entropy loss + gradient and log-softmax: fastopt against NumPy, float32.

One group per (kernel, shape), e.g. ``cross_entropy-64x50257``, with members:

* ``numpy``: the course's code: ``yhat = softmax(z)``, ``L = -sum(Y*log(yhat))/N``,
  ``dz = (yhat - Y)/N`` with the one-hot Y (a new array per operation);
* ``numpy_inplace``: careful NumPy: stable log-sum-exp, the loss from the
  target logits only, every large operation with ``out=`` into a preallocated
  gradient;
* ``fastopt``: ``cross_entropy(z, y, return_grad=True, grad_out=dz)`` with
  class indices y.

Each member's result is checked once against the ``numpy`` one before it is timed.

    PYTHONPATH=src python -m pytest benchmarks/test_bench_softmax.py --benchmark-columns=median,iqr
    PYTHONPATH=src python -m pytest benchmarks/test_bench_softmax.py --benchmark-disable   # smoke
"""
import numpy as np
import pytest

import fastopt

DTYPE = np.float32
CE_SHAPES = {"64x50257": (64, 50257), "512x1000": (512, 1000), "4096x10": (4096, 10)}
# name: (shape, axis)
LS_SHAPES = {"64x50257": ((64, 50257), -1), "512x1000": ((512, 1000), -1),
             "32x1000x64-axis1": ((32, 1000, 64), 1)}

_inputs = {}


def ce_inputs(name):
    """logits z, class indices y, one-hot Y; generated once per shape."""
    if name not in _inputs:
        n, c = CE_SHAPES[name]
        rng = np.random.default_rng(n + c)
        z = rng.standard_normal((n, c), dtype=DTYPE) * 3
        y = rng.integers(0, c, n)
        Y = np.zeros((n, c), DTYPE)
        Y[np.arange(n), y] = 1
        _inputs[name] = (z, y, Y)
    return _inputs[name]


# ---------------------------------------------------------- cross-entropy ---

def ce_numpy(s):
    z, Y = s["z"], s["Y"]
    n = z.shape[0]
    e = np.exp(z - np.max(z, axis=1, keepdims=True))
    yhat = e / np.sum(e, axis=1, keepdims=True)
    loss = -np.sum(Y * np.log(yhat)) / n
    dz = (yhat - Y) / n
    return loss, dz


def ce_inplace(s):
    z, y = s["z"], s["y"]
    n = z.shape[0]
    rows = np.arange(n)
    dz = s.setdefault("dz", np.empty_like(z))
    m = np.max(z, axis=1, keepdims=True)
    np.subtract(z, m, out=dz)
    np.exp(dz, out=dz)
    total = np.sum(dz, axis=1, keepdims=True)
    # logp_y = (z_y - max) - log(sum)
    loss = -np.mean((z[rows, y] - m[:, 0]) - np.log(total[:, 0]), dtype=np.float64)
    total *= n
    np.divide(dz, total, out=dz)
    dz[rows, y] -= DTYPE(1.0 / n)
    return loss, dz


def ce_fastopt(s):
    dz = s.setdefault("dz", np.empty_like(s["z"]))
    return fastopt.cross_entropy(s["z"], s["y"], return_grad=True, grad_out=dz)


CE_MEMBERS = {"numpy": ce_numpy, "numpy_inplace": ce_inplace, "fastopt": ce_fastopt}


@pytest.mark.parametrize("member", CE_MEMBERS)
@pytest.mark.parametrize("name", CE_SHAPES)
def test_cross_entropy(benchmark, name, member):
    z, y, Y = ce_inputs(name)
    step = CE_MEMBERS[member]
    s = dict(z=z, y=y, Y=Y)
    want_loss, want_dz = ce_numpy(dict(s))
    loss, dz = step(s)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    np.testing.assert_allclose(dz, want_dz, rtol=1e-4, atol=1e-6 / z.shape[0])
    benchmark.group = f"cross_entropy-{name}"
    benchmark.name = member
    benchmark(step, s)


# ------------------------------------------------------------ log-softmax ---

def ls_numpy(x, axis, out):
    m = np.max(x, axis=axis, keepdims=True)
    return x - m - np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True))


def ls_inplace(x, axis, out):
    m = np.max(x, axis=axis, keepdims=True)
    np.subtract(x, m, out=out)
    lse = np.sum(np.exp(out), axis=axis, keepdims=True)
    np.log(lse, out=lse)
    out -= lse
    return out


def ls_fastopt(x, axis, out):
    return fastopt.log_softmax(x, axis=axis, out=out)


LS_MEMBERS = {"numpy": ls_numpy, "numpy_inplace": ls_inplace, "fastopt": ls_fastopt}


@pytest.mark.parametrize("member", LS_MEMBERS)
@pytest.mark.parametrize("name", LS_SHAPES)
def test_log_softmax(benchmark, name, member):
    shape, axis = LS_SHAPES[name]
    x = np.random.default_rng(7).standard_normal(shape, dtype=DTYPE) * 3
    out = np.empty_like(x)
    f = LS_MEMBERS[member]
    np.testing.assert_allclose(f(x, axis, out), ls_numpy(x, axis, None), rtol=1e-5, atol=1e-5)
    benchmark.group = f"log_softmax-{name}"
    benchmark.name = member
    benchmark(f, x, axis, out)
