"""fastopt.Adafactor: the optimizer object.

Checked bit for bit against its functional kernel `adafactor_step` (itself
checked against a NumPy reference and torch in
test_optim_kernel_adafactor.py) applied array by array; against
torch.optim.Adafactor over many parameters and two groups; on 1, 2 and 3
threads; and through checkpoints, added groups, 16-bit parameters, loss
scaling, bad hyperparameters and edits of ``opt.state``.
"""
import re

import numpy as np
import pytest

import fastopt
from conftest import Snapshot, num_threads
from test_optim_kernel_adafactor import adafactor_ref

try:
    import ml_dtypes
    HALF = [np.float16, np.dtype(ml_dtypes.bfloat16)]
except ImportError:
    HALF = [np.float16]

# 0-d, empty, 1-d with SIMD tails, matrices (one cut into several units of
# the kernel: 300 x 200 = 60000 elements), a batch of matrices, thin ones.
SHAPES = [(), (0,), (17,), (3, 5), (1, 9), (9, 1), (300, 200), (4, 3, 33), (0, 4)]
SPLIT = 4
OPTS = [
    {},
    dict(lr=0.03, beta2_decay=-0.5, eps=(1e-20, 1e-2), d=1.5, weight_decay=0.1),
    dict(lr=0.5, eps=(None, 0.0), maximize=True, weight_decay=0.01),
]
GROUP1 = dict(lr=0.004, beta2_decay=-0.6, d=2.0)


def opt_id(o):
    return ",".join(f"{k}={v}" for k, v in o.items()) or "default"


def make_params(rng, shapes, dtype):
    return [np.asarray(rng.standard_normal(s)).astype(dtype) for s in shapes]


def make_grads(rng, params, t, dtype=None, none=()):
    return [None if i in none else
            np.asarray(rng.standard_normal(p.shape) * (0.5 + t % 3)).astype(dtype or p.dtype)
            for i, p in enumerate(params)]


def build(opts, params, split=SPLIT, **kw):
    return fastopt.Adafactor([{"params": params[:split]}, {"params": params[split:], **GROUP1}],
                             **opts, **kw)


def fresh_state(p, dtype=None):
    dtype = dtype or p.dtype
    if p.ndim >= 2:
        return dict(row_var=np.zeros(p.shape[:-1] + (1,), dtype),
                    col_var=np.zeros(p.shape[:-2] + (1, p.shape[-1]), dtype))
    return dict(variance=np.zeros(p.shape, dtype))


def hyper(group):
    return {k: v for k, v in group.items() if k != "params"}


class Mirror:
    """The optimizer's steps replayed array by array with adafactor_step."""

    def __init__(self, opt, params, masters=None):
        self.group = [gi for gi, g in enumerate(opt.param_groups) for _ in g["params"]]
        self.masters = masters
        self.state = [fresh_state(p if masters is None or masters[i] is None else masters[i])
                      for i, p in enumerate(params)]
        self.steps = [0] * len(params)

    def step(self, params, grads, groups, **kw):
        for i, (p, g) in enumerate(zip(params, grads)):
            if g is None:
                continue
            self.steps[i] += 1
            m = None if self.masters is None else self.masters[i]
            fastopt.adafactor_step(p, g, step=self.steps[i], master=m, **self.state[i],
                                   **hyper(groups[self.group[i]]), **kw)


def bits(a):
    a = np.ascontiguousarray(a)
    return a.view(np.uint8)


def assert_bits(a, b, what=""):
    assert a.dtype == b.dtype and a.shape == b.shape, what
    np.testing.assert_array_equal(bits(a), bits(b), err_msg=what)


@pytest.mark.parametrize("opts", OPTS, ids=opt_id)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_20_steps_are_the_functional_kernels_bits(opts, dtype, rng):
    params = make_params(rng, SHAPES, dtype)
    theirs = [p.copy() for p in params]
    opt = build(opts, params)
    mirror = Mirror(opt, theirs)
    for t in range(20):
        grads = make_grads(rng, params, t, none={i for i in range(len(params))
                                                 if (t + 2 * i) % 7 == 0})
        opt.step(grads)
        mirror.step(theirs, grads, opt.param_groups)
    for i, (a, b) in enumerate(zip(params, theirs)):
        assert_bits(a, b, f"params[{i}]")
        assert opt.steps[i] == mirror.steps[i]
        assert sorted(opt.state[i]) == sorted(mirror.state[i])
        for k, v in mirror.state[i].items():
            assert_bits(opt.state[i][k], v, f"state[{i}][{k!r}]")


