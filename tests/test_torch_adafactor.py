"""fastopt.torch.Adafactor against torch.optim.Adafactor (skipped without torch).

torch.optim.Adafactor runs its single-tensor implementation (its default);
in float64 the trajectories of 50 steps agree to 1e-12 relative, in
float32 fastopt is within torch's own float32 error (against float64).  The
state (names, shapes, dtypes, values) is torch's, so checkpoints move both
ways.  Its update factors the last two dimensions of a parameter: the
parameters must be contiguous; a non-contiguous one, bfloat16 state and
split masters are refused, naming what is wrong, changing nothing."""
import copy
import io
import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")
fo = pytest.importorskip("fastopt.torch")
if not hasattr(torch.optim, "Adafactor"):
    pytest.skip("torch.optim.Adafactor needs torch 2.5 or later", allow_module_level=True)
import fastopt  # noqa: E402
from conftest import num_threads  # noqa: E402

F64 = torch.float64
# 0-d, 1-d, 2-d, 3-d, size-1 rows or columns; last dimensions around SIMD
# widths (7, 8, 15, 16, 17, 33); (9, 4100): two column blocks and two row
# blocks of the kernel's units (4096 columns); 65553: three vector chunks.
SHAPES = [(), (5,), (17,), (3, 4), (7, 8), (5, 15), (2, 16), (4, 17), (2, 3, 33), (1, 7),
          (7, 1), (1, 1), (2, 1, 5), (3, 6, 1)]
LARGE = [(9, 4100), (65553,), (3, 40, 1000)]

OPTIONS = [
    {},
    {"weight_decay": 0.1},
    {"maximize": True},
    {"maximize": True, "weight_decay": 0.3},
    {"d": 2.0},
    {"d": 1e6},                             # never clips
    {"eps": (None, 1e-3)},
    {"eps": (1e-30, 1e-3)},
    {"eps": (1e-2, 1e-1)},                  # eps[0] that bites: a floor under the variance
    {"eps": (0.0, 0.0)},
    {"eps": [None, 0.5]},                   # a list, as torch takes it
    {"beta2_decay": -0.5},
    {"beta2_decay": -1.0},
    {"beta2_decay": 0.0},                   # no average: this step's squares
    {"lr": 0.1},
    {"lr": 1e-4},
    {"lr": 0.0, "weight_decay": 0.5},
    {"lr": 0.05, "beta2_decay": -0.6, "eps": (1e-20, 1e-2), "d": 1.5, "weight_decay": 0.01,
     "maximize": True},
]
OPTION_IDS = ["-".join(f"{k}={v}" for k, v in o.items()) or "default" for o in OPTIONS]


def make(shapes, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, dtype=F64, generator=g).to(dtype)) for s in shapes]


def twin(params, dtype=None):
    return [torch.nn.Parameter(p.detach().clone().to(dtype or p.dtype)) for p in params]


def set_grads(seed, *lists, none=()):
    """The same random gradients on every list (each in its parameters' dtype)."""
    g = torch.Generator().manual_seed(seed)
    for i, ps in enumerate(zip(*lists)):
        v = torch.randn(ps[0].shape, dtype=F64, generator=g)
        for p in ps:
            p.grad = None if i in none else v.to(p.dtype)


def run(opts, lists, steps, seed=100, none_every=0):
    for t in range(steps):
        none = {t % len(lists[0])} if none_every and t % none_every == 0 else ()
        set_grads(seed + t, *lists, none=none)
        for o in opts:
            o.step()


def pair(shapes=SHAPES, dtype=F64, seed=0, **kwargs):
    ps = make(shapes, dtype, seed)
    qs = twin(ps)
    return ps, qs, fo.Adafactor(ps, **kwargs), torch.optim.Adafactor(qs, **kwargs)


def assert_close(ps, qs, rtol=1e-12, atol=1e-14):
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=rtol, atol=atol)


