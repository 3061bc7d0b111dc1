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
# Rules, the same for every kernel:
# * Arrays are float32/float64 (never silently cast); integer indices as
#   documented per function.
# * Arrays written in place must be C-contiguous, aligned, writeable and in
#   native byte order (a TypeError for another byte order: the kernel would
#   write native values into memory that is read as swapped).
# * Arrays only read may be non-contiguous, unaligned or in the other byte
#   order: `readable` converts them into a private native C-contiguous copy.
# * No array that is written shares memory with any other array argument, as
#   passed (`check_disjoint`, on the true extents from data pointer, shape and
#   strides), whether or not that argument would be copied: whether a call
#   works does not depend on the layout of its inputs.
# * Integer indices are copied before they are checked, and only the copy is
#   used: another thread cannot change an index between check and use.

cdef inline cnp.ndarray float_array(object a, str name):
    """`a` must be a float32 or float64 ndarray (of either byte order)."""
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


cdef inline int native(cnp.ndarray arr, str name) except -1:
    """`arr` is in the machine's byte order (required of arrays written in place)."""
    if not cnp.PyArray_ISNOTSWAPPED(arr):
        raise TypeError(f"{name} has dtype {arr.dtype.str!r}, not in the machine's byte order: "
                        "arrays updated in place must be native "
                        f"(convert with {name}.astype({name}.dtype.newbyteorder('=')))")
    return 0


cdef inline cnp.ndarray writable(cnp.ndarray arr, str name):
    """`arr` can be updated in place: native byte order, C-contiguous, aligned,
    writeable.  (Updating a hidden copy would silently lose the update.)"""
    native(arr, name)
    if not cnp.PyArray_IS_C_CONTIGUOUS(arr):
        raise ValueError(f"{name} must be C-contiguous to be updated in place")
    if not cnp.PyArray_ISWRITEABLE(arr):
        raise ValueError(f"{name} is read-only and cannot be updated in place")
    if not cnp.PyArray_ISALIGNED(arr):
        raise ValueError(f"{name} must be aligned to be updated in place")
    return arr


cdef inline bint direct(cnp.ndarray arr) noexcept:
    """A kernel can read `arr` as it is: C-contiguous, aligned, native."""
    return (cnp.PyArray_IS_C_CONTIGUOUS(arr) and cnp.PyArray_ISALIGNED(arr)
            and cnp.PyArray_ISNOTSWAPPED(arr))


cdef inline cnp.ndarray copy_as(cnp.ndarray arr, int typenum):
    """A new native C-contiguous array of type `typenum` holding `arr`'s
    values (cast as NumPy casts; the caller checks that the cast is exact)."""
    cdef cnp.ndarray out = cnp.PyArray_EMPTY(cnp.PyArray_NDIM(arr), cnp.PyArray_DIMS(arr),
                                             typenum, 0)
    cnp.PyArray_CopyInto(out, arr)
    return out


cdef inline cnp.ndarray readable(cnp.ndarray arr):
    """An input that is only read, as the kernels need it: the array itself,
    or a native C-contiguous aligned copy (non-contiguous, unaligned or
    byte-swapped input)."""
    if direct(arr):
        return arr
    return copy_as(arr, cnp.PyArray_TYPE(arr))


cdef inline void extent(cnp.ndarray a, char **lo, char **hi) noexcept:
    """The bytes [lo, hi) that `a` can touch, from its data pointer, shape and
    strides (negative and zero strides included); lo == hi when empty."""
    cdef int k, nd = cnp.PyArray_NDIM(a)
    cdef cnp.npy_intp *dims = cnp.PyArray_DIMS(a)
    cdef cnp.npy_intp *strides = cnp.PyArray_STRIDES(a)
    cdef char *base = <char *>cnp.PyArray_DATA(a)
    cdef Py_ssize_t low = 0, high = cnp.PyArray_ITEMSIZE(a), span
    for k in range(nd):
        if dims[k] == 0:
            lo[0] = hi[0] = base
            return
    for k in range(nd):
        span = strides[k] * (dims[k] - 1)
        if span < 0:
            low += span
        else:
            high += span
    lo[0] = base + low
    hi[0] = base + high


