"""fastopt.SGD / RMSprop / Adam / AdamW, add_param_group, clip_grad_norm_ and
clip_grad_value_.

Optimizer objects are checked two ways over 100-step trajectories:
bit-for-bit against the functional kernels applied array by array, and
against a float64 NumPy reference written from PyTorch's formulas.
"""
import re

import numpy as np
import pytest

import fastopt
from conftest import DTYPES, Snapshot, num_threads, tol

# 0-d, empty, tiny and SIMD-tail arrays, plus one large enough that the
# element split puts a thread boundary inside an array (> 2 x 32768 in all).
SMALL_SHAPES = [(), (0,), (1,), (17,), (3, 5), (7, 1, 2)]
BIG_SHAPES = SMALL_SHAPES + [(66, 1000), (9,)]

CASES = [
    (fastopt.Adam, {}),
    (fastopt.Adam, {"weight_decay": 0.1, "lr": 1e-2}),
    (fastopt.Adam, {"amsgrad": True, "betas": (0.8, 0.9)}),
    (fastopt.Adam, {"maximize": True, "weight_decay": 0.01, "eps": 1e-3}),
    (fastopt.Adam, {"decoupled_weight_decay": True, "weight_decay": 0.1}),
    (fastopt.AdamW, {"lr": 1e-2}),
    (fastopt.AdamW, {"amsgrad": True, "maximize": True}),
    (fastopt.RMSprop, {}),
    (fastopt.RMSprop, {"momentum": 0.9, "lr": 1e-3}),
    (fastopt.RMSprop, {"centered": True, "alpha": 0.9}),
    (fastopt.RMSprop, {"centered": True, "momentum": 0.5, "weight_decay": 0.1, "maximize": True}),
    (fastopt.SGD, {"lr": 0.1}),
    (fastopt.SGD, {"lr": 0.1, "momentum": 0.9}),
    (fastopt.SGD, {"lr": 0.1, "momentum": 0.9, "dampening": 0.9}),
    (fastopt.SGD, {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}),
    (fastopt.SGD, {"lr": 0.1, "momentum": 0.5, "maximize": True, "weight_decay": 0.1}),
]
CASE_IDS = [f"{cls.__name__}-{'-'.join(f'{k}={v}' for k, v in kw.items()) or 'default'}"
            for cls, kw in CASES]


def make_params(rng, shapes, dtype):
    return [rng.standard_normal(s).astype(dtype) for s in shapes]


def make_grads(rng, params):
    return [rng.standard_normal(p.shape).astype(p.dtype) for p in params]


def kind_of(opt):
    return {"Adam": "adam", "AdamW": "adam", "RMSprop": "rmsprop", "SGD": "sgd"}[type(opt).__name__]


def new_state(kind, p, h):
    """The state arrays an optimizer with hyperparameters h keeps for p."""
    z = lambda: np.zeros_like(p)  # noqa: E731
    if kind == "adam":
        st = {"exp_avg": z(), "exp_avg_sq": z()}
        if h["amsgrad"]:
            st["max_exp_avg_sq"] = z()
    elif kind == "rmsprop":
        st = {"square_avg": z()}
        if h["momentum"] > 0:
            st["momentum_buffer"] = z()
        if h["centered"]:
            st["grad_avg"] = z()
    else:
        st = {"momentum_buffer": z()} if h["momentum"] else {}
    return st


def functional_step(kind, p, g, st, step, h):
    """One update of p with fastopt's functional kernels (step counts from 1)."""
    if kind == "adam":
        fastopt.adam_step(p, g, st["exp_avg"], st["exp_avg_sq"], step=step, lr=h["lr"],
                          betas=h["betas"], eps=h["eps"], weight_decay=h["weight_decay"],
                          decoupled_weight_decay=h["decoupled_weight_decay"],
                          amsgrad=h["amsgrad"], max_exp_avg_sq=st.get("max_exp_avg_sq"),
                          maximize=h["maximize"])
    elif kind == "rmsprop":
        fastopt.rmsprop_step(p, g, st["square_avg"], lr=h["lr"], alpha=h["alpha"], eps=h["eps"],
                             weight_decay=h["weight_decay"], momentum=h["momentum"],
                             momentum_buffer=st.get("momentum_buffer"), centered=h["centered"],
                             grad_avg=st.get("grad_avg"), maximize=h["maximize"])
    else:
        fastopt.sgd_step(p, g, st.get("momentum_buffer"), lr=h["lr"], momentum=h["momentum"],
                         dampening=h["dampening"], nesterov=h["nesterov"],
                         weight_decay=h["weight_decay"], maximize=h["maximize"],
                         first_step=step == 1)


def reference_step(kind, p, g, st, step, h):
    """PyTorch's update rules in NumPy (float64 arrays, in place)."""
    g = -g if h["maximize"] else g.copy()
    if kind == "adam":
        lr, (b1, b2), wd = h["lr"], h["betas"], h["weight_decay"]
        if h["decoupled_weight_decay"]:
            p *= 1 - lr * wd
        else:
            g += wd * p
        m, v = st["exp_avg"], st["exp_avg_sq"]
        m[...] = b1 * m + (1 - b1) * g
        v[...] = b2 * v + (1 - b2) * g * g
        if h["amsgrad"]:
            np.maximum(st["max_exp_avg_sq"], v, out=st["max_exp_avg_sq"])
            v = st["max_exp_avg_sq"]
        bc1, bc2 = 1 - b1 ** step, 1 - b2 ** step
        p -= lr / bc1 * m / (np.sqrt(v) / np.sqrt(bc2) + h["eps"])
    elif kind == "rmsprop":
        a = h["alpha"]
        g += h["weight_decay"] * p
        sq = st["square_avg"]
        sq[...] = a * sq + (1 - a) * g * g
        if h["centered"]:
            ga = st["grad_avg"]
            ga[...] = a * ga + (1 - a) * g
            avg = np.sqrt(sq - ga * ga) + h["eps"]
        else:
            avg = np.sqrt(sq) + h["eps"]
        if h["momentum"] > 0:
            b = st["momentum_buffer"]
            b[...] = h["momentum"] * b + g / avg
            p -= h["lr"] * b
        else:
            p -= h["lr"] * g / avg
    else:
        g += h["weight_decay"] * p
        mu = h["momentum"]
        if mu:
            b = st["momentum_buffer"]
            b[...] = g if step == 1 else mu * b + (1 - h["dampening"]) * g
            g = g + mu * b if h["nesterov"] else b.copy()
        p -= h["lr"] * g


class Mirror:
    """Replays an optimizer's steps array by array with `step_fn`."""

    def __init__(self, opt, params, step_fn, dtype=None):
        self.kind = kind_of(opt)
        self.step_fn = step_fn
        self.params = [p.astype(dtype or p.dtype) for p in params]
        self.group_of = [gi for gi, g in enumerate(opt.param_groups) for _ in g["params"]]
        self.state = [new_state(self.kind, p, opt.param_groups[gi])
                      for p, gi in zip(self.params, self.group_of)]
        self.steps = [0] * len(params)

    def step(self, grads, groups):
        for i, g in enumerate(grads):
            if g is None:
                continue
            h = groups[self.group_of[i]]
            if self.kind != "sgd" or h["momentum"]:
                self.steps[i] += 1
            g = g.astype(self.params[i].dtype)
            self.step_fn(self.kind, self.params[i], g, self.state[i], self.steps[i], h)


