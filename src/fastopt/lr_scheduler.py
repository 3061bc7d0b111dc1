"""Learning-rate schedules for fastopt's optimizers, in the spirit of
``torch.optim.lr_scheduler``.

A scheduler sets ``lr`` in every param group of its optimizer.  Construction
applies epoch 0 (the base learning rate, or the warm-up's first value);
each ``sched.step()`` advances one epoch (or one iteration: the unit is
yours)::

    opt = fastopt.Adam(params, lr=1e-3)
    sched = fastopt.lr_scheduler.InverseTimeLR(opt, decay_rate=1.0)
    for epoch in range(epochs):
        train_one_epoch(opt)
        sched.step()

Every schedule is a closed-form function of the epoch and of each group's
base learning rate (``group["initial_lr"]``, set from ``group["lr"]`` when
the first scheduler is made), so values never drift from repeated
multiplication.  Warm-up then cosine::

    warm = LinearLR(opt, start_factor=0.01, total_iters=5)
    cos = CosineAnnealingLR(opt, T_max=95)
    sched = SequentialLR(opt, [warm, cos], milestones=[5])

``state_dict()``/``load_state_dict()`` save and restore a scheduler's epoch
and settings (plain numbers and lists).
"""
import bisect
import math

__all__ = ["LRScheduler", "InverseTimeLR", "ExponentialLR", "StepLR",
           "CosineAnnealingLR", "LinearLR", "SequentialLR"]


class LRScheduler:
    """Base class: subclasses define `lr_at(epoch)` (one lr per group)."""

    def __init__(self, optimizer, last_epoch=-1):
        if not hasattr(optimizer, "param_groups"):
            raise TypeError(f"{type(optimizer).__name__} is not an optimizer")
        self.optimizer = optimizer
        if last_epoch == -1:
            for g in optimizer.param_groups:
                g.setdefault("initial_lr", g["lr"])
        else:
            for gi, g in enumerate(optimizer.param_groups):
                if "initial_lr" not in g:
                    raise KeyError(f"param_groups[{gi}] has no 'initial_lr' (needed when "
                                   "resuming with last_epoch != -1)")
        self.base_lrs = [g["initial_lr"] for g in optimizer.param_groups]
        self.last_epoch = last_epoch
        self.step()

    def lr_at(self, epoch):
        """The learning rate of every group at `epoch` (a list)."""
        return [base * self.factor(epoch) for base in self.base_lrs]

    def factor(self, epoch):
        raise NotImplementedError

    def step(self):
        """Advance one epoch and set every group's lr."""
        self.last_epoch += 1
        lrs = self.lr_at(self.last_epoch)
        for g, lr in zip(self.optimizer.param_groups, lrs):
            g["lr"] = lr
        self._last_lr = list(lrs)

    def get_last_lr(self):
        """The learning rates set by the last `step` (one per group)."""
        return list(self._last_lr)

    def state_dict(self):
        """Everything but the optimizer, as plain numbers and lists."""
        return {k: v for k, v in self.__dict__.items() if k != "optimizer"}

    def load_state_dict(self, state_dict):
        missing = set(self.state_dict()) - set(state_dict)
        if missing:
            raise ValueError(f"scheduler state dict is missing {sorted(missing)}")
        self.__dict__.update(state_dict)


def _check(name, value, ok, what):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
        raise ValueError(f"{name} must be {what}, got {value!r}")


