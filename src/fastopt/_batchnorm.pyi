# Type stub of the BatchNorm kernels (_batchnorm.pyx), built once per SIMD
# level; `fastopt._dispatch` makes the chosen level importable under this name.
from typing import SupportsIndex, final

import numpy as np
from numpy.typing import NDArray

from ._typing import FloatArray

@final
class BatchNormContext:
    """What `batch_norm_backward` needs from a `batch_norm_forward` call."""
    # Made only by batch_norm_forward: calling the class raises TypeError.
    def __init__(self, *args: object, **kwargs: object) -> None: ...
    @property
    def x(self) -> FloatArray: ...
    @property
    def gamma(self) -> FloatArray: ...
    @property
    def mean(self) -> NDArray[np.float64]: ...
    @property
    def invstd(self) -> NDArray[np.float64]: ...
    @property
    def training(self) -> bool: ...
    @property
    def axis(self) -> int: ...

def batch_norm_forward(
    x: FloatArray, gamma: FloatArray, beta: FloatArray, running_mean: FloatArray | None = None,
    running_var: FloatArray | None = None, *, training: bool = True, momentum: float = 0.1,
    eps: float = 1e-5, axis: SupportsIndex = 1, out: FloatArray | None = None,
) -> tuple[FloatArray, BatchNormContext]: ...
def batch_norm_backward(
    dy: FloatArray, ctx: BatchNormContext, *, dx_out: FloatArray | None = None,
) -> tuple[FloatArray, FloatArray, FloatArray]: ...
