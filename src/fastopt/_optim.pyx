# Fused in-place optimizer updates: Adam/AdamW, RMSprop, SGD with momentum,
# Adagrad, Adamax, NAdam, RAdam, Adadelta, ASGD, Rprop and Lion; Adafactor.
#
# Design
# ------
# * Two layers: this module (compiled once) checks, plans and owns
#   FusedStep; the loops are in the kernel core (_core_optim.pxi.tp, compiled
#   per SIMD level), reached through the table `core.optim` (_core.pxd).
# * `*_range` functions update elements [lo, hi) of one parameter array and
#   its state in a single pass (one read of every array, one write of every
#   updated array, no temporaries).  They are `noexcept nogil`, written once
#   in a Tempita template and generated for each variant of VARIANTS, the
#   table of the element types and storages that exist, and branch only on
#   loop-invariant options.
# * A `Segment` describes one parameter array with its gradient, state and
#   precomputed coefficients.  `run_segments` updates a list of segments as
#   one job of fixed chunks of the *total* element count (a chunk may span
#   several arrays), spread over threads, so a model's many small arrays cost
#   one native call.  Elementwise work: results do not
#   depend on the thread count.
# * Scalars (bias corrections, step size) are computed in double once per
#   segment and cast to the array's dtype, as PyTorch's fused kernels do.
# * Low precision (_half.pxi): the gradient may be stored as float16 or
#   bfloat16, the state as bfloat16 (rounded to nearest, or stochastically),
#   and a float16/bfloat16 parameter is a float32 master copy (the `param` of
#   the kernels) plus its rounded copy (`out`), written in the same pass.
#   Computation is in float32 whatever the storage.  The storage is a
#   compile-time tag of each loop variant (`segment_range` picks it), so
#   every variant is the same formulas, vectorized; a float16 parameter's
#   gradient and copy are converted a block at a time instead (`half_blocks`),
#   and so is a bfloat16 one for the kinds after Adam, RMSprop and SGD.
# * Loss scaling: the gradient is multiplied by 1/grad_scale (rounded to the
#   compute type once per step) as it is read; `g *= 1` when there is none,
#   which changes no bit.  The inf/NaN check that must precede a scaled step
#   is a `CHECK` segment kind run by the same `run_segments` over the grads.
# * The `def` functions validate everything before `nogil` and never let the
#   kernels see a bad array; nothing is written when a check fails.
include "_common.pxi"

from libc.math cimport fabs, pow, sqrt, INFINITY, NAN
from cpython.mem cimport PyMem_Malloc, PyMem_Free
from libc.stdint cimport INT64_MAX, uint16_t, uint32_t, uint64_t

cdef extern from "_half.h" nogil:
    uint32_t fastopt_hash32(uint32_t x)     # the keys of stochastic rounding

# ----------------------------------------------------- coefficient set-up ---

cdef inline void adam_coef(Coef *c, double lr, double beta1, double beta2, double eps,
                           double weight_decay, bint decoupled, bint amsgrad,
                           bint maximize, double step) noexcept nogil:
    c.kind = ADAM
    c.inv_scale = 1.0
    c.found = NULL
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
    c.inv_scale = 1.0
    c.found = NULL
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
    c.inv_scale = 1.0
    c.found = NULL
    c.lr = lr
    c.maximize = maximize
    c.weight_decay = weight_decay
    c.l2 = weight_decay != 0
    c.mu = momentum
    c.momentum = momentum != 0
    c.one_minus_dampening = 1.0 - dampening
    c.nesterov = nesterov
    c.first = first


# The kinds below follow torch.optim's single-tensor code: each scalar is
# computed as torch computes it in Python (double, the same operations in
# the same order; x**y is pow), once per step.

cdef inline void kind_coef(Coef *c, int kind, double lr, double weight_decay, bint l2,
                           bint maximize) noexcept nogil:
    """The fields every kind sets."""
    c.kind = kind
    c.inv_scale = 1.0
    c.found = NULL
    c.lr = lr
    c.weight_decay = weight_decay
    c.l2 = l2 and weight_decay != 0
    c.maximize = maximize
    c.decay = 1.0


cdef inline void adagrad_coef(Coef *c, double lr, double lr_decay, double weight_decay,
                              double eps, bint maximize, double step) noexcept nogil:
    kind_coef(c, ADAGRAD, lr, weight_decay, True, maximize)
    c.eps = eps
    c.step_size = lr / (1.0 + (step - 1.0) * lr_decay)     # torch's clr


cdef inline void adamax_coef(Coef *c, double lr, double beta1, double beta2, double eps,
                             double weight_decay, bint maximize, double step) noexcept nogil:
    kind_coef(c, ADAMAX, lr, weight_decay, True, maximize)
    c.eps = eps
    c.one_minus_beta1 = 1.0 - beta1
    c.beta2 = beta2
    c.step_size = lr / (1.0 - pow(beta1, step))


cdef inline double nadam_coef(Coef *c, double lr, double beta1, double beta2, double eps,
                              double weight_decay, double momentum_decay, bint decoupled,
                              bint maximize, double step, double mu_product,
                              bint single=True) noexcept nogil:
    """Returns the new mu_product.  torch keeps mu_product as a float32
    tensor: `mu_product *= mu` is a float32 product of float32 operands."""
    kind_coef(c, NADAM, lr, weight_decay, not decoupled, maximize)
    if decoupled:
        c.decay = 1.0 - lr * weight_decay
    c.eps = eps
    c.one_minus_beta1 = 1.0 - beta1
    c.beta2 = beta2
    c.one_minus_beta2 = 1.0 - beta2
    c.bias_correction2 = 1.0 - pow(beta2, step)
    cdef double mu = beta1 * (1.0 - 0.5 * pow(0.96, step * momentum_decay))
    cdef double mu_next = beta1 * (1.0 - 0.5 * pow(0.96, (step + 1.0) * momentum_decay))
    if single:
        mu_product = <double>(<float>mu_product * <float>mu)
    else:                   # (torch under set_default_dtype(torch.float64))
        mu_product = mu_product * mu
    c.grad_coef = lr * (1.0 - mu) / (1.0 - mu_product)
    c.avg_coef = lr * mu_next / (1.0 - mu_product * mu_next)
    return mu_product


cdef inline void radam_coef(Coef *c, double lr, double beta1, double beta2, double eps,
                            double weight_decay, bint decoupled, bint maximize,
                            double step) noexcept nogil:
    kind_coef(c, RADAM, lr, weight_decay, not decoupled, maximize)
    if decoupled:
        c.decay = 1.0 - lr * weight_decay
    c.eps = eps
    c.one_minus_beta1 = 1.0 - beta1
    c.beta2 = beta2
    c.one_minus_beta2 = 1.0 - beta2
    c.bias_correction1 = 1.0 - pow(beta1, step)
    cdef double bc2 = 1.0 - pow(beta2, step)
    c.bias_correction2_sqrt = pow(bc2, 0.5)
    # the length of the approximated SMA, and its maximum
    cdef double rho_inf = 2.0 / (1.0 - beta2) - 1.0
    cdef double rho_t = rho_inf - 2.0 * step * pow(beta2, step) / bc2
    c.rectify = rho_t > 5.0
    c.rect = 1.0
    if c.rectify:
        c.rect = pow((rho_t - 4.0) * (rho_t - 2.0) * rho_inf
                     / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t), 0.5)


cdef inline void adadelta_coef(Coef *c, double lr, double rho, double eps, double weight_decay,
                               bint maximize) noexcept nogil:
    kind_coef(c, ADADELTA, lr, weight_decay, True, maximize)
    c.eps = eps
    c.alpha = rho
    c.one_minus_alpha = 1.0 - rho


cdef inline void asgd_coef(Coef *c, double lambd, double weight_decay, bint maximize,
                           double eta, double mu) noexcept nogil:
    """eta and mu: this parameter's values before the step."""
    kind_coef(c, ASGD, eta, weight_decay, True, maximize)
    c.eta = eta
    c.decay = 1.0 - lambd * eta
    c.mu = mu
    c.average = mu != 1.0


cdef extern from *:
    """
    /* (double)(float)x.  Through a volatile: gcc 12's SLP vectorizer (-O2 and
       up) drops two such roundings stored side by side, e.g.
       p[0] = (float)p[0]; p[1] = (float)p[1]; compiles to nothing. */
    static inline double fastopt_round_f32(double x) { volatile float f = (float)x; return f; }
    """
    double round_f32 "fastopt_round_f32"(double x) noexcept nogil


cdef inline void asgd_next(double *eta, double *mu, double lr, double lambd, double alpha,
                           double t0, double step, bint single=True) noexcept nogil:
    """eta and mu after step `step`, rounded to float32 (torch keeps them as
    float32 tensors)."""
    cdef double d = step - t0
    eta[0] = lr / pow(1.0 + lambd * lr * step, alpha)
    mu[0] = 1.0 / (d if d > 1.0 else 1.0)                  # 1 / max(1, step - t0)
    if single:
        eta[0] = round_f32(eta[0])
        mu[0] = round_f32(mu[0])


cdef inline void rprop_coef(Coef *c, double etaminus, double etaplus, double step_size_min,
                            double step_size_max, bint maximize) noexcept nogil:
    kind_coef(c, RPROP, 0.0, 0.0, False, maximize)
    c.etaminus = etaminus
    c.etaplus = etaplus
    c.step_size_min = step_size_min
    c.step_size_max = step_size_max


cdef inline void lion_coef(Coef *c, double lr, double beta1, double beta2, double weight_decay,
                           bint maximize) noexcept nogil:
    kind_coef(c, LION, lr, weight_decay, False, maximize)
    c.decay = 1.0 - lr * weight_decay
    c.beta1 = beta1
    c.one_minus_beta1 = 1.0 - beta1
    c.beta2 = beta2
    c.one_minus_beta2 = 1.0 - beta2


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
    s.out = NULL
    s.gk = s.sk = s.ok = NATIVE
    s.key = 0
    s.coef = c


cdef inline cnp.ndarray state_array(object a, str name, cnp.ndarray param,
                                    str param_name="param"):
    """An optimizer state array: like `param`, updatable in place."""
    return writable(like(a, name, param, param_name), name)


cdef cnp.ndarray master_array(cnp.ndarray p, object master):
    """The array a functional kernel updates: `p` (float32/float64), or the
    float32 master copy of a float16/bfloat16 `p` (then written into p)."""
    cdef int code = dtype_code(p)
    if code == DT_F32 or code == DT_F64:
        if master is not None:
            raise ValueError(f"master is only for float16/bfloat16 params, but param is {p.dtype}")
        return p
    if master is None:
        raise ValueError(f"a {p.dtype} param needs master, its float32 master copy "
                         "(an array like param, updated in place)")
    cdef cnp.ndarray w = writable(float_array(master, "master"), "master")
    if cnp.PyArray_TYPE(w) != cnp.NPY_FLOAT32:
        raise TypeError(f"master must have dtype float32, got {w.dtype}")
    if not same_shape(w, p):
        raise ValueError(f"master has shape {(<object>w).shape} but param has shape "
                         f"{(<object>p).shape}")
    return w


cdef cnp.ndarray grad_for(object grad, cnp.ndarray p, cnp.ndarray w):
    """The gradient of `p`: like p, or float32 for a float16/bfloat16 p."""
    if w is p:
        return like(grad, "grad", p, "param")
    cdef cnp.ndarray g = any_float_array(grad, "grad")
    if dtype_code(g) != dtype_code(p) and cnp.PyArray_TYPE(g) != cnp.NPY_FLOAT32:
        raise TypeError(f"grad has dtype {g.dtype} but param has dtype {p.dtype} (the "
                        f"gradient of a {p.dtype} param is {p.dtype} or float32)")
    if not same_shape(g, p):
        raise ValueError(f"grad has shape {(<object>g).shape} but param has shape "
                         f"{(<object>p).shape}")
    return g


cdef inline void half_param(Segment *s, cnp.ndarray p, cnp.ndarray w, cnp.ndarray g):
    """A segment over master `w` also writes the 16-bit `p` (and may read a 16-bit g)."""
    if w is not p:
        s.out = cnp.PyArray_DATA(p)
        s.ok = store_of(dtype_code(p))
        s.gk = store_of(dtype_code(g))


# A hyperparameter of an update computed in float32 (float32, float16 and
# bfloat16 parameters) must be a float32 number: the kernels cast it, and
# 1e300 would become inf and write infinities into the parameters.  (torch
# refuses such a scalar for a float32 tensor too: "value cannot be
# converted".)  The message is built only on failure.

cdef inline bint beyond_float32(double v) noexcept:
    return fabs(v) > 3.4028234663852886e38


cdef int too_large_for_float32(double v, str name, str updated) except -1:
    raise ValueError(f"{name} = {v!r} is too large for float32, the precision {updated} "
                     "updated in")


cdef inline double step_count(object step) except -1.0:
    """A step number in [1, 2**63 - 1] (int64, as PyTorch's state["step"])."""
    cdef object k = integer(step, "step")
    if k < 1:
        raise ValueError(f"step must be >= 1, got {k}")
    if k > INT64_MAX:
        raise ValueError(f"step must be at most 2**63 - 1, got {k}")
    return <double>k


# ----------------------------------------------------------- functional API ---

def adam_step(param, grad, exp_avg, exp_avg_sq, *, step, lr=1e-3, betas=(0.9, 0.999),
              eps=1e-8, weight_decay=0.0, decoupled_weight_decay=False, amsgrad=False,
              max_exp_avg_sq=None, maximize=False, master=None):
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
    param : ndarray, float32, float64, float16 or bfloat16, C-contiguous, aligned, writeable
        Updated in place; native byte order; float16/bfloat16 through `master`.
    grad : ndarray
        Same shape and dtype as `param`, or float32 for a float16/bfloat16
        param; read only, so it may be non-contiguous, unaligned or
        byte-swapped (then it is copied first).  Must not overlap any array
        that is written.
    exp_avg, exp_avg_sq : ndarray
        First and second moment estimates, like `param` (float32 for a
        float16/bfloat16 param); updated in place.  Start them at zero.
    step : int
        1 for the first update (bias corrections use it); at most 2**63 - 1.
    lr, betas, eps, weight_decay, decoupled_weight_decay, amsgrad, maximize
        As in ``torch.optim.Adam``.
    max_exp_avg_sq : ndarray, optional
        Required when `amsgrad` is True; like `exp_avg`, updated in place.
    master : ndarray, float32, optional
        Required for a float16/bfloat16 `param`: its float32 master copy
        (start it at ``param.astype(np.float32)``).  The update is computed
        on `master` in float32 and `param` is written from it, rounded to
        nearest even, in the same pass.

    Returns
    -------
    None
    """
    functional(ADAM, param, grad, master, (exp_avg, exp_avg_sq, max_exp_avg_sq), step_count(step),
               dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                    maximize=maximize, decoupled_weight_decay=decoupled_weight_decay))


def adamw_step(param, grad, exp_avg, exp_avg_sq, *, step, lr=1e-3, betas=(0.9, 0.999),
               eps=1e-8, weight_decay=1e-2, amsgrad=False, max_exp_avg_sq=None,
               maximize=False, master=None):
    """One AdamW update: `adam_step` with decoupled weight decay (default 1e-2).

    Follows ``torch.optim.AdamW``: ``param *= 1 - lr * weight_decay`` before the
    Adam update.  See `adam_step` for the parameters.
    """
    functional(ADAM, param, grad, master, (exp_avg, exp_avg_sq, max_exp_avg_sq), step_count(step),
               dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                    maximize=maximize, decoupled_weight_decay=True))


def rmsprop_step(param, grad, square_avg, *, lr=1e-2, alpha=0.99, eps=1e-8,
                 weight_decay=0.0, momentum=0.0, momentum_buffer=None, centered=False,
                 grad_avg=None, maximize=False, master=None):
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
    momentum > 0 and `grad_avg` when `centered`.  Arrays as in `adam_step`:
    the updated ones native, C-contiguous, aligned and writeable; `grad` any
    layout and byte order.  A float16/bfloat16 `param` needs `master`, as in
    `adam_step` (the state is then float32).

    Returns
    -------
    None
    """
    functional(RMSPROP, param, grad, master, (square_avg, momentum_buffer, grad_avg), 1.0,
               dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum,
                    centered=centered, maximize=maximize))