def assert_same(opt, params, mirror):
    for i, (p, q) in enumerate(zip(params, mirror.params)):
        np.testing.assert_array_equal(p, q, err_msg=f"params[{i}]")
        for name, arr in opt.state[i].items():
            np.testing.assert_array_equal(arr, mirror.state[i][name], err_msg=f"state[{i}][{name}]")


# ------------------------------------------------------------ trajectories ---

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cls,kwargs", CASES, ids=CASE_IDS)
def test_100_steps_match_functional_kernels_and_numpy(cls, kwargs, dtype, rng):
    params = make_params(rng, SMALL_SHAPES, dtype)
    opt = cls(params, **kwargs)
    mirror = Mirror(opt, params, functional_step)
    ref = Mirror(opt, params, reference_step, dtype=np.float64)
    for _ in range(100):
        grads = make_grads(rng, params)
        opt.step(grads)
        mirror.step(grads, opt.param_groups)
        ref.step(grads, opt.param_groups)
    assert_same(opt, params, mirror)                       # bit for bit
    assert list(opt.steps) == mirror.steps
    t = tol(dtype) if dtype == np.float64 else dict(rtol=2e-4, atol=2e-5)
    for i, (p, q) in enumerate(zip(params, ref.params)):
        np.testing.assert_allclose(p, q, err_msg=f"params[{i}]", **t)
        for name, arr in opt.state[i].items():
            np.testing.assert_allclose(arr, ref.state[i][name], err_msg=f"state[{i}][{name}]", **t)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cls,kwargs", CASES, ids=CASE_IDS)
def test_threaded_split_across_arrays_matches_functional_kernels(cls, kwargs, dtype, rng):
    # > 65536 elements in all: two threads, one boundary inside the big array
    params = make_params(rng, BIG_SHAPES, dtype)
    opt = cls(params, **kwargs)
    mirror = Mirror(opt, params, functional_step)
    for _ in range(4):
        grads = make_grads(rng, params)
        opt.step(grads)
        mirror.step(grads, opt.param_groups)
    assert_same(opt, params, mirror)


@pytest.mark.parametrize("dampening", [0.0, 0.5])
def test_sgd_first_step_sets_buffer_to_gradient(dampening, rng):
    # torch.optim.SGD: the buffer is created as a copy of g (no dampening),
    # and later b = mu*b + (1 - dampening)*g.
    p = rng.standard_normal(10)
    opt = fastopt.SGD([p], lr=0.1, momentum=0.9, dampening=dampening, weight_decay=0.5)
    p0 = p.copy()
    g1, g2 = rng.standard_normal(10), rng.standard_normal(10)
    opt.step([g1])
    d1 = g1 + 0.5 * p0
    np.testing.assert_allclose(opt.state[0]["momentum_buffer"], d1, rtol=1e-15)
    np.testing.assert_allclose(p, p0 - 0.1 * d1, rtol=1e-15)
    p1 = p.copy()
    opt.step([g2])
    b2 = 0.9 * d1 + (1 - dampening) * (g2 + 0.5 * p1)
    np.testing.assert_allclose(opt.state[0]["momentum_buffer"], b2, rtol=1e-14)
    np.testing.assert_allclose(p, p1 - 0.1 * b2, rtol=1e-14)


def test_defaults_follow_pytorch():
    p = [np.zeros(3)]
    assert fastopt.SGD(p).defaults == dict(lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0,
                                           nesterov=False, maximize=False)
    assert fastopt.RMSprop(p).defaults == dict(lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0,
                                               momentum=0.0, centered=False, maximize=False)
    adam = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False,
                maximize=False, decoupled_weight_decay=False)
    assert fastopt.Adam(p).defaults == adam
    assert fastopt.AdamW(p).defaults == dict(adam, weight_decay=1e-2, decoupled_weight_decay=True)


