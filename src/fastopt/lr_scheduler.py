"""Learning-rate schedules for fastopt's optimizers, with the names and
semantics of ``torch.optim.lr_scheduler``.

A scheduler sets ``lr`` in every param group of its optimizer.  Construction
applies epoch 0 (the base learning rate, or the warm-up's first value);
each ``sched.step()`` advances one epoch (or one iteration: the unit is
yours)::

    opt = fastopt.Adam(params, lr=1e-3)
    sched = fastopt.lr_scheduler.InverseTimeLR(opt, decay_rate=1.0)
    for epoch in range(epochs):
        train_one_epoch(opt)
        sched.step()

Every schedule but `ReduceLROnPlateau` is a closed-form function of the
epoch and of each group's base learning rate (``group["initial_lr"]``, set
from ``group["lr"]`` when the first scheduler is made), so values never
drift from repeated multiplication; where PyTorch multiplies the current lr
(`MultiStepLR`), the two agree unless something else changes the lr.
Warm-up then cosine::

    warm = LinearLR(opt, start_factor=0.01, total_iters=5)
    cos = CosineAnnealingLR(opt, T_max=95)
    sched = SequentialLR(opt, [warm, cos], milestones=[5])

`ReduceLROnPlateau` is driven by a metric instead: ``sched.step(val_loss)``.

``state_dict()``/``load_state_dict()`` save and restore a scheduler's epoch
and settings (plain numbers and lists).  A bad argument raises ValueError
(or TypeError) naming it, and a `step` that raises changes nothing.
"""
from __future__ import annotations

import bisect
import math
import types
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .optim import Optimizer

__all__ = ["LRScheduler", "InverseTimeLR", "ExponentialLR", "StepLR", "MultiStepLR",
           "LambdaLR", "CosineAnnealingLR", "CosineAnnealingWarmRestarts", "LinearLR",
           "OneCycleLR", "SequentialLR", "ReduceLROnPlateau"]


