# Shared by the fronts (the Python-facing modules _optim, _batchnorm,
# _softmax, _train; compiled once): the argument checks every `def` wrapper
# makes before it enters `nogil` code, so that the kernels can assume clean
# input, and the kernel core of the chosen SIMD level (`core`, see _core.pxd).
cimport numpy as cnp
from cpython.pycapsule cimport PyCapsule_GetPointer
from libc.math cimport isfinite

from fastopt._core cimport *

cnp.import_array()

# The kernels of the SIMD level fastopt._dispatch chose, as a table of C
# functions (FASTOPT_CORE_CAPSULE names its layout's version).
from fastopt import _dispatch
cdef const CoreAPI *core = <const CoreAPI *>PyCapsule_GetPointer(_dispatch.CORE.api,
                                                                 FASTOPT_CORE_CAPSULE)
if core.size != sizeof(CoreAPI):
    raise ImportError(f"fastopt: the kernel core {_dispatch.CORE.__name__} does not match "
                      "this build of fastopt (reinstall fastopt)")


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


# ------------------------------------------------- 16-bit float dtypes ---
# float16 is NumPy's own dtype; bfloat16 is a user dtype (ml_dtypes registers
# it, with a type number only known at run time), recognised by its name and
# size the first time it is seen.

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


cdef inline int store_of(int dtype_code) noexcept nogil:
    """The storage code of an array of a DT_* dtype (NATIVE for float32/64)."""
    if dtype_code == DT_F16:
        return F16
    if dtype_code == DT_BF16:
        return BF16
    return NATIVE
