"""What each optimizer kind is, declared once.

A `Kind` names its hyperparameters (with ``torch.optim``'s defaults and the
range each must lie in), its state arrays (``torch.optim``'s names, in the
order of the native kernel's state slots, each with the option that asks for
it and the value it starts at), the float32 numbers of its state besides the
arrays, and when its step count advances.  Read by:

* the native group parser (``FusedStep`` in ``_optim.pyx``), which checks
  every group against these ranges at every step and knows from the slots
  which options need state that may not exist (the kinds it has a kernel
  family for);
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

__all__ = ["Bound", "Hyper", "Slot", "Scalar", "Kind", "SGD", "RMSPROP", "ADAM", "ADAMW",
           "ADAGRAD", "ADAMAX", "NADAM", "RADAM", "ADADELTA", "ASGD", "RPROP", "LION",
           "ADAFACTOR", "KINDS"]


@dataclass(frozen=True)
class Bound:
    """The range of one number of a pair whose numbers have ranges of their
    own (`Hyper.each`): ``[lo, hi)``, the low end excluded when `lo_open`,
    the high end included when `closed`."""
    lo: float = 0.0
    hi: float = math.inf
    closed: bool = False
    lo_open: bool = False
    none_ok: bool = False       # None is allowed too (Adafactor's eps[0]: the dtype's epsilon)


@dataclass(frozen=True)
class Hyper:
    """One hyperparameter of a param group.

    `kind` is ``"number"`` (a finite real in ``[lo, hi)``, or ``[lo, hi]``
    when `closed`), ``"flag"`` (a bool) or ``"pair"`` (a tuple of two numbers,
    each in ``[lo, hi)``: ``betas``; or each in its own range, `each`:
    Rprop's ``etas``).
    """
    name: str
    default: Any
    kind: str = "number"
    lo: float = 0.0
    hi: float = math.inf
    closed: bool = False
    each: tuple[Bound, Bound] | None = None


@dataclass(frozen=True)
class Slot:
    """A state array: its name in ``torch.optim``'s state, and the group
    option that asks for it (None: every parameter has it).  A group needs
    the slot when the option is true (a flag) or nonzero (a number).  It
    starts filled with `init`: a number, or the name of the hyperparameter
    whose value it starts at (Adagrad's ``sum``, Rprop's ``step_size``).
    Its `shape` is the parameter's (``"param"``), or Adafactor's: for a
    parameter of 2 or more dimensions ``"rows"`` (``shape[:-1] + (1,)``) and
    ``"cols"`` (``shape[:-2] + (1, shape[-1])``), for a 0-d or 1-d one
    ``"vector"`` (the parameter's); a parameter has the slots its shape
    asks for."""
    name: str
    option: str | None = None
    init: float | str = 0.0
    shape: str = "param"

    def shape_for(self, shape: tuple[int, ...]) -> tuple[int, ...] | None:
        """This slot's shape for a parameter of shape `shape` (None: such a
        parameter has no such slot)."""
        nd = len(shape)
        if self.shape == "param":
            return tuple(shape)
        if self.shape == "vector":
            return tuple(shape) if nd < 2 else None
        if nd < 2:
            return None
        if self.shape == "rows":
            return tuple(shape[:-1]) + (1,)
        return tuple(shape[:-2]) + (1, shape[-1])


@dataclass(frozen=True)
class Scalar:
    """A number of each parameter's state besides its arrays (NAdam's
    ``mu_product``, ASGD's ``eta`` and ``mu``), kept in float32 as
    ``torch.optim`` keeps it; it starts at `init`, a number or the name of a
    hyperparameter."""
    name: str
    init: float | str


@dataclass(frozen=True)
class Kind:
    """An optimizer: its native kernel family, hyperparameters and state."""
    name: str                   # as torch.optim names the class
    native: str                 # the kernel family: "sgd", "rmsprop", "adam", "adagrad"...
    hypers: tuple[Hyper, ...]
    slots: tuple[Slot, ...]     # in the order of the native kernel's state slots
    # state["step"] advances at every update (None), or only at those made
    # with this option nonzero (SGD: momentum updates, whose count decides
    # the buffer's first-step rule)
    steps_with: str | None = None
    scalars: tuple[Scalar, ...] = ()
    # Why the kind keeps its state in the compute dtype and float32 masters
    # (refusing state_dtype="bfloat16" and split masters); "": it takes them.
    full_precision: str = ""

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
        """Which state arrays the parameters of `group` need (if their shape
        has them: `Slot.shape_for`)."""
        return tuple(s.option is None or bool(group[s.option]) for s in self.slots)

    @property
    def shaped(self) -> bool:
        """Whether some state array is not shaped like its parameter (Adafactor's)."""
        return any(s.shape != "param" for s in self.slots)

    @property
    def scalar_names(self) -> tuple[str, ...]:
        return tuple(x.name for x in self.scalars)

    @staticmethod
    def start(item: Slot | Scalar, group: dict[str, Any]) -> float:
        """The value a state slot or number of a parameter of `group` starts at."""
        return float(group[item.init]) if isinstance(item.init, str) else float(item.init)

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

_BETAS = Hyper("betas", (0.9, 0.999), "pair", hi=1.0)
_EPS = Hyper("eps", 1e-8)
_DECOUPLED = Hyper("decoupled_weight_decay", False, "flag")

ADAGRAD = Kind(
    "Adagrad", "adagrad",
    (Hyper("lr", 1e-2), Hyper("lr_decay", 0.0), _WEIGHT_DECAY,
     Hyper("initial_accumulator_value", 0.0), Hyper("eps", 1e-10), _MAXIMIZE),
    (Slot("sum", init="initial_accumulator_value"),))

ADAMAX = Kind(
    "Adamax", "adamax",
    (Hyper("lr", 2e-3), _BETAS, _EPS, _WEIGHT_DECAY, _MAXIMIZE),
    (Slot("exp_avg"), Slot("exp_inf")))

NADAM = Kind(
    "NAdam", "nadam",
    (Hyper("lr", 2e-3), _BETAS, _EPS, _WEIGHT_DECAY, Hyper("momentum_decay", 4e-3),
     _DECOUPLED, _MAXIMIZE),
    (Slot("exp_avg"), Slot("exp_avg_sq")),
    scalars=(Scalar("mu_product", 1.0),))

RADAM = Kind(
    "RAdam", "radam",
    (_LR, _BETAS, _EPS, _WEIGHT_DECAY, _DECOUPLED, _MAXIMIZE),
    (Slot("exp_avg"), Slot("exp_avg_sq")))

ADADELTA = Kind(
    "Adadelta", "adadelta",
    (Hyper("lr", 1.0), Hyper("rho", 0.9, hi=1.0, closed=True), Hyper("eps", 1e-6),
     _WEIGHT_DECAY, _MAXIMIZE),
    (Slot("square_avg"), Slot("acc_delta")))

# torch checks none of lambd, alpha and t0: here lambd, alpha >= 0.
ASGD = Kind(
    "ASGD", "asgd",
    (Hyper("lr", 1e-2), Hyper("lambd", 1e-4), Hyper("alpha", 0.75),
     Hyper("t0", 1e6, lo=-math.inf), _WEIGHT_DECAY, _MAXIMIZE),
    (Slot("ax"),),
    scalars=(Scalar("eta", "lr"), Scalar("mu", 1.0)))

RPROP = Kind(
    "Rprop", "rprop",
    (Hyper("lr", 1e-2),
     Hyper("etas", (0.5, 1.2), "pair",
           each=(Bound(0.0, 1.0, lo_open=True), Bound(1.0, math.inf, lo_open=True))),
     Hyper("step_sizes", (1e-6, 50), "pair"), _MAXIMIZE),
    (Slot("prev"), Slot("step_size", init="lr")))

# Lion (Chen et al. 2023; optax.lion) is not in torch.optim: the names and
# defaults are the paper's and optax's.
LION = Kind(
    "Lion", "lion",
    (Hyper("lr", 1e-4), Hyper("betas", (0.9, 0.99), "pair", hi=1.0), _WEIGHT_DECAY,
     _MAXIMIZE),
    (Slot("exp_avg"),))

# Its update is not elementwise (norms, row and column sums): the kernel
# family "factored".  torch's eps[0] None is the machine epsilon of the
# dtype the update is computed in (float32 for 16-bit parameters, which are
# updated through float32 masters).
ADAFACTOR = Kind(
    "Adafactor", "factored",
    (Hyper("lr", 1e-2), Hyper("beta2_decay", -0.8, lo=-math.inf, hi=0.0, closed=True),
     Hyper("eps", (None, 1e-3), "pair", each=(Bound(none_ok=True), Bound())),
     Hyper("d", 1.0, lo=1.0), _WEIGHT_DECAY, _MAXIMIZE),
    (Slot("row_var", shape="rows"), Slot("col_var", shape="cols"),
     Slot("variance", shape="vector")),
    full_precision="its factored statistics are a row and a column per matrix, a small "
                   "fraction of the parameters")

KINDS = {k.name: k for k in (SGD, RMSPROP, ADAM, ADAMW, ADAGRAD, ADAMAX, NADAM, RADAM,
                             ADADELTA, ASGD, RPROP, LION, ADAFACTOR)}
