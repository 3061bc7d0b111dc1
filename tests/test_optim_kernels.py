"""The optimizer kernels against plain NumPy references written from the formulas
of torch.optim.Adam/AdamW, RMSprop and SGD (issue: fused optimizer kernels).

Each reference works in float64 on float64 copies of the inputs; float32 results
are compared with `tol(float32)`, float64 results tightly.
"""
import itertools
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fastopt
from conftest import DTYPES, SIZES, Snapshot, num_threads, tol

BIG = SIZES[-1]            # several threads, odd tail: only for a few combinations
SMALL_SIZES = SIZES[:-1]
MID = 1000                 # trajectories


# ------------------------------------------------------------- references ---

def adam_ref(p, g, m, v, vmax, *, step, lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
             weight_decay=0.0, decoupled_weight_decay=False, amsgrad=False,
             maximize=False):
    """torch.optim.Adam / AdamW, one step, in float64.  Returns new arrays."""
    b1, b2 = betas
    g = -g if maximize else g
    if decoupled_weight_decay:
        p = p * (1 - lr * weight_decay)
    else:
        g = g + weight_decay * p
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g**2
    v_used = v
    if amsgrad:
        vmax = np.maximum(vmax, v)      # propagates NaN like torch.maximum
        v_used = vmax
    bc1 = 1 - b1 ** step
    bc2 = 1 - b2 ** step
    p = p - (lr / bc1) * m / (np.sqrt(v_used) / np.sqrt(bc2) + eps)
    return p, m, v, vmax


def rmsprop_ref(p, g, sq, buf, gavg, *, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0,
                momentum=0.0, centered=False, maximize=False):
    """torch.optim.RMSprop, one step, in float64.  Returns new arrays."""
    g = -g if maximize else g
    g = g + weight_decay * p
    sq = alpha * sq + (1 - alpha) * g**2
    if centered:
        gavg = alpha * gavg + (1 - alpha) * g
        avg = np.sqrt(sq - gavg**2)
    else:
        avg = np.sqrt(sq)
    avg = avg + eps
    if momentum > 0:
        buf = momentum * buf + g / avg
        p = p - lr * buf
    else:
        p = p - lr * g / avg
    return p, sq, buf, gavg


def sgd_ref(p, g, buf, *, lr, momentum=0.0, dampening=0.0, nesterov=False,
            weight_decay=0.0, maximize=False, first_step=False):
    """torch.optim.SGD, one step, in float64.  Returns new arrays."""
    g = -g if maximize else g
    g = g + weight_decay * p
    if momentum > 0:
        buf = g.copy() if first_step else momentum * buf + (1 - dampening) * g
        g = g + momentum * buf if nesterov else buf
    p = p - lr * g
    return p, buf


# ------------------------------------------------------------ the cases ---
#
# An optimizer is described by its kernel, its reference, the names of its state
# arrays (in the order the reference takes and returns them) and how to pass the
# optional ones.  A case is (optimizer, options); `step` is added per call.

class Opt:
    def __init__(self, name, kernel, ref, states, optional):
        self.name, self.kernel, self.ref = name, kernel, ref
        self.states = states          # state array names, reference order
        self.optional = optional      # {state name: options -> is it used}

    def needed(self, opts):
        return [s for s in self.states if s not in self.optional or self.optional[s](opts)]

    def make(self, n, dtype, rng, opts, shape=None):
        """param, grad and every needed state (None for the others), random."""
        shape = (n,) if shape is None else shape
        r = lambda: rng.standard_normal(shape).astype(dtype)
        arrays = {"param": r(), "grad": r()}
        for s in self.states:
            arrays[s] = None
        for s in self.needed(opts):
            arrays[s] = r()
        # second moments are >= 0 (and >= grad_avg**2 for centered RMSprop)
        for s in ("exp_avg_sq", "max_exp_avg_sq", "square_avg"):
            if arrays.get(s) is not None:
                np.abs(arrays[s], out=arrays[s])     # (keeps 0-d arrays arrays)
        if arrays.get("grad_avg") is not None:
            # keep square_avg - grad_avg**2 away from 0, where float32 cancels
            arrays["square_avg"] += arrays["grad_avg"] ** 2 + 0.5
        return arrays

    def call(self, arrays, opts, step):
        """Run the kernel on `arrays` in place."""
        kw = dict(opts)
        if self.name.startswith("adam"):
            kw["step"] = step
            kw["max_exp_avg_sq"] = arrays["max_exp_avg_sq"]
            self.kernel(arrays["param"], arrays["grad"], arrays["exp_avg"],
                        arrays["exp_avg_sq"], **kw)
        elif self.name == "rmsprop":
            self.kernel(arrays["param"], arrays["grad"], arrays["square_avg"],
                        momentum_buffer=arrays["momentum_buffer"],
                        grad_avg=arrays["grad_avg"], **kw)
        else:
            self.kernel(arrays["param"], arrays["grad"], arrays["momentum_buffer"], **kw)

    def reference(self, arrays, opts, step):
        """New float64 arrays after one reference step (inputs untouched)."""
        a64 = {k: (None if a is None else a.astype(np.float64)) for k, a in arrays.items()}
        kw = dict(opts)
        if self.name.startswith("adam"):
            kw["step"] = step
        out = self.ref(a64["param"], a64["grad"], *(a64[s] for s in self.states), **kw)
        new = dict(a64)
        new.update(zip(["param"] + self.states, out))
        return new


