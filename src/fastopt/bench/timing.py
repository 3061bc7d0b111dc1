"""Timing and checking: `measure`, `measure_pair`, the float64 `reference`
each result is compared with (`compare`), one case's runs (`run_case`), the
memory-bandwidth probe, and the runs under contention (`run_contention`).
"""
import contextlib
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

import numpy as np

import fastopt


def measure(step, budget, min_samples, max_samples=200):
    """(median, least) seconds per call of `step()` over the samples.

    Calls are grouped into samples of ~budget/20 s (so short calls are not
    dominated by the timer), and samples are taken until `budget` seconds
    have passed (at least `min_samples`, or 3 of very slow calls).  The
    calibration calls warm up.
    """
    n = 1
    target = budget / 20
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        dt = time.perf_counter() - t0
        if dt >= target or n >= 1 << 22:
            break
        n = min(n * 10, max(n + 1, int(n * 1.2 * target / max(dt, 1e-9))))
    samples, total = [], 0.0
    # at least min_samples (but 3 will do for calls slower than budget/3)
    while (len(samples) < 3 or len(samples) < min_samples and total < 3 * budget
           or total < budget and len(samples) < max_samples):
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        dt = time.perf_counter() - t0
        samples.append(dt / n)
        total += dt
    return statistics.median(samples), min(samples)


def measure_pair(steps, budget, min_samples):
    """{name: median seconds per call} of two `steps`, their samples taken
    alternately so that a busy machine slows both alike (`measure`'s rules)."""
    n = {}
    for k, st in steps.items():
        n[k] = 1
        while True:
            t0 = time.perf_counter()
            for _ in range(n[k]):
                st()
            if time.perf_counter() - t0 >= budget / 40 or n[k] >= 1 << 20:
                break
            n[k] *= 2
    samples = {k: [] for k in steps}
    start = time.perf_counter()
    while (len(samples[next(iter(steps))]) < min_samples
           or time.perf_counter() - start < 2 * budget) and len(samples[next(iter(steps))]) < 200:
        for k, st in steps.items():
            t0 = time.perf_counter()
            for _ in range(n[k]):
                st()
            samples[k].append((time.perf_counter() - t0) / n[k])
    return {k: statistics.median(v) for k, v in samples.items()}


def fresh(obj, dtype=None):
    """A deep copy of the arrays in `obj` (nested dicts/lists), for one
    implementation to update; read-only inputs are shared, not copied.
    Floating arrays are converted to `dtype` if given."""
    if isinstance(obj, np.ndarray):
        if dtype is not None and obj.dtype.kind == "f":
            return obj.astype(dtype)
        return obj if not obj.flags.writeable else obj.copy()
    if isinstance(obj, dict):
        return {k: fresh(v, dtype) for k, v in obj.items()}
    if isinstance(obj, list):
        return [fresh(v, dtype) for v in obj]
    return obj


def tolerance(dtype):
    """(rtol, atol relative to the largest reference magnitude) for `dtype` results."""
    return (1e-4, 1e-5) if np.dtype(dtype) == np.float32 else (1e-10, 1e-12)


class Reference:
    """Float64 reference results and the error allowed for each value:
    rtol*|ref| + atol*max|ref| with the `tolerance` of the results' dtype.
    (The allowed errors are computed when comparing, not kept: at 1e7
    elements they would hold another float64 copy of every result.)"""

    def __init__(self, arrays, dtype):
        self.rtol, self.atol = tolerance(dtype)
        self.arrays = [np.asarray(a, dtype=np.float64) for a in arrays]
        self.scale = [float(np.max(np.abs(r))) if r.size else 0.0 for r in self.arrays]

    def allowed(self, i):
        allowed = np.abs(self.arrays[i])
        allowed *= self.rtol
        allowed += self.atol * self.scale[i]
        return allowed


