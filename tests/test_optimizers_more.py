"""fastopt.Adagrad, Adamax, NAdam, RAdam, Adadelta, ASGD, Rprop and Lion:
the optimizer objects.

Each is checked bit for bit against its functional kernel (itself checked
against NumPy references and torch in test_optim_kernels_more.py) applied
array by array, with the state started as the declaration says (Adagrad's
``sum`` at initial_accumulator_value, Rprop's ``step_size`` at lr, NAdam's
``mu_product`` at 1, ASGD's ``eta`` at lr and ``mu`` at 1); against
torch.optim's classes over many parameters and groups (Lion: a NumPy
reference written from its docstring); and through checkpoints, added
groups, LR schedules, 16-bit parameters, bfloat16 state, bad
hyperparameters and edits of ``opt.state``.
"""
import re

import numpy as np
import pytest

import fastopt
from conftest import Snapshot, num_threads
from fastopt import _kinds, _optim
from test_lowprec import step_key
from test_optim_kernels_more import KINDS as KERNELS
from test_optim_kernels_more import _outside, kernel_opts

try:
    import ml_dtypes
    BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:
    BF16 = None

needs_bf16 = pytest.mark.skipif(BF16 is None, reason="ml_dtypes not installed")
DTYPES = [np.float32, np.float64]
NAMES = ["Adagrad", "Adamax", "NAdam", "RAdam", "Adadelta", "ASGD", "Rprop", "Lion"]

# 0-d, empty, tiny, SIMD-tail and larger arrays; the first 4 in group 0,
# the rest in group 1.
SHAPES = [(), (0,), (1,), (17,), (3, 5), (1000,), (7, 1, 2)]
SPLIT = 4

# Every option of every kind (torch's names), more than one case where
# options interact.  ASGD's t0 is crossed within 20 steps; RAdam's default
# betas take the rho_t <= 5 branch for 5 steps, then the other.
CASES = [
    ("Adagrad", {}),
    ("Adagrad", dict(lr=0.1, lr_decay=0.05, weight_decay=0.1, initial_accumulator_value=0.3,
                     eps=1e-6)),
    ("Adagrad", dict(lr=0.05, maximize=True, initial_accumulator_value=1.0)),
    ("Adamax", {}),
    ("Adamax", dict(lr=0.01, betas=(0.8, 0.95), eps=1e-4, weight_decay=0.1, maximize=True)),
    ("Adamax", dict(lr=0.01, betas=(0.3, 0.9))),
    ("NAdam", {}),
    ("NAdam", dict(lr=0.01, betas=(0.8, 0.95), weight_decay=0.1, momentum_decay=0.05,
                   maximize=True)),
    ("NAdam", dict(lr=0.01, betas=(0.3, 0.9), weight_decay=0.1, decoupled_weight_decay=True,
                   eps=1e-6)),
    ("RAdam", {}),
    ("RAdam", dict(lr=0.01, betas=(0.8, 0.9), weight_decay=0.1, maximize=True)),
    ("RAdam", dict(lr=0.01, betas=(0.4, 0.99), weight_decay=0.1, decoupled_weight_decay=True,
                   eps=1e-6)),
    ("Adadelta", {}),
    ("Adadelta", dict(lr=0.5, rho=0.5, eps=1e-4, weight_decay=0.1, maximize=True)),
    ("Adadelta", dict(rho=1.0)),
    ("ASGD", {}),
    ("ASGD", dict(lr=0.05, lambd=0.1, alpha=0.5, t0=8, weight_decay=0.1)),
    ("ASGD", dict(lr=0.05, t0=-5, maximize=True)),
    ("Rprop", {}),
    ("Rprop", dict(lr=0.05, etas=(0.3, 1.1), step_sizes=(1e-3, 0.07), maximize=True)),
    ("Rprop", dict(etas=(0.7, 3.0), step_sizes=(0.02, 0.01))),      # min > max: clamp gives max
    ("Lion", {}),
    ("Lion", dict(lr=0.01, betas=(0.95, 0.98), weight_decay=0.5)),
    ("Lion", dict(lr=0.01, betas=(0.0, 0.5), weight_decay=0.1, maximize=True)),
]
# One case per kind with its options switched on: the bigger runs.
FULL = [CASES[i] for i in (1, 4, 8, 11, 13, 16, 19, 23)]
# What group 1 sets differently (the start values of the state among them).
GROUP1 = {
    "Adagrad": dict(lr=0.02, lr_decay=0.01, initial_accumulator_value=0.5),
    "Adamax": dict(lr=0.005, betas=(0.5, 0.9)),
    "NAdam": dict(lr=0.005, momentum_decay=0.01, weight_decay=0.05),
    "RAdam": dict(lr=0.002, betas=(0.5, 0.95)),
    "Adadelta": dict(lr=0.3, rho=0.8),
    "ASGD": dict(lr=0.03, t0=3, alpha=0.6),
    "Rprop": dict(lr=0.003, etas=(0.4, 1.3), step_sizes=(1e-4, 1.0)),
    "Lion": dict(lr=3e-4, betas=(0.8, 0.9), weight_decay=0.2),
}


def case_id(case):
    name, opts = case
    return name + "-" + (",".join(f"{k}={v}" for k, v in opts.items()) or "default")


def make_params(rng, shapes, dtype):
    return [np.asarray(rng.standard_normal(s)).astype(dtype) for s in shapes]


def make_grads(rng, params, t, dtype=None, none=()):
    """Gradients that change scale and sign from step to step, some elements
    exactly 0 (Rprop's sign rules); None at the indices in `none`."""
    out = []
    for i, p in enumerate(params):
        if i in none:
            out.append(None)
            continue
        g = np.asarray(rng.standard_normal(p.shape) * (0.5 + t % 3))
        if g.ndim:
            g.reshape(-1)[(t + i) % 11::11] = 0
        out.append(g.astype(dtype or p.dtype))
    return out