def sgd_step(param, grad, momentum_buffer=None, *, lr, momentum=0.0, dampening=0.0,
             nesterov=False, weight_decay=0.0, maximize=False, first_step=False, master=None):
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
        (Arrays as in `adam_step`: `param` and the state native, C-contiguous,
        aligned and writeable; `grad` any layout and byte order.)
    first_step : bool
        True on the first update of `momentum_buffer`: it is then set to g,
        as torch.optim.SGD does when it creates the buffer.
    master : ndarray, float32, optional
        Required for a float16/bfloat16 `param`, as in `adam_step`.

    Returns
    -------
    None
    """
    # (the coefficients take the buffer's first update as step 1)
    functional(SGD, param, grad, master, (momentum_buffer, None, None),
               1.0 if first_step else 2.0,
               dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                    nesterov=nesterov, maximize=maximize))


# ------------------------------------------ Adagrad, Adamax ... Lion ---
# The functional kernels of these kinds share the helpers below.  Their
# per-parameter scalar state (NAdam's mu_product, ASGD's eta and mu) goes in
# as keyword numbers and the new values are returned: torch.optim keeps them
# as float32 tensors, so they are float32 numbers here too (the values given
# are rounded to float32, those returned are float32 values).

ctypedef struct StateStore:
    int sk              # Store code of the state arrays (NATIVE; BF16, BF16_SR: `_stored_step`)
    uint32_t key        # BF16_SR: element i draws hash32(key + i)
    double inv_scale    # the gradient is multiplied by it as it is read


# What a call of these kernels uses; only `_stored_step` changes it, for the
# length of one call.
cdef StateStore _store
_store.sk = NATIVE
_store.key = 0
_store.inv_scale = 1.0


cdef tuple update_arrays(object param, object grad, object master):
    """(param, the array the kernel updates: param or its float32 master, that
    array's name, grad), checked."""
    cdef cnp.ndarray p = writable(any_float_array(param, "param"), "param")
    cdef cnp.ndarray w = master_array(p, master)
    return p, w, ("param" if w is p else "master"), grad_for(grad, p, w)


cdef cnp.ndarray kind_state(object a, str name, cnp.ndarray w, str wname):
    """A state array: like `w` (bfloat16 under `_stored_step`)."""
    if _store.sk == NATIVE:
        return state_array(a, name, w, wname)
    cdef cnp.ndarray arr = writable(any_float_array(a, name), name)
    if dtype_code(arr) != DT_BF16 or cnp.PyArray_TYPE(w) != cnp.NPY_FLOAT32:
        raise TypeError(f"{name} has dtype {arr.dtype}: bfloat16 state needs a float32 {wname} "
                        f"and bfloat16 state arrays, but {wname} has dtype {w.dtype}")
    if not same_shape(arr, w):
        raise ValueError(f"{name} has shape {(<object>arr).shape} but {wname} has shape "
                         f"{(<object>w).shape}")
    return arr


cdef double float32_state(object x, str name, double lo, double hi) except? -1.0:
    """A per-parameter scalar kept in float32: a number in [lo, hi], rounded."""
    cdef double v = real(x, name)
    if not (lo <= v <= hi):
        raise ValueError(f"{name} must be " + (f">= {lo:g}" if hi == INFINITY else
                                               f"in [{lo:g}, {hi:g}]") + f", got {v!r}")
    if beyond_float32(v):
        raise ValueError(f"{name} = {v!r} is too large for float32, the precision it is kept in")
    return round_f32(v)


cdef int run_kind(cnp.ndarray p, cnp.ndarray w, cnp.ndarray g, list states, tuple names,
                  Coef *c) except -1:
    """Check that no two arrays overlap, then update `w` (and a 16-bit `p`)
    and its state arrays (3 slots, None where absent) in one threaded pass."""
    cdef Segment s
    check_disjoint([p, g, *states, None if w is p else w],
                   ("param", "grad") + names + ("master",))
    g = readable(g)
    c.inv_scale = _store.inv_scale
    fill_segment(&s, w, g, states[0], states[1], states[2], c)
    half_param(&s, p, w, g)
    s.sk = _store.sk
    s.key = _store.key
    with nogil:
        core.optim.run_segments(&s, 1, s.n)
    return 0


def adagrad_step(param, grad, sum, *, step, lr=1e-2, lr_decay=0.0, weight_decay=0.0,
                 eps=1e-10, maximize=False, master=None):
    """One Adagrad update of `param`, in place, in a single fused pass.

    Follows ``torch.optim.Adagrad``.  With g the gradient (negated if `maximize`)::

        g += weight_decay * param
        clr = lr / (1 + (step - 1) * lr_decay)
        sum += g * g
        param -= clr * g / (sqrt(sum) + eps)

    Parameters
    ----------
    param, grad, master
        As in `adam_step`: `param` float32/float64 (float16/bfloat16 through
        its float32 `master`), updated in place; `grad` like param (float32
        for a 16-bit param), any layout and byte order.
    sum : ndarray
        The sum of the squared gradients, like `param` (float32 for a
        float16/bfloat16 param); updated in place.  Start it at torch's
        `initial_accumulator_value` (0 by default).
    step : int
        1 for the first update (`lr_decay` uses it); at most 2**63 - 1.
    lr, lr_decay, weight_decay, eps, maximize
        As in ``torch.optim.Adagrad``.

    Returns
    -------
    None
    """
    functional(ADAGRAD, param, grad, master, (sum, None, None), step_count(step),
               dict(lr=lr, lr_decay=lr_decay, weight_decay=weight_decay, eps=eps,
                    maximize=maximize))


def adamax_step(param, grad, exp_avg, exp_inf, *, step, lr=2e-3, betas=(0.9, 0.999), eps=1e-8,
                weight_decay=0.0, maximize=False, master=None):
    """One Adamax update of `param`, in place, in a single fused pass.

    Follows ``torch.optim.Adamax``.  With g the gradient (negated if `maximize`)::

        g += weight_decay * param
        exp_avg = lerp(exp_avg, g, 1 - beta1)       # torch's lerp_
        exp_inf = maximum(beta2 * exp_inf, abs(g) + eps)
        param -= lr / (1 - beta1**step) * exp_avg / exp_inf

    Parameters
    ----------
    param, grad, master
        As in `adam_step`.
    exp_avg, exp_inf : ndarray
        The first moment and the exponentially weighted infinity norm, like
        `param` (float32 for a float16/bfloat16 param); updated in place.
        Start them at zero.
    step : int
        1 for the first update; at most 2**63 - 1.
    lr, betas, eps, weight_decay, maximize
        As in ``torch.optim.Adamax``.

    Returns
    -------
    None
    """
    functional(ADAMAX, param, grad, master, (exp_avg, exp_inf, None), step_count(step),
               dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, maximize=maximize))


def nadam_step(param, grad, exp_avg, exp_avg_sq, *, step, mu_product, lr=2e-3,
               betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, momentum_decay=4e-3,
               decoupled_weight_decay=False, maximize=False, master=None):
    """One NAdam update of `param`, in place, in a single fused pass; returns
    the new `mu_product`.

    Follows ``torch.optim.NAdam``.  With g the gradient (negated if `maximize`)::

        g += weight_decay * param              # decoupled_weight_decay=False
        param *= 1 - lr * weight_decay         # decoupled_weight_decay=True
        mu      = beta1 * (1 - 0.5 * 0.96**(step * momentum_decay))
        mu_next = beta1 * (1 - 0.5 * 0.96**((step + 1) * momentum_decay))
        mu_product *= mu                       # in float32
        exp_avg    = lerp(exp_avg, g, 1 - beta1)          # torch's lerp_
        exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * g * g
        denom = sqrt(exp_avg_sq / (1 - beta2**step)) + eps
        param -= lr * (1 - mu) / (1 - mu_product) * g / denom
        param -= lr * mu_next / (1 - mu_product * mu_next) * exp_avg / denom

    Parameters
    ----------
    param, grad, master
        As in `adam_step`.
    exp_avg, exp_avg_sq : ndarray
        First and second moment estimates, like `param` (float32 for a
        float16/bfloat16 param); updated in place.  Start them at zero.
    step : int
        1 for the first update; at most 2**63 - 1.
    mu_product : float
        The product of the momentum coefficients mu of the earlier steps:
        1.0 before the first update, then the value the previous call
        returned.  In [0, 1]; kept in float32 as torch keeps it (the value
        is rounded to float32).
    lr, betas, eps, weight_decay, momentum_decay, decoupled_weight_decay, maximize
        As in ``torch.optim.NAdam``.

    Returns
    -------
    float
        The new mu_product (a float32 value), for the next call.
    """
    cdef double sc[2]
    sc[0] = float32_state(mu_product, "mu_product", 0.0, 1.0)
    functional(NADAM, param, grad, master, (exp_avg, exp_avg_sq, None), step_count(step),
               dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                    momentum_decay=momentum_decay, decoupled_weight_decay=decoupled_weight_decay,
                    maximize=maximize), sc)
    return sc[0]


def radam_step(param, grad, exp_avg, exp_avg_sq, *, step, lr=1e-3, betas=(0.9, 0.999),
               eps=1e-8, weight_decay=0.0, decoupled_weight_decay=False, maximize=False,
               master=None):
    """One RAdam update of `param`, in place, in a single fused pass.

    Follows ``torch.optim.RAdam``.  With g the gradient (negated if `maximize`)::

        g += weight_decay * param              # decoupled_weight_decay=False
        param *= 1 - lr * weight_decay         # decoupled_weight_decay=True
        exp_avg    = lerp(exp_avg, g, 1 - beta1)          # torch's lerp_
        exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * g * g
        bc1, bc2 = 1 - beta1**step, 1 - beta2**step
        rho_inf = 2 / (1 - beta2) - 1
        rho_t = rho_inf - 2 * step * beta2**step / bc2
        if rho_t > 5:
            rect = sqrt((rho_t - 4) * (rho_t - 2) * rho_inf
                        / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
            param -= exp_avg / bc1 * lr * (sqrt(bc2) / (sqrt(exp_avg_sq) + eps)) * rect
        else:
            param -= exp_avg / bc1 * lr

    The branch is taken per step (`rho_t` depends only on `step` and beta2).

    Parameters
    ----------
    param, grad, master
        As in `adam_step`.
    exp_avg, exp_avg_sq : ndarray
        First and second moment estimates, like `param` (float32 for a
        float16/bfloat16 param); updated in place.  Start them at zero.
    step : int
        1 for the first update; at most 2**63 - 1.
    lr, betas, eps, weight_decay, decoupled_weight_decay, maximize
        As in ``torch.optim.RAdam``.

    Returns
    -------
    None
    """
    functional(RADAM, param, grad, master, (exp_avg, exp_avg_sq, None), step_count(step),
               dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                    decoupled_weight_decay=decoupled_weight_decay, maximize=maximize))


def adadelta_step(param, grad, square_avg, acc_delta, *, lr=1.0, rho=0.9, eps=1e-6,
                  weight_decay=0.0, maximize=False, master=None):
    """One Adadelta update of `param`, in place, in a single fused pass.

    Follows ``torch.optim.Adadelta``.  With g the gradient (negated if `maximize`)::

        g += weight_decay * param
        square_avg = rho * square_avg + (1 - rho) * g * g
        delta = sqrt(acc_delta + eps) / sqrt(square_avg + eps) * g
        acc_delta = rho * acc_delta + (1 - rho) * delta * delta
        param -= lr * delta

    Parameters
    ----------
    param, grad, master
        As in `adam_step`.
    square_avg, acc_delta : ndarray
        Running averages of the squared gradients and of the squared
        updates, like `param` (float32 for a float16/bfloat16 param);
        updated in place.  Start them at zero.
    lr, rho, eps, weight_decay, maximize
        As in ``torch.optim.Adadelta`` (`rho` in [0, 1]).

    Returns
    -------
    None
    """
    functional(ADADELTA, param, grad, master, (square_avg, acc_delta, None), 1.0,
               dict(lr=lr, rho=rho, eps=eps, weight_decay=weight_decay, maximize=maximize))


def asgd_step(param, grad, ax, *, step, eta, mu, lr=1e-2, lambd=1e-4, alpha=0.75, t0=1e6,
              weight_decay=0.0, maximize=False, master=None):
    """One ASGD update of `param` and its average `ax`, in place, in a single
    fused pass; returns the new `eta` and `mu`.

    Follows ``torch.optim.ASGD``.  With g the gradient (negated if `maximize`)::

        g += weight_decay * param
        param *= 1 - lambd * eta
        param -= eta * g
        ax += (param - ax) * mu        # ax = param where mu == 1
        eta = lr / (1 + lambd * lr * step)**alpha      # returned, in float32
        mu  = 1 / max(1, step - t0)                    # returned, in float32

    Parameters
    ----------
    param, grad, master
        As in `adam_step`.
    ax : ndarray
        The average of the parameter, like `param` (float32 for a
        float16/bfloat16 param); updated in place.  Start it at zero.
    step : int
        1 for the first update (the new eta and mu use it); at most 2**63 - 1.
    eta, mu : float
        The step size and the averaging weight: `lr` and 1.0 before the
        first update, then the values the previous call returned.  eta >= 0,
        mu in [0, 1]; kept in float32 as torch keeps them (the values are
        rounded to float32).
    lr, lambd, alpha, t0, weight_decay, maximize
        As in ``torch.optim.ASGD`` (`lambd`, `alpha` >= 0; `t0` any number).

    Returns
    -------
    (float, float)
        The new eta and mu (float32 values), for the next call.
    """
    cdef double sc[2]
    sc[0] = float32_state(eta, "eta", 0.0, INFINITY)
    sc[1] = float32_state(mu, "mu", 0.0, 1.0)
    functional(ASGD, param, grad, master, (ax, None, None), step_count(step),
               dict(lr=lr, lambd=lambd, alpha=alpha, t0=t0, weight_decay=weight_decay,
                    maximize=maximize), sc)
    return sc[0], sc[1]


def rprop_step(param, grad, prev, step_size, *, etas=(0.5, 1.2), step_sizes=(1e-6, 50),
               maximize=False, master=None):
    """One Rprop update of `param`, in place, in a single fused pass.

    Follows ``torch.optim.Rprop``.  With g the gradient (negated if `maximize`)
    and s = sign(g * prev), elementwise::

        step_size *= etaplus if s > 0, etaminus if s < 0, else 1
        step_size = clamp(step_size, step_size_min, step_size_max)
        g = 0 where s < 0
        param -= sign(g) * step_size
        prev = g

    As torch.sign, sign(NaN) is 0 (a NaN gradient leaves the parameter
    where it is).

    Parameters
    ----------
    param, grad, master
        As in `adam_step`.
    prev, step_size : ndarray
        The previous gradient and the per-element step sizes, like `param`
        (float32 for a float16/bfloat16 param); updated in place.  Start
        `prev` at zero and `step_size` at torch's `lr` (1e-2 by default).
    etas : (float, float)
        (etaminus, etaplus), 0 < etaminus < 1 < etaplus.
    step_sizes : (float, float)
        (step_size_min, step_size_max), each >= 0.
    maximize : bool

    Returns
    -------
    None
    """
    # (torch's lr is only where step_size starts: not an argument here)
    functional(RPROP, param, grad, master, (prev, step_size, None), 1.0,
               dict(etas=etas, step_sizes=step_sizes, maximize=maximize))


