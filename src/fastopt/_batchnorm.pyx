# Batch Normalization forward and backward, fused and multithreaded.
#
# Design
# ------
# * x is viewed as (outer, C, inner): outer = prod(shape[:axis]), inner =
#   prod(shape[axis+1:]).  NCHW has a large inner (one contiguous segment of
#   H*W values per (n, c)); NHWC and (N, C) have inner == 1 (rows of C
#   contiguous channels).
# * The work is cut into *boxes*, a FIXED partition that depends only on the
#   shape (never on the thread count):
#     - segment layout (inner >= BN_SEGMENT_MIN): a box is one channel x a
#       group of `og` consecutive outer indices x a chunk of `il` inner
#       values, about BN_BOX elements in all;
#     - row layout (small inner): a box is a block of `og` consecutive rows
#       x a chunk of `cc` channels, about BN_BOX elements; the loops run
#       along the contiguous channel axis, so they vectorize across channels
#       (with few channels, over groups of rows: see "row layout" in
#       _core_batchnorm.pxi).
#   Boxes are numbered b = k*U + u: k the channel (chunk), u in [0, U) the
#   box's place along the channel's reduction (the same U for every channel).
# * Forward statistics: every box yields, per channel, (count, mean, M2) in
#   double from two passes over the box while it is in cache (a shifted sum,
#   then the sum of squared deviations from the box mean: never
#   E[x^2] - E[x]^2).  The shift (the box's first value) makes a constant
#   channel's deviations exactly zero.  The boxes of a channel are then merged
#   in order u = 0, 1, ... with Chan's formula.  Backward sums (sum dy and
#   sum dy*(x - mean)) use the same boxes, merged in the same fixed order.
#   Every box is computed by one thread with a fixed order of operations, so
#   the results are bit-identical for any number of threads.
# * Reductions inside a segment keep BN_LANES independent double
#   accumulators (lane k takes the values i = k mod BN_LANES): the compiler
#   vectorizes them without reassociating anything (no -ffast-math), and the
#   order is fixed.
# * Passes over memory.  Forward: one statistics pass (each box read twice,
#   the second time from cache) and one pass that reads x and writes y.
#   Backward: one pass reading x and dy for the sums and one that reads them
#   again and writes dx.  Both passes are jobs on the thread pool; the boxes
#   are visited in the order of x in memory (streaming), each thread taking
#   the same range of boxes in both passes, the second pass in reverse order
#   so that it starts on the data the first pass left in the caches (L2, and
#   the L3 for the rest).  (Running both passes per channel while the channel
#   is in L2, which reads x from memory only once, measured slower in NCHW:
#   a channel is many short strided segments.)
# * Arithmetic of the y and dx passes is in double (float32 inputs are widened
#   and the result rounded once); the per-channel coefficients are computed in
#   double once per call.  Saved statistics (ctx.mean, ctx.invstd) are float64.
# * float16/bfloat16 x, dy (and so y, dx): the loops read and write them
#   through `ld`/`st` with a storage tag (_half.pxi), widening to double as
#   for float32; results are rounded to float32 and then to x's dtype.
#   gamma, beta, the running statistics and dgamma, dbeta are float32 then.
# * The `def` functions validate everything before `nogil`; nothing is
#   written when a check fails.  Scratch (the per-box partial statistics, a
#   few arrays of C doubles) is a small float64 array allocated per call.
# * This module checks the arguments and allocates; the loops are in the
#   kernel core (_core_batchnorm.pxi, compiled per SIMD level), reached
#   through `core.batchnorm`.
include "_common.pxi"

cimport cython
import numpy as np

# ---------------------------------------------------------------- wrappers ---

cdef inline void *data_or_null(object a):
    return cnp.PyArray_DATA(<cnp.ndarray>a) if a is not None else NULL