def none_at(t, n):
    """The parameters without a gradient at step t."""
    return {i for i in range(n) if (t + 2 * i) % 7 == 0}


def build(name, opts, params, split=SPLIT, **kw):
    """The optimizer of a case over two param groups (group 1 with GROUP1's changes)."""
    cls = getattr(fastopt, name)
    return cls([{"params": params[:split]}, {"params": params[split:], **GROUP1[name]}],
               **opts, **kw)


def hypers(group):
    return {k: v for k, v in group.items() if k not in ("params", "initial_lr")}


class Mirror:
    """Replays an optimizer's steps array by array with the functional
    kernel: the state starts as test_optim_kernels_more.py says torch starts
    it, and each array keeps its own step count and scalars.

    16-bit parameters (`masters`): the kernel steps the float32 master and
    writes the parameter.  `state_dtype="bfloat16"`: the state in bfloat16,
    stored by the kernel's bfloat16 variant with the optimizer's
    stochastic-rounding key of that parameter and step count."""

    def __init__(self, opt, params, state_dtype=None, rounding="stochastic", seed=0):
        self.name = type(opt).__name__
        self.kind = KERNELS[self.name]
        self.group_of = [gi for gi, g in enumerate(opt.param_groups) for _ in g["params"]]
        self.params = [p.copy() for p in params]
        self.masters = [p.astype(np.float32) if p.dtype.itemsize == 2 else None for p in params]
        self.arrays, self.scalars = [], []
        for p, gi in zip(params, self.group_of):
            h = hypers(opt.param_groups[gi])
            dtype = np.float32 if p.dtype.itemsize == 2 else p.dtype
            arrays = {s: np.full(p.shape, self.kind.init.get(s, lambda o: 0.0)(h), dtype)
                      for s in self.kind.states}
            if state_dtype is not None:
                arrays = {s: a.astype(BF16) for s, a in arrays.items()}
            self.arrays.append(arrays)
            # kept in float32, as torch keeps them (the kernel rounds them so too)
            self.scalars.append({k: float(np.float32(f(h))) for k, f in self.kind.scalars})
        self.steps = [0] * len(params)
        self.hook = {} if state_dtype is None else {
            "state": "bfloat16_sr" if rounding == "stochastic" else "bfloat16"}
        self.seed = seed

    def step(self, grads, groups):
        for i, g in enumerate(grads):
            if g is None:
                continue
            self.steps[i] += 1
            ko = kernel_opts(self.name, hypers(groups[self.group_of[i]]))
            hook = dict(self.hook)
            if hook:
                hook["key"] = step_key(self.seed, i, self.steps[i])
            arrays = dict(self.arrays[i], param=self.params[i])
            self.scalars[i] = self.kind.call(arrays, g, ko, self.steps[i], self.scalars[i],
                                             master=self.masters[i], **hook)

    def assert_same(self, opt, params, what=""):
        """Parameters, state arrays, scalars and step counts: equal bit for bit."""
        assert list(opt.steps) == self.steps, what
        for i, p in enumerate(params):
            at = f"{what} params[{i}]"
            assert_bits(p, self.params[i], at)
            st = opt.state[i]
            expected = set(self.kind.states) | set(self.scalars[i])
            if self.masters[i] is not None:
                expected.add("master_param")
                assert_bits(st["master_param"], self.masters[i], at + " master")
            assert set(st) == expected, at
            for s in self.kind.states:
                assert_bits(st[s], self.arrays[i][s], f"{at} state {s}")
            for k, v in self.scalars[i].items():
                assert st[k].dtype == np.float32 and st[k].shape == (), (at, k)
                assert float(st[k]) == v, (at, k)


def bits(a):
    a = np.ascontiguousarray(a)
    return a.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def assert_bits(a, b, what=""):
    """Equal bit for bit, dtypes and shapes included."""
    assert a.dtype == b.dtype and a.shape == b.shape, (what, a.dtype, b.dtype, a.shape, b.shape)
    np.testing.assert_array_equal(bits(a), bits(b), err_msg=what)


def train(opt, mirror, params, rng, steps, grad_dtype=None, start=0, before_step=None):
    for t in range(start, start + steps):
        if before_step is not None:
            before_step(t)
        grads = make_grads(rng, params, t, grad_dtype, none_at(t, len(params)))
        opt.step(grads)
        if mirror is not None:
            mirror.step(grads, opt.param_groups)


# ------------------------------------------------ vs the functional kernels ---

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_20_steps_are_the_functional_kernels_bits(case, dtype, rng):
    """Two groups, None gradients, 0-d and empty arrays: every array as its
    kernel steps it, with its own step count and scalars."""
    name, opts = case
    params = make_params(rng, SHAPES, dtype)
    opt = build(name, opts, params)
    mirror = Mirror(opt, params)
    mirror.assert_same(opt, params, "at the start")           # the declared start values
    train(opt, mirror, params, rng, 20)
    mirror.assert_same(opt, params)
    assert len(set(opt.steps.tolist())) > 1                   # None grads skipped some


