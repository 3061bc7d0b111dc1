# Training-loop kernels: a parallel row gather (mini-batches) and a fused
# exponentially weighted average.
#
# Design
# ------
# * `take_rows` copies whole rows: a row of a C-contiguous array is one block
#   of bytes, so the gather is one memcpy per row whatever the dtype (row
#   sizes of 4 and 8 bytes, i.e. 1-D labels, get a constant-size copy the
#   compiler turns into a single load/store).  NumPy's fancy indexing does
#   the same work on one thread and allocates a new array per batch; here the
#   destination is the caller's (reused) buffer.  Every index is checked
#   before the copy starts, so a bad index writes nothing.
# * `ewa_update` is one pass, one read of each array and one write of `avg`.
#   The coefficients are computed in double and cast to the array's dtype.
# * Both kernels are elementwise (rows/elements are independent), so the
#   result does not depend on the thread count; small jobs stay on the
#   calling thread (`threads_for`), larger ones are cut into fixed chunks
#   that the thread pool spreads over its threads (`run_chunks`).
# * This module checks the arguments; the loops are in the kernel core
#   (_core_train.pxi, compiled per SIMD level), reached through `core.train`.
include "_common.pxi"

from libc.stdint cimport int64_t

import numpy as np

# ----------------------------------------------------------- functional API ---

cdef inline Py_ssize_t first_out_of_range(const int64_t *idx, Py_ssize_t n,
                                          int64_t nrows) noexcept nogil:
    """Position of the first index outside [0, nrows), or -1."""
    cdef Py_ssize_t i
    for i in range(n):
        if idx[i] < 0 or idx[i] >= nrows:
            return i
    return -1


def take_rows(X, idx, out=None):
    """Gather rows: ``out[i] = X[idx[i]]``, in parallel, into `out`.

    The same result as ``X[idx]`` (or ``np.take(X, idx, axis=0, out=out)``)
    for non-negative indices, but copied with one memcpy per row on several
    threads when the batch is large, and written into a buffer the caller
    can reuse from batch to batch.

    Parameters
    ----------
    X : ndarray, C-contiguous, at least 1-D
        Any dtype without Python objects (any byte order: rows are copied
        as bytes, and `out` has X's dtype); rows are along the first axis.
    idx : ndarray of int64, 1-D
        Row numbers in ``[0, len(X))``.  Negative indices are not accepted.
        Any layout and byte order: the indices are copied before they are
        checked, and only the copy is used.
    out : ndarray, optional
        C-contiguous, writeable, shape ``(len(idx),) + X.shape[1:]`` and the
        dtype of `X`; must not overlap `X` or `idx`.  Allocated if omitted.

    Returns
    -------
    out : ndarray

    Raises
    ------
    IndexError
        If an index is out of range; nothing is written.
    """
    if not cnp.PyArray_Check(X):
        raise TypeError(f"X must be a numpy.ndarray, got {type(X).__name__}")
    cdef cnp.ndarray x = <cnp.ndarray>X
    if cnp.PyArray_NDIM(x) < 1:
        raise ValueError("X must have at least one dimension (rows along axis 0)")
    if x.dtype.hasobject:
        raise TypeError(f"X has dtype {x.dtype}, which holds Python objects; use numpy.take")
    if not cnp.PyArray_IS_C_CONTIGUOUS(x):
        raise ValueError("X must be C-contiguous (numpy.ascontiguousarray(X) makes it so)")
    if not cnp.PyArray_Check(idx):
        raise TypeError(f"idx must be a numpy.ndarray, got {type(idx).__name__}")
    cdef cnp.ndarray ix = <cnp.ndarray>idx
    cdef int ityp = cnp.PyArray_TYPE(ix)
    if not (cnp.PyTypeNum_ISSIGNED(ityp) and cnp.PyArray_ITEMSIZE(ix) == 8):
        raise TypeError(f"idx must have dtype int64, got {ix.dtype}")
    if cnp.PyArray_NDIM(ix) != 1:
        raise ValueError(f"idx must be 1-D, got shape {(<object>ix).shape}")
    cdef tuple shape = (cnp.PyArray_DIM(ix, 0),) + (<object>x).shape[1:]
    cdef cnp.ndarray o
    if out is None:
        o = np.empty(shape, dtype=x.dtype)
    else:
        if not cnp.PyArray_Check(out):
            raise TypeError(f"out must be a numpy.ndarray, got {type(out).__name__}")
        o = <cnp.ndarray>out
        if o.dtype != x.dtype:
            raise TypeError(f"out has dtype {o.dtype} but X has dtype {x.dtype}")
        if (<object>o).shape != shape:
            raise ValueError(f"out has shape {(<object>o).shape} but must have shape {shape} "
                             "(len(idx),) + X.shape[1:]")
        if not cnp.PyArray_IS_C_CONTIGUOUS(o):
            raise ValueError("out must be C-contiguous")
        if not cnp.PyArray_ISWRITEABLE(o):
            raise ValueError("out is read-only")
        check_disjoint([x, ix, o], ("X", "idx", "out"), 2)
    # A private native copy of the indices (8 bytes per row: little next to
    # the rows): they are checked and used from it, so another thread that
    # rewrites `idx` meanwhile cannot make the gather read out of bounds.
    ix = copy_as(ix, cnp.NPY_INT64)
    cdef Py_ssize_t n = cnp.PyArray_DIM(ix, 0)
    cdef int64_t nrows = cnp.PyArray_DIM(x, 0)
    cdef const int64_t *ip = <const int64_t *>cnp.PyArray_DATA(ix)
    cdef Py_ssize_t bad
    with nogil:
        bad = first_out_of_range(ip, n, nrows)
    if bad >= 0:
        raise IndexError(f"idx[{bad}] = {ip[bad]} is out of range for X with {nrows} rows")
    cdef Py_ssize_t rowbytes = cnp.PyArray_ITEMSIZE(x)
    cdef int d
    for d in range(1, cnp.PyArray_NDIM(x)):
        rowbytes *= cnp.PyArray_DIM(x, d)
    if n == 0 or rowbytes == 0:
        return o
    cdef char *dst = <char *>cnp.PyArray_DATA(o)
    cdef const char *src = <const char *>cnp.PyArray_DATA(x)
    with nogil:
        core.train.gather_rows(dst, src, ip, n, rowbytes)
    return o


