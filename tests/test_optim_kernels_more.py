"""The functional kernels of Adagrad, Adamax, NAdam, RAdam, Adadelta, ASGD,
Rprop and Lion against NumPy references written from torch.optim's
single-tensor code (Lion: from the paper and optax.lion), and against
torch.optim itself.

The references compute in the arrays' own dtype, operation by operation in
torch's order, with each Python scalar cast to the dtype as torch casts it:
the kernels must match them bit for bit, in float32 and float64.  torch
itself contracts some of its operations into fused multiply-adds on CPUs
that have them (lerp_, add_ with alpha, addcmul_), which fastopt never does
(its results do not depend on the SIMD level): against torch, float64
trajectories agree to ~1e-12 and float32 ones to a few float32 ulps of the
values involved.
"""
import inspect
import math
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fastopt
from conftest import Snapshot, num_threads
from fastopt import _kinds, _optim

try:
    import ml_dtypes
    BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:
    BF16 = None

needs_bf16 = pytest.mark.skipif(BF16 is None, reason="ml_dtypes not installed")
DTYPES = [np.float32, np.float64]
SIZES = [1, 7, 17, 1000]          # SIMD tails; below the threaded grain
BIG = 100_003                     # several threads, odd tail


# ------------------------------------------------------------- references ---
# One step each, on arrays of one dtype; new arrays are returned.  Scalars
# are Python floats (doubles) computed as torch computes them; NumPy casts a
# Python float to the array's dtype as torch does.

def lerp(start, end, weight):
    """torch.lerp(start, end, weight) (weight a Python float)."""
    w = start.dtype.type(weight)
    if abs(w) < 0.5:
        return start + w * (end - start)
    return end - (end - start) * (1 - w)


def sign(x):
    """torch.sign: -1, 0 or 1; NaN gives 0."""
    return np.where(x > 0, 1, np.where(x < 0, -1, 0)).astype(x.dtype)


def l2(g, p, weight_decay):
    return g + weight_decay * p if weight_decay != 0 else g


def adagrad_ref(p, g, s, *, step, lr=1e-2, lr_decay=0.0, weight_decay=0.0, eps=1e-10,
                maximize=False):
    g = -g if maximize else g
    g = l2(g, p, weight_decay)
    clr = lr / (1 + (step - 1) * lr_decay)
    s = s + g * g
    p = p + (-clr) * g / (np.sqrt(s) + eps)
    return (p, s), {}


def adamax_ref(p, g, m, u, *, step, lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
               maximize=False):
    b1, b2 = betas
    g = -g if maximize else g
    g = l2(g, p, weight_decay)
    m = lerp(m, g, 1 - b1)
    u = np.maximum(u * b2, np.abs(g) + eps)
    clr = lr / (1 - b1 ** step)
    p = p + (-clr) * m / u
    return (p, m, u), {}


def nadam_ref(p, g, m, v, *, step, mu_product, lr=2e-3, betas=(0.9, 0.999), eps=1e-8,
              weight_decay=0.0, momentum_decay=4e-3, decoupled_weight_decay=False,
              maximize=False):
    b1, b2 = betas
    g = -g if maximize else g
    bc2 = 1 - b2 ** step
    if weight_decay != 0:
        if decoupled_weight_decay:
            p = p * (1 - lr * weight_decay)
        else:
            g = g + weight_decay * p
    mu = b1 * (1.0 - 0.5 * (0.96 ** (step * momentum_decay)))
    mu_next = b1 * (1.0 - 0.5 * (0.96 ** ((step + 1) * momentum_decay)))
    mu_product = float(np.float32(mu_product) * np.float32(mu))    # a float32 tensor in torch
    m = lerp(m, g, 1 - b1)
    v = v * b2 + (1 - b2) * g * g
    denom = np.sqrt(v / bc2) + eps
    mu_product_next = mu_product * mu_next
    p = p + (-lr * (1.0 - mu) / (1.0 - mu_product)) * g / denom
    p = p + ((-lr * mu_next) / (1.0 - mu_product_next)) * m / denom
    return (p, m, v), {"mu_product": mu_product}


def radam_ref(p, g, m, v, *, step, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
              decoupled_weight_decay=False, maximize=False):
    b1, b2 = betas
    g = -g if maximize else g
    if weight_decay != 0:
        if decoupled_weight_decay:
            p = p * (1 - lr * weight_decay)
        else:
            g = g + weight_decay * p
    m = lerp(m, g, 1 - b1)
    v = v * b2 + (1 - b2) * g * g
    bc1 = 1 - b1 ** step
    bc2 = 1 - b2 ** step
    bias_corrected = m / bc1
    rho_inf = 2 / (1 - b2) - 1
    rho_t = rho_inf - 2 * step * (b2 ** step) / bc2
    if rho_t > 5.0:
        rect = ((rho_t - 4) * (rho_t - 2) * rho_inf
                / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) ** 0.5
        adaptive = (1 / (np.sqrt(v) + eps)) * bc2 ** 0.5      # scalar / tensor: reciprocal * scalar
        p = p - bias_corrected * lr * adaptive * rect
    else:
        p = p - bias_corrected * lr
    return (p, m, v), {}


def adadelta_ref(p, g, sq, acc, *, lr=1.0, rho=0.9, eps=1e-6, weight_decay=0.0, maximize=False):
    g = -g if maximize else g
    g = l2(g, p, weight_decay)
    sq = sq * rho + (1 - rho) * g * g
    std = np.sqrt(sq + eps)
    delta = np.sqrt(acc + eps) / std * g
    acc = acc * rho + (1 - rho) * delta * delta
    p = p + (-lr) * delta
    return (p, sq, acc), {}