@pytest.mark.parametrize("case", FULL, ids=case_id)
def test_threads_split_arrays_and_give_the_kernels_bits(case, rng):
    """More than 2 x 32768 elements: thread boundaries inside arrays, float32
    and float64 arrays in one call; 1 and 2 threads give the same bits."""
    name, opts = case
    shapes = [(66, 1000), (17,), (40_001,), (5,)]
    init = [p.astype(d) for p, d in zip(make_params(rng, shapes, np.float64),
                                        [np.float32, np.float64, np.float32, np.float64])]
    results = []
    for threads in (1, 2):
        params = [p.copy() for p in init]
        opt = build(name, opts, params, split=2)
        mirror = Mirror(opt, params)
        with num_threads(threads):
            train(opt, mirror, params, np.random.default_rng(1), 4)
        mirror.assert_same(opt, params, f"{threads} thread(s)")
        results.append(params)
    for a, b in zip(*results):
        assert_bits(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_hyperparameters_changed_between_steps_are_used(name, rng):
    """lr, weight decay... changed in param_groups between steps: each step
    uses the values it finds (Rprop's lr only starts the step sizes; ASGD's
    eta follows the current lr)."""
    params = make_params(rng, [(50,), (3, 4)], np.float64)
    opt = build(name, {}, params, split=1)
    mirror = Mirror(opt, params)
    number = {"Adagrad": "lr_decay", "Adamax": "eps", "NAdam": "momentum_decay",
              "RAdam": "eps", "Adadelta": "rho", "ASGD": "lambd", "Rprop": None,
              "Lion": "weight_decay"}[name]

    def change(t):
        opt.lr = 0.01 / (1 + t)
        if number:
            opt.param_groups[1][number] = [0.05, 0.1, 0.0][t % 3]
        if name == "Rprop":
            opt.param_groups[1]["etas"] = [(0.5, 1.2), (0.3, 1.5)][t % 2]
    train(opt, mirror, params, rng, 12, before_step=change)
    mirror.assert_same(opt, params)


def test_defaults_and_state_names_are_the_declared_ones():
    import inspect
    for name in NAMES:
        cls = getattr(fastopt, name)
        decl = _kinds.KINDS[name]
        assert cls._kind is decl
        sig = inspect.signature(cls)
        assert [h.name for h in decl.hypers] == [
            k for k in sig.parameters if k not in ("params", "state_dtype", "state_rounding",
                                                   "seed")], name
        for h in decl.hypers:
            assert sig.parameters[h.name].default == h.default, (name, h.name)
        opt = cls([np.zeros(3)])
        assert opt.defaults == decl.defaults()
        kernel = KERNELS[name]
        assert set(opt.state[0]) == set(kernel.states) | {k for k, _ in kernel.scalars}


# ------------------------------------------------------------ vs torch.optim ---

def torch_run(name, opts, params, grads_per_step, groups):
    """torch.optim.<name> over `params` (float64 copies) in the given groups."""
    torch = pytest.importorskip("torch")
    tp = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in params]
    tgroups = [{"params": tp[lo:hi], **extra} for (lo, hi), extra in groups]
    opt = getattr(torch.optim, name)(tgroups, **opts)
    for grads in grads_per_step:
        for p, g in zip(tp, grads):
            p.grad = None if g is None else torch.from_numpy(g.copy())
        opt.step()
    return [p.detach().numpy() for p in tp], [opt.state[p] for p in tp]


@pytest.mark.parametrize("case", [c for c in CASES if c[0] != "Lion"], ids=case_id)
def test_50_steps_match_torch(case, rng):
    """float64 over many parameters and two groups, with None gradients:
    parameters and state to rtol 1e-12 (torch contracts some of its
    operations into fused multiply-adds, fastopt does not), the scalars
    (mu_product, eta, mu) and step counts exactly."""
    pytest.importorskip("torch")
    name, opts = case
    shapes = [(), (1,), (17,), (3, 5), (1000,), (7, 1, 2)]
    params = make_params(rng, shapes, np.float64)
    init = [p.copy() for p in params]
    # torch.optim.Adagrad starts every sum at the constructor's
    # initial_accumulator_value, not at its group's (test_adagrad_starts_each_group_at_its_own_...)
    group1 = {k: v for k, v in GROUP1[name].items() if k != "initial_accumulator_value"}
    cls = getattr(fastopt, name)
    opt = cls([{"params": params[:3]}, {"params": params[3:], **group1}], **opts)
    steps = []
    for t in range(50):
        grads = make_grads(rng, params, t, none=none_at(t, len(params)))
        opt.step(grads)
        steps.append(grads)
    tparams, tstate = torch_run(name, opts, init, steps,
                                [((0, 3), {}), ((3, len(shapes)), group1)])
    for i, (p, q) in enumerate(zip(params, tparams)):
        np.testing.assert_allclose(p, q, rtol=1e-12, atol=1e-14, err_msg=f"params[{i}]")
        st, ts = opt.state[i], tstate[i]
        assert int(ts["step"]) == opt.steps[i]
        for k, v in st.items():
            theirs = ts[k].numpy()
            if v.ndim == 0 and k in dict(KERNELS[name].scalars):
                assert float(v) == float(theirs), (i, k)
            else:
                scale = np.sqrt(np.mean(theirs ** 2)) if theirs.size else 0.0
                np.testing.assert_allclose(v, theirs, rtol=1e-12, atol=1e-13 * scale,
                                           err_msg=f"state[{i}][{k!r}]")


def test_adagrad_starts_each_group_at_its_own_initial_accumulator_value():
    """A group's initial_accumulator_value starts its parameters' sums (as
    every other option of a group applies to its own parameters);
    torch.optim.Adagrad starts every sum at the constructor's value."""
    a, b = np.zeros(3), np.zeros(2)
    opt = fastopt.Adagrad([{"params": [a]}, {"params": [b], "initial_accumulator_value": 0.5}],
                          initial_accumulator_value=0.25)
    np.testing.assert_array_equal(opt.state[0]["sum"], [0.25] * 3)
    np.testing.assert_array_equal(opt.state[1]["sum"], [0.5] * 2)


