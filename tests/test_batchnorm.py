"""batch_norm_forward / batch_norm_backward against a float64 NumPy reference
written from the formulas (torch.nn.functional.batch_norm's definitions)."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import fastopt
from conftest import DTYPES, Snapshot, num_threads

# (shape, axis): both layouts, 2-D to 4-D; inner sizes that take the row
# layout (1 and small), the segment layout (one and several inner chunks,
# several outer groups), channel chunks, and sizes large enough for two
# threads in every parallel path.
CASES = [
    ((7, 5), 1),
    ((300, 33), -1),
    ((4, 6, 17), 1),
    ((4, 6, 5), 1),
    ((5, 9, 3), -1),
    ((3, 4, 9, 11), 1),
    ((3, 5, 6, 7), -1),
    ((2, 3, 9000), 1),           # a channel's segment spans several boxes
    ((64, 8, 16, 16), 1),        # several outer groups per channel
    ((3, 2050), 1),              # more channels than one row-layout box holds
    ((16, 16, 32, 32), 1),       # two threads, many channels
    ((8, 3, 64, 64), 1),         # two threads, few channels: boxes in parallel
    ((4000, 40), 1),             # two threads, (N, C) with many rows
    ((8, 16, 16, 40), -1),       # two threads, NHWC
    ((20001, 3), 1),             # two threads, few channels: rows taken in groups
    ((37, 7, 1, 1), 1),          # groups of rows and an incomplete last group
    ((5, 1030), 1),              # a last, narrower channel chunk
]
IDS = [f"{s}-ax{a}" for s, a in CASES]


def layout(x, axis):
    """(C, m) view of x: channel first, the other axes flattened."""
    return np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)


def unlayout(z, shape, axis):
    ax = axis % len(shape)
    moved = (shape[ax],) + tuple(s for i, s in enumerate(shape) if i != ax)
    return np.moveaxis(z.reshape(moved), 0, ax)


def ref_forward(x, gamma, beta, running_mean, running_var, training, momentum, eps, axis):
    """float64 reference: returns y, mean, invstd, new running_mean, new running_var."""
    z = layout(x.astype(np.float64), axis)
    m = z.shape[1]
    rm = None if running_mean is None else running_mean.astype(np.float64)
    rv = None if running_var is None else running_var.astype(np.float64)
    if training:
        mean = z.sum(axis=1) / m
        var = ((z - mean[:, None]) ** 2).sum(axis=1) / m
        if rm is not None:
            rm = (1 - momentum) * rm + momentum * mean
            rv = (1 - momentum) * rv + momentum * var * m / (m - 1)
    else:
        mean, var = rm, rv
    invstd = 1.0 / np.sqrt(var + eps)
    xhat = (z - mean[:, None]) * invstd[:, None]
    y = gamma.astype(np.float64)[:, None] * xhat + beta.astype(np.float64)[:, None]
    return unlayout(y, x.shape, axis), mean, invstd, rm, rv


def ref_backward(dy, x, gamma, mean, invstd, training, axis):
    """float64 reference: returns dx, dgamma, dbeta."""
    z = layout(x.astype(np.float64), axis)
    g = layout(dy.astype(np.float64), axis)
    m = z.shape[1]
    xhat = (z - mean[:, None]) * invstd[:, None]
    dbeta = g.sum(axis=1)
    dgamma = (g * xhat).sum(axis=1)
    k = (gamma.astype(np.float64) * invstd)[:, None]
    if training:
        dx = k / m * (m * g - dbeta[:, None] - xhat * dgamma[:, None])
    else:
        dx = k * g
    return unlayout(dx, x.shape, axis), dgamma, dbeta


def close(actual, expected, dtype, what):
    """Compare with a tolerance relative to the size of the expected values."""
    expected = np.asarray(expected, dtype=np.float64)
    scale = max(1.0, float(np.max(np.abs(expected)))) if expected.size else 1.0
    rtol, atol = (3e-6, 3e-6 * scale) if np.dtype(dtype) == np.float32 else (1e-12, 1e-12 * scale)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, err_msg=what)


def make(rng, shape, axis, dtype, loc=0.5, spread=2.0):
    C = shape[axis]
    x = (rng.standard_normal(shape) * spread + loc).astype(dtype)
    gamma = rng.uniform(0.5, 1.5, C).astype(dtype)
    beta = rng.standard_normal(C).astype(dtype)
    rm = rng.standard_normal(C).astype(dtype)
    rv = rng.uniform(0.5, 2.0, C).astype(dtype)
    return x, gamma, beta, rm, rv


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", CASES, ids=IDS)
@pytest.mark.parametrize("training", [True, False])
def test_matches_reference(rng, shape, axis, dtype, training):
    x, gamma, beta, rm, rv = make(rng, shape, axis, dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    y_ref, mean, invstd, rm_ref, rv_ref = ref_forward(x, gamma, beta, rm, rv, training, 0.1, 1e-5, axis)
    y, ctx = fastopt.batch_norm_forward(x, gamma, beta, rm, rv, training=training, axis=axis)
    assert y.dtype == dtype and y.shape == x.shape
    close(y, y_ref, dtype, "y")
    close(ctx.mean, mean, np.float64 if not training else dtype, "mean")
    close(ctx.invstd, invstd, dtype, "invstd")
    assert ctx.mean.dtype == ctx.invstd.dtype == np.float64
    close(rm, rm_ref, dtype, "running_mean")
    close(rv, rv_ref, dtype, "running_var")
    # x and gamma: read-only views of the caller's (contiguous) arrays
    for view, arr in ((ctx.x, x), (ctx.gamma, gamma)):
        assert view.shape == arr.shape and np.shares_memory(view, arr) and not view.flags.writeable
    assert ctx.training == training
    dx_ref, dgamma_ref, dbeta_ref = ref_backward(dy, x, gamma, mean, invstd, training, axis)
    dx, dgamma, dbeta = fastopt.batch_norm_backward(dy, ctx)
    assert dx.dtype == dgamma.dtype == dbeta.dtype == dtype
    close(dx, dx_ref, dtype, "dx")
    close(dgamma, dgamma_ref, dtype, "dgamma")
    close(dbeta, dbeta_ref, dtype, "dbeta")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", [((6, 4, 5, 5), 1), ((50, 7), 1), ((4, 3, 3, 6), -1)])
def test_running_stats_over_steps(rng, shape, axis, dtype):
    _, gamma, beta, rm, rv = make(rng, shape, axis, dtype)
    rm_ref, rv_ref = rm.astype(np.float64), rv.astype(np.float64)
    for step, momentum in enumerate([0.1, 0.3, 0.0, 1.0, 0.05]):
        x = (rng.standard_normal(shape) * (step + 1) + step).astype(dtype)
        _, _, _, rm_ref, rv_ref = ref_forward(x, gamma, beta, rm_ref, rv_ref, True, momentum, 1e-5, axis)
        fastopt.batch_norm_forward(x, gamma, beta, rm, rv, momentum=momentum, axis=axis)
        close(rm, rm_ref, dtype, f"running_mean after step {step}")
        close(rv, rv_ref, dtype, f"running_var after step {step}")
    # Inference uses the running statistics and updates nothing.
    x = rng.standard_normal(shape).astype(dtype)
    snap = Snapshot(rm, rv)
    y, ctx = fastopt.batch_norm_forward(x, gamma, beta, rm, rv, training=False, axis=axis)
    snap.assert_unchanged()
    close(y, ref_forward(x, gamma, beta, rm, rv, False, 0.1, 1e-5, axis)[0], dtype, "y")


def test_training_without_running_stats(rng):
    x, gamma, beta, _, _ = make(rng, (5, 3, 4), 1, np.float64)
    y, ctx = fastopt.batch_norm_forward(x, gamma, beta)
    close(y, ref_forward(x, gamma, beta, None, None, True, 0.1, 1e-5, 1)[0], np.float64, "y")


def test_out_and_dx_out_are_filled(rng):
    x, gamma, beta, rm, rv = make(rng, (4, 3, 5, 5), 1, np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    out = np.full_like(x, np.nan)
    dx_out = np.full_like(x, np.nan)
    y, ctx = fastopt.batch_norm_forward(x, gamma, beta, out=out)
    assert y is out
    dx, _, _ = fastopt.batch_norm_backward(dy, ctx, dx_out=dx_out)
    assert dx is dx_out
    y2, ctx2 = fastopt.batch_norm_forward(x, gamma, beta)
    np.testing.assert_array_equal(out, y2)
    np.testing.assert_array_equal(dx_out, fastopt.batch_norm_backward(dy, ctx2)[0])


def test_non_contiguous_inputs(rng):
    big, gamma, beta, rm, rv = make(rng, (6, 3, 8, 10), 1, np.float64)
    x = big[::2, :, :, ::2]
    dy = rng.standard_normal((3, 3, 8, 10))[..., ::2]
    y, ctx = fastopt.batch_norm_forward(x, gamma[::-1], beta, rm, rv)
    y_ref, mean, invstd, rm_ref, rv_ref = ref_forward(x, gamma[::-1], beta, rm, rv, True, 0.1, 1e-5, 1)
    close(y, y_ref, np.float64, "y")
    dx_ref = ref_backward(dy, x, gamma[::-1], mean, invstd, True, 1)
    for a, b, what in zip(fastopt.batch_norm_backward(dy, ctx), dx_ref, ("dx", "dgamma", "dbeta")):
        close(a, b, np.float64, what)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape,axis", [((3, 2, 3, 4), 1), ((5, 3), 1), ((2, 3, 2, 3), -1),
                                        ((2, 2, 20), 1)])
def test_gradient_finite_differences(rng, shape, axis, training):
    """dx, dgamma, dbeta match central differences of L = sum(w * y) (float64)."""
    x, gamma, beta, rm, rv = make(rng, shape, axis, np.float64)
    w = rng.standard_normal(shape)

    def loss(x_, gamma_, beta_):
        y, _ = fastopt.batch_norm_forward(x_, gamma_, beta_, rm.copy(), rv.copy(),
                                          training=training, axis=axis)
        return float(np.sum(w * y))

    _, ctx = fastopt.batch_norm_forward(x, gamma, beta, rm.copy(), rv.copy(),
                                        training=training, axis=axis)
    dx, dgamma, dbeta = fastopt.batch_norm_backward(w, ctx)
    h = 1e-6
    for arr, grad in ((x, dx), (gamma, dgamma), (beta, dbeta)):
        num = np.empty_like(arr)
        for i in np.ndindex(arr.shape):
            old = arr[i]
            arr[i] = old + h
            up = loss(x, gamma, beta)
            arr[i] = old - h
            down = loss(x, gamma, beta)
            arr[i] = old
            num[i] = (up - down) / (2 * h)
        np.testing.assert_allclose(grad, num, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", [((4, 3, 20), 1), ((30, 3), 1), ((4, 5, 3), -1),
                                        ((16, 16, 32, 32), 1), ((4000, 40), 1)])
def test_constant_channel(rng, shape, axis, dtype):
    x, gamma, beta, rm, rv = make(rng, shape, axis, dtype)
    xc = np.moveaxis(x, axis, 0)
    xc[1] = dtype(0.1)                      # not exactly representable
    xc[-1] = dtype(-3e4)
    dy = rng.standard_normal(shape).astype(dtype)
    y, ctx = fastopt.batch_norm_forward(x, gamma, beta, rm, rv, axis=axis)
    yc = np.moveaxis(y, axis, 0)
    assert np.all(yc[1] == beta[1]) and np.all(yc[-1] == beta[-1])   # x_hat == 0 exactly
    assert np.all(np.isfinite(y))
    assert ctx.mean[1] == dtype(0.1) and ctx.mean[-1] == dtype(-3e4)
    assert ctx.invstd[1] == 1 / np.sqrt(1e-5)
    dx, dgamma, dbeta = fastopt.batch_norm_backward(dy, ctx)
    assert np.all(np.isfinite(dx)) and dgamma[1] == 0 and dgamma[-1] == 0


@pytest.mark.parametrize("shape,axis", [((8, 4, 30, 30), 1), ((2000, 4), 1), ((8, 30, 30, 4), -1)])
def test_float32_large_mean(rng, shape, axis):
    """mean 1e4, std 1 in float32: x_hat as in float64 within 1e-3."""
    x64 = rng.standard_normal(shape) + 1e4
    x = x64.astype(np.float32)
    C = shape[axis]
    ones, zeros = np.ones(C, np.float32), np.zeros(C, np.float32)
    y, ctx = fastopt.batch_norm_forward(x, ones, zeros, axis=axis)
    xhat_ref = ref_forward(x.astype(np.float64), ones, zeros, None, None, True, 0.1, 1e-5, axis)[0]
    assert np.max(np.abs(y - xhat_ref)) < 1e-3
    dx, dgamma, dbeta = fastopt.batch_norm_backward(y, ctx)
    dx_ref, dg_ref, _ = ref_backward(y, x, ones, ctx.mean, ctx.invstd, True, axis)
    assert np.max(np.abs(dx - dx_ref)) < 1e-3
    np.testing.assert_allclose(dgamma, dg_ref, rtol=1e-5)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("shape,axis", [((4, 3, 20), 1), ((30, 3), 1)])
def test_non_finite_input(rng, shape, axis, bad):
    """NaN/Inf propagate to that channel's y; its running stats become non-finite,
    the other channels are unaffected."""
    x, gamma, beta, rm, rv = make(rng, shape, axis, np.float32)
    np.moveaxis(x, axis, 0)[0].flat[3] = bad
    with np.errstate(invalid="ignore"):
        y_ref, _, _, rm_ref, rv_ref = ref_forward(x, gamma, beta, rm, rv, True, 0.1, 1e-5, axis)
    y, ctx = fastopt.batch_norm_forward(x, gamma, beta, rm, rv, axis=axis)
    yc = np.moveaxis(y, axis, 0)
    assert np.all(np.isnan(yc[0]) | np.isinf(yc[0]))
    assert not np.isfinite(rm[0]) or not np.isfinite(rv[0])
    assert np.isnan(rv[0])
    close(np.moveaxis(y, axis, 0)[1:], np.moveaxis(y_ref, axis, 0)[1:], np.float32, "y")
    close(rm[1:], rm_ref[1:], np.float32, "running_mean")
    close(rv[1:], rv_ref[1:], np.float32, "running_var")


@pytest.mark.parametrize("shape", [(1, 3), (1, 3, 1, 1), (1, 1, 1)])
def test_one_value_per_channel(rng, shape):
    x, gamma, beta, rm, rv = make(rng, shape, 1, np.float64)
    snap = Snapshot(x, gamma, beta, rm, rv)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        fastopt.batch_norm_forward(x, gamma, beta, rm, rv)
    snap.assert_unchanged()
    # Inference is fine with a single sample.
    y, _ = fastopt.batch_norm_forward(x, gamma, beta, rm, rv, training=False)
    close(y, ref_forward(x, gamma, beta, rm, rv, False, 0.1, 1e-5, 1)[0], np.float64, "y")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", [((0, 3), 1), ((0, 3, 4, 4), 1), ((0, 4, 4, 3), -1)])
def test_empty_batch_inference(rng, shape, axis, dtype):
    C = shape[axis]
    x = np.empty(shape, dtype)
    _, gamma, beta, rm, rv = make(rng, (2, C), 1, dtype)
    snap = Snapshot(gamma, beta, rm, rv)
    y, ctx = fastopt.batch_norm_forward(x, gamma, beta, rm, rv, training=False, axis=axis)
    assert y.shape == shape and y.dtype == dtype
    snap.assert_unchanged()
    dx, dgamma, dbeta = fastopt.batch_norm_backward(np.empty(shape, dtype), ctx)
    assert dx.shape == shape
    np.testing.assert_array_equal(dgamma, 0)
    np.testing.assert_array_equal(dbeta, 0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", [((16, 16, 32, 32), 1), ((8, 3, 64, 64), 1),
                                        ((4000, 40), 1), ((8, 16, 16, 40), -1),
                                        ((2, 3, 40000), 1), ((40, 3000), 1),
                                        ((20001, 3), 1), ((3000, 30), 1)])
def test_thread_count_does_not_change_results(rng, shape, axis, dtype):
    x, gamma, beta, rm, rv = make(rng, shape, axis, dtype, loc=5.0)
    dy = rng.standard_normal(shape).astype(dtype)
    results = []
    for n in (1, 2):
        r_m, r_v = rm.copy(), rv.copy()
        with num_threads(n):
            y, ctx = fastopt.batch_norm_forward(x, gamma, beta, r_m, r_v, axis=axis)
            grads = fastopt.batch_norm_backward(dy, ctx)
        results.append((y, ctx.mean, ctx.invstd, r_m, r_v) + grads)
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


def _bad_calls():
    """(description, call(arrays) -> None, exception, message)."""
    f32 = np.float32
    return [
        ("x list", lambda a: fastopt.batch_norm_forward(a["x"].tolist(), a["g"], a["b"]), TypeError, "x must be a numpy.ndarray"),
        ("x int", lambda a: fastopt.batch_norm_forward(a["x"].astype(np.int64), a["g"], a["b"]), TypeError, "x must have dtype"),
        ("x 1-D", lambda a: fastopt.batch_norm_forward(a["x"][0, :, 0, 0], a["g"], a["b"], a["rm"], a["rv"]), ValueError, "x must have at least 2"),
        ("gamma shape", lambda a: fastopt.batch_norm_forward(a["x"], a["g"][:2], a["b"], a["rm"], a["rv"]), ValueError, "gamma must have shape"),
        ("beta dtype", lambda a: fastopt.batch_norm_forward(a["x"], a["g"], a["b"].astype(np.float64), a["rm"], a["rv"]), TypeError, "beta has dtype"),
        ("gamma 2-D", lambda a: fastopt.batch_norm_forward(a["x"], a["g"][None], a["b"], a["rm"], a["rv"]), ValueError, "gamma must have shape"),
        ("running_mean shape", lambda a: fastopt.batch_norm_forward(a["x"], a["g"], a["b"], a["rm5"], a["rv"]), ValueError, "running_mean must have shape"),
        ("running_var dtype", lambda a: fastopt.batch_norm_forward(a["x"], a["g"], a["b"], a["rm"], a["rv"].astype(np.float64)), TypeError, "running_var has dtype"),
        ("running_var read-only", lambda a: fastopt.batch_norm_forward(a["x"], a["g"], a["b"], a["rm"], a["rv_ro"]), ValueError, "running_var is read-only"),
        ("running_mean strided", lambda a: fastopt.batch_norm_forward(a["x"], a["g"], a["b"], a["rm_strided"], a["rv"]), ValueError, "running_mean must be C-contiguous"),
        ("only running_mean", lambda a: fastopt.batch_norm_forward(a["x"], a["g"], a["b"], a["rm"]), ValueError, "running_var"),
        ("inference without stats", lambda a: fastopt.batch_norm_forward(a["x"], a["g"], a["b"], training=False), ValueError, "running_mean"),
        ("running stats alias", lambda a: fastopt.batch_norm_forward(a["x"], a["g"], a["b"], a["rm"], a["rm"]), ValueError, "running_mean and running_var overlap"),
        ("axis out of range", lambda a: fastopt.batch_norm_forward(a["x"], a["g"], a["b"], a["rm"], a["rv"], axis=4), ValueError, "axis 4 is out of bounds"),
        ("axis float", lambda a: fastopt.batch_norm_forward(a["x"], a["g"], a["b"], a["rm"], a["rv"], axis=1.0), TypeError, "axis must be an integer"),
        ("axis picks wrong C", lambda a: fastopt.batch_norm_forward(a["x"], a["g"], a["b"], a["rm"], a["rv"], axis=-1), ValueError, "gamma must have shape"),
        ("momentum > 1", lambda a: fastopt.batch_norm_forward(a["x"], a["g"], a["b"], a["rm"], a["rv"], momentum=1.5), ValueError, "momentum must be in [0, 1]"),
        ("momentum < 0", lambda a: fastopt.batch_norm_forward(a["x"], a["g"], a["b"], a["rm"], a["rv"], momentum=-0.1), ValueError, "momentum must be in [0, 1]"),
        ("momentum None", lambda a: fastopt.batch_norm_forward(a["x"], a["g"], a["b"], a["rm"], a["rv"], momentum=None), TypeError, "momentum must be a real number"),
        ("eps 0", lambda a: fastopt.batch_norm_forward(a["x"], a["g"], a["b"], a["rm"], a["rv"], eps=0.0), ValueError, "eps must be > 0"),
        ("eps < 0", lambda a: fastopt.batch_norm_forward(a["x"], a["g"], a["b"], a["rm"], a["rv"], eps=-1e-5), ValueError, "eps must be > 0"),
        ("eps nan", lambda a: fastopt.batch_norm_forward(a["x"], a["g"], a["b"], a["rm"], a["rv"], eps=float("nan")), ValueError, "eps must be finite"),
        ("out shape", lambda a: fastopt.batch_norm_forward(a["x"], a["g"], a["b"], a["rm"], a["rv"], out=a["out"][:1]), ValueError, "out has shape"),
        ("out dtype", lambda a: fastopt.batch_norm_forward(a["x"], a["g"], a["b"], a["rm"], a["rv"], out=a["out"].astype(np.float64)), TypeError, "out has dtype"),
        ("out read-only", lambda a: fastopt.batch_norm_forward(a["x"], a["g"], a["b"], a["rm"], a["rv"], out=a["out_ro"]), ValueError, "out is read-only"),
        ("out strided", lambda a: fastopt.batch_norm_forward(a["x"], a["g"], a["b"], a["rm"], a["rv"], out=a["out_strided"]), ValueError, "out must be C-contiguous"),
        ("out is x", lambda a: fastopt.batch_norm_forward(a["x"], a["g"], a["b"], a["rm"], a["rv"], out=a["x"]), ValueError, "out and x overlap"),
        ("running_mean is gamma", lambda a: fastopt.batch_norm_forward(a["x"], a["g"], a["b"], a["g"], a["rv"]), ValueError, "running_mean and gamma overlap"),
        ("one value per channel", lambda a: fastopt.batch_norm_forward(a["x"][:1, :, :1, :1], a["g"], a["b"], a["rm"], a["rv"]), ValueError, "Expected more than 1 value per channel when training"),
        ("ctx type", lambda a: fastopt.batch_norm_backward(a["dy"], (a["x"], a["g"])), TypeError, "ctx must be the BatchNormContext"),
        ("dy shape", lambda a: fastopt.batch_norm_backward(a["dy"][:1], a["ctx"]), ValueError, "dy has shape"),
        ("dy dtype", lambda a: fastopt.batch_norm_backward(a["dy"].astype(np.float64), a["ctx"]), TypeError, "dy has dtype"),
        ("dy list", lambda a: fastopt.batch_norm_backward(a["dy"].tolist(), a["ctx"]), TypeError, "dy must be a numpy.ndarray"),
        ("dx_out shape", lambda a: fastopt.batch_norm_backward(a["dy"], a["ctx"], dx_out=a["out"][:1]), ValueError, "dx_out has shape"),
        ("dx_out read-only", lambda a: fastopt.batch_norm_backward(a["dy"], a["ctx"], dx_out=a["out_ro"]), ValueError, "dx_out is read-only"),
        ("dx_out strided", lambda a: fastopt.batch_norm_backward(a["dy"], a["ctx"], dx_out=a["out_strided"]), ValueError, "dx_out must be C-contiguous"),
        ("dx_out is dy", lambda a: fastopt.batch_norm_backward(a["dy"], a["ctx"], dx_out=a["dy"]), ValueError, "dx_out and dy overlap"),
        ("dx_out is x", lambda a: fastopt.batch_norm_backward(a["dy"], a["ctx"], dx_out=a["x"]), ValueError, "dx_out and x overlap"),
    ]


BAD = _bad_calls()


@pytest.mark.parametrize("desc,call,exc,msg", BAD, ids=[b[0] for b in BAD])
def test_bad_input_changes_nothing(rng, desc, call, exc, msg):
    f32 = np.float32
    x, g, b, rm, rv = make(rng, (4, 3, 5, 5), 1, f32)
    _, ctx = fastopt.batch_norm_forward(x, g, b)
    a = dict(x=x, g=g, b=b, rm=rm, rv=rv, ctx=ctx,
             dy=rng.standard_normal(x.shape).astype(f32),
             out=np.zeros_like(x),
             rm5=np.zeros(5, f32),
             rv_ro=rv.copy(), out_ro=np.zeros_like(x),
             rm_strided=np.zeros(6, f32)[::2],
             out_strided=np.zeros((4, 3, 5, 10), f32)[..., ::2])
    a["rv_ro"].flags.writeable = False
    a["out_ro"].flags.writeable = False
    snap = Snapshot(*[v for v in a.values() if isinstance(v, np.ndarray)])
    with pytest.raises(exc, match=msg.replace("[", r"\[").replace("]", r"\]")):
        call(a)
    snap.assert_unchanged()


@settings(max_examples=40, deadline=None)
@given(ndim=st.integers(2, 4), data=st.data(), dtype=st.sampled_from(DTYPES),
       training=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_random_shapes(ndim, data, dtype, training, seed):
    shape = tuple(data.draw(st.lists(st.integers(1, 9), min_size=ndim, max_size=ndim)))
    axis = data.draw(st.integers(-ndim, ndim - 1))
    rng = np.random.default_rng(seed)
    x, gamma, beta, rm, rv = make(rng, shape, axis, dtype)
    m = x.size // shape[axis]
    if training and m == 1:
        with pytest.raises(ValueError, match="Expected more than 1 value"):
            fastopt.batch_norm_forward(x, gamma, beta, rm, rv, axis=axis)
        return
    y_ref, mean, invstd, rm_ref, rv_ref = ref_forward(x, gamma, beta, rm, rv, training, 0.2, 1e-3, axis)
    y, ctx = fastopt.batch_norm_forward(x, gamma, beta, rm, rv, training=training,
                                        momentum=0.2, eps=1e-3, axis=axis)
    close(y, y_ref, dtype, "y")
    close(rm, rm_ref, dtype, "running_mean")
    close(rv, rv_ref, dtype, "running_var")
    dy = rng.standard_normal(shape).astype(dtype)
    for a, b, what in zip(fastopt.batch_norm_backward(dy, ctx),
                          ref_backward(dy, x, gamma, mean, invstd, training, axis),
                          ("dx", "dgamma", "dbeta")):
        close(a, b, dtype, what)


@pytest.mark.parametrize("shape,axis", [((16, 16, 32, 32), 1), ((8, 3, 64, 64), 1),
                                        ((8, 16, 16, 40), -1), ((2048, 1024), 1),
                                        ((256, 4, 8), -1)])
def test_no_temporaries_the_size_of_x(rng, shape, axis):
    """With out= and dx_out=, scratch memory stays a small fraction of x."""
    import tracemalloc
    x, gamma, beta, rm, rv = make(rng, shape, axis, np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    y, dx = np.empty_like(x), np.empty_like(x)
    tracemalloc.start()
    try:
        _, ctx = fastopt.batch_norm_forward(x, gamma, beta, rm, rv, axis=axis, out=y)
        fastopt.batch_norm_backward(dy, ctx, dx_out=dx)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < x.nbytes / 8


def test_same_bits_on_every_simd_level(rng):
    """Fixed operation order and no FMA contraction: the portable build gives
    the same bits as the one in use."""
    import subprocess
    import sys
    code = (
        "import numpy as np, fastopt, sys\n"
        "rng = np.random.default_rng(7)\n"
        "out = []\n"
        "for shape, axis in [((4, 5, 40), 1), ((300, 7), 1), ((3, 6, 6, 9), -1)]:\n"
        "    x = rng.standard_normal(shape) * 3 + 1\n"
        "    C = shape[axis]\n"
        "    y, ctx = fastopt.batch_norm_forward(x, np.ones(C) * 1.5, np.zeros(C) + 0.25, axis=axis)\n"
        "    out += [y, ctx.mean, ctx.invstd]\n"
        "    out += list(fastopt.batch_norm_backward(rng.standard_normal(shape), ctx))\n"
        "sys.stdout.write(np.concatenate([a.ravel() for a in out]).tobytes().hex())\n"
    )
    import os
    results = []
    for level in ("baseline", ""):
        env = dict(os.environ, FASTOPT_SIMD=level)
        run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, timeout=60)
        assert run.returncode == 0, run.stderr
        results.append(run.stdout)
    assert results[0] == results[1]
