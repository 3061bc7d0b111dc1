# Shared by the kernels of every family in the core (_core.pyx): how many
# threads a kernel uses (`threads_for`, the one place that decides), the one
# helper that runs a job on fastopt's thread pool (`run_chunks`), and math in
# an array's own precision.  Nothing here touches a Python object.
from cpython.pycapsule cimport PyCapsule_GetPointer
from libc.math cimport fabs, fabsf, sqrt, sqrtf

cdef extern from "_pool_api.h" nogil:
    ctypedef void (*fastopt_chunk_fn)(void *ctx, Py_ssize_t chunk) noexcept nogil
    ctypedef struct fastopt_pool_api:
        void (*run)(fastopt_chunk_fn fn, void *ctx, Py_ssize_t nchunks, int nt, int flags) noexcept nogil
        int (*max_threads)() noexcept nogil
    const char *FASTOPT_POOL_CAPSULE
    enum: FASTOPT_POOL_REVERSE


# ---------------------------------------------------------------- threads ---

# The process's one thread pool, and the thread cap, live in fastopt._runtime
# (see _pool.h).
from fastopt import _runtime
cdef const fastopt_pool_api *_pool = <const fastopt_pool_api *>PyCapsule_GetPointer(
    _runtime._pool_api, FASTOPT_POOL_CAPSULE)


cdef inline int threads_for(Py_ssize_t work, Py_ssize_t grain) noexcept nogil:
    """Team size for `work` units of which each thread should get >= `grain`:
    small jobs run on the calling thread and never reach the pool.  At most
    OpenMP's team size for the calling thread (OMP_NUM_THREADS, threadpoolctl,
    OMP_THREAD_LIMIT), capped by set_num_threads."""
    cdef int nt = _pool.max_threads()
    cdef Py_ssize_t useful = work // grain
    if useful < nt:
        nt = <int>useful if useful > 1 else 1
    return nt


cdef inline void run_chunks(fastopt_chunk_fn fn, void *ctx, Py_ssize_t nchunks, int nt,
                            bint reverse=False) noexcept nogil:
    """fn(ctx, c) for every chunk c in [0, nchunks), on up to `nt` threads.

    The chunks are split into one contiguous range per thread; each thread
    runs its own range (from the end if `reverse`), then helps with the
    others.  The calling thread never waits for a thread that has not
    started, so a busy machine costs at most about the 1-thread time.  The
    chunks must be a partition fixed by the kernel, never by `nt`: then the
    results do not depend on the number of threads."""
    cdef Py_ssize_t c
    if nt > 1 and nchunks > 1:
        _pool.run(fn, ctx, nchunks, nt, FASTOPT_POOL_REVERSE if reverse else 0)
    elif reverse:
        for c in range(nchunks - 1, -1, -1):
            fn(ctx, c)
    else:
        for c in range(nchunks):
            fn(ctx, c)


# ------------------------------------------------------------------- math ---

cdef inline floating fsqrt(floating x) noexcept nogil:
    """sqrt in the array's own precision (libc's sqrt would widen floats)."""
    if floating is float:
        return sqrtf(x)
    else:
        return sqrt(x)


cdef inline floating ffabs(floating x) noexcept nogil:
    """|x| in the array's own precision."""
    if floating is float:
        return fabsf(x)
    else:
        return fabs(x)
