"""fastopt.lr_scheduler: lr sequences against the closed-form formulas."""
import math
import warnings

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


# ------------------------------------------ the schedules named as in PyTorch ---

def restart_formula(T_0, T_mult, eta_min):
    """SGDR: periods of T_0, T_0*T_mult, ... epochs; cosine from lr0 to eta_min in each."""
    starts, length, start = [], T_0, 0
    while start <= 10 * EPOCHS:
        starts.append((start, length))
        start, length = start + length, length * T_mult

    def lr(lr0, e):
        s, n = [(s, n) for s, n in starts if s <= e][-1]
        return eta_min + (lr0 - eta_min) * (1 + math.cos(math.pi * (e - s) / n)) / 2
    return lr


def one_cycle_formula(total, pct, div, final_div, anneal):
    """The 1cycle lr of the group whose max_lr is 10*lr0 (see make_opt's LR0)."""
    def interp(a, b, t):
        if anneal == "cos":
            return b + (a - b) * (1 + math.cos(math.pi * t)) / 2
        return a + (b - a) * t

    def lr(lr0, e):
        top = 10 * lr0
        start, low = top / div, top / div / final_div
        up = pct * total - 1                  # the last step of the rising phase
        if e <= up:
            return interp(start, top, e / up)
        return interp(top, low, (e - up) / (total - 1 - up))
    return lr


MORE_CASES = [
    ("multi-step", lambda o: S.MultiStepLR(o, milestones=[25, 5, 5, 12], gamma=0.5),
     lambda lr0, e: lr0 * 0.5 ** ((e >= 5) * 2 + (e >= 12) + (e >= 25))),
    ("lambda", lambda o: S.LambdaLR(o, lambda e: 1 / (1 + e) ** 0.5),
     lambda lr0, e: lr0 / math.sqrt(1 + e)),
    ("warm restarts", lambda o: S.CosineAnnealingWarmRestarts(o, T_0=7, eta_min=1e-3),
     restart_formula(7, 1, 1e-3)),
    ("warm restarts, T_mult=2", lambda o: S.CosineAnnealingWarmRestarts(o, T_0=3, T_mult=2),
     restart_formula(3, 2, 0.0)),
    ("one-cycle cos", lambda o: S.OneCycleLR(o, max_lr=[10 * lr for lr in LR0], total_steps=41,
                                             cycle_momentum=False),
     one_cycle_formula(41, 0.3, 25.0, 1e4, "cos")),
    ("one-cycle linear", lambda o: S.OneCycleLR(o, max_lr=[10 * lr for lr in LR0], epochs=4,
                                                steps_per_epoch=10, pct_start=0.5,
                                                anneal_strategy="linear", div_factor=10.0,
                                                final_div_factor=100.0),
     lambda lr0, e: one_cycle_formula(40, 0.5, 10.0, 100.0, "linear")(lr0, e)),
]


@pytest.mark.parametrize("name,make,formula", MORE_CASES, ids=[c[0] for c in MORE_CASES])
def test_torch_named_schedules_match_their_formulas(name, make, formula):
    opt = make_opt()
    sched = make(opt)
    n = sched.total_steps - 1 if isinstance(sched, S.OneCycleLR) else EPOCHS
    seq = lrs_over_epochs(opt, sched, n)
    np.testing.assert_allclose(seq, expected(formula, n), rtol=1e-13, atol=1e-18)


def test_lambda_per_group():
    opt = make_opt()
    seq = lrs_over_epochs(opt, S.LambdaLR(opt, [lambda e: 0.9 ** e, lambda e: 1 + e]))
    want = np.array([[LR0[0] * 0.9 ** e, LR0[1] * (1 + e)] for e in range(EPOCHS + 1)])
    np.testing.assert_allclose(seq, want, rtol=1e-14)


