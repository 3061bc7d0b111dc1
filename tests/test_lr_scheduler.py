"""fastopt.lr_scheduler: lr sequences against the closed-form formulas."""
import math

import numpy as np
import pytest

import fastopt
from fastopt import lr_scheduler as S

LR0 = (0.1, 0.03)      # two groups with different base learning rates
EPOCHS = 40


def make_opt():
    params = [np.zeros(3), np.zeros(2)]
    return fastopt.SGD([{"params": params[:1], "lr": LR0[0]}, {"params": params[1:], "lr": LR0[1]}],
                       momentum=0.9)


def lrs_over_epochs(opt, sched, n=EPOCHS):
    seq = [[g["lr"] for g in opt.param_groups]]
    for _ in range(n):
        sched.step()
        seq.append([g["lr"] for g in opt.param_groups])
        assert sched.get_last_lr() == seq[-1]
    return np.array(seq)


def expected(f, n=EPOCHS):
    return np.array([[f(lr0, e) for lr0 in LR0] for e in range(n + 1)])


CASES = [
    ("inverse time", lambda o: S.InverseTimeLR(o, decay_rate=0.5),
     lambda lr0, e: lr0 / (1 + 0.5 * e)),
    ("inverse time, interval", lambda o: S.InverseTimeLR(o, decay_rate=1.0, time_interval=7),
     lambda lr0, e: lr0 / (1 + 1.0 * math.floor(e / 7))),
    ("exponential", lambda o: S.ExponentialLR(o, gamma=0.95), lambda lr0, e: lr0 * 0.95 ** e),
    ("step", lambda o: S.StepLR(o, step_size=10, gamma=0.5), lambda lr0, e: lr0 * 0.5 ** (e // 10)),
    ("cosine", lambda o: S.CosineAnnealingLR(o, T_max=30, eta_min=1e-4),
     lambda lr0, e: 1e-4 + (lr0 - 1e-4) * (1 + math.cos(math.pi * e / 30)) / 2),
    ("linear warm-up", lambda o: S.LinearLR(o, start_factor=0.1, total_iters=8),
     lambda lr0, e: lr0 * (0.1 + 0.9 * min(e, 8) / 8)),
]


@pytest.mark.parametrize("name,make,formula", CASES, ids=[c[0] for c in CASES])
def test_lr_sequence_matches_closed_form(name, make, formula):
    opt = make_opt()
    seq = lrs_over_epochs(opt, make(opt))
    np.testing.assert_allclose(seq, expected(formula), rtol=1e-14, atol=0)


def test_warm_up_then_cosine():
    opt = make_opt()
    warm = S.LinearLR(opt, start_factor=0.01, total_iters=5)
    cos = S.CosineAnnealingLR(opt, T_max=30)
    sched = S.SequentialLR(opt, [warm, cos], milestones=[5])
    seq = lrs_over_epochs(opt, sched)

    def formula(lr0, e):
        if e < 5:
            return lr0 * (0.01 + 0.99 * e / 5)
        return lr0 * (1 + math.cos(math.pi * (e - 5) / 30)) / 2
    np.testing.assert_allclose(seq, expected(formula), rtol=1e-14, atol=1e-18)


def test_scheduler_drives_the_optimizer():
    # The lr a scheduler sets is the one the next step uses.
    p = np.array([1.0])
    opt = fastopt.SGD([p], lr=1.0)
    sched = S.ExponentialLR(opt, gamma=0.5)
    for e in range(5):
        before = p.copy()
        opt.step([np.array([1.0])])
        np.testing.assert_allclose(before - p, 0.5 ** e, rtol=1e-15)
        sched.step()
    assert opt.lr == 0.5 ** 5


def test_state_dict_round_trip():
    opt = make_opt()
    sched = S.SequentialLR(opt, [S.LinearLR(opt, total_iters=3), S.StepLR(opt, 4)], milestones=[3])
    for _ in range(6):
        sched.step()
    sd = sched.state_dict()
    rest = lrs_over_epochs(opt, sched, 10)

    opt2 = make_opt()
    sched2 = S.SequentialLR(opt2, [S.LinearLR(opt2, total_iters=3), S.StepLR(opt2, 4)],
                            milestones=[3])
    sched2.load_state_dict(sd)
    assert sched2.last_epoch == 6
    # the optimizer's lr comes from its own state dict; the epochs after 6 agree
    np.testing.assert_array_equal(lrs_over_epochs(opt2, sched2, 10)[1:], rest[1:])

    with pytest.raises(ValueError, match="missing"):
        S.StepLR(make_opt(), 3).load_state_dict({"last_epoch": 2})


def test_initial_lr_survives_other_schedulers_and_resume():
    opt = make_opt()
    S.ExponentialLR(opt, gamma=0.5).step()
    assert [g["initial_lr"] for g in opt.param_groups] == list(LR0)
    sched = S.StepLR(opt, step_size=2, gamma=0.1, last_epoch=3)     # resume at epoch 3 -> 4
    assert sched.last_epoch == 4
    np.testing.assert_allclose(sched.get_last_lr(), [lr * 0.01 for lr in LR0], rtol=1e-15)
    with pytest.raises(KeyError, match="initial_lr"):
        S.StepLR(make_opt(), step_size=2, last_epoch=3)


@pytest.mark.parametrize("make,msg", [
    (lambda o: S.InverseTimeLR(o, decay_rate=-1.0), "decay_rate"),
    (lambda o: S.InverseTimeLR(o, decay_rate=1.0, time_interval=0), "time_interval"),
    (lambda o: S.ExponentialLR(o, gamma=0.0), "gamma"),
    (lambda o: S.ExponentialLR(o, gamma=float("nan")), "gamma"),
    (lambda o: S.StepLR(o, step_size=2.5), "step_size"),
    (lambda o: S.CosineAnnealingLR(o, T_max=0), "T_max"),
    (lambda o: S.CosineAnnealingLR(o, T_max=10, eta_min=-1), "eta_min"),
    (lambda o: S.LinearLR(o, start_factor=0.0), "start_factor"),
    (lambda o: S.LinearLR(o, total_iters=0), "total_iters"),
    (lambda o: S.SequentialLR(o, [S.StepLR(o, 2), S.StepLR(o, 3)], milestones=[]), "milestones"),
    (lambda o: S.SequentialLR(o, [S.StepLR(o, 2), S.StepLR(make_opt(), 3)], milestones=[2]),
     r"schedulers\[1\]"),
])
def test_bad_arguments(make, msg):
    opt = make_opt()
    with pytest.raises(ValueError, match=msg):
        make(opt)
