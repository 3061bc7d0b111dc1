"""adafactor_step against a NumPy reference written from torch.optim.Adafactor's
single-tensor code, and against torch.optim.Adafactor itself.

Adafactor takes norms and row and column sums: fastopt sums in double over
blocks fixed by the shape (the same bits on any number of threads), the
reference with NumPy's float64 sums, torch in the parameter's dtype in its
own order.  The sums round differently in their last bits, so results are
compared to a few ulps of the values' size (float32) or ~1e-13 (float64);
what does not depend on a sum (threads, 16-bit masters, loss scaling) is
compared bit for bit.
"""
import inspect
import math
import re

import numpy as np
import pytest

import fastopt
from conftest import Snapshot, num_threads
from fastopt import _kinds, _optim
from test_optim_kernels_more import HALF, assert_bits, half, lerp

DTYPES = [np.float32, np.float64]


def adafactor_ref(p, g, row_var, col_var, variance, *, step, lr=1e-2, beta2_decay=-0.8,
                  eps=(None, 1e-3), d=1.0, weight_decay=0.0, maximize=False):
    """torch.optim.Adafactor, one step, in the arrays' dtype (sums in float64)."""
    dt = p.dtype.type
    g = -g if maximize else g
    eps1, eps2 = eps
    if eps1 is None:
        eps1 = float(np.finfo(p.dtype).eps)
    w = step ** beta2_decay
    rho = min(lr, 1 / (step ** 0.5))
    norm = lambda x, **kw: np.sqrt(np.sum(x.astype(np.float64) ** 2, **kw)).astype(dt)  # noqa: E731
    alpha = max(eps2, float(norm(p)) / (p.size ** 0.5)) * rho
    if weight_decay != 0:
        p = p * (1 - lr * weight_decay)
    if p.ndim > 1:
        row_norm = norm(g, axis=-1, keepdims=True)
        row_var = lerp(row_var, row_norm * row_norm / dt(g.shape[-1]), w)
        col_norm = norm(g, axis=-2, keepdims=True)
        col_var = lerp(col_var, col_norm * col_norm / dt(g.shape[-2]), w)
        mean = np.mean(row_var.astype(np.float64), axis=-2, keepdims=True).astype(dt)
        v = row_var * col_var / np.maximum(mean, dt(eps1))
    else:
        variance = lerp(variance, g * g, w)
        v = variance
    u = 1 / np.sqrt(np.maximum(v, eps1 * eps1)) * g
    denom = max(1.0, float(norm(u)) / ((u.size ** 0.5) * d))
    p = p + (-alpha / denom) * u
    return p, row_var, col_var, variance


def start(shape, dtype, seed=0):
    """param and zero state, as torch starts it."""
    p = np.asarray(np.random.default_rng(seed).standard_normal(shape)).astype(dtype)
    if len(shape) >= 2:
        st = dict(row_var=np.zeros(shape[:-1] + (1,), dtype),
                  col_var=np.zeros(shape[:-2] + (1, shape[-1]), dtype))
    else:
        st = dict(variance=np.zeros(shape, dtype))
    return p, st


def grads(shape, dtype, steps, seed):
    rng = np.random.default_rng(seed)
    return [np.asarray(rng.standard_normal(shape) * (0.5 + t % 3)).astype(dtype)
            for t in range(steps)]


def within(actual, expected, scale, dtype, ulps, what=""):
    """|actual - expected| <= `ulps` units in the last place of max(|expected|, scale)."""
    np.testing.assert_array_equal(np.isnan(actual), np.isnan(expected), err_msg=what)
    ok = ~np.isnan(expected)
    m = np.maximum(np.abs(expected), scale)[ok].astype(dtype)
    err = np.abs(actual[ok].astype(np.float64) - expected[ok]) / np.spacing(m).astype(np.float64)
    assert err.size == 0 or err.max() <= ulps, (what, err.max())


def rms(x):
    return float(np.sqrt(np.mean(np.asarray(x, np.float64) ** 2))) if x.size else 0.0


# Shapes: 0-d and 1-d (unfactored), one matrix, a batch of matrices, rows and
# columns of one element, columns over one block (4096: wide), rows over one
# block (tall), a vector over one unit (32768).
SHAPES = [(), (1,), (7,), (17,), (1000,), (40000,), (3, 5), (2, 1), (1, 1), (1, 9000),
          (20000, 3), (4, 3, 5, 6)]
