"""FusedStep.step_addresses: the entry of tensor bridges (fastopt.torch).

Gradients given by address must give exactly what `step` gives with the
same arrays; the checks an address allows (alignment, overlap with written
memory, the step-count array) raise and change nothing."""
import numpy as np
import pytest

import fastopt
from fastopt import _layout, _optim
from conftest import Snapshot

SHAPES = [(), (0,), (1,), (17,), (3, 5), (66, 1000)]


def native(params, steps, slots=(True, True, False)):
    """A FusedStep (Adam) over `params`, zeroed state, and the caller's step counts."""
    states, masters = _layout.state_arrays(params, [slots] * len(params))
    groups = [{"params": list(params), "lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8,
               "weight_decay": 0.0, "amsgrad": slots[2], "maximize": False,
               "decoupled_weight_decay": False}]
    f = _optim.FusedStep("adam", list(params), [0] * len(params), 1, states, masters, steps)
    return f, groups, states


def addresses(grads):
    """np.uintp addresses of the grads (0 for None, 1 for an empty one)."""
    return np.array([0 if g is None else (g.ctypes.data if g.size else 1) for g in grads],
                    dtype=np.uintp)


@pytest.mark.parametrize("cls, kwargs", [
    (fastopt.Adam, {"amsgrad": True, "weight_decay": 0.1}),
    (fastopt.AdamW, {}),
    (fastopt.RMSprop, {"centered": True, "momentum": 0.5}),
    (fastopt.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_same_result_as_step_with_arrays(cls, kwargs, dtype, rng):
    params = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    twins = [p.copy() for p in params]
    a, b = cls(params, **kwargs), cls(twins, **kwargs)
    for t in range(5):
        grads = [rng.standard_normal(p.shape).astype(dtype) for p in params]
        if t == 2:
            grads[3] = None
        a.step(grads)
        b._fused.step_addresses(b.param_groups, addresses(grads))
        for p, q in zip(params, twins):
            np.testing.assert_array_equal(p, q)
    np.testing.assert_array_equal(a.steps, b.steps)
    for sa, sb in zip(a.state, b.state):
        for k in sa:
            np.testing.assert_array_equal(sa[k], sb[k])


@pytest.mark.parametrize("count_dtype", [np.float32, np.float64, np.int64])
def test_step_counts_are_read_and_written_back(count_dtype, rng):
    params = [rng.standard_normal(s) for s in [(4,), (3,), (2, 2)]]
    twins = [p.copy() for p in params]
    a = fastopt.Adam(params)
    # b's counts live in the caller's array: parameter 1 is at step 7 there.
    counts = np.array([0, 7, 0], dtype=count_dtype)
    b, groups, _ = native(twins, counts)
    a._steps[:] = [0, 7, 0]
    for t in range(3):
        grads = [rng.standard_normal(p.shape) for p in params]
        if t == 1:
            grads[2] = None
        a.step(grads)
        b.step_addresses(groups, addresses(grads))
    np.testing.assert_array_equal(counts, [3, 10, 2])
    np.testing.assert_array_equal(a.steps, [3, 10, 2])
    for p, q in zip(params, twins):
        np.testing.assert_array_equal(p, q)


def test_step_counts_one_array_each(rng):
    # torch's layout: one 0-d step tensor per parameter (here 1-element arrays).
    params = [rng.standard_normal(3) for _ in range(2)]
    counts = [np.array([4.0]), np.array([0.0], dtype=np.float32)]
    f, groups, _ = native(params, counts)
    f.step_addresses(groups, addresses([np.ones(3), np.ones(3)]))
    assert counts[0][0] == 5 and counts[1][0] == 1 and counts[1].dtype == np.float32


def test_empty_params_advance_their_count():
    p = [np.zeros(0), np.ones(3)]
    counts = np.zeros(2)
    f, groups, _ = native(p, counts)
    f.step_addresses(groups, np.array([1, 0], dtype=np.uintp))
    np.testing.assert_array_equal(counts, [1, 0])


def test_bad_input_changes_nothing(rng):
    params = [rng.standard_normal(8) for _ in range(3)]
    counts = np.ones(3)
    f, groups, states = native(params, counts, (True, True, True))
    grads = [rng.standard_normal(8) for _ in range(3)]
    snap = Snapshot(*params, *[a for st in states for a in st if a is not None], counts)
    good = addresses(grads)
    with pytest.raises(TypeError, match="grad_addr must be a C-contiguous numpy.uintp"):
        f.step_addresses(groups, good.astype(np.int64))
    with pytest.raises(TypeError, match="3 entries"):
        f.step_addresses(groups, good[:2])
    bad = good.copy()
    bad[1] = params[0].ctypes.data + 8          # reads params[0]
    with pytest.raises(ValueError, match=r"grads\[1\] overlaps params\[0\]"):
        f.step_addresses(groups, bad)
    bad[1] = states[2][2].ctypes.data
    with pytest.raises(ValueError, match=r"grads\[1\] overlaps state\[2\]\['max_exp_avg_sq'\]"):
        f.step_addresses(groups, bad)
    bad[1] = counts.ctypes.data
    with pytest.raises(ValueError, match=r"grads\[1\] overlaps step_counts\[\d\]"):
        f.step_addresses(groups, bad)
    bad[1] = grads[1].ctypes.data + 1
    with pytest.raises(ValueError, match="not aligned"):
        f.step_addresses(groups, bad)
    for value, i in [(1.5, 2), (-1.0, 0), (np.nan, 1), (2.0 ** 60, 1)]:
        before = counts[i]
        counts[i] = value
        with pytest.raises(ValueError, match=rf"step_counts\[{i}\] must be a whole number"):
            f.step_addresses(groups, good)
        counts[i] = before
    groups[0]["lr"] = -1.0
    with pytest.raises(ValueError, match="lr"):
        f.step_addresses(groups, good)
    groups[0]["lr"] = 1e-3
    snap.assert_unchanged()


def test_bad_step_counts_are_refused_when_bound(rng):
    params = [rng.standard_normal(8) for _ in range(3)]
    with pytest.raises(ValueError, match=r"steps must have shape \(3,\)"):
        native(params, np.ones(2))
    with pytest.raises(TypeError, match="step_counts\\[0\\] must have dtype int64, float32 or float64"):
        native(params, np.ones(3, dtype=np.int32))
    ro = np.ones(3)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match=r"step_counts\[0\]"):
        native(params, ro)
    with pytest.raises(ValueError, match=r"params\[0\] and step_counts\[0\] overlap in memory"):
        native(params, params[0][:3])          # the counts in a parameter's memory