def test_state_arrays_are_zeros_like_params(rng):
    params = make_params(rng, SMALL_SHAPES, np.float32)
    opt = fastopt.Adam(params, amsgrad=True)
    for p, st in zip(params, opt.state):
        assert set(st) == {"exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
        for a in st.values():
            assert a.shape == p.shape and a.dtype == p.dtype and a.flags.c_contiguous
            assert a.ctypes.data % 64 == 0 and a.flags.writeable
            assert not a.any()


# ------------------------------------------- groups, hyperparameters, skips ---

def test_param_groups_with_different_hyperparameters(rng):
    w = make_params(rng, [(40, 30), (30, 10)], np.float32)
    b = make_params(rng, [(30,), (10,)], np.float32)
    opt = fastopt.AdamW([{"params": w}, {"params": b, "weight_decay": 0.0, "lr": 1e-2,
                                         "betas": (0.5, 0.6)}], lr=3e-3)
    assert opt.param_groups[0]["weight_decay"] == 1e-2 and opt.param_groups[1]["lr"] == 1e-2
    params = w + b
    mirror = Mirror(opt, params, functional_step)
    for _ in range(100):
        grads = make_grads(rng, params)
        opt.step(grads)
        mirror.step(grads, opt.param_groups)
    assert_same(opt, params, mirror)


@pytest.mark.parametrize("cls,kwargs", [(fastopt.Adam, {}), (fastopt.RMSprop, {"momentum": 0.5}),
                                        (fastopt.SGD, {"momentum": 0.9})])
def test_hyperparameters_change_between_steps(cls, kwargs, rng):
    params = make_params(rng, [(50,), (3, 4)], np.float64)
    opt = cls([{"params": params[:1]}, {"params": params[1:]}], **kwargs)
    mirror = Mirror(opt, params, functional_step)
    for k in range(100):
        opt.lr = 1e-2 / (1 + k)
        assert opt.lr == 1e-2 / (1 + k)
        opt.param_groups[1]["weight_decay"] = 0.01 * (k % 3)
        if cls is fastopt.Adam:
            opt.param_groups[0]["betas"] = (0.9, 0.99 if k % 2 else 0.999)
        grads = make_grads(rng, params)
        opt.step(grads)
        mirror.step(grads, opt.param_groups)
    assert_same(opt, params, mirror)
    opt.param_groups[1]["lr"] = 0.5
    with pytest.raises(ValueError, match="different learning rates"):
        opt.lr


def test_none_grads_skip_params_and_their_step_counts(rng):
    params = make_params(rng, [(20,), (5,), (3, 3)], np.float32)
    opt = fastopt.Adam(params, lr=1e-2)
    mirror = Mirror(opt, params, functional_step)
    for k in range(30):
        grads = make_grads(rng, params)
        grads[k % 3] = None
        if k == 7:
            grads = [None, None, None]
        opt.step(grads)
        mirror.step(grads, opt.param_groups)
    assert list(opt.steps) == mirror.steps == [19, 20, 19]
    assert_same(opt, params, mirror)
    # step counts differ per array: bias corrections use each array's own count
    opt.step([make_grads(rng, params)[0], None, None])
    assert list(opt.steps) == [20, 20, 19]


def test_sgd_momentum_switched_off_keeps_first_step_rule(rng):
    # torch creates the buffer at the first update with momentum != 0.
    params = make_params(rng, [(8,)], np.float64)
    opt = fastopt.SGD(params, lr=0.1, momentum=0.9, dampening=0.3)
    mirror = Mirror(opt, params, functional_step)
    for k in range(6):
        opt.param_groups[0]["momentum"] = 0.0 if k < 2 else 0.9
        grads = make_grads(rng, params)
        opt.step(grads)
        mirror.step(grads, opt.param_groups)
    assert list(opt.steps) == [4]
    assert_same(opt, params, mirror)


def test_mixed_float32_and_float64_params(rng):
    params = make_params(rng, [(100,), (7,)], np.float32) + make_params(rng, [(40000,), (3,)], np.float64)
    params.append(rng.standard_normal(30000).astype(np.float32))
    opt = fastopt.Adam(params, lr=1e-2, amsgrad=True)
    mirror = Mirror(opt, params, functional_step)
    for _ in range(5):
        grads = make_grads(rng, params)
        opt.step(grads)
        mirror.step(grads, opt.param_groups)
    assert_same(opt, params, mirror)


def test_strided_grads_are_read_correctly(rng):
    params = make_params(rng, [(6, 5), (4,)], np.float32)
    opt = fastopt.Adam(params)
    mirror = Mirror(opt, params, functional_step)
    big = rng.standard_normal((6, 10)).astype(np.float32)
    grads = [big[:, ::2], rng.standard_normal(8).astype(np.float32)[::2]]
    assert not grads[0].flags.c_contiguous
    opt.step(grads)
    mirror.step([np.ascontiguousarray(g) for g in grads], opt.param_groups)
    assert_same(opt, params, mirror)


def test_tuple_of_grads_and_generator_params(rng):
    params = make_params(rng, [(5,), (6,)], np.float64)
    before = [p.copy() for p in params]
    opt = fastopt.SGD((p for p in params), lr=0.5)
    grads = tuple(make_grads(rng, params))
    opt.step(grads)
    for p, b, g in zip(params, before, grads):
        np.testing.assert_allclose(p, b - 0.5 * g, rtol=1e-15)
    assert list(opt.steps) == [0, 0]   # SGD counts momentum updates only


def test_one_vs_two_threads_identical(rng):
    params = make_params(rng, [(70001,), (13,), (40000,)], np.float32)
    grads = [make_grads(rng, params) for _ in range(5)]
    results = []
    for n in (1, 2):
        ps = [p.copy() for p in params]
        opt = fastopt.Adam(ps, lr=1e-2, weight_decay=0.1, amsgrad=True)
        with num_threads(n):
            for g in grads:
                opt.step(g)
        results.append(ps + [a for st in opt.state for a in st.values()])
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------ checkpoints ---

@pytest.mark.parametrize("cls,kwargs", [
    (fastopt.Adam, {"amsgrad": True}), (fastopt.AdamW, {}),
    (fastopt.RMSprop, {"centered": True, "momentum": 0.9}), (fastopt.SGD, {"momentum": 0.9}),
])
def test_checkpoint_round_trip_through_npz(cls, kwargs, rng, tmp_path):
    shapes = [(30, 4), (), (0,), (7,)]
    params = make_params(rng, shapes, np.float32)
    grads = [make_grads(rng, params) for _ in range(20)]
    opt = cls([{"params": params[:2]}, {"params": params[2:], "lr": 5e-3}], **kwargs)
    for g in grads[:10]:
        opt.step(g)
    opt.param_groups[0]["lr"] = 2e-3         # hyperparameters are saved too
    path = tmp_path / "ckpt.npz"
    np.savez(path, **opt.state_dict())
    saved_params = [p.copy() for p in params]
    for g in grads[10:]:
        opt.step(g)

    params2 = saved_params
    opt2 = cls([{"params": params2[:2]}, {"params": params2[2:]}], **kwargs)
    with np.load(path) as f:
        opt2.load_state_dict(dict(f))
    assert opt2.param_groups[0]["lr"] == 2e-3 and opt2.param_groups[1]["lr"] == 5e-3
    assert opt2.param_groups[0]["params"][0] is params2[0]
    for g in grads[10:]:
        opt2.step(g)
    for p, q in zip(params, params2):
        np.testing.assert_array_equal(p, q)
    for st, st2 in zip(opt.state, opt2.state):
        for k in st:
            np.testing.assert_array_equal(st[k], st2[k])
    np.testing.assert_array_equal(opt.steps, opt2.steps)


def test_state_dict_keys_and_copies(rng):
    params = make_params(rng, [(3,), (2,)], np.float64)
    opt = fastopt.Adam(params)
    opt.step(make_grads(rng, params))
    sd = opt.state_dict()
    assert sd["optimizer"] == "Adam"
    assert sd["state.1.step"] == 1 and sd["param_groups.0.betas"] == (0.9, 0.999)
    np.testing.assert_array_equal(sd["param_groups.0.params"], [0, 1])
    assert set(k for k in sd if k.startswith("state.0.")) == {
        "state.0.step", "state.0.exp_avg", "state.0.exp_avg_sq"}
    before = sd["state.0.exp_avg"].copy()
    opt.step(make_grads(rng, params))
    np.testing.assert_array_equal(sd["state.0.exp_avg"], before)   # a copy


def _bad_state_dicts(sd):
    """(description, broken copy, message) for load_state_dict's checks."""
    def edit(**changes):
        d = dict(sd)
        for k, v in changes.items():
            if v is None:
                del d[k.replace("__", ".")]
            else:
                d[k.replace("__", ".")] = v
        return d
    big = np.zeros((4, 4), np.float32)
    return [
        ("wrong type", edit(optimizer="SGD"), "for optimizer 'SGD'"),
        ("missing state", edit(**{"state__1__exp_avg": None}), r"missing 'state.1.exp_avg'"),
        ("missing step", edit(**{"state__0__step": None}), r"missing 'state.0.step'"),
        ("missing group key", edit(**{"param_groups__0__eps": None}), "param_groups.0.eps"),
        ("wrong shape", edit(**{"state__0__exp_avg": big}), r"state.0.exp_avg must be an array of shape \(3, 4\)"),
        ("wrong dtype", edit(**{"state__0__exp_avg_sq": np.zeros((3, 4))}), "dtype float32"),
        ("not an array", edit(**{"state__0__exp_avg_sq": 1.0}), "state.0.exp_avg_sq"),
        ("bad step", edit(**{"state__1__step": -1}), "non-negative integer"),
        ("extra key", edit(**{"state__0__max_exp_avg_sq": np.zeros((3, 4), np.float32)}), "lacks"),
        ("extra group", edit(**{"param_groups__1__lr": 1.0}), "param groups this optimizer lacks"),
        ("other params", edit(**{"param_groups__0__params": np.arange(3)}), "holds parameters"),
        ("bad lr", edit(**{"param_groups__0__lr": np.nan}), r"param_groups\[0\]\['lr'\] must be finite"),
        ("amsgrad", edit(**{"param_groups__0__amsgrad": True}), "amsgrad"),
    ]


def test_load_state_dict_mismatch_changes_nothing(rng):
    params = make_params(rng, [(3, 4), (5,)], np.float32)
    src = fastopt.Adam(params, lr=1e-2)
    src.step(make_grads(rng, params))
    sd = src.state_dict()
    for k in list(sd):      # make the good dict differ from the target everywhere
        if isinstance(sd[k], np.ndarray) and sd[k].dtype == np.float32:
            sd[k] = sd[k] + 1

    target_params = make_params(rng, [(3, 4), (5,)], np.float32)
    opt = fastopt.Adam(target_params, lr=1e-3)
    opt.step(make_grads(rng, target_params))
    snap = Snapshot(*target_params, *[a for st in opt.state for a in st.values()])
    groups = [dict(g) for g in opt.param_groups]
    steps = opt.steps
    for what, bad, msg in _bad_state_dicts(sd):
        with pytest.raises((ValueError, TypeError), match=msg):
            opt.load_state_dict(bad)
        snap.assert_unchanged()
        assert opt.param_groups == groups, what
        np.testing.assert_array_equal(opt.steps, steps)
    opt.load_state_dict(sd)                 # the untouched dict loads
    assert opt.param_groups[0]["lr"] == 1e-2

    two = fastopt.Adam([{"params": target_params[:1]}, {"params": target_params[1:]}])
    with pytest.raises(ValueError, match="holds parameters"):
        two.load_state_dict(sd)


# --------------------------------------------------------------- bad input ---

def _opt_and_snapshot(rng, cls=fastopt.Adam, **kw):
    params = make_params(rng, [(4, 3), (5,), (6,)], np.float32)
    opt = cls(params, **kw)
    opt.step(make_grads(rng, params))
    snap = Snapshot(*params, *[a for st in opt.state for a in st.values()])
    return params, opt, snap


def test_bad_grads_name_the_position_and_change_nothing(rng):
    params, opt, snap = _opt_and_snapshot(rng)
    steps = opt.steps
    good = make_grads(rng, params)

    def with_last(g):
        return good[:2] + [g]
    cases = [
        (good[:2], ValueError, "expected 3 grads"),
        (good + good[:1], ValueError, "expected 3 grads"),
        (with_last(np.zeros(5, np.float32)), ValueError, r"grads\[2\] has shape \(5,\) but params\[2\] has shape \(6,\)"),
        (with_last(np.zeros(6, np.float64)), TypeError, r"grads\[2\] has dtype float64 but params\[2\] has dtype float32"),
        (with_last(np.zeros(6, np.int32)), TypeError, r"grads\[2\] has dtype int32"),
        (with_last([0.0] * 6), TypeError, r"grads\[2\] must be a numpy.ndarray or None"),
        (with_last(params[2]), ValueError, r"grads\[2\] overlaps params\[2\]"),
        (with_last(opt.state[0]["exp_avg"].reshape(-1)[:6]), ValueError,
         r"grads\[2\] overlaps state\[0\]\['exp_avg'\]"),
        ("not a list", TypeError, "grads must be a list or tuple"),
    ]
    for grads, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            opt.step(grads)
        snap.assert_unchanged()
        np.testing.assert_array_equal(opt.steps, steps)


@pytest.mark.parametrize("cls,key,value,msg", [
    (fastopt.Adam, "lr", float("nan"), r"param_groups\[1\]\['lr'\] must be finite"),
    (fastopt.Adam, "lr", -1.0, r"param_groups\[1\]\['lr'\] must be >= 0"),
    (fastopt.Adam, "eps", float("inf"), r"param_groups\[1\]\['eps'\] must be finite"),
    (fastopt.Adam, "weight_decay", -0.1, r"param_groups\[1\]\['weight_decay'\]"),
    (fastopt.Adam, "betas", (0.9, 1.0), r"param_groups\[1\]\['betas'\]\[1\]"),
    (fastopt.Adam, "betas", 0.9, r"param_groups\[1\]\['betas'\] must be a tuple"),
    (fastopt.Adam, "lr", "fast", r"param_groups\[1\]\['lr'\] must be a real number"),
    (fastopt.Adam, "amsgrad", True, "amsgrad=True"),
    (fastopt.RMSprop, "alpha", 1.5, r"param_groups\[1\]\['alpha'\] must be in \[0, 1\)"),
    (fastopt.RMSprop, "momentum", 0.9, "momentum > 0"),
    (fastopt.RMSprop, "centered", True, "centered=True"),
    (fastopt.SGD, "momentum", 0.9, "momentum > 0"),
    (fastopt.SGD, "dampening", 2.0, r"param_groups\[1\]\['dampening'\] must be in \[0, 1\]"),
    (fastopt.SGD, "nesterov", True, "nesterov=True requires"),
])
def test_bad_hyperparameters_change_nothing(cls, key, value, msg, rng):
    params = make_params(rng, [(4, 3), (5,), (6,)], np.float32)
    opt = cls([{"params": params[:2]}, {"params": params[2:]}])
    opt.step(make_grads(rng, params))
    snap = Snapshot(*params, *[a for st in opt.state for a in st.values()])
    steps = opt.steps
    opt.param_groups[1][key] = value
    with pytest.raises((ValueError, TypeError), match=msg):
        opt.step(make_grads(rng, params))
    snap.assert_unchanged()
    np.testing.assert_array_equal(opt.steps, steps)


def test_missing_group_key_and_group_count(rng):
    params, opt, snap = _opt_and_snapshot(rng)
    del opt.param_groups[0]["eps"]
    # A ValueError naming the key (PyTorch's step would raise the dict's KeyError).
    with pytest.raises(ValueError, match=r"param_groups\[0\] has no 'eps'"):
        opt.step(make_grads(rng, params))
    opt.param_groups[0]["eps"] = 1e-8
    opt.param_groups.append({"params": [], **opt.defaults})
    with pytest.raises(ValueError, match="expected 1 param groups"):
        opt.step(make_grads(rng, params))
    snap.assert_unchanged()


def test_param_made_read_only_after_construction(rng):
    params, opt, snap = _opt_and_snapshot(rng)
    params[2].flags.writeable = False
    with pytest.raises(ValueError, match=r"params\[2\] is read-only"):
        opt.step(make_grads(rng, params))
    snap.assert_unchanged()


def test_bad_params_at_construction(rng):
    a = rng.standard_normal((4, 6))
    ro = a.copy()
    ro.flags.writeable = False
    cases = [
        ([], ValueError, "empty parameter list"),
        (a, TypeError, "not a single array"),
        ([a, a.copy().T], ValueError, r"params\[1\] must be C-contiguous"),
        ([a.copy(), ro], ValueError, r"params\[1\] is read-only"),
        ([a.astype(np.int64)], TypeError, r"params\[0\] must have dtype float32, float64"),
        ([a.astype(np.complex64)], TypeError, r"params\[0\] must have dtype"),
        ([[1.0, 2.0]], TypeError, r"params\[0\] must be a numpy.ndarray"),
        ([a, np.zeros(2), a], ValueError, r"params\[0\] and params\[2\] are the same array"),
        ([a[1], a[:2]], ValueError, r"params\[0\] and params\[1\] overlap"),
        ([a.reshape(-1)[2:8], a[1]], ValueError, r"params\[0\] and params\[1\] overlap"),
        ([{"params": [a]}, {"params": [a]}], ValueError, "same array"),
        ([{"params": [a]}, a], TypeError, "all arrays or all param-group dicts"),
        ([{"lr": 1.0}], ValueError, r"param_groups\[0\] has no 'params'"),
    ]
    snap = Snapshot(a)
    for params, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            fastopt.Adam(params)
    snap.assert_unchanged()
    for kwargs, msg in [({"lr": -1.0}, "lr must be >= 0"), ({"betas": (1.0, 0.9)}, r"betas\[0\]"),
                        ({"eps": float("nan")}, "eps"), ({"weight_decay": -1}, "weight_decay")]:
        with pytest.raises(ValueError, match=msg):
            fastopt.Adam([a], **kwargs)
    with pytest.raises(ValueError, match=r"param_groups\[0\]: nesterov=True requires"):
        fastopt.SGD([a], momentum=0.0, nesterov=True)


def test_empty_and_zero_d_params_work(rng):
    params = [np.zeros(0, np.float32), np.array(1.5), np.zeros((0, 3))]
    opt = fastopt.Adam(params, lr=0.1)
    opt.step([np.zeros(0, np.float32), np.array(2.0), np.zeros((0, 3))])
    assert params[1] == pytest.approx(1.4)
    assert list(opt.steps) == [1, 1, 1]


# -------------------------------------------------------------- flat_views ---

def test_flat_views_layout_and_training(rng):
    init = make_params(rng, [(3, 5), (), (0,), (17,), (4, 10)], np.float64)
    flat_p, params = fastopt.flat_views(init)
    assert flat_p.ndim == 1 and flat_p.dtype == np.float64
    for v, a in zip(params, init):
        assert v.shape == a.shape and v.base is flat_p.base and v.ctypes.data % 64 == 0
        np.testing.assert_array_equal(v, a)
    assert np.count_nonzero(flat_p) == sum(a.size for a in init)     # padding is zero
    flat_g, grads = fastopt.flat_views(params, copy=False)
    assert flat_g.shape == flat_p.shape and not flat_g.any()

    opt = fastopt.Adam(params, lr=1e-2)
    mirror = Mirror(opt, init, functional_step)
    for _ in range(5):
        for g in grads:
            g[...] = rng.standard_normal(g.shape)
        norm = np.linalg.norm(np.concatenate([g.ravel() for g in grads]))
        assert fastopt.clip_grad_norm_(flat_g, 1.0) == pytest.approx(norm, rel=1e-12)
        assert np.linalg.norm(flat_g) == pytest.approx(1.0, rel=1e-5)
        opt.step(grads)
        mirror.step(grads, opt.param_groups)
    assert_same(opt, params, mirror)
    assert np.count_nonzero(flat_p) == sum(a.size for a in init)     # padding never written


def test_flat_views_bad_input():
    with pytest.raises(ValueError, match="share one dtype"):
        fastopt.flat_views([np.zeros(2), np.zeros(2, np.float32)])
    with pytest.raises(TypeError, match="dtype must be float32 or float64"):
        fastopt.flat_views([np.zeros(2, np.int32)])
    with pytest.raises(TypeError, match="copy=True needs arrays"):
        fastopt.flat_views([(2, 3)], dtype=np.float32)
    flat, views = fastopt.flat_views([(2, 3), ()], dtype=np.float32, copy=False)
    assert [v.shape for v in views] == [(2, 3), ()] and flat.dtype == np.float32


# ---------------------------------------------------------- clip_grad_norm_ ---

def clip_reference(grads, max_norm, p):
    flat = np.concatenate([g.astype(np.float64).ravel() for g in grads])
    total = np.linalg.norm(flat, ord=p)
    coef = min(max_norm / (total + 1e-6), 1.0)
    return total, [g * g.dtype.type(coef) for g in grads]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [2.0, 1.0, np.inf, 3.0])
