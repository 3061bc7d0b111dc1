"""log_softmax, softmax, cross_entropy and BatchNorm on float16/bfloat16 inputs.

A 16-bit input is computed in float32 and the outputs are rounded to its
dtype, so each result is checked two ways:
* exactly: the float32 kernel on the widened inputs, rounded (NumPy/ml_dtypes);
* against the float64 references of test_softmax.py / test_batchnorm.py,
  within the 16-bit dtype's rounding (a few units in its last place).
"""
import os
import subprocess
import sys

import numpy as np
import pytest

import fastopt
from conftest import Snapshot, num_threads
from test_batchnorm import CASES as BN_CASES
from test_batchnorm import IDS as BN_IDS
from test_batchnorm import ref_backward, ref_forward
from test_softmax import ref_cross_entropy, ref_log_softmax

try:
    import ml_dtypes
    BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:
    BF16 = None

HALF = [pytest.param(np.float16, id="float16"),
        pytest.param("bfloat16", id="bfloat16",
                     marks=pytest.mark.skipif(BF16 is None, reason="ml_dtypes not installed"))]


def half(name):
    return np.dtype(np.float16) if name is np.float16 else BF16


def f32(a):
    return np.asarray(a).astype(np.float32)


def assert_same(got, want_f32, dtype, what=""):
    """got == want_f32 rounded to dtype, bit for bit (NaN included)."""
    want = np.asarray(want_f32, np.float32).astype(dtype)
    assert got.dtype == dtype, what
    np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16), err_msg=what)


def assert_near(got, ref, dtype, what="", ulps=2.0, scale=None):
    """|got - ref| <= ulps units of dtype's precision, relative to |ref|
    (and to `scale`, the size of the values, for those near zero)."""
    eps = 2.0**-10 if np.dtype(dtype) == np.float16 else 2.0**-7
    ref = np.asarray(ref, np.float64)
    scale = float(np.max(np.abs(ref))) if scale is None and ref.size else (scale or 1.0)
    np.testing.assert_allclose(f32(got), ref, rtol=ulps * eps, atol=ulps * eps * scale * 2**-4,
                               err_msg=what)


# ----------------------------------------------------------------- softmax ---

# small-C blocks, one chunk, several chunks (row buffer), few long rows (pieces)
SOFTMAX_SHAPES = [(5, 3), (300, 10), (40, 63), (33, 64), (7, 1000), (9, 2049),
                  (3, 9000), (1, 20000), (130, 4100)]


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("shape", SOFTMAX_SHAPES, ids=str)
@pytest.mark.parametrize("fn", ["log_softmax", "softmax"])
def test_softmax_on_16_bit_input(fn, shape, dtype, rng):
    dtype = half(dtype)
    x = (rng.standard_normal(shape) * 4).astype(dtype)
    f = getattr(fastopt, fn)
    got = f(x)
    assert_same(got, f(f32(x)), dtype, fn)
    ref = ref_log_softmax(f32(x))
    if fn == "softmax":
        assert_near(got, np.exp(ref), dtype, fn, scale=1.0)
    else:
        assert_near(got, ref, dtype, fn)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("shape,axis", [((4, 7, 5), 1), ((3, 2100, 2), 1), ((6, 5), 0)])