def assert_same_state(a, ps, b, qs, rtol=1e-12, atol=1e-14, strides=True):
    """fastopt's state is torch's: the same entries, names in torch's order,
    shapes, strides (unless not `strides`), dtypes and values."""
    assert len(a.state) == len(b.state)
    for p, q in zip(ps, qs):
        sa, sb = a.state.get(p, {}), b.state.get(q, {})
        assert list(sa) == list(sb)
        for k in sa:
            assert sa[k].shape == sb[k].shape and sa[k].dtype == sb[k].dtype, k
            assert sa[k].stride() == sb[k].stride() or not strides, k
            torch.testing.assert_close(sa[k], sb[k], rtol=rtol, atol=atol)


def snapshot(opt):
    return (copy.deepcopy(opt.state_dict()),
            [p.detach().clone() for g in opt.param_groups for p in g["params"]])


def assert_unchanged(opt, snap):
    sd, params = snap
    now = opt.state_dict()
    assert now["param_groups"] == sd["param_groups"]
    assert now["state"].keys() == sd["state"].keys()
    for i, st in sd["state"].items():
        assert list(now["state"][i]) == list(st)
        for k, v in st.items():
            assert torch.equal(now["state"][i][k], v), (i, k)
    for p, q in zip((p for g in opt.param_groups for p in g["params"]), params):
        assert torch.equal(p.detach(), q)


def roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf)


# ---------------------------------------------------------------- results ---

@pytest.mark.parametrize("kwargs", OPTIONS, ids=OPTION_IDS)
def test_50_steps_match_torch_float64(kwargs):
    ps, qs, a, b = pair(**kwargs)
    run((a, b), (ps, qs), 50, none_every=6)
    assert_close(ps, qs)
    assert_same_state(a, ps, b, qs)
    for p in ps:
        assert a.state[p]["step"].dtype == torch.float32 and a.state[p]["step"].dim() == 0


@pytest.mark.parametrize("kwargs", [{}, {"weight_decay": 0.1, "maximize": True, "d": 1.5}],
                         ids=["default", "options"])
def test_large_parameters_match_torch_float64(kwargs):
    ps, qs, a, b = pair(LARGE, **kwargs)
    run((a, b), (ps, qs), 12)
    assert_close(ps, qs)
    assert_same_state(a, ps, b, qs)


def test_param_groups_with_their_own_options():
    def groups(p):
        return [{"params": p[:4]},
                {"params": p[4:8], "lr": 0.1, "eps": (1e-3, 1e-2), "maximize": True},
                {"params": p[8:11], "weight_decay": 0.2, "beta2_decay": -0.5},
                {"params": p[11:], "d": 3.0, "eps": (None, 0.0)}]
    ps = make(SHAPES)
    qs = twin(ps)
    a = fo.Adafactor(groups(ps), lr=0.02)
    b = torch.optim.Adafactor(groups(qs), lr=0.02, foreach=False)
    run((a, b), (ps, qs), 40, none_every=5)
    assert_close(ps, qs)
    assert_same_state(a, ps, b, qs)
    # hyperparameters edited between steps, as torch reads them at each step
    for o in (a, b):
        o.param_groups[1]["lr"] = 0.003
        o.param_groups[2]["eps"] = (1e-5, 1e-3)
        o.param_groups[0]["weight_decay"] = 0.05
    run((a, b), (ps, qs), 10, seed=7)
    assert_close(ps, qs)


def test_tensor_lr():
    # (a float64 tensor: torch computes with a float32 one in float32)
    ps, qs, a, b = pair(lr=torch.tensor(0.05, dtype=F64))
    run((a, b), (ps, qs), 20)
    assert_close(ps, qs)


@pytest.mark.parametrize("kwargs", [{}, {"weight_decay": 0.1, "maximize": True,
                                         "eps": (1e-3, 1e-2)},
                                    {"lr": 0.1, "beta2_decay": -0.5, "d": 2.0}],
                         ids=["default", "wd-maximize-eps", "lr-beta2-d"])
