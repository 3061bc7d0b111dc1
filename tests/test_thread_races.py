"""Many repeated multi-threaded calls give exactly the one-thread result.

A data race between the threads of a parallel region (for example chunk
bounds that are shared instead of private) shows up only now and then, so
each kernel is called many times on work just above its threading
threshold, where a call is short and the threads start together."""
import numpy as np
import pytest

import fastopt
from conftest import num_threads

REPEATS = 300


def same_every_time(run, *, repeats=REPEATS):
    """run() -> tuple of arrays; compares many 2-thread runs with a 1-thread run."""
    if fastopt.get_num_threads() < 2:
        pytest.skip("needs 2 OpenMP threads")
    with num_threads(1):
        expected = [a.copy() for a in run()]
    for i in range(repeats):
        got = run()
        for e, g in zip(expected, got):
            if not np.array_equal(e, g, equal_nan=True):
                bad = int(np.sum(e != g))
                pytest.fail(f"run {i}: {bad} of {e.size} values differ from the 1-thread result")


@pytest.fixture
def data():
    r = np.random.default_rng(3)
    return lambda *shape, dt=np.float32: r.standard_normal(shape).astype(dt)


@pytest.mark.parametrize("n", [40_000, 100_003])
def test_adam_step(data, n):
    p0, g = data(n), data(n)
    p, m, v = np.empty_like(p0), np.empty_like(p0), np.empty_like(p0)

    def run():
        p[...] = p0
        m.fill(0.1)
        v.fill(0.2)
        fastopt.adam_step(p, g, m, v, step=3)
        return p, m, v
    same_every_time(run)


def test_optimizer_step(data):
    params = [data(300, 100), data(7), data(50_001)]
    init = [a.copy() for a in params]
    grads = [data(*a.shape) for a in params]

    def run():
        for a, b in zip(params, init):
            a[...] = b
        opt = fastopt.Adam(params, lr=0.1)
        opt.step(grads)
        return tuple(params)
    same_every_time(run, repeats=100)


def test_ewa_update(data):
    x = data(200_001)
    avg = np.empty_like(x)

    def run():
        avg.fill(1.0)
        fastopt.ewa_update(avg, x, 0.9)
        return (avg,)
    same_every_time(run)


def test_take_rows(data):
    X = data(4000, 64)
    idx = np.random.default_rng(0).permutation(4000)
    out = np.empty_like(X)

    def run():
        fastopt.take_rows(X, idx, out)
        return (out,)
    same_every_time(run)


@pytest.mark.parametrize("shape, axis", [((16, 32, 28, 28), 1), ((4096, 64), 1)])
def test_batch_norm(data, shape, axis):
    x, dy = data(*shape), data(*shape)
    C = shape[axis]
    gamma, beta = data(C), data(C)
    y, dx = np.empty_like(x), np.empty_like(x)

    def run():
        _, ctx = fastopt.batch_norm_forward(x, gamma, beta, axis=axis, out=y)
        _, dgamma, dbeta = fastopt.batch_norm_backward(dy, ctx, dx_out=dx)
        return y, dx, dgamma, dbeta
    same_every_time(run, repeats=100)


@pytest.mark.parametrize("shape", [(512, 1000), (2, 60_000)])
def test_cross_entropy(data, shape):
    logits = data(*shape)
    target = np.random.default_rng(1).integers(0, shape[1], shape[0])
    grad = np.empty_like(logits)

    def run():
        loss, _ = fastopt.cross_entropy(logits, target, reduction="none",
                                        return_grad=True, grad_out=grad)
        return loss, grad
    same_every_time(run, repeats=100)


# Operations that must not overlap a step of the same optimizer refuse while
# one runs, and a process forked during a step starts with it idle.  A step
# is held open by a hyperparameter whose __float__ (called by the step's
# checks, with the optimizer busy) runs the code under test.

class _During:
    """A learning rate that runs `action()` when the step reads it."""

    def __init__(self, action, value=1e-3):
        self.action, self.value, self.result = action, value, None

    def __float__(self):
        if self.action is not None:
            action, self.action = self.action, None
            self.result = action()
        return self.value


@pytest.mark.parametrize("cls", [fastopt.SGD, fastopt.RMSprop, fastopt.Adam, fastopt.AdamW])
def test_load_state_dict_refuses_during_a_step(cls, data):
    params = [data(5000), data(3, 4)]
    grads = [data(5000), data(3, 4)]
    opt = cls(params)
    opt.step(grads)
    saved = opt.state_dict()
    opt.step(grads)
    before = opt.state_dict()

    def load():
        try:
            opt.load_state_dict(saved)
        except RuntimeError as e:
            return str(e)
    lr = _During(load, value=before["param_groups.0.lr"])
    opt.param_groups[0]["lr"] = lr
    snap = [a.copy() for a in params]
    opt.step(grads)
    assert lr.result and "called during a step of the same optimizer" in lr.result
    opt.param_groups[0]["lr"] = before["param_groups.0.lr"]
    # The step ran on the state it had; nothing of `saved` was loaded.
    ref = cls([a.copy() for a in snap])
    ref.load_state_dict(before)
    ref.step(grads)
    for a, b in zip(params, ref.param_groups[0]["params"]):
        np.testing.assert_array_equal(a, b)
    opt.load_state_dict(saved)                          # idle: allowed


@pytest.mark.parametrize("cls", [fastopt.SGD, fastopt.RMSprop, fastopt.Adam, fastopt.AdamW])
def test_add_param_group_refuses_during_a_step(cls, data):
    import threading
    params = [data(5000), data(3, 4)]
    grads = [data(5000), data(3, 4)]
    opt = cls(params)

    def add_from_another_thread():
        errors = []

        def add():
            try:
                opt.add_param_group({"params": [data(7)]})
            except RuntimeError as e:
                errors.append(str(e))
        t = threading.Thread(target=add)
        t.start()
        t.join()
        return errors

    def add_here():
        try:
            opt.add_param_group({"params": [data(7)]})
        except RuntimeError as e:
            return [str(e)]
        return []

    for action in (add_here, add_from_another_thread):
        lr = _During(action)
        opt.param_groups[0]["lr"] = lr
        opt.step(grads)
        assert lr.result and "add_param_group() called during a step" in lr.result[0]
        assert len(opt.param_groups) == 1 and len(opt.state) == 2
    opt.param_groups[0]["lr"] = 1e-3
    opt.add_param_group({"params": [data(7)]})          # idle: allowed
    opt.step(grads + [data(7)])


def test_a_child_forked_during_a_step_starts_idle(data):
    import os
    if not hasattr(os, "fork"):
        pytest.skip("no fork")
    params, grads = [data(1000)], [data(1000)]
    opt = fastopt.Adam(params)

    def fork_and_step():
        pid = os.fork()
        if pid == 0:                                    # the child: step at once
            code = 1
            try:
                opt.param_groups[0]["lr"] = 1e-3
                opt.step(grads)
                code = 0
            finally:
                os._exit(code)
        return os.waitpid(pid, 0)[1]

    lr = _During(fork_and_step)
    opt.param_groups[0]["lr"] = lr
    opt.step(grads)
    assert lr.result is not None and os.waitstatus_to_exitcode(lr.result) == 0
