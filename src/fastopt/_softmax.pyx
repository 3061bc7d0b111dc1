# Log-softmax, softmax and cross-entropy (loss and gradient in one kernel).
#
# Design
# ------
# * Every row (the class axis) is reduced in the same fixed way: its max M,
#   then S = sum exp(x - M) accumulated in double, then log S once per row,
#   and outputs as (x - M) - log S, in that order, so logits of any magnitude
#   keep their precision.
# * exp is the cost: `_vmath.h` has a branch-free exp that gcc vectorizes when
#   it is inlined in a loop (libm's is an opaque call per element), and a
#   branch-free log (one per row, but short rows are many).  Being our own,
#   they also give the same bits on every platform and SIMD level.
# * Reductions (max, sums; in `_vmath.h`) use 16 independent accumulators
#   (i mod 16), combined in a fixed order: vectorized without reassociating,
#   and the result is the same at every SIMD level.
# * A row is processed in SM_CHUNK-element chunks; a chunk's partial sums are
#   combined in chunk order.  Usually one thread owns a row and does all its
#   passes while the row is in cache (max; exp, stored into the gradient
#   buffer, and sum; scale).  When there are few long rows, the (row, chunk)
#   pieces are spread over threads in three successive jobs instead, computing
#   exactly the same partial sums: results never depend on the thread count.
# * Rows with few classes (C < SM_SMALL_C) are handled in blocks of rows so that
#   exp and log run over a whole block (vectorized loops, not per-row tails).
# * softmax/log_softmax over a non-last axis view the array as
#   (outer, C, inner) and vectorize across `inner` (contiguous), no transpose.
# * cross_entropy follows torch.nn.functional.cross_entropy.  Per row it uses
#   a weighted target distribution q (sum Q):
#       class index y:  q_c = (1-eps) w_y [c == y] + (eps/C) w_c
#       probabilities:  q_c = w_c ((1-eps) t_c + eps/C)
#   loss_i = -sum_c q_c logp_c = Q log S - sum_c q_c (x_c - M)
#   dlogits_i = (softmax_i Q - q) * scale, scale = 1/D for 'mean', else 1.
# * The `def` functions validate everything (including every class index)
#   before `nogil`; nothing is written when a check fails.
# * This module checks the arguments; the loops are in the kernel core
#   (_core_softmax.pxi, compiled per SIMD level), reached through `core.softmax`.
include "_common.pxi"

from libc.stdint cimport int64_t, uint64_t, INT64_MAX
import numpy as np

# ------------------------------------------------------------ functional API ---

cdef inline int norm_axis(object axis, int nd) except -100:
    cdef object a = integer(axis, "axis")
    if not -nd <= a < nd:
        raise np.exceptions.AxisError(f"axis {a} is out of bounds for an array of dimension {nd}")
    return <int>(a + nd if a < 0 else a)


