# Fused in-place optimizer updates: Adam/AdamW, RMSprop, SGD with momentum.
#
# Design
# ------
# * `*_range` functions update elements [lo, hi) of one parameter array and
#   its state in a single pass (one read of every array, one write of every
#   updated array, no temporaries).  They are `noexcept nogil`, fused over
#   float/double, and branch only on loop-invariant options.
# * A `Segment` describes one parameter array with its gradient, state and
#   precomputed coefficients.  `run_segments` updates a list of segments in
#   one parallel region, splitting the *total* element count evenly across
#   threads (a thread's share may span several arrays), so a model's many
#   small arrays cost one native call.  Elementwise work: results do not
#   depend on the thread count.
# * Scalars (bias corrections, step size) are computed in double once per
#   segment and cast to the array's dtype, as PyTorch's fused kernels do.
# * The `def` functions validate everything before `nogil` and never let the
#   kernels see a bad array; nothing is written when a check fails.
include "_common.pxi"

from libc.math cimport pow, sqrt

cdef enum Kind:
    ADAM = 0
    RMSPROP = 1
    SGD = 2

# Bytes of parameter per thread below which an update stays on the calling
# thread.  benchmarks/grain.py (2 cores): a second thread pays off for Adam
# from ~16k float32 elements on a quiet machine, ~40k on a busy one; at 32k
# (128 KiB) it gains 1.3x.  float64 elements cost 2-3x more, so a threshold
# in bytes fits both dtypes (16k float64 elements: 1.6x).
DEF GRAIN = 65536
# Thread boundaries fall on whole 64-byte cache lines.
DEF ALIGN = 16


ctypedef struct Coef:
    int kind
    bint maximize, l2, amsgrad, centered, momentum, nesterov, first
    double lr, weight_decay, eps
    # Adam
    double beta1, one_minus_beta1, beta2, one_minus_beta2
    double step_size               # lr / (1 - beta1**step)
    double bias_correction2_sqrt   # sqrt(1 - beta2**step)
    double decay                   # 1 - lr*weight_decay (decoupled), else 1
    # RMSprop
    double alpha, one_minus_alpha
    # SGD / RMSprop momentum
    double mu, one_minus_dampening


ctypedef struct Segment:
    void *param
    void *grad
    void *s1        # exp_avg | square_avg | momentum_buffer
    void *s2        # exp_avg_sq | momentum_buffer (RMSprop)
    void *s3        # max_exp_avg_sq | grad_avg
    Py_ssize_t n
    Py_ssize_t offset   # of the first element in the concatenation of segments
    bint is_double
    const Coef *coef


# ----------------------------------------------------------------- kernels ---

cdef void adam_range(floating *p, const floating *g, floating *m, floating *v,
                     floating *vmax, Py_ssize_t lo, Py_ssize_t hi,
                     const Coef *c) noexcept nogil:
    # g = -grad if maximize; L2: g += wd*p; decoupled: p *= 1 - lr*wd
    # m = b1*m + (1-b1)*g;  v = b2*v + (1-b2)*g*g;  amsgrad: vmax = max(vmax, v)
    # p -= (lr/bc1) * m / (sqrt(v)/sqrt(bc2) + eps)
    cdef floating sign = -1 if c.maximize else 1
    cdef floating wd = <floating>c.weight_decay, decay = <floating>c.decay
    cdef floating b1 = <floating>c.beta1, cb1 = <floating>c.one_minus_beta1
    cdef floating b2 = <floating>c.beta2, cb2 = <floating>c.one_minus_beta2
    cdef floating step_size = <floating>c.step_size
    cdef floating bc2s = <floating>c.bias_correction2_sqrt, eps = <floating>c.eps
    cdef bint l2 = c.l2, ams = c.amsgrad
    cdef floating gi, mi, vi, vm
    cdef Py_ssize_t i
    for i in range(lo, hi):
        gi = sign * g[i]
        if l2:
            gi = gi + wd * p[i]
        mi = b1 * m[i] + cb1 * gi
        vi = b2 * v[i] + cb2 * (gi * gi)
        m[i] = mi
        v[i] = vi
        if ams:
            vm = vmax[i]
            # torch.maximum: NaN in either operand gives NaN.  `|`, not `or`:
            # a short-circuit branch here keeps the loop from vectorizing.
            vi = vi if ((vi >= vm) | (vi != vi)) else vm
            vmax[i] = vi
        p[i] = p[i] * decay - step_size * mi / (fsqrt(vi) / bc2s + eps)