def test_warm_restarts_fractional_epochs():
    """step(epoch + i / iters): annealing within an epoch, batch by batch."""
    opt = make_opt()
    sched = S.CosineAnnealingWarmRestarts(opt, T_0=3, T_mult=2, eta_min=1e-4)
    lr = restart_formula(3, 2, 1e-4)
    for e in np.arange(0, 20, 0.25):
        sched.step(float(e))
        # the formula over fractional time into the period
        s, n = (0, 3) if e < 3 else (3, 6) if e < 9 else (9, 12)
        want = 1e-4 + (LR0[0] - 1e-4) * (1 + math.cos(math.pi * (e - s) / n)) / 2
        assert opt.param_groups[0]["lr"] == pytest.approx(want, rel=1e-13)
    assert sched.last_epoch == 19
    sched.step()                                            # back to whole epochs: 20
    assert opt.param_groups[0]["lr"] == pytest.approx(lr(LR0[0], 20), rel=1e-13)
    with pytest.raises(ValueError, match="epoch must be finite and >= 0"):
        sched.step(-1.0)


def test_one_cycle_momentum_cycles_and_drives_the_optimizer():
    """momentum (SGD) or betas[0] (Adam) moves against the lr between
    max_momentum and base_momentum, and the optimizer steps with it."""
    p = np.zeros(3)
    opt = fastopt.SGD([p], lr=0.1, momentum=0.9)
    sched = S.OneCycleLR(opt, max_lr=1.0, total_steps=10, pct_start=0.4,
                         anneal_strategy="linear")
    seen = []
    for _ in range(9):
        seen.append((opt.param_groups[0]["lr"], opt.param_groups[0]["momentum"]))
        opt.step([np.ones(3)])
        sched.step()
    lrs, moms = np.array(seen).T
    np.testing.assert_allclose(lrs[:4], np.linspace(0.04, 1.0, 4), rtol=1e-13)
    np.testing.assert_allclose(moms[:4], np.linspace(0.95, 0.85, 4), rtol=1e-13)
    q = np.zeros(2)
    adam = fastopt.Adam([q], betas=(0.9, 0.99))
    S.OneCycleLR(adam, max_lr=0.1, total_steps=5)
    assert adam.param_groups[0]["betas"] == (0.95, 0.99)


def test_one_cycle_checks_before_changing_anything():
    opt = fastopt.SGD([np.zeros(3)], lr=0.1)                 # no momentum buffer
    before = dict(opt.param_groups[0])
    with pytest.raises(ValueError, match=r"param_groups\[0\] has momentum 0"):
        S.OneCycleLR(opt, max_lr=1.0, total_steps=10)
    with pytest.raises(ValueError, match="give total_steps"):
        S.OneCycleLR(opt, max_lr=1.0, epochs=3)
    with pytest.raises(ValueError, match="anneal_strategy"):
        S.OneCycleLR(opt, max_lr=1.0, total_steps=3, anneal_strategy="exp",
                     cycle_momentum=False)
    with pytest.raises(ValueError, match="max_lr must have one value per param group"):
        S.OneCycleLR(opt, max_lr=[1.0, 2.0], total_steps=3, cycle_momentum=False)
    assert opt.param_groups[0] == before
    sched = S.OneCycleLR(opt, max_lr=1.0, total_steps=3, cycle_momentum=False)
    for _ in range(3):                  # as in PyTorch, steps 0..total_steps are allowed
        sched.step()
    lr = opt.param_groups[0]["lr"]
    with pytest.raises(ValueError, match="stepped 4 times, but total_steps is 3"):
        sched.step()
    assert sched.last_epoch == 3 and opt.param_groups[0]["lr"] == lr


def test_reduce_on_plateau_patience_cooldown_and_floor():
    opt = make_opt()
    sched = S.ReduceLROnPlateau(opt, factor=0.5, patience=1, cooldown=2, threshold=0.0,
                                threshold_mode="abs", min_lr=[0.0, 0.02])
    assert [g["lr"] for g in opt.param_groups] == list(LR0)     # construction changes nothing
    seq = []
    for metric in [5.0] * 8:
        sched.step(metric)
        seq.append(sched.get_last_lr())
    # bad epochs: 2nd, 3rd -> reduce; 2 epochs of cooldown; then 2 more bad -> reduce
    f = [1, 1, 0.5, 0.5, 0.5, 0.5, 0.25, 0.25]
    np.testing.assert_allclose([s[0] for s in seq], [LR0[0] * x for x in f], rtol=1e-15)
    np.testing.assert_allclose([s[1] for s in seq], [max(LR0[1] * x, 0.02) for x in f],
                               rtol=1e-15)


