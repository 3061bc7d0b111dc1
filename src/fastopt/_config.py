"""Thread control and build/runtime configuration."""
import os
import platform
import sys

from . import _dispatch, _runtime

_thread_limit = 0
# A default cap that fastopt sets itself, with the reason shown by
# show_config() (fastopt.distributed: MPI ranks sharing a node's cores).  It
# applies only while neither set_num_threads nor OMP_NUM_THREADS chose.
_default_cap = 0
_default_cap_reason = None
# True in a child process forked from a parent that may have used OpenMP:
# GNU libgomp's thread pool does not survive fork(), and a parallel region in
# the child would wait forever for the parent's threads, so kernels there run
# on the calling thread.
_forked_child = False


def _default_cap_applies():
    return bool(_default_cap) and not _thread_limit and "OMP_NUM_THREADS" not in os.environ


def _limit():
    """The cap in force (0: none)."""
    return _default_cap if _default_cap_applies() else _thread_limit


def _set_default_cap(n, reason):
    """Cap the thread count at n by default (0 removes it), for `reason`."""
    global _default_cap, _default_cap_reason
    _default_cap, _default_cap_reason = int(n), reason if n else None
    _apply_thread_limit()


def _apply_thread_limit():
    limit = 1 if _forked_child else _limit()
    for module in _dispatch.MODULES.values():
        module._set_thread_limit(limit)


def _after_fork_in_child():
    global _forked_child
    _forked_child = True
    _apply_thread_limit()


if hasattr(os, "register_at_fork") and "gomp" in _runtime.openmp_library():
    os.register_at_fork(after_in_child=_after_fork_in_child)


def get_num_threads():
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
    limit = _limit()
    return min(n, limit) if limit else n


def set_num_threads(n):
    """Cap the number of threads fastopt's kernels use; ``None`` or 0 removes the cap."""
    global _thread_limit
    if n is None:
        n = 0
    if isinstance(n, bool) or not isinstance(n, int) and not hasattr(n, "__index__"):
        raise TypeError(f"n must be an int, got {type(n).__name__}")
    n = int(n)
    if n < 0:
        raise ValueError(f"n must be >= 1 (or 0/None for no cap), got {n}")
    _thread_limit = n
    _apply_thread_limit()


def config():
    """The facts `show_config` prints, as a dict."""
    try:
        from . import _build_config as b
        build = {"openmp": b.OPENMP, "compiler": b.COMPILER_VERSION, "cflags": b.CFLAGS,
                 "level_flags": b.LEVEL_FLAGS}
    except ImportError:  # pragma: no cover - only for a tree built by hand
        build = {"openmp": bool(_runtime.openmp_version()), "compiler": "unknown",
                 "cflags": [], "level_flags": {}}
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
        "thread_cap_reason": _default_cap_reason if _default_cap_applies() else None,
        "compiler": build["compiler"],
        "cflags": build["cflags"],
        "level_flags": build["level_flags"],
    }


def show_config(file=None):
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
        f"  threads:       {c['num_threads']} (OMP_NUM_THREADS={c['omp_num_threads_env']})"
        + (f"; default cap: {c['thread_cap_reason']}" if c["thread_cap_reason"] else ""),
        f"  compiler:      {c['compiler']}",
        f"  flags:         {' '.join(c['cflags'])}",
        f"  level flags:   {' '.join(c['level_flags'].get(c['simd_level'], [])) or '(none)'}",
    ]
    print("\n".join(lines), file=file or sys.stdout)
