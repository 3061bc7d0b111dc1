"""fastopt.torch: ``opt.state`` is what the next step uses.

Every way torch users touch an optimizer's state (clear it, drop or replace
an entry, assign a tensor to a key, replace ``opt.state`` itself) takes
effect at the next step as it does in torch.optim: checked against
torch.optim doing the same (float64, rtol 1e-12: fastopt's fused
arithmetic and torch's differ by rounding even without any edit), and bit
for bit against a fastopt optimizer that never saw the edit (a fresh one,
or one given the same values through ``load_state_dict``).  A bad edit is
refused at the step, naming the parameter, and changes nothing."""
import collections
import copy
import pickle

import pytest

torch = pytest.importorskip("torch")
fo = pytest.importorskip("fastopt.torch")
from test_torch_optim import CASES, IDS, assert_same, pair, run, set_grads, twin  # noqa: E402

EDITS = ["clear", "empty_entry", "del_entry", "replace_state"]


def edit_state(opt, p, how):
    if how == "clear":
        opt.state.clear()
    elif how == "empty_entry":
        opt.state[p] = {}
    elif how == "del_entry":
        del opt.state[p]
    else:
        opt.state = collections.defaultdict(dict)


def same_bits(ps, qs):
    return all(torch.equal(p.detach(), q.detach()) for p, q in zip(ps, qs))


@pytest.mark.parametrize("how", EDITS)
@pytest.mark.parametrize("name, kwargs", CASES, ids=IDS)
def test_reset_state_restarts_from_zero(name, kwargs, how):
    ps, qs, a, b = pair(name, kwargs)
    run((a, b), (ps, qs), 4)
    saved = copy.deepcopy(a.state_dict())
    live = a.state_dict()               # references to the live tensors, as torch's
    for opt, params in ((a, ps), (b, qs)):
        for p in (params if how in ("clear", "replace_state") else params[:1]):
            if how in ("empty_entry", "del_entry") and p not in opt.state:
                continue
            edit_state(opt, p, how)
    # What fastopt computes from here: a fresh optimizer over copies (for a
    # reset of every parameter), or the same with one entry reset.
    rs = twin(ps)
    c = getattr(fo, name)(rs, **kwargs)
    if how in ("empty_entry", "del_entry"):
        sd = copy.deepcopy(saved)
        sd["state"].pop(0, None)
        c.load_state_dict(sd)
    run((a, b, c), (ps, qs, rs), 5, seed=200)
    assert_same(ps, qs)
    assert same_bits(ps, rs)
    # the tensors the old state held are left as they were
    for pid, entry in live["state"].items():
        for k, v in entry.items():
            if isinstance(v, torch.Tensor) and (how in ("clear", "replace_state") or pid == 0):
                assert torch.equal(v, saved["state"][pid][k]), (pid, k)
    # and state_dict() is what the steps used: it continues in torch.optim
    d = getattr(torch.optim, name)(twin(ps), **kwargs)
    d.load_state_dict(a.state_dict())
    assert set(a.state_dict()["state"]) == set(b.state_dict()["state"])


ASSIGNED = [
    ("zeros_like", lambda v, p: torch.zeros_like(v)),
    ("to_copy", lambda v, p: v.to("cpu", copy=True)),
    ("clone_scaled", lambda v, p: v.clone() * 0.5),
    ("other_strides", lambda v, p: (v.clone().t().contiguous().t() if v.dim() == 2 else
                                    v.clone())),
]


@pytest.mark.parametrize("how, make", ASSIGNED, ids=[a for a, _ in ASSIGNED])
@pytest.mark.parametrize("name, kwargs", [c for c in CASES if c[0] != "SGD" or
                                          c[1].get("momentum")],
                         ids=[i for c, i in zip(CASES, IDS) if c[0] != "SGD" or
                              c[1].get("momentum")])
def test_assigned_state_tensors_are_used(name, kwargs, how, make):
    ps, qs, a, b = pair(name, kwargs)
    run((a, b), (ps, qs), 3)
    for opt, params in ((a, ps), (b, qs)):
        for p in params:
            entry = opt.state[p]
            for k in list(entry):
                if isinstance(entry[k], torch.Tensor):
                    entry[k] = make(entry[k], p) if k != "step" else torch.tensor(
                        float(entry[k]), dtype=entry[k].dtype)
    # the same values through load_state_dict, in a fastopt optimizer
    rs = twin(ps)
    c = getattr(fo, name)(rs, **kwargs)
    c.load_state_dict(copy.deepcopy(a.state_dict()))
    assigned = {id(v) for p in ps for v in a.state[p].values()}
    run((a, b, c), (ps, qs, rs), 4, seed=300)
    assert_same(ps, qs)
    assert same_bits(ps, rs)
    sd_a, sd_c = a.state_dict()["state"], c.state_dict()["state"]
    for pid in sd_c:
        for k, v in sd_c[pid].items():
            assert torch.equal(sd_a[pid][k], v), (pid, k)
    if how != "other_strides":
        # laid out like the parameter: the assigned tensors themselves were updated
        kept = {id(v) for p in ps for v in a.state[p].values()}
        assert kept == assigned


