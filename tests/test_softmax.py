"""softmax, log_softmax, cross_entropy and the vectorized exp, against float64
NumPy references written from the formulas."""
import numpy as np
import pytest

import fastopt
from fastopt import _softmax as _kernels

from conftest import DTYPES, Snapshot, num_threads, tol


# ------------------------------------------------------------ references ---

def ref_log_softmax(x, axis=-1):
    x = np.asarray(x, np.float64)
    if x.size == 0:
        return x.copy()
    m = x.max(axis=axis, keepdims=True)
    return (x - m) - np.log(np.exp(x - m).sum(axis=axis, keepdims=True))


def ref_cross_entropy(x, target, weight=None, ignore_index=-100, reduction="mean",
                      label_smoothing=0.0):
    """torch.nn.functional.cross_entropy from its definition, float64:
    (loss, dloss/dlogits)."""
    x = np.asarray(x, np.float64)
    n, c = x.shape
    eps = label_smoothing
    w = np.ones(c) if weight is None else np.asarray(weight, np.float64)
    logp = ref_log_softmax(x)
    if target.ndim == 1:
        keep = target != ignore_index
        y = np.where(keep, target, 0).astype(np.int64)
        q = np.zeros((n, c))
        q[np.arange(n), y] = (1 - eps) * w[y]       # (1-eps) * nll
        q += eps / c * w                             # eps/C * sum_c -w_c logp_c
        q[~keep] = 0
        denom = w[y][keep].sum()
    else:
        q = (np.asarray(target, np.float64) * (1 - eps) + eps / c) * w
        denom = n
    with np.errstate(invalid="ignore"):
        rows = -np.where(q != 0, q * logp, 0.0).sum(axis=1)
        grad = np.exp(logp) * q.sum(axis=1, keepdims=True) - q
        if reduction == "mean":
            return rows.sum() / denom if n else np.nan, grad / denom
    if reduction == "sum":
        return rows.sum(), grad
    return rows, grad


def check_ce(x, target, dtype, **kw):
    loss, g = fastopt.cross_entropy(x, target, return_grad=True, **kw)
    ref_loss, ref_g = ref_cross_entropy(x, target, **kw)
    t = tol(dtype)
    if kw.get("reduction", "mean") == "none":
        assert loss.dtype == dtype and loss.shape == (x.shape[0],)
    else:
        assert isinstance(loss, float)
    np.testing.assert_allclose(loss, ref_loss, rtol=t["rtol"], atol=t["atol"])
    assert g.dtype == dtype and g.shape == x.shape
    np.testing.assert_allclose(g, ref_g, rtol=t["rtol"], atol=t["atol"])
    # loss only gives the same loss, bit for bit
    loss2 = fastopt.cross_entropy(x, target, **kw)
    np.testing.assert_array_equal(loss2, loss)
    return loss, g


def logits(rng, n, c, dtype, scale=3.0):
    return (rng.standard_normal((n, c)) * scale).astype(dtype)


# ------------------------------------------------------------------- exp ---

def ulp_error(got, exact, dtype):
    got = got.astype(np.float64)
    return np.abs(got - exact) / np.spacing(exact.astype(dtype)).astype(np.float64)


def test_exp_float32_dense():
    x = np.linspace(-87.3, 88.7, 2_000_003, dtype=np.float32)
    err = ulp_error(_kernels._exp(x), np.exp(x.astype(np.float64)), np.float32)
    assert err.max() <= 1.0
    # subnormal results: rounded once, not flushed
    x = np.linspace(-103.9, -87.4, 200_003, dtype=np.float32)
    got = _kernels._exp(x).astype(np.float64)
    assert np.abs(got - np.exp(x.astype(np.float64))).max() <= 2.0 ** -149
    assert got.max() > 0


def test_exp_float64_dense():
    x = np.linspace(-708.0, 709.7, 2_000_003)
    assert ulp_error(_kernels._exp(x), np.exp(x), np.float64).max() <= 2.0
    x = np.linspace(-745.1, -708.5, 20_003)
    assert np.abs(_kernels._exp(x) - np.exp(x)).max() <= 2.0 ** -1074