cdef cnp.ndarray _softmax_any(object x, object axis, object out, int mode):
    cdef cnp.ndarray xa = any_float_array(x, "x")
    cdef int nd = cnp.PyArray_NDIM(xa)
    if nd == 0:
        raise ValueError("x must have at least one dimension")
    cdef int ax = norm_axis(axis, nd)
    cdef int xk = store_of(dtype_code(xa))
    cdef cnp.ndarray o
    if out is None:          # native byte order, whatever x's
        o = cnp.PyArray_EMPTY(nd, cnp.PyArray_DIMS(xa), cnp.PyArray_TYPE(xa), 0)
    else:
        o = writable(like_any(out, "out", xa, "x"), "out")
        # out=x (in place) is allowed: the same memory, element for element
        if not (cnp.PyArray_DATA(o) == cnp.PyArray_DATA(xa) and direct(xa)):
            check_disjoint([xa, o], ("x", "out"))
    xa = readable(xa)
    cdef cnp.npy_intp *dims = cnp.PyArray_DIMS(xa)
    cdef Py_ssize_t outer = 1, inner = 1, c = dims[ax], k
    for k in range(ax):
        outer *= dims[k]
    for k in range(ax + 1, nd):
        inner *= dims[k]
    cdef SmJob j
    cdef bint is_double = cnp.PyArray_TYPE(xa) == cnp.NPY_FLOAT64
    if outer * c * inner == 0:
        return o
    if inner != 1 and xk != NATIVE:
        # 16-bit, class axis not last: rows of a copy with that axis last
        # (16-bit copies: cheap next to the exps), written back
        np.copyto(o, np.moveaxis(_softmax_any(np.ascontiguousarray(np.moveaxis(xa, ax, -1)),
                                              -1, None, mode), -1, ax))
        return o
    if inner == 1:
        j.mode = mode
        j.is_double = is_double
        j.xk = xk
        j.n = outer
        j.c = c
        j.nchunk = (c + SM_CHUNK - 1) // SM_CHUNK
        j.x = cnp.PyArray_DATA(xa)
        j.out = cnp.PyArray_DATA(o)
        j.y = NULL
        j.t = NULL
        j.w = NULL
        j.loss = NULL                        # (cross-entropy only)
        bufs = piece_buffers(&j)
        with nogil:
            core.softmax.run_rows(&j)
    else:
        with nogil:
            if is_double:
                core.softmax.run_cols_f64(<const double *>cnp.PyArray_DATA(xa),
                                          <double *>cnp.PyArray_DATA(o), outer, c, inner,
                                          mode == LOG_SOFTMAX)
            else:
                core.softmax.run_cols_f32(<const float *>cnp.PyArray_DATA(xa),
                                          <float *>cnp.PyArray_DATA(o), outer, c, inner,
                                          mode == LOG_SOFTMAX)
    return o


cdef object piece_buffers(SmJob *j):
    """Partials for the few-long-rows schedule (only rows of several chunks)."""
    j.pmax = NULL
    j.part = NULL
    if j.nchunk < 2:
        return None
    cdef cnp.ndarray b = np.empty(j.n * j.nchunk * 4, dtype=np.float64)
    j.pmax = <double *>cnp.PyArray_DATA(b)
    j.part = <SmPart *>(j.pmax + j.n * j.nchunk)
    return b


def log_softmax(x, axis=-1, out=None):
    """log(softmax(x)) along `axis`, computed stably in one kernel.

    ``out = (x - max) - log(sum(exp(x - max)))`` with the max and the sum
    taken along `axis` (sum accumulated in double), as
    ``torch.nn.functional.log_softmax``.

    Parameters
    ----------
    x : ndarray, float32, float64, float16 or bfloat16, at least 1-d
        Any layout and byte order (copied first when not native C-contiguous).
        16-bit x is computed in float32 (the max and the sum as for float32)
        and the output rounded to x's dtype.
    axis : int
        The class axis (default: the last).
    out : ndarray, optional
        Like `x`, C-contiguous, aligned, writeable, native byte order; may be
        `x` itself (in place), but not share memory with it otherwise.

    Returns
    -------
    ndarray
        `out`, or a new array like `x`.
    """
    return _softmax_any(x, axis, out, LOG_SOFTMAX)


def softmax(x, axis=-1, out=None):
    """softmax(x) along `axis`: ``exp(x - max) / sum(exp(x - max))``.

    As ``torch.nn.functional.softmax``; the sum is accumulated in double.
    Parameters as in `log_softmax`.
    """
    return _softmax_any(x, axis, out, SOFTMAX)


def _log(x):
    """log of every element of a float64 array with fastopt's log (a test hook)."""
    cdef cnp.ndarray xa = readable(float_array(x, "x"))
    if cnp.PyArray_TYPE(xa) != cnp.NPY_FLOAT64:
        raise TypeError("x must have dtype float64")
    cdef cnp.ndarray o = cnp.PyArray_EMPTY(cnp.PyArray_NDIM(xa), cnp.PyArray_DIMS(xa), cnp.NPY_FLOAT64, 0)
    with nogil:
        core.softmax.log_f64(<const double *>cnp.PyArray_DATA(xa), <double *>cnp.PyArray_DATA(o),
                             cnp.PyArray_SIZE(xa))
    return o