def asgd_ref(p, g, ax, *, step, eta, mu, lr=1e-2, lambd=1e-4, alpha=0.75, t0=1e6,
             weight_decay=0.0, maximize=False):
    g = -g if maximize else g
    g = l2(g, p, weight_decay)
    eta, mu = float(np.float32(eta)), float(np.float32(mu))      # float32 tensors in torch
    p = p * (1 - lambd * eta)
    p = p + (-eta) * g
    ax = ax + (p - ax) * mu if mu != 1 else p.copy()
    new_eta = float(np.float32(lr / ((1 + lambd * lr * step) ** alpha)))
    new_mu = float(np.float32(1 / max(1, step - t0)))
    return (p, ax), {"eta": new_eta, "mu": new_mu}


def rprop_ref(p, g, prev, step_size, *, etas=(0.5, 1.2), step_sizes=(1e-6, 50), maximize=False):
    etaminus, etaplus = etas
    smin, smax = step_sizes
    dt = p.dtype.type
    g = -g if maximize else g
    s = sign(g * prev)
    s = np.where(s > 0, dt(etaplus), s)
    s = np.where(s < 0, dt(etaminus), s)
    s = np.where(s == 0, dt(1), s)
    step_size = step_size * s
    step_size = np.minimum(np.maximum(step_size, smin), smax)    # torch.clamp: NaN stays
    g = np.where(s == dt(etaminus), dt(0), g)
    p = p + (-1 * sign(g)) * step_size
    return (p, g, step_size), {}


def lion_ref(p, g, m, *, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, maximize=False):
    b1, b2 = betas
    g = -g if maximize else g
    p = p * (1 - lr * weight_decay)
    c = b1 * m + (1 - b1) * g
    p = p - lr * np.where(c > 0, 1, np.where(c < 0, -1, c))     # sign; NaN stays NaN
    m = b2 * m + (1 - b2) * g
    return (p, m), {}


# ------------------------------------------------------------ the kinds ---

class Kind:
    """A functional kernel: its reference, state arrays (in kernel order) and
    how each starts, the per-parameter scalars it takes and returns, and
    whether it takes `step`."""

    def __init__(self, name, kernel, ref, states, *, init=None, scalars=(), step=True,
                 torch_name=None):
        self.name, self.kernel, self.ref, self.states = name, kernel, ref, states
        self.init = init or {}            # state name -> options -> its initial value
        self.scalars = scalars            # (name, options -> initial value)
        self.step = step
        self.torch_name = torch_name      # None: not in torch.optim
        self.decl = _kinds.KINDS[name]

    def start(self, n, dtype, opts, rng=None, shape=None):
        """param and every state array as at the start (the state as torch
        starts it; random if `rng`, to exercise more than the first steps)."""
        shape = (n,) if shape is None else shape
        rng = rng or np.random.default_rng(0)
        arrays = {"param": rng.standard_normal(shape).astype(dtype)}
        for s in self.states:
            arrays[s] = np.full(shape, self.init.get(s, lambda o: 0.0)(opts), dtype)
        scalars = {k: f(opts) for k, f in self.scalars}
        return arrays, scalars

    def randomize(self, arrays, rng):
        """Random state of plausible signs (second moments >= 0, Rprop's step sizes > 0)."""
        for s in self.states:
            x = rng.standard_normal(arrays[s].shape).astype(arrays[s].dtype)
            if s in ("sum", "exp_inf", "exp_avg_sq", "square_avg", "acc_delta", "step_size"):
                x = np.abs(x) * (0.01 if s == "step_size" else 1)
            arrays[s][...] = x

    def call(self, arrays, grad, opts, step, scalars, master=None, **hook):
        """One kernel step on `arrays` in place; returns the new scalars."""
        kw = dict(opts, **scalars)
        if self.step:
            kw["step"] = step
        if master is not None:
            kw["master"] = master
        args = [arrays["param"], grad] + [arrays[s] for s in self.states]
        if hook:
            out = _optim._stored_step(self.kernel, *args, **hook, **kw)
        else:
            out = self.kernel(*args, **kw)
        names = [k for k, _ in self.scalars]
        if not names:
            assert out is None
            return {}
        out = out if isinstance(out, tuple) else (out,)
        assert all(type(x) is float for x in out)
        return dict(zip(names, out))

    def reference(self, arrays, grad, opts, step, scalars):
        """New arrays and scalars after one reference step (inputs untouched)."""
        kw = dict(opts, **scalars)
        if self.step:
            kw["step"] = step
        new, new_scalars = self.ref(arrays["param"], grad, *(arrays[s] for s in self.states), **kw)
        return dict(zip(["param"] + self.states, new)), new_scalars


KINDS = {k.name: k for k in [
    Kind("Adagrad", fastopt.adagrad_step, adagrad_ref, ["sum"], torch_name="Adagrad",
         init={"sum": lambda o: o.get("initial_accumulator_value", 0.0)}),
    Kind("Adamax", fastopt.adamax_step, adamax_ref, ["exp_avg", "exp_inf"], torch_name="Adamax"),
    Kind("NAdam", fastopt.nadam_step, nadam_ref, ["exp_avg", "exp_avg_sq"], torch_name="NAdam",
         scalars=[("mu_product", lambda o: 1.0)]),
    Kind("RAdam", fastopt.radam_step, radam_ref, ["exp_avg", "exp_avg_sq"], torch_name="RAdam"),
    Kind("Adadelta", fastopt.adadelta_step, adadelta_ref, ["square_avg", "acc_delta"],
         step=False, torch_name="Adadelta"),
    Kind("ASGD", fastopt.asgd_step, asgd_ref, ["ax"], torch_name="ASGD",
         scalars=[("eta", lambda o: o.get("lr", 1e-2)), ("mu", lambda o: 1.0)]),
    Kind("Rprop", fastopt.rprop_step, rprop_ref, ["prev", "step_size"], step=False,
         torch_name="Rprop", init={"step_size": lambda o: o.get("lr", 1e-2)}),
    Kind("Lion", fastopt.lion_step, lion_ref, ["exp_avg"], step=False),
]}