class InverseTimeLR(LRScheduler):
    """``lr = lr0 / (1 + decay_rate * (epoch // time_interval))``.

    The course's learning-rate decay (``time_interval=1``) and its
    "scheduled" variant (decay every `time_interval` epochs)."""

    def __init__(self, optimizer, decay_rate, time_interval=1, last_epoch=-1):
        _check("decay_rate", decay_rate, lambda v: v >= 0 and math.isfinite(v), "finite and >= 0")
        _check("time_interval", time_interval, lambda v: isinstance(v, int) and v >= 1,
               "an integer >= 1")
        self.decay_rate = decay_rate
        self.time_interval = time_interval
        super().__init__(optimizer, last_epoch)

    def factor(self, epoch):
        return 1.0 / (1.0 + self.decay_rate * (epoch // self.time_interval))


class ExponentialLR(LRScheduler):
    """``lr = lr0 * gamma**epoch`` (the course's ``0.95**epoch * lr0``)."""

    def __init__(self, optimizer, gamma, last_epoch=-1):
        _check("gamma", gamma, lambda v: 0 < v and math.isfinite(v), "finite and > 0")
        self.gamma = gamma
        super().__init__(optimizer, last_epoch)

    def factor(self, epoch):
        return self.gamma ** epoch


class StepLR(LRScheduler):
    """``lr = lr0 * gamma**(epoch // step_size)``."""

    def __init__(self, optimizer, step_size, gamma=0.1, last_epoch=-1):
        _check("step_size", step_size, lambda v: isinstance(v, int) and v >= 1, "an integer >= 1")
        _check("gamma", gamma, lambda v: 0 < v and math.isfinite(v), "finite and > 0")
        self.step_size = step_size
        self.gamma = gamma
        super().__init__(optimizer, last_epoch)

    def factor(self, epoch):
        return self.gamma ** (epoch // self.step_size)


class CosineAnnealingLR(LRScheduler):
    """``lr = eta_min + (lr0 - eta_min) * (1 + cos(pi * epoch / T_max)) / 2``
    (PyTorch's closed form; without restarts it rises again after T_max)."""

    def __init__(self, optimizer, T_max, eta_min=0.0, last_epoch=-1):
        _check("T_max", T_max, lambda v: v > 0 and math.isfinite(v), "finite and > 0")
        _check("eta_min", eta_min, lambda v: v >= 0 and math.isfinite(v), "finite and >= 0")
        self.T_max = T_max
        self.eta_min = eta_min
        super().__init__(optimizer, last_epoch)

    def lr_at(self, epoch):
        c = (1.0 + math.cos(math.pi * epoch / self.T_max)) / 2.0
        return [self.eta_min + (base - self.eta_min) * c for base in self.base_lrs]


class LinearLR(LRScheduler):
    """Linear warm-up: ``lr = lr0 * f`` with f going linearly from
    `start_factor` (epoch 0) to `end_factor` (epoch `total_iters`), then
    staying there."""

    def __init__(self, optimizer, start_factor=1.0 / 3, end_factor=1.0, total_iters=5,
                 last_epoch=-1):
        _check("start_factor", start_factor, lambda v: 0 < v <= 1, "in (0, 1]")
        _check("end_factor", end_factor, lambda v: 0 <= v <= 1, "in [0, 1]")
        _check("total_iters", total_iters, lambda v: isinstance(v, int) and v >= 1,
               "an integer >= 1")
        self.start_factor = start_factor
        self.end_factor = end_factor
        self.total_iters = total_iters
        super().__init__(optimizer, last_epoch)

    def factor(self, epoch):
        t = min(epoch, self.total_iters) / self.total_iters
        return self.start_factor + (self.end_factor - self.start_factor) * t


class SequentialLR(LRScheduler):
    """Run `schedulers` one after the other: scheduler k takes over at
    epoch ``milestones[k-1]`` and starts there from its own epoch 0."""

    def __init__(self, optimizer, schedulers, milestones, last_epoch=-1):
        schedulers = list(schedulers)
        milestones = list(milestones)
        if not schedulers:
            raise ValueError("schedulers must not be empty")
        for k, s in enumerate(schedulers):
            if not isinstance(s, LRScheduler) or s.optimizer is not optimizer:
                raise ValueError(f"schedulers[{k}] is not a scheduler of this optimizer")
        if len(milestones) != len(schedulers) - 1:
            raise ValueError(f"expected {len(schedulers) - 1} milestones for "
                             f"{len(schedulers)} schedulers, got {len(milestones)}")
        if any(not isinstance(m, int) or m < 1 for m in milestones) or milestones != sorted(milestones):
            raise ValueError(f"milestones must be increasing integers >= 1, got {milestones}")
        self.schedulers = schedulers
        self.milestones = milestones
        super().__init__(optimizer, last_epoch)

    def lr_at(self, epoch):
        k = bisect.bisect_right(self.milestones, epoch)
        start = self.milestones[k - 1] if k else 0
        return self.schedulers[k].lr_at(epoch - start)

    def state_dict(self):
        sd = super().state_dict()
        sd["schedulers"] = [s.state_dict() for s in self.schedulers]
        return sd

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        subs = state_dict.pop("schedulers", None)
        if subs is None or len(subs) != len(self.schedulers):
            raise ValueError(f"scheduler state dict must hold {len(self.schedulers)} "
                             "sub-scheduler states")
        for s, sd in zip(self.schedulers, subs):
            missing = set(s.state_dict()) - set(sd)
            if missing:
                raise ValueError(f"scheduler state dict is missing {sorted(missing)}")
        super().load_state_dict({**state_dict, "schedulers": self.schedulers})
        for s, sd in zip(self.schedulers, subs):
            s.load_state_dict(sd)