def test_clip_grad_norm_matches_numpy(p, dtype, rng):
    grads = make_grads(rng, make_params(rng, BIG_SHAPES, dtype))
    total_ref, clipped = clip_reference(grads, 0.5, p)
    total = fastopt.clip_grad_norm_(grads, 0.5, norm_type=p)
    assert isinstance(total, float)
    np.testing.assert_allclose(total, total_ref, rtol=1e-12)
    for g, c in zip(grads, clipped):
        np.testing.assert_allclose(g, c, **tol(dtype))


def test_clip_grad_norm_mixed_dtypes(rng):
    grads = [rng.standard_normal(40_000).astype(np.float32), rng.standard_normal((30, 3)),
             rng.standard_normal(17).astype(np.float32)]
    total_ref, clipped = clip_reference(grads, 2.0, 2.0)
    assert fastopt.clip_grad_norm_(grads, 2.0) == pytest.approx(total_ref, rel=1e-12)
    for g, c in zip(grads, clipped):
        np.testing.assert_allclose(g, c, **tol(g.dtype))


def test_clip_grad_norm_below_max_leaves_grads_unchanged(rng):
    grads = make_grads(rng, make_params(rng, [(30,), (4, 4)], np.float32))
    snap = Snapshot(*grads)
    total = fastopt.clip_grad_norm_(grads, 1e6)
    assert total == pytest.approx(np.linalg.norm(np.concatenate([g.ravel() for g in grads])))
    snap.assert_unchanged()