ADAM = Opt("adam", fastopt.adam_step, adam_ref, ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"],
           {"max_exp_avg_sq": lambda o: o.get("amsgrad", False)})
RMSPROP = Opt("rmsprop", fastopt.rmsprop_step, rmsprop_ref,
              ["square_avg", "momentum_buffer", "grad_avg"],
              {"momentum_buffer": lambda o: o.get("momentum", 0) > 0,
               "grad_avg": lambda o: o.get("centered", False)})
SGD = Opt("sgd", fastopt.sgd_step, sgd_ref, ["momentum_buffer"],
          {"momentum_buffer": lambda o: o.get("momentum", 0) > 0})
OPTS = {o.name: o for o in (ADAM, RMSPROP, SGD)}


def adam_cases():
    for maximize, wd, amsgrad in itertools.product((False, True), ("none", "l2", "decoupled"),
                                                   (False, True)):
        opts = dict(lr=0.01, betas=(0.8, 0.95), eps=1e-6, maximize=maximize, amsgrad=amsgrad)
        if wd != "none":
            opts.update(weight_decay=0.1, decoupled_weight_decay=wd == "decoupled")
        yield "adam", opts


def rmsprop_cases():
    for maximize, wd, centered, momentum in itertools.product((False, True), (0.0, 0.1),
                                                              (False, True), (0.0, 0.9)):
        yield "rmsprop", dict(lr=0.01, alpha=0.9, eps=1e-6, maximize=maximize,
                              weight_decay=wd, centered=centered, momentum=momentum)


def sgd_cases():
    momenta = [dict(momentum=0.0)] + [
        dict(momentum=0.9, dampening=d, nesterov=n, first_step=f)
        for (d, n), f in itertools.product([(0.0, False), (0.5, False), (0.0, True)],
                                           (False, True))]
    for maximize, wd, mom in itertools.product((False, True), (0.0, 0.1), momenta):
        yield "sgd", dict(lr=0.1, maximize=maximize, weight_decay=wd, **mom)


CASES = [*adam_cases(), *rmsprop_cases(), *sgd_cases()]
# Every option switched on, one per optimizer: the cases that also run at BIG.
FULL = [("adam", dict(lr=0.01, weight_decay=0.1, amsgrad=True, maximize=True)),
        ("adam", dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True)),
        ("rmsprop", dict(lr=0.01, weight_decay=0.1, momentum=0.9, centered=True, maximize=True)),
        ("sgd", dict(lr=0.1, momentum=0.9, dampening=0.3, weight_decay=0.1, maximize=True)),
        ("sgd", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1))]


def case_id(case):
    name, opts = case
    return name + "-" + ",".join(f"{k}={v}" for k, v in opts.items() if k != "lr")


def step_tol(dtype):
    """Inputs are N(0, 1) (up to ~5 in a million samples) and a state such as
    mu*b + g/avg can cancel to ~0: float32's absolute error is then a few ulp
    of the terms (~1e-6), beyond conftest's atol."""
    return dict(tol(dtype), atol=5e-6) if dtype == np.float32 else tol(dtype)


def assert_matches(opt, arrays, expected, dtype, context="", **tolerance):
    tolerance = tolerance or step_tol(dtype)
    for key in ["param"] + opt.states:
        if arrays[key] is None:
            continue
        assert arrays[key].dtype == dtype
        np.testing.assert_allclose(arrays[key], expected[key], err_msg=f"{key} {context}",
                                   **tolerance)