def lion_step(param, grad, exp_avg, *, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0,
              maximize=False, master=None):
    """One Lion update of `param`, in place, in a single fused pass.

    Lion (Chen et al., "Symbolic Discovery of Optimization Algorithms",
    2023; optax.lion), not in torch.optim.  With g the gradient (negated if
    `maximize`)::

        param *= 1 - lr * weight_decay
        param -= lr * sign(beta1 * exp_avg + (1 - beta1) * g)
        exp_avg = beta2 * exp_avg + (1 - beta2) * g

    sign(0) is 0; a NaN stays NaN (as jnp.sign), so a NaN gradient makes
    the parameter NaN.

    Parameters
    ----------
    param, grad, master
        As in `adam_step`.
    exp_avg : ndarray
        The momentum, like `param` (float32 for a float16/bfloat16 param);
        updated in place.  Start it at zero.
    lr : float
        >= 0 (1e-4 by default: Lion's steps have norm lr * sqrt(n), so it
        takes a rate 3-10x smaller than AdamW's).
    betas : (float, float)
        Each in [0, 1).
    weight_decay : float
        >= 0, decoupled.
    maximize : bool

    Returns
    -------
    None
    """
    functional(LION, param, grad, master, (exp_avg, None, None), 1.0,
               dict(lr=lr, betas=betas, weight_decay=weight_decay, maximize=maximize))


# Adafactor's units (FactorJob): a matrix is cut into blocks of at most
# FAC_COLS columns by as many rows as make about FAC_UNIT elements, a
# vector into chunks of FAC_UNIT elements.  The work arrays hold a double
# per unit, per row and column block: at most about an eighth of the
# parameter's elements.
DEF FAC_UNIT = 32768
DEF FAC_COLS = 4096


cdef cnp.ndarray factor_state(object a, str name, cnp.ndarray w, str wname, tuple shape):
    """Adafactor's row_var / col_var: w's dtype, the given shape, updatable in place."""
    cdef cnp.ndarray arr = writable(float_array(a, name), name)
    if cnp.PyArray_TYPE(arr) != cnp.PyArray_TYPE(w):
        raise TypeError(f"{name} has dtype {arr.dtype} but {wname} has dtype {w.dtype}")
    if (<object>arr).shape != shape:
        raise ValueError(f"{name} must have shape {shape} for a {wname} of shape "
                         f"{(<object>w).shape}, got {(<object>arr).shape}")
    return arr


def adafactor_step(param, grad, *, step, row_var=None, col_var=None, variance=None, lr=1e-2,
                   beta2_decay=-0.8, eps=(None, 1e-3), d=1.0, weight_decay=0.0, maximize=False,
                   master=None):
    """One Adafactor update of `param` and its second-moment statistics, in place.

    Follows ``torch.optim.Adafactor`` (Shazeer and Stern, 2018).  With g
    the gradient (negated if `maximize`) and n the number of elements::

        w = step**beta2_decay
        alpha = max(eps2, norm(param) / sqrt(n)) * min(lr, 1 / sqrt(step))
        param *= 1 - lr * weight_decay
        # param of 2 or more dimensions: B matrices of R x C (its last two axes)
        row_var = lerp(row_var, sum(g*g, axis=-1) / C, w)       # (..., R, 1)
        col_var = lerp(col_var, sum(g*g, axis=-2) / R, w)       # (..., 1, C)
        v = row_var * col_var / max(mean(row_var, axis=-2), eps1)
        # param of 0 or 1 dimension
        variance = lerp(variance, g*g, w)
        v = variance
        u = g / sqrt(max(v, eps1**2))
        param -= alpha / max(1, norm(u) / (sqrt(n) * d)) * u

    (`lerp` is torch's ``lerp_``.)  Not elementwise: three threaded passes (the
    norms and the row and column sums, in double, over blocks fixed by the
    shape and combined in a fixed order: the same bits on any number of
    threads), with a work area of a double per block row and column (at
    most about an eighth of the parameter's elements).

    Parameters
    ----------
    param, grad, master
        As in `adam_step` (a float16/bfloat16 param through its float32
        master: the update, and eps1, are float32's).
    step : int
        1 for the first update; at most 2**63 - 1.
    row_var, col_var : ndarray, optional
        For a param of 2 or more dimensions (and only then): the row and
        column statistics, of shapes ``param.shape[:-1] + (1,)`` and
        ``param.shape[:-2] + (1, param.shape[-1])``, the param's dtype
        (float32 for a float16/bfloat16 param); updated in place.  Start
        them at zero.
    variance : ndarray, optional
        For a param of 0 or 1 dimension (and only then): like `param`
        (float32 for a float16/bfloat16 param), updated in place.  Start it
        at zero.
    lr, beta2_decay, d, weight_decay, maximize
        As in ``torch.optim.Adafactor`` (`beta2_decay` <= 0, `d` >= 1).
    eps : (float or None, float)
        (eps1, eps2), each >= 0; eps1 None: the machine epsilon of the
        dtype the update is computed in.

    Returns
    -------
    None
    """
    cdef cnp.ndarray p, w, g
    cdef str wname
    p, w, wname, g = update_arrays(param, grad, master)
    cdef tuple shape = (<object>w).shape
    cdef int nd = len(shape)
    cdef list states
    cdef tuple names
    cdef tuple rows_shape, cols_shape
    if nd >= 2:
        # (explicit indices: wraparound is off)
        rows_shape = shape[:nd - 1] + (1,)
        cols_shape = shape[:nd - 2] + (1, shape[nd - 1])
        if variance is not None:
            raise ValueError(f"variance is the state of a 0-d or 1-d param; a {nd}-d param has "
                             "row_var and col_var")
        if row_var is None or col_var is None:
            raise ValueError(f"a {nd}-d param needs row_var and col_var (arrays of shapes "
                             f"{rows_shape} and {cols_shape})")
        states = [factor_state(row_var, "row_var", w, wname, rows_shape),
                  factor_state(col_var, "col_var", w, wname, cols_shape)]
        names = ("row_var", "col_var")
    else:
        if row_var is not None or col_var is not None:
            raise ValueError(f"row_var and col_var are the state of a param of 2 or more "
                             f"dimensions; a {nd}-d param has variance")
        if variance is None:
            raise ValueError(f"a {nd}-d param needs variance (an array like {wname})")
        states = [state_array(variance, "variance", w, wname)]
        names = ("variance",)
    if _store.sk != NATIVE:
        raise ValueError("adafactor_step keeps its state in the param's dtype")
    cdef double k = step_count(step)
    cdef Hyper h
    read_hypers(&h, dict(lr=lr, beta2_decay=beta2_decay, eps=eps, d=d, weight_decay=weight_decay,
                         maximize=maximize), FACTORED, -1, compute_name(w))
    check_disjoint([p, g] + states + [None if w is p else w],
                   ("param", "grad") + names + ("master",))
    g = readable(g)
    if cnp.PyArray_SIZE(w) == 0:
        return
    cdef FactorJob j
    fac_arrays(&j, w, p, store_of(dtype_code(g)), <cnp.ndarray>states[0],
               <cnp.ndarray>states[1] if nd >= 2 else None)
    j.grad = cnp.PyArray_DATA(g)
    j.maximize = h.maximize
    j.inv_scale = _store.inv_scale
    fac_numbers(&j, k, h.lr, h.beta2_decay, h.eps1, h.eps2, h.d, h.weight_decay)
    cdef double *work = <double *>PyMem_Malloc(fac_work_size(&j) * sizeof(double))
    if work == NULL:
        raise MemoryError()
    fac_work(&j, work)
    cdef FactorJob *jp = &j
    try:
        with nogil:
            core.optim.factored(&jp, 1)
    finally:
        PyMem_Free(work)