@pytest.mark.parametrize("dtype", DTYPES)
def test_exp_nonpositive_variant(dtype):
    """The kernels' exp for x <= 0 (x - max): same accuracy, subnormals rounded."""
    lo = -104.0 if dtype == np.float32 else -746.0
    x = np.concatenate([np.linspace(lo, 0.0, 1_000_003), [-0.0, -np.inf, np.nan, lo - 1]]).astype(dtype)
    got = _kernels._exp(x, nonpositive=True)
    exact = np.exp(x.astype(np.float64))
    tiny = np.finfo(dtype).smallest_subnormal
    assert np.isnan(got[-2]) and (got[-3] == 0) and (got[-1] == 0) and got[-4] == 1
    normal = exact >= np.finfo(dtype).tiny
    assert ulp_error(got[normal], exact[normal], dtype).max() <= (1.0 if dtype == np.float32 else 2.0)
    assert np.abs(got[:-4][~normal[:-4]] - exact[:-4][~normal[:-4]]).max() <= tiny
    np.testing.assert_array_equal(got[normal], _kernels._exp(x[normal]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_exp_special_values(dtype):
    big = 88.8 if dtype == np.float32 else 709.8
    x = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, big, 1e30, -1e30, -2000.0], dtype)
    got = _kernels._exp(x)
    assert np.isnan(got[0])
    np.testing.assert_array_equal(got[1:], [np.inf, 0, 1, 1, np.inf, np.inf, 0, 0])
    assert got.dtype == dtype
    # every lane position (vector bodies and tails) gives the same as alone
    y = np.resize(x, 37)
    np.testing.assert_array_equal(_kernels._exp(y), np.concatenate([_kernels._exp(y[i:i + 1]) for i in range(37)]))


def test_log_float64():
    x = np.concatenate([np.linspace(0.5, 2.0, 400_001), np.linspace(1.0, 60_000.0, 400_001),
                        np.geomspace(1e-300, 1e300, 200_001), np.geomspace(5e-324, 2.2e-308, 2_001)])
    got, exact = _kernels._log(x), np.log(x)
    err = np.abs(got - exact) / np.spacing(np.abs(exact))
    assert err[exact != 0].max() <= 2.0 and (got[exact == 0] == 0).all()
    special = np.array([0.0, -0.0, -1.0, np.inf, -np.inf, np.nan, 1.0])
    got = _kernels._log(special)
    np.testing.assert_array_equal(got, [-np.inf, -np.inf, np.nan, np.inf, np.nan, np.nan, 0.0])


# --------------------------------------------------- softmax, log_softmax ---