cdef void run_arrays(const BnPlan *p, const BnJob *j, cnp.ndarray x, object dy, cnp.ndarray out,
                     cnp.ndarray gamma, object beta, object r1, object r2):
    """The kernels' `run` on validated arrays of x's dtype (None for the ones a
    call has not)."""
    cdef void *xp = cnp.PyArray_DATA(x)
    cdef void *dyp = data_or_null(dy)
    cdef void *outp = cnp.PyArray_DATA(out)
    cdef void *gp = cnp.PyArray_DATA(gamma)
    cdef void *bp = data_or_null(beta)
    cdef void *r1p = data_or_null(r1)
    cdef void *r2p = data_or_null(r2)
    cdef bint is_double = cnp.PyArray_TYPE(x) == cnp.NPY_FLOAT64
    with nogil:
        if is_double:
            core.batchnorm.run_f64(p, j, <const double *>xp, <const double *>dyp,
                                   <double *>outp, <const double *>gp, <const double *>bp,
                                   <double *>r1p, <double *>r2p)
        else:
            core.batchnorm.run_f32(p, j, <const float *>xp, <const float *>dyp,
                                   <float *>outp, <const float *>gp, <const float *>bp,
                                   <float *>r1p, <float *>r2p)


cdef void infer_arrays(const BnJob *j, Py_ssize_t C, cnp.ndarray gamma, cnp.ndarray beta,
                       cnp.ndarray rmean, cnp.ndarray rvar):
    """The kernels' `infer` on validated (C,) arrays of one dtype."""
    cdef void *gp = cnp.PyArray_DATA(gamma)
    cdef void *bp = cnp.PyArray_DATA(beta)
    cdef void *mp = cnp.PyArray_DATA(rmean)
    cdef void *vp = cnp.PyArray_DATA(rvar)
    cdef bint is_double = cnp.PyArray_TYPE(gamma) == cnp.NPY_FLOAT64
    with nogil:
        if is_double:
            core.batchnorm.infer_f64(j, C, <const double *>gp, <const double *>bp,
                                     <const double *>mp, <const double *>vp)
        else:
            core.batchnorm.infer_f32(j, C, <const float *>gp, <const float *>bp,
                                     <const float *>mp, <const float *>vp)


cdef inline object read_only_view(object a):
    cdef cnp.ndarray v = <cnp.ndarray>a.view()
    cnp.PyArray_CLEARFLAGS(v, cnp.NPY_ARRAY_WRITEABLE)
    return v