# Options of the optimizer that are not the kernel's: the state's initial values.
NOT_KERNEL = {"Adagrad": {"initial_accumulator_value"}, "Rprop": {"lr"}}


def kernel_opts(name, opts):
    return {k: v for k, v in opts.items() if k not in NOT_KERNEL.get(name, ())}


# Every option, per kind (torch's names); more than one case where options interact.
CASES = [
    ("Adagrad", {}),
    ("Adagrad", dict(lr=0.1, lr_decay=0.05, weight_decay=0.1, initial_accumulator_value=0.3,
                     eps=1e-6)),
    ("Adagrad", dict(lr=0.05, maximize=True, initial_accumulator_value=1.0)),
    ("Adamax", {}),
    ("Adamax", dict(lr=0.01, betas=(0.8, 0.95), eps=1e-4, weight_decay=0.1, maximize=True)),
    ("Adamax", dict(lr=0.01, betas=(0.3, 0.9))),                # lerp with weight >= 0.5
    ("NAdam", {}),
    ("NAdam", dict(lr=0.01, betas=(0.8, 0.95), weight_decay=0.1, momentum_decay=0.05,
                   maximize=True)),
    ("NAdam", dict(lr=0.01, betas=(0.3, 0.9), weight_decay=0.1, decoupled_weight_decay=True,
                   eps=1e-6)),
    ("RAdam", {}),                                               # both branches within 50 steps
    ("RAdam", dict(lr=0.01, betas=(0.8, 0.9), weight_decay=0.1, maximize=True)),
    ("RAdam", dict(lr=0.01, betas=(0.4, 0.99), weight_decay=0.1, decoupled_weight_decay=True)),
    ("Adadelta", {}),
    ("Adadelta", dict(lr=0.5, rho=0.5, eps=1e-4, weight_decay=0.1, maximize=True)),
    ("Adadelta", dict(rho=1.0)),
    ("ASGD", {}),
    ("ASGD", dict(lr=0.05, lambd=0.1, alpha=0.5, t0=20, weight_decay=0.1)),   # t0 crossed
    ("ASGD", dict(lr=0.05, t0=-5, maximize=True)),               # averaging from the start
    ("Rprop", {}),
    ("Rprop", dict(lr=0.05, etas=(0.3, 1.1), step_sizes=(1e-3, 0.07), maximize=True)),
    ("Rprop", dict(etas=(0.7, 3.0), step_sizes=(0.02, 0.01))),   # min > max: clamp gives max
    ("Lion", {}),
    ("Lion", dict(lr=0.01, betas=(0.95, 0.98), weight_decay=0.5)),
    ("Lion", dict(lr=0.01, betas=(0.0, 0.5), weight_decay=0.1, maximize=True)),
]
# One case per kind with every option it has switched on: the bigger runs.
FULL = [CASES[i] for i in (1, 4, 8, 11, 13, 16, 19, 23)]


def case_id(case):
    name, opts = case
    return name + "-" + ",".join(f"{k}={v}" for k, v in opts.items())


def grads(n, dtype, steps, seed, shape=None, zeros=True):
    """Gradients that vary from step to step (scale and sign), some exactly 0."""
    rng = np.random.default_rng(seed)
    out = []
    for t in range(steps):
        g = np.asarray(rng.standard_normal((n,) if shape is None else shape) * (0.5 + (t % 3)))
        if g.ndim and zeros:
            g[..., ::11] = 0
        out.append(g.astype(dtype))
    return out


def assert_bits(actual, expected, what=""):
    """Equal bit for bit (NaN payloads aside; -0.0 == 0.0)."""
    assert actual.dtype == expected.dtype, what
    np.testing.assert_array_equal(actual, expected, err_msg=what, strict=True)


def run_both(kind, opts, n, dtype, steps, seed=0, randomize=True, shape=None):
    """`steps` kernel steps and reference steps from the same start; asserts
    the kernel's arrays and scalars equal the reference's at every step."""
    rng = np.random.default_rng(seed)
    arrays, scalars = kind.start(n, dtype, opts, rng, shape)
    if randomize:
        kind.randomize(arrays, rng)
    ko = kernel_opts(kind.name, opts)
    expected, exp_scalars = {k: v.copy() for k, v in arrays.items()}, dict(scalars)
    for t, g in enumerate(grads(n, dtype, steps, seed + 1, shape), 1):
        gsnap = Snapshot(g)
        with np.errstate(all="ignore"):
            expected, exp_scalars = kind.reference(expected, g, ko, t, exp_scalars)
        scalars = kind.call(arrays, g, ko, t, scalars)
        gsnap.assert_unchanged()
        for key in expected:
            assert_bits(arrays[key], expected[key], f"{key} at step {t}")
        assert scalars == exp_scalars, t
    return arrays


# ------------------------------------------------------- vs the references ---

@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference_bit_for_bit(case, dtype):
    name, opts = case
    for n in SIZES:
        run_both(KINDS[name], opts, n, dtype, steps=6, seed=n)


@pytest.mark.parametrize("case", FULL, ids=case_id)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference_threaded(case, dtype):
    name, opts = case
    run_both(KINDS[name], opts, BIG, dtype, steps=2)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_trajectory_from_the_initial_state(case):
    """50 steps from torch's initial state: RAdam crosses rho_t = 5, ASGD its
    t0, Rprop's signs change."""
    name, opts = case
    run_both(KINDS[name], opts, 257, np.float64, steps=50, randomize=False)
    run_both(KINDS[name], opts, 257, np.float32, steps=50, randomize=False)


