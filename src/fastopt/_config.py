"""Thread control and build/runtime configuration."""
from __future__ import annotations

import operator
import os
import platform
import sys
from typing import Any, Mapping, SupportsIndex, TextIO

from . import _dispatch, _runtime
from ._version import __version__

_thread_limit = 0

# Idle pool workers poll for the next job this long after their last one,
# then sleep.  Measured on 2 cores: waking a sleeping worker costs tens of
# microseconds on a virtual machine, so workers that slept 100 us after a
# job made calls 1 ms apart 2-3x slower than on one thread, while polling
# for 2 ms covers the usual gaps between two kernel calls.  Polling calls
# sched_yield(), so it costs other processes little on a busy machine.
DEFAULT_SPIN_NS = 2_000_000
# GOMP_SPINCOUNT counts busy-wait polls; GNU OpenMP estimates 100,000 of them
# per millisecond (its default of 300,000 is "3 ms"): one counts 10 ns here.
NS_PER_SPIN = 10
_SUFFIXES = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def _spincount(text: str) -> int | None:
    """GOMP_SPINCOUNT as GNU OpenMP reads it: an integer with an optional
    k/M/G/T suffix, or INFINITE/INFINITY (-1); None if not understood."""
    s = text.strip().lower()
    if s in ("infinite", "infinity"):
        return -1
    mult = _SUFFIXES.get(s[-1:], 1)
    if mult != 1:
        s = s[:-1].rstrip()
    if not (s.isascii() and s.isdigit()):
        return None
    return int(s) * mult


def _fmt_ns(ns: int) -> str:
    for unit, scale in (("s", 10**9), ("ms", 10**6)):
        if ns >= scale:
            return f"{ns / scale:g} {unit}"
    return f"{ns / 1e3:g} us"


def wait_policy(environ: Mapping[str, str] | None = None) -> tuple[int, str]:
    """How idle pool workers wait, from the environment as GNU OpenMP reads it.

    ``GOMP_SPINCOUNT=n`` (when understood) polls for n * 10 ns and
    ``INFINITE`` forever; otherwise ``OMP_WAIT_POLICY=active`` polls forever,
    ``passive`` sleeps after each job, and unset polls for 2 ms.

    Returns
    -------
    spin_ns : int
        Polling time after the last job, -1 for ever.
    text : str
        The policy in words (`show_config`).
    """
    env = os.environ if environ is None else environ
    policy, count = env.get("OMP_WAIT_POLICY"), env.get("GOMP_SPINCOUNT")
    kind = policy.strip().lower() if policy is not None else None
    if policy is None:
        source = "OMP_WAIT_POLICY unset"
    elif kind in ("active", "passive"):
        source = f"OMP_WAIT_POLICY={policy.strip()}"
    else:
        source = f"OMP_WAIT_POLICY={policy!r} not understood, ignored"
    spins = _spincount(count) if count is not None else None
    if spins is not None:
        spin_ns = -1 if spins < 0 else spins * NS_PER_SPIN
        source = f"GOMP_SPINCOUNT={(count or '').strip()}"
    else:
        if count is not None:
            source += f"; GOMP_SPINCOUNT={count!r} not understood, ignored"
        spin_ns = {"active": -1, "passive": 0}.get(kind or "", DEFAULT_SPIN_NS)
    if spin_ns < 0:
        what = "workers yield-spin while idle"
    elif spin_ns == 0:
        what = "workers sleep after each job"
    else:
        what = f"workers yield-spin {_fmt_ns(spin_ns)} then sleep"
    return spin_ns, f"{what}; {source}"


_spin_ns, WAIT_POLICY = wait_policy()
_runtime._set_spin_ns(min(_spin_ns, 2**62))


# A default cap that fastopt sets itself, with the reason shown by
# show_config() (fastopt.distributed: MPI ranks sharing a node's cores).  It
# applies only while neither set_num_threads nor OMP_NUM_THREADS chose.
_default_cap = 0
_default_cap_reason: str | None = None


def _default_cap_applies() -> bool:
    return bool(_default_cap) and not _thread_limit and "OMP_NUM_THREADS" not in os.environ


def _limit() -> int:
    """The cap in force (0: none)."""
    return _default_cap if _default_cap_applies() else _thread_limit


def _set_default_cap(n: int, reason: str | None) -> None:
    """Cap the thread count at n by default (0 removes it), for `reason`."""
    global _default_cap, _default_cap_reason
    _default_cap, _default_cap_reason = int(n), reason if n else None
    _apply_thread_limit()


def _apply_thread_limit() -> None:
    _runtime._set_thread_limit(_limit())


def get_num_threads() -> int:
    """Number of threads fastopt's kernels use (at most) from this thread.

    This is OpenMP's team size (``OMP_NUM_THREADS``, or a limit set through
    threadpoolctl) capped by `set_num_threads`.  Small arrays run on one
    thread whatever this says.  The threads are fastopt's own pool: they
    work in forked child processes too.
    """
    n = _runtime.max_threads()
    limit = _limit()
    return min(n, limit) if limit else n


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
        "thread_pool": _runtime.pool_backend(),
        "wait_policy": WAIT_POLICY,
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "thread_cap_reason": _default_cap_reason if _default_cap_applies() else None,
        "compiler": build["compiler"],
        "cflags": build["cflags"],
        "level_flags": build["level_flags"],
        "sanitize": build["sanitize"],
    }


def _pool_text(c: dict[str, Any]) -> str:
    if c["thread_pool"] == "pthreads":
        return "fastopt pool: caller never waits for unstarted workers; " + str(c["wait_policy"])
    if c["thread_pool"] == "openmp":
        return "fastopt chunks on OpenMP parallel regions"
    return "serial build"


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
        f"  threads:       {c['num_threads']} ({_pool_text(c)}; "
        f"OMP_NUM_THREADS={c['omp_num_threads_env']})"
        + (f"; default cap: {c['thread_cap_reason']}" if c["thread_cap_reason"] else ""),
        f"  compiler:      {c['compiler']}",
        f"  flags:         {' '.join(c['cflags'])}",
        f"  level flags:   {' '.join(c['level_flags'].get(c['simd_level'], [])) or '(none)'}",
    ]
    if c["sanitize"]:
        lines.append(f"  sanitizers:    {', '.join(c['sanitize'])} (a test build, not for use)")
    print("\n".join(lines), file=file or sys.stdout)