def check_one_step(case, n, dtype, rng, step=3, shape=None, context=""):
    name, opts = case
    opt = OPTS[name]
    arrays = opt.make(n, dtype, rng, opts, shape)
    expected = opt.reference(arrays, opts, step)
    grad = Snapshot(arrays["grad"])
    opt.call(arrays, opts, step)
    grad.assert_unchanged()
    assert_matches(opt, arrays, expected, dtype, context=context)
    return arrays


# ------------------------------------------------------------------ tests ---

@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("dtype", DTYPES)
def test_one_step_matches_reference(case, dtype, rng):
    for n in SMALL_SIZES:               # one test per case: the suite stays fast
        check_one_step(case, n, dtype, rng, context=f"n={n}")


@pytest.mark.parametrize("case", FULL, ids=case_id)
@pytest.mark.parametrize("dtype", DTYPES)
def test_one_step_big(case, dtype, rng):
    check_one_step(case, BIG, dtype, rng)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_first_step(case, rng):
    """step=1: bias corrections 1 - beta**1, SGD's buffer set to g."""
    check_one_step(case, 33, np.float64, rng, step=1)


@pytest.mark.parametrize("case", FULL, ids=case_id)
@pytest.mark.parametrize("dtype", DTYPES)
def test_shapes(case, dtype, rng):
    """Multi-dimensional arrays (updated as their flat data) and 0-d arrays."""
    for shape in [(3, 5, 7), (2, 0), ()]:
        arrays = check_one_step(case, None, dtype, rng, shape=shape)
        assert arrays["param"].shape == shape


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("dtype", DTYPES)
def test_trajectory(case, dtype, rng):
    """100 steps with fresh gradients: no drift from the reference."""
    name, opts = case
    opt = OPTS[name]
    arrays = opt.make(MID, dtype, rng, opts)
    for s in opt.needed(opts):          # states start at zero, as in torch
        arrays[s][...] = 0
    expected = {k: None if a is None else a.astype(np.float64) for k, a in arrays.items()}
    for step in range(1, 101):
        arrays["grad"] = rng.standard_normal(MID).astype(dtype)
        expected["grad"] = arrays["grad"].astype(np.float64)
        step_opts = opts
        if name == "sgd":       # first_step: only the buffer's first update
            step_opts = dict(opts, first_step=opts.get("first_step", False) and step == 1)
        expected = opt.reference(expected, step_opts, step)
        opt.call(arrays, step_opts, step)
    # float32: 100 roundings of each state; compare against the float64 path
    tolerance = dict(rtol=1e-4, atol=1e-5) if dtype == np.float32 else tol(dtype)
    assert_matches(opt, arrays, expected, dtype, **tolerance)
    assert np.all(np.isfinite(arrays["param"]))


@pytest.mark.parametrize("case", FULL + [("sgd", dict(lr=0.1)), ("rmsprop", dict())],
                         ids=case_id)