@cython.final
@cython.auto_pickle(False)
cdef class BatchNormContext:
    """What `batch_norm_backward` needs from a `batch_norm_forward` call.

    Made only by `batch_norm_forward` (``BatchNormContext()`` raises
    TypeError; an empty context from ``BatchNormContext.__new__`` or
    ``copy.copy`` is rejected by the backward pass).  The context records the
    forward's shape, channel axis, dtype and blocking in C, and holds its own
    views of the arrays it reads, which Python code never receives: reshaping
    or resizing the caller's `x` or `gamma` after the forward pass cannot
    change what the backward pass reads (their *values* are read, not
    copied: do not modify them before the backward pass).

    Attributes (read only)
    ----------------------
    x, gamma : ndarray
        Read-only views of the arrays the forward pass read: the inputs
        themselves when they were C-contiguous, aligned and in native byte
        order, else the forward's private copies.  Each access returns a new
        view.
    mean, invstd : ndarray, float64, shape (C,)
        Read-only views of the statistics used: the batch mean and
        1/sqrt(var + eps) in training, the running ones in inference.  Kept
        in float64 whatever x's dtype (they are computed in double): backward
        then uses exactly the x_hat of the forward pass.
    training : bool
    axis : int
        The channel axis, normalized to >= 0.
    """
    cdef object _x, _gamma, _mean, _invstd     # never handed out
    cdef tuple shape                           # x's shape at the forward pass
    cdef void *xdata
    cdef void *gdata
    cdef void *mdata
    cdef void *sdata
    cdef int typenum, gtypenum                 # x's and gamma's (float32 for 16-bit x)
    cdef Py_ssize_t outer, C, inner
    cdef bint ready
    cdef readonly bint training
    cdef readonly int axis

    def __init__(self, *args, **kwargs):
        raise TypeError("BatchNormContext cannot be created directly: batch_norm_forward "
                        "returns one")

    cdef void record(self, cnp.ndarray x, cnp.ndarray gamma, cnp.ndarray mean,
                     cnp.ndarray invstd, bint training, int axis, Py_ssize_t outer,
                     Py_ssize_t C, Py_ssize_t inner):
        self._x = (<object>x).view()
        self._gamma = (<object>gamma).view()
        # The statistics are written only by the forward pass: read-only from
        # here on, so no view of them can be made writeable.
        cnp.PyArray_CLEARFLAGS(mean, cnp.NPY_ARRAY_WRITEABLE)
        cnp.PyArray_CLEARFLAGS(invstd, cnp.NPY_ARRAY_WRITEABLE)
        self._mean = mean
        self._invstd = invstd
        self.shape = (<object>x).shape
        self.xdata = cnp.PyArray_DATA(x)
        self.gdata = cnp.PyArray_DATA(gamma)
        self.mdata = cnp.PyArray_DATA(mean)
        self.sdata = cnp.PyArray_DATA(invstd)
        self.typenum = cnp.PyArray_TYPE(x)
        self.gtypenum = cnp.PyArray_TYPE(gamma)
        self.outer = outer
        self.C = C
        self.inner = inner
        self.training = training
        self.axis = axis
        self.ready = True

    cdef int verify(self) except -1:
        """The context is complete and its arrays are what the forward pass left."""
        if not self.ready:
            raise ValueError("ctx is an empty BatchNormContext: use the one returned by "
                             "batch_norm_forward")
        cdef cnp.ndarray x = <cnp.ndarray>self._x
        cdef cnp.ndarray g = <cnp.ndarray>self._gamma
        cdef cnp.ndarray m = <cnp.ndarray>self._mean
        cdef cnp.ndarray s = <cnp.ndarray>self._invstd
        if (cnp.PyArray_DATA(x) != self.xdata or cnp.PyArray_TYPE(x) != self.typenum
                or (<object>x).shape != self.shape or not direct(x)
                or cnp.PyArray_DATA(g) != self.gdata or cnp.PyArray_TYPE(g) != self.gtypenum
                or cnp.PyArray_NDIM(g) != 1 or cnp.PyArray_DIM(g, 0) != self.C or not direct(g)
                or cnp.PyArray_DATA(m) != self.mdata or cnp.PyArray_SIZE(m) != self.C
                or cnp.PyArray_DATA(s) != self.sdata or cnp.PyArray_SIZE(s) != self.C):
            raise ValueError("ctx was modified after batch_norm_forward")
        return 0

    @property
    def x(self):
        return read_only_view(self._x) if self.ready else None

    @property
    def gamma(self):
        return read_only_view(self._gamma) if self.ready else None

    @property
    def mean(self):
        return read_only_view(self._mean) if self.ready else None

    @property
    def invstd(self):
        return read_only_view(self._invstd) if self.ready else None

    def __repr__(self):
        if not self.ready:
            return "BatchNormContext(empty)"
        return (f"BatchNormContext(shape={self.shape}, dtype={(<object>self._x).dtype}, "
                f"axis={self.axis}, training={self.training})")