SHAPES_AXES = [((1,), 0), ((7,), -1), ((5, 3), -1), ((5, 3), 0), ((4, 70), 1),
               ((3, 5000), -1), ((2, 2100), -1), ((6, 9, 13), 1), ((6, 9, 130), 0),
               ((3, 4, 5, 70), -2), ((300, 2), 1), ((40, 17), 0), ((2, 0, 3), 1), ((0, 4), -1)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", SHAPES_AXES)
def test_log_softmax_and_softmax(rng, dtype, shape, axis):
    x = (rng.standard_normal(shape) * 4).astype(dtype)
    ref = ref_log_softmax(x, axis)
    got = fastopt.log_softmax(x, axis=axis)
    assert got.dtype == dtype and got.shape == x.shape
    np.testing.assert_allclose(got, ref, **tol(dtype))
    got = fastopt.softmax(x, axis=axis)
    assert got.dtype == dtype and got.shape == x.shape
    np.testing.assert_allclose(got, np.exp(ref), **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fn", ["log_softmax", "softmax"])
def test_softmax_out_and_in_place(rng, dtype, fn):
    f = getattr(fastopt, fn)
    for shape, axis in (((9, 33), -1), ((9, 33), 0), ((3, 9000), -1), ((70, 80), -1)):
        x = rng.standard_normal(shape).astype(dtype)
        expect = f(x, axis=axis)
        out = np.full_like(x, 7.0)
        assert f(x, axis=axis, out=out) is out
        np.testing.assert_array_equal(out, expect)
        assert f(x, axis=axis, out=x) is x
        np.testing.assert_array_equal(x, expect)


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_non_contiguous_input(rng, dtype):
    base = rng.standard_normal((20, 30)).astype(dtype)
    x = base[::2, ::3]
    for axis in (0, 1):
        np.testing.assert_allclose(fastopt.log_softmax(x, axis=axis), ref_log_softmax(x, axis), **tol(dtype))
    np.testing.assert_allclose(fastopt.softmax(base.T), np.exp(ref_log_softmax(base.T)), **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_special_rows(dtype):
    x = np.array([[1e4, 0, -1e4, 1e4 - 1],          # large logits: exact
                  [0, -np.inf, 1, 2],               # masked class
                  [-np.inf] * 4,                     # nothing left: NaN
                  [0, np.inf, 1, 2],
                  [0, np.nan, 1, 2]], dtype)
    ls = fastopt.log_softmax(x)
    lse = np.log1p(np.exp(-1.0))
    np.testing.assert_allclose(ls[0], [-lse, -1e4 - lse, -2e4 - lse, -1 - lse], rtol=1e-7)
    np.testing.assert_allclose(ls[1], ref_log_softmax(x[1:2])[0], **tol(dtype))
    assert ls[1, 1] == -np.inf
    assert np.isnan(ls[2:]).all()
    sm = fastopt.softmax(x)
    assert sm[1, 1] == 0 and np.isfinite(sm[:2]).all()
    assert np.isnan(sm[2:]).all()
    np.testing.assert_array_equal(fastopt.log_softmax(x.T.copy(), axis=0), ls.T)


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_bad_input(dtype):
    x = np.ones((3, 4), dtype)
    out = np.zeros((3, 4), dtype)
    snap = Snapshot(x, out)
    with pytest.raises(TypeError, match="x must"):
        fastopt.softmax(x.astype(np.int32))
    with pytest.raises(TypeError, match="x must"):
        fastopt.log_softmax([[1.0, 2.0]])
    with pytest.raises(ValueError, match="x must have at least one dimension"):
        fastopt.softmax(np.array(1.0, dtype))
    with pytest.raises(np.exceptions.AxisError, match="axis 2"):
        fastopt.softmax(x, axis=2)
    with pytest.raises(TypeError, match="axis"):
        fastopt.softmax(x, axis=1.0)
    with pytest.raises(ValueError, match="out has shape"):
        fastopt.softmax(x, out=np.zeros((4, 3), dtype))
    with pytest.raises(TypeError, match="out has dtype"):
        fastopt.log_softmax(x, out=out.astype(np.float32 if dtype == np.float64 else np.float64))
    with pytest.raises(ValueError, match="out must be C-contiguous"):
        fastopt.log_softmax(x, out=np.zeros((4, 3), dtype).T)
    ro = np.zeros((3, 4), dtype)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="out is read-only"):
        fastopt.log_softmax(x, out=ro)
    both = np.zeros((2, 3, 4), dtype)
    with pytest.raises(ValueError, match="overlap"):
        fastopt.softmax(both.reshape(-1)[:12].reshape(3, 4), out=both.reshape(-1)[1:13].reshape(3, 4))
    snap.assert_unchanged()


# ---------------------------------------------------------- cross-entropy ---

CE_SHAPES = [(1, 1), (7, 3), (33, 10), (5, 70), (3, 5000), (9, 2049)]


def class_targets(rng, n, c, ignore=True):
    y = rng.integers(0, c, n)
    if ignore and n > 2:
        y[1] = -100
    return y


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", CE_SHAPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_class_targets(rng, dtype, shape, reduction):
    n, c = shape
    x = logits(rng, n, c, dtype)
    y = class_targets(rng, n, c)
    w = (rng.random(c) + 0.1).astype(dtype)
    for kw in ({}, dict(weight=w), dict(label_smoothing=0.1), dict(weight=w, label_smoothing=0.3)):
        check_ce(x, y, dtype, reduction=reduction, **kw)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", CE_SHAPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_probability_targets(rng, dtype, shape, reduction):
    n, c = shape
    x = logits(rng, n, c, dtype)
    t = rng.random((n, c))
    t = (t / t.sum(axis=1, keepdims=True)).astype(dtype)
    onehot = np.eye(c, dtype=dtype)[rng.integers(0, c, n)]
    w = (rng.random(c) + 0.1).astype(dtype)
    for target in (t, onehot):
        for kw in ({}, dict(weight=w), dict(label_smoothing=0.2), dict(weight=w, label_smoothing=1.0)):
            check_ce(x, target, dtype, reduction=reduction, **kw)


def test_cross_entropy_onehot_equals_class_index(rng):
    x = logits(rng, 20, 7, np.float64)
    y = rng.integers(0, 7, 20)
    w = rng.random(7) + 0.5
    for kw in ({}, dict(label_smoothing=0.25)):
        a = fastopt.cross_entropy(x, y, reduction="none", return_grad=True, weight=w, **kw)
        b = fastopt.cross_entropy(x, np.eye(7)[y], reduction="none", return_grad=True, weight=w, **kw)
        np.testing.assert_allclose(a[0], b[0], rtol=1e-13)
        np.testing.assert_allclose(a[1], b[1], rtol=1e-13, atol=1e-16)


@pytest.mark.parametrize("tdtype", [np.int8, np.uint8, np.int16, np.uint16, np.int32,
                                    np.uint32, np.int64, np.uint64])
def test_cross_entropy_target_integer_dtypes(rng, tdtype):
    x = logits(rng, 11, 5, np.float32)
    y = rng.integers(0, 5, 11)
    ref = fastopt.cross_entropy(x, y, reduction="none")
    np.testing.assert_array_equal(fastopt.cross_entropy(x, y.astype(tdtype), reduction="none"), ref)


def test_cross_entropy_ignore_index(rng):
    x = logits(rng, 6, 4, np.float64)
    y = np.array([0, 3, 2, 3, 1, 3])
    for kw in ({}, dict(label_smoothing=0.2), dict(weight=np.arange(1.0, 5.0))):
        loss, g = fastopt.cross_entropy(x, y, ignore_index=3, reduction="none", return_grad=True, **kw)
        assert (loss[[1, 3, 5]] == 0).all() and (g[[1, 3, 5]] == 0).all()
        keep = [0, 2, 4]
        np.testing.assert_allclose(loss[keep], fastopt.cross_entropy(x[keep], y[keep], reduction="none", **kw))
        check_ce(x, y, np.float64, ignore_index=3, **kw)
    # all rows ignored: NaN mean (0/0), zero sum, zero gradient
    yi = np.full(6, -100)
    loss, g = fastopt.cross_entropy(x, yi, return_grad=True)
    assert np.isnan(loss) and (g == 0).all()
    assert fastopt.cross_entropy(x, yi, reduction="sum") == 0
    assert np.isnan(fastopt.cross_entropy(x, yi, label_smoothing=0.1))


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_empty_batch(dtype):
    x = np.zeros((0, 5), dtype)
    y = np.zeros(0, np.int64)
    for target in (y, np.zeros((0, 5), dtype)):
        loss, g = fastopt.cross_entropy(x, target, return_grad=True)
        assert np.isnan(loss) and g.shape == (0, 5)
        assert fastopt.cross_entropy(x, target, reduction="sum") == 0.0
        assert fastopt.cross_entropy(x, target, reduction="none").shape == (0,)


def test_cross_entropy_no_classes():
    x = np.zeros((3, 0))
    loss, g = fastopt.cross_entropy(x, np.zeros((3, 0)), reduction="none", return_grad=True)
    np.testing.assert_array_equal(loss, 0.0)
    assert g.shape == (3, 0)
    assert fastopt.cross_entropy(x, np.zeros((3, 0))) == 0.0
    assert np.isnan(fastopt.cross_entropy(x, np.full(3, -100)))
    with pytest.raises(ValueError, match=r"target\[0\] = 0 is out of range"):
        fastopt.cross_entropy(x, np.zeros(3, np.int64))


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_large_logits_exact(dtype):
    x = np.array([[1e4, 0, -1e4], [-1e4, 1e4, 1e4 - 2], [1e4, 1e4, 1e4]], dtype)
    y = np.array([0, 0, 2])
    loss, g = fastopt.cross_entropy(x, y, reduction="none", return_grad=True)
    lse1 = np.log1p(np.exp(-2.0))
    np.testing.assert_allclose(loss, [0.0, 2e4 + lse1, np.log(3.0)], rtol=1e-7, atol=0)
    assert loss[0] == 0 and np.isfinite(g).all()
    np.testing.assert_allclose(g[2], [1 / 3, 1 / 3, -2 / 3], rtol=1e-6)
    np.testing.assert_allclose(g[1], [-1, 1 / (1 + np.exp(-2.0)), 1 / (1 + np.exp(2.0))], rtol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c", [4, 3000])
def test_cross_entropy_masked_class(rng, dtype, c):
    x = logits(rng, 3, c, dtype)
    x[:, 1] = -np.inf
    y = np.array([0, 2, 3])
    loss, g = fastopt.cross_entropy(x, y, reduction="none", return_grad=True)
    assert np.isfinite(loss).all() and np.isfinite(g).all() and (g[:, 1] == 0).all()
    xf = np.delete(x, 1, axis=1)
    np.testing.assert_allclose(loss, ref_cross_entropy(xf, y - (y > 1), reduction="none")[0], **tol(dtype))
    onehot = np.eye(c, dtype=dtype)[y]
    lp, gp = fastopt.cross_entropy(x, onehot, reduction="none", return_grad=True)
    np.testing.assert_allclose(lp, loss, **tol(dtype))
    assert (gp[:, 1] == 0).all()
    # label smoothing puts eps/C on the masked class: PyTorch gives +inf
    # (NaN when that class has weight 0) and a finite gradient
    ls, gs = fastopt.cross_entropy(x, y, label_smoothing=0.1, reduction="none", return_grad=True)
    assert (ls == np.inf).all() and np.isfinite(gs).all()
    np.testing.assert_allclose(gs[:, 1], -0.1 / c, rtol=1e-6)
    w = np.ones(c, dtype)
    w[1] = 0
    ls = fastopt.cross_entropy(x, y, label_smoothing=0.1, weight=w, reduction="none")
    assert np.isnan(ls).all()
    assert fastopt.cross_entropy(x, onehot, label_smoothing=0.1) == np.inf


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c", [4, 3000])
def test_cross_entropy_nan_rows(rng, dtype, c):
    x = logits(rng, 4, c, dtype)
    x[0, :] = -np.inf
    x[1, 2] = np.inf
    x[2, 3] = np.nan
    y = np.array([0, 1, 1, 1])
    loss, g = fastopt.cross_entropy(x, y, reduction="none", return_grad=True)
    assert np.isnan(loss[:3]).all() and np.isnan(g[:3]).all()
    assert np.isfinite(loss[3]) and np.isfinite(g[3]).all()
    assert np.isnan(fastopt.cross_entropy(x, y))
    assert np.isnan(fastopt.cross_entropy(x, np.eye(c, dtype=dtype)[y], reduction="none")[:3]).all()


@pytest.mark.parametrize("target_kind", ["class", "prob"])
def test_cross_entropy_gradient_finite_differences(rng, target_kind):
    n, c = 4, 6
    x = rng.standard_normal((n, c))
    w = rng.random(c) + 0.5
    if target_kind == "class":
        target = np.array([0, 5, -100, 2])
    else:
        target = rng.random((n, c))
        target /= target.sum(axis=1, keepdims=True)
    for reduction in ("mean", "sum", "none"):
        kw = dict(weight=w, label_smoothing=0.15, reduction=reduction)
        _, g = fastopt.cross_entropy(x, target, return_grad=True, **kw)
        f = lambda z: np.sum(fastopt.cross_entropy(z, target, **kw))
        h = 1e-6
        fd = np.zeros_like(x)
        for idx in np.ndindex(x.shape):
            xp, xm = x.copy(), x.copy()
            xp[idx] += h
            xm[idx] -= h
            fd[idx] = (f(xp) - f(xm)) / (2 * h)
        np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4096, 10), (64, 3000), (3, 9000), (5, 4100)])