def test_float32_within_torchs_own_float32_error(kwargs):
    shapes = SHAPES + LARGE
    p32 = make(shapes, torch.float32)
    q32 = twin(p32)
    ref = twin(p32, F64)                # the same float32 values, stepped in float64
    a = fo.Adafactor(p32, **kwargs)
    b = torch.optim.Adafactor(q32, foreach=False, **kwargs)
    c = torch.optim.Adafactor(ref, foreach=False, **kwargs)
    # (float32 gradients, the same values in float64 for the reference)
    for t in range(20):
        set_grads(t, p32, q32)
        for p, r in zip(p32, ref):
            r.grad = p.grad.to(F64)
        for o in (a, b, c):
            o.step()
    for p, q, r in zip(p32, q32, ref):
        ours = (p.detach().to(F64) - r.detach()).abs().max().item()
        theirs = (q.detach().to(F64) - r.detach()).abs().max().item()
        scale = r.detach().abs().max().item()
        assert ours <= 4 * theirs + 2e-7 * scale, (tuple(p.shape), ours, theirs)
    for p, r in zip(p32, ref):
        for k, v in a.state[p].items():
            assert v.dtype == torch.float32
            if k != "step":
                torch.testing.assert_close(v.to(F64), c.state[r][k], rtol=1e-4, atol=1e-7)


def test_empty_parameters_step_and_keep_their_state():
    # (torch.optim.Adafactor divides by zero on an empty parameter)
    ps = make([(0,), (0, 3), (3, 0), (2, 0, 4), (3, 4)])
    qs = twin(ps[4:])
    a = fo.Adafactor(ps, weight_decay=0.1)
    b = torch.optim.Adafactor(qs, weight_decay=0.1, foreach=False)
    for t in range(5):
        set_grads(t, ps)
        qs[0].grad = ps[4].grad.clone()
        a.step()
        b.step()
    assert_close(ps[4:], qs)
    shapes = {k: tuple(v.shape) for k, v in a.state[ps[1]].items()}
    assert shapes == {"step": (), "row_var": (0, 1), "col_var": (1, 3)}
    assert tuple(a.state[ps[0]]["variance"].shape) == (0,)
    assert all(float(a.state[p]["step"]) == 5 for p in ps)


def test_one_and_two_threads_identical():
    shapes = [(600, 300), (100_003,), (4, 70, 130), (7,), (3, 5)]
    results = []
    for n in (1, 2):
        ps = make(shapes, torch.float32)
        a = fo.Adafactor(ps, weight_decay=0.01)
        with num_threads(n):
            run((a,), (ps,), 5)
        results.append(([p.detach().clone() for p in ps],
                        [{k: v.clone() for k, v in a.state[p].items()} for p in ps]))
    (p1, s1), (p2, s2) = results
    for x, y in zip(p1, p2):
        assert torch.equal(x, y)
    for x, y in zip(s1, s2):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


# ------------------------------------------------------ the torch interface ---

def test_is_a_torch_adafactor_with_torch_defaults():
    p = [torch.nn.Parameter(torch.zeros(3, 2))]
    a, b = fo.Adafactor(p), torch.optim.Adafactor(p)
    assert isinstance(a, torch.optim.Adafactor) and isinstance(a, torch.optim.Optimizer)
    assert a.defaults == b.defaults
    assert a.param_groups[0].keys() == b.param_groups[0].keys()
    assert a._step_supports_amp_scaling
    assert "Adafactor" in fo.__all__


@pytest.mark.parametrize("foreach", [None, False, True])
def test_foreach_is_kept_and_the_step_is_the_same(foreach):
    ps, qs, a, b = pair()
    c_ps = twin(ps)
    c = fo.Adafactor(c_ps, foreach=foreach)
    assert c.param_groups[0]["foreach"] is foreach and c.defaults["foreach"] is foreach
    run((a, b, c), (ps, qs, c_ps), 5)
    assert all(torch.equal(x, y) for x, y in zip(ps, c_ps))


def test_keywords_as_torch_takes_them():
    p = [torch.nn.Parameter(torch.zeros(3))]
    for make_opt in (torch.optim.Adafactor, fo.Adafactor):
        with pytest.raises(TypeError):
            make_opt(p, 1e-2, -0.8, (None, 1e-3), 1.0, 0.0, None)   # foreach is keyword-only
        with pytest.raises(TypeError):
            make_opt(p, capturable=True)
        with pytest.raises(TypeError):
            make_opt(p, fused=True)
    a = fo.Adafactor(p, maximize=True, foreach=False)
    assert a.param_groups[0]["maximize"] is True