def test_state_names_and_shapes_are_torchs():
    params = make_params(np.random.default_rng(0), [(), (5,), (3, 4), (2, 3, 4)], np.float32)
    opt = fastopt.Adafactor(params)
    assert [sorted(st) for st in opt.state] == [["variance"], ["variance"],
                                                ["col_var", "row_var"], ["col_var", "row_var"]]
    assert opt.state[2]["row_var"].shape == (3, 1) and opt.state[2]["col_var"].shape == (1, 4)
    assert opt.state[3]["row_var"].shape == (2, 3, 1)
    assert opt.state[3]["col_var"].shape == (2, 1, 4)
    assert opt.defaults == dict(lr=1e-2, beta2_decay=-0.8, eps=(None, 1e-3), d=1.0,
                                weight_decay=0.0, maximize=False)


def test_threads_give_the_same_bits(rng):
    """The units and their sums are fixed by the shapes, not the team."""
    params = make_params(rng, SHAPES + [(700, 300), (100_000,)], np.float32)
    runs = []
    for nt in (1, 2, 3):
        ps = [p.copy() for p in params]
        opt = build(OPTS[1], ps)
        r = np.random.default_rng(5)
        with num_threads(nt):
            for t in range(4):
                opt.step(make_grads(r, ps, t))
        runs.append(ps)
    for run in runs[1:]:
        for a, b in zip(runs[0], run):
            assert_bits(a, b)


@pytest.mark.parametrize("opts", OPTS, ids=opt_id)
def test_50_steps_match_torch(opts, rng):
    """float64, two groups, None gradients: rtol 1e-12 (sums in another order)."""
    torch = pytest.importorskip("torch")
    shapes = [(), (1,), (17,), (3, 5), (1, 9), (9, 1), (40, 30), (2, 3, 7)]
    params = make_params(rng, shapes, np.float64)
    tp = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in params]
    opt = fastopt.Adafactor([{"params": params[:3]}, {"params": params[3:], **GROUP1}], **opts)
    topt = torch.optim.Adafactor([{"params": tp[:3]}, {"params": tp[3:], **GROUP1}],
                                 foreach=False, **opts)
    for t in range(50):
        grads = make_grads(rng, params, t, none={i for i in range(len(params))
                                                 if (t + 2 * i) % 7 == 0})
        opt.step(grads)
        for p, g in zip(tp, grads):
            p.grad = None if g is None else torch.from_numpy(g.copy())
        topt.step()
    for i, (p, q) in enumerate(zip(params, tp)):
        np.testing.assert_allclose(p, q.detach().numpy(), rtol=1e-12, atol=1e-14,
                                   err_msg=f"params[{i}]")
        ts = topt.state[q]
        assert float(ts["step"]) == opt.steps[i]
        assert sorted(k for k in ts if k != "step") == sorted(opt.state[i])
        for k, v in opt.state[i].items():
            theirs = ts[k].numpy()
            assert v.shape == theirs.shape
            np.testing.assert_allclose(v, theirs, rtol=1e-12, atol=1e-300,
                                       err_msg=f"state[{i}][{k!r}]")


def test_float32_is_within_torchs_own_float32_error(rng):
    """fastopt float32 vs float64 is no farther than torch float32 vs float64."""
    torch = pytest.importorskip("torch")
    shapes = [(17,), (64, 33), (3, 5, 7)]
    init = make_params(rng, shapes, np.float64)
    steps = [make_grads(rng, init, t) for t in range(50)]

    def run_torch(dtype):
        tp = [torch.nn.Parameter(torch.from_numpy(p.astype(dtype))) for p in init]
        o = torch.optim.Adafactor(tp, foreach=False, weight_decay=0.01)
        for grads in steps:
            for p, g in zip(tp, grads):
                p.grad = torch.from_numpy(g.astype(dtype))
            o.step()
        return [p.detach().numpy().astype(np.float64) for p in tp]

    exact, t32 = run_torch(np.float64), run_torch(np.float32)
    ours = [p.astype(np.float32) for p in init]
    o = fastopt.Adafactor(ours, weight_decay=0.01)
    for grads in steps:
        o.step([g.astype(np.float32) for g in grads])
    for e, t, f in zip(exact, t32, ours):
        assert np.abs(f - e).max() <= 2 * np.abs(t - e).max() + 1e-7


