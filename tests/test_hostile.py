"""Hostile input cannot crash, corrupt or silently mislead: one block per
class of problem (byte order, BatchNorm contexts, overlap, indices changed by
another thread, state dicts, false overlap errors, undefined behaviour in the
vectorized math, unaligned indices, error types, clip_grad_norm_'s API), each
varied over dtypes, functions and argument positions.  The random search over
the same ground is tests/test_fuzz_api.py."""
import copy
import gc
import math
import platform
import threading
import time

import numpy as np
import pytest

import fastopt
from fastopt import _softmax as _softmax_kernels
from conftest import DTYPES, Snapshot, tol
from test_batchnorm import close as bn_close
from test_batchnorm import ref_backward, ref_forward
from test_optim_bad_input import KERNELS
from test_softmax import ref_cross_entropy, ref_log_softmax

SWAPPED = {np.float32: ">f4", np.float64: ">f8"} if np.little_endian else {
    np.float32: "<f4", np.float64: "<f8"}
OTHER = ">" if np.little_endian else "<"


def swapped(a):
    """The same values in the other byte order."""
    a = np.asarray(a)
    return a.astype(a.dtype.newbyteorder(OTHER))


def same_bits(a, b):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape
    assert a.dtype.newbyteorder("=") == b.dtype.newbyteorder("=")
    na, nb = a.astype(a.dtype.newbyteorder("=")), b.astype(b.dtype.newbyteorder("="))
    assert na.tobytes() == nb.tobytes(), f"different bits:\n{na!r}\n{nb!r}"


def raises_unchanged(exc, match, call, *arrays):
    snap = Snapshot(*arrays)
    raw = [a.tobytes() for a in arrays if isinstance(a, np.ndarray)]
    with pytest.raises(exc, match=match):
        call()
    snap.assert_unchanged()
    assert raw == [a.tobytes() for a in arrays if isinstance(a, np.ndarray)]


# ============================================================ 1. byte order ===
# Arrays written in place must be native (TypeError naming the argument);
# inputs that are only read are converted, giving the native call's bits.

IN_PLACE = [(k, a) for k, kern in KERNELS.items() for a in kern.in_place]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel,arg", IN_PLACE, ids=lambda x: str(x))
def test_optimizer_kernels_reject_swapped_in_place_arrays(kernel, arg, dtype):
    k = KERNELS[kernel]
    arrays = k.valid(dtype)
    arrays[arg] = swapped(arrays[arg])
    raises_unchanged(TypeError, rf"^{arg}\b(?!_).*byte order", lambda: k.call(arrays),
                     *arrays.values())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel", list(KERNELS))
def test_optimizer_kernels_convert_a_swapped_grad(kernel, dtype):
    k = KERNELS[kernel]
    native = k.valid(dtype)
    other = {a: v.copy() for a, v in native.items()}
    other["grad"] = swapped(native["grad"])
    k.call(native)
    k.call(other)
    for a in native:
        same_bits(other[a], native[a])