BAD = [{"lr": -1.0}, {"beta2_decay": 0.5}, {"eps": (-1.0, 1e-3)}, {"eps": (None, -1.0)},
       {"d": 0.5}, {"weight_decay": -0.1}, {"lr": torch.tensor([0.1, 0.2])}]


@pytest.mark.parametrize("kwargs", BAD, ids=[str(k) for k in BAD])
def test_bad_hyperparameters_raise_as_torch(kwargs):
    p = [torch.nn.Parameter(torch.zeros(3, 2))]
    with pytest.raises(ValueError) as theirs:
        torch.optim.Adafactor(p, **kwargs)
    with pytest.raises(ValueError, match=re.escape(str(theirs.value))):
        fo.Adafactor(p, **kwargs)


@pytest.mark.parametrize("key, value", [("lr", -1.0), ("beta2_decay", 0.5), ("d", 0.5),
                                        ("eps", (-1.0, 1e-3)), ("eps", (None, float("nan"))),
                                        ("weight_decay", float("inf"))])
def test_bad_hyperparameter_set_in_a_group_raises_at_the_step(key, value):
    ps, qs, a, b = pair()
    run((a, b), (ps, qs), 2)
    a.param_groups[0][key] = value
    set_grads(9, ps)
    before = snapshot(a)
    with pytest.raises(ValueError, match=key):
        a.step()
    assert_unchanged(a, before)


def test_lr_scheduler_drives_it():
    ps, qs, a, b = pair()
    sa = torch.optim.lr_scheduler.StepLR(a, 3, gamma=0.5)
    sb = torch.optim.lr_scheduler.StepLR(b, 3, gamma=0.5)
    for t in range(10):
        set_grads(t, ps, qs)
        a.step()
        b.step()
        sa.step()
        sb.step()
    assert a.param_groups[0]["lr"] == b.param_groups[0]["lr"]
    assert_close(ps, qs)


# ---------------------------------------------------------- state dicts ---

@pytest.mark.parametrize("direction", ["torch_to_fastopt", "fastopt_to_torch"])
@pytest.mark.parametrize("kwargs", [{}, {"weight_decay": 0.1, "eps": (1e-3, 1e-2),
                                         "maximize": True}], ids=["default", "options"])
def test_checkpoints_move_between_torch_and_fastopt(direction, kwargs):
    ps, qs, a, b = pair(**kwargs)
    first, src, second, dst = (b, qs, a, ps) if direction == "torch_to_fastopt" else (a, ps, b, qs)
    run((first,), (src,), 6, none_every=4)
    sd = roundtrip(first.state_dict())
    assert all(isinstance(v, dict) for v in sd["state"].values())
    for d, s in zip(dst, src):
        d.data.copy_(s.detach())
    second.load_state_dict(sd)
    assert second.state_dict()["param_groups"] == first.state_dict()["param_groups"]
    assert_same_state(a, ps, b, qs, rtol=0, atol=0)
    run((a, b), (ps, qs), 20, seed=50, none_every=3)
    assert_close(ps, qs)
    assert_same_state(a, ps, b, qs)


def test_checkpoint_into_a_fresh_fastopt_continues_bit_for_bit():
    ps, qs, a, b = pair(weight_decay=0.1)
    run((a,), (ps,), 5)
    c_ps = twin(ps)
    c = fo.Adafactor(c_ps, weight_decay=0.1)
    c.load_state_dict(roundtrip(a.state_dict()))
    run((a, c), (ps, c_ps), 5, seed=30)
    assert all(torch.equal(x, y) for x, y in zip(ps, c_ps))


def test_state_dict_is_torchs():
    ps, qs, a, b = pair()
    set_grads(0, ps, qs, none={1})
    a.step()
    b.step()
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["param_groups"][0]["eps"] == (None, 1e-3)
    assert "fastopt" not in sa
    assert sa["state"].keys() == sb["state"].keys()
    for i, st in sa["state"].items():
        assert list(st) == list(sb["state"][i])
        for k, v in st.items():
            assert v.shape == sb["state"][i][k].shape and v.dtype == sb["state"][i][k].dtype
    assert list(sa["state"][3]) == ["step", "row_var", "col_var"]
    assert list(sa["state"][0]) == ["step", "variance"]