class LRScheduler:
    """Base class: subclasses define `lr_at(epoch)` (one lr per group), or
    `factor_at(epoch)` (the multiplier of every group's base lr)."""

    optimizer: Optimizer
    base_lrs: list[float]
    last_epoch: int

    def __init__(self, optimizer: Optimizer, last_epoch: int = -1) -> None:
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

    def lr_at(self, epoch: int) -> list[float]:
        """The learning rate of every group at `epoch` (a list)."""
        return [base * self.factor_at(epoch) for base in self.base_lrs]

    def factor_at(self, epoch: int) -> float:
        raise NotImplementedError

    def step(self) -> None:
        """Advance one epoch and set every group's lr."""
        lrs = self.lr_at(self.last_epoch + 1)       # may raise: then nothing changes
        self.last_epoch += 1
        self._apply(lrs)

    def _apply(self, lrs: Sequence[float]) -> None:
        for g, lr in zip(self.optimizer.param_groups, lrs):
            g["lr"] = lr
        self._last_lr = list(lrs)

    def get_last_lr(self) -> list[float]:
        """The learning rates set by the last `step` (one per group)."""
        return list(self._last_lr)

    def state_dict(self) -> dict[str, Any]:
        """Everything but the optimizer, as plain numbers and lists."""
        return {k: v for k, v in self.__dict__.items() if k != "optimizer"}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state from `state_dict` (as made by `state_dict`)."""
        missing = set(self.state_dict()) - set(state_dict)
        if missing:
            raise ValueError(f"scheduler state dict is missing {sorted(missing)}")
        self.__dict__.update(state_dict)


def _check(name: str, value: Any, ok: Callable[[Any], bool], what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
        raise ValueError(f"{name} must be {what}, got {value!r}")


def _per_group(name: str, value: Any, optimizer: Optimizer) -> list[Any]:
    """`value` for every param group: a list of one per group, or one for all."""
    n = len(optimizer.param_groups)
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} must have one value per param group ({n}), "
                             f"got {len(value)}")
        return list(value)
    return [value] * n


class InverseTimeLR(LRScheduler):
    """``lr = lr0 / (1 + decay_rate * (epoch // time_interval))``.

    The course's learning-rate decay (``time_interval=1``) and its
    "scheduled" variant (decay every `time_interval` epochs)."""

    def __init__(self, optimizer: Optimizer, decay_rate: float, time_interval: int = 1,
                 last_epoch: int = -1) -> None:
        _check("decay_rate", decay_rate, lambda v: v >= 0 and math.isfinite(v), "finite and >= 0")
        _check("time_interval", time_interval, lambda v: isinstance(v, int) and v >= 1,
               "an integer >= 1")
        self.decay_rate = decay_rate
        self.time_interval = time_interval
        super().__init__(optimizer, last_epoch)

    def factor_at(self, epoch: int) -> float:
        return 1.0 / (1.0 + self.decay_rate * (epoch // self.time_interval))


class ExponentialLR(LRScheduler):
    """``lr = lr0 * gamma**epoch`` (the course's ``0.95**epoch * lr0``)."""

    def __init__(self, optimizer: Optimizer, gamma: float, last_epoch: int = -1) -> None:
        _check("gamma", gamma, lambda v: 0 < v and math.isfinite(v), "finite and > 0")
        self.gamma = gamma
        super().__init__(optimizer, last_epoch)

    def factor_at(self, epoch: int) -> float:
        return self.gamma ** epoch


class StepLR(LRScheduler):
    """``lr = lr0 * gamma**(epoch // step_size)``."""

    def __init__(self, optimizer: Optimizer, step_size: int, gamma: float = 0.1,
                 last_epoch: int = -1) -> None:
        _check("step_size", step_size, lambda v: isinstance(v, int) and v >= 1, "an integer >= 1")
        _check("gamma", gamma, lambda v: 0 < v and math.isfinite(v), "finite and > 0")
        self.step_size = step_size
        self.gamma = gamma
        super().__init__(optimizer, last_epoch)

    def factor_at(self, epoch: int) -> float:
        return self.gamma ** (epoch // self.step_size)


class MultiStepLR(LRScheduler):
    """``lr = lr0 * gamma**k``, k the number of `milestones` <= epoch.

    As ``torch.optim.lr_scheduler.MultiStepLR``: the lr is multiplied by
    `gamma` when the epoch reaches each milestone (twice if a milestone is
    listed twice); milestones need not be sorted."""

    def __init__(self, optimizer: Optimizer, milestones: Sequence[int], gamma: float = 0.1,
                 last_epoch: int = -1) -> None:
        milestones = list(milestones)
        if any(isinstance(m, bool) or not isinstance(m, int) or m < 0 for m in milestones):
            raise ValueError(f"milestones must be integers >= 0, got {milestones}")
        _check("gamma", gamma, lambda v: 0 < v and math.isfinite(v), "finite and > 0")
        self.milestones = sorted(milestones)
        self.gamma = gamma
        super().__init__(optimizer, last_epoch)

    def factor_at(self, epoch: int) -> float:
        return self.gamma ** bisect.bisect_right(self.milestones, epoch)


class LambdaLR(LRScheduler):
    """``lr = lr0 * lr_lambda(epoch)``, one function for every group or a list
    of one per group, as ``torch.optim.lr_scheduler.LambdaLR``.

    `state_dict` saves the ``__dict__`` of callable objects among the
    functions and None for plain functions and lambdas (which cannot be
    saved), as PyTorch does."""

    def __init__(self, optimizer: Optimizer,
                 lr_lambda: Callable[[int], float] | Sequence[Callable[[int], float]],
                 last_epoch: int = -1) -> None:
        lambdas = _per_group("lr_lambda", lr_lambda, optimizer)
        for k, f in enumerate(lambdas):
            if not callable(f):
                raise TypeError(f"lr_lambda[{k}] must be callable, got {type(f).__name__}")
        self.lr_lambdas: list[Callable[[int], float]] = lambdas
        super().__init__(optimizer, last_epoch)

    def lr_at(self, epoch: int) -> list[float]:
        return [base * f(epoch) for base, f in zip(self.base_lrs, self.lr_lambdas)]

    def state_dict(self) -> dict[str, Any]:
        sd = {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "lr_lambdas")}
        sd["lr_lambdas"] = [None if isinstance(f, types.FunctionType) else dict(f.__dict__)
                            for f in self.lr_lambdas]
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        saved = state_dict.pop("lr_lambdas", None)
        if saved is None or len(saved) != len(self.lr_lambdas):
            raise ValueError(f"scheduler state dict must hold lr_lambdas, one per group "
                             f"({len(self.lr_lambdas)})")
        super().load_state_dict({**state_dict, "lr_lambdas": self.lr_lambdas})
        for f, d in zip(self.lr_lambdas, saved):
            if d is not None:
                f.__dict__.update(d)


class CosineAnnealingLR(LRScheduler):
    """``lr = eta_min + (lr0 - eta_min) * (1 + cos(pi * epoch / T_max)) / 2``
    (PyTorch's closed form; without restarts it rises again after T_max)."""

    def __init__(self, optimizer: Optimizer, T_max: float, eta_min: float = 0.0,
                 last_epoch: int = -1) -> None:
        _check("T_max", T_max, lambda v: v > 0 and math.isfinite(v), "finite and > 0")
        _check("eta_min", eta_min, lambda v: v >= 0 and math.isfinite(v), "finite and >= 0")
        self.T_max = T_max
        self.eta_min = eta_min
        super().__init__(optimizer, last_epoch)

    def lr_at(self, epoch: int) -> list[float]:
        c = (1.0 + math.cos(math.pi * epoch / self.T_max)) / 2.0
        return [self.eta_min + (base - self.eta_min) * c for base in self.base_lrs]


class CosineAnnealingWarmRestarts(LRScheduler):
    """Cosine annealing with warm restarts (SGDR), as
    ``torch.optim.lr_scheduler.CosineAnnealingWarmRestarts``::

        lr = eta_min + (lr0 - eta_min) * (1 + cos(pi * T_cur / T_i)) / 2

    where the i-th period lasts ``T_i = T_0 * T_mult**i`` epochs and T_cur
    counts the epochs since the last restart (so the lr is back to lr0 at
    every restart).  ``step(epoch)`` jumps to an epoch, which may be
    fractional: ``sched.step(epoch + i / batches_per_epoch)`` anneals within
    an epoch, batch by batch.
    """

    def __init__(self, optimizer: Optimizer, T_0: int, T_mult: int = 1, eta_min: float = 0.0,
                 last_epoch: int = -1) -> None:
        _check("T_0", T_0, lambda v: isinstance(v, int) and v >= 1, "an integer >= 1")
        _check("T_mult", T_mult, lambda v: isinstance(v, int) and v >= 1, "an integer >= 1")
        _check("eta_min", eta_min, lambda v: v >= 0 and math.isfinite(v), "finite and >= 0")
        self.T_0 = T_0
        self.T_mult = T_mult
        self.eta_min = eta_min
        self.epoch: float = float(last_epoch)      # the exact (maybe fractional) epoch
        super().__init__(optimizer, last_epoch)

    def period(self, epoch: float) -> tuple[float, int]:
        """(T_cur, T_i) at `epoch`: the time into the current period and its length."""
        if self.T_mult == 1:
            return epoch % self.T_0, self.T_0
        start, length = 0, self.T_0          # exact: no logarithm near a restart
        while epoch >= start + length:
            start += length
            length *= self.T_mult
        return epoch - start, length

    def lr_at(self, epoch: float) -> list[float]:
        t_cur, t_i = self.period(epoch)
        c = (1.0 + math.cos(math.pi * t_cur / t_i)) / 2.0
        return [self.eta_min + (base - self.eta_min) * c for base in self.base_lrs]

    def step(self, epoch: float | None = None) -> None:
        """Advance one epoch, or go to `epoch` (>= 0, may be fractional)."""
        if epoch is None:
            epoch = max(math.floor(self.epoch) + 1, 0)
        else:
            _check("epoch", epoch, lambda v: v >= 0 and math.isfinite(v), "finite and >= 0")
        lrs = self.lr_at(epoch)
        self.epoch = epoch
        self.last_epoch = math.floor(epoch)
        self._apply(lrs)


class LinearLR(LRScheduler):
    """Linear warm-up: ``lr = lr0 * f`` with f going linearly from
    `start_factor` (epoch 0) to `end_factor` (epoch `total_iters`), then
    staying there."""

    def __init__(self, optimizer: Optimizer, start_factor: float = 1.0 / 3,
                 end_factor: float = 1.0, total_iters: int = 5, last_epoch: int = -1) -> None:
        _check("start_factor", start_factor, lambda v: 0 < v <= 1, "in (0, 1]")
        _check("end_factor", end_factor, lambda v: 0 <= v <= 1, "in [0, 1]")
        _check("total_iters", total_iters, lambda v: isinstance(v, int) and v >= 1,
               "an integer >= 1")
        self.start_factor = start_factor
        self.end_factor = end_factor
        self.total_iters = total_iters
        super().__init__(optimizer, last_epoch)

    def factor_at(self, epoch: int) -> float:
        t = min(epoch, self.total_iters) / self.total_iters
        return self.start_factor + (self.end_factor - self.start_factor) * t


class OneCycleLR(LRScheduler):
    """The 1cycle policy, as ``torch.optim.lr_scheduler.OneCycleLR``; step it
    after every batch.

    The lr rises from ``max_lr / div_factor`` to `max_lr` over the first
    ``pct_start`` of `total_steps` (or ``epochs * steps_per_epoch``), then
    falls to ``max_lr / div_factor / final_div_factor`` (`three_phase`:
    back to the start over as many steps, then down to the minimum), by
    cosine or linear annealing.  With `cycle_momentum`, SGD's and RMSprop's
    ``momentum`` (Adam's ``betas[0]``) moves the other way, between
    `max_momentum` and `base_momentum`; the optimizer must then have been
    built with momentum > 0 (fastopt allocates momentum buffers at
    construction).  Stepping past `total_steps` raises ValueError.

    Each group's ``initial_lr``, ``max_lr``, ``min_lr`` (and
    ``max_momentum``, ``base_momentum``) are stored in the group, as in
    PyTorch.
    """

    def __init__(self, optimizer: Optimizer, max_lr: float | Sequence[float],
                 total_steps: int | None = None, epochs: int | None = None,
                 steps_per_epoch: int | None = None, pct_start: float = 0.3,
                 anneal_strategy: str = "cos", cycle_momentum: bool = True,
                 base_momentum: float | Sequence[float] = 0.85,
                 max_momentum: float | Sequence[float] = 0.95, div_factor: float = 25.0,
                 final_div_factor: float = 1e4, three_phase: bool = False,
                 last_epoch: int = -1) -> None:
        # Everything is checked before the param groups are touched.
        positive_int = (lambda v: isinstance(v, int) and v >= 1, "an integer >= 1")
        if total_steps is not None:
            _check("total_steps", total_steps, *positive_int)
        elif epochs is not None and steps_per_epoch is not None:
            _check("epochs", epochs, *positive_int)
            _check("steps_per_epoch", steps_per_epoch, *positive_int)
            total_steps = epochs * steps_per_epoch
        else:
            raise ValueError("give total_steps, or epochs and steps_per_epoch")
        _check("pct_start", pct_start, lambda v: 0 <= v <= 1, "in [0, 1]")
        if anneal_strategy not in ("cos", "linear"):
            raise ValueError(f"anneal_strategy must be 'cos' or 'linear', got {anneal_strategy!r}")
        _check("div_factor", div_factor, lambda v: v > 0 and math.isfinite(v), "finite and > 0")
        _check("final_div_factor", final_div_factor, lambda v: v > 0 and math.isfinite(v),
               "finite and > 0")
        max_lrs = _per_group("max_lr", max_lr, optimizer)
        for k, v in enumerate(max_lrs):
            _check(f"max_lr[{k}]", v, lambda v: v >= 0 and math.isfinite(v), "finite and >= 0")
        groups = optimizer.param_groups
        use_beta1 = "betas" in optimizer.defaults
        if cycle_momentum:
            if not use_beta1 and "momentum" not in optimizer.defaults:
                raise ValueError("cycle_momentum=True needs an optimizer with momentum or "
                                 "betas; pass cycle_momentum=False")
            max_ms = _per_group("max_momentum", max_momentum, optimizer)
            base_ms = _per_group("base_momentum", base_momentum, optimizer)
            for k, v in enumerate(max_ms + base_ms):
                name = f"max_momentum[{k}]" if k < len(max_ms) else \
                    f"base_momentum[{k - len(max_ms)}]"
                _check(name, v, lambda v: 0 <= v < 1, "in [0, 1)")
            if not use_beta1:
                for gi, g in enumerate(groups):
                    if not g["momentum"] > 0:
                        raise ValueError(
                            f"cycle_momentum=True, but param_groups[{gi}] has momentum 0, so "
                            "it has no momentum buffer: build the optimizer with momentum > 0 "
                            "or pass cycle_momentum=False")
        self.total_steps: int = total_steps
        self.anneal_strategy = anneal_strategy
        self.cycle_momentum = cycle_momentum
        self.use_beta1 = use_beta1
        # (last step of the phase, group keys of its start and end lr and momentum)
        if three_phase:
            self.phases = [
                (float(pct_start * total_steps) - 1, "initial_lr", "max_lr",
                 "max_momentum", "base_momentum"),
                (float(2 * pct_start * total_steps) - 2, "max_lr", "initial_lr",
                 "base_momentum", "max_momentum"),
                (total_steps - 1, "initial_lr", "min_lr", "max_momentum", "max_momentum")]
        else:
            self.phases = [
                (float(pct_start * total_steps) - 1, "initial_lr", "max_lr",
                 "max_momentum", "base_momentum"),
                (total_steps - 1, "max_lr", "min_lr", "base_momentum", "max_momentum")]
        if last_epoch == -1:
            for k, g in enumerate(groups):
                g["initial_lr"] = max_lrs[k] / div_factor
                g["max_lr"] = max_lrs[k]
                g["min_lr"] = g["initial_lr"] / final_div_factor
                if cycle_momentum:
                    g["max_momentum"] = max_ms[k]
                    g["base_momentum"] = base_ms[k]
                    self._set_momentum(g, max_ms[k])
        super().__init__(optimizer, last_epoch)

    def _anneal(self, start: float, end: float, pct: float) -> float:
        if self.anneal_strategy == "cos":
            return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)
        return (end - start) * pct + start

    def _at(self, group: dict[str, Any], step: int) -> tuple[float, float | None]:
        """(lr, momentum or None) of `group` at `step`."""
        start = 0.0
        for k, (end, lr0, lr1, m0, m1) in enumerate(self.phases):
            if step <= end or k == len(self.phases) - 1:
                # an empty phase (PyTorch divides by zero there) is at its end
                pct = (step - start) / (end - start) if end > start else 1.0
                momentum = self._anneal(group[m0], group[m1], pct) if self.cycle_momentum \
                    else None
                return self._anneal(group[lr0], group[lr1], pct), momentum
            start = end
        raise AssertionError("unreachable")

    def lr_at(self, epoch: int) -> list[float]:
        if epoch > self.total_steps:
            raise ValueError(f"stepped {epoch} times, but total_steps is {self.total_steps}")
        return [self._at(g, epoch)[0] for g in self.optimizer.param_groups]

    def _apply(self, lrs: Sequence[float]) -> None:
        super()._apply(lrs)
        if self.cycle_momentum:
            for g in self.optimizer.param_groups:
                momentum = self._at(g, self.last_epoch)[1]
                assert momentum is not None
                self._set_momentum(g, momentum)

    def _set_momentum(self, group: dict[str, Any], momentum: float) -> None:
        if self.use_beta1:
            group["betas"] = (momentum, *group["betas"][1:])
        else:
            group["momentum"] = momentum


class SequentialLR(LRScheduler):
    """Run `schedulers` one after the other: scheduler k takes over at
    epoch ``milestones[k-1]`` and starts there from its own epoch 0."""

    def __init__(self, optimizer: Optimizer, schedulers: Sequence[LRScheduler],
                 milestones: Sequence[int], last_epoch: int = -1) -> None:
        schedulers = list(schedulers)
        milestones = list(milestones)
        if not schedulers:
            raise ValueError("schedulers must not be empty")
        for k, s in enumerate(schedulers):
            if isinstance(s, ReduceLROnPlateau):
                raise ValueError(f"schedulers[{k}] is a ReduceLROnPlateau: its lr follows "
                                 "a metric, not the epoch, so it cannot be sequenced")
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

    def lr_at(self, epoch: int) -> list[float]:
        k = bisect.bisect_right(self.milestones, epoch)
        start = self.milestones[k - 1] if k else 0
        return self.schedulers[k].lr_at(epoch - start)

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["schedulers"] = [s.state_dict() for s in self.schedulers]
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
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


class ReduceLROnPlateau(LRScheduler):
    """Reduce the lr when a metric stops improving, as
    ``torch.optim.lr_scheduler.ReduceLROnPlateau``: ``sched.step(val_loss)``
    once per epoch.

    An epoch improves on the best value so far if its metric is below
    ``best * (1 - threshold)`` (mode "min", threshold_mode "rel"), below
    ``best - threshold`` ("abs"), or above ``best * (1 + threshold)`` /
    ``best + threshold`` in mode "max"; NaN never improves.  After more than
    `patience` epochs in a row without improvement every group's lr becomes
    ``max(lr * factor, min_lr)`` (unless that changes it by eps or less), and
    the count starts again after `cooldown` epochs.  Construction leaves the
    learning rates as they are.
    """

    def __init__(self, optimizer: Optimizer, mode: str = "min", factor: float = 0.1,
                 patience: int = 10, threshold: float = 1e-4, threshold_mode: str = "rel",
                 cooldown: int = 0, min_lr: float | Sequence[float] = 0.0,
                 eps: float = 1e-8) -> None:
        if not hasattr(optimizer, "param_groups"):
            raise TypeError(f"{type(optimizer).__name__} is not an optimizer")
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        if threshold_mode not in ("rel", "abs"):
            raise ValueError(f"threshold_mode must be 'rel' or 'abs', got {threshold_mode!r}")
        _check("factor", factor, lambda v: 0 <= v < 1, "in [0, 1)")
        _check("patience", patience, lambda v: isinstance(v, int) and v >= 0, "an integer >= 0")
        _check("threshold", threshold, lambda v: v >= 0 and math.isfinite(v), "finite and >= 0")
        _check("cooldown", cooldown, lambda v: isinstance(v, int) and v >= 0, "an integer >= 0")
        _check("eps", eps, lambda v: v >= 0 and math.isfinite(v), "finite and >= 0")
        min_lrs = _per_group("min_lr", min_lr, optimizer)
        for k, v in enumerate(min_lrs):
            _check(f"min_lr[{k}]", v, lambda v: v >= 0 and math.isfinite(v), "finite and >= 0")
        self.optimizer = optimizer
        self.mode = mode
        self.factor = factor
        self.patience = patience
        self.threshold = threshold
        self.threshold_mode = threshold_mode
        self.cooldown = cooldown
        self.min_lrs = min_lrs
        self.eps = eps
        self.best = math.inf if mode == "min" else -math.inf
        self.num_bad_epochs = 0
        self.cooldown_counter = 0
        self.last_epoch = 0
        self._last_lr = [g["lr"] for g in optimizer.param_groups]

    def is_better(self, value: float) -> bool:
        """Whether `value` improves on the best metric so far."""
        if self.mode == "min":
            bound = self.best * (1 - self.threshold) if self.threshold_mode == "rel" \
                else self.best - self.threshold
            return value < bound
        bound = self.best * (1 + self.threshold) if self.threshold_mode == "rel" \
            else self.best + self.threshold
        return value > bound

    def step(self, metrics: float) -> None:  # type: ignore[override]
        """Record one epoch's metric; reduce the lr after `patience` bad epochs."""
        try:
            current = float(metrics)
        except (TypeError, ValueError):
            raise TypeError(f"metrics must be a number, got {metrics!r}") from None
        self.last_epoch += 1
        if self.is_better(current):
            self.best = current
            self.num_bad_epochs = 0
        else:
            self.num_bad_epochs += 1
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.num_bad_epochs = 0          # bad epochs in cooldown do not count
        if self.num_bad_epochs > self.patience:
            for g, min_lr in zip(self.optimizer.param_groups, self.min_lrs):
                new = max(g["lr"] * self.factor, min_lr)
                if g["lr"] - new > self.eps:
                    g["lr"] = new
            self.cooldown_counter = self.cooldown
            self.num_bad_epochs = 0
        self._last_lr = [g["lr"] for g in self.optimizer.param_groups]

    def lr_at(self, epoch: int) -> list[float]:
        raise TypeError("ReduceLROnPlateau has no lr per epoch: it follows the metrics "
                        "passed to step()")
