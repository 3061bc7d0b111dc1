"""The training toolkit: take_rows, minibatches, ewa_update/bias_corrected/EWA,
log_uniform/sample_beta, against NumPy references written from the formulas."""
import numpy as np
import pytest

import fastopt
from conftest import DTYPES, SIZES, Snapshot, num_threads, tol


# ---------------------------------------------------------------- references ---

def ref_take_rows(X, idx):
    return X[idx]                              # NumPy fancy indexing along axis 0


def ref_ewa(avg, x, beta):
    """avg = beta*avg + (1-beta)*x in float64."""
    return beta * avg.astype(np.float64) + (1.0 - beta) * x.astype(np.float64)


def ks_uniform(u):
    """Kolmogorov-Smirnov distance between the sample u and U(0, 1)."""
    u = np.sort(np.asarray(u, dtype=np.float64))
    n = len(u)
    i = np.arange(1, n + 1)
    return max(np.max(i / n - u), np.max(u - (i - 1) / n))


def ks_critical(n):
    """D above which uniformity is rejected at the 0.1% level (asymptotic)."""
    return 1.95 / np.sqrt(n)


# ---------------------------------------------------------------- take_rows ---

GATHER_DTYPES = [np.float32, np.float64, np.int8, np.int32, np.int64, np.bool_,
                 np.complex128, "U3", np.dtype([("a", "<i4"), ("b", "<f8")]), ">f8"]


@pytest.mark.parametrize("dtype", GATHER_DTYPES)
@pytest.mark.parametrize("tail", [(), (1,), (3,), (2, 5)])
def test_take_rows_matches_fancy_indexing(dtype, tail, rng):
    X = np.zeros((11,) + tail, dtype=dtype)
    flat = X.reshape(-1).view(np.uint8)
    flat[:] = rng.integers(0, 256, size=flat.size, dtype=np.uint8)   # every byte distinct-ish
    for n in [0, 1, 7, 30]:
        idx = rng.integers(0, len(X), size=n)
        out = np.empty((n,) + tail, dtype=dtype)
        got = fastopt.take_rows(X, idx, out)
        assert got is out
        np.testing.assert_array_equal(out.view(np.uint8), ref_take_rows(X, idx).view(np.uint8))
        got = fastopt.take_rows(X, idx)                               # allocated
        assert got.dtype == X.dtype and got.shape == (n,) + tail
        np.testing.assert_array_equal(got.view(np.uint8), ref_take_rows(X, idx).view(np.uint8))


@pytest.mark.parametrize("rows, cols", [(0, 4), (5, 0), (50_000, 64), (300_000, 1)])
def test_take_rows_sizes_and_threads(rows, cols, rng):
    """Empty inputs, and gathers large enough to run on two threads (1 vs 2 identical)."""
    X = rng.standard_normal((rows, cols))
    idx = rng.integers(0, rows, size=rows) if rows else np.empty(0, dtype=np.int64)
    want = ref_take_rows(X, idx)
    results = []
    for threads in (1, 2):
        out = np.full((rows, cols), np.nan)
        with num_threads(threads):
            fastopt.take_rows(X, idx, out)
        np.testing.assert_array_equal(out, want)
        results.append(out)
    np.testing.assert_array_equal(results[0], results[1])


def test_take_rows_empty_X_and_empty_idx():
    X = np.empty((0, 3), dtype=np.float32)
    out = fastopt.take_rows(X, np.empty(0, dtype=np.int64))
    assert out.shape == (0, 3) and out.dtype == np.float32


def take_rows_bad_cases():
    X = np.arange(12.0).reshape(4, 3)
    idx = np.array([0, 3, 1], dtype=np.int64)
    out = np.zeros((3, 3))
    ro = np.zeros((3, 3))
    ro.flags.writeable = False
    return [
        ((X.tolist(), idx, out), TypeError, "X must be a numpy.ndarray"),
        ((np.array(1.0), idx, out), ValueError, "X must have at least one dimension"),
        ((np.empty((4, 3), dtype=object), idx, out), TypeError, "Python objects"),
        ((np.arange(24.0).reshape(4, 6)[:, ::2], idx, out), ValueError, "X must be C-contiguous"),
        ((X, [0, 1, 2], out), TypeError, "idx must be a numpy.ndarray"),
        ((X, idx.astype(np.int32), out), TypeError, "idx must have dtype int64"),
        ((X, idx.reshape(3, 1), out), ValueError, "idx must be 1-D"),
        ((X, np.array([0, 4, 1], dtype=np.int64), out), IndexError, r"idx\[1\] = 4 is out of range"),
        ((X, np.array([0, 1, -1], dtype=np.int64), out), IndexError, r"idx\[2\] = -1 is out of range"),
        ((X, idx, np.zeros((3, 3), dtype=np.float32)), TypeError, "out has dtype float32"),
        ((X, idx, np.zeros((3, 4))), ValueError, "out has shape"),
        ((X, idx, np.zeros((4, 3))), ValueError, "out has shape"),
        ((X, idx, np.zeros((3, 6))[:, ::2]), ValueError, "out must be C-contiguous"),
        ((X, idx, ro), ValueError, "out is read-only"),
        ((X, np.array([0, 1, 2], dtype=np.int64), X[:3]), ValueError, "X and out overlap"),
    ]