def test_cross_entropy_thread_count_invariant(rng, dtype, shape):
    n, c = shape
    x = logits(rng, n, c, dtype)
    y = class_targets(rng, n, c)
    t = rng.random((n, c)).astype(dtype)
    w = (rng.random(c) + 0.1).astype(dtype)
    for target, kw in ((y, dict(weight=w, label_smoothing=0.1)), (t, dict(label_smoothing=0.05))):
        with num_threads(1):
            a = fastopt.cross_entropy(x, target, return_grad=True, **kw)
            an = fastopt.cross_entropy(x, target, reduction="none", **kw)
        with num_threads(2):
            b = fastopt.cross_entropy(x, target, return_grad=True, **kw)
            bn = fastopt.cross_entropy(x, target, reduction="none", **kw)
        assert a[0] == b[0]
        np.testing.assert_array_equal(a[1], b[1])
        np.testing.assert_array_equal(an, bn)


@pytest.mark.parametrize("shape,axis", [((3, 9000), -1), ((4096, 10), -1), ((64, 3000), 0), ((50, 40, 30), 1)])
def test_softmax_thread_count_invariant(rng, shape, axis):
    x = rng.standard_normal(shape).astype(np.float32)
    for f in (fastopt.softmax, fastopt.log_softmax):
        with num_threads(1):
            a = f(x, axis=axis)
        with num_threads(2):
            b = f(x, axis=axis)
        np.testing.assert_array_equal(a, b)