def _exp(x, bint nonpositive=False):
    """exp of every element with fastopt's vectorized exp (a test hook);
    `nonpositive`: the variant for x <= 0 that the kernels use."""
    cdef cnp.ndarray xa = readable(float_array(x, "x"))
    cdef cnp.ndarray o = cnp.PyArray_EMPTY(cnp.PyArray_NDIM(xa), cnp.PyArray_DIMS(xa),
                                           cnp.PyArray_TYPE(xa), 0)
    cdef Py_ssize_t n = cnp.PyArray_SIZE(xa)
    with nogil:
        if cnp.PyArray_TYPE(xa) == cnp.NPY_FLOAT64:
            core.softmax.exp_f64(<const double *>cnp.PyArray_DATA(xa), <double *>cnp.PyArray_DATA(o),
                                 n, nonpositive)
        else:
            core.softmax.exp_f32(<const float *>cnp.PyArray_DATA(xa), <float *>cnp.PyArray_DATA(o),
                                 n, nonpositive)
    return o


cdef cnp.ndarray compute_like(object a, str name, cnp.ndarray x, str x_name, int xk,
                              bint check_shape=True):
    """A target or weight array for logits `x`: x's dtype (and shape); for
    16-bit x, float32 or x's dtype, returned as float32 (converted)."""
    cdef cnp.ndarray arr = any_float_array(a, name) if xk != NATIVE else float_array(a, name)
    cdef int code = dtype_code(arr)
    if code != dtype_code(x) and not (xk != NATIVE and code == DT_F32):
        raise TypeError(f"{name} has dtype {arr.dtype} but {x_name} has dtype {x.dtype}"
                        + (f" (float32 or {x.dtype} for {x.dtype} {x_name})" if xk != NATIVE
                           else ""))
    if check_shape and not same_shape(arr, x):
        raise ValueError(f"{name} has shape {(<object>arr).shape} but {x_name} has shape "
                         f"{(<object>x).shape}")
    return arr if xk == NATIVE else np.asarray(arr, dtype=np.float32)


cdef cnp.ndarray class_targets(cnp.ndarray t, Py_ssize_t n):
    """A private native int64 copy of class indices of any integer dtype and
    byte order.  The kernel reads only this copy, so no other thread can
    change an index between its check and its use."""
    cdef int typ = cnp.PyArray_TYPE(t)
    if not cnp.PyTypeNum_ISINTEGER(typ):
        raise TypeError(f"target of shape ({n},) must hold integer class indices, "
                        f"got dtype {t.dtype}")
    if not (cnp.PyTypeNum_ISUNSIGNED(typ) and cnp.PyArray_ITEMSIZE(t) == 8):
        return copy_as(t, cnp.NPY_INT64)       # every value fits
    # uint64: values above 2**63 - 1 would wrap to negative indices (even to
    # ignore_index); checked on the copy, which is then read as int64.
    cdef cnp.ndarray y = copy_as(t, cnp.NPY_UINT64)
    cdef const uint64_t *yp = <const uint64_t *>cnp.PyArray_DATA(y)
    cdef Py_ssize_t bad
    with nogil:
        bad = core.softmax.first_above(yp, n, <uint64_t>INT64_MAX)
    if bad >= 0:
        raise ValueError(f"target[{bad}] = {yp[bad]} is out of range")
    return y