@pytest.mark.parametrize("case", range(len(take_rows_bad_cases())))
def test_take_rows_bad_input_changes_nothing(case):
    args, exc, msg = take_rows_bad_cases()[case]
    snap = Snapshot(*args)
    with pytest.raises(exc, match=msg):
        fastopt.take_rows(*args)
    snap.assert_unchanged()


# -------------------------------------------------------------- minibatches ---

def epoch(X, Y, batch_size, **kw):
    """All batches of one epoch, copied (the yielded arrays are reused)."""
    return [(xb.copy(), yb.copy()) for xb, yb in fastopt.minibatches(X, Y, batch_size, **kw)]


def labelled_data(m, d=3, dtype=np.float64):
    """Row i of X is i*10 + column, Y[i] = i: a batch reveals which rows it holds."""
    X = (np.arange(m)[:, None] * 10 + np.arange(d)).astype(dtype)
    return X, np.arange(m)


@pytest.mark.parametrize("m, batch_size", [(0, 4), (1, 1), (10, 3), (64, 64), (100, 7), (5, 32)])
@pytest.mark.parametrize("drop_last", [False, True])
def test_minibatches_cover_every_row_once(m, batch_size, drop_last):
    X, Y = labelled_data(m)
    batches = epoch(X, Y, batch_size, rng=0, drop_last=drop_last)
    sizes = [len(yb) for _, yb in batches]
    full, rest = divmod(m, batch_size)
    assert sizes == [batch_size] * full + ([rest] if rest and not drop_last else [])
    for xb, yb in batches:
        np.testing.assert_array_equal(xb, X[yb])       # rows stay paired with their labels
    seen = np.concatenate([yb for _, yb in batches]) if batches else np.empty(0, int)
    if drop_last:
        assert len(np.unique(seen)) == len(seen) == full * batch_size
    else:
        np.testing.assert_array_equal(np.sort(seen), np.arange(m))


def test_minibatches_shuffle_follows_rng():
    X, Y = labelled_data(50)
    order = lambda **kw: np.concatenate([yb for _, yb in epoch(X, Y, 8, **kw)])
    np.testing.assert_array_equal(order(rng=3), order(rng=3))
    np.testing.assert_array_equal(order(rng=3), np.random.default_rng(3).permutation(50))
    assert not np.array_equal(order(rng=3), order(rng=4))
    np.testing.assert_array_equal(order(shuffle=False), np.arange(50))
    # A Generator gives a new order every epoch, reproducibly.
    g1, g2 = np.random.default_rng(7), np.random.default_rng(7)
    e1, e2 = order(rng=g1), order(rng=g1)
    assert not np.array_equal(e1, e2)
    np.testing.assert_array_equal(e1, order(rng=g2))
    np.testing.assert_array_equal(e2, order(rng=g2))


@pytest.mark.parametrize("dtype", DTYPES)
def test_minibatches_one_hot_and_nd(dtype):
    m, classes = 37, 10
    X = np.random.default_rng(0).standard_normal((m, 2, 4)).astype(dtype)
    labels = np.arange(m) % classes
    Y = np.eye(classes, dtype=dtype)[labels]
    perm = np.random.default_rng(1).permutation(m)
    got = epoch(X, Y, 16, rng=1)
    assert [len(xb) for xb, _ in got] == [16, 16, 5]
    np.testing.assert_array_equal(np.concatenate([xb for xb, _ in got]), X[perm])
    np.testing.assert_array_equal(np.concatenate([yb for _, yb in got]), Y[perm])
    for xb, yb in got:
        assert xb.dtype == dtype and yb.dtype == dtype and yb.shape[1:] == (classes,)


