"""Optimizer updates: fastopt against NumPy, float32, 1e3 ... 1e7 elements.

One group per (optimizer, size), e.g. ``adam-1e5``, with three members:

* ``numpy``: the straightforward code of a deep-learning course (a new array
  per operation);
* ``numpy_inplace``: careful NumPy, every operation with ``out=`` into the
  state arrays or one preallocated scratch array;
* ``fastopt``: the fused kernel.

Each member checks one update against the ``numpy`` one before it is timed.
``extra_info`` records the effective bandwidth (bytes the update must move /
median time); the ``copy`` group is a memory-copy probe to compare it with.

fastopt runs on all of OpenMP's threads.  When other processes keep the cores
busy, its spinning worker threads compete with them and a 2-thread call can
stall for whole scheduler ticks (4-16 ms): compare with a run under
``OMP_NUM_THREADS=1`` before reading anything into a multi-thread time.

    PYTHONPATH=src python -m pytest benchmarks/test_bench_optim.py --benchmark-columns=median,ops
    PYTHONPATH=src python -m pytest benchmarks/test_bench_optim.py --benchmark-disable   # smoke
"""
import math

import numpy as np
import pytest

import fastopt

SIZES = {"1e3": 10**3, "1e5": 10**5, "1e6": 10**6, "1e7": 10**7}
DTYPE = np.float32
LR, B1, B2, EPS, WD = 1e-3, 0.9, 0.999, 1e-8, 1e-2
ALPHA, BETA = 0.99, 0.9
STEP = 10

# A training loop frees large temporaries every step, and glibc then raises
# its mmap threshold so that later ones come from the heap without page
# faults.  Start in that state: otherwise the first group to use a size pays
# for fresh mappings (course Adam at 1e5: 370 us instead of 130 us) and a
# group's NumPy time depends on which groups ran before it.
_warm = np.empty(2**23, np.uint8)
del _warm

_inputs = {}


def inputs(n):
    """Random param/grad and small positive states, generated once per size."""
    if n not in _inputs:
        rng = np.random.default_rng(n)
        _inputs[n] = [rng.standard_normal(n, dtype=DTYPE) for _ in range(2)] + [
            np.abs(rng.standard_normal(n, dtype=DTYPE)) * 1e-2 for _ in range(2)]
    return _inputs[n]


def fresh(n, nstates):
    """param, grad and `nstates` state arrays, copies of the shared inputs."""
    p, g, s1, s2 = inputs(n)
    return [p.copy(), g.copy()] + [s.copy() for s in (s1, s2)[:nstates]]


# ------------------------------------------------------------------ Adam ---

def adam_numpy(s, adamw=False):
    """Course Adam (adamw: decoupled weight decay first)."""
    if adamw:
        s["p"] -= LR * WD * s["p"]
    s["m"] = B1 * s["m"] + (1 - B1) * s["g"]
    s["v"] = B2 * s["v"] + (1 - B2) * s["g"] ** 2
    m_hat = s["m"] / (1 - B1 ** STEP)
    v_hat = s["v"] / (1 - B2 ** STEP)
    s["p"] -= LR * m_hat / (np.sqrt(v_hat) + EPS)


def adam_inplace(s, adamw=False):
    p, g, m, v, t = s["p"], s["g"], s["m"], s["v"], s["tmp"]
    if adamw:
        p *= DTYPE(1 - LR * WD)
    m *= DTYPE(B1)
    np.multiply(g, DTYPE(1 - B1), out=t)
    m += t
    v *= DTYPE(B2)
    np.multiply(g, g, out=t)
    t *= DTYPE(1 - B2)
    v += t
    np.sqrt(v, out=t)
    t *= DTYPE(1 / math.sqrt(1 - B2 ** STEP))
    t += DTYPE(EPS)
    np.divide(m, t, out=t)
    t *= DTYPE(LR / (1 - B1 ** STEP))
    p -= t


def adam_fastopt(s, adamw=False):
    if adamw:
        fastopt.adamw_step(s["p"], s["g"], s["m"], s["v"], step=STEP, lr=LR, betas=(B1, B2),
                           eps=EPS, weight_decay=WD)
    else:
        fastopt.adam_step(s["p"], s["g"], s["m"], s["v"], step=STEP, lr=LR, betas=(B1, B2),
                          eps=EPS)