@pytest.mark.parametrize("case", FULL, ids=case_id)
@pytest.mark.parametrize("dtype", DTYPES)
def test_shapes(case, dtype):
    """Multi-dimensional arrays (updated as their flat data), 0-d and empty ones."""
    name, opts = case
    for shape in [(3, 5, 7), (), (2, 0)]:
        arrays = run_both(KINDS[name], opts, None, dtype, steps=2, shape=shape)
        assert arrays["param"].shape == shape


def test_radam_takes_both_branches():
    """The default betas: rho_t <= 5 for the first 5 steps, > 5 after."""
    rho = lambda t, b2=0.999: (2 / (1 - b2) - 1) - 2 * t * b2**t / (1 - b2**t)
    assert [rho(t) > 5 for t in range(1, 8)] == [False] * 5 + [True] * 2


def test_asgd_crosses_t0():
    """eta and mu as torch computes them; mu leaves 1 after step t0 + 1."""
    kind = KINDS["ASGD"]
    arrays, scalars = kind.start(5, np.float64, {})
    mus = []
    for t in range(1, 8):
        scalars = kind.call(arrays, np.ones(5), dict(t0=3), t, scalars)
        mus.append(scalars["mu"])
    assert mus == [1.0] * 4 + [float(np.float32(0.5)), float(np.float32(1 / 3)), 0.25]


def test_rprop_sign_rules():
    """Same sign: step size * etaplus; opposite: * etaminus, the gradient
    treated as 0 (no move, prev = 0); a zero product: unchanged."""
    p = np.zeros(4)
    prev = np.array([1.0, 1.0, 0.0, -2.0])
    ss = np.full(4, 0.1)
    g = np.array([3.0, -3.0, 5.0, -1.0])
    fastopt.rprop_step(p, g, prev, ss, etas=(0.5, 1.2), step_sizes=(0.0, 1.0))
    np.testing.assert_array_equal(ss, [0.1 * 1.2, 0.1 * 0.5, 0.1, 0.1 * 1.2])
    np.testing.assert_array_equal(prev, [3.0, 0.0, 5.0, -1.0])
    np.testing.assert_array_equal(p, [-0.1 * 1.2, 0.0, -0.1, 0.1 * 1.2])


# ---------------------------------------------------------- vs torch.optim ---

torch_kinds = [c for c in CASES if KINDS[c[0]].torch_name]


def torch_trajectory(kind, opts, p0, gs):
    """torch.optim's optimizer on one tensor; its param and state after each step."""
    torch = pytest.importorskip("torch")
    tp = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    opt = getattr(torch.optim, kind.torch_name)([tp], **opts)
    for g in gs:
        tp.grad = torch.from_numpy(g.copy())
        opt.step()
        yield tp.detach().numpy(), opt.state[tp]


def ulps32(a, b, scale):
    """|a - b| in float32 ulps of max(|a|, |b|, scale) (scale: the size of the terms)."""
    m = np.maximum(np.maximum(np.abs(a), np.abs(b)), scale).astype(np.float32)
    return np.abs(a.astype(np.float64) - b) / np.spacing(m).astype(np.float64)


# float32 vs torch after 50 steps, in ulps of the terms (see ulps32): torch's
# fused multiply-adds round differently, and the differences propagate.
F32_ULPS = 32


@pytest.mark.parametrize("case", torch_kinds, ids=case_id)
@pytest.mark.parametrize("dtype", DTYPES)
def test_trajectory_matches_torch(case, dtype):
    torch = pytest.importorskip("torch")
    name, opts = case
    kind = KINDS[name]
    n, steps = 1000, 50
    arrays, scalars = kind.start(n, dtype, opts, np.random.default_rng(5))
    p0 = arrays["param"].copy()
    # (no zero gradients: with only weight decay left, a parameter bounces
    # around 0 in steps of ~lr, where any difference in the last bit grows)
    gs = grads(n, dtype, steps, 6, zeros=False)
    ko = kernel_opts(name, opts)
    for t, (g, (q, tstate)) in enumerate(zip(gs, torch_trajectory(kind, opts, p0, gs)), 1):
        scalars = kind.call(arrays, g, ko, t, scalars)
        # the per-parameter scalars: torch's float32 values, exactly
        for k, v in scalars.items():
            assert v == float(tstate[k]), (k, t)
        assert float(tstate["step"]) == t
    checks = [("param", arrays["param"], q)] + [(s, arrays[s], tstate[s].numpy())
                                                for s in kind.states]
    for what, mine, theirs in checks:
        assert mine.dtype == theirs.dtype == dtype
        np.testing.assert_array_equal(np.isnan(mine), np.isnan(theirs))
        # relative to the size of the values (a state's typical size: a
        # first moment or an average can cancel to ~0, where the last-bit
        # differences of its terms are all that is left)
        scale = np.abs(p0) if what == "param" else np.sqrt(np.mean(theirs.astype(float)**2))
        if dtype == np.float64:
            assert np.all(np.abs(mine - theirs) <= 1e-13 * (np.abs(theirs) + scale)), what
        else:
            assert ulps32(mine, theirs, scale).max() <= F32_ULPS, what


def test_lion_matches_its_definition_in_float64():
    """Lion is not in torch.optim: the update of optax.lion / the paper,
    written out once more, for a few steps from zero momentum."""
    rng = np.random.default_rng(9)
    p, m = rng.standard_normal(100), np.zeros(100)
    lr, b1, b2, wd = 0.01, 0.9, 0.99, 0.1
    q, mq = p.copy(), m.copy()
    for _ in range(5):
        g = rng.standard_normal(100)
        fastopt.lion_step(p, g, m, lr=lr, betas=(b1, b2), weight_decay=wd)
        update = np.sign(b1 * mq + (1 - b1) * g) + wd * q      # optax: sign(...) + wd * params
        q = q - lr * update
        mq = b2 * mq + (1 - b2) * g
    np.testing.assert_allclose(p, q, rtol=1e-14, atol=1e-15)
    np.testing.assert_array_equal(m, mq)