OPTIONS = [{}, dict(lr=0.05, beta2_decay=-0.5, eps=(1e-5, 1e-2), d=2.0, weight_decay=0.1,
                    maximize=True), dict(lr=1.0, eps=(0.0, 0.0), d=1.0)]


def opt_id(o):
    return ",".join(f"{k}={v}" for k, v in o.items()) or "default"


# vs the reference: float32, the sums rounded to float32 (nearly always the
# same number); float64, double sums of up to 40000 terms in another order
# (1e-13: 450 ulps).
ULPS = {np.float32: 4, np.float64: 2**52 * 1e-13}


@pytest.mark.parametrize("opts", OPTIONS, ids=opt_id)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(shape, dtype, opts):
    p, st = start(shape, dtype, 1)
    ref = dict(p=p.copy(), row_var=st.get("row_var"), col_var=st.get("col_var"),
               variance=st.get("variance"))
    scale = rms(p)
    for t, g in enumerate(grads(shape, dtype, 5, 2), 1):
        gsnap = Snapshot(g)
        fastopt.adafactor_step(p, g, step=t, **st, **opts)
        gsnap.assert_unchanged()
        out = adafactor_ref(ref["p"], g, ref["row_var"], ref["col_var"], ref["variance"],
                            step=t, **opts)
        ref = dict(zip(["p", "row_var", "col_var", "variance"], out))
        within(p, ref["p"], scale, dtype, ULPS[dtype], f"param at step {t}")
        for k, a in st.items():
            within(a, ref[k], rms(ref[k]), dtype, ULPS[dtype], f"{k} at step {t}")
        assert p.shape == shape


def torch_run(shape, dtype, opts, steps):
    torch = pytest.importorskip("torch")
    p, st = start(shape, dtype, 3)
    p0 = p.copy()
    tp = torch.nn.Parameter(torch.from_numpy(p.copy()))
    topt = torch.optim.Adafactor([tp], **opts)
    for t, g in enumerate(grads(shape, dtype, steps, 4), 1):
        tp.grad = torch.from_numpy(g.copy())
        topt.step()
        fastopt.adafactor_step(p, g, step=t, **st, **opts)
    return p0, p, st, tp.detach().numpy(), topt.state[tp]


@pytest.mark.parametrize("opts", OPTIONS[:2], ids=opt_id)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(), (7,), (30, 50), (3, 4, 5, 6), (1, 9000), (5000, 3)],
                         ids=str)
def test_trajectory_matches_torch(shape, dtype, opts):
    """50 steps: float64 to ~1e-12 of the values, float32 to a few ulps of them."""
    p0, p, st, q, tstate = torch_run(shape, dtype, opts, 50)
    ulps = 16 if dtype == np.float32 else 2**52 * 1e-12
    within(p, q, rms(p0), dtype, ulps, "param")
    for k, a in st.items():
        theirs = tstate[k].numpy()
        assert a.shape == theirs.shape and a.dtype == theirs.dtype
        within(a, theirs, rms(theirs), dtype, ulps, k)


@pytest.mark.parametrize("shape", [(5,), (4, 6)], ids=str)
def test_nan_gradient_as_torch(shape):
    """A NaN gradient element: NaN where torch has NaN (its row and column,
    or the whole parameter through the norms), finite where torch is."""
    torch = pytest.importorskip("torch")
    p, st = start(shape, np.float64, 5)
    tp = torch.nn.Parameter(torch.from_numpy(p.copy()))
    topt = torch.optim.Adafactor([tp])
    gs = grads(shape, np.float64, 3, 6)
    gs[1].reshape(-1)[2] = np.nan
    with np.errstate(all="ignore"):
        for t, g in enumerate(gs, 1):
            tp.grad = torch.from_numpy(g.copy())
            topt.step()
            fastopt.adafactor_step(p, g, step=t, **st)
            q = tp.detach().numpy()
            np.testing.assert_array_equal(np.isnan(p), np.isnan(q))
            fin = np.isfinite(q)
            np.testing.assert_allclose(p[fin], q[fin], rtol=1e-12)


def test_first_step_takes_the_gradient_statistics():
    """step 1: w = 1, so the statistics are the current gradient's, exactly."""
    g = np.arange(1.0, 7.0).reshape(2, 3)
    p = np.ones((2, 3))
    rv, cv = np.full((2, 1), 5.0), np.full((1, 3), 5.0)
    fastopt.adafactor_step(p, g, step=1, row_var=rv, col_var=cv)
    # torch's row_mean: the norm, squared, divided
    np.testing.assert_array_equal(rv, np.sqrt((g ** 2).sum(axis=1, keepdims=True)) ** 2 / 3)
    np.testing.assert_array_equal(cv, np.sqrt((g ** 2).sum(axis=0, keepdims=True)) ** 2 / 2)


