"""Training-loop kernels: fastopt against NumPy, float32.

``python -m fastopt bench`` has no case for these, so their (short) NumPy
code is here.  Groups, each with the members ``numpy`` (course-style code),
``numpy_inplace`` (careful NumPy with ``out=``) and ``fastopt``:

* ``take_rows <batch>x<row>``: gather one mini-batch of rows from a data set
  of ~30-50 MB (``X[idx]`` / ``np.take(..., out=)`` / `fastopt.take_rows`);
* ``epoch <batch>``: one shuffled epoch of (X, y) mini-batches over a
  (10000, 784) data set (``X[perm[k:k+b]]`` per batch / ``np.take`` into
  reused buffers / `fastopt.minibatches`);
* ``ewa <n>``: ``avg = beta*avg + (1-beta)*x`` / `fastopt.ewa_update`.

Each member checks its result once against the ``numpy`` one before it is timed.

    PYTHONPATH=src python -m pytest benchmarks/test_bench_train.py --benchmark-only \\
        --benchmark-group-by=group --benchmark-columns=median,iqr,rounds
"""
import numpy as np
import pytest

import fastopt

DTYPE = np.float32
BETA = 0.9
METHODS = ["numpy", "numpy_inplace", "fastopt"]

_data = {}


def dataset(rows, cols):
    """A random (rows, cols) float32 data set and int64 labels, made once."""
    if (rows, cols) not in _data:
        rng = np.random.default_rng(rows + cols)
        _data[rows, cols] = (rng.standard_normal((rows, cols), dtype=DTYPE),
                             rng.integers(0, 10, size=rows))
    return _data[rows, cols]


# ------------------------------------------------------------- take_rows ---

GATHERS = {"64x784": (10_000, 784, 64), "512x784": (10_000, 784, 512),
           "256x3072": (4_000, 3072, 256)}


def gather(method, X, idx, out):
    if method == "numpy":
        return X[idx]
    if method == "numpy_inplace":
        return np.take(X, idx, axis=0, out=out)
    return fastopt.take_rows(X, idx, out)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", list(GATHERS))
def test_take_rows(benchmark, case, method):
    rows, cols, batch = GATHERS[case]
    X, _ = dataset(rows, cols)
    idx = np.random.default_rng(0).permutation(rows)[:batch]
    out = np.empty((batch, cols), dtype=DTYPE)
    np.testing.assert_array_equal(gather(method, X, idx, out), X[idx])
    benchmark.group = f"take_rows {case} float32"
    benchmark.extra_info["bytes"] = 2 * out.nbytes       # rows read, batch written
    benchmark(gather, method, X, idx, out)


# ----------------------------------------------------------------- epoch ---

def epoch_numpy(X, y, batch, seed):
    """The course's loop: permute, then slice batches with fancy indexing."""
    perm = np.random.default_rng(seed).permutation(len(X))
    total = 0.0
    for k in range(0, len(X), batch):
        xb, yb = X[perm[k:k + batch]], y[perm[k:k + batch]]
        total += xb[0, 0] + yb[0]        # touch the batch as a training step would
    return total


def epoch_inplace(X, y, batch, seed):
    perm = np.random.default_rng(seed).permutation(len(X))
    xbuf = np.empty((batch, X.shape[1]), dtype=X.dtype)
    ybuf = np.empty(batch, dtype=y.dtype)
    total = 0.0
    for k in range(0, len(X), batch):
        idx = perm[k:k + batch]
        xb = np.take(X, idx, axis=0, out=xbuf[:len(idx)])
        yb = np.take(y, idx, axis=0, out=ybuf[:len(idx)])
        total += xb[0, 0] + yb[0]
    return total


def epoch_fastopt(X, y, batch, seed):
    total = 0.0
    for xb, yb in fastopt.minibatches(X, y, batch, rng=seed):
        total += xb[0, 0] + yb[0]
    return total


EPOCHS = {"numpy": epoch_numpy, "numpy_inplace": epoch_inplace, "fastopt": epoch_fastopt}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("batch", [64, 512])
def test_epoch(benchmark, batch, method):
    X, y = dataset(10_000, 784)
    assert EPOCHS[method](X, y, batch, 1) == epoch_numpy(X, y, batch, 1)
    benchmark.group = f"epoch {batch} float32"
    benchmark(EPOCHS[method], X, y, batch, 1)


# ------------------------------------------------------------------- EWA ---

EWA_SIZES = {"1e3": 10**3, "1e5": 10**5, "1e6": 10**6, "1e7": 10**7}


def ewa_numpy(s):
    s["avg"] = BETA * s["avg"] + (1 - BETA) * s["x"]


def ewa_inplace(s):
    s["avg"] *= DTYPE(BETA)
    np.multiply(s["x"], DTYPE(1 - BETA), out=s["tmp"])
    s["avg"] += s["tmp"]


def ewa_fastopt(s):
    fastopt.ewa_update(s["avg"], s["x"], BETA)


EWAS = {"numpy": ewa_numpy, "numpy_inplace": ewa_inplace, "fastopt": ewa_fastopt}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("size", list(EWA_SIZES))
def test_ewa(benchmark, check_result, size, method):
    n = EWA_SIZES[size]
    rng = np.random.default_rng(n)
    avg, x = rng.standard_normal(n, dtype=DTYPE), rng.standard_normal(n, dtype=DTYPE)
    ref = {"avg": avg.astype(np.float64), "x": x.astype(np.float64)}
    ewa_numpy(ref)
    s = {"avg": avg, "x": x, "tmp": np.empty_like(x)}
    EWAS[method](s)
    check_result(s["avg"], ref["avg"], DTYPE)
    benchmark.group = f"ewa n={n:,} float32"
    benchmark.extra_info["bytes"] = 3 * x.nbytes       # avg and x read, avg written
    benchmark(EWAS[method], s)