@pytest.mark.parametrize("name", [k for k in KINDS if KINDS[k].torch_name])
def test_nan_and_inf_gradients_as_torch(name):
    """A NaN or inf gradient element does to the parameter and the state
    what it does in torch (Rprop: sign(NaN) = 0, the parameter stays)."""
    kind = KINDS[name]
    n = 12
    arrays, scalars = kind.start(n, np.float64, {}, np.random.default_rng(2))
    p0 = arrays["param"].copy()
    gs = grads(n, np.float64, 3, 3)
    gs[1][[2, 5]] = np.nan
    gs[1][[3, 7]] = [np.inf, -np.inf]
    with np.errstate(all="ignore"):
        for t, (g, (q, tstate)) in enumerate(zip(gs, torch_trajectory(kind, {}, p0, gs)), 1):
            scalars = kind.call(arrays, g, {}, t, scalars)
            for key, theirs in [("param", q)] + [(s, tstate[s].numpy()) for s in kind.states]:
                mine = arrays[key]
                what = f"{key} at step {t}"
                np.testing.assert_array_equal(np.isnan(mine), np.isnan(theirs), err_msg=what)
                np.testing.assert_array_equal(np.isinf(mine), np.isinf(theirs), err_msg=what)
                fin = np.isfinite(theirs)
                np.testing.assert_allclose(mine[fin], theirs[fin], rtol=1e-12, atol=1e-15,
                                           err_msg=what)


# ---------------------------------------------------- the declarations ---

@pytest.mark.parametrize("name", list(KINDS))
def test_declaration_matches_the_kernel(name):
    """The declared state slots are the kernel's state arguments, in order,
    and the kernel's defaults are the declared ones."""
    kind = KINDS[name]
    decl = kind.decl
    params = inspect.signature(kind.kernel).parameters
    assert list(params)[2:2 + len(decl.slots)] == list(decl.slot_names) == kind.states
    for h in decl.hypers:
        if h.name in params:
            assert params[h.name].default == h.default, h.name
        else:
            assert h.name in NOT_KERNEL.get(name, ()), h.name
    for s in decl.slots:
        init = s.init if isinstance(s.init, float) else decl.hyper(s.init).default
        assert kind.init.get(s.name, lambda o: 0.0)({}) == init, s.name
    assert [(s.name, s.init) for s in decl.scalars] == [
        (k, {1.0: 1.0, 1e-2: "lr"}[f({})]) for k, f in kind.scalars]
    assert decl.counts_steps(decl.defaults())


@pytest.mark.parametrize("name", [k for k in KINDS if KINDS[k].torch_name])
def test_declared_defaults_are_torchs(name):
    torch = pytest.importorskip("torch")
    decl = KINDS[name].decl
    sig = inspect.signature(getattr(torch.optim, name))
    names = [h.name for h in decl.hypers]
    assert set(names) == set(sig.parameters) - {"params", "foreach", "differentiable",
                                                "capturable", "fused"}
    for h in decl.hypers:
        assert sig.parameters[h.name].default == h.default, h.name


def _outside(decl, h):
    """(value, argument name as the error names it) just outside h's range."""
    bounds = h.each if h.each is not None else (
        [_kinds.Bound(h.lo, h.hi, h.closed)] * (2 if h.kind == "pair" else 1))
    for k, b in enumerate(bounds):
        bad = [float("nan"), float("inf")]
        if math.isfinite(b.lo):
            bad += [b.lo - 1e-9 if b.lo != 0 else -1e-12] + ([b.lo] if b.lo_open else [])
        if math.isfinite(b.hi):
            bad.append(b.hi + 1e-9 if b.closed else b.hi)
        for v in bad:
            if h.kind == "pair":
                pair = list(h.default)
                pair[k] = v
                yield tuple(pair), f"{h.name}[{k}]"
            else:
                yield v, h.name


@pytest.mark.parametrize("name", list(KINDS))
def test_kernel_refuses_what_the_declaration_refuses(name):
    """Every number just outside its declared range is refused by the
    kernel with an error naming it, and nothing changes; the ends that are
    allowed are accepted."""
    kind = KINDS[name]
    params = inspect.signature(kind.kernel).parameters
    arrays, scalars = kind.start(5, np.float64, {})
    g = np.ones(5)
    snap = Snapshot(*arrays.values())
    for h in kind.decl.hypers:
        if h.kind == "flag" or h.name not in params:
            continue
        for value, argname in _outside(kind.decl, h):
            with pytest.raises(ValueError, match=r"^" + re.escape(argname) + r" must"):
                kind.call(arrays, g, {h.name: value}, 1, scalars)
            snap.assert_unchanged()
        if h.kind == "number" and h.closed and math.isfinite(h.hi):
            kind.call({k: v.copy() for k, v in arrays.items()}, g, {h.name: h.hi}, 1, scalars)


# ------------------------------------------------------------ threads ---

@pytest.mark.parametrize("case", FULL, ids=case_id)
@pytest.mark.parametrize("dtype", DTYPES)
def test_thread_count_does_not_change_results(case, dtype):
    name, opts = case
    kind = KINDS[name]
    ko = kernel_opts(name, opts)
    n = 300_007
    results = []
    for nt in (1, 2, 3):
        arrays, scalars = kind.start(n, dtype, opts, np.random.default_rng(7))
        with num_threads(nt):
            for t, g in enumerate(grads(n, dtype, 2, 8), 1):
                scalars = kind.call(arrays, g, ko, t, scalars)
        results.append(arrays)
    for key in results[0]:
        for r in results[1:]:
            assert_bits(r[key], results[0][key], key)


# --------------------------------------------------------- low precision ---