def ewa_update(avg, x, beta):
    """Exponentially weighted average, in place: ``avg = beta*avg + (1-beta)*x``.

    One fused pass, parallel for large arrays.  This is the course's
    ``v_t = beta*v_{t-1} + (1-beta)*theta_t`` (start `avg` at zero and read it
    through `fastopt.bias_corrected`), and an exponential moving average of
    weights (Polyak averaging).

    Parameters
    ----------
    avg : ndarray, float32 or float64
        The running average, updated in place: C-contiguous, aligned,
        writeable, native byte order.
    x : ndarray
        The new value: same shape and dtype as `avg` (read only; may be
        non-contiguous, unaligned or byte-swapped: then it is copied
        first); must not overlap `avg`.
    beta : float
        In [0, 1): the weight of the past (an average over ~1/(1-beta) values).

    Returns
    -------
    None
    """
    cdef cnp.ndarray a = writable(float_array(avg, "avg"), "avg")
    cdef cnp.ndarray xx = like(x, "x", a, "avg")
    cdef double b = in_unit(beta, "beta")
    check_disjoint([a, xx], ("avg", "x"))
    xx = readable(xx)
    cdef Py_ssize_t n = cnp.PyArray_SIZE(a)
    cdef void *ap = cnp.PyArray_DATA(a)
    cdef const void *xp = cnp.PyArray_DATA(xx)
    cdef bint is_double = cnp.PyArray_TYPE(a) == cnp.NPY_FLOAT64
    with nogil:
        if is_double:
            core.train.ewa_f64(<double *>ap, <const double *>xp, n, b)
        else:
            core.train.ewa_f32(<float *>ap, <const float *>xp, n, b)