def test_clip_grad_norm_one_vs_two_threads(rng):
    grads = make_grads(rng, make_params(rng, [(100_003,), (17,), (60_000,), (5, 7)], np.float32))
    out = []
    for n in (1, 2):
        gs = [g.copy() for g in grads]
        for p in (2.0, 1.0, 3.0):
            with num_threads(n):
                out.append(fastopt.clip_grad_norm_(gs, 1e9, norm_type=p))
        with num_threads(n):
            out.append(fastopt.clip_grad_norm_(gs, 1.0))
        out.extend(gs)
    half = len(out) // 2
    for a, b in zip(out[:half], out[half:]):
        np.testing.assert_array_equal(a, b)


def test_clip_grad_norm_inputs(rng):
    g = rng.standard_normal(10)
    n = np.linalg.norm(g)
    assert fastopt.clip_grad_norm_(g, 1.0) == pytest.approx(n, rel=1e-14)   # a single array
    np.testing.assert_allclose(np.linalg.norm(g), 1.0 * n / (n + 1e-6), rtol=1e-14)
    assert fastopt.clip_grad_norm_([], 1.0) == 0.0
    h = rng.standard_normal(4)
    assert fastopt.clip_grad_norm_([None, h, None], 1e3) == pytest.approx(np.linalg.norm(h), rel=1e-14)