HALF = [pytest.param(np.float16, id="float16"),
        pytest.param("bfloat16", id="bfloat16", marks=needs_bf16)]


def half(d):
    return np.dtype(np.float16) if d is np.float16 else BF16


@pytest.mark.parametrize("case", FULL, ids=case_id)
@pytest.mark.parametrize("pdtype", HALF)
@pytest.mark.parametrize("grad_half", [False, True], ids=["grad32", "grad16"])
def test_half_params_are_a_float32_step_on_the_master(case, pdtype, grad_half):
    """A float16/bfloat16 param: its float32 master takes the float32 step
    (bit for bit), and the param is the master rounded to nearest even."""
    name, opts = case
    kind = KINDS[name]
    ko = kernel_opts(name, opts)
    pdtype = half(pdtype)
    n = 5000                                   # several 1024-element blocks, a tail
    arrays, scalars = kind.start(n, np.float32, opts, np.random.default_rng(11))
    param = arrays["param"].astype(pdtype)
    master = param.astype(np.float32)
    ref = {k: v.copy() for k, v in arrays.items()}
    ref["param"] = master.copy()
    del arrays["param"]
    ref_scalars = dict(scalars)
    for t, g in enumerate(grads(n, np.float32, 3, 12), 1):
        g16 = g.astype(pdtype)
        gk = g16 if grad_half else g
        scalars = kind.call(dict(arrays, param=param), gk, ko, t, scalars, master=master)
        ref_scalars = kind.call(ref, g16.astype(np.float32) if grad_half else g, ko, t, ref_scalars)
        assert scalars == ref_scalars
        assert_bits(master, ref["param"], f"master at step {t}")
        np.testing.assert_array_equal(param.view(np.uint16), master.astype(pdtype).view(np.uint16))
        for s in kind.states:
            assert_bits(arrays[s], ref[s], s)


def bf16_bits(x):
    return np.asarray(x, np.float32).view(np.uint32)