def test_softmax_on_16_bit_input_other_axes_and_in_place(shape, axis, dtype, rng):
    dtype = half(dtype)
    x = (rng.standard_normal(shape) * 4).astype(dtype)
    want = fastopt.log_softmax(f32(x), axis=axis)
    assert_near(fastopt.log_softmax(x, axis=axis), want, dtype, "axis")
    out = np.empty_like(x)
    assert fastopt.softmax(x, axis=axis, out=out) is out
    assert_near(out, np.exp(want), dtype, "out", scale=1.0)
    y = x.copy()
    fastopt.log_softmax(y, axis=axis, out=y)             # in place
    np.testing.assert_array_equal(y.view(np.uint16),
                                  fastopt.log_softmax(x, axis=axis).view(np.uint16))


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("shape", [(5, 3), (300, 10), (7, 1000), (9, 2049), (3, 9000),
                                   (64, 5000)], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("kind", ["index", "index-weighted-smoothed", "prob", "prob-weighted"])
def test_cross_entropy_on_16_bit_logits(kind, reduction, shape, dtype, rng):
    dtype = half(dtype)
    n, c = shape
    x = (rng.standard_normal(shape) * 3).astype(dtype)
    kw = dict(reduction=reduction)
    if kind.startswith("index"):
        target = rng.integers(0, c, n)
        target[rng.random(n) < 0.2] = -100
        target[0] = 0
    else:
        target = rng.random(shape).astype(np.float32)
        target /= target.sum(axis=1, keepdims=True)
        target = target.astype(dtype) if n % 2 else target    # float32 or the logits' dtype
    if "weighted" in kind:
        w = (rng.random(c) + 0.1).astype(np.float32)
        kw["weight"] = w.astype(dtype) if c % 2 else w
    if "smoothed" in kind:
        kw["label_smoothing"] = 0.1
    loss, g = fastopt.cross_entropy(x, target, return_grad=True, **kw)
    kw32 = dict(kw, weight=f32(kw["weight"])) if "weight" in kw else kw
    t32 = f32(target) if target.ndim == 2 else target
    loss32, g32 = fastopt.cross_entropy(f32(x), t32, return_grad=True, **kw32)
    assert_same(g, g32, dtype, "dlogits")
    if reduction == "none":
        # rounded from double once (float32 logits: from double to float32)
        d = loss.view(np.int16).astype(int) - loss32.astype(dtype).view(np.int16)
        assert loss.dtype == dtype and np.abs(d).max() <= 1
    else:
        assert loss == loss32                           # float64 sums of the same values
    ref_loss, ref_g = ref_cross_entropy(f32(x), t32, **kw32)
    assert_near(g, ref_g, dtype, "dlogits vs float64")
    if reduction == "none":                             # per-row losses in the logits' dtype
        assert_near(loss, ref_loss, dtype, "loss vs float64")
    else:
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("shape", [(300, 10), (40, 3000), (3, 9000), (1, 20000)], ids=str)
def test_16_bit_softmax_kernels_identical_on_1_2_3_threads(shape, dtype, rng):
    dtype = half(dtype)
    x = (rng.standard_normal(shape) * 3).astype(dtype)
    y = rng.integers(0, shape[1], shape[0])
    res = []
    for threads in (1, 2, 3):
        with num_threads(threads):
            loss, g = fastopt.cross_entropy(x, y, return_grad=True, label_smoothing=0.1)
            res.append((loss, g.view(np.uint16).copy(),
                        fastopt.softmax(x).view(np.uint16).copy(),
                        fastopt.log_softmax(x).view(np.uint16).copy()))
    for r in res[1:]:
        assert r[0] == res[0][0]
        for a, b in zip(r[1:], res[0][1:]):
            np.testing.assert_array_equal(a, b)


def test_cross_entropy_16_bit_bad_input_changes_nothing(rng):
    x = rng.standard_normal((4, 6)).astype(np.float16)
    y = rng.integers(0, 6, 4)
    g = np.zeros((4, 6), np.float16)
    snap = Snapshot(x, y, g)
    cases = [
        (dict(weight=np.ones(6)), TypeError, r"^weight has dtype float64 but logits has dtype float16"),
        (dict(return_grad=True, grad_out=np.zeros((4, 6), np.float32)), TypeError, r"^grad_out has dtype float32"),
        (dict(return_grad=True, grad_out=np.zeros((4, 5), np.float16)), ValueError, r"^grad_out has shape"),
    ]
    for kw, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            fastopt.cross_entropy(x, y, **kw)
    with pytest.raises(TypeError, match=r"^target has dtype float64 but logits has dtype float16"):
        fastopt.cross_entropy(x, np.ones((4, 6)))
    with pytest.raises(TypeError, match=r"^out has dtype float32 but x has dtype float16"):
        fastopt.log_softmax(x, out=np.zeros((4, 6), np.float32))
    snap.assert_unchanged()


# --------------------------------------------------------------- BatchNorm ---

def bn_inputs(rng, shape, axis, dtype):
    c = shape[axis]
    x = (rng.standard_normal(shape) * 2 + 0.5).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    gamma = rng.uniform(0.5, 1.5, c).astype(np.float32)
    beta = rng.standard_normal(c).astype(np.float32)
    rm = rng.standard_normal(c).astype(np.float32)
    rv = rng.uniform(0.5, 2.0, c).astype(np.float32)
    return x, dy, gamma, beta, rm, rv


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("shape,axis", BN_CASES, ids=BN_IDS)
@pytest.mark.parametrize("training", [True, False])
def test_batchnorm_on_16_bit_input(training, shape, axis, dtype, rng):
    dtype = half(dtype)
    x, dy, gamma, beta, rm, rv = bn_inputs(rng, shape, axis, dtype)
    rm32, rv32 = rm.copy(), rv.copy()
    gh = gamma.astype(dtype) if shape[axis] % 2 else gamma      # float32 or x's dtype
    y, ctx = fastopt.batch_norm_forward(x, gh, beta, rm, rv, training=training, axis=axis)
    y32, ctx32 = fastopt.batch_norm_forward(f32(x), f32(gh), beta, rm32, rv32,
                                            training=training, axis=axis)
    assert_same(y, y32, dtype, "y")
    np.testing.assert_array_equal(rm, rm32)
    np.testing.assert_array_equal(rv, rv32)
    dx, dgamma, dbeta = fastopt.batch_norm_backward(dy, ctx)
    dx32, dgamma32, dbeta32 = fastopt.batch_norm_backward(f32(dy), ctx32)
    assert_same(dx, dx32, dtype, "dx")
    assert dgamma.dtype == dbeta.dtype == np.float32
    np.testing.assert_array_equal(dgamma, dgamma32)
    np.testing.assert_array_equal(dbeta, dbeta32)
    # and against float64
    y_ref, mean, invstd, _, _ = ref_forward(f32(x), f32(gh), beta, rm.copy(), rv.copy(), training,
                                            0.1, 1e-5, axis)
    dx_ref, dg_ref, db_ref = ref_backward(f32(dy), f32(x), f32(gh), ctx.mean, ctx.invstd,
                                          training, axis)
    assert_near(y, y_ref, dtype, "y vs float64", ulps=3)
    assert_near(dx, dx_ref, dtype, "dx vs float64", ulps=3)
    np.testing.assert_allclose(dgamma, dg_ref, rtol=1e-4, atol=1e-4 * max(1, np.abs(dg_ref).max()))


@pytest.mark.parametrize("dtype", HALF)
def test_batchnorm_16_bit_identical_on_1_2_3_threads(dtype, rng):
    dtype = half(dtype)
    res = []
    for shape, axis in [((16, 16, 32, 32), 1), ((8, 16, 16, 40), -1), ((20001, 3), 1)]:
        x, dy, gamma, beta, rm, rv = bn_inputs(rng, shape, axis, dtype)
        out = []
        for threads in (1, 2, 3):
            with num_threads(threads):
                y, ctx = fastopt.batch_norm_forward(x, gamma, beta, axis=axis)
                dx, dg, db = fastopt.batch_norm_backward(dy, ctx)
            out.append([y.view(np.uint16), dx.view(np.uint16), dg, db])
        for o in out[1:]:
            for a, b in zip(o, out[0]):
                np.testing.assert_array_equal(a, b)


def test_batchnorm_16_bit_bad_input_changes_nothing(rng):
    x, dy, gamma, beta, rm, rv = bn_inputs(rng, (8, 3, 5), 1, np.float16)
    snap = Snapshot(x, gamma, beta, rm, rv)
    cases = [
        (dict(running_mean=rm.astype(np.float16), running_var=rv), TypeError,
         r"^running_mean has dtype float16 but x has dtype float16 \(for float16 x: float32\)"),
        (dict(running_mean=rm, running_var=rv.astype(np.float64)), TypeError, r"^running_var"),
        (dict(gamma=gamma.astype(np.float64)), TypeError, r"^gamma has dtype float64"),
        (dict(out=np.zeros(x.shape, np.float32)), TypeError, r"^out has dtype float32"),
    ]
    for kw, exc, msg in cases:
        args = dict(gamma=gamma, beta=beta)
        args.update(kw)
        g, b = args.pop("gamma"), args.pop("beta")
        with pytest.raises(exc, match=msg):
            fastopt.batch_norm_forward(x, g, b, **args)
    y, ctx = fastopt.batch_norm_forward(x, gamma, beta)
    with pytest.raises(TypeError, match=r"^dy has dtype float32 but x has dtype float16"):
        fastopt.batch_norm_backward(dy.astype(np.float32), ctx)
    snap.assert_unchanged()


# ------------------------------------------------------------ SIMD levels ---

_LEVEL_SCRIPT = """
import hashlib, numpy as np, fastopt
rng = np.random.default_rng(4)
h = hashlib.sha256()
for dt in (np.float16,):
    for shape in [(300, 10), (9, 2049), (3, 9000)]:
        x = (rng.standard_normal(shape) * 3).astype(dt)
        y = rng.integers(0, shape[1], shape[0])
        loss, g = fastopt.cross_entropy(x, y, return_grad=True, label_smoothing=0.1)
        h.update(np.float64(loss).tobytes() + g.tobytes() + fastopt.log_softmax(x).tobytes())
    for shape, axis in [((16, 16, 32, 32), 1), ((4000, 40), 1), ((8, 16, 16, 40), -1)]:
        x = rng.standard_normal(shape).astype(dt)
        c = shape[axis]
        yv, ctx = fastopt.batch_norm_forward(x, np.ones(c, np.float32), np.zeros(c, np.float32), axis=axis)
        dx, dg, db = fastopt.batch_norm_backward(x, ctx)
        h.update(yv.tobytes() + dx.tobytes() + dg.tobytes() + db.tobytes())
print(h.hexdigest())
"""


def test_16_bit_kernels_identical_at_every_simd_level():
    from fastopt import _dispatch, _runtime
    levels = [lv for lv in _dispatch._built_levels() if lv in _runtime.cpu_levels()]
    if len(levels) < 2:
        pytest.skip("only one SIMD level built for this CPU")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = {lv: subprocess.run([sys.executable, "-c", _LEVEL_SCRIPT], env=dict(env, FASTOPT_SIMD=lv),
                              check=True, capture_output=True, text=True).stdout for lv in levels}
    assert len(set(out.values())) == 1, out