@pytest.mark.parametrize("mode,threshold_mode,metrics,reduced_at", [
    ("min", "rel", [10, 9.99, 9.98, 9.0], [2]),       # 0.1% better is not 1% better
    ("min", "abs", [10, 9.95, 9.9, 9.0], []),         # 0.05 better beats threshold 0.01
    ("max", "rel", [10, 10.05, 10.08, 10.2], [2]),    # needs > 10.1
    ("max", "abs", [10, 10.05, 10.08, 10.2], []),     # needs > 10.01, then > 10.06
    ("min", "rel", [1, float("nan"), float("nan"), 0.5], [2]),  # NaN never improves
])
def test_reduce_on_plateau_modes(mode, threshold_mode, metrics, reduced_at):
    opt = make_opt()
    sched = S.ReduceLROnPlateau(opt, mode=mode, factor=0.1, patience=1, threshold=0.01,
                                threshold_mode=threshold_mode)
    for k, m in enumerate(metrics):
        before = opt.param_groups[0]["lr"]
        sched.step(m)
        assert (opt.param_groups[0]["lr"] < before) == (k in reduced_at), k


def test_lambda_state_dict_keeps_callable_objects_state():
    class Warm:
        def __init__(self):
            self.scale = 1.0

        def __call__(self, e):
            return self.scale * (e + 1)

    opt = make_opt()
    w = Warm()
    sched = S.LambdaLR(opt, [w, lambda e: 1.0])
    w.scale = 3.0
    sd = sched.state_dict()
    assert sd["lr_lambdas"] == [{"scale": 3.0}, None]
    w2 = Warm()
    sched2 = S.LambdaLR(make_opt(), [w2, lambda e: 1.0])
    sched2.load_state_dict(sd)
    assert w2.scale == 3.0 and sched2.last_epoch == sched.last_epoch


@pytest.mark.parametrize("make,exc,msg", [
    (lambda o: S.MultiStepLR(o, milestones=[3, -1]), ValueError, "milestones"),
    (lambda o: S.MultiStepLR(o, milestones=[3], gamma=0), ValueError, "gamma"),
    (lambda o: S.LambdaLR(o, [lambda e: 1.0]), ValueError, "one value per param group"),
    (lambda o: S.LambdaLR(o, 0.5), TypeError, "callable"),
    (lambda o: S.CosineAnnealingWarmRestarts(o, T_0=0), ValueError, "T_0"),
    (lambda o: S.CosineAnnealingWarmRestarts(o, T_0=3, T_mult=1.5), ValueError, "T_mult"),
    (lambda o: S.OneCycleLR(o, max_lr=1.0, total_steps=0), ValueError, "total_steps"),
    (lambda o: S.OneCycleLR(o, max_lr=1.0, total_steps=5, pct_start=1.5), ValueError,
     "pct_start"),
    (lambda o: S.OneCycleLR(o, max_lr=1.0, total_steps=5, max_momentum=1.0), ValueError,
     "max_momentum"),
    (lambda o: S.ReduceLROnPlateau(o, mode="best"), ValueError, "mode"),
    (lambda o: S.ReduceLROnPlateau(o, factor=1.0), ValueError, "factor"),
    (lambda o: S.ReduceLROnPlateau(o, patience=-1), ValueError, "patience"),
    (lambda o: S.ReduceLROnPlateau(o, threshold_mode="pct"), ValueError, "threshold_mode"),
    (lambda o: S.ReduceLROnPlateau(o, min_lr=[0.1]), ValueError, "min_lr"),
])
def test_more_bad_arguments_change_nothing(make, exc, msg):
    opt = make_opt()
    before = [dict(g) for g in opt.param_groups]
    with pytest.raises(exc, match=msg):
        make(opt)
    assert opt.param_groups == before