def to_bf16(x, rnd=None):
    """float32 -> bfloat16 bits: to nearest even, or stochastically with the
    high 16 bits of `rnd` (fastopt's rule: the top 16 bits of bits(x) + (rnd >> 16))."""
    x = np.asarray(x, np.float32)
    if rnd is None:
        return x.astype(BF16)
    b = bf16_bits(x)
    out = ((b.astype(np.uint64) + (rnd >> 16)) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    out[nan] = (b[nan] >> 16).astype(np.uint16) | 0x40
    return out.view(BF16)


@needs_bf16
@pytest.mark.parametrize("case", FULL, ids=case_id)
@pytest.mark.parametrize("rounding", ["bfloat16", "bfloat16_sr"])
def test_bfloat16_state_is_the_float32_step_rounded(case, rounding):
    """bfloat16 state: the step computes in float32 from the widened state,
    the param from the values as computed, and stores the state rounded
    (stochastically: element i of the first state array with the high 16
    bits of hash32(key + i), of the second with its low 16 bits)."""
    name, opts = case
    kind = KINDS[name]
    ko = kernel_opts(name, opts)
    n = 4099
    key = 0x9E3779B9
    arrays, scalars = kind.start(n, np.float32, opts, np.random.default_rng(13))
    kind.randomize(arrays, np.random.default_rng(14))
    states = {s: arrays[s].astype(BF16) for s in kind.states}
    r = _optim._hash32((np.uint32(key) + np.arange(n, dtype=np.uint32)).astype(np.uint32))
    rnds = [r.astype(np.uint64), ((r.astype(np.uint64) << 16) & 0xffffffff)]
    p = arrays["param"]
    for t, g in enumerate(grads(n, np.float32, 3, 15), 1):
        before = {"param": p.copy(), **{s: states[s].astype(np.float32) for s in kind.states}}
        exp, exp_scalars = kind.reference(before, g, ko, t, scalars)
        call = dict(param=p, **states)
        scalars = kind.call(call, g, ko, t, scalars, state=rounding, key=key)
        assert scalars == exp_scalars
        assert_bits(p, exp["param"], f"param at step {t}")
        for j, s in enumerate(kind.states):
            want = to_bf16(exp[s], rnds[j] if rounding == "bfloat16_sr" else None)
            np.testing.assert_array_equal(states[s].view(np.uint16), want.view(np.uint16),
                                          err_msg=f"{s} at step {t}")


@needs_bf16
@pytest.mark.parametrize("case", FULL, ids=case_id)
@pytest.mark.parametrize("pdtype", HALF)
@pytest.mark.parametrize("rounding", ["bfloat16", "bfloat16_sr"])
def test_half_params_with_bfloat16_state(case, pdtype, rounding):
    """Both at once (a 16-bit param's blocks with bfloat16 state): the master
    and the state as a float32 param's with the same state."""
    name, opts = case
    kind = KINDS[name]
    ko = kernel_opts(name, opts)
    pdtype = half(pdtype)
    n = 3000
    arrays, scalars = kind.start(n, np.float32, opts, np.random.default_rng(17))
    kind.randomize(arrays, np.random.default_rng(18))
    param = arrays["param"].astype(pdtype)
    master = param.astype(np.float32)
    states = {s: arrays[s].astype(BF16) for s in kind.states}
    ref = dict(param=master.copy(), **{s: a.copy() for s, a in states.items()})
    ref_scalars = dict(scalars)
    hook = dict(state=rounding, key=12345)
    for t, g in enumerate(grads(n, np.float32, 3, 19), 1):
        g16 = g.astype(pdtype)
        scalars = kind.call(dict(param=param, **states), g16, ko, t, scalars, master=master, **hook)
        ref_scalars = kind.call(ref, g16.astype(np.float32), ko, t, ref_scalars, **hook)
        assert scalars == ref_scalars
        assert_bits(master, ref["param"], f"master at step {t}")
        np.testing.assert_array_equal(param.view(np.uint16), master.astype(pdtype).view(np.uint16))
        for s in kind.states:
            np.testing.assert_array_equal(states[s].view(np.uint16), ref[s].view(np.uint16), s)


@pytest.mark.parametrize("case", FULL, ids=case_id)
@pytest.mark.parametrize("dtype", DTYPES)
def test_grad_scale_divides_the_gradient_as_it_is_read(case, dtype):
    """As an optimizer's loss-scaled step: g * (1/grad_scale), the
    reciprocal rounded to the dtype."""
    name, opts = case
    kind = KINDS[name]
    ko = kernel_opts(name, opts)
    scale = 1024.0 * 3
    arrays, scalars = kind.start(777, dtype, opts, np.random.default_rng(16))
    ref = {k: v.copy() for k, v in arrays.items()}
    ref_scalars = dict(scalars)
    for t, g in enumerate(grads(777, dtype, 3, 17), 1):
        big = (g * scale).astype(dtype)
        scalars = kind.call(arrays, big, ko, t, scalars, grad_scale=scale)
        ref_scalars = kind.call(ref, big * dtype(1 / scale), ko, t, ref_scalars)
        assert scalars == ref_scalars
        for key in arrays:
            assert_bits(arrays[key], ref[key], key)


def test_stored_step_hook_checks_its_arguments():
    p, g, s = np.zeros(3, np.float32), np.ones(3, np.float32), np.zeros(3, np.float32)
    with pytest.raises(ValueError, match="kernel must be one of"):
        _optim._stored_step(fastopt.adam_step, p, g, s, s.copy(), step=1)
    with pytest.raises(ValueError, match="state must be"):
        _optim._stored_step(fastopt.adagrad_step, p, g, s, step=1, state="float16")
    with pytest.raises(ValueError, match="grad_scale"):
        _optim._stored_step(fastopt.adagrad_step, p, g, s, step=1, grad_scale=0.0)
    if BF16 is not None:
        with pytest.raises(TypeError, match="bfloat16 state needs a float32 param"):
            _optim._stored_step(fastopt.adagrad_step, p, g, s, step=1, state="bfloat16")
        with pytest.raises(TypeError, match="bfloat16 state needs a float32 param"):
            _optim._stored_step(fastopt.adagrad_step, p.astype(np.float64), g.astype(np.float64),
                                s.astype(BF16), step=1, state="bfloat16")
    # plain again after the hook
    fastopt.adagrad_step(p, g, s, step=1)
    assert np.all(s == 1)


# ----------------------------------------------------------- bad input ---

def bad_calls(kind):
    """(description, arrays/kwargs change, exception, message) for one kind."""
    first = kind.states[0]
    yield "param int", dict(param=np.zeros(5, np.int64)), TypeError, r"^param must have dtype"
    yield "param list", dict(param=[0.0] * 5), TypeError, r"^param must be a numpy.ndarray"
    yield "grad dtype", dict(grad=np.ones(5, np.float32)), TypeError, r"^grad has dtype float32"
    yield "grad shape", dict(grad=np.ones(6)), ValueError, r"^grad has shape"
    yield "state dtype", {first: np.zeros(5, np.float32)}, TypeError, rf"^{first} has dtype float32"
    yield "state shape", {first: np.zeros((5, 1))}, ValueError, rf"^{first} has shape"
    yield "state strided", {first: np.zeros(10)[::2]}, ValueError, rf"^{first} must be C-contiguous"
    ro = np.zeros(5)
    ro.flags.writeable = False
    yield "state read-only", {first: ro}, ValueError, rf"^{first} is read-only"
    yield "param swapped", dict(param=np.zeros(5, ">f8")), TypeError, r"^param has dtype '>f8'"
    yield "param strided", dict(param=np.zeros(10)[::2]), ValueError, r"^param must be C-contiguous"
    yield ("master for float64", dict(master=np.zeros(5, np.float32)), ValueError,
           r"^master is only for")
    yield "overlap", "overlap", ValueError, rf"^param and {first} overlap in memory"
    yield "grad overlaps", "grad overlap", ValueError, rf"^grad and {first} overlap in memory"
    if kind.step:
        yield "step 0", dict(step=0), ValueError, r"^step must be >= 1"
        yield "step float", dict(step=1.0), TypeError, r"^step must be an integer"
        yield "step huge", dict(step=2**63), ValueError, r"^step must be at most"


@pytest.mark.parametrize("name", list(KINDS))
def test_bad_input_raises_and_changes_nothing(name):
    kind = KINDS[name]
    arrays, scalars = kind.start(5, np.float64, {}, np.random.default_rng(1))
    kind.randomize(arrays, np.random.default_rng(2))
    g = np.ones(5)
    snap = Snapshot(g, *arrays.values())
    for what, change, exc, msg in bad_calls(kind):
        a = dict(arrays)
        kw = dict(scalars)
        if kind.step:
            kw["step"] = 1
        gg = g
        if change == "overlap":
            a[kind.states[0]] = a["param"]
        elif change == "grad overlap":
            gg = a[kind.states[0]]
        else:
            for k, v in change.items():
                if k in a:
                    a[k] = v
                elif k == "grad":
                    gg = v
                else:
                    kw[k] = v
        args = [a["param"], gg] + [a[s] for s in kind.states]
        with pytest.raises(exc, match=msg):
            kind.kernel(*args, **kw)
        snap.assert_unchanged()


def test_bad_per_parameter_scalars_change_nothing():
    p, g, m, v = np.zeros(4), np.ones(4), np.zeros(4), np.zeros(4)
    snap = Snapshot(p, m, v)
    for bad, exc, msg in [(1.5, ValueError, r"^mu_product must be in \[0, 1\]"),
                          (-0.1, ValueError, r"^mu_product must be"),
                          (float("nan"), ValueError, r"^mu_product must be finite"),
                          ("1", TypeError, r"^mu_product must be a real number"),
                          (None, TypeError, r"^mu_product must be a real number")]:
        with pytest.raises(exc, match=msg):
            fastopt.nadam_step(p, g, m, v, step=1, mu_product=bad)
    with pytest.raises(TypeError, match="mu_product"):
        fastopt.nadam_step(p, g, m, v, step=1)             # required
    ax = np.zeros(4)
    for kw, msg in [(dict(eta=-1.0), r"^eta must be >= 0"),
                    (dict(eta=1e39), r"^eta = .* too large"),
                    (dict(mu=0.0 - 1e-9), r"^mu must be in"), (dict(mu=2.0), r"^mu must be in")]:
        with pytest.raises(ValueError, match=msg):
            fastopt.asgd_step(p, g, ax, step=1, **dict(dict(eta=0.01, mu=1.0), **kw))
    snap.assert_unchanged()
    assert not ax.any()


@pytest.mark.parametrize("name", list(KINDS))
def test_numbers_beyond_float32_are_refused_for_float32_arrays(name):
    """A hyperparameter the float32 loop casts must be a float32 number."""
    kind = KINDS[name]
    arrays, scalars = kind.start(4, np.float32, {})
    snap = Snapshot(*arrays.values())
    params = inspect.signature(kind.kernel).parameters
    casted = {"lr", "eps", "weight_decay", "etas", "step_sizes", "lambd"} & set(params)
    assert casted
    for h in casted:
        value = (0.5, 1e300) if h == "etas" else (1e-6, 1e300) if h == "step_sizes" else 1e300
        with pytest.raises(ValueError, match="too large for float32"):
            kind.call(arrays, np.ones(4, np.float32), {h: value}, 1, scalars)
        snap.assert_unchanged()
    # float64 arrays take them (but ASGD's lr: eta <= lr is kept in float32)
    a64, s64 = kind.start(4, np.float64, {})
    for h in casted - ({"lr"} if name == "ASGD" else set()):
        value = (0.5, 1e300) if h == "etas" else (1e-6, 1e300) if h == "step_sizes" else 1e300
        with np.errstate(all="ignore"):
            kind.call({k: v.copy() for k, v in a64.items()}, np.ones(4), {h: value}, 1, s64)
    if name == "ASGD":
        with pytest.raises(ValueError, match=r"^lr = 1e\+300 is too large for float32, the "
                                             "precision eta is kept in"):
            kind.call(a64, np.ones(4), {"lr": 1e300}, 1, s64)


def test_empty_arrays_are_a_noop():
    for name, opts in FULL:
        kind = KINDS[name]
        arrays, scalars = kind.start(0, np.float32, opts)
        kind.call(arrays, np.zeros(0, np.float32), kernel_opts(name, opts), 1, scalars)
        assert arrays["param"].shape == (0,)


@pytest.mark.parametrize("name", list(KINDS))
def test_grad_may_be_strided_or_swapped(name):
    """The gradient is only read: any layout and byte order (copied first)."""
    kind = KINDS[name]
    a1, s1 = kind.start(9, np.float64, {}, np.random.default_rng(3))
    a2 = {k: v.copy() for k, v in a1.items()}
    g = np.random.default_rng(4).standard_normal(18)
    kind.call(a1, g[::2].astype(">f8"), {}, 1, dict(s1))
    kind.call(a2, np.ascontiguousarray(g[::2]), {}, 1, dict(s1))
    for k in a1:
        assert_bits(a1[k], a2[k], k)


# ------------------------------------------------------------ hypothesis ---

unit = st.floats(0.0, 0.9999)
pos = st.floats(0.0, 2.0)


@st.composite
def random_case(draw):
    name = draw(st.sampled_from(list(KINDS)))
    common = dict(maximize=draw(st.booleans()))
    if name == "Adagrad":
        opts = dict(lr=draw(pos), lr_decay=draw(pos), weight_decay=draw(pos),
                    eps=draw(st.floats(0.0, 1e-2)), initial_accumulator_value=draw(pos))
    elif name in ("Adamax", "NAdam", "RAdam"):
        opts = dict(lr=draw(pos), betas=(draw(unit), draw(unit)), eps=draw(st.floats(1e-12, 1e-2)),
                    weight_decay=draw(pos))
        if name != "Adamax":
            opts["decoupled_weight_decay"] = draw(st.booleans())
        if name == "NAdam":
            opts["momentum_decay"] = draw(pos)
    elif name == "Adadelta":
        opts = dict(lr=draw(pos), rho=draw(st.floats(0.0, 1.0)), eps=draw(st.floats(1e-12, 1e-2)),
                    weight_decay=draw(pos))
    elif name == "ASGD":
        opts = dict(lr=draw(pos), lambd=draw(pos), alpha=draw(pos), t0=draw(st.floats(-10, 10)),
                    weight_decay=draw(pos))
    elif name == "Rprop":
        opts = dict(lr=draw(st.floats(1e-6, 1.0)), etas=(draw(st.floats(0.01, 0.99)),
                                                        draw(st.floats(1.01, 5.0))),
                    step_sizes=(draw(st.floats(0.0, 1e-2)), draw(st.floats(0.0, 10.0))))
    else:
        opts = dict(lr=draw(pos), betas=(draw(unit), draw(unit)), weight_decay=draw(pos))
    return name, dict(opts, **common)


@settings(max_examples=150, deadline=None)
@given(case=random_case(), n=st.integers(0, 40), dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 2**32 - 1))
def test_random_hyperparameters_match_reference(case, n, dtype, seed):
    name, opts = case
    run_both(KINDS[name], opts, n, dtype, steps=3, seed=seed)
