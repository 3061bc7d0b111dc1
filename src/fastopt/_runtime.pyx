"""CPU feature detection, OpenMP runtime facts and the thread pool (built once, baseline flags)."""
from cpython.pycapsule cimport PyCapsule_New

cdef extern from "_cpu.h" nogil:
    int FASTOPT_OPENMP
    int fastopt_omp_threads()
    int fastopt_has_avx2()
    int fastopt_has_avx512()
    const char *fastopt_openmp_library()

cdef extern from "_pool.h" nogil:
    ctypedef void (*fastopt_chunk_fn)(void *ctx, Py_ssize_t chunk) noexcept nogil
    ctypedef struct fastopt_pool_api:
        void (*run)(fastopt_chunk_fn fn, void *ctx, Py_ssize_t nchunks, int nt, int flags) noexcept nogil
        int (*max_threads)() noexcept nogil
    const char *FASTOPT_POOL_CAPSULE
    const fastopt_pool_api *fastopt_pool_init()
    const char *fastopt_pool_backend()
    void fastopt_pool_set_spin(long long ns)
    void fastopt_pool_set_thread_limit(int n)
    void fastopt_pool_hold_workers(int hold)
    int fastopt_pool_participant()
    void fastopt_pool_stats(long long *out)


def cpu_levels():
    """SIMD levels this CPU and OS can run, best first (always ends in 'baseline')."""
    levels = []
    if fastopt_has_avx512():
        levels.append("avx512")
    if fastopt_has_avx2():
        levels.append("avx2")
    levels.append("baseline")
    return levels


def openmp_version():
    """The _OPENMP date (e.g. 201511) the extensions were compiled with; 0 without OpenMP."""
    return FASTOPT_OPENMP


def openmp_library():
    """Path of the OpenMP runtime library in use ('' without OpenMP)."""
    return fastopt_openmp_library().decode("utf-8", "replace")


def max_threads():
    """OpenMP's default team size for the calling thread (honours OMP_NUM_THREADS,
    threadpoolctl and OMP_THREAD_LIMIT)."""
    return fastopt_omp_threads()


# ------------------------------------------------------------ thread pool ---
#
# One pool per process (_pool.h); the kernel modules get its entry point from
# this capsule.

cdef const fastopt_pool_api *_api = fastopt_pool_init()
if _api == NULL:
    raise ImportError("fastopt: cannot register the thread pool's fork handler")
_pool_api = PyCapsule_New(<void *>_api, FASTOPT_POOL_CAPSULE, NULL)

def _set_thread_limit(int n):
    """Cap the team size of every kernel (0 removes the cap).  `fastopt._config`
    keeps the Python side of the cap (set_num_threads, the MPI default)."""
    fastopt_pool_set_thread_limit(n)


def _set_spin_ns(long long ns):
    """How long idle workers poll for a job before they sleep (< 0: forever).
    `fastopt._config` sets it from OMP_WAIT_POLICY/GOMP_SPINCOUNT at import."""
    fastopt_pool_set_spin(ns)


def pool_backend():
    """'pthreads', 'openmp' (a parallel region claims the chunks) or 'serial'."""
    return fastopt_pool_backend().decode()


def pool_stats():
    """What the pool did in this process: jobs run by a team, their chunks,
    how many of those the calling threads ran, workers started (and alive),
    jobs run alone because another thread was using the pool, whether a job
    is running now, and jobs whose caller slept waiting for a chunk that a
    worker had claimed (a worker preempted mid-chunk)."""
    cdef long long s[8]
    fastopt_pool_stats(s)
    return {"jobs": s[0], "chunks": s[1], "caller_chunks": s[2], "workers_started": s[3],
            "workers": s[4], "alone": s[5], "busy": bool(s[6]), "caller_sleeps": s[7]}


def _hold_workers(bint hold):
    """Test hook: workers see jobs but claim no chunk (the caller runs them all)."""
    fastopt_pool_hold_workers(hold)


# ------------------------------------------------------------- test probe ---

cdef extern from *:
    """
    #if defined(_MSC_VER) && !defined(__clang__)
    #include <intrin.h>
    #include <windows.h>
    static long fastopt_probe_next(volatile long *p) { return _InterlockedIncrement(p) - 1; }
    static long fastopt_probe_get(volatile long *p) { return _InterlockedOr(p, 0); }
    static void fastopt_probe_set(volatile long *p, long v) { _InterlockedExchange(p, v); }
    static void fastopt_sleep_ns(long long ns) { Sleep((DWORD)(ns / 1000000)); }
    #else
    #include <time.h>
    static long fastopt_probe_next(volatile long *p) { return __atomic_fetch_add(p, 1, __ATOMIC_SEQ_CST); }
    static long fastopt_probe_get(volatile long *p) { return __atomic_load_n(p, __ATOMIC_SEQ_CST); }
    static void fastopt_probe_set(volatile long *p, long v) { __atomic_store_n(p, v, __ATOMIC_SEQ_CST); }
    static void fastopt_sleep_ns(long long ns) {
        struct timespec t = {(time_t)(ns / 1000000000LL), (long)(ns % 1000000000LL)};
        nanosleep(&t, NULL);
    }
    #endif
    static volatile long fastopt_probe_gate = 1;
    """
    long fastopt_probe_next(long *p) nogil
    long fastopt_probe_get(long *p) nogil
    void fastopt_probe_set(long *p, long v) nogil
    void fastopt_sleep_ns(long long ns) nogil
    long fastopt_probe_gate


ctypedef struct Probe:
    int *who             # participant that ran each chunk
    long *order          # when (0, 1, ...)
    long next
    long long sleep_ns   # the caller sleeps this long in each of its chunks
    bint block           # the caller's chunks wait for _open_probe()


cdef void probe_chunk(void *ctx, Py_ssize_t c) noexcept nogil:
    cdef Probe *p = <Probe *>ctx
    p.order[c] = fastopt_probe_next(&p.next)
    p.who[c] = fastopt_pool_participant()
    if p.who[c] == 0:
        while p.block and not fastopt_probe_get(&fastopt_probe_gate):
            fastopt_sleep_ns(1000000)
        if p.sleep_ns > 0:
            fastopt_sleep_ns(p.sleep_ns)


def _probe(Py_ssize_t nchunks, int nt, double caller_sleep=0.0, bint reverse=False,
           bint block=False):
    """Test hook: run an empty job of `nchunks` chunks on `nt` threads.

    Returns, per chunk, the participant that ran it (0: the calling thread)
    and when (0, 1, ... in the order the chunks started).  The calling
    thread sleeps `caller_sleep` seconds in each of its chunks; with `block`
    its chunks also wait until `_open_probe()` is called."""
    import numpy as np
    who = np.full(max(nchunks, 1), -1, dtype=np.intc)
    order = np.full(max(nchunks, 1), -1, dtype=np.dtype("l"))   # C long
    cdef int[::1] w = who
    cdef long[::1] o = order
    cdef Probe p
    p.who = &w[0]
    p.order = &o[0]
    p.next = 0
    p.sleep_ns = <long long>(caller_sleep * 1e9)
    p.block = block
    if block:
        fastopt_probe_set(&fastopt_probe_gate, 0)
    with nogil:
        _api.run(probe_chunk, &p, nchunks, nt, 1 if reverse else 0)
    return who[:nchunks], order[:nchunks]


def _open_probe():
    """Lets the chunks of a blocked `_probe` finish."""
    fastopt_probe_set(&fastopt_probe_gate, 1)