def lion_reference(p, m, g, lr, betas, weight_decay, maximize):
    """Lion's update as its docstring writes it (float64, new arrays)."""
    b1, b2 = betas
    g = -g if maximize else g
    p = p * (1 - lr * weight_decay)
    p = p - lr * np.sign(b1 * m + (1 - b1) * g)
    m = b2 * m + (1 - b2) * g
    return p, m


@pytest.mark.parametrize("case", [c for c in CASES if c[0] == "Lion"], ids=case_id)
def test_lion_50_steps_match_its_formula(case, rng):
    name, opts = case
    params = make_params(rng, [(), (17,), (1000,), (3, 5)], np.float64)
    ref = [p.copy() for p in params]
    opt = build(name, opts, params, split=2)
    moments = [np.zeros_like(p) for p in params]
    for t in range(50):
        grads = make_grads(rng, params, t, none=none_at(t, len(params)))
        opt.step(grads)
        for i, g in enumerate(grads):
            if g is not None:
                h = opt.param_groups[0 if i < 2 else 1]
                ref[i], moments[i] = lion_reference(ref[i], moments[i], g, h["lr"], h["betas"],
                                                    h["weight_decay"], h["maximize"])
    for i, (p, q) in enumerate(zip(params, ref)):
        np.testing.assert_allclose(p, q, rtol=1e-12, atol=1e-14, err_msg=f"params[{i}]")
        np.testing.assert_allclose(opt.state[i]["exp_avg"], moments[i], rtol=1e-12,
                                   atol=1e-15)


# ---------------------------------------------------------------- checkpoints ---

@pytest.mark.parametrize("case", FULL, ids=case_id)
def test_checkpoint_round_trip_through_npz(case, tmp_path):
    """Saved after 10 steps (with an lr change), loaded into a new optimizer
    over the saved parameters: both go on with the same bits."""
    name, opts = case
    init = make_params(np.random.default_rng(0), SHAPES, np.float32)
    params = [p.copy() for p in init]
    opt = build(name, opts, params)
    train(opt, None, params, np.random.default_rng(1), 10)
    opt.param_groups[0]["lr"] *= 0.5
    sd = opt.state_dict()
    for i, st in enumerate(opt.state):
        for k, _ in KERNELS[name].scalars:
            assert sd[f"state.{i}.{k}"].dtype == np.float32 and sd[f"state.{i}.{k}"].shape == ()
    np.savez(tmp_path / "ckpt.npz", **sd)
    saved = [p.copy() for p in params]
    again = build(name, opts, saved)
    with np.load(tmp_path / "ckpt.npz") as f:
        again.load_state_dict(dict(f))
    assert again.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    train(opt, None, params, np.random.default_rng(2), 10, start=10)
    train(again, None, saved, np.random.default_rng(2), 10, start=10)
    for a, b in zip(params, saved):
        assert_bits(a, b)
    sd1, sd2 = opt.state_dict(), again.state_dict()
    assert sd1.keys() == sd2.keys()
    for k in sd1:
        if isinstance(sd1[k], np.ndarray):
            assert_bits(sd1[k], sd2[k], k)
        else:
            assert sd1[k] == sd2[k], k


@pytest.mark.parametrize("name", ["NAdam", "ASGD"])
def test_loading_a_bad_scalar_changes_nothing(name):
    params = make_params(np.random.default_rng(0), [(4,), (3,)], np.float64)
    opt = build(name, {}, params, split=1)
    train(opt, None, params, np.random.default_rng(1), 3)
    key = f"state.1.{KERNELS[name].scalars[0][0]}"
    before = opt.state_dict()
    snap = Snapshot(*params, *[a for st in opt.state for a in st.values()])
    for bad, msg in [(np.zeros(2, np.float32), r"must be an array of shape \(\) and dtype float32"),
                     (np.float64(0.5), "must be an array of shape"),
                     (np.array(0.5), "dtype float32"), (None, "")]:
        sd = dict(before)
        if bad is None:
            del sd[key]
            msg = f"missing '{key}'"
        else:
            sd[key] = bad
        with pytest.raises(ValueError, match=re.escape(key) + ".*" + msg if bad is not None
                           else msg):
            opt.load_state_dict(sd)
        snap.assert_unchanged()


# ------------------------------------------------------------ add_param_group ---

@pytest.mark.parametrize("name", NAMES)
def test_add_param_group_continues_like_one_optimizer_built_with_both(name, rng):
    """A gets group 1 after 5 steps; B has it from the start and skips it
    (None gradients) meanwhile.  The new group's state starts at its own
    start values (Adagrad: its initial_accumulator_value; Rprop, ASGD: its
    lr), the existing state is kept, and both go on with the same bits."""
    first, second = [(3, 5), (70_000,)], [(17,), ()]
    p1 = make_params(rng, first, np.float32)
    p2 = make_params(rng, second, np.float64)
    a1, a2 = [p.copy() for p in p1], [p.copy() for p in p2]
    b1, b2 = [p.copy() for p in p1], [p.copy() for p in p2]
    cls = getattr(fastopt, name)
    a = cls(a1)
    b = cls([{"params": b1}, {"params": b2, **GROUP1[name]}])
    for t in range(5):
        g = make_grads(rng, p1, t)
        a.step(g)
        b.step(g + [None, None])
    kept = [{k: v.copy() for k, v in st.items()} for st in a.state]
    a.add_param_group({"params": a2, **GROUP1[name]})
    assert [hypers(g) for g in a.param_groups] == [hypers(g) for g in b.param_groups]
    for old, new in zip(kept, a.state):
        for k in old:
            assert_bits(new[k], old[k], k)
    start = Mirror(b, b1 + b2)           # the declared start values of group 1
    for i in (2, 3):
        for s, arr in start.arrays[i].items():
            assert_bits(a.state[i][s], arr, s)
        for k, v in start.scalars[i].items():
            assert float(a.state[i][k]) == v, k
    for t in range(5, 10):
        g = make_grads(rng, p1 + p2, t)
        a.step(g)
        b.step(g)
    for x, y in zip(a1 + a2, b1 + b2):
        assert_bits(x, y)
    sda, sdb = a.state_dict(), b.state_dict()
    assert sda.keys() == sdb.keys()
    for k in sda:
        np.testing.assert_array_equal(sda[k], sdb[k], err_msg=k)