cdef inline cnp.ndarray channel_vector(object a, str name, cnp.ndarray x, Py_ssize_t C,
                                       bint in_place=False):
    """A (C,) array with x's dtype; for 16-bit x, float32 (or, if only read,
    x's dtype, converted to float32)."""
    cdef bint half = dtype_code(x) == DT_F16 or dtype_code(x) == DT_BF16
    cdef cnp.ndarray arr = any_float_array(a, name) if half else float_array(a, name)
    cdef int code = dtype_code(arr)
    if half and code != DT_F32 and (in_place or code != dtype_code(x)):
        raise TypeError(f"{name} has dtype {arr.dtype} but x has dtype {x.dtype} (for {x.dtype} "
                        f"x: float32{'' if in_place else ' or ' + str(x.dtype)})")
    if not half and cnp.PyArray_TYPE(arr) != cnp.PyArray_TYPE(x):
        raise TypeError(f"{name} has dtype {arr.dtype} but x has dtype {x.dtype}")
    if cnp.PyArray_NDIM(arr) != 1 or cnp.PyArray_DIM(arr, 0) != C:
        raise ValueError(f"{name} must have shape ({C},) (the channels of x), "
                         f"got {(<object>arr).shape}")
    return np.asarray(arr, dtype=np.float32) if half else arr


cdef inline int channel_axis(object axis, int ndim) except -1:
    cdef object a = integer(axis, "axis")
    if not -ndim <= a < ndim:
        raise ValueError(f"axis {a} is out of bounds for x with {ndim} dimensions")
    return <int>(a + ndim if a < 0 else a)


cdef inline int no_overlap(cnp.ndarray w, str wname, list others, tuple names) except -1:
    """The written array `w` shares no memory with any of `others`."""
    cdef Py_ssize_t i
    for i in range(len(others)):
        check_disjoint([w, others[i]], (wname, names[i]))
    return 0