@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_inf_grad_propagate(case, dtype, rng):
    """A NaN grad element makes that param element NaN; an Inf one makes it
    non-finite (as in PyTorch); the other elements are unaffected."""
    name, opts = case
    opt = OPTS[name]
    arrays = opt.make(40, dtype, rng, opts)
    nan_at, inf_at = [3, 17], [8, 33]
    arrays["grad"][nan_at] = np.nan
    arrays["grad"][inf_at] = [np.inf, -np.inf]
    with np.errstate(invalid="ignore", over="ignore"):
        expected = opt.reference(arrays, opts, 2)
    opt.call(arrays, opts, 2)
    assert_matches(opt, arrays, expected, dtype)   # NaN positions must agree too
    p = arrays["param"]
    assert np.all(np.isnan(p[nan_at]))
    assert not np.any(np.isfinite(p[inf_at]))
    finite = np.ones(40, bool)
    finite[nan_at + inf_at] = False
    assert np.all(np.isfinite(p[finite]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_amsgrad_nan_in_state_propagates(dtype, rng):
    """torch.maximum semantics: NaN in max_exp_avg_sq is kept, not replaced."""
    opts = dict(amsgrad=True)
    arrays = ADAM.make(16, dtype, rng, opts)
    arrays["max_exp_avg_sq"][5] = np.nan
    expected = ADAM.reference(arrays, opts, 4)
    ADAM.call(arrays, opts, 4)
    assert_matches(ADAM, arrays, expected, dtype)
    assert np.isnan(arrays["max_exp_avg_sq"][5]) and np.isnan(arrays["param"][5])


def test_empty_is_noop():
    """Size 0 with every option on: a no-op that accepts the empty states."""
    for name, opts in FULL:
        arrays = OPTS[name].make(0, np.float32, np.random.default_rng(0), opts)
        OPTS[name].call(arrays, opts, 1)
        assert arrays["param"].shape == (0,)


def test_adamw_is_adam_with_decoupled_decay(rng):
    """adamw_step == adam_step(decoupled_weight_decay=True), weight_decay 1e-2 by default."""
    base = ADAM.make(1001, np.float64, rng, dict(amsgrad=True))
    run = lambda f, **kw: _apply(f, base, step=5, amsgrad=True, **kw)
    adamw = run(fastopt.adamw_step)
    np.testing.assert_array_equal(
        adamw, run(fastopt.adam_step, decoupled_weight_decay=True, weight_decay=1e-2))
    assert not np.array_equal(adamw, run(fastopt.adam_step, decoupled_weight_decay=True))
    expected = ADAM.reference(base, dict(decoupled_weight_decay=True, weight_decay=1e-2,
                                         amsgrad=True), 5)["param"]
    np.testing.assert_allclose(adamw, expected, **tol(np.float64))
    np.testing.assert_array_equal(
        run(fastopt.adamw_step, weight_decay=0.3),
        run(fastopt.adam_step, decoupled_weight_decay=True, weight_decay=0.3))


def _apply(kernel, base, **kw):
    """Param after `kernel` on copies of the Adam arrays in `base`."""
    a = {k: None if v is None else v.copy() for k, v in base.items()}
    kernel(a["param"], a["grad"], a["exp_avg"], a["exp_avg_sq"],
           max_exp_avg_sq=a["max_exp_avg_sq"], **kw)
    return a["param"]


def test_sgd_momentum_zero_ignores_buffer(rng):
    """momentum=0 is plain SGD: a buffer passed anyway is neither read nor written."""
    p, g, buf = (rng.standard_normal(50) for _ in range(3))
    p_old, snap = p.copy(), Snapshot(buf)
    fastopt.sgd_step(p, g, buf, lr=0.5)
    snap.assert_unchanged()
    np.testing.assert_allclose(p, p_old - 0.5 * g, **tol(np.float64))


def test_course_momentum_mapping(rng):
    """The course's v = beta*v + (1-beta)*dW; W -= lr*v is dampening=beta."""
    beta, lr = 0.9, 0.05
    w, v = rng.standard_normal(100), np.zeros(100)
    w_ref, v_ref = w.copy(), v.copy()
    for _ in range(5):
        dw = rng.standard_normal(100)
        v_ref = beta * v_ref + (1 - beta) * dw
        w_ref = w_ref - lr * v_ref
        fastopt.sgd_step(w, dw, v, lr=lr, momentum=beta, dampening=beta)
    np.testing.assert_allclose(w, w_ref, **tol(np.float64))
    np.testing.assert_allclose(v, v_ref, **tol(np.float64))


# ------------------------------------------------------- threads -------------

@pytest.mark.parametrize("case", FULL, ids=case_id)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [300_007, 40_003])
def test_thread_count_does_not_change_results(case, dtype, n):
    """Bit-identical results on 1, 2 and 3 threads (3: an odd split; 40_003:
    just above the size where a second thread starts)."""
    name, opts = case
    opt = OPTS[name]
    base = opt.make(n, dtype, np.random.default_rng(7), opts)
    results = []
    for nt in (1, 2, 3):
        arrays = {k: None if a is None else a.copy() for k, a in base.items()}
        with num_threads(nt):
            assert fastopt.get_num_threads() == nt
            for step in (1, 2):
                opt.call(arrays, opts, step)
        results.append(arrays)
    for key in ["param"] + opt.needed(opts):
        np.testing.assert_array_equal(results[0][key], results[1][key], err_msg=key)
        np.testing.assert_array_equal(results[0][key], results[2][key], err_msg=key)


def test_python_threads_run_concurrently_and_match_serial():
    """Kernels release the GIL: several Python threads updating different arrays
    at once get exactly the serial results."""
    cases = FULL + [("adam", dict()), ("sgd", dict(lr=0.1)), ("rmsprop", dict())]
    sizes = [100_003, 1001, 50_001, 5]
    jobs = []
    for i, (name, opts) in enumerate(cases):
        arrays = OPTS[name].make(sizes[i % len(sizes)], np.float32,
                                 np.random.default_rng(i), opts)
        jobs.append((OPTS[name], opts, arrays))

    def run(job, barrier=None):
        opt, opts, arrays = job
        if barrier is not None:
            barrier.wait()
        for step in range(1, 11):
            opt.call(arrays, opts, step)

    serial = [{k: None if a is None else a.copy() for k, a in arrays.items()}
              for _, _, arrays in jobs]
    for (opt, opts, _), arrays in zip(jobs, serial):
        run((opt, opts, arrays))
    barrier = threading.Barrier(len(jobs))
    threads = [threading.Thread(target=run, args=(job, barrier)) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for (opt, opts, arrays), expected in zip(jobs, serial):
        for key in ["param"] + opt.needed(opts):
            np.testing.assert_array_equal(arrays[key], expected[key], err_msg=key)


@pytest.mark.parametrize("case", FULL, ids=case_id)
def test_no_temporary_arrays(case):
    """A step allocates nothing array-sized (numpy reports its allocations
    to tracemalloc)."""
    import tracemalloc
    name, opts = case
    opt = OPTS[name]
    arrays = opt.make(100_000, np.float32, np.random.default_rng(3), opts)
    opt.call(arrays, opts, 1)
    tracemalloc.start()
    try:
        for step in range(2, 6):
            opt.call(arrays, opts, step)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 10_000, peak           # 100_000 float32 elements = 400 kB


# ------------------------------------------------------ hypothesis -----------

def _assert_close_scaled(actual, expected, scale, rtol):
    """|actual - expected| <= rtol * (|expected| + scale), NaN where expected is."""
    nan = np.isnan(expected)
    np.testing.assert_array_equal(np.isnan(actual), nan)
    err = np.abs(actual - expected)[~nan]
    bound = rtol * (np.abs(expected) + scale)[~nan]
    assert np.all(err <= bound), (err.max(), bound.min())


unit = st.floats(0.0, 0.9999)
small_pos = st.floats(0.0, 1.0)
arrays_seed = st.tuples(st.integers(0, 40), st.integers(0, 2**32 - 1))


@settings(max_examples=60, deadline=None)
@given(size_seed=arrays_seed, lr=small_pos, b1=unit, b2=unit, eps=st.floats(1e-12, 1e-2),
       wd=small_pos, step=st.integers(1, 10**6), decoupled=st.booleans(),
       amsgrad=st.booleans(), maximize=st.booleans())
def test_adam_random_hyperparameters(size_seed, lr, b1, b2, eps, wd, step, decoupled,
                                     amsgrad, maximize):
    n, seed = size_seed
    opts = dict(lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd,
                decoupled_weight_decay=decoupled, amsgrad=amsgrad, maximize=maximize)
    _check_random(ADAM, n, seed, opts, step)


@settings(max_examples=60, deadline=None)
@given(size_seed=arrays_seed, lr=small_pos, alpha=unit, eps=st.floats(1e-12, 1e-2),
       wd=small_pos, momentum=st.sampled_from([0.0, 0.5, 0.99, 1.5]),
       centered=st.booleans(), maximize=st.booleans())
def test_rmsprop_random_hyperparameters(size_seed, lr, alpha, eps, wd, momentum, centered,
                                        maximize):
    n, seed = size_seed
    opts = dict(lr=lr, alpha=alpha, eps=eps, weight_decay=wd, momentum=momentum,
                centered=centered, maximize=maximize)
    _check_random(RMSPROP, n, seed, opts, 1)


@settings(max_examples=60, deadline=None)
@given(size_seed=arrays_seed, lr=st.floats(0.0, 10.0), momentum=st.floats(0.0, 2.0),
       dampening=st.floats(0.0, 1.0), nesterov=st.booleans(), wd=small_pos,
       maximize=st.booleans(), first=st.booleans())
def test_sgd_random_hyperparameters(size_seed, lr, momentum, dampening, nesterov, wd,
                                    maximize, first):
    n, seed = size_seed
    if nesterov:
        dampening = 0.0
        momentum = max(momentum, 0.1)
    opts = dict(lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov,
                weight_decay=wd, maximize=maximize, first_step=first)
    _check_random(SGD, n, seed, opts, 1)


def _check_random(opt, n, seed, opts, step):
    """float64 kernel vs reference; the error is measured against the size of
    the terms (param and its update), since param - update may cancel."""
    arrays = opt.make(n, np.float64, np.random.default_rng(seed), opts)
    with np.errstate(all="ignore"):
        expected = opt.reference(arrays, opts, step)
    old = arrays["param"].copy()
    opt.call(arrays, opts, step)
    scale = np.abs(old) + np.abs(expected["param"] - old)
    for key in ["param"] + opt.needed(opts):
        _assert_close_scaled(arrays[key], expected[key],
                             scale if key == "param" else np.abs(expected[key]), 1e-12)