# --------------------------------------------------------------- LR schedules ---

@pytest.mark.parametrize("name", NAMES)
def test_lr_schedulers_drive_every_kind(name, rng):
    """A warm-up then cosine schedule over two groups: each step uses the lr
    the scheduler set, as the kernels given that lr do."""
    params = make_params(rng, [(40,), (3, 4), ()], np.float64)
    opt = build(name, {}, params, split=1)
    mirror = Mirror(opt, params)
    L = fastopt.lr_scheduler
    sched = L.SequentialLR(opt, [L.LinearLR(opt, start_factor=0.1, total_iters=4),
                                 L.CosineAnnealingLR(opt, T_max=8)], milestones=[4])
    lrs = []
    for t in range(12):
        grads = make_grads(rng, params, t)
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step(grads)
        mirror.step(grads, opt.param_groups)
        sched.step()
    mirror.assert_same(opt, params)
    base = [opt.defaults["lr"], GROUP1[name]["lr"]]
    assert lrs[0] == pytest.approx([0.1 * b for b in base])
    assert lrs[4] == pytest.approx(base)
    assert len({tuple(x) for x in lrs}) > 8


def test_asgd_eta_follows_the_scheduled_lr():
    """torch's ASGD recomputes eta from the group's current lr each step."""
    p = np.zeros(3)
    opt = fastopt.ASGD([p], lr=0.1, lambd=0.5, alpha=1.0)
    sched = fastopt.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for t in range(1, 4):
        lr = opt.param_groups[0]["lr"]
        opt.step([np.ones(3)])
        sched.step()
        assert float(opt.state[0]["eta"]) == float(np.float32(lr / (1 + 0.5 * lr * t)))


# ---------------------------------------------------------------- low precision ---

HALF = [pytest.param(np.float16, id="float16"),
        pytest.param("bfloat16", id="bfloat16", marks=needs_bf16)]


@pytest.mark.parametrize("grad_half", [False, True], ids=["grad32", "grad16"])
@pytest.mark.parametrize("pdtype", HALF)
@pytest.mark.parametrize("case", FULL, ids=case_id)
def test_half_params_are_the_kernels_with_master(case, pdtype, grad_half, rng):
    """float16/bfloat16 parameters: float32 masters and state, each step the
    functional kernel's with ``master=`` (a float32 step on the master, the
    parameter rounded to nearest), bit for bit."""
    name, opts = case
    dtype = np.dtype(np.float16) if pdtype is np.float16 else BF16
    shapes = SHAPES + [(5000,)]                     # several 1024-element blocks and a tail
    params = [p.astype(dtype) for p in make_params(rng, shapes, np.float32)]
    opt = build(name, opts, params)
    mirror = Mirror(opt, params)
    mirror.assert_same(opt, params, "at the start")
    train(opt, mirror, params, rng, 8, grad_dtype=dtype if grad_half else np.float32)
    mirror.assert_same(opt, params)


@needs_bf16
@pytest.mark.parametrize("rounding", ["stochastic", "nearest"])
@pytest.mark.parametrize("pdtype", [np.float32, np.float16, "bfloat16"],
                         ids=["f32params", "f16params", "bf16params"])
@pytest.mark.parametrize("case", FULL, ids=case_id)
def test_bfloat16_state_is_the_kernels_bfloat16_step(case, pdtype, rounding, rng):
    """state_dtype="bfloat16": the kernel's bfloat16-state step with the
    key of each parameter and step count (seed, index, count), bit for bit;
    the scalars stay float32."""
    name, opts = case
    dtype = BF16 if pdtype == "bfloat16" else np.dtype(pdtype)
    params = [p.astype(dtype) for p in make_params(rng, SHAPES + [(5000,)], np.float32)]
    opt = build(name, opts, params, state_dtype="bfloat16", state_rounding=rounding, seed=77)
    mirror = Mirror(opt, params, state_dtype="bfloat16", rounding=rounding, seed=77)
    for st in opt.state:
        for k, a in st.items():
            want = BF16 if k in KERNELS[name].states else np.dtype(np.float32)
            assert a.dtype == want, k
    mirror.assert_same(opt, params, "at the start")
    train(opt, mirror, params, rng, 8, grad_dtype=np.float32)
    mirror.assert_same(opt, params)


