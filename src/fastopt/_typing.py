"""Type aliases of fastopt's annotations and stubs, in one place.

A new dtype (say bfloat16 storage) or a new kind of argument is added here
once, not in every signature.
"""
from collections.abc import Iterable
from typing import Any, Union

import numpy as np
from numpy.typing import NDArray

#: A floating-point array, as the kernels take it (float32 or float64; the
#: dtype is checked at run time).
FloatArray = NDArray[np.floating[Any]]

#: An optimizer's parameters: a list of arrays, or of param-group dicts
#: (``{"params": [...], "lr": ...}``).
Params = Union[Iterable[FloatArray], Iterable[dict[str, Any]]]