def batch_norm_forward(x, gamma, beta, running_mean=None, running_var=None, *,
                       training=True, momentum=0.1, eps=1e-5, axis=1, out=None):
    """Batch Normalization forward pass, fused and parallel.

    Follows ``torch.nn.functional.batch_norm``.  Per channel c (index `axis`
    of x), over the m values of the other axes::

        training:   mean = sum(x)/m,  var = sum((x - mean)**2)/m   (biased)
        inference:  mean = running_mean,  var = running_var
        x_hat = (x - mean) / sqrt(var + eps)
        y = gamma * x_hat + beta

    In training, `running_mean` and `running_var` (if given) are updated in
    place as PyTorch does::

        running_mean = (1 - momentum)*running_mean + momentum*mean
        running_var  = (1 - momentum)*running_var  + momentum*var*m/(m - 1)

    Statistics are computed stably (per-block two-pass mean and sum of squared
    deviations merged with Chan's formula, in double for float32), results
    are identical for any number of threads, and a constant channel gives
    x_hat = 0 exactly.  NaN or Inf in a channel of x propagate to that
    channel of y, and in training make that channel's batch statistics, and
    so its running_mean/running_var, NaN or Inf (other channels unaffected),
    as in PyTorch.

    Parameters
    ----------
    x : ndarray, float32, float64, float16 or bfloat16, shape (N, C, *spatial) or (N, *spatial, C)
        At least 2-D.  Non-contiguous, unaligned or byte-swapped input is
        copied first.  16-bit x is computed as float32 x (statistics in
        double) and y rounded to x's dtype.
    gamma, beta : ndarray, shape (C,), x's dtype
        (float32 or x's dtype for 16-bit x.)
    running_mean, running_var : ndarray, shape (C,), x's dtype, optional
        C-contiguous, aligned, writeable, native byte order; float32 for
        16-bit x.  Required in inference; in training give both or neither.
    training : bool
    momentum : float in [0, 1]
    eps : float > 0
    axis : int
        The channel axis: 1 for NCHW / (N, C), -1 for channels-last (NHWC).
    out : ndarray, optional
        Receives y: like x, C-contiguous, aligned, writeable, native byte
        order, not overlapping the inputs.

    Returns
    -------
    y : ndarray
        `out` if given.
    ctx : BatchNormContext
        For `batch_norm_backward`.

    Raises
    ------
    ValueError
        "Expected more than 1 value per channel when training" if training
        with m <= 1; bad shapes, axis, momentum, eps or `out`.  Nothing is
        written when an error is raised.
    TypeError
        Wrong types or dtypes.
    """
    cdef cnp.ndarray X = any_float_array(x, "x")
    cdef int nd = cnp.PyArray_NDIM(X)
    if nd < 2:
        raise ValueError(f"x must have at least 2 dimensions (N, C, ...), got shape {x.shape}")
    cdef int ax = channel_axis(axis, nd)
    cdef tuple shape = (<object>X).shape
    cdef Py_ssize_t C = shape[ax], outer = 1, inner = 1, i
    for i in range(ax):
        outer *= <Py_ssize_t>shape[i]
    for i in range(ax + 1, nd):
        inner *= <Py_ssize_t>shape[i]
    cdef cnp.ndarray G = channel_vector(gamma, "gamma", X, C)
    cdef cnp.ndarray Bt = channel_vector(beta, "beta", X, C)
    cdef object RM = None, RV = None
    if (running_mean is None) != (running_var is None):
        raise ValueError("give both running_mean and running_var, or neither")
    if running_mean is not None:
        RM = writable(channel_vector(running_mean, "running_mean", X, C, True), "running_mean")
        RV = writable(channel_vector(running_var, "running_var", X, C, True), "running_var")
    cdef bint train = bool(training)
    if not train and RM is None:
        raise ValueError("training=False needs running_mean and running_var")
    cdef double mom = real(momentum, "momentum")
    if not 0.0 <= mom <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {mom!r}")
    cdef double eps_ = real(eps, "eps")
    if not eps_ > 0.0:
        raise ValueError(f"eps must be > 0, got {eps_!r}")
    if train and outer * inner <= 1:
        raise ValueError("Expected more than 1 value per channel when training, "
                         f"got input of shape {shape}")
    cdef cnp.ndarray Y = None
    if out is not None:
        Y = writable(like_any(out, "out", X, "x"), "out")
        no_overlap(Y, "out", [X, G, Bt, RM, RV],
                   ("x", "gamma", "beta", "running_mean", "running_var"))
    if RM is not None:
        no_overlap(RM, "running_mean", [X, G, Bt, RV], ("x", "gamma", "beta", "running_var"))
        no_overlap(RV, "running_var", [X, G, Bt], ("x", "gamma", "beta"))

    X = readable(X)
    G = readable(G)
    Bt = readable(Bt)
    if Y is None:
        Y = np.empty(shape, X.dtype)

    cdef BnPlan p
    core.batchnorm.plan(&p, outer, C, inner)
    cdef cnp.ndarray mean = np.empty(C, dtype=np.float64)
    cdef cnp.ndarray invstd = np.empty(C, dtype=np.float64)
    cdef cnp.ndarray work = np.empty(3 * C + (2 * p.U * C if train and p.U > 1 else 0),
                                     dtype=np.float64)
    cdef double *W = <double *>cnp.PyArray_DATA(work)
    cdef BnJob j
    j.xk = store_of(dtype_code(X))
    j.backward = False
    j.stats = train
    j.training = train
    j.update = RM is not None
    j.momentum = mom
    j.eps = eps_
    j.mean = <double *>cnp.PyArray_DATA(mean)
    j.invstd = <double *>cnp.PyArray_DATA(invstd)
    j.A = W
    j.B = W + C
    j.K = W + 2 * C
    j.P1 = W + 3 * C
    j.P2 = W + 3 * C + p.U * C
    if p.U == 1:
        # One box per channel: its results are the statistics (merging is a copy).
        j.P1 = j.mean
        j.P2 = j.invstd
    if not train:
        # Inference: the running statistics, in double.
        infer_arrays(&j, C, G, Bt, RM, RV)
    if outer * C * inner > 0:
        run_arrays(&p, &j, X, None, Y, G, Bt, RM, RV)

    cdef BatchNormContext ctx = BatchNormContext.__new__(BatchNormContext)
    ctx.record(X, G, mean, invstd, train, ax, outer, C, inner)
    return Y, ctx