BAD_LOADS = [
    ("row_var-shape", lambda st: {**st, "row_var": torch.zeros(3, 4, dtype=F64)},
     ValueError, r"state\['row_var'\] of param_groups\[0\]\['params'\]\[3\] has shape \(3, 4\) "
                 r"but must have shape \(3, 1\)"),
    ("col_var-as-row", lambda st: {**st, "col_var": torch.zeros(3, 1, dtype=F64)},
     ValueError, r"state\['col_var'\] .* must have shape \(1, 4\)"),
    ("no-col_var", lambda st: {k: v for k, v in st.items() if k != "col_var"},
     ValueError, r"has no 'col_var'"),
    ("variance-instead", lambda st: {"step": st["step"], "variance": torch.zeros(3, 4, dtype=F64)},
     ValueError, r"has no 'row_var'"),
    ("int-row_var", lambda st: {**st, "row_var": torch.zeros(3, 1, dtype=torch.int64)},
     TypeError, r"row_var"),
    ("no-step", lambda st: {k: v for k, v in st.items() if k != "step"},
     ValueError, r"has no 'step'"),
]


@pytest.mark.parametrize("label, edit, exc, match", BAD_LOADS, ids=[b[0] for b in BAD_LOADS])
def test_bad_checkpoints_load_nothing(label, edit, exc, match):
    ps, qs, a, b = pair()
    run((a, b), (ps, qs), 3)
    good = copy.deepcopy(b.state_dict())
    bad = copy.deepcopy(good)
    bad["state"][3] = edit(bad["state"][3])         # the (3, 4) parameter
    before = snapshot(a)
    with pytest.raises(exc, match=match):
        a.load_state_dict(bad)
    assert_unchanged(a, before)
    run((a, b), (ps, qs), 3, seed=9)
    assert_close(ps, qs)


def test_a_vector_entry_with_the_wrong_shape_is_refused():
    ps, qs, a, b = pair()
    run((a, b), (ps, qs), 2)
    bad = copy.deepcopy(b.state_dict())
    bad["state"][1]["variance"] = torch.zeros(5, 1, dtype=F64)     # the (5,) parameter
    before = snapshot(a)
    with pytest.raises(ValueError, match=r"state\['variance'\] of param_groups\[0\]\['params'\]"
                                         r"\[1\] has shape \(5, 1\) but the parameter has shape"):
        a.load_state_dict(bad)
    assert_unchanged(a, before)


def test_deepcopy_continues_identically():
    ps, qs, a, b = pair()
    run((a,), (ps,), 3)
    c = copy.deepcopy(a)
    c_ps = [p for g in c.param_groups for p in g["params"]]
    run((a, c), (ps, c_ps), 4, seed=40)
    assert all(torch.equal(x, y) for x, y in zip(ps, c_ps))


# ---------------------------------------------------------- state edits ---

@pytest.mark.parametrize("how", ["clear", "empty_entry", "del_entry"])
def test_cleared_state_restarts_as_torch(how):
    ps, qs, a, b = pair(weight_decay=0.1)
    run((a, b), (ps, qs), 4)
    old = {k: v.clone() for k, v in a.state[ps[3]].items()}
    live = dict(a.state[ps[3]])
    for opt, params in ((a, ps), (b, qs)):
        if how == "clear":
            opt.state.clear()
        elif how == "empty_entry":
            opt.state[params[3]] = {}
        else:
            del opt.state[params[3]]
    run((a, b), (ps, qs), 5, seed=200)
    assert_close(ps, qs)
    assert_same_state(a, ps, b, qs)
    assert float(a.state[ps[3]]["step"]) == 5
    for k, v in live.items():           # the tensors the old entry held are left as they were
        assert torch.equal(v, old[k])


def test_assigned_state_tensors_are_used_in_place():
    ps, qs, a, b = pair()
    run((a, b), (ps, qs), 3)
    assigned = {}
    for opt, params in ((a, ps), (b, qs)):
        for i in (0, 3, 8):             # 0-d, (3, 4), (2, 3, 33)
            st = opt.state[params[i]]
            for k in list(st):
                if k == "step":
                    st[k] = torch.tensor(1.0)
                else:
                    st[k] = st[k].clone() * 0.5
                if opt is a:
                    assigned[(i, k)] = st[k]
    run((a, b), (ps, qs), 4, seed=300)
    assert_close(ps, qs)
    assert_same_state(a, ps, b, qs)
    for (i, k), t in assigned.items():
        assert a.state[ps[i]][k] is t
    assert float(assigned[(3, "step")]) == 5