@needs_bf16
@pytest.mark.parametrize("case", FULL, ids=case_id)
def test_bfloat16_state_stays_close_to_float32_state(case):
    """bfloat16 state (stochastic rounding) against float32 state over 30
    steps: the parameters stay close (Rprop's step sizes and ASGD's average
    keep ~3 significant digits); the same bits on 1 and 2 threads."""
    name, opts = case
    init = make_params(np.random.default_rng(3), [(70_001,), (17,), ()], np.float32)
    runs = {}
    for label, threads, kw in [("f32", 2, {}), ("bf16-1", 1, {"state_dtype": "bfloat16"}),
                               ("bf16-2", 2, {"state_dtype": "bfloat16"})]:
        params = [p.copy() for p in init]
        opt = build(name, opts, params, split=1, **kw)
        with num_threads(threads):
            train(opt, None, params, np.random.default_rng(4), 30)
        runs[label] = (params, opt)
    for a, b in zip(runs["bf16-1"][0], runs["bf16-2"][0]):
        assert_bits(a, b)
    for sa, sb in zip(runs["bf16-1"][1].state, runs["bf16-2"][1].state):
        for k in sa:
            assert_bits(sa[k], sb[k], k)
    rms = lambda x: float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))  # noqa: E731
    # Lion: a moment rounded across 0 flips the sign of one element's step
    # (2 lr): a few flips among 17 elements
    allowed = 0.1 if name == "Lion" else 0.02
    for i, (a, b) in enumerate(zip(runs["bf16-2"][0], runs["f32"][0])):
        assert rms(a - b) <= allowed * rms(b - init[i]), i      # against how far they moved
    for k, s32 in runs["f32"][1].state[0].items():
        # every state array (ASGD's average, Rprop's step sizes too) to
        # about bfloat16's precision (2**-8) over the run
        s16 = runs["bf16-2"][1].state[0][k].astype(np.float64)
        assert rms(s16 - s32) <= 0.02 * rms(s32), k


# --------------------------------------------------------- bad hyperparameters ---

# (kind, keyword, bad value, message at construction)
BAD_ARGUMENTS = [
    ("Rprop", "etas", (1.5, 1.2), r"etas.*\[0\] must be in \(0, 1\), got 1.5"),
    ("Rprop", "etas", (0.5, 1.0), r"etas.*\[1\] must be > 1, got 1.0"),
    ("Rprop", "etas", 0.5, r"^etas must be a tuple of two numbers"),
    ("Rprop", "step_sizes", (-1e-6, 50), r"^step_sizes\[0\] must be >= 0"),
    ("Adadelta", "rho", 1.5, r"^rho must be in \[0, 1\], got 1.5"),
    ("Adagrad", "lr", -1.0, r"^lr must be >= 0, got -1.0"),
    ("Adagrad", "lr_decay", -0.1, r"^lr_decay must be >= 0"),
    ("Adagrad", "initial_accumulator_value", -1.0, r"^initial_accumulator_value must be >= 0"),
    ("Adagrad", "eps", float("nan"), r"^eps must be"),
    ("Adamax", "betas", (0.9, 1.0), r"^betas\[1\] must be in \[0, 1\)"),
    ("NAdam", "momentum_decay", -1.0, r"^momentum_decay must be >= 0"),
    ("NAdam", "lr", "fast", r"^lr must be a real number"),
    ("RAdam", "weight_decay", -0.5, r"^weight_decay must be >= 0"),
    ("ASGD", "lambd", -1.0, r"^lambd must be >= 0"),
    ("ASGD", "alpha", -0.75, r"^alpha must be >= 0"),
    ("Lion", "betas", (1.0, 0.99), r"^betas\[0\] must be in \[0, 1\)"),
    ("Lion", "lr", float("inf"), r"^lr must be"),
]


@pytest.mark.parametrize("name,key,value,msg", BAD_ARGUMENTS,
                         ids=[f"{n}-{k}={v}" for n, k, v, _ in BAD_ARGUMENTS])
def test_bad_arguments_are_refused_at_construction(name, key, value, msg):
    p = np.arange(5.0)
    snap = Snapshot(p)
    with pytest.raises((ValueError, TypeError), match=msg):
        getattr(fastopt, name)([p], **{key: value})
    snap.assert_unchanged()


def test_constructor_errors_name_rprops_etas_as_the_argument():
    with pytest.raises(ValueError, match=r"^etas\[0\] must be in \(0, 1\), got 1.5"):
        fastopt.Rprop([np.zeros(3)], etas=(1.5, 1.2))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_t0_is_refused_as_not_finite(value):
    with pytest.raises(ValueError, match=r"^t0 must be finite"):
        fastopt.ASGD([np.zeros(3)], t0=value)


# (kind, group key, bad value, message at the step)
BAD_GROUPS = [
    ("Rprop", "etas", (1.5, 1.2), r"param_groups\[1\]\['etas'\]\[0\] must be in \(0, 1\)"),
    ("Rprop", "etas", (0.5, 0.9), r"param_groups\[1\]\['etas'\]\[1\] must be > 1"),
    ("Rprop", "step_sizes", (1e-6, -1.0), r"param_groups\[1\]\['step_sizes'\]\[1\] must be >= 0"),
    ("Rprop", "lr", -1.0, r"param_groups\[1\]\['lr'\] must be >= 0"),
    ("Adadelta", "rho", 1.5, r"param_groups\[1\]\['rho'\] must be in \[0, 1\]"),
    ("Adadelta", "lr", -1.0, r"param_groups\[1\]\['lr'\] must be >= 0"),
    ("Adagrad", "lr_decay", float("nan"), r"param_groups\[1\]\['lr_decay'\] must be finite"),
    ("Adagrad", "initial_accumulator_value", -1.0,
     r"param_groups\[1\]\['initial_accumulator_value'\] must be >= 0"),
    ("Adamax", "betas", 0.9, r"param_groups\[1\]\['betas'\] must be a tuple"),
    ("NAdam", "momentum_decay", -1.0, r"param_groups\[1\]\['momentum_decay'\] must be >= 0"),
    ("NAdam", "decoupled_weight_decay", "yes", r"param_groups\[1\]\['decoupled_weight_decay'\]"),
    ("RAdam", "betas", (0.9, 1.0), r"param_groups\[1\]\['betas'\]\[1\]"),
    ("ASGD", "t0", float("inf"), r"param_groups\[1\]\['t0'\] must be finite"),
    ("ASGD", "lambd", -1.0, r"param_groups\[1\]\['lambd'\] must be >= 0"),
    ("Lion", "weight_decay", -0.1, r"param_groups\[1\]\['weight_decay'\] must be >= 0"),
    ("Lion", "lr", "1e-4", r"param_groups\[1\]\['lr'\] must be a real number"),
]