cdef inline int check_disjoint(list arrays, tuple names, Py_ssize_t nread=0) except -1:
    """No two of `arrays` (None entries skipped) share a byte of memory
    (their extents are disjoint), except pairs among the first `nread`,
    which are only read."""
    cdef Py_ssize_t i, j, n = len(arrays)
    cdef char *lo_i
    cdef char *hi_i
    cdef char *lo_j
    cdef char *hi_j
    for i in range(n):
        if arrays[i] is None:
            continue
        extent(<cnp.ndarray>arrays[i], &lo_i, &hi_i)
        if lo_i == hi_i:
            continue
        for j in range(i + 1, n):
            if arrays[j] is None or j < nread:
                continue
            extent(<cnp.ndarray>arrays[j], &lo_j, &hi_j)
            if lo_j < hi_j and lo_i < hi_j and lo_j < hi_i:
                raise ValueError(f"{names[i]} and {names[j]} overlap in memory")
    return 0


cdef inline str kind_of(object x):
    """How an error message names the type of `x` (arrays with their shape)."""
    if cnp.PyArray_Check(x):
        return f"an array of shape {(<object>x).shape} and dtype {(<object>x).dtype}"
    return type(x).__name__


cdef inline object integer(object x, str name):
    """`x` as a Python int: an int, NumPy integer or 0-d integer array (not a
    bool, a float or an array of several values)."""
    if type(x) is int:
        return x
    if isinstance(x, (bool, float)) or not hasattr(type(x), "__index__"):
        raise TypeError(f"{name} must be an integer, got {kind_of(x)}")
    try:
        return x.__index__()
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {kind_of(x)}") from None


cdef inline double real(object x, str name) except? -1.0:
    """A finite Python/NumPy real number."""
    cdef double v
    if type(x) is float:
        v = <double>x
    elif isinstance(x, (str, bytes, bytearray)) or (
            cnp.PyArray_Check(x) and cnp.PyArray_NDIM(<cnp.ndarray>x) != 0):
        # float() would parse these: lr="1e-3" is a mistake, not a number,
        # and so is an array of one value
        raise TypeError(f"{name} must be a real number, got {kind_of(x)}")
    else:
        try:
            v = float(x)
        except OverflowError:
            raise ValueError(f"{name} must be finite, got a number too large for a float") from None
        except (TypeError, ValueError):
            raise TypeError(f"{name} must be a real number, got {kind_of(x)}") from None
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


# ------------------------------------------------- 16-bit float dtypes ---
# float16 is NumPy's own dtype; bfloat16 is a user dtype (ml_dtypes registers
# it, with a type number only known at run time), recognised by its name and
# size the first time it is seen.

cdef enum DType:
    DT_OTHER = -1
    DT_F32 = 0
    DT_F64 = 1
    DT_F16 = 2
    DT_BF16 = 3

cdef int _bf16_typenum = -1


cdef inline int dtype_code(cnp.ndarray arr):
    """DT_F32, DT_F64, DT_F16, DT_BF16 or DT_OTHER."""
    global _bf16_typenum
    cdef int t = cnp.PyArray_TYPE(arr)
    if t == cnp.NPY_FLOAT32:
        return DT_F32
    if t == cnp.NPY_FLOAT64:
        return DT_F64
    if t == cnp.NPY_FLOAT16:
        return DT_F16
    if t == _bf16_typenum:
        return DT_BF16
    if _bf16_typenum < 0 and cnp.PyTypeNum_ISUSERDEF(t):
        dt = (<object>arr).dtype
        if dt.name == "bfloat16" and dt.itemsize == 2:
            _bf16_typenum = t
            return DT_BF16
    return DT_OTHER


cdef inline cnp.ndarray any_float_array(object a, str name):
    """`a` must be a float32, float64, float16 or bfloat16 ndarray."""
    if not cnp.PyArray_Check(a):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(a).__name__}")
    cdef cnp.ndarray arr = <cnp.ndarray>a
    if dtype_code(arr) == DT_OTHER:
        raise TypeError(f"{name} must have dtype float32, float64, float16 or bfloat16, "
                        f"got {arr.dtype}")
    return arr


cdef inline cnp.ndarray like_any(object a, str name, cnp.ndarray ref, str ref_name):
    """`a` has the dtype and shape of `ref` (any of the four float dtypes)."""
    cdef cnp.ndarray arr = any_float_array(a, name)
    if dtype_code(arr) != dtype_code(ref):
        raise TypeError(f"{name} has dtype {arr.dtype} but {ref_name} has dtype {ref.dtype}")
    if not same_shape(arr, ref):
        raise ValueError(f"{name} has shape {(<object>arr).shape} but {ref_name} has shape {(<object>ref).shape}")
    return arr