def test_clip_grad_norm_nonfinite(rng):
    g = rng.standard_normal(10).astype(np.float32)
    g[3] = np.nan
    h = rng.standard_normal(5).astype(np.float32)
    snap = Snapshot(g, h)
    with pytest.raises(RuntimeError, match="non-finite"):
        fastopt.clip_grad_norm_([g, h], 1.0, error_if_nonfinite=True)
    snap.assert_unchanged()
    assert np.isnan(fastopt.clip_grad_norm_([g, h], 1.0))
    assert np.isnan(h).all()                 # scaled by NaN, as torch does
    g = np.array([1.0, np.inf, -2.0])
    assert fastopt.clip_grad_norm_([g], 1.0, norm_type=np.inf) == np.inf
    np.testing.assert_array_equal(g, [0.0, np.nan, -0.0])   # scaled by 0


def test_clip_grad_norm_bad_input_changes_nothing(rng):
    a = rng.standard_normal((4, 6))
    b = rng.standard_normal(5)
    ro = b.copy()
    ro.flags.writeable = False
    snap = Snapshot(a, b)
    cases = [
        (([b, a.T], 1.0), ValueError, r"grads\[1\] must be C-contiguous"),
        (([b, ro], 1.0), ValueError, r"grads\[1\] is read-only"),
        (([b, a.astype(np.int32)], 1.0), TypeError, r"grads\[1\] must have dtype"),
        (([b, [1.0]], 1.0), TypeError, r"grads\[1\] must be a numpy.ndarray"),
        (([a, b, a[1]], 1.0), ValueError, r"grads\[0\] and grads\[2\] overlap"),
        (([a, b, a], 1.0), ValueError, r"grads\[0\] and grads\[2\] overlap"),
        (([a, b], -1.0), ValueError, "max_norm must be >= 0"),
        (([a, b], np.nan), ValueError, "max_norm must be >= 0"),
        (([a, b], 1.0, 0.0), ValueError, "norm_type must be > 0"),
        (([a, b], 1.0, -np.inf), ValueError, "norm_type must be > 0"),
        (([a, b], 1.0, np.nan), ValueError, "norm_type must be > 0"),
        (([a, b], 1.0, "fro"), TypeError, "norm_type must be a number"),
    ]
    for args, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            fastopt.clip_grad_norm_(*args)
        snap.assert_unchanged()


# --------------------------------------------------------- clip_grad_value_ ---

def clamp_reference(g, c):
    """min(max(g, -c), c) with c in g's dtype; NaN stays NaN."""
    c = g.dtype.type(c)
    out = g.copy()
    out[g > c] = c
    out[g < -c] = -c
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("clip", [0.0, 0.3, 1.7])
def test_clip_grad_value_matches_numpy(clip, dtype, rng):
    grads = make_grads(rng, make_params(rng, BIG_SHAPES, dtype))
    grads[-1].flat[[0, 3, 5]] = [np.nan, np.inf, -np.inf]
    expected = [clamp_reference(g, clip) for g in grads]
    assert fastopt.clip_grad_value_(grads, clip) is None
    for g, e in zip(grads, expected):
        np.testing.assert_array_equal(g, e)           # a clamp is exact
    assert np.isnan(grads[-1].flat[0]) and grads[-1].flat[3] == grads[-1].dtype.type(clip)


def test_clip_grad_value_mixed_dtypes_none_and_single_array(rng):
    grads = [rng.standard_normal(40_000).astype(np.float32), None,
             rng.standard_normal((30, 3)) * 3, rng.standard_normal(17).astype(np.float32)]
    expected = [None if g is None else clamp_reference(g, 0.1) for g in grads]
    fastopt.clip_grad_value_(grads, 0.1)
    for g, e in zip(grads, expected):
        if g is not None:
            np.testing.assert_array_equal(g, e)
    g = rng.standard_normal(10) * 5
    e = clamp_reference(g, 2)
    fastopt.clip_grad_value_(g, 2)                     # a single array, an int clip value
    np.testing.assert_array_equal(g, e)
    fastopt.clip_grad_value_([], 1.0)


def test_clip_grad_value_one_vs_two_threads(rng):
    grads = make_grads(rng, make_params(rng, [(100_003,), (17,), (60_000,), (5, 7)], np.float32))
    out = []
    for n in (1, 2):
        gs = [g.copy() for g in grads]
        with num_threads(n):
            fastopt.clip_grad_value_(gs, 0.5)
        out.append(gs)
    for a, b in zip(*out):
        np.testing.assert_array_equal(a, b)


def test_clip_grad_value_bad_input_changes_nothing(rng):
    a = rng.standard_normal((4, 6)) * 3
    b = rng.standard_normal(5) * 3
    ro = b.copy()
    ro.flags.writeable = False
    snap = Snapshot(a, b)
    cases = [
        (([b, a.T], 1.0), ValueError, r"grads\[1\] must be C-contiguous"),
        (([b, ro], 1.0), ValueError, r"grads\[1\] is read-only"),
        (([b, a.astype(np.int32)], 1.0), TypeError, r"grads\[1\] must have dtype"),
        (([b, [1.0]], 1.0), TypeError, r"grads\[1\] must be a numpy.ndarray"),
        (([a, b, a[1]], 1.0), ValueError, r"grads\[0\] and grads\[2\] overlap"),
        (([a, b], -1.0), ValueError, "clip_value must be >= 0"),
        (([a, b], np.nan), ValueError, "clip_value must be finite"),
        (([a, b], np.inf), ValueError, "clip_value must be finite"),
        (([a, b], "1"), TypeError, "clip_value must be a real number"),
    ]
    for args, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            fastopt.clip_grad_value_(*args)
        snap.assert_unchanged()


def test_clipping_documents_the_torch_habit():
    """clip_grad_norm_(params, ...) rescales whatever it is given: say so."""
    for f in (fastopt.clip_grad_norm_, fastopt.clip_grad_value_):
        assert "Pass the *gradients*, not the parameters" in f.__doc__


# ----------------------------------------------------------- add_param_group ---

ADD_GROUP_CASES = [
    (fastopt.Adam, {"lr": 1e-2}, {"weight_decay": 0.1}),
    (fastopt.AdamW, {"amsgrad": True}, {"lr": 3e-3, "betas": [0.8, 0.99]}),
    (fastopt.RMSprop, {"momentum": 0.9, "centered": True}, {"lr": 1e-3}),
    (fastopt.SGD, {"lr": 0.1, "momentum": 0.9}, {"nesterov": True, "lr": 0.05}),
    (fastopt.SGD, {"lr": 0.1}, {"momentum": 0.5}),          # a state kind only the new group has
]


@pytest.mark.parametrize("cls,kwargs,extra", ADD_GROUP_CASES,
                         ids=[f"{c.__name__}-{i}" for i, (c, _, _) in enumerate(ADD_GROUP_CASES)])