cdef void fac_arrays(FactorJob *j, cnp.ndarray w, cnp.ndarray p, int gk, cnp.ndarray rv,
                     cnp.ndarray cv):
    """The arrays of a job and its units: w the array updated (the parameter
    or its float32 master), p the parameter, gk the Store code of its
    gradient, rv/cv row_var/col_var (cv None: rv is the variance of a 0-d or
    1-d parameter).  w is not empty."""
    cdef tuple shape = (<object>w).shape
    cdef int nd = len(shape)
    j.is_double = cnp.PyArray_TYPE(w) == cnp.NPY_FLOAT64
    j.factored = cv is not None
    j.param = cnp.PyArray_DATA(w)
    j.out = NULL
    j.gk = j.ok = NATIVE
    if w is not p:
        j.out = cnp.PyArray_DATA(p)
        j.ok = store_of(dtype_code(p))
        j.gk = gk
    j.row_var = cnp.PyArray_DATA(rv)
    j.col_var = cnp.PyArray_DATA(cv) if cv is not None else NULL
    if j.factored:
        j.R = shape[nd - 2]
        j.C = shape[nd - 1]
        j.B = cnp.PyArray_SIZE(w) // (j.R * j.C)
        j.cb = min(j.C, FAC_COLS)
        j.rb = min(j.R, max(1, FAC_UNIT // j.cb))
    else:
        j.B = j.R = j.rb = 1
        j.C = cnp.PyArray_SIZE(w)
        j.cb = FAC_UNIT
    j.nrb = (j.R + j.rb - 1) // j.rb
    j.ncb = (j.C + j.cb - 1) // j.cb
    j.nunits = j.B * j.nrb * j.ncb
    # Small matrices (a 3 x 3 convolution's 9 elements) a unit at a time would
    # cost more to schedule than to update: units of mb whole matrices then,
    # each matrix keeping its own sum (so the results are those of one
    # matrix per unit).
    j.mb = 0
    if j.factored and j.nrb == 1 and j.ncb == 1 and j.R * j.C < FAC_UNIT:
        j.mb = FAC_UNIT // (j.R * j.C)
        j.nunits = (j.B + j.mb - 1) // j.mb
    j.nparts = j.B if j.mb else j.nunits


cdef inline Py_ssize_t fac_work_size(const FactorJob *j) noexcept:
    """The doubles of a job's work area."""
    return j.nparts + (j.B * (j.ncb * j.R + j.nrb * j.C + 1) if j.factored else 0)


cdef inline void fac_work(FactorJob *j, double *work) noexcept:
    j.unit_part = work
    j.row_part = work + j.nparts
    j.col_part = j.row_part + j.B * j.ncb * j.R
    j.mean = j.col_part + j.B * j.nrb * j.C


cdef inline void fac_numbers(FactorJob *j, double step, double lr, double beta2_decay,
                             double eps1, double eps2, double d, double weight_decay) noexcept nogil:
    """A job's numbers at step `step` (eps1 NaN: None, the machine epsilon of
    the job's compute dtype, as torch's finfo(param.dtype).eps)."""
    if eps1 != eps1:
        eps1 = 2.220446049250313e-16 if j.is_double else 1.1920928955078125e-07
    j.w = pow(step, beta2_decay)
    j.eps1 = eps1
    j.eps2 = eps2
    j.d = d
    cdef double r = 1.0 / pow(step, 0.5)
    j.rho = r if r < lr else lr                                  # min(lr, 1/sqrt(step))
    j.decay = 1.0 - lr * weight_decay


# The functional kernels that `_stored_step` can run (adafactor_step: with
# grad_scale only).
_STORED = (adagrad_step, adamax_step, nadam_step, radam_step, adadelta_step, asgd_step,
           rprop_step, lion_step, adafactor_step)


def _stored_step(kernel, *args, state=None, key=0, grad_scale=None, **kwargs):
    """`kernel(*args, **kwargs)` as an optimizer's step runs it (a test hook
    of the loops' storage variants, not for concurrent use): with bfloat16
    state arrays (`state` "bfloat16": rounded to nearest even;
    "bfloat16_sr": stochastically, element i with the random bits
    hash32(key + i); not for adafactor_step) and the gradient multiplied by
    1/grad_scale as it is read.  `kernel` is one of `_STORED`."""
    global _store
    if not any(kernel is k for k in _STORED):
        raise ValueError(f"kernel must be one of {[k.__name__ for k in _STORED]}")
    if state not in (None, "bfloat16", "bfloat16_sr"):
        raise ValueError(f"state must be None, 'bfloat16' or 'bfloat16_sr', got {state!r}")
    cdef StateStore plain = _store
    cdef StateStore st = plain
    st.sk = NATIVE if state is None else BF16 if state == "bfloat16" else BF16_SR
    st.key = <uint32_t>(integer(key, "key") & 0xffffffff)
    st.inv_scale = 1.0 if grad_scale is None else reciprocal_scale(grad_scale)
    _store = st
    try:
        return kernel(*args, **kwargs)
    finally:
        _store = plain


# ======================================================= fused optimizer ===
#
# `FusedStep` is the native step of the optimizer objects of `optim.py` and
# `torch.py` (the fronts).  The fronts own what their users own: the
# parameters, their state arrays, float32 masters and step counts (laid out
# by `fastopt._layout`, one zeroed buffer per state kind, each array on a
# 64-byte boundary, in parameter order: a step streams every state through
# memory in one direction).  A FusedStep is built over them, checks them
# once, and keeps what makes a step fast: one record (`Rec`) per parameter
# and the memory a step writes (`Written`).  A front that replaces one of
# its arrays builds a new one.  Its `step` validates the gradients and the
# param-group hyperparameters, fills a C array of `Segment`s and per-array
# `Coef`s, and calls `run_segments` once with the GIL released: one native
# call and one threaded job per step, whatever the number of arrays.
#
# * Everything is checked before anything is written (no partial step).
# * The per-array work on the Python side of a step is a handful of C-API
#   calls (type, shape, flags, one binary search for overlap with the arrays
#   that are written), so a step over hundreds of small arrays costs
#   microseconds, not a Python loop.
# * Per-array step counts (PyTorch's state["step"]), kept by the front in
#   int64 or float arrays: read once per step, written back after it.  An
#   array whose gradient is None is skipped and its count does not advance.
#   Consecutive arrays sharing (group, step) share one Coef, so the
#   bias-correction pow()s run about once per group.
# * Mixed float32/float64 parameters go through the same call: every segment
#   carries its own dtype.
# * Low precision: a float16/bfloat16 parameter has a float32 master that
#   the kernels update, writing the parameter, rounded, in the same pass;
#   the state of float32 and 16-bit parameters may be bfloat16.
# * Loss scaling: step(..., grad_scale) first runs a CHECK pass over the
#   gradients (the same dispatch, reading only); if any holds inf or NaN,
#   nothing is updated (no parameter, state or step count) and `found_inf`
#   is set.

from libc.stdlib cimport qsort
from libc.stdint cimport int64_t, uintptr_t, INT64_MAX
from libc.math cimport floor
from libc.string cimport memset
from cpython.mem cimport PyMem_Malloc, PyMem_Free

import numpy as np

ctypedef struct Hyper:
    double lr, beta1, beta2, eps, weight_decay, alpha, momentum, dampening
    double lr_decay, initial_accumulator_value, momentum_decay, rho, lambd, t0
    double etaminus, etaplus, step_size_min, step_size_max     # (two pairs)
    double beta2_decay, eps1, eps2, d               # Adafactor (eps1 NaN: None)
    bint amsgrad, decoupled, centered, nesterov, maximize


ctypedef struct Interval:       # bytes [lo, hi) of one array that is written
    uintptr_t lo
    uintptr_t hi
    Py_ssize_t owner            # which array (FusedStep: the parameter index)
    int slot                    # FusedStep: 0 the parameter, 1..3 a state array, 4 its master,
                                # 5 its step count


cdef int cmp_interval(const void *a, const void *b) noexcept nogil:
    cdef const Interval *x = <const Interval *>a
    cdef const Interval *y = <const Interval *>b
    if x.lo != y.lo:
        return -1 if x.lo < y.lo else 1
    if x.owner != y.owner:
        return -1 if x.owner < y.owner else 1
    return x.slot - y.slot


cdef class Written:
    """The memory a call writes, as byte intervals sorted by address: `seal`
    refuses two that overlap, then `find` says in log n whether bytes that
    are read overlap one.  Every overlap check of this module uses it."""
    cdef Interval *iv
    cdef Py_ssize_t n, cap

    def __cinit__(self, Py_ssize_t cap):
        self.iv = <Interval *>PyMem_Malloc(max(cap, 1) * sizeof(Interval))
        if self.iv == NULL:
            raise MemoryError()
        self.cap = cap
        self.n = 0

    def __dealloc__(self):
        PyMem_Free(self.iv)

    cdef void add(self, void *data, Py_ssize_t nbytes, Py_ssize_t owner, int slot) noexcept:
        """Bytes [data, data + nbytes) of array `owner` (at most `cap` adds)."""
        if nbytes == 0 or self.n == self.cap:
            return
        cdef Interval *iv = &self.iv[self.n]
        iv.lo = <uintptr_t>data
        iv.hi = iv.lo + <uintptr_t>nbytes
        iv.owner = owner
        iv.slot = slot
        self.n += 1

    cdef int seal(self, object name) except -1:
        """Sort; two intervals that overlap raise ValueError, naming their
        arrays in (owner, slot) order with ``name(owner, slot)``."""
        qsort(self.iv, self.n, sizeof(Interval), cmp_interval)
        cdef Py_ssize_t k
        cdef Interval *a
        cdef Interval *b
        for k in range(1, self.n):
            a = &self.iv[k - 1]
            b = &self.iv[k]
            if b.lo < a.hi:
                if (b.owner, b.slot) < (a.owner, a.slot):
                    a, b = b, a
                raise ValueError(f"{name(a.owner, a.slot)} and {name(b.owner, b.slot)} "
                                 "overlap in memory")
        return 0

    cdef Py_ssize_t find(self, uintptr_t lo, uintptr_t hi) noexcept:
        """Index of an interval overlapping [lo, hi), or -1 (after `seal`)."""
        cdef Py_ssize_t a = 0, b = self.n, m
        while a < b:            # the last interval that starts below hi
            m = (a + b) // 2
            if self.iv[m].lo < hi:
                a = m + 1
            else:
                b = m
        if a > 0 and self.iv[a - 1].hi > lo:
            return a - 1
        return -1


# ---------------------------------------------------- the declared kinds ---
# What each optimizer kind is (hyperparameters and their ranges, state slots
# and the options that ask for them) is declared once, in fastopt._kinds.
# Here it becomes the group parser's table: per native kind, one HyperSpec
# per hyperparameter, in declaration order, saying where the parsed value
# goes in `Hyper` (the fields that the coefficient functions read).

from fastopt import _kinds

cdef dict KINDS = {"adam": ADAM, "rmsprop": RMSPROP, "sgd": SGD, "adagrad": ADAGRAD,
                   "adamax": ADAMAX, "nadam": NADAM, "radam": RADAM, "adadelta": ADADELTA,
                   "asgd": ASGD, "rprop": RPROP, "lion": LION, "factored": FACTORED}
DEF NKINDS = 14                 # Kind values (CHECK and UNSCALE have no specs)

cdef enum HyperType:
    H_NUMBER = 0
    H_FLAG = 1
    H_PAIR = 2      # two numbers (betas), stored in two consecutive doubles

ctypedef struct HyperSpec:
    int type
    double lo[2]                # the range of each number (a pair's two may differ)
    double hi[2]
    bint closed[2]
    bint lo_open[2]
    bint none_ok[2]             # None is allowed (stored as NaN)
    Py_ssize_t offset           # of its field in Hyper

DEF MAX_HYPERS = 16
cdef Hyper _layout


cdef inline Py_ssize_t field_of(void *field) noexcept:
    return <char *>field - <char *>&_layout


cdef dict HYPER_FIELDS = {      # a declared name -> its field's offset in Hyper
    "lr": field_of(&_layout.lr), "betas": field_of(&_layout.beta1),
    "eps": field_of(&_layout.eps), "weight_decay": field_of(&_layout.weight_decay),
    "alpha": field_of(&_layout.alpha), "momentum": field_of(&_layout.momentum),
    "dampening": field_of(&_layout.dampening), "amsgrad": field_of(&_layout.amsgrad),
    "decoupled_weight_decay": field_of(&_layout.decoupled),
    "centered": field_of(&_layout.centered), "nesterov": field_of(&_layout.nesterov),
    "maximize": field_of(&_layout.maximize), "lr_decay": field_of(&_layout.lr_decay),
    "initial_accumulator_value": field_of(&_layout.initial_accumulator_value),
    "momentum_decay": field_of(&_layout.momentum_decay), "rho": field_of(&_layout.rho),
    "lambd": field_of(&_layout.lambd), "t0": field_of(&_layout.t0),
    "etas": field_of(&_layout.etaminus), "step_sizes": field_of(&_layout.step_size_min),
    "beta2_decay": field_of(&_layout.beta2_decay), "d": field_of(&_layout.d)}
# A name whose field differs by kind: (kind family, name) -> offset
# (Adafactor's eps is a pair, (eps1, eps2)).
cdef dict KIND_FIELDS = {("factored", "eps"): field_of(&_layout.eps1)}

cdef HyperSpec SPECS[NKINDS][MAX_HYPERS]
cdef int NSPECS[NKINDS]
cdef list SPEC_KEYS = [None] * NKINDS       # per native kind: the keys, in spec order
# Per native kind: the state slots s1, s2, s3 of a Segment (names as in
# PyTorch's state; None: no such slot), and for each the option that asks
# for it: None, or (key, offset of its field in Hyper, whether it is a flag).
cdef list SLOT_NAMES = [None] * NKINDS
cdef list SLOT_OPTIONS = [None] * NKINDS
# Per native kind: the names of its per-parameter numbers besides the
# arrays (NAdam's mu_product, ASGD's eta and mu), at most 2.
cdef list SCALAR_NAMES = [()] * NKINDS
# Per native kind: its declaration (fastopt._kinds.Kind: the slots' shapes,
# whether it takes low-precision state).
cdef list KIND_DECL = [None] * NKINDS
# Per native kind: (hyperparameter, its field's offset, number) for each of
# its numbers that starts at a hyperparameter's value (ASGD's eta at lr):
# kept in float32, so that hyperparameter must fit float32.
cdef list SCALAR_FROM = [()] * NKINDS


cdef tuple hyper_ranges(object h):
    """The ranges of declared hyperparameter h, as (lo, hi, closed, lo_open) per number."""
    if h.each is not None:
        return tuple((b.lo, b.hi, b.closed, b.lo_open, b.none_ok) for b in h.each)
    return ((h.lo, h.hi, h.closed, False, False),) * 2


cdef int load_kinds() except -1:
    cdef int k, j, e
    cdef object h
    for decl in _kinds.KINDS.values():
        k = KINDS[decl.native]
        spec = [(h.name, h.kind, hyper_ranges(h)) for h in decl.hypers]
        if SPEC_KEYS[k] is not None:    # AdamW: Adam's kernel and ranges, other defaults
            if spec != SPEC_KEYS[k][1]:
                raise ImportError(f"{decl.name} shares the {decl.native} kernel but not its ranges")
            continue
        if len(decl.hypers) > MAX_HYPERS or len(decl.slots) > 3 or len(decl.scalars) > 2:
            raise ImportError(f"{decl.name}: too many hyperparameters, state slots or scalars")
        for j, h in enumerate(decl.hypers):
            SPECS[k][j].type = {"number": H_NUMBER, "flag": H_FLAG, "pair": H_PAIR}[h.kind]
            for e, (lo, hi, closed, lo_open, none_ok) in enumerate(hyper_ranges(h)):
                SPECS[k][j].lo[e] = lo
                SPECS[k][j].hi[e] = hi
                SPECS[k][j].closed[e] = closed
                SPECS[k][j].lo_open[e] = lo_open
                SPECS[k][j].none_ok[e] = none_ok
            SPECS[k][j].offset = KIND_FIELDS.get((decl.native, h.name), HYPER_FIELDS[h.name])
        NSPECS[k] = len(decl.hypers)
        SPEC_KEYS[k] = (tuple(h.name for h in decl.hypers), spec)
        names = [s.name for s in decl.slots] + [None] * (3 - len(decl.slots))
        SLOT_NAMES[k] = tuple(names)
        SLOT_OPTIONS[k] = tuple(None if s.option is None else
                                (s.option, HYPER_FIELDS[s.option],
                                 decl.hyper(s.option).kind == "flag")
                                for s in decl.slots) + (None,) * (3 - len(decl.slots))
        SCALAR_NAMES[k] = tuple(x.name for x in decl.scalars)
        KIND_DECL[k] = decl
        SCALAR_FROM[k] = tuple((x.init, HYPER_FIELDS[x.init], x.name) for x in decl.scalars
                               if isinstance(x.init, str))
    return 0


load_kinds()


cdef object group_get(dict g, str key, Py_ssize_t gi):
    """g[key]; a missing key is a ValueError naming it.  (PyTorch raises the
    dict's KeyError at its next step; here a group without a hyperparameter
    is a bad argument like any other, and is reported as one.)"""
    try:
        return g[key]
    except KeyError:
        raise ValueError(f"param_groups[{gi}] has no {key!r}") from None


cdef str hyper_name(Py_ssize_t gi, str key, int k):
    """How errors name param_groups[gi][key] (k >= 0: its element k); gi < 0:
    a functional kernel's argument `key`."""
    return (key if gi < 0 else f"param_groups[{gi}][{key!r}]") + (f"[{k}]" if k >= 0 else "")


cdef double hyper_num(object x, Py_ssize_t gi, str key, int k, const HyperSpec *spec,
                      int e) except? -1.0:
    """x, a finite number in number e's range of `spec`, for param_groups[gi][key]
    (element k if k >= 0); the error message is built only on failure."""
    cdef double v, lo = spec.lo[e], hi = spec.hi[e]
    cdef bint hi_closed = spec.closed[e], lo_open = spec.lo_open[e]
    if type(x) is float:
        v = <double>x
    else:
        v = real(x, hyper_name(gi, key, k))
    if isfinite(v) and (lo < v or (not lo_open and lo == v)) and (v < hi or (hi_closed and v == hi)):
        return v
    cdef str name = hyper_name(gi, key, k)
    if not isfinite(v):
        raise ValueError(f"{name} must be finite, got {v!r}")
    if hi == INFINITY:
        raise ValueError(f"{name} must be {'>' if lo_open else '>='} {lo:g}, got {v!r}")
    if lo == -INFINITY:
        raise ValueError(f"{name} must be {'<=' if hi_closed else '<'} {hi:g}, got {v!r}")
    raise ValueError(f"{name} must be in {'(' if lo_open else '['}{lo:g}, "
                     f"{hi:g}{']' if hi_closed else ')'}, got {v!r}")


cdef bint group_flag(object x, str key, Py_ssize_t gi) except -1:
    """x, the value of param_groups[gi][key], as a bool."""
    if isinstance(x, (tuple, list, str, bytes)) or (
            cnp.PyArray_Check(x) and cnp.PyArray_SIZE(<cnp.ndarray>x) != 1):
        raise TypeError(f"{hyper_name(gi, key, -1)} must be a bool, got {kind_of(x)}")
    return bool(x)


cdef double reciprocal_scale(object grad_scale) except? -1.0:
    """1/grad_scale for a finite grad_scale > 0 (its reciprocal finite in float32)."""
    cdef double sc = real(grad_scale, "grad_scale")
    if not sc > 0:
        raise ValueError(f"grad_scale must be > 0, got {sc!r}")
    if 1.0 / sc > 3.4028234663852886e38:
        raise ValueError(f"grad_scale must be >= 2**-127 (1/grad_scale must be a finite "
                         f"float32), got {sc!r}")
    return 1.0 / sc


# ---------------------------------------------- what every update checks ---
# The hyperparameters of an update, checked against the ranges its kind
# declares (fastopt._kinds), and its coefficients: one place for the
# optimizer objects (FusedStep) and the functional kernels.

cdef str SINGLE_GROUP = "the group's float32, float16 and bfloat16 parameters are"


cdef inline str compute_name(cnp.ndarray w):
    """How errors name what a functional kernel computes in float32 (None: float64)."""
    return None if cnp.PyArray_TYPE(w) == cnp.NPY_FLOAT64 else f"{w.dtype} arrays are"


cdef int read_hypers(Hyper *h, dict g, int kind, Py_ssize_t gi, str single) except -1:
    """The hyperparameters of kind `kind` in `g`, checked, into h.

    gi >= 0: g is param_groups[gi] (every declared key must be there;
    errors name param_groups[gi][key]); gi < 0: the arguments of a
    functional kernel (a key it does not take is skipped; errors name the
    argument).  `single`: what is computed in float32, for the error that
    refuses a number beyond float32's range (None: computed in float64).
    """
    cdef tuple keys = SPEC_KEYS[kind][0]
    cdef const HyperSpec *spec
    cdef char *field
    cdef str key
    cdef object x
    cdef int j, k
    for j in range(NSPECS[kind]):
        spec = &SPECS[kind][j]
        key = <str>keys[j]
        if gi < 0 and key not in g:
            continue
        field = <char *>h + spec.offset
        x = group_get(g, key, gi)
        if spec.type == H_FLAG:
            (<bint *>field)[0] = group_flag(x, key, gi)
            continue
        if spec.type == H_NUMBER:
            (<double *>field)[0] = hyper_num(x, gi, key, -1, spec, 0)
        else:
            if not isinstance(x, (tuple, list)) or len(x) != 2:
                raise TypeError(f"{hyper_name(gi, key, -1)} must be a tuple of two numbers, "
                                f"got {x!r}")
            for k in range(2):
                (<double *>field)[k] = (NAN if x[k] is None and spec.none_ok[k]
                                        else hyper_num(x[k], gi, key, k, spec, k))
        if single is not None:
            for k in range(2 if spec.type == H_PAIR else 1):
                if beyond_float32((<double *>field)[k]):
                    too_large_for_float32((<double *>field)[k],
                                          hyper_name(gi, key, k if spec.type == H_PAIR else -1),
                                          single)
    if kind == SGD and h.nesterov and (h.momentum <= 0 or h.dampening != 0):
        raise ValueError(("" if gi < 0 else f"param_groups[{gi}]: ")
                         + "nesterov=True requires momentum > 0 and dampening == 0")
    cdef double v
    for key, offset, number in SCALAR_FROM[kind]:
        v = (<double *>(<char *>h + <Py_ssize_t>offset))[0]
        if beyond_float32(v):
            raise ValueError(f"{hyper_name(gi, key, -1)} = {v!r} is too large for float32, "
                             f"the precision {number} is kept in")
    return 0


cdef inline bint slot_on(const Hyper *h, object opt) noexcept:
    """Whether the option `opt` (an entry of SLOT_OPTIONS) is on in h."""
    cdef const char *field = <const char *>h + <Py_ssize_t>opt[1]
    return (<const bint *>field)[0] if opt[2] else (<const double *>field)[0] != 0


cdef void kind_coef_of(int kind, Coef *c, const Hyper *h, double t, double *sc,
                       bint single) noexcept nogil:
    """The coefficients of an update of kind `kind` at step t (SGD: of the
    momentum buffer, whose first update is step 1), from the checked
    hyperparameters h; sc: the parameter's numbers besides its arrays (NAdam's
    mu_product, ASGD's eta and mu), replaced by their new values, kept in
    float32 if `single`.  Every elementwise update, of the optimizer objects
    and of the functional kernels, gets its coefficients here."""
    if kind == ADAM:
        adam_coef(c, h.lr, h.beta1, h.beta2, h.eps, h.weight_decay, h.decoupled,
                  h.amsgrad, h.maximize, t)
    elif kind == RMSPROP:
        rmsprop_coef(c, h.lr, h.alpha, h.eps, h.weight_decay, h.momentum, h.centered,
                     h.maximize)
    elif kind == SGD:
        # t counts momentum updates: at the first the buffer is set to g
        sgd_coef(c, h.lr, h.momentum, h.dampening, h.nesterov, h.weight_decay,
                 h.maximize, t == 1.0)
    elif kind == ADAGRAD:
        adagrad_coef(c, h.lr, h.lr_decay, h.weight_decay, h.eps, h.maximize, t)
    elif kind == ADAMAX:
        adamax_coef(c, h.lr, h.beta1, h.beta2, h.eps, h.weight_decay, h.maximize, t)
    elif kind == NADAM:
        sc[0] = nadam_coef(c, h.lr, h.beta1, h.beta2, h.eps, h.weight_decay,
                           h.momentum_decay, h.decoupled, h.maximize, t, sc[0], single)
    elif kind == RADAM:
        radam_coef(c, h.lr, h.beta1, h.beta2, h.eps, h.weight_decay, h.decoupled,
                   h.maximize, t)
    elif kind == ADADELTA:
        adadelta_coef(c, h.lr, h.rho, h.eps, h.weight_decay, h.maximize)
    elif kind == ASGD:
        asgd_coef(c, h.lambd, h.weight_decay, h.maximize, sc[0], sc[1])
        asgd_next(&sc[0], &sc[1], h.lr, h.lambd, h.alpha, h.t0, t, single)
    elif kind == RPROP:
        rprop_coef(c, h.etaminus, h.etaplus, h.step_size_min, h.step_size_max, h.maximize)
    else:
        lion_coef(c, h.lr, h.beta1, h.beta2, h.weight_decay, h.maximize)


cdef int functional(int kind, object param, object grad, object master, tuple states,
                    double t, dict hypers, double *sc=NULL) except -1:
    """A functional kernel's update of `param` by kind `kind` at step t:
    `states` its 3 state slots (None where absent), `hypers` its arguments,
    `sc` its numbers besides the arrays (replaced by their new values)."""
    cdef cnp.ndarray p, w, g
    cdef str wname
    p, w, wname, g = update_arrays(param, grad, master)
    cdef Hyper h
    memset(&h, 0, sizeof(Hyper))
    read_hypers(&h, hypers, kind, -1, compute_name(w))
    cdef tuple names = SLOT_NAMES[kind], options = SLOT_OPTIONS[kind]
    cdef list arrays = [None, None, None]
    cdef int k
    for k in range(3):
        opt = options[k]
        if names[k] is None or (opt is not None and not slot_on(&h, opt)):
            continue
        if states[k] is None and opt is not None:
            raise ValueError(f"{opt[0]}{'=True' if opt[2] else ' > 0'} requires {names[k]} "
                             "(an array like param)")
        arrays[k] = kind_state(states[k], names[k], w, wname)
    cdef Coef c
    cdef double unused[2]
    kind_coef_of(kind, &c, &h, t, sc if sc != NULL else unused, True)
    run_kind(p, w, g, arrays, names, &c)
    return 0


cdef int disjoint_arrays(list arrays, list names) except -1:
    """No two of `arrays` share a byte (sorted by address: n log n)."""
    cdef Written w = Written(len(arrays))
    cdef Py_ssize_t k
    for k in range(len(arrays)):
        w.add(cnp.PyArray_DATA(<cnp.ndarray>arrays[k]), cnp.PyArray_NBYTES(<cnp.ndarray>arrays[k]),
              k, 0)
    w.seal(lambda owner, slot: names[owner])
    return 0


cdef object _bf16_dtype = None


cdef object bfloat16_dtype(str what):
    """numpy's bfloat16 dtype (from ml_dtypes, the optional extra)."""
    global _bf16_dtype
    if _bf16_dtype is None:
        try:
            import ml_dtypes
            _bf16_dtype = np.dtype(ml_dtypes.bfloat16)
        except (ImportError, AttributeError):    # (AttributeError: blocked in sys.modules)
            raise ImportError(f"{what} needs the ml_dtypes package: "
                              "pip install 'fastopt[bf16]' (or pip install ml_dtypes)") from None
    return _bf16_dtype


cdef object state_dtype_name(object state_dtype):
    """None or "bfloat16" (the state dtypes fastopt keeps), else an error."""
    if state_dtype is None:
        return None
    cdef object name = state_dtype
    if not isinstance(state_dtype, str):
        try:
            name = np.dtype(state_dtype).name
        except TypeError:
            raise TypeError(f"state_dtype must be None or 'bfloat16', got {state_dtype!r}") from None
    if name == "bfloat16":
        return name
    if name == "float16":
        raise ValueError("state_dtype='float16' is not supported: exp_avg_sq holds squared "
                         "gradients, which leave float16's range (6e-8 to 65504; 1e-4**2 "
                         "flushes to 0): use 'bfloat16' (float32's range)")
    raise ValueError(f"state_dtype must be None or 'bfloat16', got {state_dtype!r}")

def state_dtype_of(state_dtype):
    """The numpy dtype of state kept as `state_dtype` (None or "bfloat16";
    anything else is refused): None (the compute dtype) or bfloat16."""
    cdef object name = state_dtype_name(state_dtype)
    return None if name is None else bfloat16_dtype("state_dtype='bfloat16'")


def check_low_precision(state_dtype, state_rounding, seed, kind=None, split_master=False):
    """Check the low-precision options (as FusedStep takes them) of an
    optimizer of `kind` (a `fastopt._kinds.Kind`), with split masters if
    `split_master`."""
    refuse_low_precision(kind, state_dtype, split_master)
    state_dtype_of(state_dtype)
    check_rounding(state_rounding, seed)


cdef int refuse_low_precision(object kind, object state_dtype, bint split) except -1:
    """A kind that keeps full-precision state (`Kind.full_precision`)
    refuses bfloat16 state and split masters."""
    if kind is None or not kind.full_precision:
        return 0
    if state_dtype is not None:
        raise ValueError(f"{kind.name} keeps its state in the compute dtype: state_dtype must "
                         f"be None, got {state_dtype!r} ({kind.full_precision})")
    if split:
        raise ValueError(f"{kind.name} keeps a float32 master for a 16-bit parameter: "
                         f"split_master=True is not supported ({kind.full_precision})")
    return 0


def _convert(src, dst, stochastic_key=None):
    """dst[...] = src with fastopt's conversions (a test hook): float16 or
    bfloat16 to float32, or float32 to float16 or bfloat16 (round to
    nearest even; bfloat16 with stochastic rounding if `stochastic_key`,
    r_i = hash32(key + i)).  Arrays C-contiguous, of one size."""
    cdef cnp.ndarray s = any_float_array(src, "src")
    cdef cnp.ndarray d = writable(any_float_array(dst, "dst"), "dst")
    if not cnp.PyArray_IS_C_CONTIGUOUS(s) or cnp.PyArray_SIZE(s) != cnp.PyArray_SIZE(d):
        raise ValueError("src must be C-contiguous, with the size of dst")
    cdef int sc = dtype_code(s), dc = dtype_code(d)
    cdef Py_ssize_t n = cnp.PyArray_SIZE(s)
    cdef uint32_t key = 0
    cdef int code
    if sc in (DT_F16, DT_BF16) and dc == DT_F32:
        with nogil:
            core.optim.widen(<const uint16_t *>cnp.PyArray_DATA(s), <float *>cnp.PyArray_DATA(d), n,
                    store_of(sc))
    elif sc == DT_F32 and dc in (DT_F16, DT_BF16):
        code = store_of(dc)
        if stochastic_key is not None:
            if dc != DT_BF16:
                raise ValueError("stochastic rounding is to bfloat16 only")
            code = BF16_SR
            key = <uint32_t>(int(stochastic_key) & 0xffffffff)
        with nogil:
            core.optim.narrow(<const float *>cnp.PyArray_DATA(s),
                              <uint16_t *>cnp.PyArray_DATA(d), n, code, key)
    else:
        raise TypeError(f"cannot convert {s.dtype} to {d.dtype}")


def _hash32(x):
    """fastopt_hash32 of every element of a uint32 array (a test hook)."""
    cdef cnp.ndarray a = np.ascontiguousarray(x, dtype=np.uint32)
    cdef cnp.ndarray o = np.empty_like(a)
    cdef const uint32_t *pa = <const uint32_t *>cnp.PyArray_DATA(a)
    cdef uint32_t *po = <uint32_t *>cnp.PyArray_DATA(o)
    cdef Py_ssize_t i
    for i in range(cnp.PyArray_SIZE(a)):
        po[i] = fastopt_hash32(pa[i])
    return o


# Every FusedStep alive.  A process forked while another thread was inside a
# step copies that step's busy flag, but not the thread that would clear it:
# the child starts with every optimizer idle.
import os as _os
import weakref as _weakref

cdef object _LIVE = _weakref.WeakSet()


def _idle_after_fork():
    for f in list(_LIVE):
        (<FusedStep>f).busy = (<FusedStep>f).held = False


if hasattr(_os, "register_at_fork"):
    _os.register_at_fork(after_in_child=_idle_after_fork)


ctypedef struct Rec:            # one parameter, as its front bound it
    void *param                 # what the kernels update: the parameter, or its float32 master
    void *out                   # the float16/bfloat16 parameter written from the master, or NULL
    void *s[3]                  # the state arrays in slot order (NULL: absent)
    void *step                  # its step count, of type step_type
    int step_type               # NPY_INT64, NPY_FLOAT32 or NPY_FLOAT64
    int code                    # DT_* of the parameter
    int okind                   # Store code of `out` (NATIVE: none)
    int typenum                 # of the parameter, as bound
    int group
    Py_ssize_t size
    uint32_t key_index          # stochastic rounding: the parameter's index and the
    uint32_t key_offset         # position of its first element (see `step`)
    void *scal[2]               # its numbers besides the arrays (SCALAR_NAMES), or NULL
    bint scal_double            # ... float64 (else float32)


cdef class FusedStep:
    """The native step of an optimizer, over arrays that its front owns.

    The front (`fastopt.Optimizer`, `fastopt.torch`'s optimizers) owns the
    parameters, their state arrays, float32 masters and step counts, and
    builds a FusedStep over them (again whenever it replaces one of them).
    The FusedStep checks them once, keeps one record per parameter and the
    memory a step writes, and holds a reference to every array; each step
    then checks what can change between steps: the parameters' memory, the
    hyperparameters, the gradients and the step counts.

    Parameters
    ----------
    kind : str
        The native kernel family (`fastopt._kinds`: "adam", "rmsprop",
        "sgd", "adagrad", ..., "lion", "factored").  "factored"
        (Adafactor) is not elementwise: its step is three threaded passes
        over all the parameters, its state arrays are shaped as its
        declaration says, it keeps no bfloat16 state and takes no split
        masters.
    params : list of ndarray
        float32/float64/float16/bfloat16, C-contiguous, aligned, writeable,
        native byte order, each at most once.  Updated in place by `step`,
        which refuses a parameter whose memory, dtype, size, byte order or
        layout was changed since; a float16/bfloat16 parameter through its
        float32 master (`masters`), which the step updates and rounds into it.
    group_of : list of int
        The param-group index of every parameter (non-decreasing: the
        parameters in param-group order).
    ngroups : int
        The number of param groups (some may be empty).
    states : list of tuple of 3 (ndarray or None)
        Per parameter, the kind's state arrays in slot order (`SLOT_NAMES`),
        None where it has none.  Each has the shape of the parameter, is
        C-contiguous, aligned, writeable, in native byte order, of the
        compute dtype (float64 for a float64 parameter, else float32) or,
        with `state_dtype`, bfloat16.  A group has a slot if every one of
        its parameters has it.
    masters : list of (ndarray or None)
        The float32 master of every float16/bfloat16 parameter (its shape,
        laid out as a state array), None for the others.  For a bfloat16
        parameter the master may instead be split: a uint16 array holding
        the low 16 bits of the float32 master whose high 16 bits are the
        parameter itself (4 bytes per element instead of 6; the parameter is
        the master truncated, not rounded).
    steps : ndarray, or list of ndarray
        The step counts (torch's ``state["step"]``): a 1-d array with one
        per parameter, or per parameter a one-element array; int64, float32
        or float64, writeable.  A step reads the counts of the parameters it
        updates (whole numbers >= 0) and writes the new ones in place.
    names : list of str, optional
        How errors name the parameters (default ``params[i]``); with names,
        errors say "the gradient of NAME", "the state of NAME[...]" and
        "state['step'] of NAME".
    state_dtype : None or "bfloat16"
        The dtype of the state arrays of float32/float16/bfloat16
        parameters: None for float32.
    state_rounding : {"nearest", "stochastic"}
        How bfloat16 state is rounded: to nearest even, or stochastically
        with the counter-based generator seeded by `seed` (see `step`).
    seed : int in [0, 2**32)
    scalars : list of tuple of ndarray, optional
        For kinds whose state has numbers besides the arrays (NAdam's
        ``mu_product``, ASGD's ``eta`` and ``mu``: `SCALAR_NAMES`), per
        parameter one one-element float32 (or float64) array per number,
        read and written by each step as the step counts are.
    sr_keys : list of (int, int), optional
        Per parameter, the (index j, first element position o) its
        stochastic rounding draws with (see `step`); default (i, 0).  A
        front that updates slices of a larger model (`fastopt.distributed`'s
        shards) passes each slice's place in the model, so that the random
        bits of an element do not depend on how the model was cut.

    Every array and every overlap between two of them is checked before
    anything is kept: a bad one raises TypeError/ValueError naming it.
    """
    cdef readonly int kind
    cdef readonly Py_ssize_t n, ngroups
    cdef readonly list params
    cdef readonly list states       # per parameter: [s1, s2, s3] (None if absent)
    cdef readonly list masters      # per parameter: float32 master, or None
    cdef readonly object state_dtype
    cdef readonly str state_rounding
    cdef readonly object seed
    cdef public bint found_inf      # the last step saw an inf/NaN gradient and did nothing
    cdef list names                 # None: params[i]
    cdef list held_steps            # the arrays holding the step counts
    cdef Rec *rec
    cdef int64_t *count             # per active segment: its count, read once per step
    cdef double *sval               # per active segment: its 2 numbers, likewise
    cdef int skind                  # Store code of the state
    cdef uint32_t seed_hash
    cdef unsigned char found
    cdef Coef check
    cdef list group_single          # per group: a parameter of it computes in float32
    cdef Py_ssize_t *act            # parameter index of each active segment
    cdef bint *has                  # 3 per group: every parameter has slot k
    cdef Hyper *hyper
    cdef Segment *segs
    cdef Coef *coefs
    cdef Written written
    cdef FactorJob *jobs            # Adafactor: per parameter, its job (nunits 0: empty)
    cdef FactorJob **jptr           # ... the active ones of a step
    cdef double *work               # ... their work areas
    cdef bint busy                  # a step (or hold()) is running
    cdef bint held                  # ... a hold(): its owner may set the rounding
    cdef object __weakref__         # (_LIVE: the optimizers a forked child sets idle)

    def __cinit__(self):
        self.rec = NULL
        self.count = NULL
        self.sval = NULL
        self.act = NULL
        self.has = NULL
        self.hyper = NULL
        self.segs = NULL
        self.coefs = NULL
        self.jobs = NULL
        self.jptr = NULL
        self.work = NULL

    def __dealloc__(self):
        PyMem_Free(self.rec)
        PyMem_Free(self.count)
        PyMem_Free(self.sval)
        PyMem_Free(self.act)
        PyMem_Free(self.has)
        PyMem_Free(self.hyper)
        PyMem_Free(self.segs)
        PyMem_Free(self.coefs)
        PyMem_Free(self.jobs)
        PyMem_Free(self.jptr)
        PyMem_Free(self.work)

    def __init__(self, str kind, list params, list group_of, Py_ssize_t ngroups, list states,
                 list masters, steps, *, list names=None, state_dtype=None,
                 state_rounding="nearest", seed=0, list scalars=None, list sr_keys=None):
        if self.rec != NULL:
            raise RuntimeError("FusedStep is already initialized")
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
        self.kind = KINDS[kind]
        cdef Py_ssize_t n = len(params), ng = ngroups, i, k, g
        for what, lst in (("group_of", group_of), ("states", states), ("masters", masters)):
            if len(lst) != n:
                raise ValueError(f"{what} must have one entry per parameter")
        if names is not None and len(names) != n:
            raise ValueError("names must have one entry per parameter")
        if sr_keys is not None and len(sr_keys) != n:
            raise ValueError("sr_keys must have one entry per parameter")
        cdef tuple scalar_names = SCALAR_NAMES[self.kind]
        if scalar_names and (scalars is None or len(scalars) != n):
            raise ValueError(f"this optimizer keeps {', '.join(scalar_names)} per parameter: "
                             "scalars must have one entry per parameter")
        self.names = None if names is None else [str(x) for x in names]
        for i in range(n):
            g = group_of[i]
            if not 0 <= g < ng:
                raise ValueError(f"group_of[{i}] = {g} is not a group index")
        # Low-precision options.
        cdef object sdt = state_dtype_name(state_dtype)
        check_rounding(state_rounding, seed)
        refuse_low_precision(KIND_DECL[self.kind], state_dtype, False)
        cdef object bf16 = bfloat16_dtype("state_dtype='bfloat16'") if sdt is not None else None
        cdef list steps_of = step_arrays(steps, n)
        # Allocate before checking, so that a MemoryError leaves nothing half-made.
        cdef Py_ssize_t m = max(n, 1)
        self.rec = <Rec *>PyMem_Malloc(m * sizeof(Rec))
        self.count = <int64_t *>PyMem_Malloc(m * sizeof(int64_t))
        self.sval = <double *>PyMem_Malloc(2 * m * sizeof(double))
        self.act = <Py_ssize_t *>PyMem_Malloc(m * sizeof(Py_ssize_t))
        self.segs = <Segment *>PyMem_Malloc(m * sizeof(Segment))
        self.coefs = <Coef *>PyMem_Malloc(m * sizeof(Coef))
        self.has = <bint *>PyMem_Malloc(3 * max(ng, 1) * sizeof(bint))
        self.hyper = <Hyper *>PyMem_Malloc(max(ng, 1) * sizeof(Hyper))
        if (self.rec == NULL or self.count == NULL or self.sval == NULL or self.act == NULL
                or self.segs == NULL
                or self.coefs == NULL or self.has == NULL or self.hyper == NULL):
            raise MemoryError()
        self.n = n
        self.ngroups = ng
        self.written = Written(8 * n)
        self.group_single = [False] * ng
        for k in range(3 * ng):
            self.has[k] = True
        cdef tuple slot_names = SLOT_NAMES[self.kind]
        cdef tuple slot_decls = KIND_DECL[self.kind].slots
        cdef object shape_k
        cdef Rec *r
        cdef cnp.ndarray p, w, s
        cdef object want
        cdef dict seen = {}
        self.params, self.states, self.masters, self.held_steps = [], [], [], []
        for i in range(n):
            r = &self.rec[i]
            p = writable(any_float_array(params[i], self.param_name(i)), self.param_name(i))
            if not direct(p):
                raise ValueError(f"{self.param_name(i)} must be C-contiguous and aligned")
            if id(p) in seen:
                raise ValueError(f"{self.param_name(seen[id(p)])} and {self.param_name(i)} are "
                                 "the same array (a parameter may appear only once)")
            seen[id(p)] = i
            r.code = dtype_code(p)
            if sdt is not None and r.code == DT_F64:
                raise ValueError(f"state_dtype='bfloat16' needs float32, float16 or bfloat16 "
                                 f"parameters, but {self.param_name(i)} is float64")
            r.group = <int>group_of[i]
            r.typenum = cnp.PyArray_TYPE(p)
            r.size = cnp.PyArray_SIZE(p)
            r.okind = store_of(r.code)
            r.key_index, r.key_offset = sr_key(sr_keys[i] if sr_keys is not None else (i, 0), i)
            if r.code != DT_F64:
                self.group_single[r.group] = True
            # The array the kernels update: the parameter, or its master (for
            # a bfloat16 parameter either float32, or uint16: the low 16 bits
            # of a master whose high bits the parameter holds, SPLIT).
            if (r.code == DT_BF16 and cnp.PyArray_Check(masters[i])
                    and cnp.PyArray_TYPE(<cnp.ndarray>masters[i]) == cnp.NPY_UINT16):
                r.okind = SPLIT
                w = self.bound_array(masters[i], p, i, 4, np.dtype(np.uint16), True)
            else:
                w = self.bound_array(masters[i], p, i, 4, np.dtype(np.float32)) \
                    if r.code == DT_F16 or r.code == DT_BF16 else None
            if r.okind == SPLIT:
                refuse_low_precision(KIND_DECL[self.kind], None, True)
            if w is None and masters[i] is not None:
                raise ValueError(f"{self.state_name(i, 4)} is only for float16/bfloat16 "
                                 f"parameters, but {self.param_name(i)} is {p.dtype}")
            r.param = cnp.PyArray_DATA(w if w is not None else p)
            r.out = cnp.PyArray_DATA(p) if w is not None else NULL
            self.written.add(cnp.PyArray_DATA(p), cnp.PyArray_NBYTES(p), i, 0)
            if w is not None:
                self.written.add(r.param, cnp.PyArray_NBYTES(w), i, 4)
            want = (np.dtype(np.float64) if r.code == DT_F64
                    else bf16 if sdt is not None else np.dtype(np.float32))
            st = list(states[i]) if isinstance(states[i], (tuple, list)) else None
            if st is None or len(st) != 3:
                raise ValueError(f"states[{i}] must be a tuple of 3 arrays or Nones, "
                                 f"got {states[i]!r}")
            for k in range(3):
                if st[k] is not None and slot_names[k] is None:
                    raise ValueError(f"states[{i}][{k}]: this optimizer has no state slot {k}")
                shape_k = None
                if self.kind == FACTORED:       # (the slots a parameter has follow its shape)
                    shape_k = slot_decls[k].shape_for((<object>p).shape)
                    if shape_k is None and st[k] is not None:
                        raise ValueError(f"{self.param_name(i)} has shape {(<object>p).shape}: "
                                         f"its state has no {slot_names[k]!r}")
                    if shape_k is not None and st[k] is None:
                        raise ValueError(f"{self.param_name(i)} (shape {(<object>p).shape}) "
                                         f"needs {self.state_name(i, 1 + k)}, of shape "
                                         f"{shape_k}")
                s = (self.bound_array(st[k], p, i, 1 + k, want, False, shape_k)
                     if st[k] is not None else None)
                r.s[k] = cnp.PyArray_DATA(s) if s is not None else NULL
                if s is not None:
                    self.written.add(r.s[k], cnp.PyArray_NBYTES(s), i, 1 + k)
                else:
                    self.has[3 * r.group + k] = False
                st[k] = s
            s = self.step_array(steps_of[i], i)
            r.step = cnp.PyArray_DATA(s)
            r.step_type = cnp.PyArray_TYPE(s)
            self.written.add(r.step, cnp.PyArray_ITEMSIZE(s), i, 5)
            r.scal[0] = r.scal[1] = NULL
            r.scal_double = False
            for k in range(len(scalar_names)):
                s = self.scalar_array(scalars[i][k] if isinstance(scalars[i], (tuple, list))
                                      and len(scalars[i]) == len(scalar_names) else None, i, k)
                r.scal[k] = cnp.PyArray_DATA(s)
                r.scal_double = cnp.PyArray_TYPE(s) == cnp.NPY_FLOAT64
                self.written.add(r.scal[k], cnp.PyArray_ITEMSIZE(s), i, 6 + k)
                self.held_steps.append(s)
            self.params.append(p)
            self.states.append(st)
            self.masters.append(w)
            self.held_steps.append(s)
        self.written.seal(self.array_name)
        if self.kind == FACTORED:
            self.factor_jobs()
        self.state_dtype = sdt
        self.state_rounding = state_rounding
        self.seed = seed.__index__()
        self.seed_hash = fastopt_hash32(<uint32_t>self.seed)
        self.skind = NATIVE if sdt is None else (BF16_SR if state_rounding == "stochastic" else BF16)
        self.found_inf = False
        _LIVE.add(self)

    cdef int factor_jobs(self) except -1:
        """Adafactor: each parameter's job (arrays, units) and work area."""
        cdef Py_ssize_t i, m = max(self.n, 1), nwork = 0
        cdef cnp.ndarray p, w
        cdef list st
        self.jobs = <FactorJob *>PyMem_Malloc(m * sizeof(FactorJob))
        self.jptr = <FactorJob **>PyMem_Malloc(m * sizeof(FactorJob *))
        if self.jobs == NULL or self.jptr == NULL:
            raise MemoryError()
        for i in range(self.n):
            p = <cnp.ndarray>self.params[i]
            w = p if self.masters[i] is None else <cnp.ndarray>self.masters[i]
            st = <list>self.states[i]
            self.jobs[i].nunits = 0
            if cnp.PyArray_SIZE(p) == 0:        # (nothing to update; its count advances)
                continue
            if st[2] is not None:
                fac_arrays(&self.jobs[i], w, p, NATIVE, <cnp.ndarray>st[2], None)
            else:
                fac_arrays(&self.jobs[i], w, p, NATIVE, <cnp.ndarray>st[0],
                           <cnp.ndarray>st[1])
            nwork += fac_work_size(&self.jobs[i])
        self.work = <double *>PyMem_Malloc(max(nwork, 1) * sizeof(double))
        if self.work == NULL:
            raise MemoryError()
        nwork = 0
        for i in range(self.n):
            if self.jobs[i].nunits:
                fac_work(&self.jobs[i], self.work + nwork)
                nwork += fac_work_size(&self.jobs[i])
        return 0

    cdef cnp.ndarray bound_array(self, object a, cnp.ndarray p, Py_ssize_t i, int slot,
                                 object dtype, bint bits=False, object shape=None):
        """A state array or master of params[i] (slot as in Interval), checked
        (`bits`: a uint16 array, not a float one; `shape`: its shape, if not
        the parameter's)."""
        cdef str name = self.state_name(i, slot)
        cdef cnp.ndarray s = writable(a if bits else any_float_array(a, name), name)
        native(s, name)
        if s.dtype != dtype:
            raise TypeError(f"{name} must have dtype {dtype}, got {s.dtype}")
        if shape is not None:
            if (<object>s).shape != shape:
                raise ValueError(f"{name} must have shape {shape} for {self.param_name(i)} of "
                                 f"shape {(<object>p).shape}, got {(<object>s).shape}")
        elif not same_shape(s, p):
            raise ValueError(f"{name} has shape {(<object>s).shape} but "
                             f"{self.param_name(i)} has shape {(<object>p).shape}")
        if not direct(s):
            raise ValueError(f"{name} must be C-contiguous and aligned")
        return s

    cdef cnp.ndarray scalar_array(self, object a, Py_ssize_t i, int k):
        """The one-element float32/float64 array of params[i]'s number k, checked."""
        cdef str name = self.state_name(i, 6 + k)
        if not cnp.PyArray_Check(a):
            raise TypeError(f"{name} must be a numpy.ndarray of one number, got "
                            f"{type(a).__name__}")
        cdef cnp.ndarray s = <cnp.ndarray>a
        if cnp.PyArray_TYPE(s) != cnp.NPY_FLOAT32 and cnp.PyArray_TYPE(s) != cnp.NPY_FLOAT64:
            raise TypeError(f"{name} must have dtype float32 or float64, got {s.dtype}")
        native(s, name)
        writable(s, name)
        if cnp.PyArray_SIZE(s) != 1 or not cnp.PyArray_ISALIGNED(s):
            raise ValueError(f"{name} must be one aligned number, got shape {(<object>s).shape}")
        return s

    cdef cnp.ndarray step_array(self, object a, Py_ssize_t i):
        """The one-element array holding params[i]'s step count, checked."""
        cdef str name = self.count_name(i)
        if not cnp.PyArray_Check(a):
            raise TypeError(f"{name} must be a numpy.ndarray, got {type(a).__name__}")
        cdef cnp.ndarray s = <cnp.ndarray>a
        cdef int t = cnp.PyArray_TYPE(s)
        if t != cnp.NPY_INT64 and t != cnp.NPY_FLOAT32 and t != cnp.NPY_FLOAT64:
            raise TypeError(f"{name} must have dtype int64, float32 or float64, got {s.dtype}")
        native(s, name)
        writable(s, name)
        if cnp.PyArray_SIZE(s) != 1 or not cnp.PyArray_ISALIGNED(s):
            raise ValueError(f"{name} must be one aligned number, got shape {(<object>s).shape}")
        return s

    # ---------------------------------------------------------------- names

    cdef str param_name(self, Py_ssize_t i):
        return f"params[{i}]" if self.names is None else self.names[i]

    cdef str grad_name(self, Py_ssize_t i):
        return f"grads[{i}]" if self.names is None else f"the gradient of {self.names[i]}"

    cdef str count_name(self, Py_ssize_t i):
        return f"step_counts[{i}]" if self.names is None else f"state['step'] of {self.names[i]}"

    cdef str state_name(self, Py_ssize_t i, int slot):
        cdef str key = (("master_low_bits" if self.rec[i].okind == SPLIT else "master_param")
                        if slot == 4 else SCALAR_NAMES[self.kind][slot - 6]
                        if slot >= 6 else SLOT_NAMES[self.kind][slot - 1])
        if self.names is None:
            return f"state[{i}][{key!r}]"
        return f"the state of {self.names[i]}[{key!r}]"

    def array_name(self, Py_ssize_t i, int slot):
        """How errors name array `slot` (as in `Interval`) of parameter i."""
        if slot == 0:
            return self.param_name(i)
        if slot == 5:
            return self.count_name(i)
        return self.state_name(i, slot)

    # ------------------------------------------------------ hyperparameters

    cdef Py_ssize_t check_group_params(self, dict g, Py_ssize_t gi, Py_ssize_t i) except -1:
        """param_groups[gi]["params"] holds this step's parameters i, i+1, ...
        (by identity, in order); returns the index after them."""
        cdef object ps = group_get(g, "params", gi)
        cdef Py_ssize_t j, m, expected = 0, k
        for k in range(i, self.n):
            if self.rec[k].group != gi:
                break
            expected += 1
        if not isinstance(ps, (list, tuple)):
            raise TypeError(f"param_groups[{gi}]['params'] must be a list of arrays, "
                            f"got {type(ps).__name__}")
        m = len(ps)
        if m != expected:
            raise ValueError(f"param_groups[{gi}]['params'] holds {m} arrays, but the optimizer "
                             f"was built with {expected}: parameters cannot be added or removed "
                             "by editing the list (use add_param_group, or build a new optimizer)")
        for j in range(m):
            if ps[j] is not self.params[i + j]:
                raise ValueError(f"param_groups[{gi}]['params'][{j}] is not the array the "
                                 "optimizer was built with: its state belongs to that array "
                                 "(update the array in place, or build a new optimizer)")
        return i + m

    cdef int parse_groups(self, object groups, bint same_params=False) except -1:
        """Validate every group's hyperparameters into self.hyper, as the
        optimizer's kind declares them (fastopt._kinds: ranges, and the
        options that need a state array).  With `same_params`, also that the
        groups hold the very arrays this step was built over, in order: a
        parameter replaced in, removed from or appended to a group's
        "params" is refused (the state belongs to the array it was made
        for), never silently left out of the step."""
        cdef list gl
        if type(groups) is list:
            gl = <list>groups
        elif isinstance(groups, (tuple, list)):
            gl = list(groups)
        else:
            raise TypeError(f"param_groups must be a list of dicts, got {type(groups).__name__}")
        if len(gl) != self.ngroups:
            raise ValueError(f"expected {self.ngroups} param groups, got {len(gl)} "
                             "(add a group with add_param_group)")
        cdef Py_ssize_t gi, j, i = 0
        cdef dict g
        cdef Hyper *h
        cdef object opt
        cdef bint *has
        cdef tuple options = SLOT_OPTIONS[self.kind]
        for gi in range(self.ngroups):
            if type(gl[gi]) is not dict:
                raise TypeError(f"param_groups[{gi}] must be a dict, got {type(gl[gi]).__name__}")
            g = <dict>gl[gi]
            h = &self.hyper[gi]
            has = &self.has[3 * gi]
            if same_params:
                i = self.check_group_params(g, gi, i)
            read_hypers(h, g, self.kind, gi, SINGLE_GROUP if self.group_single[gi] else None)
            # An option that needs a state array the parameters were built without.
            for j in range(3):
                opt = options[j]
                if opt is not None and not has[j] and slot_on(h, opt):
                    raise ValueError(
                        f"param_groups[{gi}][{opt[0]!r}] was {'False' if opt[2] else 0} at "
                        f"construction, so there is no {SLOT_NAMES[self.kind][j]} state: "
                        f"construct the optimizer with "
                        f"{opt[0]}{'=True' if opt[2] else ' > 0'}")
        return 0

    def hold(self, str what):
        """Mark this step busy for `what`, an operation that must not overlap a
        step (add_param_group, load_state_dict): a step that starts meanwhile
        raises, and so does this if a step is running.  The holder may set
        the step counts and the rounding meanwhile."""
        if self.busy:
            raise RuntimeError(f"{what} called during a step of the same optimizer")
        self.busy = self.held = True

    def release(self):
        """End `hold`."""
        self.busy = self.held = False

    def check_groups(self, groups):
        """Validate param groups' hyperparameters (raises like `step`)."""
        if self.busy:
            raise RuntimeError("check_groups() called during a step of the same optimizer")
        self.parse_groups(groups)

    # ----------------------------------------------------------------- step

    def step(self, grads, groups, grad_scale=None):
        """Update every parameter whose gradient is not None, in one native call.

        `grads` is a list (or tuple) with one entry per parameter, in order:
        an ndarray of the parameter's dtype (or float32 for a float16/bfloat16
        parameter) and shape, or None to leave that parameter (and its state
        and step count) untouched.  `groups` are the param-group dicts, read
        for this step's hyperparameters; they must hold the very arrays this
        step was built over, in order.

        `grad_scale`: the gradients are multiplied by 1/grad_scale (a finite
        number > 0; its reciprocal rounded to the compute dtype) as they are
        read.  If any of them holds an inf or NaN, nothing changes and
        `found_inf` is set (else cleared).

        Stochastic rounding of bfloat16 state: element i of parameter j at
        its step count t (after this update) draws the 32 random bits
        ``r = hash32(key + o + i)``, ``key = hash32(hash32(hash32(seed) ^ j) ^ t)``
        (all mod 2**32; (j, o) from `sr_keys`, by default (its index, 0)); the first state array of `SLOT_NAMES` rounds with the
        high 16 bits of r, the second with its low 16 bits, the third with
        the high 16 bits of hash32(r).
        """
        cdef Py_ssize_t nact = 0, total = 0
        cdef double inv = 1.0
        # Busy from the first check to the end: the checks may run Python code
        # (a custom number's __float__) that lets another thread in.
        self.enter("step()")
        try:
            self.parse_groups(groups, True)
            if grad_scale is not None:
                inv = reciprocal_scale(grad_scale)
            keep = self.parse_grads(grads, False, &nact, &total)
            self.update(nact, total, grad_scale is not None, inv)
        finally:
            self.busy = False

    def step_addresses(self, groups, grad_addr, grad_scale=None):
        """`step` with each gradient given by the address of its data.

        For bridges from tensor libraries (``fastopt.torch``), which read and
        check their gradients themselves, faster than wrapping each one in an
        ndarray.  `grad_addr` is a C-contiguous ``np.uintp`` array with one
        entry per parameter: 0 skips the parameter (as a None gradient does);
        otherwise the address of its gradient, which the caller guarantees to
        be ``params[i].size`` elements of params[i]'s dtype in params[i]'s
        memory order, alive and unchanged until this returns.  An address
        cannot show dtype, extent or lifetime, so those are the caller's
        checks; this one checks what it can: alignment, and that no gradient
        overlaps memory the step writes.  For an empty parameter a nonzero
        entry only marks it updated (its step count advances); nothing is
        read.  `grad_scale` as for `step`.
        """
        cdef cnp.ndarray addr, p
        cdef const uintptr_t *av
        cdef uintptr_t a
        cdef Py_ssize_t i, j, nact = 0, total = 0, nb
        cdef double inv = 1.0
        self.enter("step()")
        try:
            self.parse_groups(groups, False)
            if grad_scale is not None:
                inv = reciprocal_scale(grad_scale)
            if not (cnp.PyArray_Check(grad_addr)
                    and cnp.PyArray_TYPE(<cnp.ndarray>grad_addr) == cnp.NPY_UINTP
                    and cnp.PyArray_NDIM(<cnp.ndarray>grad_addr) == 1
                    and cnp.PyArray_DIM(<cnp.ndarray>grad_addr, 0) == self.n
                    and cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>grad_addr)
                    and cnp.PyArray_ISALIGNED(<cnp.ndarray>grad_addr)):
                raise TypeError(f"grad_addr must be a C-contiguous numpy.uintp array of "
                                f"{self.n} entries")
            addr = <cnp.ndarray>grad_addr
            av = <const uintptr_t *>cnp.PyArray_DATA(addr)
            for i in range(self.n):
                a = av[i]
                if a == 0:
                    continue
                p = <cnp.ndarray>self.params[i]
                self.check_param(i)
                self.count[nact] = self.read_count(i)
                self.read_scalars(i, &self.sval[2 * nact])
                nb = cnp.PyArray_NBYTES(p)
                if nb > 0:
                    if a % <uintptr_t>cnp.PyArray_ITEMSIZE(p) != 0:
                        raise ValueError(f"{self.grad_name(i)} at address {a:#x} is not "
                                         f"aligned for {p.dtype}")
                    if a + <uintptr_t>nb < a:
                        raise ValueError(f"{self.grad_name(i)} at address {a:#x} wraps "
                                         "around memory")
                    self.refuse_overlap(i, a, a + <uintptr_t>nb)
                self.fill_segment_of(i, nact, <void *>a, store_of(self.rec[i].code), total)
                total += self.rec[i].size
                nact += 1
            self.update(nact, total, grad_scale is not None, inv)
        finally:
            self.busy = False

    cdef int enter(self, str what) except -1:
        if self.busy:
            raise RuntimeError(f"{what} called concurrently on the same optimizer")
        self.busy = True
        return 0

    cdef int update(self, Py_ssize_t nact, Py_ssize_t total, bint scaled, double inv) except -1:
        """Everything is valid: the step itself (nothing below can fail)."""
        cdef bint found = False
        with nogil:
            if scaled:
                found = self.nonfinite(nact, total)
            if not found:
                self.run(nact, total, inv)
        self.found_inf = found
        if not found:
            self.write_counts(nact)
        return 0

    def unscale_(self, grads, grad_scale):
        """Multiply the gradients by 1/grad_scale in place (in their own
        dtypes) and return whether any of them holds an inf or NaN (checked
        first, in one parallel pass).  `grads` as for `step`; every array
        given must be C-contiguous, aligned, writeable and disjoint from the
        others and from the optimizer's arrays."""
        cdef Py_ssize_t nact = 0, total = 0, k
        cdef bint found
        self.enter("unscale_()")
        try:
            self.check.kind = CHECK
            self.check.inv_scale = reciprocal_scale(grad_scale)
            keep = self.parse_grads(grads, True, &nact, &total)
            with nogil:
                found = self.nonfinite(nact, total)
                self.check.kind = UNSCALE
                for k in range(nact):
                    self.segs[k].coef = &self.check
                core.optim.run_segments(self.segs, nact, total)
            return found
        finally:
            self.busy = False

    cdef int check_param(self, Py_ssize_t i) except -1:
        """params[i] is still the array the step writes through: the pointer,
        dtype and size recorded at construction (Python code can change an
        array's dtype or byte order in place, or resize an array it holds the
        only other reference to), and it can still take a step."""
        cdef cnp.ndarray p = <cnp.ndarray>self.params[i]
        cdef const Rec *r = &self.rec[i]
        cdef void *data = r.out if r.out != NULL else r.param
        if (cnp.PyArray_DATA(p) != data or cnp.PyArray_TYPE(p) != r.typenum
                or cnp.PyArray_SIZE(p) != r.size or not direct(p)):
            raise ValueError(f"{self.param_name(i)} is no longer the array the optimizer was "
                             "made with (its memory, dtype, size, byte order or "
                             "layout was changed)")
        if not cnp.PyArray_ISWRITEABLE(p):
            raise ValueError(f"{self.param_name(i)} is read-only and cannot be updated in place")
        return 0

    cdef int64_t read_count(self, Py_ssize_t i) except -1:
        """params[i]'s step count, read once (its front may let Python code
        change it); one that cannot count one more step is refused."""
        cdef const Rec *r = &self.rec[i]
        cdef double c
        cdef int64_t k
        if r.step_type == cnp.NPY_INT64:
            k = (<int64_t *>r.step)[0]
            if k < 0:
                raise ValueError(f"{self.count_name(i)} must be >= 0, got {k}")
        else:
            c = (<double *>r.step)[0] if r.step_type == cnp.NPY_FLOAT64 else (<float *>r.step)[0]
            if not (0.0 <= c <= 9007199254740992.0 and c == floor(c)):
                raise ValueError(f"{self.count_name(i)} must be a whole number >= 0, got {c!r}")
            k = <int64_t>c
        if k == INT64_MAX and counts(self.kind, &self.hyper[r.group]):
            raise ValueError(f"{self.param_name(i)} has taken 2**63 - 1 steps, the most its "
                             "step count can hold")
        return k

    cdef int read_scalars(self, Py_ssize_t i, double *out) except -1:
        """params[i]'s numbers besides its arrays, read once: finite, >= 0."""
        cdef const Rec *r = &self.rec[i]
        cdef int k
        cdef double v
        for k in range(2):
            if r.scal[k] == NULL:
                break
            v = (<double *>r.scal[k])[0] if r.scal_double else (<float *>r.scal[k])[0]
            if not (isfinite(v) and v >= 0):
                raise ValueError(f"{self.state_name(i, 6 + k)} must be a finite number >= 0, "
                                 f"got {v!r}")
            out[k] = v
        return 0

    cdef void write_counts(self, Py_ssize_t nact) noexcept:
        """The new step counts and numbers (self.count, self.sval after `run`)
        into the front's arrays."""
        cdef Py_ssize_t k
        cdef int j
        cdef const Rec *r
        for k in range(nact):
            r = &self.rec[self.act[k]]
            for j in range(2):
                if r.scal[j] != NULL:
                    if r.scal_double:
                        (<double *>r.scal[j])[0] = self.sval[2 * k + j]
                    else:
                        (<float *>r.scal[j])[0] = <float>self.sval[2 * k + j]
            if r.step_type == cnp.NPY_INT64:
                (<int64_t *>r.step)[0] = self.count[k]
            elif r.step_type == cnp.NPY_FLOAT64:
                (<double *>r.step)[0] = <double>self.count[k]
            else:
                (<float *>r.step)[0] = <float>self.count[k]

    cdef int refuse_overlap(self, Py_ssize_t i, uintptr_t lo, uintptr_t hi) except -1:
        """The gradient of params[i], bytes [lo, hi), overlaps nothing written."""
        cdef Py_ssize_t j = self.written.find(lo, hi)
        if j >= 0:
            raise ValueError(f"{self.grad_name(i)} overlaps "
                             f"{self.array_name(self.written.iv[j].owner, self.written.iv[j].slot)} "
                             "in memory")
        return 0

    cdef void fill_segment_of(self, Py_ssize_t i, Py_ssize_t na, void *grad, int gk,
                              Py_ssize_t offset) noexcept:
        cdef Segment *s = &self.segs[na]
        cdef const Rec *r = &self.rec[i]
        s.param = r.param
        s.grad = grad
        s.s1 = r.s[0]
        s.s2 = r.s[1]
        s.s3 = r.s[2]
        s.out = r.out
        s.n = r.size
        s.offset = offset
        s.is_double = r.code == DT_F64
        s.gk = gk
        s.sk = self.skind
        s.ok = r.okind
        s.key = 0
        self.act[na] = i

    cdef object parse_grads(self, object grads, bint in_place, Py_ssize_t *nact,
                            Py_ssize_t *total):
        """Check `grads` and fill self.segs with the active ones (and
        self.count with their step counts); returns the private native
        contiguous copies of the grads that are not (strided, unaligned or
        byte-swapped), to keep alive while they are used.  `in_place`
        (unscale_): the grads will be written (no copies; disjoint from each
        other); otherwise a step follows (parse_groups ran)."""
        cdef list gl
        cdef Py_ssize_t i, j, na = 0, tot = 0
        cdef object gobj
        cdef cnp.ndarray ga, p
        cdef list keep = None
        cdef char *glo
        cdef char *ghi
        cdef int pc, gc
        # A private copy of the list: the arrays it references stay alive
        # while the GIL is released, whatever other threads do to `grads`.
        if type(grads) is list or type(grads) is tuple:
            gl = list(grads)
        else:
            raise TypeError(f"grads must be a list or tuple of arrays, got {type(grads).__name__}")
        if len(gl) != self.n:
            raise ValueError(f"expected {self.n} grads (one per parameter, in order; "
                             f"None skips a parameter), got {len(gl)}")
        for i in range(self.n):
            gobj = gl[i]
            if gobj is None:
                continue
            p = <cnp.ndarray>self.params[i]
            self.check_param(i)
            if not in_place:
                self.count[na] = self.read_count(i)
                self.read_scalars(i, &self.sval[2 * na])
            if not cnp.PyArray_Check(gobj):
                raise TypeError(f"{self.grad_name(i)} must be a numpy.ndarray or None, "
                                f"got {type(gobj).__name__}")
            ga = <cnp.ndarray>gobj
            pc = self.rec[i].code
            gc = dtype_code(ga)
            if gc != pc and not (gc == DT_F32 and (pc == DT_F16 or pc == DT_BF16)):
                raise TypeError(f"{self.grad_name(i)} has dtype {ga.dtype} but "
                                f"{self.param_name(i)} has dtype {p.dtype}"
                                + (f" (the gradient of a {p.dtype} parameter is "
                                   f"{p.dtype} or float32)" if self.rec[i].out != NULL else ""))
            if not same_shape(ga, p):
                raise ValueError(f"{self.grad_name(i)} has shape {(<object>ga).shape} but "
                                 f"{self.param_name(i)} has shape {(<object>p).shape}")
            if in_place:
                writable(ga, self.grad_name(i))
            # Every byte the gradient can reach, before any copy: a gradient
            # that shares memory with what the step writes is refused.
            extent(ga, &glo, &ghi)
            if glo < ghi:
                self.refuse_overlap(i, <uintptr_t>glo, <uintptr_t>ghi)
            if not direct(ga):
                ga = readable(ga)      # a private native contiguous copy
                if keep is None:
                    keep = []
                keep.append(ga)
            self.fill_segment_of(i, na, cnp.PyArray_DATA(ga), store_of(gc), tot)
            tot += self.rec[i].size
            na += 1
        if in_place:
            disjoint_arrays([gl[self.act[j]] for j in range(na)],
                            [self.grad_name(self.act[j]) for j in range(na)])
        nact[0] = na
        total[0] = tot
        return keep

    cdef bint nonfinite(self, Py_ssize_t nact, Py_ssize_t total) noexcept nogil:
        """Whether a gradient of the active segments holds inf or NaN."""
        cdef Py_ssize_t k
        self.found = 0
        self.check.kind = CHECK
        self.check.found = &self.found
        for k in range(nact):
            self.segs[k].coef = &self.check
        core.optim.run_segments(self.segs, nact, total)
        return self.found != 0

    cdef void run(self, Py_ssize_t nact, Py_ssize_t total, double inv_scale) noexcept nogil:
        """Coefficients, keys and new step counts (self.count) of the active
        segments, then the update."""
        cdef Py_ssize_t k, i, nc = 0
        cdef int g, prev_g = -1
        cdef int64_t st, prev_st = -1
        cdef const Hyper *h
        if self.kind == FACTORED:
            self.run_factored(nact, inv_scale)
            return
        for k in range(nact):
            i = self.act[k]
            g = self.rec[i].group
            h = &self.hyper[g]
            st = self.count[k] + 1 if counts(self.kind, h) else self.count[k]
            if g != prev_g or st != prev_st or self.rec[i].scal[0] != NULL:
                kind_coef_of(self.kind, &self.coefs[nc], h, <double>st, &self.sval[2 * k],
                             not self.rec[i].scal_double)
                self.coefs[nc].inv_scale = inv_scale
                nc += 1
                prev_g = g
                prev_st = st
            self.segs[k].coef = &self.coefs[nc - 1]
            self.segs[k].key = fastopt_hash32(fastopt_hash32(self.seed_hash
                                                             ^ self.rec[i].key_index)
                                              ^ <uint32_t>st) + self.rec[i].key_offset
            self.count[k] = st
        core.optim.run_segments(self.segs, nact, total)

    cdef void run_factored(self, Py_ssize_t nact, double inv_scale) noexcept nogil:
        """Adafactor: the jobs of the active parameters, their numbers set,
        and their new step counts; then the step (three threaded passes)."""
        cdef Py_ssize_t k, nj = 0
        cdef const Hyper *h
        cdef FactorJob *j
        for k in range(nact):
            self.count[k] += 1
            j = &self.jobs[self.act[k]]
            if j.nunits == 0:
                continue
            h = &self.hyper[self.rec[self.act[k]].group]
            j.grad = self.segs[k].grad
            j.gk = self.segs[k].gk
            j.maximize = h.maximize
            j.inv_scale = inv_scale
            fac_numbers(j, <double>self.count[k], h.lr, h.beta2_decay, h.eps1, h.eps2, h.d,
                        h.weight_decay)
            self.jptr[nj] = j
            nj += 1
        core.optim.factored(self.jptr, nj)

    def set_rounding(self, state_rounding, seed):
        """Change how bfloat16 state is rounded (arguments as at construction)."""
        check_rounding(state_rounding, seed)
        if self.busy and not self.held:
            raise RuntimeError("set_rounding() called during a step of the same optimizer")
        self.state_rounding = state_rounding
        self.seed = seed.__index__()
        self.seed_hash = fastopt_hash32(<uint32_t>self.seed)
        if self.state_dtype is not None:
            self.skind = BF16_SR if state_rounding == "stochastic" else BF16

    def sync_params(self):
        """Write every float16/bfloat16 parameter from its master (rounded to
        nearest even), e.g. after the masters were loaded."""
        cdef Py_ssize_t i
        cdef const Rec *r
        for i in range(self.n):
            r = &self.rec[i]
            if r.out != NULL and r.okind != SPLIT:     # (SPLIT: the parameter is the master's top)
                self.check_param(i)
                with nogil:
                    core.optim.narrow(<const float *>r.param, <uint16_t *>r.out, r.size,
                                      r.okind, 0)


cdef inline bint counts(int kind, const Hyper *h) noexcept nogil:
    """Whether an update advances the step count: SGD counts only momentum
    updates (the buffer's first-step rule); Adam and RMSprop count every
    update, as PyTorch's state["step"]."""
    return kind != SGD or h.momentum != 0


cdef int check_rounding(object state_rounding, object seed) except -1:
    if state_rounding not in ("nearest", "stochastic"):
        raise ValueError(f"state_rounding must be 'nearest' or 'stochastic', "
                         f"got {state_rounding!r}")
    if isinstance(seed, bool) or not hasattr(seed, "__index__"):
        raise TypeError(f"seed must be an integer, got {type(seed).__name__}")
    if not 0 <= seed.__index__() < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed!r}")
    return 0