def test_cross_entropy_grad_out(rng):
    x = logits(rng, 5, 7, np.float32)
    y = rng.integers(0, 7, 5)
    g = np.full_like(x, 9.0)
    loss, g2 = fastopt.cross_entropy(x, y, return_grad=True, grad_out=g)
    assert g2 is g
    np.testing.assert_array_equal(g, fastopt.cross_entropy(x, y, return_grad=True)[1])
    assert loss == fastopt.cross_entropy(x, y)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_bad_input(rng, dtype):
    x = logits(rng, 4, 3, dtype)
    y = np.array([0, 2, 1, 0])
    g = np.zeros_like(x)
    w = np.ones(3, dtype)
    snap = Snapshot(x, y, g, w)
    other = np.float32 if dtype == np.float64 else np.float64

    def bad(exc, match, *args, **kw):
        with pytest.raises(exc, match=match):
            fastopt.cross_entropy(*args, **kw)

    bad(ValueError, r"target\[2\] = 3 is out of range", x, np.array([0, 1, 3, 7]), return_grad=True, grad_out=g)
    bad(ValueError, r"target\[0\] = -1 is out of range", x, np.array([-1, 1, 2, 0]), return_grad=True, grad_out=g)
    bad(ValueError, r"target\[1\] = -100 is out of range", x, np.array([0, -100, 2, 0]), ignore_index=-1)
    bad(ValueError, r"target\[3\] = 18446744073709551615", x, np.array([0, 1, 2, 2**64 - 1], np.uint64))
    bad(TypeError, "integer class indices", x, y.astype(dtype))
    bad(TypeError, "target must be a numpy.ndarray", x, [0, 1, 2, 0])
    bad(ValueError, "target must have shape", x, y[:3])
    bad(ValueError, "target has shape", x, np.zeros((4, 2), dtype))
    bad(TypeError, "target has dtype", x, np.zeros((4, 3), other))
    bad(TypeError, "logits must", x.astype(np.int64), y)
    bad(ValueError, r"logits must have shape \(N, C\)", x[0], y[:1])
    bad(ValueError, r"weight must have shape \(3,\)", x, y, weight=np.ones(4, dtype))
    bad(TypeError, "weight has dtype", x, y, weight=np.ones(3, other))
    bad(ValueError, "weight must be finite and >= 0", x, y, weight=np.array([1, -1, 1], dtype))
    bad(ValueError, "weight must be finite and >= 0", x, y, weight=np.array([1, np.nan, 1], dtype))
    bad(ValueError, "label_smoothing must be in", x, y, label_smoothing=1.5)
    bad(ValueError, "label_smoothing must be in", x, y, label_smoothing=-0.1)
    bad(ValueError, "label_smoothing must be finite", x, y, label_smoothing=np.nan)
    bad(ValueError, "reduction must be", x, y, reduction="avg")
    bad(TypeError, "ignore_index must be an integer", x, y, ignore_index=1.0)
    bad(ValueError, "ignore_index is not supported with probability targets", x, np.zeros((4, 3), dtype), ignore_index=0)
    bad(ValueError, "grad_out requires return_grad=True", x, y, grad_out=g)
    bad(ValueError, "grad_out has shape", x, y, return_grad=True, grad_out=np.zeros((3, 4), dtype))
    bad(TypeError, "grad_out has dtype", x, y, return_grad=True, grad_out=np.zeros((4, 3), other))
    bad(ValueError, "grad_out must be C-contiguous", x, y, return_grad=True, grad_out=np.zeros((3, 4), dtype).T)
    ro = np.zeros_like(x)
    ro.flags.writeable = False
    bad(ValueError, "grad_out is read-only", x, y, return_grad=True, grad_out=ro)
    bad(ValueError, "logits and grad_out overlap", x, y, return_grad=True, grad_out=x)
    snap.assert_unchanged()


