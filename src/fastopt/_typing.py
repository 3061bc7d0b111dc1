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
#: (``{"params": [...], "lr": ...}``); not both (checked at run time).  One
#: iterable of either, so that a list literal of dicts is inferred as such.
Params = Iterable[Union[FloatArray, dict[str, Any]]]
