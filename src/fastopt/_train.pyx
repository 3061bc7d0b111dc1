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
include "_common.pxi"

from libc.stdint cimport int64_t
from libc.string cimport memcpy

import numpy as np

# Work per thread below which a kernel stays on the calling thread.  Measured
# (2 cores, float32): a 392 KiB gather takes ~5 us on one thread and gains
# nothing from a second one; from ~800 KiB two threads are 1.3-2x faster.
# EWA: 64k elements take ~2.3 us on one thread (a 2-thread team is no
# faster); 128k elements 7.5 us on one thread, 4.5 us on two.
DEF GRAIN_BYTES = 262144
DEF GRAIN = 65536
# Chunks a thread claims at a time: rows of about CHUNK_BYTES (gather), CHUNK
# elements (EWA, whole cache lines).
DEF CHUNK_BYTES = 65536
DEF CHUNK = 8192


# ----------------------------------------------------------------- kernels ---

cdef inline void copy_rows(char *dst, const char *src, const int64_t *idx,
                           Py_ssize_t lo, Py_ssize_t hi, Py_ssize_t rowbytes) noexcept nogil:
    # dst[i] = src[idx[i]] for rows i in [lo, hi)
    cdef Py_ssize_t i
    if rowbytes == 8:
        for i in range(lo, hi):
            memcpy(dst + i * 8, src + idx[i] * 8, 8)
    elif rowbytes == 4:
        for i in range(lo, hi):
            memcpy(dst + i * 4, src + idx[i] * 4, 4)
    else:
        for i in range(lo, hi):
            memcpy(dst + i * rowbytes, src + idx[i] * rowbytes, rowbytes)


ctypedef struct GatherTask:
    char *dst
    const char *src
    const int64_t *idx
    Py_ssize_t n, rowbytes
    Py_ssize_t rows             # per chunk


cdef void gather_chunk(void *ctx, Py_ssize_t k) noexcept nogil:
    cdef const GatherTask *t = <const GatherTask *>ctx
    copy_rows(t.dst, t.src, t.idx, k * t.rows, min((k + 1) * t.rows, t.n), t.rowbytes)


cdef void gather_rows(char *dst, const char *src, const int64_t *idx,
                      Py_ssize_t n, Py_ssize_t rowbytes) noexcept nogil:
    cdef int nt = threads_for(n * rowbytes, GRAIN_BYTES)
    cdef GatherTask t
    if nt == 1:
        copy_rows(dst, src, idx, 0, n, rowbytes)
        return
    t.dst = dst
    t.src = src
    t.idx = idx
    t.n = n
    t.rowbytes = rowbytes
    t.rows = max(1, CHUNK_BYTES // rowbytes)
    run_chunks(gather_chunk, &t, (n + t.rows - 1) // t.rows, nt)


cdef inline void ewa_range(floating *avg, const floating *x, Py_ssize_t lo, Py_ssize_t hi,
                           floating b, floating cb) noexcept nogil:
    # avg = beta*avg + (1-beta)*x
    cdef Py_ssize_t i
    for i in range(lo, hi):
        avg[i] = b * avg[i] + cb * x[i]


ctypedef struct EwaTask:
    bint is_double
    void *avg
    const void *x
    Py_ssize_t n
    double b, cb


cdef void ewa_chunk(void *ctx, Py_ssize_t k) noexcept nogil:
    cdef const EwaTask *t = <const EwaTask *>ctx
    cdef Py_ssize_t lo = k * CHUNK, hi = min(lo + CHUNK, t.n)
    if t.is_double:
        ewa_range(<double *>t.avg, <const double *>t.x, lo, hi, t.b, t.cb)
    else:
        ewa_range(<float *>t.avg, <const float *>t.x, lo, hi, <float>t.b, <float>t.cb)


cdef void ewa(floating *avg, const floating *x, Py_ssize_t n, double beta) noexcept nogil:
    cdef floating b = <floating>beta, cb = <floating>(1.0 - beta)
    cdef int nt = threads_for(n, GRAIN)
    cdef EwaTask t
    if nt == 1:
        ewa_range(avg, x, 0, n, b, cb)
        return
    t.is_double = floating is double
    t.avg = avg
    t.x = x
    t.n = n
    t.b = b
    t.cb = cb
    run_chunks(ewa_chunk, &t, (n + CHUNK - 1) // CHUNK, nt)


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
        gather_rows(dst, src, ip, n, rowbytes)
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
            ewa(<double *>ap, <const double *>xp, n, b)
        else:
            ewa(<float *>ap, <const float *>xp, n, b)
