"""Choose the SIMD level of the kernel modules once, at import.

Every kernel module is built for several instruction-set levels
(``fastopt._<level>._<family>``).  The best level the CPU supports is used;
``FASTOPT_SIMD=<level>`` forces a level (a lower one, for testing).

The chosen modules are also importable under their level-neutral names,
``fastopt._optim``, ``fastopt._batchnorm``, ``fastopt._softmax`` and
``fastopt._train`` -- the names they were generated under (their functions'
``__module__``), and the names of their type stubs (``_optim.pyi``...).
"""
from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType

from . import _runtime

__all__ = ["ORDER", "FAMILIES", "LEVEL", "MODULES", "optim", "batchnorm", "softmax", "train"]

ORDER = ("native", "avx512", "avx2", "baseline")
FAMILIES = ("_optim", "_batchnorm", "_softmax", "_train")


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
MODULES: dict[str, ModuleType] = {
    name: importlib.import_module(f"fastopt._{LEVEL}.{name}") for name in FAMILIES}
for _name, _module in MODULES.items():
    sys.modules[f"{__package__}.{_name}"] = _module
    setattr(sys.modules[__package__], _name, _module)

from . import _batchnorm as batchnorm  # noqa: E402  (registered just above)
from . import _optim as optim  # noqa: E402
from . import _softmax as softmax  # noqa: E402
from . import _train as train  # noqa: E402
