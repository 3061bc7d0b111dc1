"""Choose the SIMD level of the kernel modules once, at import.

Every kernel module is built for several instruction-set levels
(``fastopt._<level>._<family>``).  The best level the CPU supports is used;
``FASTOPT_SIMD=<level>`` forces a level (a lower one, for testing).
"""
import importlib
import os

from . import _runtime

ORDER = ("native", "avx512", "avx2", "baseline")
FAMILIES = ("_optim", "_batchnorm", "_softmax", "_train")


def _built_levels():
    here = os.path.dirname(__file__)
    return [lv for lv in ORDER if os.path.isdir(os.path.join(here, "_" + lv))]


def _choose_level():
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
MODULES = {name: importlib.import_module(f"fastopt._{LEVEL}.{name}") for name in FAMILIES}
optim = MODULES["_optim"]
batchnorm = MODULES["_batchnorm"]
softmax = MODULES["_softmax"]
train = MODULES["_train"]