def test_minibatches_non_contiguous_and_lists():
    X, Y = labelled_data(20, d=6)
    Xs = X[:, ::2]                                      # strided rows: NumPy's gather
    got = epoch(Xs, Y.tolist(), 6, rng=2)
    perm = np.random.default_rng(2).permutation(20)
    np.testing.assert_array_equal(np.concatenate([xb for xb, _ in got]), Xs[perm])
    np.testing.assert_array_equal(np.concatenate([yb for _, yb in got]), perm)


def test_minibatches_reuse_buffers_unless_copy():
    X, Y = labelled_data(12)
    views = list(fastopt.minibatches(X, Y, 4, rng=0))
    assert all(np.shares_memory(xb, views[0][0]) for xb, _ in views)
    copies = list(fastopt.minibatches(X, Y, 4, rng=0, copy=True))
    assert not np.shares_memory(copies[0][0], copies[1][0])
    np.testing.assert_array_equal(np.concatenate([yb for _, yb in copies]),
                                  np.random.default_rng(0).permutation(12))


@pytest.mark.parametrize("args, kw, exc, msg", [
    ((np.zeros((4, 2)), np.zeros(4), 0), {}, ValueError, "batch_size must be >= 1"),
    ((np.zeros((4, 2)), np.zeros(4), -3), {}, ValueError, "batch_size must be >= 1"),
    ((np.zeros((4, 2)), np.zeros(4), 2.0), {}, TypeError, "batch_size must be an integer"),
    ((np.zeros((4, 2)), np.zeros(4), True), {}, TypeError, "batch_size must be an integer"),
    ((np.zeros((4, 2)), np.zeros(5), 2), {}, ValueError, "same number of rows, got 4 and 5"),
    ((np.zeros((4, 2)), np.zeros((3, 10)), 2), {}, ValueError, "same number of rows"),
    ((np.array(1.0), np.zeros(1), 1), {}, ValueError, "X must have at least one dimension"),
    ((np.zeros(1), np.array(1.0), 1), {}, ValueError, "Y must have at least one dimension"),
])
def test_minibatches_bad_input(args, kw, exc, msg):
    snap = Snapshot(*args)
    with pytest.raises(exc, match=msg):
        fastopt.minibatches(*args, **kw)                # raised at the call, not at next()
    snap.assert_unchanged()


