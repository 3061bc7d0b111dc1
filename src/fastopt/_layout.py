"""Where an optimizer's arrays live.

Every kind of array an optimizer keeps per parameter (each state slot, the
float32 masters) is one zeroed buffer holding the arrays of all parameters
in parameter order, each starting on a 64-byte boundary (a cache line, an
AVX-512 vector): one allocation instead of one per parameter, and a step
streams each buffer through memory in one direction.  `flat_views` lays out
a model's parameters and gradients the same way.  The fronts
(`fastopt.Optimizer`, `fastopt.torch`'s optimizers) own these arrays; the
native step (`FusedStep`) only holds them.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

ALIGN = 64      # bytes


def aligned_views(shapes: Sequence[tuple[int, ...]], dtypes: Sequence[Any],
                  ) -> tuple[np.ndarray[Any, Any], list[np.ndarray[Any, Any]]]:
    """One zeroed buffer (uint8, on a 64-byte boundary) and a view of it per
    (shape, dtype), in order, each on a 64-byte boundary; the padding bytes
    between views are zero."""
    dts = [np.dtype(d) for d in dtypes]
    nbytes = [math.prod(s) * d.itemsize for s, d in zip(shapes, dts)]
    offsets = [0]
    for nb in nbytes:
        offsets.append(offsets[-1] + -(-nb // ALIGN) * ALIGN)
    raw = np.zeros(offsets[-1] + ALIGN, np.uint8)
    skip = (-raw.ctypes.data) % ALIGN
    buf = raw[skip:skip + offsets[-1]]
    views = [buf[o:o + nb].view(d).reshape(s)
             for o, nb, d, s in zip(offsets, nbytes, dts, shapes)]
    return buf, views


def state_arrays(params: Sequence[Any], slots: Sequence[Sequence[bool]], state_dtype: Any = None,
                 kind: Any = None) -> tuple[list[list[Any]], list[Any]]:
    """Zeroed state arrays and float32 masters for `params` (ndarrays).

    ``slots[i][k]``: whether parameter i has state slot k (of 3).  A state
    array has its parameter's shape and compute dtype (float64 for float64,
    else float32, or `state_dtype` (bfloat16) if given); a float16/bfloat16
    parameter gets a float32 master (zeroed: its front copies the parameter
    in).  With `kind` (a `fastopt._kinds.Kind`), slot k has the shape its
    declaration gives for the parameter's shape, and a parameter whose shape
    has no such slot gets none (Adafactor's).  Returns (per parameter
    [s0, s1, s2] with None where absent, the
    masters with None for float32/float64 parameters).  Anything that is not
    a float ndarray gets nothing (the native step names what is wrong).
    """
    n = len(params)
    states: list[list[Any]] = [[None] * 3 for _ in range(n)]
    masters: list[Any] = [None] * n
    kinds = []
    for p in params:
        name = p.dtype.name if isinstance(p, np.ndarray) else None
        kinds.append(name if name in ("float32", "float64", "float16", "bfloat16") else None)
    for k in range(4):          # slots 0-2, then the masters
        shapes: list[Any] = [None if kinds[i] is None else
                             params[i].shape if k == 3 or kind is None or k >= len(kind.slots)
                             else kind.slots[k].shape_for(params[i].shape) for i in range(n)]
        owners = [i for i in range(n) if shapes[i] is not None
                  and (slots[i][k] if k < 3 else kinds[i] in ("float16", "bfloat16"))]
        if not owners:
            continue
        dts = [np.float32 if k == 3 else np.float64 if kinds[i] == "float64"
               else state_dtype if state_dtype is not None else np.float32 for i in owners]
        _, views = aligned_views([shapes[i] for i in owners], dts)
        for i, v in zip(owners, views):
            if k < 3:
                states[i][k] = v
            else:
                masters[i] = v
    return states, masters
