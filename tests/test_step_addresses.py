"""FusedStep.step_addresses: the entry of tensor bridges (fastopt.torch).

Gradients given by address must give exactly what `step` gives with the
same arrays; the checks an address allows (alignment, overlap with written
memory, the step-count array) raise and change nothing."""
import numpy as np
import pytest

import fastopt
from conftest import Snapshot

SHAPES = [(), (0,), (1,), (17,), (3, 5), (66, 1000)]


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


@pytest.mark.parametrize("count_dtype", [np.float32, np.float64])
def test_step_counts_are_read_and_written_back(count_dtype, rng):
    params = [rng.standard_normal(s) for s in [(4,), (3,), (2, 2)]]
    twins = [p.copy() for p in params]
    a, b = fastopt.Adam(params), fastopt.Adam(twins)
    # b's counts live in the caller's array: parameter 1 is at step 7 there.
    counts = np.array([0, 7, 0], dtype=count_dtype)
    a._fused.set_steps(np.array([0, 7, 0]))
    for t in range(3):
        grads = [rng.standard_normal(p.shape) for p in params]
        if t == 1:
            grads[2] = None
        a.step(grads)
        b._fused.step_addresses(b.param_groups, addresses(grads), counts)
    np.testing.assert_array_equal(counts, [3, 10, 2])
    np.testing.assert_array_equal(a.steps, [3, 10, 2])
    for p, q in zip(params, twins):
        np.testing.assert_array_equal(p, q)


def test_empty_params_advance_their_count():
    p = [np.zeros(0), np.ones(3)]
    opt = fastopt.Adam(p)
    counts = np.zeros(2)
    opt._fused.step_addresses(opt.param_groups, np.array([1, 0], dtype=np.uintp), counts)
    np.testing.assert_array_equal(counts, [1, 0])


def test_bad_input_changes_nothing(rng):
    params = [rng.standard_normal(8) for _ in range(3)]
    opt = fastopt.Adam(params, amsgrad=True)
    grads = [rng.standard_normal(8) for _ in range(3)]
    opt.step(grads)
    counts = np.ones(3)
    snap = Snapshot(*params, *[a for st in opt.state for a in st.values()], counts)
    good = addresses(grads)
    f, groups = opt._fused, opt.param_groups
    with pytest.raises(TypeError, match="grad_addr must be a C-contiguous numpy.uintp"):
        f.step_addresses(groups, good.astype(np.int64))
    with pytest.raises(TypeError, match="3 entries"):
        f.step_addresses(groups, good[:2])
    bad = good.copy()
    bad[1] = params[0].ctypes.data + 8          # reads params[0]
    with pytest.raises(ValueError, match=r"grads\[1\] overlaps params\[0\]"):
        f.step_addresses(groups, bad)
    bad[1] = opt.state[2]["max_exp_avg_sq"].ctypes.data
    with pytest.raises(ValueError, match=r"grads\[1\] overlaps state\[2\]\['max_exp_avg_sq'\]"):
        f.step_addresses(groups, bad)
    bad[1] = grads[1].ctypes.data + 1
    with pytest.raises(ValueError, match="not aligned"):
        f.step_addresses(groups, bad)
    with pytest.raises(ValueError, match="step_counts must have shape"):
        f.step_addresses(groups, good, np.ones(2))
    with pytest.raises(ValueError, match=r"step_counts\[2\] must be a whole number"):
        f.step_addresses(groups, good, np.array([1.0, 1.0, 1.5]))
    with pytest.raises(ValueError, match=r"step_counts\[0\] must be a whole number"):
        f.step_addresses(groups, good, np.array([-1.0, 1.0, 1.0]))
    with pytest.raises(TypeError, match="step_counts must have dtype"):
        f.step_addresses(groups, good, np.ones(3, dtype=np.int64))
    groups[0]["lr"] = -1.0
    with pytest.raises(ValueError, match="lr"):
        f.step_addresses(groups, good, counts)
    groups[0]["lr"] = 1e-3
    snap.assert_unchanged()
    np.testing.assert_array_equal(opt.steps, [1, 1, 1])