def test_add_param_group_continues_like_one_optimizer_built_with_all_groups(cls, kwargs, extra,
                                                                             rng):
    """Optimizer A gets the second group after 5 steps; optimizer B has both
    groups from the start and skips the second group's parameters (None grads)
    for those 5 steps.  Both then continue identically, bit for bit, and their
    state dicts are interchangeable."""
    first, second = [(3, 5), (70_000,)], [(17,), (2, 2)]
    p1 = make_params(rng, first, np.float32)
    p2 = make_params(rng, second, np.float64)
    a1, a2 = [p.copy() for p in p1], [p.copy() for p in p2]
    b1, b2 = [p.copy() for p in p1], [p.copy() for p in p2]
    a = cls(a1, **kwargs)
    b = cls([{"params": b1}, {"params": b2, **extra}], **kwargs)
    for _ in range(5):
        g = make_grads(rng, p1)
        a.step(g)
        b.step(g + [None, None])
    state_before = [{k: v.copy() for k, v in st.items()} for st in a.state]
    a.add_param_group({"params": a2, **extra})
    hyper = lambda opt: [{k: v for k, v in g.items() if k != "params"}  # noqa: E731
                         for g in opt.param_groups]
    assert hyper(a) == hyper(b)
    assert a.param_groups[1]["params"][0] is a2[0]
    np.testing.assert_array_equal(a.steps, b.steps)
    for old, new in zip(state_before, a.state):             # kept exactly
        for k in old:
            np.testing.assert_array_equal(new[k], old[k])
    for _ in range(5):
        g = make_grads(rng, p1 + p2)
        a.step(g)
        b.step(g)
    for x, y in zip(a1 + a2, b1 + b2):
        np.testing.assert_array_equal(x, y)
    for sa, sb in zip(a.state, b.state):
        assert sa.keys() == sb.keys()
        for k in sa:
            np.testing.assert_array_equal(sa[k], sb[k])
    # state dicts: same keys and values, and each loads into the other
    sda, sdb = a.state_dict(), b.state_dict()
    assert sda.keys() == sdb.keys()
    for k in sda:
        np.testing.assert_array_equal(sda[k], sdb[k])
    b.load_state_dict(sda)
    a.load_state_dict(sdb)


def test_add_param_group_defaults_and_single_array(rng):
    p, q = rng.standard_normal(4), rng.standard_normal(3)
    opt = fastopt.SGD([p], lr=0.1, momentum=0.9)
    opt.add_param_group({"params": q, "lr": 0.01})          # one array, not a list
    g = opt.param_groups[1]
    assert g["params"][0] is q and g["lr"] == 0.01 and g["momentum"] == 0.9
    assert len(opt.state) == 2 and opt.state[1]["momentum_buffer"].shape == (3,)
    q0 = q.copy()
    opt.step([None, np.ones(3)])
    np.testing.assert_allclose(q, q0 - 0.01, rtol=1e-15)


def test_add_param_group_bad_input_changes_nothing(rng):
    params = make_params(rng, [(5,), (3, 2)], np.float32)
    opt = fastopt.Adam(params, lr=1e-2)
    opt.step(make_grads(rng, params))
    new = rng.standard_normal(4).astype(np.float32)
    ro = new.copy()
    ro.flags.writeable = False
    before = (opt.param_groups, opt._fused, opt.state, opt.state_dict())
    cases = [
        ([new], TypeError, "param_group must be a dict"),
        ({"lr": 0.1}, ValueError, r"has no 'params'"),
        ({"params": [params[1]]}, ValueError, r"param_group\['params'\]\[0\] is already in "
                                              r"param_groups\[0\]"),
        ({"params": [new, new]}, ValueError, "are the same array"),
        ({"params": [new, new[1:]]}, ValueError, "overlap in memory"),
        ({"params": [params[0][1:]]}, ValueError, "overlap in memory"),
        ({"params": [ro]}, ValueError, "read-only"),
        ({"params": [new.astype(np.int64)]}, TypeError, "must have dtype float32, float64"),
        ({"params": [new], "lr": -1.0}, ValueError, r"param_groups\[1\]\['lr'\] must be >= 0"),
        ({"params": [new], "betas": (0.9, 1.0)}, ValueError, r"\['betas'\]\[1\]"),
    ]
    for group, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            opt.add_param_group(group)
        assert opt.param_groups is before[0] and opt._fused is before[1] and opt.state is before[2]
        assert len(opt.param_groups) == 1
        sd = opt.state_dict()
        for k in sd:
            np.testing.assert_array_equal(sd[k], before[3][k])


def test_optimizers_in_several_python_threads(rng):
    # step() releases the GIL; optimizers over different arrays run concurrently
    # and give the serial results.
    from concurrent.futures import ThreadPoolExecutor
    shapes = [(300,), (20, 20), (7,)]
    inits = [make_params(rng, shapes, np.float32) for _ in range(4)]
    grads = [[make_grads(rng, inits[0]) for _ in range(20)] for _ in range(4)]

    def train(k, params):
        opt = fastopt.Adam(params, lr=1e-2, amsgrad=True)
        for g in grads[k]:
            opt.step(g)
        return params

    serial = [train(k, [p.copy() for p in inits[k]]) for k in range(4)]
    with ThreadPoolExecutor(4) as pool:
        threaded = list(pool.map(lambda k: train(k, [p.copy() for p in inits[k]]), range(4)))
    for a, b in zip(serial, threaded):
        for p, q in zip(a, b):
            np.testing.assert_array_equal(p, q)


def test_step_is_not_reentrant(rng):
    # Validation can run Python code (here a number's __float__); a step of the
    # same optimizer started from there is refused, and the outer step is whole.
    p = rng.standard_normal(5)
    g = rng.standard_normal(5)
    p0 = p.copy()
    opt = fastopt.SGD([p], lr=0.1)
    inner = []

    class Rate:
        def __float__(self):
            with pytest.raises(RuntimeError, match="concurrently"):
                opt.step([g])
            inner.append(True)
            return 0.1

    opt.param_groups[0]["lr"] = Rate()
    opt.step([g])
    assert inner == [True]
    np.testing.assert_allclose(p, p0 - 0.1 * g, rtol=1e-15)


# ------------------------------------------------------ the declared kinds ---
# What an optimizer is (fastopt._kinds) is declared once: the classes'
# defaults, torch.optim's, and the ranges the native group parser enforces
# at every step must all be the declaration's.

from fastopt import _kinds  # noqa: E402

KIND_CLASSES = [fastopt.SGD, fastopt.RMSprop, fastopt.Adam, fastopt.AdamW]


@pytest.mark.parametrize("cls", KIND_CLASSES, ids=lambda c: c.__name__)
def test_class_defaults_are_the_declared_ones(cls):
    import inspect
    decl = cls._kind
    assert decl is _kinds.KINDS[cls.__name__]
    sig = inspect.signature(cls)
    for h in decl.hypers:
        if h.name in sig.parameters:
            assert sig.parameters[h.name].default == h.default, h.name
    opt = cls([np.zeros(3)])
    assert {k: v for k, v in opt.defaults.items()} == decl.defaults()


@pytest.mark.parametrize("cls", KIND_CLASSES, ids=lambda c: c.__name__)
def test_declared_defaults_are_torchs(cls):
    torch = pytest.importorskip("torch")
    import inspect
    sig = inspect.signature(getattr(torch.optim, cls.__name__))
    for h in cls._kind.hypers:
        if h.name in sig.parameters:
            assert sig.parameters[h.name].default == h.default, h.name


def _outside(h):
    """Values just outside the declared range of a number."""
    out = [h.lo - 1e-9 if h.lo != 0 else -1e-12, float("nan"), float("inf")]
    if h.hi != np.inf:
        out.append(h.hi + 1e-9 if h.closed else h.hi)
    return out


