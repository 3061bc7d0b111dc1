"""Choose the SIMD level of the kernel core once, at import.

The kernel core (``_core.pyx``: every family's ``nogil`` loops, nothing
else) is built once per instruction-set level, as ``fastopt._<level>._core``;
the Python-facing modules (``fastopt._optim``, ``fastopt._batchnorm``,
``fastopt._softmax``, ``fastopt._train``) are built once and call the chosen
core through the table of C functions it publishes (``CORE.api``, see
``_core.pxd``).  The best level the CPU supports is used;
``FASTOPT_SIMD=<level>`` forces a level (a lower one, for testing).
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType

from . import _runtime

__all__ = ["ORDER", "LEVEL", "CORE"]

ORDER = ("native", "avx512", "avx2", "baseline")


def _built_levels() -> list[str]:
    here = os.path.dirname(__file__)
    return [lv for lv in ORDER if os.path.isdir(os.path.join(here, "_" + lv))]


def _choose_level() -> str:
    built = _built_levels()
    supported = set(_runtime.cpu_levels()) | {"native"}
    forced = os.environ.get("FASTOPT_SIMD", "").strip().lower()
    if forced:
        if forced not in ORDER:
            raise ImportError(f"FASTOPT_SIMD={forced!r}: expected one of {', '.join(ORDER)}")
        if forced not in built:
            raise ImportError(f"FASTOPT_SIMD={forced!r}: this build has only {', '.join(built)}")
        if forced not in supported:
            raise ImportError(f"FASTOPT_SIMD={forced!r}: this CPU supports only "
                              f"{', '.join(_runtime.cpu_levels())}")
        return forced
    for level in built:
        if level in supported:
            return level
    raise ImportError("fastopt: no kernel build found for this CPU")


LEVEL = _choose_level()
CORE: ModuleType = importlib.import_module(f"fastopt._{LEVEL}._core")