@pytest.mark.parametrize("name,key,value,msg", BAD_GROUPS,
                         ids=[f"{n}-{k}={v}" for n, k, v, _ in BAD_GROUPS])
def test_bad_hyperparameters_at_a_step_change_nothing(name, key, value, msg, rng):
    """A bad value put in a group between steps: the step raises naming it
    and changes nothing (parameters, state, scalars, step counts)."""
    params = make_params(rng, [(4, 3), (5,), (6,)], np.float32)
    opt = build(name, {}, params, split=2)
    train(opt, None, params, rng, 2)
    before = opt.state_dict()
    snap = Snapshot(*params)
    opt.param_groups[1][key] = value
    with pytest.raises((ValueError, TypeError), match=msg):
        opt.step(make_grads(rng, params, 3))
    snap.assert_unchanged()
    after = opt.state_dict()
    for k in before:
        if k != f"param_groups.1.{key}":
            np.testing.assert_array_equal(np.asarray(before[k]), np.asarray(after[k]), err_msg=k)


@pytest.mark.parametrize("name", NAMES)
def test_the_native_check_enforces_every_declared_range(name):
    """Every number just outside its declared range (both numbers of a pair,
    each against its own range) is refused at the step, and nothing changes."""
    decl = _kinds.KINDS[name]
    opt = getattr(fastopt, name)([np.arange(5.0)])
    opt.step([np.ones(5)])
    before = opt.state_dict()
    for h in decl.hypers:
        if h.kind == "flag":
            continue
        for value, argname in _outside(decl, h):
            opt.param_groups[0][h.name] = value
            with pytest.raises(ValueError,
                               match=re.escape(f"param_groups[0][{h.name!r}]"
                                               + argname[len(h.name):]) + " must"):
                opt.step([np.ones(5)])
            opt.param_groups[0][h.name] = h.default
    after = opt.state_dict()
    for k in before:
        np.testing.assert_array_equal(np.asarray(before[k]), np.asarray(after[k]), err_msg=k)


# ----------------------------------------------------------------- state edits ---

# Cases whose start values are not zeros, and a changed lr before the restart.
EDIT_CASES = [("Adagrad", dict(initial_accumulator_value=0.3, lr_decay=0.1)),
              ("Rprop", dict(lr=0.05)), ("NAdam", dict(weight_decay=0.1)),
              ("ASGD", dict(lr=0.05, t0=2)), ("Adamax", {}), ("RAdam", {}),
              ("Adadelta", {}), ("Lion", {})]
EDIT_SHAPES = [(3, 4), (17,), (), (0,)]


def edit_setup(name, opts):
    rng = np.random.default_rng(0)
    ps = make_params(rng, EDIT_SHAPES, np.float64)
    qs = [p.copy() for p in ps]
    return ps, qs, getattr(fastopt, name)(ps, **opts), getattr(fastopt, name)(qs, **opts)


def both_steps(opts_and_params, n, seed):
    rng = np.random.default_rng(seed)
    for t in range(n):
        gs = make_grads(rng, opts_and_params[0][1], t)
        for o, _ in opts_and_params:
            o.step([g.copy() for g in gs])


@pytest.mark.parametrize("how", ["empty", "clear", "new_list"])
@pytest.mark.parametrize("name,opts", EDIT_CASES, ids=[n for n, _ in EDIT_CASES])
def test_emptied_entries_restart_from_the_declared_start_values(name, opts, how):
    """``opt.state[0] = {}`` restarts parameter 0 at step 0 with its state at
    the start values (sum = initial_accumulator_value, step_size = the
    group's lr as it is now, mu_product = 1, eta = the lr, mu = 1): as an
    optimizer loaded with those values."""
    ps, qs, a, b = edit_setup(name, opts)
    both_steps([(a, ps), (b, qs)], 4, 1)
    for o in (a, b):
        o.param_groups[0]["lr"] = o.param_groups[0]["lr"] * 0.5
    old = {k: v.copy() for k, v in a.state[0].items()}
    live = dict(a.state[0])
    if how == "empty":
        a.state[0] = {}
    elif how == "clear":
        a.state[0].clear()
    else:
        a.state = [{}] + list(a.state[1:])
    h = hypers(b.param_groups[0])
    sd = b.state_dict()
    kind = KERNELS[name]
    sd["state.0.step"] = 0
    for s in kind.states:
        sd[f"state.0.{s}"] = np.full(EDIT_SHAPES[0], kind.init.get(s, lambda o: 0.0)(h))
    for k, f in kind.scalars:
        sd[f"state.0.{k}"] = np.array(f(h), np.float32)
    b.load_state_dict(sd)
    both_steps([(a, ps), (b, qs)], 3, 2)
    for p, q in zip(ps, qs):
        assert_bits(p, q)
    np.testing.assert_array_equal(a.steps, b.steps)
    assert a.steps[0] == 3
    assert set(a.state[0]) == set(b.state[0])
    for k in a.state[0]:
        assert_bits(a.state[0][k], b.state[0][k], k)
    for k, v in live.items():            # the old arrays are left as they were
        assert_bits(v, old[k], k)