@pytest.mark.parametrize("cls", KIND_CLASSES, ids=lambda c: c.__name__)
def test_the_native_parser_enforces_the_declared_ranges(cls):
    p = np.zeros(5)
    for h in cls._kind.hypers:
        if h.kind == "flag":
            continue
        for bad in _outside(h):
            opt = cls([p.copy()])
            before = opt.state_dict()
            if h.kind == "pair":
                for k in range(2):
                    pair = list(h.default)
                    pair[k] = bad
                    opt.param_groups[0][h.name] = tuple(pair)
                    with pytest.raises(ValueError, match=re.escape(f"param_groups[0][{h.name!r}][{k}]")):
                        opt.step([np.ones(5)])
            else:
                opt.param_groups[0][h.name] = bad
                with pytest.raises(ValueError, match=re.escape(f"param_groups[0][{h.name!r}]")):
                    opt.step([np.ones(5)])
            opt.param_groups[0][h.name] = h.default
            after = opt.state_dict()
            assert before.keys() == after.keys()
            for key in before:
                np.testing.assert_array_equal(before[key], after[key])
        if h.kind != "pair" and np.isfinite(h.hi) and h.closed:
            opt = cls([p.copy()])
            opt.param_groups[0][h.name] = h.hi          # the closed end is allowed
            opt.step([np.ones(5)])


@pytest.mark.parametrize("cls", KIND_CLASSES, ids=lambda c: c.__name__)
def test_options_that_need_state_follow_the_declared_slots(cls):
    for slot in cls._kind.slots:
        if slot.option is None:
            continue
        flag = cls._kind.hyper(slot.option).kind == "flag"
        opt = cls([np.zeros(5)])
        assert slot.name not in opt.state[0]
        opt.param_groups[0][slot.option] = True if flag else 0.5
        if cls is fastopt.SGD:
            opt.param_groups[0]["nesterov"] = False
        with pytest.raises(ValueError, match=f"no {slot.name} state"):
            opt.step([np.ones(5)])
        opt2 = cls([np.zeros(5)], **{slot.option: True if flag else 0.5})
        assert slot.name in opt2.state[0]


# A parameter replaced in, removed from or appended to param_groups[g]["params"]
# is refused at the next step (its state belongs to the array it was built
# for), with nothing changed -- never silently left out of the step.

def _edits():
    def replace(ps, k):
        ps[k] = ps[k].copy()

    def remove(ps, k):
        del ps[k]

    def append(ps, k):
        ps.append(ps[k].copy())

    def swap(ps, k):
        ps[k], ps[k - 1] = ps[k - 1], ps[k]
    return {"replace": replace, "remove": remove, "append": append, "swap": swap}


@pytest.mark.parametrize("edit", list(_edits()))
@pytest.mark.parametrize("cls", KIND_CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
def test_edited_param_lists_are_refused(edit, cls, dtype, rng):
    if dtype == "bfloat16":
        ml_dtypes = pytest.importorskip("ml_dtypes")
        dtype = ml_dtypes.bfloat16
    shapes = [(7,), (3, 5), (4100,)]
    params = [rng.standard_normal(s).astype(dtype) for s in shapes]
    extra = [rng.standard_normal((6,)).astype(dtype)]
    grad_dtype = np.float32 if np.dtype(dtype).itemsize == 2 else dtype
    grads = [rng.standard_normal(s).astype(grad_dtype) for s in shapes]
    opt = cls([{"params": params}, {"params": extra, "lr": 1e-4}])
    opt.step(grads + [np.ones(6, grad_dtype)])
    for g, k in ((0, 1), (0, 2), (1, 0)):
        if edit == "swap" and k == 0:
            continue
        before = opt.state_dict()
        arrays = Snapshot(*params, *extra)
        saved = list(opt.param_groups[g]["params"])
        _edits()[edit](opt.param_groups[g]["params"], k)
        with pytest.raises(ValueError, match=re.escape(f"param_groups[{g}]['params']")):
            opt.step(grads + [np.ones(6, grad_dtype)])
        arrays.assert_unchanged()
        opt.param_groups[g]["params"] = saved
        after = opt.state_dict()
        assert before.keys() == after.keys()
        for key in before:
            np.testing.assert_array_equal(np.asarray(before[key]), np.asarray(after[key]))
        opt.step(grads + [np.ones(6, grad_dtype)])          # restored: steps again


# A hyperparameter the kernels cast to float32 (float32, float16 and bfloat16
# parameters compute in float32) must be a float32 number: 1e300 would be inf
# and write infinities.  Refused, nothing changed; float64 takes it.

@pytest.mark.parametrize("cls", KIND_CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("value", [1e39, 1e300])
def test_hyperparameters_beyond_float32_are_refused_for_float32_groups(cls, value, rng):
    numbers = [h for h in cls._kind.hypers if h.kind == "number" and
               (h.hi == np.inf or h.closed is False and h.hi > value)]
    assert numbers
    for h in numbers:
        params = [rng.standard_normal(9).astype(np.float32), rng.standard_normal(4)]
        opt = cls([{"params": params[:1]}, {"params": params[1:]}])
        snap = Snapshot(*params)
        opt.param_groups[0][h.name] = value
        with pytest.raises(ValueError, match=re.escape(f"param_groups[0][{h.name!r}] = {value!r} "
                                                       "is too large for float32")):
            opt.step([np.ones(9, np.float32), np.ones(4)])
        snap.assert_unchanged()
        opt.param_groups[0][h.name] = h.default
        if h.name in ("momentum", "dampening"):     # (would need state, or momentum)
            continue
        opt.param_groups[1][h.name] = value
        opt.step([np.ones(9, np.float32), np.ones(4)])        # a float64 group takes it


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("kernel,kw", [
    ("adam_step", dict(lr=1e300, step=1)), ("adam_step", dict(weight_decay=1e39, step=1)),
    ("adam_step", dict(eps=1e300, step=1)), ("rmsprop_step", dict(lr=1e300)),
    ("rmsprop_step", dict(momentum=1e300)), ("sgd_step", dict(lr=1e39)),
    ("sgd_step", dict(lr=0.1, momentum=1e300)),
])
def test_functional_hyperparameters_beyond_float32_are_refused(dtype, kernel, kw, rng):
    p = rng.standard_normal(33).astype(dtype)
    g = rng.standard_normal(33).astype(np.float32)
    states = [np.zeros(33, np.float32) for _ in range(2)]
    master = p.astype(np.float32) if dtype == np.float16 else None
    snap = Snapshot(p, g, *states, master)
    args = {"adam_step": (p, g, states[0], states[1]), "rmsprop_step": (p, g, states[0]),
            "sgd_step": (p, g, states[0])}[kernel]
    extra = {"rmsprop_step": dict(momentum_buffer=states[1])}.get(kernel, {})
    if kernel == "rmsprop_step" and "momentum" not in kw:
        extra = {}
    name, value = [(k, v) for k, v in kw.items() if k not in ("step",) and v > 1e38][0]
    with pytest.raises(ValueError, match=re.escape(f"{name} = {value!r} is too large for float32")):
        getattr(fastopt, kernel)(*args, **kw, **extra, **({"master": master} if master is not None else {}))
    snap.assert_unchanged()