cdef tuple sr_key(object key, Py_ssize_t i):
    """An entry of FusedStep's sr_keys: two integers in [0, 2**32)."""
    if not isinstance(key, tuple) or len(key) != 2 or not all(
            hasattr(v, "__index__") and not isinstance(v, bool) and 0 <= v.__index__() < 2**32
            for v in key):
        raise ValueError(f"sr_keys[{i}] must be a pair of integers in [0, 2**32), got {key!r}")
    return key[0].__index__(), key[1].__index__()


cdef list step_arrays(object steps, Py_ssize_t n):
    """`steps` (FusedStep's argument) as one array per parameter."""
    cdef cnp.ndarray a
    if cnp.PyArray_Check(steps):
        a = <cnp.ndarray>steps
        if cnp.PyArray_NDIM(a) != 1 or cnp.PyArray_DIM(a, 0) != n:
            raise ValueError(f"steps must have shape ({n},), got {(<object>a).shape}")
        return [a[i:i + 1] for i in range(n)]
    if not isinstance(steps, (list, tuple)) or len(steps) != n:
        raise TypeError(f"steps must be an array of {n} step counts, or a list of {n} "
                        "one-element arrays")
    return list(steps)


# ===================================================== gradient clipping ===
#
# clip_grad_norm_ and clip_grad_value_ cut the gradients into the same fixed
# chunks (`grad_chunks`) and update them in one threaded pass.
#
# The global norm of a list of arrays, in one threaded pass.  The work is cut
# into fixed chunks of NORM_CHUNK elements inside each array (independent of
# the thread count); each chunk's partial (sum of |x|^p, or max |x|) is
# accumulated in double with 8 interleaved accumulators combined in a fixed
# order, and the partials are combined serially in chunk order.  So the norm
# is bit-identical on any number of threads.

