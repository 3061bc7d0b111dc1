# Shared by every kernel module.  It is included (not cimported) so that each
# SIMD build of a module is self-contained.  Two things live here:
#   * the thread-count helper: one place decides how many OpenMP threads a
#     kernel uses;
#   * the argument checks: every kernel's `def` wrapper validates with these
#     before it enters `nogil` code, so kernels can assume clean input.
cimport numpy as cnp
from cython.parallel cimport parallel, threadid
from libc.math cimport isfinite, sqrt, sqrtf

cnp.import_array()

cdef extern from "_omp.h" nogil:
    int omp_get_max_threads()
    int omp_get_num_threads()


# ---------------------------------------------------------------- threads ---

cdef int _thread_limit = 0        # 0: no limit beyond OpenMP's own


def _set_thread_limit(int n):
    """Cap the team size of this module's kernels (0 removes the cap)."""
    global _thread_limit
    _thread_limit = n if n > 0 else 0


cdef inline int max_threads() noexcept nogil:
    """OpenMP's team size for the calling thread, capped by set_num_threads."""
    cdef int nt = omp_get_max_threads()
    if 0 < _thread_limit < nt:
        nt = _thread_limit
    return nt if nt > 0 else 1


cdef inline int threads_for(Py_ssize_t work, Py_ssize_t grain) noexcept nogil:
    """Team size for `work` units of which each thread should get >= `grain`:
    small jobs run on the calling thread and never start a team."""
    cdef int nt = max_threads()
    cdef Py_ssize_t useful = work // grain
    if useful < nt:
        nt = <int>useful if useful > 1 else 1
    return nt


cdef inline Py_ssize_t chunk_start(Py_ssize_t n, int parts, int k, Py_ssize_t align) noexcept nogil:
    """Start of the k-th of `parts` contiguous chunks of range(n) (k = parts
    gives n); inner boundaries are multiples of `align` (whole cache lines
    per thread).  Thread t of a team works on
    [chunk_start(n, nt, t, a), chunk_start(n, nt, t + 1, a)).

    Assign the results to the loop's variables directly (``lo = chunk_start(...)``):
    Cython makes a variable private to each thread only when the parallel
    block assigns it, so bounds written through pointers would be shared.
    Inside a parallel region pass parts=omp_get_num_threads(), never the
    team size asked for: OpenMP may start fewer threads (OMP_THREAD_LIMIT,
    OMP_DYNAMIC, nesting) and the missing threads' chunks would be skipped."""
    cdef Py_ssize_t blocks = (n + align - 1) // align
    return min((blocks * k // parts) * align, n)


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