def test_assigned_step_counts_and_moments_restart_as_torch():
    # The usual reset of one parameter's moments and count.
    ps, qs, a, b = pair("Adam", {"amsgrad": True})
    run((a, b), (ps, qs), 3)
    for opt, p in ((a, ps[0]), (b, qs[0])):
        st = opt.state[p]
        st["step"] = torch.tensor(0.0)
        st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        st["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    run((a, b), (ps, qs), 4, seed=9)
    assert_same(ps, qs)
    assert float(a.state[ps[0]]["step"]) == 4 == float(b.state[qs[0]]["step"])


def test_in_place_edits_need_no_detection():
    ps, qs, a, b = pair("RMSprop", {"momentum": 0.9, "centered": True})
    run((a, b), (ps, qs), 3)
    for opt, params in ((a, ps), (b, qs)):
        for p in params:
            for k, v in opt.state[p].items():
                if k != "step":
                    v.mul_(0.25)
    run((a, b), (ps, qs), 3, seed=5)
    assert_same(ps, qs)


BAD = [
    ("exp_avg", lambda p: torch.zeros(p.shape, dtype=torch.float32), TypeError,
     r"state\['exp_avg'\] of param_groups\[0\]\['params'\]\[0\] has dtype torch.float32"),
    ("exp_avg", lambda p: torch.zeros(p.numel() + 1, dtype=p.dtype), ValueError, "has shape"),
    ("exp_avg", lambda p: [0.0], TypeError, "must be a tensor"),
    ("exp_avg", lambda p: None, ValueError, r"has no 'exp_avg'"),
    ("step", lambda p: 3.0, TypeError, r"state\['step'\] of param_groups\[0\]\['params'\]\[0\] "
                                        "must be a tensor"),
    ("step", lambda p: torch.tensor(1.5), ValueError, "whole number"),
    ("step", lambda p: torch.tensor([1.0, 2.0]), TypeError, "one float32, float64 or int64"),
]


@pytest.mark.parametrize("key, make, exc, msg", BAD)
def test_bad_edits_are_refused_and_change_nothing(key, make, exc, msg):
    ps, qs, a, b = pair("Adam", {})
    run((a,), (ps,), 2)
    p = ps[0]
    before = [t.detach().clone() for t in ps]
    state_before = copy.deepcopy(a.state_dict())
    a.state[p][key] = make(p)
    set_grads(1, ps)
    with pytest.raises(exc, match=msg):
        a.step()
    assert same_bits(ps, before)
    sd = a.state_dict()
    for pid, entry in state_before["state"].items():
        for k, v in entry.items():
            if pid != 0 or k != key:
                assert torch.equal(sd["state"][pid][k], v)
    # Put it right: the step runs again.
    a.state[p][key] = state_before["state"][0][key]
    a.step()


def test_two_keys_sharing_memory_are_refused():
    ps, qs, a, b = pair("Adam", {})
    run((a,), (ps,), 1)
    st = a.state[ps[0]]
    st["exp_avg_sq"] = st["exp_avg"]
    set_grads(1, ps)
    with pytest.raises(ValueError, match=r"exp_avg'\] and .*exp_avg_sq'\] overlap in memory"):
        a.step()


def test_assigned_tensors_memory_stays_with_the_step():
    # An assigned tensor used in place cannot have its storage resized under
    # the step, and re-pointing it leaves the step on the memory it had.
    ps, qs, a, b = pair("Adam", {})
    run((a, b), (ps, qs), 1)
    for opt, p in ((a, ps[0]), (b, qs[0])):
        opt.state[p]["exp_avg"] = opt.state[p]["exp_avg"].clone()
    run((a, b), (ps, qs), 1, seed=3)
    t = a.state[ps[0]]["exp_avg"]
    with pytest.raises(RuntimeError, match="not resizable"):
        t.untyped_storage().resize_(0)
    before = t.clone()
    run((a, b), (ps, qs), 1, seed=4)
    assert not torch.equal(t, before)        # updated in place
    assert_same(ps, qs)


def test_state_survives_pickle_and_deepcopy():
    ps, qs, a, b = pair("Adam", {"amsgrad": True})
    run((a, b), (ps, qs), 2)
    for c in (copy.deepcopy(a), pickle.loads(pickle.dumps(a))):
        cp = c.param_groups[0]["params"]
        c.state[cp[0]] = {}                 # still tracked after the copy
        c.state[cp[0]]  # noqa: B018
    a.state[ps[0]] = {}
    b.state[qs[0]] = {}
    run((a, b), (ps, qs), 2, seed=11)
    assert_same(ps, qs)


def test_state_dict_entries_are_plain_dicts_torch_load_reads(tmp_path):
    ps, qs, a, b = pair("SGD", {"lr": 0.1, "momentum": 0.9})
    run((a,), (ps,), 2)
    path = tmp_path / "opt.pt"
    torch.save(a.state_dict(), path)
    sd = torch.load(path, weights_only=True)
    assert all(type(e) is dict for e in sd["state"].values())
    b.load_state_dict(sd)