DEF NORM_CHUNK = 16384

cdef list grad_arrays(object grads, list names):
    """The arrays of `grads` (an array, or a sequence of arrays and Nones),
    each float32/float64 and updatable in place; their names go to `names`."""
    cdef list arrays = []
    cdef Py_ssize_t i
    if cnp.PyArray_Check(grads):
        grads = [grads]
    elif not isinstance(grads, (list, tuple)):
        try:
            grads = list(grads)
        except TypeError:
            raise TypeError("grads must be an array or a sequence of arrays, "
                            f"got {type(grads).__name__}") from None
    for i, a in enumerate(grads):
        if a is None:
            continue
        arrays.append(writable(any_float_array(a, f"grads[{i}]"), f"grads[{i}]"))
        names.append(f"grads[{i}]")
    return arrays


cdef Chunk *grad_chunks(list arrays, Py_ssize_t *nchunks, Py_ssize_t *total) except NULL:
    """`arrays` cut into chunks of NORM_CHUNK elements (independent of the
    thread count), in order; the caller frees the list with PyMem_Free."""
    cdef Py_ssize_t i, k = 0, m, lo, itemsize
    cdef cnp.ndarray arr
    cdef bint is_double
    cdef int kind
    cdef char *base
    nchunks[0] = 0
    total[0] = 0
    for i in range(len(arrays)):
        m = cnp.PyArray_SIZE(<cnp.ndarray>arrays[i])
        total[0] += m
        nchunks[0] += (m + NORM_CHUNK - 1) // NORM_CHUNK
    cdef Chunk *chunks = <Chunk *>PyMem_Malloc(max(nchunks[0], 1) * sizeof(Chunk))
    if chunks == NULL:
        raise MemoryError()
    for i in range(len(arrays)):
        arr = <cnp.ndarray>arrays[i]
        m = cnp.PyArray_SIZE(arr)
        is_double = cnp.PyArray_TYPE(arr) == cnp.NPY_FLOAT64
        kind = store_of(dtype_code(arr))
        itemsize = cnp.PyArray_ITEMSIZE(arr)
        base = <char *>cnp.PyArray_DATA(arr)
        for lo in range(0, m, NORM_CHUNK):
            chunks[k].data = base + lo * itemsize
            chunks[k].n = min(NORM_CHUNK, m - lo)
            chunks[k].is_double = is_double
            chunks[k].kind = kind
            k += 1
    return chunks


