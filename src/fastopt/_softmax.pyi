# Type stub of the softmax / cross-entropy kernels (_softmax.pyx), built once
# per SIMD level; `fastopt._dispatch` makes the chosen level importable under
# this name.
from typing import Any, Literal, SupportsIndex, overload

import numpy as np
from numpy.typing import NDArray

from ._typing import FloatArray

def log_softmax(x: FloatArray, axis: SupportsIndex = -1,
                out: FloatArray | None = None) -> FloatArray: ...
def softmax(x: FloatArray, axis: SupportsIndex = -1,
            out: FloatArray | None = None) -> FloatArray: ...

# The result's type follows `reduction` and `return_grad`: a float, or the
# per-row losses for reduction="none"; with the gradient when return_grad=True.
_Target = NDArray[np.integer[Any]] | FloatArray

@overload
def cross_entropy(
    logits: FloatArray, target: _Target, *, weight: FloatArray | None = None,
    ignore_index: int = -100, reduction: Literal["mean", "sum"] = "mean",
    label_smoothing: float = 0.0, return_grad: Literal[False] = False,
    grad_out: FloatArray | None = None,
) -> float: ...
@overload
def cross_entropy(
    logits: FloatArray, target: _Target, *, weight: FloatArray | None = None,
    ignore_index: int = -100, reduction: Literal["none"],
    label_smoothing: float = 0.0, return_grad: Literal[False] = False,
    grad_out: FloatArray | None = None,
) -> FloatArray: ...
@overload
def cross_entropy(
    logits: FloatArray, target: _Target, *, weight: FloatArray | None = None,
    ignore_index: int = -100, reduction: Literal["mean", "sum"] = "mean",
    label_smoothing: float = 0.0, return_grad: Literal[True],
    grad_out: FloatArray | None = None,
) -> tuple[float, FloatArray]: ...
@overload
def cross_entropy(
    logits: FloatArray, target: _Target, *, weight: FloatArray | None = None,
    ignore_index: int = -100, reduction: Literal["none"],
    label_smoothing: float = 0.0, return_grad: Literal[True],
    grad_out: FloatArray | None = None,
) -> tuple[FloatArray, FloatArray]: ...
@overload
def cross_entropy(
    logits: FloatArray, target: _Target, *, weight: FloatArray | None = None,
    ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
    return_grad: bool = False, grad_out: FloatArray | None = None,
) -> float | FloatArray | tuple[float | FloatArray, FloatArray]: ...
