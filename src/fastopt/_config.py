"""Thread control and build/runtime configuration."""
from __future__ import annotations

import operator
import os
import platform
import sys
from typing import Any, SupportsIndex, TextIO

from . import _dispatch, _runtime

_thread_limit = 0
# True in a child process forked from a parent that may have used OpenMP:
# GNU libgomp's thread pool does not survive fork(), and a parallel region in
# the child would wait forever for the parent's threads, so kernels there run
# on the calling thread.
_forked_child = False


def _apply_thread_limit() -> None:
    limit = 1 if _forked_child else _thread_limit
    for module in _dispatch.MODULES.values():
        module._set_thread_limit(limit)


def _after_fork_in_child() -> None:
    global _forked_child
    _forked_child = True
    _apply_thread_limit()


if hasattr(os, "register_at_fork") and "gomp" in _runtime.openmp_library():
    os.register_at_fork(after_in_child=_after_fork_in_child)


def get_num_threads() -> int:
    """Number of OpenMP threads fastopt's kernels use (at most) from this thread.

    This is OpenMP's team size (``OMP_NUM_THREADS``, or a limit set through
    threadpoolctl) capped by `set_num_threads`.  Small arrays run on one
    thread whatever this says.  In a process forked (``multiprocessing``
    with the "fork" start method) from a parent that uses GNU OpenMP, it is
    1: the parent's OpenMP threads do not exist in the child.
    """
    n = _runtime.max_threads()
    if _forked_child:
        return 1
    return min(n, _thread_limit) if _thread_limit else n


# The kernels keep the cap in a C int.
_MAX_THREADS = 2**31 - 1


def set_num_threads(n: SupportsIndex | None) -> None:
    """Cap the number of threads fastopt's kernels use; ``None`` or 0 removes the cap.

    `n` is an integer in [0, 2**31 - 1] (a larger cap than the machine's
    threads is allowed and means no cap); on an error the cap is unchanged.
    """
    global _thread_limit
    if n is None:
        n = 0
    if isinstance(n, (bool, float)):
        raise TypeError(f"n must be an int, got {type(n).__name__}")
    try:
        n = operator.index(n)
    except TypeError:
        raise TypeError(f"n must be an int, got {type(n).__name__}") from None
    if not 0 <= n <= _MAX_THREADS:
        raise ValueError(f"n must be in [1, 2**31 - 1] (or 0/None for no cap), got {n}")
    _thread_limit = n
    _apply_thread_limit()


def config() -> dict[str, Any]:
    """The facts `show_config` prints, as a dict."""
    try:
        from . import _build_config as b
        build = {"openmp": b.OPENMP, "compiler": b.COMPILER_VERSION, "cflags": b.CFLAGS,
                 "level_flags": b.LEVEL_FLAGS, "sanitize": getattr(b, "SANITIZE", [])}
    except ImportError:  # pragma: no cover - only for a tree built by hand
        build = {"openmp": bool(_runtime.openmp_version()), "compiler": "unknown",
                 "cflags": [], "level_flags": {}, "sanitize": []}
    from . import __version__
    return {
        "version": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_levels": _runtime.cpu_levels(),
        "simd_level": _dispatch.LEVEL,
        "built_levels": _dispatch._built_levels(),
        "simd_forced": os.environ.get("FASTOPT_SIMD") or None,
        "openmp": build["openmp"] and bool(_runtime.openmp_version()),
        "openmp_version": _runtime.openmp_version(),
        "openmp_library": _runtime.openmp_library(),
        "num_threads": get_num_threads(),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "compiler": build["compiler"],
        "cflags": build["cflags"],
        "level_flags": build["level_flags"],
        "sanitize": build["sanitize"],
    }


def show_config(file: TextIO | None = None) -> None:
    """Print the version, SIMD level, OpenMP runtime, thread count and build flags."""
    c = config()
    lines = [
        f"fastopt {c['version']} (Python {c['python']}, {c['platform']})",
        f"  SIMD level:    {c['simd_level']}"
        + (" (forced by FASTOPT_SIMD)" if c["simd_forced"] else "")
        + f"; CPU supports {', '.join(c['cpu_levels'])}; built {', '.join(c['built_levels'])}",
    ]
    if c["openmp"]:
        lines.append(f"  OpenMP:        yes, version {c['openmp_version']}, "
                     f"runtime {c['openmp_library'] or 'unknown'}")
    else:
        lines.append("  OpenMP:        NO - built without OpenMP, kernels run on one thread")
    lines += [
        f"  threads:       {c['num_threads']} (OMP_NUM_THREADS={c['omp_num_threads_env']})",
        f"  compiler:      {c['compiler']}",
        f"  flags:         {' '.join(c['cflags'])}",
        f"  level flags:   {' '.join(c['level_flags'].get(c['simd_level'], [])) or '(none)'}",
    ]
    if c["sanitize"]:
        lines.append(f"  sanitizers:    {', '.join(c['sanitize'])} (a test build, not for use)")
    print("\n".join(lines), file=file or sys.stdout)