cdef void rmsprop_range(floating *p, const floating *g, floating *sq, floating *buf,
                        floating *gavg, Py_ssize_t lo, Py_ssize_t hi,
                        const Coef *c) noexcept nogil:
    # One loop testing `centered` and `momentum` (which decide the optional
    # arrays read and written) did not vectorize except with both on: gcc
    # stops unswitching a body this size.  With constant flags each inlined
    # copy vectorizes (10-60x faster on float32).
    if c.centered:
        if c.momentum:
            rmsprop_loop(p, g, sq, buf, gavg, lo, hi, c, True, True)
        else:
            rmsprop_loop(p, g, sq, buf, gavg, lo, hi, c, True, False)
    elif c.momentum:
        rmsprop_loop(p, g, sq, buf, gavg, lo, hi, c, False, True)
    else:
        rmsprop_loop(p, g, sq, buf, gavg, lo, hi, c, False, False)


cdef inline void rmsprop_loop(floating *p, const floating *g, floating *sq, floating *buf,
                              floating *gavg, Py_ssize_t lo, Py_ssize_t hi, const Coef *c,
                              const bint centered, const bint mom) noexcept nogil:
    # v = a*v + (1-a)*g*g;  centered: gbar = a*gbar + (1-a)*g, avg = sqrt(v - gbar^2)
    # else avg = sqrt(v);  avg += eps
    # momentum: b = mu*b + g/avg, p -= lr*b;  else p -= lr*g/avg
    cdef floating sign = -1 if c.maximize else 1
    cdef floating wd = <floating>c.weight_decay, lr = <floating>c.lr, eps = <floating>c.eps
    cdef floating a = <floating>c.alpha, ca = <floating>c.one_minus_alpha, mu = <floating>c.mu
    cdef bint l2 = c.l2
    cdef floating gi, vi, ga, avg, b
    cdef Py_ssize_t i
    for i in range(lo, hi):
        gi = sign * g[i]
        if l2:
            gi = gi + wd * p[i]
        vi = a * sq[i] + ca * (gi * gi)
        sq[i] = vi
        if centered:
            ga = a * gavg[i] + ca * gi
            gavg[i] = ga
            avg = fsqrt(vi - ga * ga) + eps
        else:
            avg = fsqrt(vi) + eps
        if mom:
            b = mu * buf[i] + gi / avg
            buf[i] = b
            p[i] = p[i] - lr * b
        else:
            p[i] = p[i] - lr * (gi / avg)


cdef void sgd_range(floating *p, const floating *g, floating *buf,
                    Py_ssize_t lo, Py_ssize_t hi, const Coef *c) noexcept nogil:
    # g += wd*p;  momentum: b = g at the first step, else b = mu*b + (1-dampening)*g;
    # g = g + mu*b (nesterov) or g = b;  p -= lr*g
    cdef floating sign = -1 if c.maximize else 1
    cdef floating wd = <floating>c.weight_decay, lr = <floating>c.lr
    cdef floating mu = <floating>c.mu, damp1 = <floating>c.one_minus_dampening
    cdef bint l2 = c.l2, mom = c.momentum, nesterov = c.nesterov, first = c.first
    cdef floating gi, b
    cdef Py_ssize_t i
    for i in range(lo, hi):
        gi = sign * g[i]
        if l2:
            gi = gi + wd * p[i]
        if mom:
            if first:
                b = gi
            else:
                b = mu * buf[i] + damp1 * gi
            buf[i] = b
            if nesterov:
                gi = gi + mu * b
            else:
                gi = b
        p[i] = p[i] - lr * gi