def test_assigned_state_with_other_strides_is_copied():
    ps, qs, a, b = pair(shapes=[(3, 4), (2, 5, 6)])
    run((a, b), (ps, qs), 2)
    for opt, params in ((a, ps), (b, qs)):
        st = opt.state[params[1]]
        v = st["col_var"]                               # (2, 1, 6)
        st["col_var"] = v.permute(2, 1, 0).contiguous().permute(2, 1, 0)
    given = a.state[ps[1]]["col_var"]
    run((a, b), (ps, qs), 4, seed=5)
    assert_close(ps, qs)
    kept = a.state[ps[1]]["col_var"]
    assert kept is not given and kept.is_contiguous()       # (torch's keeps the strides given)
    assert_same_state(a, ps, b, qs, strides=False)


@pytest.mark.parametrize("key, value, exc, match", [
    ("row_var", torch.zeros(3, 4, dtype=F64), ValueError,
     r"state\['row_var'\] of param_groups\[0\]\['params'\]\[3\] has shape \(3, 4\) but must "
     r"have shape \(3, 1\) \(its parameter's shape is \(3, 4\)\)"),
    ("col_var", torch.zeros(4, dtype=F64), ValueError, r"must have shape \(1, 4\)"),
    ("row_var", torch.zeros(3, 1, dtype=torch.float32), TypeError, r"dtype torch.float32"),
    ("row_var", [0.0, 0.0, 0.0], TypeError, r"must be a tensor"),
])
def test_assigned_state_tensor_of_the_wrong_kind_is_refused(key, value, exc, match):
    ps, qs, a, b = pair()
    run((a, b), (ps, qs), 2)
    right = a.state[ps[3]][key]
    right_values = right.clone()
    a.state[ps[3]][key] = value
    set_grads(5, ps, qs)
    params = [p.detach().clone() for p in ps]
    state = {i: {k: v.clone() for k, v in a.state[p].items()
                 if isinstance(v, torch.Tensor) and not (i == 3 and k == key)}
             for i, p in enumerate(ps)}
    with pytest.raises(exc, match=match):
        a.step()
    assert all(torch.equal(p.detach(), q) for p, q in zip(ps, params))
    for i, p in enumerate(ps):
        for k, v in state[i].items():
            assert torch.equal(a.state[p][k], v), (i, k)
    assert torch.equal(right, right_values)
    # the right tensor again: it carries on as torch does
    a.state[ps[3]][key] = right
    for o in (a, b):
        o.step()
    assert_close(ps, qs)


def test_a_missing_slot_is_refused_at_the_step():
    ps, qs, a, b = pair()
    run((a, b), (ps, qs), 2)
    del a.state[ps[3]]["col_var"]
    set_grads(5, ps)
    before = [p.detach().clone() for p in ps]
    with pytest.raises(ValueError, match=r"the state of param_groups\[0\]\['params'\]\[3\] has "
                                         r"no 'col_var'"):
        a.step()
    assert all(torch.equal(p.detach(), q) for p, q in zip(ps, before))


def test_state_written_in_place_reaches_the_step():
    ps, qs, a, b = pair()
    run((a, b), (ps, qs), 3)
    for opt, params in ((a, ps), (b, qs)):
        for p in params:
            for k, v in opt.state[p].items():
                v.mul_(0.25) if k != "step" else v.sub_(1)
    run((a, b), (ps, qs), 3, seed=5)
    assert_close(ps, qs)


def test_param_reshaped_between_steps_is_checked():
    ps, qs, a, b = pair(shapes=[(3, 4), (6,)])
    run((a, b), (ps, qs), 2)
    for p, q in zip(ps, qs):            # new data of the same shape: state kept, as torch
        new = torch.randn(p.shape, dtype=F64)
        p.data, q.data = new.clone(), new.clone()
    run((a, b), (ps, qs), 3, seed=3)
    assert_close(ps, qs)
    ps[0].data = torch.zeros(4, 3, dtype=F64)
    set_grads(0, ps)
    with pytest.raises(ValueError, match=r"state\['row_var'\] of param_groups\[0\]\['params'\]"
                                         r"\[0\] has shape \(3, 1\) but must have shape \(4, 1\)"):
        a.step()


