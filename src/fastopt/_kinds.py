"""What each optimizer kind is, declared once.

A `Kind` names its hyperparameters (with ``torch.optim``'s defaults and the
range each must lie in), its state arrays (``torch.optim``'s names, in the
order of the native kernel's state slots, each with the option that asks for
it) and when its step count advances.  Read by:

* the native group parser (``FusedStep`` in ``_optim.pyx``), which checks
  every group against these ranges at every step and knows from the slots
  which options need state that may not exist;
* the NumPy classes (`fastopt.optim`): their defaults, the checks of their
  constructor arguments, their ``state`` names;
* the PyTorch bridge (`fastopt.torch`): the same, and torch's state names;
* the speed report's optimizer table (`fastopt.bench`).

Adding an optimizer kind is: its loop in the kernel core
(``_core_optim.pxi.tp``), its coefficients (``_optim.pyx``), one `Kind` here,
and its tests (``CONTRIBUTING.md``).  ``AdamW`` is Adam with other defaults:
a `Kind` of its own over the same native kernel.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

__all__ = ["Hyper", "Slot", "Kind", "SGD", "RMSPROP", "ADAM", "ADAMW", "KINDS"]


@dataclass(frozen=True)
class Hyper:
    """One hyperparameter of a param group.

    `kind` is ``"number"`` (a finite real in ``[lo, hi)``, or ``[lo, hi]``
    when `closed`), ``"flag"`` (a bool) or ``"pair"`` (a tuple of two numbers,
    each in ``[lo, hi)``: ``betas``).
    """
    name: str
    default: Any
    kind: str = "number"
    lo: float = 0.0
    hi: float = math.inf
    closed: bool = False


@dataclass(frozen=True)
class Slot:
    """A state array: its name in ``torch.optim``'s state, and the group
    option that asks for it (None: every parameter has it).  A group needs
    the slot when the option is true (a flag) or nonzero (a number)."""
    name: str
    option: str | None = None


@dataclass(frozen=True)
class Kind:
    """An optimizer: its native kernel family, hyperparameters and state."""
    name: str                   # as torch.optim names the class
    native: str                 # the kernel family: "sgd", "rmsprop" or "adam"
    hypers: tuple[Hyper, ...]
    slots: tuple[Slot, ...]     # in the order of the native kernel's state slots
    # state["step"] advances at every update (None), or only at those made
    # with this option nonzero (SGD: momentum updates, whose count decides
    # the buffer's first-step rule)
    steps_with: str | None = None

    def defaults(self) -> dict[str, Any]:
        """The hyperparameters' defaults (a new dict)."""
        return {h.name: h.default for h in self.hypers}

    def hyper(self, name: str) -> Hyper:
        for h in self.hypers:
            if h.name == name:
                return h
        raise KeyError(name)

    @property
    def slot_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.slots)

    def needs(self, group: dict[str, Any]) -> tuple[bool, ...]:
        """Which state arrays the parameters of `group` need."""
        return tuple(s.option is None or bool(group[s.option]) for s in self.slots)

    def counts_steps(self, group: dict[str, Any]) -> bool:
        """Whether an update of `group` advances its parameters' step counts."""
        return self.steps_with is None or bool(group[self.steps_with])


_LR = Hyper("lr", 1e-3)
_WEIGHT_DECAY = Hyper("weight_decay", 0.0)
_MAXIMIZE = Hyper("maximize", False, "flag")

SGD = Kind(
    "SGD", "sgd",
    (_LR, Hyper("momentum", 0.0), Hyper("dampening", 0.0, hi=1.0, closed=True),
     _WEIGHT_DECAY, Hyper("nesterov", False, "flag"), _MAXIMIZE),
    (Slot("momentum_buffer", "momentum"),),
    steps_with="momentum")

RMSPROP = Kind(
    "RMSprop", "rmsprop",
    (Hyper("lr", 1e-2), Hyper("alpha", 0.99, hi=1.0), Hyper("eps", 1e-8), _WEIGHT_DECAY,
     Hyper("momentum", 0.0), Hyper("centered", False, "flag"), _MAXIMIZE),
    (Slot("square_avg"), Slot("momentum_buffer", "momentum"), Slot("grad_avg", "centered")))

ADAM = Kind(
    "Adam", "adam",
    (_LR, Hyper("betas", (0.9, 0.999), "pair", hi=1.0), Hyper("eps", 1e-8), _WEIGHT_DECAY,
     Hyper("amsgrad", False, "flag"), _MAXIMIZE, Hyper("decoupled_weight_decay", False, "flag")),
    (Slot("exp_avg"), Slot("exp_avg_sq"), Slot("max_exp_avg_sq", "amsgrad")))

# torch.optim.AdamW: Adam with decoupled weight decay, 1e-2 by default.
ADAMW = Kind(
    "AdamW", "adam",
    tuple(Hyper("weight_decay", 1e-2) if h.name == "weight_decay"
          else Hyper("decoupled_weight_decay", True, "flag") if h.name == "decoupled_weight_decay"
          else h for h in ADAM.hypers),
    ADAM.slots)

KINDS = {k.name: k for k in (SGD, RMSPROP, ADAM, ADAMW)}