cdef double norm_number(object x, str name) except? -1.0:
    """A real number that may be +-inf or NaN (the caller checks the range).
    Strings are rejected (``float("2")`` parses, but every other argument
    rejects strings)."""
    cdef double v
    if type(x) is float:
        v = <double>x
    elif isinstance(x, (str, bytes, bytearray)) or (
            cnp.PyArray_Check(x) and cnp.PyArray_NDIM(<cnp.ndarray>x) != 0):
        raise TypeError(f"{name} must be a number (math.inf for infinity), got {kind_of(x)}")
    else:
        try:
            v = float(x)
        except OverflowError:
            raise ValueError(f"{name} must be a float or inf, "
                             "got a number too large for a float") from None
        except (TypeError, ValueError):
            raise TypeError(f"{name} must be a number (math.inf for infinity), "
                            f"got {kind_of(x)}") from None
    return v


def clip_grad_norm_(grads, max_norm, norm_type=2.0, error_if_nonfinite=False, *, allgather=None):
    """Clip the global norm of a list of gradients in place; return the norm.

    Follows ``torch.nn.utils.clip_grad_norm_``: the p-norm of all elements of
    all arrays together (`norm_type` p > 0, or ``inf`` for max |x|) is
    computed in double; if it exceeds `max_norm`, every array is multiplied
    by ``max_norm / (total_norm + 1e-6)`` (cast to the array's dtype).  A
    NaN/inf norm scales by NaN/0 as PyTorch does, unless
    `error_if_nonfinite`.  The norm is identical whatever the thread count.

    .. warning:: Pass the *gradients*, not the parameters.  PyTorch's
       ``clip_grad_norm_(model.parameters(), 1.0)`` finds the gradients in
       ``.grad``; a NumPy array has none, so ``clip_grad_norm_(params, 1.0)``
       silently rescales the weights themselves.

    Parameters
    ----------
    grads : ndarray or sequence of (ndarray or None)
        float32/float64/float16/bfloat16, C-contiguous, writeable, native
        byte order, disjoint; None is skipped.  16-bit gradients are read
        as float32 and scaled in float32, rounded to nearest.
    max_norm : float
        >= 0; ``inf`` computes the norm and scales nothing (unless the norm
        is itself NaN or inf: then, as in PyTorch, the factor is NaN).
    norm_type : float
        p > 0 or ``inf`` (a number: strings such as ``"2"`` are rejected).
    error_if_nonfinite : bool
        Raise RuntimeError (and scale nothing) if the norm is NaN or inf.
    allgather : callable, optional
        For gradients split across processes: called with this process's
        partial (a float: the sum of ``|x|**p``, or max ``|x|`` for ``inf``),
        it returns every process's partial, in the same order on every
        process (``comm.allgather`` of mpi4py).  They are combined in that
        order, so every process gets the same norm, that of all the
        processes' gradients together (``fastopt.distributed`` uses it).

    Returns
    -------
    float
        The total norm before clipping.
    """
    cdef list names = []
    cdef list arrays = grad_arrays(grads, names)
    cdef double mx = norm_number(max_norm, "max_norm")
    if not mx >= 0:
        raise ValueError(f"max_norm must be >= 0 (inf: compute the norm, scale nothing), "
                         f"got {mx!r}")
    cdef double p = norm_number(norm_type, "norm_type")
    if not (p > 0):
        raise ValueError(f"norm_type must be > 0 or inf, got {norm_type!r}")
    cdef int mode = (NORM_INF if p == INFINITY else NORM_2 if p == 2.0
                     else NORM_1 if p == 1.0 else NORM_P)
    disjoint_arrays(arrays, names)
    cdef Py_ssize_t nchunks, total, k
    cdef Chunk *chunks = grad_chunks(arrays, &nchunks, &total)
    cdef double *part = <double *>PyMem_Malloc(max(nchunks, 1) * sizeof(double))
    cdef double tot = 0.0, coef
    cdef NormJob job
    job.chunks = chunks
    job.part = part
    job.mode = mode
    job.p = p
    try:
        if part == NULL:
            raise MemoryError()
        with nogil:
            core.optim.norm_parts(&job, nchunks, total)
            for k in range(nchunks):
                tot = max_nan(tot, part[k]) if mode == NORM_INF else tot + part[k]
        if allgather is not None:
            parts = [float(x) for x in allgather(tot)]
            tot = 0.0
            for x in parts:
                tot = max_nan(tot, x) if mode == NORM_INF else tot + x
        if mode == NORM_2:
            tot = sqrt(tot)
        elif mode == NORM_P:
            tot = pow(tot, 1.0 / p)
        if error_if_nonfinite and not isfinite(tot):
            raise RuntimeError(
                f"The total norm of order {p} for gradients is non-finite, so it cannot "
                "be clipped. To disable this error and scale the gradients by the "
                "non-finite norm anyway, set error_if_nonfinite=False")
        coef = mx / (tot + 1e-6)
        if not (coef >= 1.0):      # clamp(max=1); NaN scales by NaN as in PyTorch
            job.coef = coef
            with nogil:
                core.optim.scale(&job, nchunks, total)
    finally:
        PyMem_Free(chunks)
        PyMem_Free(part)
    return tot