_LEVEL_SCRIPT = """
import sys, numpy as np, fastopt
rng = np.random.default_rng(5)
out = []
for n, c in [(3, 9000), (64, 300), (500, 10)]:
    for dtype in (np.float32, np.float64):
        x = (rng.standard_normal((n, c)) * 5).astype(dtype)
        y = rng.integers(0, c, n)
        t = rng.random((n, c)).astype(dtype)
        out.append(fastopt.cross_entropy(x, y, return_grad=True, label_smoothing=0.1)[1])
        out.append(fastopt.cross_entropy(x, t, reduction="none", return_grad=True)[0])
        out.append(fastopt.log_softmax(x, axis=0))
        out.append(fastopt.softmax(x))
sys.stdout.write(b"".join(a.tobytes() for a in out).hex())
"""


def test_same_bits_at_every_simd_level():
    import os
    import subprocess
    import sys
    from fastopt import _dispatch, _runtime
    levels = [lv for lv in _dispatch._built_levels() if lv in _runtime.cpu_levels()]
    if len(levels) < 2:
        pytest.skip("only one SIMD level built for this CPU")
    results = {}
    for level in levels:
        env = dict(os.environ, FASTOPT_SIMD=level)
        results[level] = subprocess.run([sys.executable, "-c", _LEVEL_SCRIPT], env=env, check=True,
                                        capture_output=True, text=True).stdout
    assert len(set(results.values())) == 1, list(results)