def batch_norm_backward(dy, ctx, *, dx_out=None):
    """Batch Normalization backward pass, fused and parallel.

    With x_hat = (x - mean)*invstd from the forward pass, per channel over
    its m values::

        dbeta  = sum(dy)
        dgamma = sum(dy * x_hat)
        training:   dx = gamma*invstd/m * (m*dy - dbeta - x_hat*dgamma)
        inference:  dx = gamma*invstd * dy

    (the gradients of ``torch.nn.functional.batch_norm``).  Sums are in double
    in a fixed order: identical results for any number of threads.

    Parameters
    ----------
    dy : ndarray
        Gradient of the loss with respect to y: the dtype and shape x had in
        the forward pass (non-contiguous, unaligned or byte-swapped input is
        copied first).
    ctx : BatchNormContext
        From `batch_norm_forward`.
    dx_out : ndarray, optional
        Receives dx: like dy, C-contiguous, aligned, writeable, native byte
        order, not overlapping x, dy or gamma.

    Returns
    -------
    dx, dgamma, dbeta : ndarray
        dx like x (`dx_out` if given); dgamma and dbeta of shape (C,), the
        dtype of ctx.gamma (x's dtype, float32 for 16-bit x).
    """
    if not isinstance(ctx, BatchNormContext):
        raise TypeError(f"ctx must be the BatchNormContext returned by batch_norm_forward, "
                        f"got {type(ctx).__name__}")
    cdef BatchNormContext cx = <BatchNormContext>ctx
    cx.verify()
    # Everything below uses the shapes and arrays the context recorded.
    cdef cnp.ndarray X = <cnp.ndarray>cx._x
    cdef cnp.ndarray G = <cnp.ndarray>cx._gamma
    cdef cnp.ndarray DY = like_any(dy, "dy", X, "x")
    cdef cnp.ndarray DX = None
    if dx_out is not None:
        DX = writable(like_any(dx_out, "dx_out", X, "x"), "dx_out")
        no_overlap(DX, "dx_out", [X, DY, G], ("x", "dy", "gamma"))
    DY = readable(DY)
    if DX is None:
        DX = cnp.PyArray_EMPTY(cnp.PyArray_NDIM(X), cnp.PyArray_DIMS(X), cx.typenum, 0)
    cdef Py_ssize_t C = cx.C, outer = cx.outer, inner = cx.inner
    cdef cnp.npy_intp nc = C
    cdef cnp.ndarray dgamma = cnp.PyArray_ZEROS(1, &nc, cx.gtypenum, 0)
    cdef cnp.ndarray dbeta = cnp.PyArray_ZEROS(1, &nc, cx.gtypenum, 0)
    cdef BnPlan p
    core.batchnorm.plan(&p, outer, C, inner)
    cdef cnp.ndarray work = np.empty(3 * C + (2 * p.U * C if p.U > 1 else 0), dtype=np.float64)
    cdef double *W = <double *>cnp.PyArray_DATA(work)
    cdef BnJob j
    j.xk = store_of(dtype_code(X))
    j.backward = True
    j.stats = True
    j.training = cx.training
    j.update = False
    j.mean = <double *>cx.mdata
    j.invstd = <double *>cx.sdata
    j.A = W
    j.B = W + C
    j.K = W + 2 * C
    j.P1 = W + 3 * C
    j.P2 = W + 3 * C + p.U * C
    if p.U == 1:
        j.P1 = j.K     # merge_sums: K = sum dy, B = sum dy*(x - mean)
        j.P2 = j.B
    if outer * C * inner > 0:
        run_arrays(&p, &j, X, DY, DX, G, None, dgamma, dbeta)
    return DX, dgamma, dbeta