def clip_grad_value_(grads, clip_value):
    """Clip every gradient element to [-clip_value, clip_value], in place.

    Follows ``torch.nn.utils.clip_grad_value_``: ``g = min(max(g,
    -clip_value), clip_value)`` elementwise over all arrays, with
    `clip_value` cast to each array's dtype; NaN stays NaN.  One threaded
    pass over the same fixed chunks as `clip_grad_norm_`.

    .. warning:: Pass the *gradients*, not the parameters (a NumPy array
       has no ``.grad``: the parameters themselves would be clipped).

    Parameters
    ----------
    grads : ndarray or sequence of (ndarray or None)
        The gradients: float32/float64/float16/bfloat16, C-contiguous,
        writeable, native byte order, disjoint; None is skipped.
    clip_value : float
        Finite, >= 0.

    Returns
    -------
    None
    """
    cdef list names = []
    cdef list arrays = grad_arrays(grads, names)
    cdef double clip = at_least(clip_value, "clip_value", 0.0)
    disjoint_arrays(arrays, names)
    cdef Py_ssize_t nchunks, total, k
    cdef Chunk *chunks = grad_chunks(arrays, &nchunks, &total)
    cdef NormJob job
    job.chunks = chunks
    job.coef = clip
    try:
        with nogil:
            core.optim.clamp(&job, nchunks, total)
    finally:
        PyMem_Free(chunks)
