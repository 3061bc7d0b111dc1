"""Loss scaling for low-precision gradients: `GradScaler`, as ``torch.amp.GradScaler``.

Small gradients underflow in float16 (below 6e-8) and lose precision near
it.  Loss scaling multiplies the loss's gradient by a large factor S before
the backward pass, so every gradient is S times larger, and divides by S in
the optimizer step.  `GradScaler` picks S dynamically, with PyTorch's rules
and defaults: it starts at 2**16, halves S (``backoff_factor``) whenever a
step finds an inf or NaN gradient (and skips that step), and doubles it
(``growth_factor``) after ``growth_interval`` = 2000 steps in a row without
one::

    scaler = fastopt.GradScaler()
    for xb, yb in batches:
        loss, dlogits = fastopt.cross_entropy(model(xb), yb, return_grad=True)
        grads = backward(scaler.scale(dlogits))     # gradients of S * loss
        scaler.step(opt, grads)                     # opt.step(grads, grad_scale=S)
        scaler.update()

`step` hands S to the optimizer, which divides by it inside its fused pass
and skips the update if any gradient holds an inf or NaN (one parallel
check first, nothing written).  To clip, unscale first, as with PyTorch's
``scaler.unscale_(optimizer)``::

        grads = backward(scaler.scale(dlogits))
        scaler.unscale_(opt, grads)                 # grads /= S in place, records inf/NaN
        fastopt.clip_grad_norm_(grads, max_norm)    # the norm of the true gradients
        scaler.step(opt, grads)                     # skips if unscale_ found inf/NaN
        scaler.update()

Differences from PyTorch, because NumPy arrays carry no ``.grad``: `step`
and `unscale_` take the gradients; there is no device argument; errors in
the arguments are ValueError/TypeError (PyTorch asserts).  The scale is a
float32 value, updated as PyTorch's ``_amp_update_scale_`` does.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from .optim import Optimizer

if TYPE_CHECKING:
    from ._typing import FloatArray

_T = TypeVar("_T")

__all__ = ["GradScaler"]

_READY, _UNSCALED, _STEPPED = "ready", "unscaled", "stepped"


def _f32(x: float) -> float:
    """x rounded to float32 (PyTorch keeps the scale in a float32 tensor)."""
    return float(np.float32(x))


def _positive(name: str, value: Any) -> float:
    """A finite number > 0."""
    try:
        if isinstance(value, (bool, str, bytes)):
            raise TypeError
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {value!r}") from None
    if not (v > 0 and math.isfinite(v)):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return v


class GradScaler:
    """Dynamic loss scaling, as ``torch.amp.GradScaler``.

    Parameters
    ----------
    init_scale : float
        The first scale S (2**16).
    growth_factor : float
        > 1: S is multiplied by it after `growth_interval` steps in a row
        without inf/NaN gradients (2.0).
    backoff_factor : float
        In (0, 1): S is multiplied by it after a step with inf/NaN
        gradients, which is skipped (0.5).
    growth_interval : int
        >= 1 (2000).
    enabled : bool
        False: `scale` returns its input, `step` calls ``optimizer.step(grads)``,
        the rest does nothing.
    """

    def __init__(self, init_scale: float = 2.0**16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000,
                 enabled: bool = True) -> None:
        self._enabled = bool(enabled)
        if not self._enabled:
            return
        _positive("init_scale", init_scale)
        if not _positive("growth_factor", growth_factor) > 1.0:
            raise ValueError(f"growth_factor must be > 1, got {growth_factor!r}")
        if not _positive("backoff_factor", backoff_factor) < 1.0:
            raise ValueError(f"backoff_factor must be in (0, 1), got {backoff_factor!r}")
        self._check_interval(growth_interval)
        self._scale = _f32(init_scale)
        self._growth_factor = float(growth_factor)
        self._backoff_factor = float(backoff_factor)
        self._growth_interval = int(growth_interval)
        self._growth_tracker = 0
        self._per_optimizer: dict[int, dict[str, Any]] = {}   # id(optimizer) -> {"stage", "found_inf"}

    @staticmethod
    def _check_interval(n: Any) -> None:
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
            raise TypeError(f"growth_interval must be an integer, got {n!r}")
        if n < 1:
            raise ValueError(f"growth_interval must be >= 1, got {n!r}")

    # ----------------------------------------------------------- scaling

    def scale(self, outputs: _T) -> _T:
        """`outputs` multiplied by the scale: a number, an ndarray (a new array
        of its dtype, computed in float32 for float16/bfloat16 and rounded
        once) or a list/tuple of those."""
        if not self._enabled:
            return outputs
        if isinstance(outputs, np.ndarray):
            out = np.empty_like(outputs)
            if outputs.dtype == np.float64:
                np.multiply(outputs, self._scale, out=out)
            else:
                np.multiply(outputs, np.float32(self._scale), out=out, casting="unsafe")
            return out    # type: ignore[return-value]
        if isinstance(outputs, (list, tuple)):
            return type(outputs)(self.scale(o) for o in outputs)   # type: ignore[return-value]
        if isinstance(outputs, (int, float, np.number)) and not isinstance(outputs, bool):
            return outputs * self._scale    # type: ignore[no-any-return,operator]
        raise TypeError(f"outputs must be a number, an ndarray or a list/tuple of them, "
                        f"got {type(outputs).__name__}")

    def unscale_(self, optimizer: Optimizer, grads: Sequence[FloatArray | None]) -> None:
        """Divide `grads` (one per parameter of `optimizer`, None skips) by the
        scale in place and record whether any holds an inf or NaN, as
        ``torch.amp.GradScaler.unscale_``: call it before working on the true
        gradients (``clip_grad_norm_``), then `step` with the same grads.
        At most once per optimizer between `update` calls.

        The gradients are multiplied by 1/scale (rounded to float32) in their
        own dtype: float16 gradients then lose what falls below float16's
        range, so clip float32 gradients where that matters (`step` without
        `unscale_` never writes the gradients).
        """
        if not self._enabled:
            return
        state = self._state(optimizer)
        if state["stage"] == _UNSCALED:
            raise RuntimeError("unscale_() has already been called on this optimizer "
                               "since the last update().")
        if state["stage"] == _STEPPED:
            raise RuntimeError("unscale_() is being called after step().")
        state["found_inf"] = optimizer.unscale_(grads, self._scale)
        state["stage"] = _UNSCALED

    def step(self, optimizer: Optimizer, grads: Sequence[FloatArray | None]) -> None:
        """``optimizer.step(grads, grad_scale=scale)``: the update divides by the
        scale in its fused pass and is skipped (nothing changes, and
        ``optimizer.found_inf`` is True) if a gradient holds an inf or NaN.
        After `unscale_`: ``optimizer.step(grads)``, skipped if `unscale_`
        found an inf or NaN.  Returns None."""
        if not self._enabled:
            optimizer.step(grads)
            return None
        state = self._state(optimizer)
        if state["stage"] == _STEPPED:
            raise RuntimeError("step() has already been called since the last update().")
        if state["stage"] == _UNSCALED:
            optimizer.step(grads, found_inf=state["found_inf"])
        else:
            optimizer.step(grads, grad_scale=self._scale)
            state["found_inf"] = bool(optimizer.found_inf)
        state["stage"] = _STEPPED
        return None

    def update(self, new_scale: float | None = None) -> None:
        """Update the scale after the steps of an iteration: times
        `backoff_factor` if a step found inf/NaN gradients; else, after
        `growth_interval` such steps in a row, times `growth_factor` (unless
        that overflows float32).  `new_scale` sets it instead."""
        if not self._enabled:
            return
        if new_scale is not None:
            self._scale = _f32(_positive("new_scale", new_scale))
        else:
            if not self._per_optimizer:
                raise RuntimeError("No inf checks were recorded prior to update(): call "
                                   "step() (or unscale_()) first.")
            found = any(s["found_inf"] for s in self._per_optimizer.values())
            # torch._amp_update_scale_
            if found:
                self._scale = _f32(self._scale * self._backoff_factor)
                self._growth_tracker = 0
            elif self._growth_tracker + 1 == self._growth_interval:
                grown = _f32(self._scale * self._growth_factor)
                if math.isfinite(grown):
                    self._scale = grown
                self._growth_tracker = 0
            else:
                self._growth_tracker += 1
        self._per_optimizer = {}

    def _state(self, optimizer: Optimizer) -> dict[str, Any]:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a fastopt optimizer, got {type(optimizer).__name__}")
        st = self._per_optimizer.get(id(optimizer))
        if st is None or st["optimizer"] is not optimizer:
            st = self._per_optimizer[id(optimizer)] = {"optimizer": optimizer, "stage": _READY,
                                                       "found_inf": False}
        return st

    # -------------------------------------------------------- attributes

    def get_scale(self) -> float:
        """The current scale (1.0 if disabled)."""
        return self._scale if self._enabled else 1.0

    def get_growth_factor(self) -> float:
        return self._growth_factor

    def set_growth_factor(self, new_factor: float) -> None:
        if not _positive("growth_factor", new_factor) > 1.0:
            raise ValueError(f"growth_factor must be > 1, got {new_factor!r}")
        self._growth_factor = float(new_factor)

    def get_backoff_factor(self) -> float:
        return self._backoff_factor

    def set_backoff_factor(self, new_factor: float) -> None:
        if not _positive("backoff_factor", new_factor) < 1.0:
            raise ValueError(f"backoff_factor must be in (0, 1), got {new_factor!r}")
        self._backoff_factor = float(new_factor)

    def get_growth_interval(self) -> int:
        return self._growth_interval

    def set_growth_interval(self, new_interval: int) -> None:
        self._check_interval(new_interval)
        self._growth_interval = int(new_interval)

    def is_enabled(self) -> bool:
        return self._enabled

    def state_dict(self) -> dict[str, Any]:
        """PyTorch's five entries (``scale``, ``growth_factor``,
        ``backoff_factor``, ``growth_interval``, ``_growth_tracker``); empty
        if disabled.  Save it after `update`."""
        if not self._enabled:
            return {}
        return {"scale": self._scale, "growth_factor": self._growth_factor,
                "backoff_factor": self._backoff_factor,
                "growth_interval": self._growth_interval,
                "_growth_tracker": self._growth_tracker}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a `state_dict` (numbers, or 0-d arrays after ``np.load``);
        checked first: nothing changes on an error.  A no-op if disabled."""
        if not self._enabled:
            return
        sd = {k: (v.item() if isinstance(v, np.ndarray) and v.ndim == 0 else v)
              for k, v in dict(state_dict).items()}
        if not sd:
            raise RuntimeError("The source state dict is empty, possibly because it was saved "
                               "from a disabled instance of GradScaler.")
        keys = {"scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker"}
        if set(sd) != keys:
            raise ValueError(f"state dict must have the keys {sorted(keys)}, got {sorted(sd)}")
        scale = _f32(_positive("scale", sd["scale"]))
        if not _positive("growth_factor", sd["growth_factor"]) > 1.0:
            raise ValueError(f"growth_factor must be > 1, got {sd['growth_factor']!r}")
        if not _positive("backoff_factor", sd["backoff_factor"]) < 1.0:
            raise ValueError(f"backoff_factor must be in (0, 1), got {sd['backoff_factor']!r}")
        self._check_interval(sd["growth_interval"])
        tracker = sd["_growth_tracker"]
        if isinstance(tracker, bool) or not isinstance(tracker, (int, np.integer)) or tracker < 0:
            raise ValueError(f"_growth_tracker must be an integer >= 0, got {tracker!r}")
        self._scale = scale
        self._growth_factor = float(sd["growth_factor"])
        self._backoff_factor = float(sd["backoff_factor"])
        self._growth_interval = int(sd["growth_interval"])
        self._growth_tracker = int(tracker)

    def __repr__(self) -> str:
        if not self._enabled:
            return "GradScaler(enabled=False)"
        return (f"GradScaler(scale={self._scale}, growth_factor={self._growth_factor}, "
                f"backoff_factor={self._backoff_factor}, "
                f"growth_interval={self._growth_interval}, "
                f"growth_tracker={self._growth_tracker})")