# --------------------------------------------------------------- RMSprop ---

def rmsprop_numpy(s):
    s["v"] = ALPHA * s["v"] + (1 - ALPHA) * s["g"] ** 2
    s["p"] -= LR * s["g"] / (np.sqrt(s["v"]) + EPS)


def rmsprop_inplace(s):
    p, g, v, t = s["p"], s["g"], s["v"], s["tmp"]
    v *= DTYPE(ALPHA)
    np.multiply(g, g, out=t)
    t *= DTYPE(1 - ALPHA)
    v += t
    np.sqrt(v, out=t)
    t += DTYPE(EPS)
    np.divide(g, t, out=t)
    t *= DTYPE(LR)
    p -= t


def rmsprop_fastopt(s):
    fastopt.rmsprop_step(s["p"], s["g"], s["v"], lr=LR, alpha=ALPHA, eps=EPS)


# ---------------------------------------------- SGD with (course) momentum ---

def sgd_numpy(s):
    s["m"] = BETA * s["m"] + (1 - BETA) * s["g"]
    s["p"] -= LR * s["m"]


def sgd_inplace(s):
    p, g, m, t = s["p"], s["g"], s["m"], s["tmp"]
    m *= DTYPE(BETA)
    np.multiply(g, DTYPE(1 - BETA), out=t)
    m += t
    np.multiply(m, DTYPE(LR), out=t)
    p -= t


def sgd_fastopt(s):
    fastopt.sgd_step(s["p"], s["g"], s["m"], lr=LR, momentum=BETA, dampening=BETA)


# name: (state names after p, g; {member: update}; bytes moved per element)
OPTIMIZERS = {
    "adam": (["m", "v"], {"numpy": adam_numpy, "numpy_inplace": adam_inplace,
                          "fastopt": adam_fastopt}, 7),
    "adamw": (["m", "v"], {"numpy": lambda s: adam_numpy(s, True),
                           "numpy_inplace": lambda s: adam_inplace(s, True),
                           "fastopt": lambda s: adam_fastopt(s, True)}, 7),
    "rmsprop": (["v"], {"numpy": rmsprop_numpy, "numpy_inplace": rmsprop_inplace,
                        "fastopt": rmsprop_fastopt}, 5),
    "sgd_momentum": (["m"], {"numpy": sgd_numpy, "numpy_inplace": sgd_inplace,
                             "fastopt": sgd_fastopt}, 5),
}
MEMBERS = ["numpy", "numpy_inplace", "fastopt"]


def state(name, n):
    names, _, _ = OPTIMIZERS[name]
    arrays = fresh(n, len(names))
    s = dict(zip(["p", "g"] + names, arrays))
    s["tmp"] = np.empty(n, DTYPE)
    return s


_expected = {}


def course_update(name, size):
    """The state after one `numpy` update (kept for the group's other members)."""
    if (name, size) not in _expected:
        _expected.clear()
        s = state(name, SIZES[size])
        OPTIMIZERS[name][1]["numpy"](s)
        _expected[name, size] = s
    return _expected[name, size]


@pytest.mark.parametrize("member", MEMBERS)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_update(benchmark, name, size, member):
    n = SIZES[size]
    names, members, arrays_moved = OPTIMIZERS[name]
    update = members[member]
    # one update against the course code, from the same state
    expected = course_update(name, size)
    s = state(name, n)
    update(s)
    for key in ["p"] + names:
        np.testing.assert_allclose(s[key], expected[key], rtol=1e-5, atol=1e-7, err_msg=key)
    benchmark.group = f"{name}-{size}"
    benchmark.name = member
    benchmark(update, s)
    if benchmark.stats is not None:     # None under --benchmark-disable
        median = benchmark.stats.stats.median
        benchmark.extra_info["GB/s"] = round(arrays_moved * 4 * n / median / 1e9, 2)


@pytest.mark.parametrize("nbytes", [10**8])
def test_copy_probe(benchmark, nbytes):
    """Memory bandwidth probe: np.copyto, counting bytes read + bytes written."""
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    benchmark.group = "copy"
    benchmark.name = "np.copyto-1e8B"
    benchmark(np.copyto, dst, src)
    assert np.array_equal(dst, src)
    if benchmark.stats is not None:
        benchmark.extra_info["GB/s"] = round(2 * nbytes / benchmark.stats.stats.median / 1e9, 2)
