"""BatchNorm forward + backward (training, running stats updated): fastopt
against NumPy, float32.

One group per shape, e.g. ``batchnorm-32x64x56x56-nchw``, with members:

* ``numpy``: the straightforward code of a deep-learning course (a new array
  per operation, x_hat kept for the backward pass);
* ``numpy_inplace``: careful NumPy, every large operation with ``out=`` into
  preallocated buffers (x_hat, y, dx);
* ``fastopt``: the fused kernels writing into preallocated y and dx
  (``out=``/``dx_out=``), as a training loop would;
* ``fastopt_alloc``: the same with fresh y and dx arrays every call (their
  first-touch page faults included).

Each member checks one step against the ``numpy`` one before it is timed.
``extra_info`` records the bandwidth for the minimal traffic of a fused
implementation (x read twice and y written once, x and dy read twice and dx
written once: 8 arrays the size of x) over the median time.

    PYTHONPATH=src python -m pytest benchmarks/test_bench_batchnorm.py --benchmark-columns=median,ops
    PYTHONPATH=src python -m pytest benchmarks/test_bench_batchnorm.py --benchmark-disable   # smoke
"""
import numpy as np
import pytest

import fastopt

DTYPE = np.float32
EPS, MOMENTUM = 1e-5, 0.1

# name: (shape, channel axis)
SHAPES = {
    "32x64x56x56-nchw": ((32, 64, 56, 56), 1),
    "8x256x28x28-nchw": ((8, 256, 28, 28), 1),
    "256x512": ((256, 512), 1),
    "32x56x56x64-nhwc": ((32, 56, 56, 64), -1),
}

_inputs = {}


def inputs(name):
    """x, dy, gamma, beta, running_mean, running_var; generated once per shape."""
    if name not in _inputs:
        shape, axis = SHAPES[name]
        C = shape[axis]
        rng = np.random.default_rng(len(_inputs))
        _inputs[name] = (
            (rng.standard_normal(shape, dtype=DTYPE) * 2 + 1),
            rng.standard_normal(shape, dtype=DTYPE),
            rng.uniform(0.5, 1.5, C).astype(DTYPE),
            rng.standard_normal(C).astype(DTYPE),
            np.zeros(C, DTYPE),
            np.ones(C, DTYPE),
        )
    return _inputs[name]


def state(name):
    shape, axis = SHAPES[name]
    x, dy, gamma, beta, rm, rv = inputs(name)
    ax = axis % len(shape)
    bshape = [1] * len(shape)
    bshape[ax] = shape[ax]
    return dict(x=x, dy=dy, gamma=gamma, beta=beta, rm=rm.copy(), rv=rv.copy(), axis=axis,
                red=tuple(i for i in range(len(shape)) if i != ax), bshape=tuple(bshape),
                m=x.size // shape[ax])


# ------------------------------------------------------------------ members ---

def bn_numpy(s):
    """Course BatchNorm: forward with a cache, then backward."""
    x, red, bs, m = s["x"], s["red"], s["bshape"], s["m"]
    gamma, beta = s["gamma"].reshape(bs), s["beta"].reshape(bs)
    mu = np.mean(x, axis=red, keepdims=True)
    var = np.mean((x - mu) ** 2, axis=red, keepdims=True)
    x_hat = (x - mu) / np.sqrt(var + EPS)
    y = gamma * x_hat + beta
    s["rm"] = (1 - MOMENTUM) * s["rm"] + MOMENTUM * mu.reshape(-1)
    s["rv"] = (1 - MOMENTUM) * s["rv"] + MOMENTUM * var.reshape(-1) * m / (m - 1)
    dy = s["dy"]
    dbeta = np.sum(dy, axis=red, keepdims=True)
    dgamma = np.sum(dy * x_hat, axis=red, keepdims=True)
    dx = gamma / np.sqrt(var + EPS) / m * (m * dy - dbeta - x_hat * dgamma)
    return y, dx, dgamma.reshape(-1), dbeta.reshape(-1)


def bn_inplace(s):
    """Careful NumPy: preallocated x_hat, y, dx; small per-channel temporaries only."""
    x, dy, red, bs, m = s["x"], s["dy"], s["red"], s["bshape"], s["m"]
    if "xhat" not in s:
        s["xhat"], s["y"], s["dx"] = np.empty_like(x), np.empty_like(x), np.empty_like(x)
    xhat, y, dx = s["xhat"], s["y"], s["dx"]
    gamma, beta = s["gamma"].reshape(bs), s["beta"].reshape(bs)
    mu = np.mean(x, axis=red, keepdims=True)
    np.subtract(x, mu, out=xhat)
    np.square(xhat, out=y)
    var = np.mean(y, axis=red, keepdims=True)
    invstd = 1 / np.sqrt(var + DTYPE(EPS))
    xhat *= invstd
    np.multiply(xhat, gamma, out=y)
    y += beta
    rm, rv = s["rm"], s["rv"]
    rm *= DTYPE(1 - MOMENTUM)
    rm += DTYPE(MOMENTUM) * mu.reshape(-1)
    rv *= DTYPE(1 - MOMENTUM)
    rv += DTYPE(MOMENTUM * m / (m - 1)) * var.reshape(-1)
    dbeta = np.sum(dy, axis=red, keepdims=True)
    np.multiply(dy, xhat, out=dx)
    dgamma = np.sum(dx, axis=red, keepdims=True)
    np.multiply(xhat, dgamma / m, out=dx)
    np.subtract(dy, dx, out=dx)
    dx -= dbeta / m
    dx *= gamma * invstd
    return y, dx, dgamma.reshape(-1), dbeta.reshape(-1)


def bn_fastopt(s):
    if "y" not in s:
        s["y"], s["dx"] = np.empty_like(s["x"]), np.empty_like(s["x"])
    y, ctx = fastopt.batch_norm_forward(s["x"], s["gamma"], s["beta"], s["rm"], s["rv"],
                                        momentum=MOMENTUM, eps=EPS, axis=s["axis"], out=s["y"])
    return (y,) + fastopt.batch_norm_backward(s["dy"], ctx, dx_out=s["dx"])


def bn_fastopt_alloc(s):
    y, ctx = fastopt.batch_norm_forward(s["x"], s["gamma"], s["beta"], s["rm"], s["rv"],
                                        momentum=MOMENTUM, eps=EPS, axis=s["axis"])
    return (y,) + fastopt.batch_norm_backward(s["dy"], ctx)


MEMBERS = {"numpy": bn_numpy, "numpy_inplace": bn_inplace, "fastopt": bn_fastopt,
           "fastopt_alloc": bn_fastopt_alloc}


@pytest.mark.parametrize("member", MEMBERS)
@pytest.mark.parametrize("name", SHAPES)
def test_batchnorm(benchmark, name, member):
    step = MEMBERS[member]
    expected, s = state(name), state(name)
    want = bn_numpy(expected)
    got = step(s)
    for key, a, b in zip(("y", "dx", "dgamma", "dbeta"), got, want):
        scale = float(np.max(np.abs(b)))
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * scale, err_msg=key)
    for key in ("rm", "rv"):
        np.testing.assert_allclose(s[key], expected[key], rtol=1e-5, atol=1e-6, err_msg=key)
    benchmark.group = f"batchnorm-{name}"
    benchmark.name = member
    benchmark(step, s)
    if benchmark.stats is not None:     # None under --benchmark-disable
        nbytes = s["x"].nbytes
        benchmark.extra_info["GB/s"] = round(8 * nbytes / benchmark.stats.stats.median / 1e9, 2)
