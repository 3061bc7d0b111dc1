"""The NumPy API: ``opt.state`` is what the next step uses.

An emptied entry restarts its parameter from zero state and step 0 (in new
arrays: the old ones are left as they were), an array assigned to a key is
used in place, a new ``opt.state`` list is read; each compared bit for bit
with an optimizer that got the same state another way.  A bad edit is
refused at the step, naming the entry, and changes nothing."""
import copy

import numpy as np
import pytest

import fastopt
from conftest import Snapshot

KINDS = [(fastopt.Adam, {"amsgrad": True, "weight_decay": 0.1}), (fastopt.AdamW, {}),
         (fastopt.RMSprop, {"centered": True, "momentum": 0.5}),
         (fastopt.SGD, {"lr": 0.1, "momentum": 0.9})]
SHAPES = [(3, 4), (17,), (), (0,)]


def setup(cls, kwargs, dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    ps = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    qs = [p.copy() for p in ps]
    return ps, qs, cls(ps, **kwargs), cls(qs, **kwargs)


def steps(opts, lists, n, seed):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        gs = [rng.standard_normal(p.shape).astype(p.dtype) for p in lists[0]]
        for o, ps in zip(opts, lists):
            o.step([g.copy() for g in gs])


@pytest.mark.parametrize("cls, kwargs", KINDS)
@pytest.mark.parametrize("how", ["empty", "clear", "new_list"])
def test_emptied_entries_restart_from_zero(cls, kwargs, how):
    ps, qs, a, b = setup(cls, kwargs)
    steps((a, b), (ps, qs), 3, 1)
    old = copy.deepcopy(a.state)
    live = [dict(e) for e in a.state]
    if how == "empty":
        a.state[0] = {}
    elif how == "clear":
        a.state[0].clear()
    else:
        a.state = [{}] + list(a.state[1:])
    # b: the same through load_state_dict (state 0 zero, step 0)
    sd = b.state_dict()
    for k in list(sd):
        if k.startswith("state.0."):
            sd[k] = 0 if k.endswith(".step") else np.zeros_like(sd[k])
    b.load_state_dict(sd)
    steps((a, b), (ps, qs), 3, 2)
    for p, q in zip(ps, qs):
        np.testing.assert_array_equal(p, q)
    np.testing.assert_array_equal(a.steps, b.steps)
    for k, v in live[0].items():        # the old arrays are left as they were
        np.testing.assert_array_equal(v, old[0][k])
    assert set(a.state[0]) == set(b.state[0])


@pytest.mark.parametrize("cls, kwargs", KINDS)
def test_assigned_arrays_are_used_in_place(cls, kwargs):
    ps, qs, a, b = setup(cls, kwargs)
    steps((a, b), (ps, qs), 3, 1)
    mine = {}
    for name, arr in a.state[0].items():
        mine[name] = arr * 0.5
        a.state[0][name] = mine[name]
    sd = b.state_dict()
    for name in mine:
        sd[f"state.0.{name}"] = sd[f"state.0.{name}"] * 0.5
    b.load_state_dict(sd)
    steps((a, b), (ps, qs), 3, 2)
    for p, q in zip(ps, qs):
        np.testing.assert_array_equal(p, q)
    for name, arr in mine.items():
        assert a.state[0][name] is arr
        np.testing.assert_array_equal(arr, b.state[0][name])


BAD = [
    (lambda st: st.update(exp_avg=np.zeros(12, np.float64)), ValueError,
     r"state\[0\]\['exp_avg'\] has shape \(12,\)"),
    (lambda st: st.update(exp_avg=np.zeros((3, 4), np.float32)), TypeError,
     r"state\[0\]\['exp_avg'\] must have dtype float64"),
    (lambda st: st.update(exp_avg=np.zeros((4, 3)).T), ValueError, "C-contiguous"),
    (lambda st: st.pop("exp_avg"), ValueError, r"state\[0\] has no 'exp_avg'"),
    (lambda st: st.update(exp_avg=st["exp_avg_sq"]), ValueError, "overlap in memory"),
    (lambda st: st.update(exp_avg=[0.0] * 12), TypeError, "must be a numpy.ndarray"),
]


@pytest.mark.parametrize("edit, exc, msg", BAD)
def test_bad_edits_are_refused_and_change_nothing(edit, exc, msg):
    ps, qs, a, b = setup(fastopt.Adam, {"amsgrad": True})
    steps((a,), (ps,), 2, 1)
    snap = Snapshot(*ps, *[v for st in a.state for v in st.values()])
    count = a.steps.copy()
    edit(a.state[0])
    with pytest.raises(exc, match=msg):
        a.step([np.ones_like(p) for p in ps])
    snap.assert_unchanged()
    np.testing.assert_array_equal(a.steps, count)


def test_state_must_stay_one_dict_per_parameter():
    ps, qs, a, b = setup(fastopt.SGD, {"lr": 0.1, "momentum": 0.9})
    a.state.append({})
    with pytest.raises(ValueError, match="one per parameter"):
        a.step([np.ones_like(p) for p in ps])
    a.state.pop()
    a.state[1] = "x"
    with pytest.raises(TypeError, match=r"state\[1\] must be a dict"):
        a.step([np.ones_like(p) for p in ps])
