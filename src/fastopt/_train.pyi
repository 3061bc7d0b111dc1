# Type stub of the training-loop kernels (_train.pyx), built once per SIMD
# level; `fastopt._dispatch` makes the chosen level importable under this name.
from typing import Any, TypeVar

import numpy as np
from numpy.typing import NDArray

from ._typing import FloatArray

_S = TypeVar("_S", bound=np.generic)

def take_rows(X: NDArray[_S], idx: NDArray[np.integer[Any]],
              out: NDArray[_S] | None = None) -> NDArray[_S]: ...
def ewa_update(avg: FloatArray, x: FloatArray, beta: float) -> None: ...