# --------------------------------------------------------------------- EWA ---

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9, 0.999])
def test_ewa_update_matches_reference(dtype, n, beta, rng):
    avg = rng.standard_normal(n).astype(dtype)
    x = rng.standard_normal(n).astype(dtype)
    want = ref_ewa(avg, x, beta)
    fastopt.ewa_update(avg, x, beta)
    assert avg.dtype == dtype
    np.testing.assert_allclose(avg, want, **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_ewa_update_rounds_like_the_formula_in_its_dtype(dtype, rng):
    """beta and 1 - beta rounded to the dtype, then one multiply-add without
    contraction: the same bits at every SIMD level as NumPy's two-step formula."""
    avg = rng.standard_normal(100_003).astype(dtype)
    x = rng.standard_normal(100_003).astype(dtype)
    b, cb = dtype(0.937), dtype(1 - 0.937)
    want = b * avg + cb * x
    fastopt.ewa_update(avg, x, 0.937)
    np.testing.assert_array_equal(avg, want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ewa_update_threads_identical(dtype, rng):
    avg0 = rng.standard_normal(1_000_003).astype(dtype)
    x = rng.standard_normal(1_000_003).astype(dtype)
    out = []
    for threads in (1, 2):
        avg = avg0.copy()
        with num_threads(threads):
            fastopt.ewa_update(avg, x, 0.9)
        out.append(avg)
    np.testing.assert_array_equal(out[0], out[1])


def test_ewa_update_nd_and_strided_x(rng):
    avg = rng.standard_normal((3, 4, 5))
    x = rng.standard_normal((5, 4, 3)).T                # non-contiguous input is fine
    want = ref_ewa(avg, x, 0.8)
    fastopt.ewa_update(avg, x, 0.8)
    np.testing.assert_allclose(avg, want, **tol(np.float64))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("beta", [0.5, 0.9, 0.98])
def test_bias_correction_matches_reference(dtype, beta, rng):
    xs = rng.standard_normal((40, 33)).astype(dtype) + 5
    avg = np.zeros(33, dtype=dtype)
    v = np.zeros(33)
    for t, x in enumerate(xs, start=1):
        fastopt.ewa_update(avg, x, beta)
        v = beta * v + (1 - beta) * x.astype(np.float64)
        np.testing.assert_allclose(fastopt.bias_corrected(avg, beta, t), v / (1 - beta ** t),
                                   **tol(dtype))


def test_bias_correction_removes_the_start_bias():
    """A constant input is estimated exactly from the first step on."""
    avg = np.zeros(4)
    for t in range(1, 30):
        fastopt.ewa_update(avg, np.full(4, 3.0), 0.98)
        np.testing.assert_allclose(fastopt.bias_corrected(avg, 0.98, t), 3.0, rtol=1e-12)
    assert avg[0] < 1.5                                  # while the raw average lags far behind


def test_bias_corrected_out():
    avg = np.array([0.1, 0.2])
    r = fastopt.bias_corrected(avg, 0.9, 1, out=avg)
    assert r is avg
    np.testing.assert_allclose(avg, [1.0, 2.0], rtol=1e-14)


def test_ewa_class_temperatures():
    """The course's example: daily temperatures with beta = 0.9."""
    temps = 10 + 5 * np.sin(np.arange(100) / 10)
    ema = fastopt.EWA(0.9)
    raw = fastopt.EWA(0.9, bias_correction=False)
    v = 0.0
    for t, theta in enumerate(temps, start=1):
        got = ema.update(theta)
        raw.update(theta)
        v = 0.9 * v + 0.1 * theta
        assert got == pytest.approx(v / (1 - 0.9 ** t), rel=1e-12)
        assert raw.value == pytest.approx(v, rel=1e-12)
    assert ema.t == 100 and ema.avg.dtype == np.float64


@pytest.mark.parametrize("dtype", DTYPES)
def test_ewa_class_polyak_average_of_weights(dtype, rng):
    ws = rng.standard_normal((20, 4, 3)).astype(dtype)
    ema = fastopt.EWA(0.95)
    v = np.zeros((4, 3))
    for t, w in enumerate(ws, start=1):
        ema.update(w)
        v = 0.95 * v + 0.05 * w.astype(np.float64)
    assert ema.avg.dtype == dtype
    np.testing.assert_allclose(ema.value, v / (1 - 0.95 ** 20), **tol(dtype))
    ema.reset()
    assert ema.t == 0 and ema.avg is None


def test_ewa_class_bad_input_changes_nothing():
    with pytest.raises(ValueError, match="beta must be in"):
        fastopt.EWA(1.0)
    ema = fastopt.EWA(0.9)
    with pytest.raises(ValueError, match="before the first update"):
        ema.value
    ema.update(np.ones(3))
    snap = Snapshot(ema.avg)
    with pytest.raises(ValueError, match="x has shape"):
        ema.update(np.ones(4))
    snap.assert_unchanged()
    assert ema.t == 1


def ewa_bad_cases():
    avg = np.zeros(5)
    ro = np.zeros(5)
    ro.flags.writeable = False
    buf = np.zeros(10)
    return [
        ((avg.tolist(), np.ones(5), 0.9), TypeError, "avg must be a numpy.ndarray"),
        ((np.zeros(5, dtype=np.int64), np.ones(5, dtype=np.int64), 0.9), TypeError, "avg must have dtype"),
        ((ro, np.ones(5), 0.9), ValueError, "avg is read-only"),
        ((np.zeros(10)[::2], np.ones(5), 0.9), ValueError, "avg must be C-contiguous"),
        ((avg, np.ones(6), 0.9), ValueError, "x has shape"),
        ((avg, np.ones(5, dtype=np.float32), 0.9), TypeError, "x has dtype float32"),
        ((avg, np.ones(5), 1.0), ValueError, "beta must be in"),
        ((avg, np.ones(5), -0.1), ValueError, "beta must be in"),
        ((avg, np.ones(5), float("nan")), ValueError, "beta must be finite"),
        ((avg, np.ones(5), "0.9"), TypeError, "beta must be a real number"),
        ((avg, avg, 0.9), ValueError, "avg and x overlap"),
        ((buf[:5], buf[3:8], 0.9), ValueError, "avg and x overlap"),
    ]


@pytest.mark.parametrize("case", range(len(ewa_bad_cases())))
def test_ewa_update_bad_input_changes_nothing(case):
    args, exc, msg = ewa_bad_cases()[case]
    snap = Snapshot(*args)
    with pytest.raises(exc, match=msg):
        fastopt.ewa_update(*args)
    snap.assert_unchanged()


@pytest.mark.parametrize("beta, t, exc, msg", [
    (1.0, 3, ValueError, "beta must be in"),
    (-0.5, 3, ValueError, "beta must be in"),
    (0.9, 0, ValueError, "t must be >= 1"),
    (0.9, 2.0, TypeError, "t must be an integer"),
])
def test_bias_corrected_bad_input(beta, t, exc, msg):
    avg = np.ones(3)
    with pytest.raises(exc, match=msg):
        fastopt.bias_corrected(avg, beta, t, out=avg)
    np.testing.assert_array_equal(avg, 1.0)


# ---------------------------------------------------------------- sampling ---

def test_ks_statistic_has_power():
    """The uniformity test below rejects a plain uniform sample of lr (not log-scale)."""
    s = np.random.default_rng(0).uniform(1e-4, 1.0, 4000)
    u = (np.log10(s) + 4) / 4
    assert ks_uniform(u) > ks_critical(4000)


@pytest.mark.parametrize("low, high", [(1e-4, 1.0), (1e-3, 1e-1), (0.5, 2.0), (3e-7, 4e-7)])
def test_log_uniform_in_range_and_uniform_in_log_space(low, high):
    s = fastopt.log_uniform(low, high, size=4000, rng=123)
    assert s.shape == (4000,) and s.dtype == np.float64
    assert np.all((s >= low) & (s <= high))
    u = (np.log10(s) - np.log10(low)) / (np.log10(high) - np.log10(low))
    assert ks_uniform(u) < ks_critical(4000)


def test_log_uniform_decades_equally_likely():
    s = fastopt.log_uniform(1e-4, 1.0, size=20_000, rng=5)
    counts = np.histogram(np.log10(s), bins=[-4, -3, -2, -1, 0])[0]
    expected = len(s) / 4
    chi2 = np.sum((counts - expected) ** 2 / expected)
    assert chi2 < 16.27                                 # chi-square, 3 dof, 0.1% level


def test_log_uniform_scalar_shape_and_seed():
    a = fastopt.log_uniform(1e-3, 1e-1, rng=9)
    assert isinstance(a, float) and 1e-3 <= a <= 1e-1
    assert a == fastopt.log_uniform(1e-3, 1e-1, rng=9)
    assert fastopt.log_uniform(1e-3, 1e-1, size=(2, 3), rng=np.random.default_rng(1)).shape == (2, 3)


def test_sample_beta_is_one_minus_log_uniform():
    b = fastopt.sample_beta(size=4000, rng=11)            # the course's r in [-3, -1]
    assert np.all((b >= 0.9) & (b <= 0.999))
    u = (np.log10(1 - b) + 3) / 2
    assert ks_uniform(u) < ks_critical(4000)
    # Half the samples beyond 0.99: where 1/(1-beta) changes most.
    assert abs(np.mean(b > 0.99) - 0.5) < 0.05
    one = fastopt.sample_beta(0.8, 0.95, rng=2)
    assert isinstance(one, float) and 0.8 <= one <= 0.95


@pytest.mark.parametrize("f, args, exc, msg", [
    (fastopt.log_uniform, (1.0, 1.0), ValueError, "low must be < high"),
    (fastopt.log_uniform, (1.0, 0.1), ValueError, "low must be < high"),
    (fastopt.log_uniform, (0.0, 1.0), ValueError, "low must be positive"),
    (fastopt.log_uniform, (-1e-3, 1.0), ValueError, "low must be positive"),
    (fastopt.log_uniform, (1e-3, float("inf")), ValueError, "high must be positive and finite"),
    (fastopt.log_uniform, (1e-3, float("nan")), ValueError, "high must be positive and finite"),
    (fastopt.log_uniform, ("1e-3", 1.0), TypeError, "low must be a real number"),
    (fastopt.sample_beta, (0.9, 1.0), ValueError, r"must be in \[0, 1\)"),
    (fastopt.sample_beta, (-0.1, 0.9), ValueError, r"must be in \[0, 1\)"),
    (fastopt.sample_beta, (0.99, 0.9), ValueError, "low must be < high"),
    (fastopt.sample_beta, (None, 0.9), TypeError, "low must be a real number"),
])
def test_sampling_bad_input(f, args, exc, msg):
    with pytest.raises(exc, match=msg):
        f(*args)