def test_reference_trajectory(rng):
    """Against the NumPy reference written from the formulas (no torch)."""
    params = make_params(rng, [(5,), (6, 7), (2, 3, 4)], np.float64)
    ref = [p.copy() for p in params]
    state = [fresh_state(p) for p in ref]
    opt = fastopt.Adafactor(params, lr=0.02, weight_decay=0.1, d=1.2)
    for t in range(1, 11):
        grads = make_grads(rng, params, t)
        opt.step(grads)
        for i, g in enumerate(grads):
            st = state[i]
            ref[i], rv, cv, var = adafactor_ref(ref[i], g, st.get("row_var"), st.get("col_var"),
                                                st.get("variance"), step=t, lr=0.02,
                                                weight_decay=0.1, d=1.2)
            state[i] = (dict(row_var=rv, col_var=cv) if ref[i].ndim >= 2
                        else dict(variance=var))
    for p, q in zip(params, ref):
        np.testing.assert_allclose(p, q, rtol=1e-13)


@pytest.mark.parametrize("pdtype", HALF, ids=lambda d: np.dtype(d).name)
def test_half_params_step_their_float32_masters(pdtype, rng):
    params = [p.astype(pdtype) for p in make_params(rng, [(17,), (30, 20), ()], np.float32)]
    opt = fastopt.Adafactor(params, lr=0.05)
    masters = [st["master_param"].copy() for st in opt.state]
    for m, p in zip(masters, params):
        assert_bits(m, p.astype(np.float32))
    assert all(st["row_var"].dtype == np.float32 for st in opt.state if "row_var" in st)
    outs = [p.copy() for p in params]
    mirror = Mirror(opt, outs, masters)
    for t in range(5):
        grads = make_grads(rng, params, t, dtype=np.float32 if t % 2 else pdtype)
        opt.step(grads)
        mirror.step(outs, grads, opt.param_groups)
    for i, (a, b) in enumerate(zip(params, outs)):
        assert_bits(a, b, f"params[{i}]")
        assert_bits(opt.state[i]["master_param"], masters[i])


def test_grad_scale_and_found_inf(rng):
    params = make_params(rng, [(17,), (30, 20)], np.float32)
    same = [p.copy() for p in params]
    a, b = fastopt.Adafactor(params), fastopt.Adafactor(same)
    grads = make_grads(rng, params, 0)
    a.step([g * 1024 for g in grads], grad_scale=1024.0)
    b.step(grads)
    for x, y in zip(params, same):
        assert_bits(x, y)
    snap = Snapshot(*params, *[v for st in a.state for v in st.values()])
    steps = a.steps.copy()
    bad = [g.copy() for g in grads]
    bad[1][3, 4] = np.inf
    a.step(bad, grad_scale=2.0)
    assert a.found_inf
    snap.assert_unchanged()
    np.testing.assert_array_equal(a.steps, steps)


def test_checkpoint_round_trip_through_npz(tmp_path, rng):
    init = make_params(np.random.default_rng(0), SHAPES, np.float32)
    params = [p.copy() for p in init]
    opt = build({}, params)
    for t in range(6):
        opt.step(make_grads(np.random.default_rng(t), params, t))
    sd = opt.state_dict()
    assert np.isnan(sd["param_groups.0.eps"][0]) and sd["param_groups.0.eps"][1] == 1e-3
    np.savez(tmp_path / "ckpt.npz", **sd)
    saved = [p.copy() for p in params]
    again = build({"eps": (1e-30, 1e-3)}, saved)
    with np.load(tmp_path / "ckpt.npz") as f:        # (no pickle needed)
        again.load_state_dict(dict(f))
    assert again.param_groups[0]["eps"] == (None, 1e-3)
    for t in range(6, 10):
        g = make_grads(np.random.default_rng(t), params, t)
        opt.step(g)
        again.step(g)
    for a, b in zip(params, saved):
        assert_bits(a, b)