def cross_entropy(logits, target, *, weight=None, ignore_index=-100, reduction="mean",
                  label_smoothing=0.0, return_grad=False, grad_out=None):
    """Cross-entropy loss of logits against class indices or probabilities,
    and optionally its gradient, in one fused kernel.

    Follows ``torch.nn.functional.cross_entropy``.  With logp = log_softmax(logits)
    and eps = `label_smoothing`, the loss of row i is::

        class index y_i:  (1-eps) * (-w[y_i] logp[i, y_i]) + eps/C * sum_c(-w[c] logp[i, c])
        probabilities:    sum_c -w[c] t'[i, c] logp[i, c],  t' = (1-eps) t + eps/C

    (w = 1 without `weight`).  'mean' divides the sum over rows by the sum of
    w[y_i] over the rows not ignored (class indices; NaN if all are ignored)
    or by N (probabilities); 'sum' adds; 'none' returns the rows' losses
    (0 for ignored rows).  The gradient is ``softmax * Q - q`` per row, where q
    is the weighted target distribution above (Q its sum), divided by the
    same denominator for 'mean'.

    Parameters
    ----------
    logits : ndarray, float32, float64, float16 or bfloat16, shape (N, C)
        Any layout and byte order (copied first when not native
        C-contiguous).  16-bit logits are computed in float32 (sums in
        double as for float32); the gradient is rounded to their dtype.
    target : ndarray
        Class indices, shape (N,), any integer dtype, byte order and layout,
        each in [0, C) or equal to `ignore_index` (they are copied, then
        checked, and only the copy is used); or class probabilities, shape
        (N, C), the dtype of `logits` (soft labels, or the one-hot Y);
        float32 or the logits' dtype for 16-bit logits.
    weight : ndarray, optional
        Class weights, shape (C,), the dtype of `logits` (float32 or the
        logits' dtype for 16-bit logits), finite and >= 0 (copied, then
        checked).
    ignore_index : int
        Rows whose class index equals it contribute nothing (class indices
        only; must be negative with probabilities, as in PyTorch).
    reduction : {'mean', 'sum', 'none'}
    label_smoothing : float in [0, 1]
    return_grad : bool
        Also return d(loss)/d(logits).
    grad_out : ndarray, optional
        Where to write the gradient (like `logits`, C-contiguous, aligned,
        writeable, native byte order, sharing no memory with `logits`,
        `target` or `weight`); requires ``return_grad=True``.

    Returns
    -------
    loss : float, or ndarray of shape (N,) for reduction='none'
        Sums are accumulated in double.
    (loss, dlogits) when `return_grad` is True.

    Notes
    -----
    A row with a NaN or +inf logit, or only -inf logits, gives NaN for that
    row.  A -inf logit (a masked class) gives a finite loss and a zero
    gradient for that class; with label smoothing the loss becomes +inf (NaN
    if that class's weight is 0), as in PyTorch.  With probability targets a
    class with t'[i, c] * w[c] = 0 adds 0 to the loss even at a -inf logit
    (PyTorch computes 0 * -inf = NaN there).
    """
    cdef cnp.ndarray x = any_float_array(logits, "logits")
    if cnp.PyArray_NDIM(x) != 2:
        raise ValueError(f"logits must have shape (N, C), got shape {(<object>x).shape}")
    cdef cnp.ndarray x_in = x
    x = readable(x)
    cdef Py_ssize_t n = cnp.PyArray_DIM(x, 0), c = cnp.PyArray_DIM(x, 1)
    cdef int xk = store_of(dtype_code(x))
    # targets and weights of 16-bit logits are used as float32
    cdef int typ = cnp.PyArray_TYPE(x) if xk == NATIVE else cnp.NPY_FLOAT32
    if not cnp.PyArray_Check(target):
        raise TypeError(f"target must be a numpy.ndarray, got {type(target).__name__}")
    cdef cnp.ndarray y = None, t = None, w = None, g = None
    cdef int tnd = cnp.PyArray_NDIM(<cnp.ndarray>target)
    if tnd == 1 and cnp.PyArray_DIM(<cnp.ndarray>target, 0) == n:
        y = class_targets(target, n)
    elif tnd == 2:
        t = readable(compute_like(target, "target", x, "logits", xk))
    else:
        raise ValueError(f"target must have shape ({n},) (class indices) or {(n, c)} "
                         f"(probabilities), got shape {(<object>target).shape}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    cdef double eps = real(label_smoothing, "label_smoothing")
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {eps!r}")
    ignore_index = integer(ignore_index, "ignore_index")
    if not -INT64_MAX - 1 <= ignore_index <= INT64_MAX:
        raise ValueError(f"ignore_index must fit in int64, got {ignore_index}")
    if t is not None and ignore_index >= 0:
        raise ValueError("ignore_index is not supported with probability targets "
                         f"(got ignore_index={ignore_index})")
    if weight is not None:
        w = any_float_array(weight, "weight")
        if cnp.PyArray_NDIM(w) != 1 or cnp.PyArray_DIM(w, 0) != c:
            raise ValueError(f"weight must have shape ({c},), got shape {(<object>w).shape}")
        w = compute_like(w, "weight", x, "logits", xk, False)
    if grad_out is not None:
        if not return_grad:
            raise ValueError("grad_out requires return_grad=True")
        g = writable(like_any(grad_out, "grad_out", x, "logits"), "grad_out")
        check_disjoint([x_in, target, weight, g], ("logits", "target", "weight", "grad_out"), 3)
    if w is not None:
        # A private copy (C values: cheap), checked and then read only by us.
        w = copy_as(w, typ)
        if not np.all(w >= 0) or not np.all(np.isfinite(w)):
            raise ValueError("weight must be finite and >= 0")
    cdef SmJob j
    j.mode = XENT
    j.is_double = typ == cnp.NPY_FLOAT64
    j.xk = xk
    j.n = n
    j.c = c
    j.nchunk = (c + SM_CHUNK - 1) // SM_CHUNK
    j.x = cnp.PyArray_DATA(x)
    j.y = <const int64_t *>cnp.PyArray_DATA(y) if y is not None else NULL
    j.t = cnp.PyArray_DATA(t) if t is not None else NULL
    j.w = cnp.PyArray_DATA(w) if w is not None else NULL
    j.ignore = ignore_index
    j.eps = eps
    cdef double denom = <double>n
    cdef Py_ssize_t bad = -1
    if y is not None:
        with nogil:
            if j.is_double:
                bad = core.softmax.check_classes_f64(j.y, n, c, j.ignore, <const double *>j.w,
                                                     &denom)
            else:
                bad = core.softmax.check_classes_f32(j.y, n, c, j.ignore, <const float *>j.w,
                                                     &denom)
        if bad >= 0:
            raise ValueError(f"target[{bad}] = {j.y[bad]} is out of range: class indices "
                             f"must be in [0, {c}) or equal ignore_index ({ignore_index})")
    j.wsum = float(np.sum(w, dtype=np.float64)) if w is not None else <double>c
    j.scale = 1.0 / denom if reduction == "mean" else 1.0
    if return_grad and g is None:
        g = np.empty((<object>x).shape, x.dtype)
    j.out = cnp.PyArray_DATA(g) if g is not None else NULL
    cdef cnp.ndarray rows = cnp.PyArray_EMPTY(1, [n], cnp.NPY_FLOAT64, 0)
    j.loss = <double *>cnp.PyArray_DATA(rows)
    bufs = piece_buffers(&j)
    cdef double total = 0.0
    if n > 0 and c > 0:
        with nogil:
            core.softmax.run_rows(&j)
    elif n > 0:
        rows[:] = 0.0                       # no classes: an empty sum (as PyTorch)
    if reduction == "none":
        loss = rows.astype(x.dtype)
    else:
        total = core.softmax.ordered_sum(j.loss, n)
        if reduction == "mean":
            total = total / denom
        loss = total
    if return_grad:
        return loss, g
    return loss