@pytest.mark.parametrize("dtype", DTYPES)
def test_optimizer_objects_and_clipping_byte_order(dtype, rng):
    params = [rng.standard_normal(s).astype(dtype) for s in [(3, 4), (5,), ()]]
    # a swapped parameter is refused at construction
    with pytest.raises(TypeError, match=r"params\[1\].*byte order"):
        fastopt.Adam([params[0], swapped(params[1])])
    # swapped gradients are converted: the same step as native ones
    grads = [rng.standard_normal(p.shape).astype(dtype) for p in params]
    a = [p.copy() for p in params]
    b = [p.copy() for p in params]
    fastopt.Adam(a, lr=0.1).step(grads)
    fastopt.Adam(b, lr=0.1).step([swapped(g) for g in grads])
    for x, y in zip(a, b):
        same_bits(x, y)
    # a parameter whose dtype is swapped in place after construction
    p = params[1].copy()
    opt = fastopt.SGD([p], lr=0.1)
    p.dtype = p.dtype.newbyteorder(OTHER)
    raises_unchanged(ValueError, r"params\[0\] is no longer the array",
                     lambda: opt.step([grads[1]]), p)
    # clip_grad_norm_ writes every gradient: swapped ones are refused
    g0, g1 = grads[0].copy(), swapped(grads[1])
    raises_unchanged(TypeError, r"grads\[1\].*byte order",
                     lambda: fastopt.clip_grad_norm_([g0, g1], 0.1), g0, g1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fn", [fastopt.softmax, fastopt.log_softmax])
@pytest.mark.parametrize("shape,axis", [((5, 70), -1), ((4, 3000), 1), ((3, 6, 5), 1), ((7,), 0)])
def test_softmax_byte_order(fn, dtype, shape, axis, rng):
    x = rng.standard_normal(shape).astype(dtype)
    same_bits(fn(swapped(x), axis=axis), fn(x, axis=axis))
    out = swapped(np.zeros(shape, dtype))
    raises_unchanged(TypeError, "out.*byte order", lambda: fn(x, axis=axis, out=out), x, out)
    xs = swapped(x)
    raises_unchanged(TypeError, "out.*byte order", lambda: fn(xs, axis=axis, out=xs), xs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tdtype", [">i8", ">u8", ">i4", "<u2", ">i2"])
def test_cross_entropy_byte_order(dtype, tdtype, rng):
    n, c = 9, 7
    x = rng.standard_normal((n, c)).astype(dtype)
    y = rng.integers(0, c, n)
    w = rng.uniform(0.5, 2, c).astype(dtype)
    ref = fastopt.cross_entropy(x, y, weight=w, reduction="none", return_grad=True)
    got = fastopt.cross_entropy(swapped(x), y.astype(tdtype), weight=swapped(w),
                                reduction="none", return_grad=True)
    for a, b in zip(got, ref):
        same_bits(a, b)
    # probability targets
    t = rng.dirichlet(np.ones(c), n).astype(dtype)
    same_bits(fastopt.cross_entropy(x, swapped(t)), fastopt.cross_entropy(x, t))
    g = swapped(np.zeros((n, c), dtype))
    raises_unchanged(TypeError, "grad_out.*byte order",
                     lambda: fastopt.cross_entropy(x, y, return_grad=True, grad_out=g), x, g)


@pytest.mark.parametrize("dtype", [">u8", "<u8"])
def test_cross_entropy_uint64_target_above_int64_is_out_of_range(dtype):
    """2**64 - 100 is not -100 (the default ignore_index), whatever the byte order."""
    x = np.zeros((2, 3))
    for big in (2**64 - 100, 2**63, 2**64 - 1):
        y = np.array([1, big], dtype)
        with pytest.raises(ValueError, match=rf"target\[1\] = {big} is out of range"):
            fastopt.cross_entropy(x, y)
        with pytest.raises(ValueError, match="out of range"):
            fastopt.cross_entropy(x, y, ignore_index=int(np.array(big, np.uint64).astype(np.int64)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", [((6, 5), 1), ((3, 4, 7), 1), ((3, 5, 4), -1)])
def test_batch_norm_byte_order(dtype, shape, axis, rng):
    C = shape[axis]
    x = rng.standard_normal(shape).astype(dtype)
    gamma, beta = rng.uniform(0.5, 1.5, C).astype(dtype), rng.standard_normal(C).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    rm, rv = np.zeros(C, dtype), np.ones(C, dtype)
    y, ctx = fastopt.batch_norm_forward(x, gamma, beta, rm, rv, axis=axis)
    grads = fastopt.batch_norm_backward(dy, ctx)
    rm2, rv2 = np.zeros(C, dtype), np.ones(C, dtype)
    y2, ctx2 = fastopt.batch_norm_forward(swapped(x), swapped(gamma), swapped(beta), rm2, rv2,
                                          axis=axis)
    grads2 = fastopt.batch_norm_backward(swapped(dy), ctx2)
    for a, b in zip((y, rm, rv) + grads, (y2, rm2, rv2) + grads2):
        same_bits(b, a)
    for name, kw in [("running_mean", dict(running_mean=swapped(rm), running_var=rv)),
                     ("running_var", dict(running_mean=rm, running_var=swapped(rv))),
                     ("out", dict(running_mean=rm, running_var=rv, out=swapped(y)))]:
        arrays = [rm, rv, x] + list(kw.values())
        raises_unchanged(TypeError, f"{name}.*byte order", lambda: fastopt.batch_norm_forward(
            x, gamma, beta, axis=axis, **kw), *arrays)
    dx = swapped(np.zeros(shape, dtype))
    raises_unchanged(TypeError, "dx_out.*byte order",
                     lambda: fastopt.batch_norm_backward(dy, ctx, dx_out=dx), dx, dy)


@pytest.mark.parametrize("idtype", [">i8", "<i8"])
@pytest.mark.parametrize("xdtype", ["<f4", ">f8", ">i8", "<u2"])
def test_take_rows_and_minibatches_byte_order(idtype, xdtype, rng):
    X = (np.arange(50)[:, None] * [1, 2, 3]).astype(xdtype)      # row i starts with i
    idx = rng.permutation(50)[:20]
    out = fastopt.take_rows(X, idx.astype(idtype))
    assert out.dtype == X.dtype
    np.testing.assert_array_equal(out, X[idx])
    wrong = np.empty(out.shape, out.dtype.newbyteorder(OTHER if out.dtype.isnative else "="))
    raises_unchanged(TypeError, "out has dtype", lambda: fastopt.take_rows(X, idx, wrong), X, wrong)
    Y = rng.integers(0, 5, 50).astype(idtype)
    seen = []
    for xb, yb in fastopt.minibatches(X, Y, 16, rng=1):
        assert xb.dtype == X.dtype and yb.dtype == Y.dtype
        rows = [int(r) for r in xb[:, 0]]
        np.testing.assert_array_equal(yb, Y[rows])
        seen += rows
    assert sorted(seen) == list(range(50))


@pytest.mark.parametrize("dtype", DTYPES)
def test_ewa_flat_views_bias_corrected_byte_order(dtype, rng):
    x = rng.standard_normal(11).astype(dtype)
    a, b = np.full(11, 0.5, dtype), np.full(11, 0.5, dtype)
    fastopt.ewa_update(a, x, 0.9)
    fastopt.ewa_update(b, swapped(x), 0.9)
    same_bits(a, b)
    avg = swapped(np.ones(11, dtype))
    raises_unchanged(TypeError, "avg.*byte order", lambda: fastopt.ewa_update(avg, x, 0.9), avg)
    # EWA keeps float32 for float32 input of either byte order, with its values
    e1, e2 = fastopt.EWA(0.8), fastopt.EWA(0.8)
    for _ in range(3):
        v1, v2 = e1.update(x), e2.update(swapped(x))
    assert e2.avg.dtype == np.dtype(dtype) and e2.avg.dtype.isnative
    same_bits(v1, v2)
    same_bits(fastopt.bias_corrected(swapped(a), 0.9, 3), fastopt.bias_corrected(a, 0.9, 3))
    # flat_views: the buffer is written in place, so it is native; values convert
    arrays = [rng.standard_normal((2, 3)).astype(dtype), rng.standard_normal(5).astype(dtype)]
    flat, views = fastopt.flat_views([swapped(a) for a in arrays])
    assert flat.dtype == np.dtype(dtype) and flat.dtype.isnative
    for v, a in zip(views, arrays):
        same_bits(v, a)
    with pytest.raises(TypeError, match="native byte order"):
        fastopt.flat_views([(3,)], dtype=SWAPPED[dtype], copy=False)


# ================================================= 2/3. BatchNorm context ===

BN_CASES = [((6, 5), 1), ((4, 3, 20), 1), ((3, 5, 4, 6), -1), ((40, 3, 18, 1), 1)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape,axis", BN_CASES)
def test_backward_uses_what_the_forward_recorded(shape, axis, training, dtype, rng):
    """Reshaping x or gamma in place after the forward pass changes nothing
    the backward pass reads; dy must have the forward's shape."""
    C = shape[axis]
    x = rng.standard_normal(shape).astype(dtype)
    gamma, beta = rng.uniform(0.5, 1.5, C).astype(dtype), rng.standard_normal(C).astype(dtype)
    rm, rv = np.zeros(C, dtype), np.ones(C, dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    _, mean, invstd, _, _ = ref_forward(x, gamma, beta, rm, rv, training, 0.1, 1e-5, axis)
    dx_ref, dg_ref, db_ref = ref_backward(dy, x, gamma, mean, invstd, training, axis)
    _, ctx = fastopt.batch_norm_forward(x, gamma, beta, rm, rv, training=training, axis=axis)
    x.shape = (x.size,)
    x.shape = x.shape[::-1] if x.ndim > 1 else (1, x.size)
    gamma.shape = (1, C)
    dx, dg, db = fastopt.batch_norm_backward(dy, ctx)
    assert dx.shape == shape and dg.shape == db.shape == (C,)
    bn_close(dx, dx_ref, dtype, "dx")
    bn_close(dg, dg_ref, dtype, "dgamma")
    bn_close(db, db_ref, dtype, "dbeta")
    for bad in (x, dy.reshape(-1), dy.reshape((1,) + dy.shape)):
        with pytest.raises(ValueError, match="dy has shape"):
            fastopt.batch_norm_backward(bad.astype(dtype), ctx)
    with pytest.raises(ValueError, match="dx_out has shape"):
        fastopt.batch_norm_backward(dy, ctx, dx_out=np.empty(x.shape, dtype))
    with pytest.raises(TypeError, match="dy has dtype"):
        fastopt.batch_norm_backward(dy.astype(np.float64 if dtype == np.float32 else np.float32), ctx)


def test_context_arrays_cannot_be_resized_or_written(rng):
    x = rng.standard_normal((8, 4))
    gamma, beta = np.ones(4), np.zeros(4)
    _, ctx = fastopt.batch_norm_forward(x, gamma, beta)
    for name in ("x", "gamma", "mean", "invstd"):
        a = getattr(ctx, name)
        assert not a.flags.writeable
        assert getattr(ctx, name) is not a           # a new view each time
        with pytest.raises(ValueError):
            a.resize(1000)
        with pytest.raises(ValueError):
            getattr(ctx, name).resize(1000, refcheck=False)
    for name in ("mean", "invstd"):
        with pytest.raises(ValueError):
            getattr(ctx, name).flags.writeable = True
    # the caller's x cannot be resized under the context either
    with pytest.raises(ValueError):
        x.resize(1000)
    with pytest.raises(ValueError):
        gamma.resize(1000)
    dx, dg, db = fastopt.batch_norm_backward(np.ones_like(x), ctx)
    assert dx.shape == (8, 4) and dg.shape == (4,)


def test_context_changed_behind_its_back_is_refused(rng):
    """The private views are reachable through gc; the backward pass checks
    them against what the forward pass recorded."""
    x = rng.standard_normal((8, 4))
    gamma = rng.uniform(0.5, 1.5, 4)
    dy = rng.standard_normal((8, 4))
    _, ctx = fastopt.batch_norm_forward(x, gamma, np.zeros(4))
    expected = fastopt.batch_norm_backward(dy, ctx)
    private = [r for r in gc.get_referents(ctx) if isinstance(r, np.ndarray)]
    assert len(private) == 4
    for arr in private:
        shape = arr.shape
        arr.shape = (arr.size,) if arr.ndim > 1 else (1, arr.size)
        if np.shares_memory(arr, x) or np.shares_memory(arr, gamma):
            with pytest.raises(ValueError, match="ctx was modified"):
                fastopt.batch_norm_backward(dy, ctx)
        else:       # the statistics: read by pointer and the recorded C, shape unused
            for a, b in zip(fastopt.batch_norm_backward(dy, ctx), expected):
                same_bits(a, b)
        arr.shape = shape
    for a, b in zip(fastopt.batch_norm_backward(dy, ctx), expected):
        same_bits(a, b)


def test_context_cannot_be_made_outside_the_forward_pass(rng):
    with pytest.raises(TypeError, match="cannot be created directly"):
        fastopt.BatchNormContext()
    with pytest.raises(TypeError):
        class Sub(fastopt.BatchNormContext):      # noqa: F841 - final type
            pass
    empty = fastopt.BatchNormContext.__new__(fastopt.BatchNormContext)
    assert empty.x is None and "empty" in repr(empty)
    dy = np.ones((4, 3))
    raises_unchanged(ValueError, "empty BatchNormContext",
                     lambda: fastopt.batch_norm_backward(dy, empty), dy)
    _, ctx = fastopt.batch_norm_forward(rng.standard_normal((4, 3)), np.ones(3), np.zeros(3))
    for dup in (copy.copy, copy.deepcopy):
        with pytest.raises(TypeError):
            dup(ctx)
    with pytest.raises(AttributeError):
        ctx.axis = 0


# ====================================================== 4. overlap checks ===

def _ce_overlaps(dtype):
    """cross_entropy calls where grad_out shares memory with an input."""
    n, c = 6, 5
    x = np.random.default_rng(0).standard_normal((n, c)).astype(dtype)
    itype = np.int64 if dtype == np.float64 else np.int32
    buf = np.zeros(n * c, dtype)
    target = buf.view(itype)[n * c - n:]              # class indices in grad_out's last row
    target[...] = 1
    yield "target", buf, dict(logits=x, target=target, grad_out=buf.reshape(n, c))
    buf = np.zeros(n * c, dtype)
    yield "weight", buf, dict(logits=x, target=np.zeros(n, np.int64), weight=buf[c:2 * c][::-1],
                              grad_out=buf.reshape(n, c))
    buf = np.zeros((n, c), dtype)
    yield "target", buf, dict(logits=x, target=buf[:, ::-1], grad_out=buf)     # probabilities
    buf = np.ones((n + 1, c), dtype)
    yield "logits", buf, dict(logits=buf[1:], target=np.zeros(n, np.int64), grad_out=buf[:-1])
    buf = np.ones((2 * n, c), dtype)
    yield "logits", buf, dict(logits=buf[::2], target=np.zeros(n, np.int64), grad_out=buf[n:])


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_grad_out_overlapping_any_input(dtype):
    """A target sharing memory with grad_out used to be overwritten by the
    gradient and then used to address the logits."""
    for name, buf, kw in _ce_overlaps(dtype):
        logits, target = kw.pop("logits"), kw.pop("target")
        raises_unchanged(ValueError, f"{name} and grad_out overlap", lambda: fastopt.cross_entropy(
            logits, target, return_grad=True, **kw), buf, logits, target)


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_written_array_against_every_read_one(dtype, rng):
    C = 4
    buf = rng.standard_normal(64).astype(dtype)
    x = buf[:32].reshape(8, C)
    # BatchNorm: out over beta / gamma, dx_out over a strided dy, running stats over x
    cases = [
        ("out and beta", lambda: fastopt.batch_norm_forward(
            x, np.ones(C, dtype), buf[32:36], out=buf[32:64].reshape(8, C))),
        ("out and gamma", lambda: fastopt.batch_norm_forward(
            x, buf[60:64], np.zeros(C, dtype), out=buf[32:64].reshape(8, C))),
        ("running_var and x", lambda: fastopt.batch_norm_forward(
            x, np.ones(C, dtype), np.zeros(C, dtype), np.zeros(C, dtype), buf[4:8])),
    ]
    _, ctx = fastopt.batch_norm_forward(x.copy(), np.ones(C, dtype), np.zeros(C, dtype))
    big = rng.standard_normal((8, 2 * C)).astype(dtype)
    cases.append(("dx_out and dy", lambda: fastopt.batch_norm_backward(
        big[:, ::2], ctx, dx_out=big.reshape(-1)[:32].reshape(8, C))))
    # take_rows: out over idx
    X = rng.standard_normal((10, 2))
    ibuf = np.zeros(8, np.int64)
    cases.append(("idx and out", lambda: fastopt.take_rows(X, ibuf[:4], ibuf.view(np.float64).reshape(4, 2))))
    # ewa_update and the optimizer kernels: a strided input over the written array
    cases.append(("avg and x", lambda: fastopt.ewa_update(buf[:16], buf[::4], 0.5)))
    cases.append(("param and grad", lambda: fastopt.sgd_step(buf[:16], buf[::4], lr=0.1)))
    cases.append(("grad and exp_avg", lambda: fastopt.adam_step(
        np.zeros(16, dtype), buf[::4], buf[:16], np.zeros(16, dtype), step=1)))
    for msg, call in cases:
        raises_unchanged(ValueError, f"{msg} overlap", call, buf, X, ibuf, big)
    # FusedStep: a strided gradient (which would be copied) over a state array
    p = [np.zeros(16, dtype)]
    opt = fastopt.Adam(p)
    st = opt.state[0]["exp_avg"]
    base = st.base if st.base is not None else st
    g = np.lib.stride_tricks.as_strided(st, (16,), (st.itemsize,))[::-1]
    raises_unchanged(ValueError, r"grads\[0\] overlaps state\[0\]\['exp_avg'\]",
                     lambda: opt.step([g]), p[0], base)


# ======================================= 5. indices changed by another thread ===

def _hammer(arr, values, stop):
    """Until stop is set: one entry after another, write a bad value into it
    and put the good one back (so a check may pass and a second read fail)."""
    good = arr.copy()
    k, n = 0, len(arr)
    while not stop.is_set():
        j = k % n
        arr[j] = values[k % len(values)]
        arr[j] = good[j]
        k += 7


@pytest.mark.parametrize("kind", ["take_rows", "take_rows swapped idx", "cross_entropy"])
def test_indices_rewritten_by_another_thread(kind):
    """Another Python thread rewrites the indices (out of range, then back)
    while the kernel runs with the GIL released.  Each call either rejects
    an index or uses in-range ones throughout: indices are checked and used
    from a private copy.  (Checking, then reading the caller's array again,
    read far out of bounds within a second.)"""
    rng = np.random.default_rng(0)
    n_rows, cols, n = 20_000, 16, 20_000
    X = np.repeat(np.arange(n_rows, dtype=np.float32)[:, None], cols, axis=1)
    if kind == "cross_entropy":
        logits = rng.standard_normal((n, 40)).astype(np.float32)
        idx = rng.integers(0, 40, n)
        evil = [1 << 40, -(1 << 40), 5, 2**62]
    else:
        idx = rng.integers(0, n_rows, n)
        evil = [1 << 40, -(1 << 40), 7, 2**62 + 3]
    if kind == "take_rows swapped idx":
        idx = idx.astype(">i8")               # the converted path too
    out = np.empty((n, cols), np.float32)
    stop = threading.Event()
    t = threading.Thread(target=_hammer, args=(idx, evil, stop), daemon=True)
    t.start()
    ok = rejected = 0
    deadline = time.monotonic() + 1.5
    try:
        while time.monotonic() < deadline:
            try:
                if kind == "cross_entropy":
                    loss, grad = fastopt.cross_entropy(logits, idx, return_grad=True)
                    assert np.isfinite(loss) and np.isfinite(grad).all()
                else:
                    fastopt.take_rows(X, idx, out)
                    rows = out[:, 0]
                    assert ((rows >= 0) & (rows < n_rows)).all()
                    assert (out == rows[:, None]).all()
                ok += 1
            except (IndexError, ValueError):
                rejected += 1
    finally:
        stop.set()
        t.join()
    assert ok + rejected > 0


# ======================================================= 6. state dicts ===

def _state(opt):
    return ([a.copy() for st in opt.state for a in st.values()], opt.steps.copy(),
            [dict(g) for g in opt.param_groups])


def _assert_state(opt, saved):
    arrays, steps, groups = saved
    now = [a for st in opt.state for a in st.values()]
    for a, b in zip(now, arrays):
        assert a.tobytes() == b.tobytes()
    np.testing.assert_array_equal(opt.steps, steps)
    assert len(opt.param_groups) == len(groups)
    for g, h in zip(opt.param_groups, groups):
        assert g.keys() == h.keys()
        for k in g:
            assert g[k] is h[k] or g[k] == h[k]


@pytest.mark.parametrize("cls", [fastopt.Adam, fastopt.AdamW, fastopt.SGD, fastopt.RMSprop])
def test_load_state_dict_validates_everything_before_applying(cls, rng):
    kw = dict(momentum=0.9) if cls in (fastopt.SGD, fastopt.RMSprop) else {}
    params = [rng.standard_normal((3, 4)).astype(np.float32), rng.standard_normal(5)]
    opt = cls(params, lr=0.01, **kw)
    opt.step([rng.standard_normal(p.shape).astype(p.dtype) for p in params])
    good = opt.state_dict()
    saved = _state(opt)
    name = next(iter(opt.state[1]))
    bad_steps = [2**63 - 1, 2**63, 2**64 - 1, np.uint64(2**64 - 1), np.array(2**63, np.uint64),
                 -1, 1.5, True, np.array([3]), "3", None]
    cases = [{"state.1.step": s} for s in bad_steps]
    cases += [{"param_groups.0.lr": v} for v in (-1.0, 10**400, "0.1", np.array([0.1, 0.2]), math.nan)]
    cases += [{f"state.1.{name}": v} for v in (np.zeros(4), np.zeros(5, np.int64), [0.0] * 5)]
    if cls in (fastopt.Adam, fastopt.AdamW):
        cases += [{"param_groups.0.betas": v} for v in ((0.9,), (0.9, 1.0), np.array([0.9, 10**3]))]
    for change in cases:
        sd = dict(good)
        for k, v in change.items():
            sd[k] = v
        # fresh state arrays to copy in, so a partial load would show
        for k, v in sd.items():
            if k.startswith("state.") and isinstance(v, np.ndarray) and v.ndim:
                sd[k] = v + 1
        with pytest.raises((ValueError, TypeError)):
            opt.load_state_dict(sd)
        _assert_state(opt, saved)
    for bad in (42, None, [("optimizer", cls.__name__)], "state", np.zeros(3)):
        with pytest.raises(TypeError, match="state_dict must be a mapping"):
            opt.load_state_dict(bad)
        _assert_state(opt, saved)
    # the largest count a step can still increment, then one step, then no more
    sd = dict(good, **{"state.1.step": 2**63 - 2})
    opt.load_state_dict(sd)
    grads = [None, rng.standard_normal(5)]
    opt.step(grads)
    assert opt.steps[1] == 2**63 - 1
    saved = _state(opt)
    with pytest.raises(ValueError, match=r"params\[1\] has taken 2\*\*63 - 1 steps"):
        opt.step(grads)
    _assert_state(opt, saved)


def test_step_refuses_counts_it_cannot_advance(rng):
    # The counts live in the optimizer's own array; a step reads each once
    # and refuses one that is negative or cannot count one more step.
    params = [np.zeros(3), np.zeros(2)]
    opt = fastopt.Adam(params)
    grads = [rng.standard_normal(3), rng.standard_normal(2)]
    for bad, msg in ((-1, r"step_counts\[0\] must be >= 0"),
                     (2**63 - 1, r"params\[0\] has taken 2\*\*63 - 1 steps")):
        opt._steps[0] = bad
        snap = Snapshot(*params, *[a for st in opt.state for a in st.values()])
        with pytest.raises(ValueError, match=msg):
            opt.step(grads)
        snap.assert_unchanged()
        np.testing.assert_array_equal(opt.steps, [bad, 0])
        opt._steps[0] = 0


# ======================================== 8. no false overlap errors ===

@pytest.mark.parametrize("dtype", DTYPES)
def test_true_extents_of_strided_inputs(dtype, rng):
    """Inputs with negative or zero strides next to the written arrays in one
    buffer: nothing is shared, so nothing is refused, and the results are
    those of contiguous copies."""
    N, C = 6, 4
    buf = np.zeros(4 * N * C, dtype)
    buf[:N * C] = rng.standard_normal(N * C)
    src = buf[:N * C].reshape(N, C)
    layouts = {
        "reversed": src[::-1, ::-1],                          # data pointer at the end
        "broadcast": np.broadcast_to(buf[N * C - C:N * C], (N, C)),   # zero strides
        "transposed": buf[:N * C].reshape(C, N).T,
    }
    out = buf[N * C:2 * N * C].reshape(N, C)                  # right after the input
    rstats = buf[2 * N * C + C:2 * N * C + 3 * C]
    for name, x in layouts.items():
        xc = np.ascontiguousarray(x)
        gamma = np.broadcast_to(np.array(1.5, dtype), (C,))
        beta = buf[2 * N * C:2 * N * C + C][::-1]             # reversed, right before rstats
        rm, rv = rstats[:C], rstats[C:]
        rm[...] = 0
        rv[...] = 1
        y, _ = fastopt.batch_norm_forward(x, gamma, beta, rm, rv, out=out)
        y_ref, *_ = ref_forward(xc, np.ascontiguousarray(gamma), np.ascontiguousarray(beta),
                                np.zeros(C), np.ones(C), True, 0.1, 1e-5, 1)
        bn_close(y, y_ref, dtype, name)
        fastopt.log_softmax(x, out=out)
        np.testing.assert_allclose(out, ref_log_softmax(xc), **tol(dtype))
        loss, g = fastopt.cross_entropy(x, np.zeros(N, np.int64), return_grad=True, grad_out=out)
        ref_loss, ref_g = ref_cross_entropy(xc, np.zeros(N, np.int64))
        np.testing.assert_allclose(loss, ref_loss, **tol(dtype))
        np.testing.assert_allclose(g, ref_g, **tol(dtype))
        avg = out.reshape(-1)[:C]
        avg[...] = 1
        fastopt.ewa_update(avg, x[0], 0.5)
        np.testing.assert_allclose(avg, 0.5 + 0.5 * xc[0].astype(np.float64), **tol(dtype))


# ============================================ 9. undefined behaviour in _vmath ===

def _nans(bits, dtype):
    return np.array(bits, dtype=np.uint32 if dtype == np.float32 else np.uint64).view(dtype)


F32_NANS = [0x7fc00000, 0xffc00000, 0x7f800001, 0xff800001, 0x7fffffff, 0xffffffff,
            0x7fa5a5a5, 0xff812345]
F64_NANS = [0x7ff8000000000000, 0xfff8000000000000, 0x7ff0000000000001, 0xfff0000000000001,
            0x7fffffffffffffff, 0xffffffffffffffff, 0x7ff5a5a5a5a5a5a5, 0xfff123456789abcd]


@pytest.mark.parametrize("dtype", DTYPES)
def test_exp_and_log_of_every_kind_of_nan(dtype):
    """NaN inputs of either sign and any payload (they used to reach signed
    overflow and left shifts of negative values; the sanitizer stage runs
    this under UBSan).  The result is NaN; on x86 it is the input NaN,
    quieted, as IEEE arithmetic propagates it."""
    bits = F32_NANS if dtype == np.float32 else F64_NANS
    x = np.tile(_nans(bits, dtype), 5)        # long enough for the vector loops
    quiet = np.uint32(0x00400000) if dtype == np.float32 else np.uint64(0x0008000000000000)
    udt = np.uint32 if dtype == np.float32 else np.uint64
    fns = [lambda a: _softmax_kernels._exp(a), lambda a: _softmax_kernels._exp(a, True)]
    if dtype == np.float64:
        fns.append(_softmax_kernels._log)
    for f in fns:
        y = f(x)
        assert np.isnan(y).all()
        if platform.machine().lower() in ("x86_64", "amd64"):
            np.testing.assert_array_equal(y.view(udt) | quiet, x.view(udt) | quiet)
    # through the public kernels: rows whose sum is NaN
    rows = np.zeros((4, 40), dtype)
    rows[:, 3] = _nans(bits[:4], dtype)
    for fn in (fastopt.softmax, fastopt.log_softmax):
        assert np.isnan(fn(rows)).all()
        assert np.isnan(fn(rows.T.copy(), axis=0)).all()
    loss = fastopt.cross_entropy(rows, np.zeros(4, np.int64), reduction="none")
    assert np.isnan(loss).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_exp_log_special_and_extreme_inputs_stay_exact(dtype):
    """Finite and infinite inputs across the whole range (the bit tricks of
    exp and log now in unsigned arithmetic) against NumPy."""
    info = np.finfo(dtype)
    x = np.concatenate([np.array([0.0, -0.0, np.inf, -np.inf, info.max, -info.max,
                                  info.tiny, -info.tiny, info.smallest_subnormal]),
                        np.linspace(-800, 800, 4001)]).astype(dtype)
    with np.errstate(over="ignore", under="ignore"):
        ref = np.exp(x.astype(np.float64))
        ref_t = ref.astype(dtype)
    got = _softmax_kernels._exp(x)
    finite = np.isfinite(ref_t) & (np.abs(ref) > info.tiny)
    np.testing.assert_allclose(got[finite], ref[finite], rtol=4 * info.eps)
    assert (got[ref_t == np.inf] == np.inf).all()
    assert (got[ref == 0] == 0).all()
    pos = np.abs(x[np.isfinite(x)]).astype(np.float64)
    pos = pos[pos > 0]
    np.testing.assert_allclose(_softmax_kernels._log(pos), np.log(pos), rtol=1e-15)
    assert _softmax_kernels._log(np.array([0.0]))[0] == -np.inf
    assert np.isnan(_softmax_kernels._log(np.array([-1.0, -np.inf]))).all()


# ======================================== 10. unaligned integer indices ===

def _unaligned(values, dtype):
    a = np.asarray(values, dtype)
    raw = np.zeros(a.nbytes + 1, np.uint8)
    u = raw[1:].view(a.dtype)
    u[...] = a
    assert not u.flags.aligned
    return u


@pytest.mark.parametrize("dtype", ["<i8", ">i8", "<u8", "<i4"])
def test_unaligned_targets_and_indices_are_copied(dtype, rng):
    x = rng.standard_normal((9, 6))
    y = rng.integers(0, 6, 9)
    ref = fastopt.cross_entropy(x, y, reduction="none", return_grad=True)
    got = fastopt.cross_entropy(x, _unaligned(y, dtype), reduction="none", return_grad=True)
    for a, b in zip(got, ref):
        same_bits(a, b)
    if dtype.endswith("i8"):
        X = rng.standard_normal((12, 3))
        idx = rng.integers(0, 12, 9)
        np.testing.assert_array_equal(fastopt.take_rows(X, _unaligned(idx, dtype)), X[idx])


# ======================================== 11. errors: type and name ===

def _hyper_calls(big):
    """(argument name, call) with `big` in one hyperparameter position."""
    f = lambda: np.ones(4, np.float32)
    x2 = np.ones((4, 3))
    yield "lr", lambda: fastopt.adam_step(f(), f(), f(), f(), step=1, lr=big)
    yield "eps", lambda: fastopt.adamw_step(f(), f(), f(), f(), step=1, eps=big)
    yield r"betas\[1\]", lambda: fastopt.adam_step(f(), f(), f(), f(), step=1, betas=(0.9, big))
    yield "weight_decay", lambda: fastopt.rmsprop_step(f(), f(), f(), weight_decay=big)
    yield "alpha", lambda: fastopt.rmsprop_step(f(), f(), f(), alpha=big)
    yield "momentum", lambda: fastopt.sgd_step(f(), f(), f(), lr=0.1, momentum=big)
    yield "dampening", lambda: fastopt.sgd_step(f(), f(), lr=0.1, dampening=big)
    yield "momentum", lambda: fastopt.batch_norm_forward(x2, np.ones(3), np.zeros(3), momentum=big)
    yield "eps", lambda: fastopt.batch_norm_forward(x2, np.ones(3), np.zeros(3), eps=big)
    yield "label_smoothing", lambda: fastopt.cross_entropy(x2, np.zeros(4, np.int64),
                                                           label_smoothing=big)
    yield "beta", lambda: fastopt.ewa_update(f(), f(), big)
    yield "beta", lambda: fastopt.bias_corrected(f(), big, 2)
    yield "beta", lambda: fastopt.EWA(big)
    yield "low", lambda: fastopt.log_uniform(big, 1.0)
    yield "high", lambda: fastopt.sample_beta(0.5, big)
    yield "lr", lambda: fastopt.Adam([f()], lr=big)
    yield r"betas\[0\]", lambda: fastopt.AdamW([f()], betas=(big, 0.9))
    yield "alpha", lambda: fastopt.RMSprop([f()], alpha=big)
    yield "dampening", lambda: fastopt.SGD([f()], dampening=big)


@pytest.mark.parametrize("big", [10**400, -(10**400), "1e-3", np.array([0.5]), math.nan],
                         ids=["1e400", "-1e400", "str", "array", "nan"])
def test_bad_hyperparameters_name_the_argument(big):
    for name, call in _hyper_calls(big):
        with pytest.raises((TypeError, ValueError), match=rf"^{name} "):
            call()


def test_bad_hyperparameters_in_param_groups(rng):
    p = [rng.standard_normal(5)]
    for key, val in [("lr", 10**400), ("eps", np.array([1e-8])), ("betas", (0.9, 10**400)),
                     ("weight_decay", "0"), ("maximize", np.array([True, False]))]:
        opt = fastopt.Adam([q.copy() for q in p])
        opt.param_groups[0][key] = val
        before = [a.copy() for a in opt._fused.params]
        with pytest.raises((TypeError, ValueError), match=rf"param_groups\[0\]\['{key}'\]"):
            opt.step([np.ones(5)])
        for a, b in zip(opt._fused.params, before):
            assert a.tobytes() == b.tobytes()


def test_integer_arguments_given_arrays_or_floats():
    f = lambda: np.ones(4)
    x2 = np.ones((4, 3))
    cases = [
        ("step", lambda s: fastopt.adam_step(f(), f(), f(), f(), step=s)),
        ("axis", lambda s: fastopt.softmax(x2, axis=s)),
        ("axis", lambda s: fastopt.log_softmax(x2, axis=s)),
        ("axis", lambda s: fastopt.batch_norm_forward(x2, np.ones(3), np.zeros(3), axis=s)),
        ("ignore_index", lambda s: fastopt.cross_entropy(x2, np.zeros(4, np.int64),
                                                         ignore_index=s)),
        ("t", lambda s: fastopt.bias_corrected(f(), 0.9, s)),
        ("batch_size", lambda s: fastopt.minibatches(x2, np.zeros(4), s)),
        ("n", lambda s: fastopt.set_num_threads(s)),
    ]
    for name, call in cases:
        for bad in (np.array([3]), np.array([[1]]), 2.0, np.float64(1.0), "1", True, None, [1]):
            if name == "n" and bad is None:
                continue                                  # None removes the cap
            with pytest.raises(TypeError, match=rf"^{name}\b"):
                call(bad)
    fastopt.set_num_threads(0)
    # 0-d integer arrays and NumPy integers are integers
    fastopt.adam_step(f(), f(), f(), f(), step=np.array(3))
    fastopt.softmax(x2, axis=np.int8(-1))


def test_not_iterables_and_not_mappings():
    with pytest.raises(TypeError, match="^grads must be"):
        fastopt.clip_grad_norm_(None, 1)
    with pytest.raises(TypeError, match="^grads must be"):
        fastopt.clip_grad_norm_(3.5, 1)
    with pytest.raises(TypeError, match="^params must be"):
        fastopt.SGD(42)
    with pytest.raises(TypeError, match=r"param_groups\[0\]\['params'\]"):
        fastopt.SGD([{"params": 42}])
    with pytest.raises(TypeError, match="^arrays must be"):
        fastopt.flat_views(7)
    opt = fastopt.SGD([np.zeros(3)], lr=0.1)
    opt.param_groups = 42
    with pytest.raises(TypeError, match="^param_groups must be"):
        opt.step([np.ones(3)])


def test_missing_param_group_key_is_a_value_error(rng):
    for cls, key in [(fastopt.Adam, "betas"), (fastopt.Adam, "amsgrad"), (fastopt.SGD, "nesterov"),
                     (fastopt.RMSprop, "alpha"), (fastopt.SGD, "lr")]:
        p = rng.standard_normal(4)
        opt = cls([p], lr=0.1)
        del opt.param_groups[0][key]
        raises_unchanged(ValueError, rf"param_groups\[0\] has no '{key}'",
                         lambda: opt.step([np.ones(4)]), p)


def test_set_num_threads_keeps_the_cap_on_error():
    fastopt.set_num_threads(1)
    try:
        for bad, exc in [(2**40, ValueError), (2**31, ValueError), (-1, ValueError),
                         (np.array([2]), TypeError), (2.0, TypeError), ("2", TypeError)]:
            with pytest.raises(exc, match="^n must be"):
                fastopt.set_num_threads(bad)
            assert fastopt.get_num_threads() == 1
        fastopt.set_num_threads(2**31 - 1)     # more than the machine's: no cap
        fastopt.set_num_threads(np.int64(1))
        assert fastopt.get_num_threads() == 1
    finally:
        fastopt.set_num_threads(0)


# ============================================ 12. clip_grad_norm_'s API ===

@pytest.mark.parametrize("dtype", DTYPES)
def test_clip_grad_norm_strings_and_infinite_max_norm(dtype, rng):
    a = rng.standard_normal((3, 5)).astype(dtype)
    b = rng.standard_normal(7).astype(dtype)
    for norm_type in ("2", "inf", "fro", b"2", np.array([2.0])):
        raises_unchanged(TypeError, "^norm_type must be a number",
                         lambda: fastopt.clip_grad_norm_([a, b], 1.0, norm_type), a, b)
    for max_norm in ("1", np.array([1.0])):
        raises_unchanged(TypeError, "^max_norm must be",
                         lambda: fastopt.clip_grad_norm_([a, b], max_norm), a, b)
    for norm_type in (2.0, 1, 3.5, math.inf):
        snap = Snapshot(a, b)
        expected = fastopt.clip_grad_norm_([a.copy(), b.copy()], 1e300, norm_type)
        total = fastopt.clip_grad_norm_([a, b], math.inf, norm_type)      # PyTorch's idiom
        assert total == expected and total > 0
        snap.assert_unchanged()
    # a non-finite norm with max_norm=inf: inf/inf scales by NaN, as in PyTorch
    c = np.array([1.0, np.inf], dtype)
    assert fastopt.clip_grad_norm_([c], math.inf) == np.inf
    assert np.isnan(c).all()