# ------------------------------------------------------------ refusals ---

def test_non_contiguous_parameters_are_refused():
    w = torch.nn.Parameter(torch.randn(4, 3, 2, 5).to(memory_format=torch.channels_last))
    v = torch.nn.Parameter(torch.randn(4, 3))
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[1\] \(shape \(4, 3, 2, "
                                         r"5\), strides \(30, 1, 15, 3\)\) is not contiguous"):
        fo.Adafactor([v, w])
    t = torch.nn.Parameter(torch.randn(5, 4).t())           # a transposed view
    with pytest.raises(ValueError, match="contiguous"):
        fo.Adafactor([t])
    # one whose size-1 dimensions have odd strides is contiguous: taken
    odd = torch.nn.Parameter(torch.randn(6, 1, 3).transpose(0, 1).squeeze(0).unsqueeze(1))
    fo.Adafactor([odd])
    # add_param_group: refused, nothing added
    ps, qs, a, b = pair()
    run((a, b), (ps, qs), 2)
    before = snapshot(a)
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['params'\]\[0\] .* not contiguous"):
        a.add_param_group({"params": [w]})
    assert len(a.param_groups) == 1
    assert_unchanged(a, before)
    # data replaced by a non-contiguous tensor: refused at the step
    ps[3].data = torch.randn(4, 3, dtype=F64).t()
    set_grads(3, ps)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[3\] .* not contiguous"):
        a.step()


def test_bfloat16_state_and_split_masters_are_refused():
    p = [torch.nn.Parameter(torch.randn(3, 4, dtype=torch.bfloat16))]
    with pytest.raises(ValueError, match="state_dtype must be None, got 'bfloat16'"):
        fo.Adafactor(p, state_dtype="bfloat16")
    with pytest.raises(ValueError, match="state_dtype must be None, got 'float16'"):
        fo.Adafactor(p, state_dtype="float16")
    with pytest.raises(ValueError, match="split_master=True is not supported"):
        fo.Adafactor(p, split_master=True)
    with pytest.raises(ValueError, match="split_master=True is not supported"):
        fo.Adafactor([torch.nn.Parameter(torch.zeros(3))], split_master=True)
    a = fo.Adafactor(p, state_rounding="nearest", seed=4)     # (kept; unused)
    assert a.state_dtype is None


# ------------------------------------------------------- 16-bit, GradScaler ---

HALF = [pytest.param(torch.bfloat16, id="bfloat16"), pytest.param(torch.float16, id="float16")]


@pytest.mark.parametrize("dtype", HALF)
def test_16bit_params_match_the_numpy_api_and_torch_float32(dtype):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    npdt = np.dtype(ml_dtypes.bfloat16) if dtype == torch.bfloat16 else np.dtype(np.float16)

    def to_numpy(t):
        t = t.detach()
        return (t.view(torch.int16).numpy().view(npdt) if dtype == torch.bfloat16
                else t.numpy())
    shapes = [(3, 4), (17,), (), (2, 5, 33), (1, 9)]
    ps = make(shapes, dtype)
    ref = twin(ps, torch.float32)         # torch in float32 from the same values
    arrays = [to_numpy(p).copy() for p in ps]
    kw = {"weight_decay": 0.1, "lr": 0.05}
    a = fo.Adafactor(ps, **kw)
    b = fastopt.Adafactor(arrays, **kw)
    c = torch.optim.Adafactor(ref, foreach=False, **kw)
    for t in range(8):
        set_grads(t, ps)
        for p, r in zip(ps, ref):
            r.grad = p.grad.to(torch.float32)
        a.step()
        b.step([to_numpy(p.grad).copy() for p in ps])
        c.step()
    for i, p in enumerate(ps):
        np.testing.assert_array_equal(to_numpy(p).view(np.uint16), arrays[i].view(np.uint16))
        st = a.state[p]
        assert list(st) == list(c.state[ref[i]]) + ["master_param"]
        m = st["master_param"]
        assert m.dtype == torch.float32 and m.shape == p.shape and m.is_contiguous()
        np.testing.assert_array_equal(m.numpy(), b.state[i]["master_param"])
        assert torch.equal(m.to(dtype), p.detach())
        # float32 masters: torch's float32 trajectory (eps[0] None: float32's epsilon)
        torch.testing.assert_close(m, ref[i].detach(), rtol=1e-5, atol=1e-6)
        for k, v in st.items():
            if k not in ("step", "master_param"):
                assert v.dtype == torch.float32
                np.testing.assert_array_equal(v.numpy(), b.state[i][k])


@pytest.mark.parametrize("dtype", HALF)
def test_16bit_checkpoints_keep_float32_state_and_masters(dtype):
    if dtype == torch.bfloat16:
        pytest.importorskip("ml_dtypes")
    ps = make([(3, 4), (5,), (2, 3, 4)], dtype)
    a = fo.Adafactor(ps)
    run((a,), (ps,), 3)
    sd = copy.deepcopy(a.state_dict())
    assert sd["state"][0]["row_var"].dtype == torch.float32
    assert sd["state"][0]["master_param"].dtype == torch.float32
    qs = twin(ps)
    b = fo.Adafactor(qs)
    b.load_state_dict(sd)
    for k in ("master_param", "row_var", "col_var", "step"):
        assert torch.equal(b.state[qs[2]][k], a.state[ps[2]][k])
    run((a, b), (ps, qs), 3, seed=20)
    assert all(torch.equal(p, q) for p, q in zip(ps, qs))
    # a torch.optim checkpoint (no masters, state in the parameter's dtype)
    # loads: the masters are the parameters
    t_ps = twin(ps)
    t = torch.optim.Adafactor(t_ps, foreach=False)
    run((t,), (t_ps,), 2)
    rs = twin(t_ps)
    c = fo.Adafactor(rs)
    c.load_state_dict(t.state_dict())
    for r in rs:
        assert torch.equal(c.state[r]["master_param"].to(dtype), r.detach())
        assert c.state[r]["step"].item() == 2
    run((c,), (rs,), 2)


def _scaler_run(opt_cls, steps=12):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    model = model.double()
    opt = opt_cls(model.parameters(), lr=0.05, weight_decay=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=3)
    x = torch.randn(32, 8, dtype=F64, generator=torch.Generator().manual_seed(1))
    scales = []
    for t in range(steps):
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        scaler.scale(loss).backward()
        if t in (2, 7):                 # an overflow: the step must be skipped
            next(model.parameters()).grad[0, 0] = float("inf")
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
    return scales, [p.detach().clone() for p in model.parameters()], opt


def test_grad_scaler_uses_the_fused_contract(monkeypatch):
    calls = []
    real = torch._amp_foreach_non_finite_check_and_unscale_
    monkeypatch.setattr(torch, "_amp_foreach_non_finite_check_and_unscale_",
                        lambda g, f, inv: (calls.append(float(inv)), real(g, f, inv))[1])
    s1, p1, o1 = _scaler_run(fo.Adafactor)
    assert set(calls) == {1.0}          # only the inf check: the step divides by the scale
    calls.clear()
    s2, p2, o2 = _scaler_run(lambda *a, **k: torch.optim.Adafactor(*a, foreach=False, **k))
    assert calls and set(calls) != {1.0}    # torch's: the gradients unscaled in place
    assert s1 == s2
    for x, y in zip(p1, p2):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-14)
    for p in o1.param_groups[0]["params"]:
        assert float(o1.state[p]["step"]) == 10          # two skipped


def test_step_takes_grad_scale_and_found_inf():
    ps, qs, a, b = pair(shapes=[(3, 4), (5,)])
    set_grads(0, ps, qs)
    for p in ps:
        p.grad.mul_(256)
    a.step(grad_scale=torch.tensor(256.0), found_inf=torch.tensor(0.0))
    b.step()
    assert_close(ps, qs)
    before = snapshot(a)
    a.step(grad_scale=256.0, found_inf=torch.tensor(1.0))
    assert_unchanged(a, before)