def test_cross_entropy_random_cases():
    """Random shapes (SIMD tails, chunk boundaries, short-row blocks) and options."""
    from hypothesis import given, settings, strategies as st

    @settings(max_examples=40, deadline=None)
    @given(n=st.integers(0, 40), c=st.sampled_from([1, 2, 15, 16, 17, 63, 64, 65, 2047, 2048, 2049, 4100]),
           dtype=st.sampled_from(DTYPES), kind=st.sampled_from(["class", "prob"]),
           weighted=st.booleans(), eps=st.sampled_from([0.0, 0.1, 1.0]),
           reduction=st.sampled_from(["mean", "sum", "none"]), seed=st.integers(0, 2**16))
    def check(n, c, dtype, kind, weighted, eps, reduction, seed):
        rng = np.random.default_rng(seed)
        x = logits(rng, n, c, dtype)
        if kind == "class":
            target = rng.integers(0, c, n)
            target[rng.random(n) < 0.2] = -100
        else:
            target = rng.random((n, c)).astype(dtype)
        w = (rng.random(c) + 0.1).astype(dtype) if weighted else None
        if kind == "class" and reduction == "mean" and (target == -100).all():
            return                      # NaN, tested elsewhere
        check_ce(x, target, dtype, weight=w, label_smoothing=eps, reduction=reduction)

    check()
