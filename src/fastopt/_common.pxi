# Shared by every kernel module.  It is included (not cimported) so that each
# SIMD build of a module is self-contained.  Two things live here:
#   * the threads: one place decides how many threads a kernel uses
#     (`threads_for`), and one helper runs a job on fastopt's thread pool
#     (`run_chunks`);
#   * the argument checks: every kernel's `def` wrapper validates with these
#     before it enters `nogil` code, so kernels can assume clean input.
cimport numpy as cnp
from cpython.pycapsule cimport PyCapsule_GetPointer
from libc.math cimport isfinite, sqrt, sqrtf

cnp.import_array()

cdef extern from "_omp.h" nogil:
    int fastopt_omp_threads()

cdef extern from "_pool_api.h" nogil:
    ctypedef void (*fastopt_chunk_fn)(void *ctx, Py_ssize_t chunk) noexcept nogil
    ctypedef struct fastopt_pool_api:
        void (*run)(fastopt_chunk_fn fn, void *ctx, Py_ssize_t nchunks, int nt, int flags) noexcept nogil
    const char *FASTOPT_POOL_CAPSULE
    enum: FASTOPT_POOL_REVERSE


# ---------------------------------------------------------------- threads ---

cdef int _thread_limit = 0        # 0: no limit beyond OpenMP's own


def _set_thread_limit(int n):
    """Cap the team size of this module's kernels (0 removes the cap)."""
    global _thread_limit
    _thread_limit = n if n > 0 else 0


cdef inline int max_threads() noexcept nogil:
    """OpenMP's team size for the calling thread (OMP_NUM_THREADS,
    threadpoolctl, OMP_THREAD_LIMIT), capped by set_num_threads."""
    cdef int nt = fastopt_omp_threads()
    if 0 < _thread_limit < nt:
        nt = _thread_limit
    return nt


cdef inline int threads_for(Py_ssize_t work, Py_ssize_t grain) noexcept nogil:
    """Team size for `work` units of which each thread should get >= `grain`:
    small jobs run on the calling thread and never reach the pool."""
    cdef int nt = max_threads()
    cdef Py_ssize_t useful = work // grain
    if useful < nt:
        nt = <int>useful if useful > 1 else 1
    return nt


# The process's one thread pool lives in fastopt._runtime (see _pool.h).
from fastopt import _runtime
cdef const fastopt_pool_api *_pool = <const fastopt_pool_api *>PyCapsule_GetPointer(
    _runtime._pool_api, FASTOPT_POOL_CAPSULE)


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


# ----------------------------------------------------------------- checks ---

cdef inline cnp.ndarray float_array(object a, str name):
    """`a` must be a float32 or float64 ndarray."""
    if not cnp.PyArray_Check(a):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(a).__name__}")
    cdef cnp.ndarray arr = <cnp.ndarray>a
    cdef int t = cnp.PyArray_TYPE(arr)
    if t != cnp.NPY_FLOAT32 and t != cnp.NPY_FLOAT64:
        raise TypeError(f"{name} must have dtype float32 or float64, got {arr.dtype}")
    return arr


cdef inline bint same_shape(cnp.ndarray a, cnp.ndarray b) noexcept:
    cdef int nd = cnp.PyArray_NDIM(a)
    if nd != cnp.PyArray_NDIM(b):
        return False
    cdef cnp.npy_intp *da = cnp.PyArray_DIMS(a)
    cdef cnp.npy_intp *db = cnp.PyArray_DIMS(b)
    cdef int i
    for i in range(nd):
        if da[i] != db[i]:
            return False
    return True


cdef inline cnp.ndarray like(object a, str name, cnp.ndarray ref, str ref_name):
    """`a` is a float ndarray with the dtype and shape of `ref`."""
    cdef cnp.ndarray arr = float_array(a, name)
    if cnp.PyArray_TYPE(arr) != cnp.PyArray_TYPE(ref):
        raise TypeError(f"{name} has dtype {arr.dtype} but {ref_name} has dtype {ref.dtype}")
    if not same_shape(arr, ref):
        raise ValueError(f"{name} has shape {(<object>arr).shape} but {ref_name} has shape {(<object>ref).shape}")
    return arr


cdef inline cnp.ndarray writable(cnp.ndarray arr, str name):
    """`arr` can be updated in place: C-contiguous, aligned, writeable.
    (Updating a hidden copy would silently lose the update.)"""
    if not cnp.PyArray_IS_C_CONTIGUOUS(arr):
        raise ValueError(f"{name} must be C-contiguous to be updated in place")
    if not cnp.PyArray_ISWRITEABLE(arr):
        raise ValueError(f"{name} is read-only and cannot be updated in place")
    if not cnp.PyArray_ISALIGNED(arr):
        raise ValueError(f"{name} must be aligned to be updated in place")
    return arr


cdef inline cnp.ndarray readable(cnp.ndarray arr):
    """A C-contiguous, aligned view of an input (a copy only when needed)."""
    if cnp.PyArray_IS_C_CONTIGUOUS(arr) and cnp.PyArray_ISALIGNED(arr):
        return arr
    return cnp.PyArray_NewCopy(arr, cnp.NPY_CORDER)


cdef inline int check_disjoint(list arrays, tuple names) except -1:
    """No two of `arrays` (None entries skipped) share a byte of memory."""
    cdef Py_ssize_t i, j, n = len(arrays)
    cdef char *lo_i
    cdef char *hi_i
    cdef char *lo_j
    cdef char *hi_j
    cdef cnp.ndarray a, b
    for i in range(n):
        if arrays[i] is None or cnp.PyArray_NBYTES(<cnp.ndarray>arrays[i]) == 0:
            continue
        a = <cnp.ndarray>arrays[i]
        lo_i = <char *>cnp.PyArray_DATA(a)
        hi_i = lo_i + cnp.PyArray_NBYTES(a)
        for j in range(i + 1, n):
            if arrays[j] is None or cnp.PyArray_NBYTES(<cnp.ndarray>arrays[j]) == 0:
                continue
            b = <cnp.ndarray>arrays[j]
            lo_j = <char *>cnp.PyArray_DATA(b)
            hi_j = lo_j + cnp.PyArray_NBYTES(b)
            if lo_i < hi_j and lo_j < hi_i:
                raise ValueError(f"{names[i]} and {names[j]} overlap in memory")
    return 0


cdef inline double real(object x, str name) except? -1.0:
    """A finite Python/NumPy real number."""
    cdef double v
    if type(x) is float:
        v = <double>x
    elif isinstance(x, (str, bytes, bytearray)):
        # float() would parse these: lr="1e-3" is a mistake, not a number
        raise TypeError(f"{name} must be a real number, got {type(x).__name__}")
    else:
        try:
            v = float(x)
        except (TypeError, ValueError):
            raise TypeError(f"{name} must be a real number, got {type(x).__name__}") from None
    if not isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    return v


cdef inline double at_least(object x, str name, double lo) except? -1.0:
    cdef double v = real(x, name)
    if v < lo:
        raise ValueError(f"{name} must be >= {lo:g}, got {v!r}")
    return v


cdef inline double in_unit(object x, str name) except? -1.0:
    """A number in [0, 1)."""
    cdef double v = real(x, name)
    if not (0.0 <= v < 1.0):
        raise ValueError(f"{name} must be in [0, 1), got {v!r}")
    return v


# ------------------------------------------------------------------- math ---

ctypedef fused floating:
    float
    double


cdef inline floating fsqrt(floating x) noexcept nogil:
    """sqrt in the array's own precision (libc's sqrt would widen floats)."""
    if floating is float:
        return sqrtf(x)
    else:
        return sqrt(x)