def test_reduce_on_plateau_cannot_be_sequenced():
    opt = make_opt()
    subs = [S.StepLR(opt, 2), S.ReduceLROnPlateau(opt)]
    with pytest.raises(ValueError, match=r"schedulers\[1\] is a ReduceLROnPlateau"):
        S.SequentialLR(opt, subs, milestones=[2])


# ------------------------------------------------------- against PyTorch ---

def torch_and_fastopt_sequences(make, kind, steps, metrics=None, epochs=None):
    """lr (and momentum) of both groups over `steps`, for fastopt and torch."""
    torch = pytest.importorskip("torch")
    T = torch.optim.lr_scheduler
    cls = {"sgd": (fastopt.SGD, torch.optim.SGD), "adam": (fastopt.Adam, torch.optim.Adam)}[kind]
    extra = {"momentum": 0.9} if kind == "sgd" else {}
    key = "momentum" if kind == "sgd" else "betas"
    out = []
    for lib, opt_cls, params in ((S, cls[0], [np.zeros(3), np.zeros(2)]),
                                 (T, cls[1], [torch.zeros(3), torch.zeros(2)])):
        opt = opt_cls([{"params": params[:1], "lr": LR0[0]},
                       {"params": params[1:], "lr": LR0[1]}], **extra)
        seq = []
        with warnings.catch_warnings():     # torch: "lr_scheduler.step() before optimizer.step()"
            warnings.simplefilter("ignore", UserWarning)
            sched = make(lib, opt)
            for k in range(steps):
                seq.append([g["lr"] for g in opt.param_groups]
                           + [float(np.ravel(g[key])[0]) for g in opt.param_groups])
                if metrics is not None:
                    sched.step(metrics[k])
                elif epochs is not None:
                    sched.step(epochs[k])
                else:
                    sched.step()
        out.append(np.array(seq))
    return out


TORCH_CASES = [
    ("multi-step", lambda L, o: L.MultiStepLR(o, [30, 10, 10, 45], 0.5), "sgd", 60),
    ("lambda", lambda L, o: L.LambdaLR(o, [lambda e: 0.9 ** e, lambda e: 1 / (1 + e)]), "sgd", 40),
    ("warm restarts", lambda L, o: L.CosineAnnealingWarmRestarts(o, 5, 2, 1e-3), "sgd", 100),
    ("one-cycle", lambda L, o: L.OneCycleLR(o, [1.0, 0.5], total_steps=50), "sgd", 50),
    ("one-cycle adam 3-phase linear",
     lambda L, o: L.OneCycleLR(o, [1.0, 0.5], total_steps=50, three_phase=True,
                               anneal_strategy="linear"), "adam", 50),
]


@pytest.mark.parametrize("name,make,kind,steps", TORCH_CASES, ids=[c[0] for c in TORCH_CASES])
def test_matches_torch(name, make, kind, steps):
    ours, theirs = torch_and_fastopt_sequences(make, kind, steps)
    np.testing.assert_allclose(ours, theirs, rtol=1e-15, atol=0)


def test_warm_restarts_fractional_epochs_match_torch():
    epochs = [e + i / 4 for e in range(12) for i in range(4)]
    ours, theirs = torch_and_fastopt_sequences(
        lambda L, o: L.CosineAnnealingWarmRestarts(o, 3, 2), "sgd", len(epochs), epochs=epochs)
    np.testing.assert_allclose(ours, theirs, rtol=1e-15, atol=0)


@pytest.mark.parametrize("mode", ["min", "max"])
@pytest.mark.parametrize("threshold_mode", ["rel", "abs"])
def test_reduce_on_plateau_matches_torch(mode, threshold_mode):
    metrics = list(np.cumsum(np.random.default_rng(0).standard_normal(80)) * 0.1 + 5)
    ours, theirs = torch_and_fastopt_sequences(
        lambda L, o: L.ReduceLROnPlateau(o, mode, 0.5, 3, 1e-2, threshold_mode, 2, [1e-3, 0.0]),
        "sgd", 80, metrics=metrics)
    np.testing.assert_allclose(ours, theirs, rtol=1e-15, atol=0)
    assert (np.diff(ours[:, 0]) < 0).sum() >= 2        # the sequence did reduce the lr