def compare(got, ref, names):
    """None if every result matches the `Reference` `ref`, else what differs."""
    if len(got) != len(ref.arrays):
        return f"returned {len(got)} results, expected {len(ref.arrays)}"
    for k, (name, a, r) in enumerate(zip(names, got, ref.arrays)):
        a = np.asarray(a)
        if a.shape != r.shape:
            return f"{name} has shape {a.shape}, expected {r.shape}"
        err = np.subtract(a, r, dtype=np.float64)
        err = np.abs(err, out=err) if err.ndim else abs(err)
        bad = ~(err <= ref.allowed(k))  # NaN is bad
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            where = f"{name}[{', '.join(map(str, np.unravel_index(i, r.shape)))}]" \
                if r.ndim else name
            return (f"{where} = {a.flat[i]:.7g}, NumPy reference {r.flat[i]:.7g} "
                    f"({int(bad.sum())} of {bad.size} values beyond rtol={ref.rtol:g})")
    return None


@contextlib.contextmanager
def fastopt_threads(n):
    """fastopt's kernels use at most `n` threads inside the block."""
    fastopt.set_num_threads(n)
    try:
        yield
    finally:
        fastopt.set_num_threads(0)


@dataclass
class Result:
    time: Optional[float] = None       # median seconds per call
    best: Optional[float] = None       # the fastest sample's seconds per call
    error: Optional[str] = None        # why the result was not timed
    cpu: Optional[float] = None        # share of a CPU the timing thread got (1: never waited)


def _error_text(exc):
    msg = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {msg}"


def checked_step(impl, work, ref, threads):
    """`impl` built on fresh copies of the inputs, run `work.calls` times and
    its result compared with `ref`: (step, None), or (None, why not)."""
    try:
        with fastopt_threads(threads):
            step = impl(fresh(work.inputs))
            for _ in range(work.calls):
                out = step()
            error = compare(out, ref, work.names)
    except Exception as exc:        # a broken kernel must not stop the report
        return None, _error_text(exc)
    return (None, error) if error else (step, None)


def run_impl(impl, work, ref, threads, budget, min_samples):
    """Build, check and time one implementation on fresh copies of the inputs."""
    step, error = checked_step(impl, work, ref, threads)
    if error:
        return Result(error=error)
    try:
        with fastopt_threads(threads):
            wall, cpu = time.perf_counter(), time.thread_time()
            median, best = measure(step, budget, min_samples)
            share = (time.thread_time() - cpu) / max(time.perf_counter() - wall, 1e-9)
            return Result(time=median, best=best, cpu=min(share, 1.0))
    except Exception as exc:
        return Result(error=_error_text(exc))


def reference(work, dtype):
    """The `Reference` for `dtype` results: the straightforward NumPy code
    run in float64 on the same inputs, after `work.calls` steps."""
    step = work.numpy(fresh(work.inputs, np.float64))
    for _ in range(work.calls):
        out = step()
    return Reference(out, dtype)


def run_case(case, opts, peers):
    """Every implementation of `case`: {column: Result}, extras, peers."""
    work = case.make(opts.dtype, peers)
    ref = reference(work, opts.dtype)
    run = lambda impl, threads: run_impl(impl, work, ref, threads,  # noqa: E731
                                         opts.budget, opts.min_samples)
    main = {"numpy": run(work.numpy, 1), "inplace": run(work.inplace, 1),
            "fastopt": run(work.fastopt, opts.threads)}
    if opts.threads > 1:
        main["fastopt_1t"] = run(work.fastopt, 1)
    extras = {name: run(impl, opts.threads) for name, impl in work.extras.items()}
    others = {name: run(impl, opts.threads) for name, impl in work.peers.items()}
    return main, extras, others