# ------------------------------------------------- bits: threads, 16-bit ---

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(600, 700), (300_007,), (3, 200, 301)], ids=str)
def test_thread_count_does_not_change_results(shape, dtype):
    results = []
    for nt in (1, 2, 3):
        p, st = start(shape, dtype, 7)
        with num_threads(nt):
            for t, g in enumerate(grads(shape, dtype, 2, 8), 1):
                fastopt.adafactor_step(p, g, step=t, weight_decay=0.1, **st)
        results.append((p, st))
    for p, st in results[1:]:
        assert_bits(p, results[0][0], "param")
        for k in st:
            assert_bits(st[k], results[0][1][k], k)


@pytest.mark.parametrize("pdtype", HALF)
@pytest.mark.parametrize("grad_half", [False, True], ids=["grad32", "grad16"])
@pytest.mark.parametrize("shape", [(50, 70), (5000,)], ids=str)
def test_half_params_are_a_float32_step_on_the_master(shape, pdtype, grad_half):
    pdtype = half(pdtype)
    p32, st = start(shape, np.float32, 9)
    param = p32.astype(pdtype)
    master = param.astype(np.float32)
    ref_p, ref_st = master.copy(), {k: v.copy() for k, v in st.items()}
    for t, g in enumerate(grads(shape, np.float32, 3, 10), 1):
        g16 = g.astype(pdtype)
        fastopt.adafactor_step(param, g16 if grad_half else g, step=t, master=master,
                               maximize=True, **st)
        fastopt.adafactor_step(ref_p, g16.astype(np.float32) if grad_half else g, step=t,
                               maximize=True, **ref_st)
        assert_bits(master, ref_p, f"master at step {t}")
        np.testing.assert_array_equal(param.view(np.uint16), master.astype(pdtype).view(np.uint16))
        for k in st:
            assert_bits(st[k], ref_st[k], k)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(30, 50), (777,)], ids=str)
def test_grad_scale_divides_the_gradient_as_it_is_read(shape, dtype):
    scale = 3072.0
    p, st = start(shape, dtype, 11)
    ref_p, ref_st = p.copy(), {k: v.copy() for k, v in st.items()}
    for t, g in enumerate(grads(shape, dtype, 3, 12), 1):
        big = (g * scale).astype(dtype)
        _optim._stored_step(fastopt.adafactor_step, p, big, step=t, grad_scale=scale, **st)
        fastopt.adafactor_step(ref_p, big * dtype(1 / scale), step=t, **ref_st)
        assert_bits(p, ref_p, "param")
        for k in st:
            assert_bits(st[k], ref_st[k], k)
    with pytest.raises(ValueError, match="keeps its state in the param's dtype"):
        _optim._stored_step(fastopt.adafactor_step, p, g, step=1, state="bfloat16", **st)


# ----------------------------------------------------------- bad input ---