cdef inline void segment_range(const Segment *s, Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    """Update elements [lo, hi) of one segment."""
    cdef int kind = s.coef.kind
    if s.is_double:
        if kind == ADAM:
            adam_range(<double *>s.param, <const double *>s.grad, <double *>s.s1,
                       <double *>s.s2, <double *>s.s3, lo, hi, s.coef)
        elif kind == RMSPROP:
            rmsprop_range(<double *>s.param, <const double *>s.grad, <double *>s.s1,
                          <double *>s.s2, <double *>s.s3, lo, hi, s.coef)
        else:
            sgd_range(<double *>s.param, <const double *>s.grad, <double *>s.s1, lo, hi, s.coef)
    else:
        if kind == ADAM:
            adam_range(<float *>s.param, <const float *>s.grad, <float *>s.s1,
                       <float *>s.s2, <float *>s.s3, lo, hi, s.coef)
        elif kind == RMSPROP:
            rmsprop_range(<float *>s.param, <const float *>s.grad, <float *>s.s1,
                          <float *>s.s2, <float *>s.s3, lo, hi, s.coef)
        else:
            sgd_range(<float *>s.param, <const float *>s.grad, <float *>s.s1, lo, hi, s.coef)


cdef void run_segments(const Segment *segs, Py_ssize_t nseg, Py_ssize_t total) noexcept nogil:
    """Update every segment; one parallel region, elements split evenly."""
    cdef Py_ssize_t k, lo, hi, a, b, nbytes = 0
    for k in range(nseg):
        nbytes += segs[k].n * (8 if segs[k].is_double else 4)
    cdef int nt = threads_for(nbytes, GRAIN)
    if nt == 1:
        for k in range(nseg):
            segment_range(&segs[k], 0, segs[k].n)
        return
    with parallel(num_threads=nt):
        split(total, omp_get_num_threads(), threadid(), ALIGN, &lo, &hi)
        # Segments are sorted by offset: skip those that end before lo.
        k = 0
        while k < nseg and segs[k].offset + segs[k].n <= lo:
            k = k + 1
        while k < nseg and segs[k].offset < hi:
            a = max(lo - segs[k].offset, 0)
            b = min(hi - segs[k].offset, segs[k].n)
            if a < b:
                segment_range(&segs[k], a, b)
            k = k + 1


# ----------------------------------------------------- coefficient set-up ---

cdef inline void adam_coef(Coef *c, double lr, double beta1, double beta2, double eps,
                           double weight_decay, bint decoupled, bint amsgrad,
                           bint maximize, double step) noexcept nogil:
    c.kind = ADAM
    c.lr = lr
    c.eps = eps
    c.maximize = maximize
    c.amsgrad = amsgrad
    c.weight_decay = weight_decay
    c.l2 = weight_decay != 0 and not decoupled
    c.decay = 1.0 - lr * weight_decay if decoupled else 1.0
    c.beta1 = beta1
    c.one_minus_beta1 = 1.0 - beta1
    c.beta2 = beta2
    c.one_minus_beta2 = 1.0 - beta2
    c.step_size = lr / (1.0 - pow(beta1, step))
    c.bias_correction2_sqrt = sqrt(1.0 - pow(beta2, step))


cdef inline void rmsprop_coef(Coef *c, double lr, double alpha, double eps,
                              double weight_decay, double momentum, bint centered,
                              bint maximize) noexcept nogil:
    c.kind = RMSPROP
    c.lr = lr
    c.eps = eps
    c.maximize = maximize
    c.weight_decay = weight_decay
    c.l2 = weight_decay != 0
    c.alpha = alpha
    c.one_minus_alpha = 1.0 - alpha
    c.centered = centered
    c.mu = momentum
    c.momentum = momentum > 0


cdef inline void sgd_coef(Coef *c, double lr, double momentum, double dampening,
                          bint nesterov, double weight_decay, bint maximize,
                          bint first) noexcept nogil:
    c.kind = SGD
    c.lr = lr
    c.maximize = maximize
    c.weight_decay = weight_decay
    c.l2 = weight_decay != 0
    c.mu = momentum
    c.momentum = momentum != 0
    c.one_minus_dampening = 1.0 - dampening
    c.nesterov = nesterov
    c.first = first


cdef inline void fill_segment(Segment *s, cnp.ndarray param, cnp.ndarray grad, object s1,
                              object s2, object s3, const Coef *c):
    s.param = cnp.PyArray_DATA(param)
    s.grad = cnp.PyArray_DATA(grad)
    s.s1 = cnp.PyArray_DATA(<cnp.ndarray>s1) if s1 is not None else NULL
    s.s2 = cnp.PyArray_DATA(<cnp.ndarray>s2) if s2 is not None else NULL
    s.s3 = cnp.PyArray_DATA(<cnp.ndarray>s3) if s3 is not None else NULL
    s.n = cnp.PyArray_SIZE(param)
    s.offset = 0
    s.is_double = cnp.PyArray_TYPE(param) == cnp.NPY_FLOAT64
    s.coef = c


cdef inline cnp.ndarray state_array(object a, str name, cnp.ndarray param):
    """An optimizer state array: like `param`, updatable in place."""
    return writable(like(a, name, param, "param"), name)


cdef inline double step_count(object step) except -1.0:
    if isinstance(step, (bool, float)) or not hasattr(step, "__index__"):
        raise TypeError(f"step must be an integer >= 1, got {step!r}")
    cdef object k = step.__index__()
    if k < 1:
        raise ValueError(f"step must be >= 1, got {k}")
    return <double>k


# ----------------------------------------------------------- functional API ---

cdef _adam(param, grad, exp_avg, exp_avg_sq, step, lr, betas, eps, weight_decay,
           bint decoupled, bint amsgrad, max_exp_avg_sq, bint maximize):
    cdef cnp.ndarray p = writable(float_array(param, "param"), "param")
    cdef cnp.ndarray g = readable(like(grad, "grad", p, "param"))
    cdef cnp.ndarray m = state_array(exp_avg, "exp_avg", p)
    cdef cnp.ndarray v = state_array(exp_avg_sq, "exp_avg_sq", p)
    cdef object vmax = None
    if amsgrad:
        if max_exp_avg_sq is None:
            raise ValueError("amsgrad=True requires max_exp_avg_sq (an array like param)")
        vmax = state_array(max_exp_avg_sq, "max_exp_avg_sq", p)
    cdef double k = step_count(step)
    cdef double lr_ = at_least(lr, "lr", 0.0)
    if not isinstance(betas, tuple) or len(<tuple>betas) != 2:
        raise TypeError(f"betas must be a tuple of two numbers, got {betas!r}")
    cdef double b1 = in_unit((<tuple>betas)[0], "betas[0]")
    cdef double b2 = in_unit((<tuple>betas)[1], "betas[1]")
    cdef double eps_ = at_least(eps, "eps", 0.0)
    cdef double wd = at_least(weight_decay, "weight_decay", 0.0)
    check_disjoint([p, g, m, v, vmax], ("param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"))
    cdef Coef c
    cdef Segment s
    adam_coef(&c, lr_, b1, b2, eps_, wd, decoupled, amsgrad, maximize, k)
    fill_segment(&s, p, g, m, v, vmax, &c)
    with nogil:
        run_segments(&s, 1, s.n)


def adam_step(param, grad, exp_avg, exp_avg_sq, *, step, lr=1e-3, betas=(0.9, 0.999),
              eps=1e-8, weight_decay=0.0, decoupled_weight_decay=False, amsgrad=False,
              max_exp_avg_sq=None, maximize=False):
    """One Adam update of `param`, in place, in a single fused pass.

    Follows ``torch.optim.Adam``.  With g the gradient (negated if `maximize`)::

        g += weight_decay * param            # L2 (decoupled_weight_decay=False)
        param *= 1 - lr * weight_decay       # AdamW (decoupled_weight_decay=True)
        exp_avg    = beta1 * exp_avg    + (1 - beta1) * g
        exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * g * g
        max_exp_avg_sq = max(max_exp_avg_sq, exp_avg_sq)  # amsgrad; used below
        param -= lr / (1 - beta1**step) * exp_avg
                 / (sqrt(exp_avg_sq) / sqrt(1 - beta2**step) + eps)

    Parameters
    ----------
    param : ndarray, float32 or float64, C-contiguous, writeable
        Updated in place.
    grad : ndarray
        Same shape and dtype as `param` (read only; may be non-contiguous).
    exp_avg, exp_avg_sq : ndarray
        First and second moment estimates, like `param`; updated in place.
        Start them at zero.
    step : int
        1 for the first update (bias corrections use it).
    lr, betas, eps, weight_decay, decoupled_weight_decay, amsgrad, maximize
        As in ``torch.optim.Adam``.
    max_exp_avg_sq : ndarray, optional
        Required when `amsgrad` is True; like `param`, updated in place.

    Returns
    -------
    None
    """
    _adam(param, grad, exp_avg, exp_avg_sq, step, lr, betas, eps, weight_decay,
          decoupled_weight_decay, amsgrad, max_exp_avg_sq, maximize)


def adamw_step(param, grad, exp_avg, exp_avg_sq, *, step, lr=1e-3, betas=(0.9, 0.999),
               eps=1e-8, weight_decay=1e-2, amsgrad=False, max_exp_avg_sq=None,
               maximize=False):
    """One AdamW update: `adam_step` with decoupled weight decay (default 1e-2).

    Follows ``torch.optim.AdamW``: ``param *= 1 - lr * weight_decay`` before the
    Adam update.  See `adam_step` for the parameters.
    """
    _adam(param, grad, exp_avg, exp_avg_sq, step, lr, betas, eps, weight_decay,
          True, amsgrad, max_exp_avg_sq, maximize)


def rmsprop_step(param, grad, square_avg, *, lr=1e-2, alpha=0.99, eps=1e-8,
                 weight_decay=0.0, momentum=0.0, momentum_buffer=None, centered=False,
                 grad_avg=None, maximize=False):
    """One RMSprop update of `param`, in place, in a single fused pass.

    Follows ``torch.optim.RMSprop``.  With g the gradient (negated if `maximize`)::

        g += weight_decay * param
        square_avg = alpha * square_avg + (1 - alpha) * g * g
        grad_avg   = alpha * grad_avg   + (1 - alpha) * g        # centered
        avg = sqrt(square_avg - grad_avg**2) if centered else sqrt(square_avg)
        avg += eps
        momentum_buffer = momentum * momentum_buffer + g / avg   # momentum > 0
        param -= lr * momentum_buffer     (momentum > 0)
        param -= lr * g / avg             (otherwise)

    `square_avg`, `momentum_buffer` and `grad_avg` are arrays like `param`,
    updated in place (start them at zero); `momentum_buffer` is required when
    momentum > 0 and `grad_avg` when `centered`.

    Returns
    -------
    None
    """
    cdef cnp.ndarray p = writable(float_array(param, "param"), "param")
    cdef cnp.ndarray g = readable(like(grad, "grad", p, "param"))
    cdef cnp.ndarray sq = state_array(square_avg, "square_avg", p)
    cdef double lr_ = at_least(lr, "lr", 0.0)
    cdef double a = in_unit(alpha, "alpha")
    cdef double eps_ = at_least(eps, "eps", 0.0)
    cdef double wd = at_least(weight_decay, "weight_decay", 0.0)
    cdef double mu = at_least(momentum, "momentum", 0.0)
    cdef object buf = None, gavg = None
    if mu > 0:
        if momentum_buffer is None:
            raise ValueError("momentum > 0 requires momentum_buffer (an array like param)")
        buf = state_array(momentum_buffer, "momentum_buffer", p)
    if centered:
        if grad_avg is None:
            raise ValueError("centered=True requires grad_avg (an array like param)")
        gavg = state_array(grad_avg, "grad_avg", p)
    check_disjoint([p, g, sq, buf, gavg], ("param", "grad", "square_avg", "momentum_buffer", "grad_avg"))
    cdef Coef c
    cdef Segment s
    rmsprop_coef(&c, lr_, a, eps_, wd, mu, centered, maximize)
    fill_segment(&s, p, g, sq, buf, gavg, &c)
    with nogil:
        run_segments(&s, 1, s.n)


def sgd_step(param, grad, momentum_buffer=None, *, lr, momentum=0.0, dampening=0.0,
             nesterov=False, weight_decay=0.0, maximize=False, first_step=False):
    """One SGD update of `param`, in place, in a single fused pass.

    Follows ``torch.optim.SGD``.  With g the gradient (negated if `maximize`)::

        g += weight_decay * param
        b = g                                     # momentum > 0, first step
        b = momentum * b + (1 - dampening) * g    # momentum > 0, later steps
        g = g + momentum * b if nesterov else b
        param -= lr * g

    The course's Momentum ``v = beta*v + (1 - beta)*dW`` is
    ``momentum=beta, dampening=beta``.

    Parameters
    ----------
    momentum_buffer : ndarray, optional
        Like `param`, updated in place; required when momentum > 0.
    first_step : bool
        True on the first update of `momentum_buffer`: it is then set to g,
        as torch.optim.SGD does when it creates the buffer.

    Returns
    -------
    None
    """
    cdef cnp.ndarray p = writable(float_array(param, "param"), "param")
    cdef cnp.ndarray g = readable(like(grad, "grad", p, "param"))
    cdef double lr_ = at_least(lr, "lr", 0.0)
    cdef double mu = at_least(momentum, "momentum", 0.0)
    cdef double damp = real(dampening, "dampening")
    cdef double wd = at_least(weight_decay, "weight_decay", 0.0)
    if not (0.0 <= damp <= 1.0):
        raise ValueError(f"dampening must be in [0, 1], got {damp!r}")
    if nesterov and (mu <= 0 or damp != 0):
        raise ValueError("nesterov=True requires momentum > 0 and dampening == 0")
    cdef object buf = None
    if mu > 0:
        if momentum_buffer is None:
            raise ValueError("momentum > 0 requires momentum_buffer (an array like param)")
        buf = state_array(momentum_buffer, "momentum_buffer", p)
    check_disjoint([p, g, buf], ("param", "grad", "momentum_buffer"))
    cdef Coef c
    cdef Segment s
    sgd_coef(&c, lr_, mu, damp, nesterov, wd, maximize, first_step)
    fill_segment(&s, p, g, buf, None, None, &c)
    with nogil:
        run_segments(&s, 1, s.n)