def probe_bandwidth(threads, mib, budget):
    """Memory bandwidth (bytes/s) of NumPy streams on `threads` Python threads.

    Two streams over float64 arrays of `mib` MiB, each thread on its own
    contiguous chunk: a copy (``np.copyto(dst, src)``, counted as 2 passes:
    read src, write dst) and an in-place add (``np.add(a, b, out=a)``, 3
    passes: read a and b, write a -- the access pattern of an in-place
    optimizer step).  Each is timed by its best sample, as STREAM reports
    bandwidth: the probe estimates what the machine can do.  Returns the
    better of the two, and both.
    """
    n = mib * 2**20 // 8
    src, dst = np.ones(n), np.zeros(n)
    bounds = np.linspace(0, n, threads + 1).astype(int)
    chunks = [(dst[lo:hi], src[lo:hi]) for lo, hi in zip(bounds[:-1], bounds[1:])]
    with ThreadPoolExecutor(threads) as pool:
        def copy():
            list(pool.map(lambda c: np.copyto(c[0], c[1]), chunks))

        def add():
            list(pool.map(lambda c: np.add(c[0], c[1], out=c[0]), chunks))
        copy_bw = 2 * dst.nbytes / measure(copy, budget, 5)[1]
        add_bw = 3 * dst.nbytes / measure(add, budget, 5)[1]
    return max(copy_bw, add_bw), {"copy": copy_bw, "add": add_bw}


# ------------------------------------------------------------- contention ---

# A process that keeps one core busy: a Python loop, like the data-loading
# workers or other training runs that share a machine.  It stops by itself at
# its deadline, or as soon as its parent is gone.
BUSY_PROGRAM = """
import os, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
deadline, parent = time.monotonic() + float(sys.argv[1]), os.getppid()
print("busy", flush=True)
while time.monotonic() < deadline and os.getppid() == parent:
    for _ in range(10000):
        pass
"""
BUSY_SECONDS = 120


def busy_processes():
    """One busy process per core this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextlib.contextmanager
def every_core_busy(n, seconds=BUSY_SECONDS):
    """Inside the block, `n` processes keep a core busy each; they are killed
    and reaped on leaving it (also on an exception or Ctrl-C)."""
    procs = []
    try:
        for _ in range(n):
            procs.append(subprocess.Popen([sys.executable, "-c", BUSY_PROGRAM, str(seconds)],
                                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE))
        for p in procs:
            p.stdout.readline()             # it is running
        yield
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()
            p.stdout.close()


def call_times(step, budget):
    """Seconds per call of `step()` for `budget` seconds, call by call (calls
    under 20 us in groups): on a busy machine, where this process gets its
    core in time slices, a sample then seldom spans a slice given to another
    process, and the median is the time of a call that ran."""
    n = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        if time.perf_counter() - t0 >= 20e-6 or n >= 1 << 16:
            break
        n *= 2
    times, end = [], time.perf_counter() + budget
    while time.perf_counter() < end or len(times) < 5:
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        times.append((time.perf_counter() - t0) / n)
    return times


CONTENTION_ROUNDS = 3


def run_contention(case, opts, peers):
    """fastopt (default threads and 1 thread) and the peers, checked, then
    timed in turns while every core is kept busy: {column: Result}."""
    work = case.make(opts.dtype, peers)
    ref = reference(work, opts.dtype)
    impls = {"fastopt": (work.fastopt, opts.threads), "fastopt_1t": (work.fastopt, 1)}
    impls.update({name: (impl, opts.threads) for name, impl in work.peers.items()})
    results, steps = {}, {}
    with every_core_busy(busy_processes()):
        for name, (impl, threads) in impls.items():
            step, error = checked_step(impl, work, ref, threads)
            if error:
                results[name] = Result(error=error)
            else:
                steps[name] = (step, threads, [])
        for _ in range(CONTENTION_ROUNDS):      # in turns: all see the same machine
            for step, threads, times in steps.values():
                with fastopt_threads(threads):
                    times += call_times(step, opts.budget)
    for name, (_, _, times) in steps.items():
        results[name] = Result(time=statistics.median(times), best=min(times))
    return {name: results[name] for name in impls}