def test_bad_input_raises_and_changes_nothing():
    p, g = np.ones((4, 6)), np.ones((4, 6))
    rv, cv = np.zeros((4, 1)), np.zeros((1, 6))
    v1, p1 = np.zeros(6), np.ones(6)
    snap = Snapshot(p, rv, cv, v1, p1)
    f = fastopt.adafactor_step
    cases = [
        (lambda: f(p, g, step=1, row_var=rv), ValueError,
         r"^a 2-d param needs row_var and col_var"),
        (lambda: f(p, g, step=1, row_var=rv, col_var=cv, variance=v1), ValueError,
         r"^variance is the state of a 0-d or 1-d param"),
        (lambda: f(p1, g[0], step=1, variance=v1, row_var=rv), ValueError,
         r"^row_var and col_var are the state of a param of 2 or more"),
        (lambda: f(p1, g[0], step=1), ValueError, r"^a 1-d param needs variance"),
        (lambda: f(p, g, step=1, row_var=np.zeros((4,)), col_var=cv), ValueError,
         r"^row_var must have shape \(4, 1\)"),
        (lambda: f(p, g, step=1, row_var=rv, col_var=np.zeros((6, 1))), ValueError,
         r"^col_var must have shape \(1, 6\)"),
        (lambda: f(p, g, step=1, row_var=rv.astype(np.float32), col_var=cv), TypeError,
         r"^row_var has dtype float32 but param has dtype float64"),
        (lambda: f(p, g, step=1, row_var=rv, col_var=np.zeros((1, 12))[:, ::2]), ValueError,
         r"^col_var must be C-contiguous"),
        (lambda: f(p, g, step=0, row_var=rv, col_var=cv), ValueError, r"^step must be >= 1"),
        (lambda: f(p, g, step=1, row_var=rv, col_var=cv, beta2_decay=0.1), ValueError,
         r"^beta2_decay must be <= 0"),
        (lambda: f(p, g, step=1, row_var=rv, col_var=cv, d=0.5), ValueError, r"^d must be >= 1"),
        (lambda: f(p, g, step=1, row_var=rv, col_var=cv, eps=(-1.0, 1e-3)), ValueError,
         r"^eps\[0\] must be >= 0"),
        (lambda: f(p, g, step=1, row_var=rv, col_var=cv, eps=(None, None)), TypeError,
         r"^eps\[1\] must be a real number"),
        (lambda: f(p, g, step=1, row_var=rv, col_var=cv, eps=1e-3), TypeError,
         r"^eps must be a tuple of two numbers"),
        (lambda: f(p, g, step=1, row_var=rv, col_var=cv, lr=-1.0), ValueError, r"^lr must be >= 0"),
        (lambda: f(p, g, step=1, row_var=rv, col_var=cv, weight_decay=math.nan), ValueError,
         r"^weight_decay must be finite"),
        (lambda: f(p, g.astype(np.float32), step=1, row_var=rv, col_var=cv), TypeError,
         r"^grad has dtype float32"),
        (lambda: f(p, rv, step=1, row_var=rv, col_var=cv), ValueError, r"^grad has shape"),
        (lambda: f(p, g, step=1, row_var=p[:, :1].copy(), col_var=p[:1]), ValueError,
         r"^param and col_var overlap in memory"),
        (lambda: f(p.astype(np.float32), g.astype(np.float32), step=1,
                   row_var=rv.astype(np.float32), col_var=cv.astype(np.float32), lr=1e300),
         ValueError, r"^lr = 1e\+300 is too large for float32"),
    ]
    for call, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            call()
        snap.assert_unchanged()


def test_empty_param_is_a_noop():
    p = np.zeros((0, 5))
    rv, cv = np.zeros((0, 1)), np.full((1, 5), 3.0)
    fastopt.adafactor_step(p, p.copy(), step=1, row_var=rv, col_var=cv)
    np.testing.assert_array_equal(cv, 3.0)
    fastopt.adafactor_step(np.zeros(0), np.zeros(0), step=1, variance=np.zeros(0))


def test_declaration_matches_the_kernel_and_torch():
    decl = _kinds.KINDS["Adafactor"]
    params = inspect.signature(fastopt.adafactor_step).parameters
    for h in decl.hypers:
        assert params[h.name].default == h.default, h.name
    assert [s.name for s in decl.slots] == ["row_var", "col_var", "variance"]
    assert all(s.name in params for s in decl.slots)
    torch = pytest.importorskip("torch")
    sig = inspect.signature(torch.optim.Adafactor)
    assert {h.name for h in decl.hypers} == set(sig.parameters) - {"params", "foreach"}
    for h in decl.hypers:
        assert sig.parameters[h.name].default == h.default, h.name
    # the declared ranges are the kernel's
    p, g, v = np.ones(3), np.ones(3), np.zeros(3)
    for h in decl.hypers:
        if h.kind == "flag":
            continue
        bounds = h.each or [_kinds.Bound(h.lo, h.hi, h.closed)]
        for k, b in enumerate(bounds):
            bad = ([b.lo - 1e-9] if math.isfinite(b.lo) else []) + \
                  ([b.hi + 1e-9] if math.isfinite(b.hi) else [])
            for x in bad:
                value = x if h.each is None else tuple(x if i == k else h.default[i]
                                                        for i in range(2))
                name = h.name if h.each is None else f"{h.name}[{k}]"
                with pytest.raises(ValueError, match=r"^" + re.escape(name) + " must"):
                    fastopt.adafactor_step(p, g, step=1, variance=v, **{h.name: value})
            if b.closed and math.isfinite(b.hi):
                fastopt.adafactor_step(p.copy(), g, step=1, variance=v.copy(), **{h.name: b.hi})