def test_the_restarted_state_is_the_declared_start(rng):
    """What an emptied entry holds after the next step's restart, before
    its update: checked at the restart itself (step with a None gradient)."""
    ps = make_params(rng, [(5,), (3,)], np.float64)
    for name, opts, want in [
            ("Adagrad", dict(initial_accumulator_value=0.3), {"sum": 0.3}),
            ("Rprop", dict(lr=0.05), {"step_size": 0.025, "prev": 0.0}),
            ("NAdam", {}, {"mu_product": 1.0, "exp_avg": 0.0, "exp_avg_sq": 0.0}),
            ("ASGD", dict(lr=0.05), {"eta": float(np.float32(0.025)), "mu": 1.0, "ax": 0.0})]:
        opt = getattr(fastopt, name)([p.copy() for p in ps], **opts)
        for t in range(3):
            opt.step(make_grads(rng, ps, t))
        opt.lr = opt.lr / 2
        opt.state[0] = {}
        opt.step([None, np.ones(3)])          # binds the edit; parameter 0 untouched
        assert opt.steps[0] == 0
        for k, v in want.items():
            arr = opt.state[0][k]
            assert arr.shape == ((5,) if arr.ndim else ())
            np.testing.assert_array_equal(arr, np.full(arr.shape, v, arr.dtype), err_msg=(name, k))


@pytest.mark.parametrize("name", ["NAdam", "ASGD"])
def test_assigned_scalar_arrays_are_used_in_place(name):
    """A 0-d float32 array assigned to mu_product (eta, mu) is read and
    updated in place by the next steps, as the loaded value would be."""
    ps, qs, a, b = edit_setup(name, dict(t0=1) if name == "ASGD" else {})
    both_steps([(a, ps), (b, qs)], 3, 1)
    mine = {}
    sd = b.state_dict()
    for k, _ in KERNELS[name].scalars:
        mine[k] = np.array(float(a.state[1][k]) * 0.5, np.float32)
        a.state[1][k] = mine[k]
        sd[f"state.1.{k}"] = mine[k].copy()
    b.load_state_dict(sd)
    both_steps([(a, ps), (b, qs)], 3, 2)
    for p, q in zip(ps, qs):
        assert_bits(p, q)
    for k, arr in mine.items():
        assert a.state[1][k] is arr
        assert_bits(arr, b.state[1][k], k)


BAD_SCALAR_EDITS = [
    (lambda st, k: st.update({k: 0.5}), TypeError, "must be a numpy.ndarray of one number"),
    (lambda st, k: st.update({k: np.zeros(2, np.float32)}), (TypeError, ValueError), ""),
    (lambda st, k: st.update({k: np.array(-0.5, np.float32)}), ValueError,
     "must be a finite number >= 0, got -0.5"),
    (lambda st, k: st.update({k: np.array(np.nan, np.float32)}), ValueError,
     "must be a finite number >= 0"),
    (lambda st, k: st.pop(k), ValueError, "has no"),
]


@pytest.mark.parametrize("name", ["NAdam", "ASGD"])
@pytest.mark.parametrize("k", range(len(BAD_SCALAR_EDITS)))
def test_bad_scalar_edits_are_refused_and_change_nothing(name, k):
    edit, exc, msg = BAD_SCALAR_EDITS[k]
    ps, _, a, _ = edit_setup(name, {})
    both_steps([(a, ps)], 2, 1)
    key = KERNELS[name].scalars[0][0]
    snap = Snapshot(*ps, *[v for st in a.state for v in st.values()])
    count = a.steps.copy()
    edit(a.state[1], key)
    with pytest.raises(exc, match=re.escape(f"state[1]") + ".*" + re.escape(msg)):
        a.step(make_grads(np.random.default_rng(5), ps, 0))
    snap.assert_unchanged()
    np.testing.assert_array_equal(a.steps, count)


@pytest.mark.parametrize("name", ["NAdam", "ASGD"])
def test_a_scalar_of_another_dtype_is_refused(name):
    ps, _, a, _ = edit_setup(name, {})
    both_steps([(a, ps)], 2, 1)
    key = KERNELS[name].scalars[0][0]
    snap = Snapshot(*ps, *[v for st in a.state for v in st.values()])
    a.state[1][key] = np.array(0.5)
    with pytest.raises(TypeError, match=re.escape(f"state[1][{key!r}]")):
        a.step(make_grads(np.random.default_rng(5), ps, 0))
    snap.assert_unchanged()


# ------------------------------------------------------------------ the rest ---

@pytest.mark.parametrize("case", FULL, ids=case_id)
def test_grad_scale_divides_the_gradients_as_they_are_read(case, rng):
    name, opts = case
    params = make_params(rng, SHAPES, np.float32)
    opt = build(name, opts, params)
    mirror = Mirror(opt, params)
    for t in range(4):
        grads = make_grads(rng, params, t, none=none_at(t, len(params)))
        scaled = [None if g is None else np.array(g * 1024, g.dtype) for g in grads]   # exact
        opt.step(scaled, grad_scale=1024.0)
        mirror.step(grads, opt.param_groups)
    mirror.assert_same(opt, params)
    before = opt.state_dict()
    bad = make_grads(rng, params, 9)
    bad[5][3] = np.inf
    opt.step(bad, grad_scale=2.0)
    assert opt.found_inf
    after = opt.state_dict()
    for k in before:
        np.testing.assert_array_equal(np.asarray(before[k]), np.asarray(after[k]), err_msg=k)


@pytest.mark.parametrize("name", NAMES)
def test_with_params_copies_groups_and_starts_the_state_again(name, rng):
    """The per-process optimizer of fastopt.distributed: the groups and the
    state layout of the original, at the start values, over other arrays."""
    params = make_params(rng, [(6,), (4,), ()], np.float64)
    opt = build(name, {}, params, split=1)
    train(opt, None, params, rng, 3)
    views = [np.zeros(2), np.zeros(0), np.zeros(())]
    new = opt.with_params(views)
    assert type(new) is type(opt)
    assert [hypers(g) for g in new.param_groups] == [hypers(g) for g in opt.param_groups]
    mirror = Mirror(new, views)
    mirror.assert_same(new, views, "at the start")