def test_add_param_group_continues_like_one_optimizer_built_with_both(rng):
    p1 = make_params(rng, [(3, 5), (70,)], np.float32)
    p2 = make_params(rng, [(4, 6), ()], np.float32)
    a1, a2 = [p.copy() for p in p1], [p.copy() for p in p2]
    b1, b2 = [p.copy() for p in p1], [p.copy() for p in p2]
    a = fastopt.Adafactor(a1)
    b = fastopt.Adafactor([{"params": b1}, {"params": b2, **GROUP1}])
    for t in range(4):
        g = make_grads(rng, p1, t)
        a.step(g)
        b.step(g + [None, None])
    a.add_param_group({"params": a2, **GROUP1})
    for t in range(4, 8):
        g = make_grads(rng, p1 + p2, t)
        a.step(g)
        b.step(g)
    for x, y in zip(a1 + a2, b1 + b2):
        assert_bits(x, y)


@pytest.mark.parametrize("kw, err, msg", [
    (dict(lr=-1.0), ValueError, "lr"),
    (dict(beta2_decay=0.1), ValueError, "beta2_decay must be <= 0"),
    (dict(eps=(-1e-3, 1e-3)), ValueError, r"eps\[0\]"),
    (dict(eps=(None, -1.0)), ValueError, r"eps\[1\]"),
    (dict(eps=(None, None)), TypeError, r"eps\[1\]"),
    (dict(d=0.5), ValueError, "d must be"),
    (dict(weight_decay=-0.1), ValueError, "weight_decay"),
    (dict(eps=1e-3), TypeError, "eps"),
    (dict(state_dtype="bfloat16"), ValueError, "state_dtype"),
])
def test_bad_hyperparameters_are_refused(kw, err, msg):
    if kw.get("state_dtype"):
        pytest.importorskip("ml_dtypes")
    with pytest.raises(err, match=msg):
        fastopt.Adafactor([np.zeros((2, 3), np.float32)], **kw)


def test_bad_group_value_at_step_changes_nothing(rng):
    params = make_params(rng, [(4, 5), (6,)], np.float64)
    opt = fastopt.Adafactor(params)
    opt.step(make_grads(rng, params, 0))
    snap = Snapshot(*params, *[v for st in opt.state for v in st.values()])
    steps = opt.steps.copy()
    for key, bad, msg in [("d", 0.0, r"\['d'\] must be >= 1"),
                          ("eps", (None, -1.0), r"\['eps'\]\[1\] must be >= 0"),
                          ("beta2_decay", 0.5, r"\['beta2_decay'\] must be <= 0")]:
        good = opt.param_groups[0][key]
        opt.param_groups[0][key] = bad
        with pytest.raises(ValueError, match=msg):
            opt.step(make_grads(rng, params, 1))
        opt.param_groups[0][key] = good
        snap.assert_unchanged()
        np.testing.assert_array_equal(opt.steps, steps)


def test_state_edits(rng):
    """A cleared entry restarts from zero state; an array of the wrong shape
    is refused at the step, naming it, with nothing changed."""
    params = make_params(rng, [(4, 5), (6,)], np.float64)
    opt = fastopt.Adafactor(params)
    for t in range(3):
        opt.step(make_grads(rng, params, t))
    opt.state[0]["row_var"] = np.zeros((4, 5))
    snap = Snapshot(*params, opt.state[1]["variance"])
    with pytest.raises(ValueError, match=re.escape("state[0]['row_var'] must have shape (4, 1)")):
        opt.step(make_grads(rng, params, 3))
    snap.assert_unchanged()
    opt.state[0] = {}
    fresh = fastopt.Adafactor([params[0].copy()])
    g = make_grads(rng, params, 4)
    opt.step(g)
    fresh.step(g[:1])
    assert opt.steps[0] == 1
    np.testing.assert_array_equal(opt.state[0]["row_var"], fresh.state[0]["row_var"])
