# The interface between the two layers of fastopt.
#
# * The kernel core, _core.pyx, holds the `noexcept nogil` kernels of every
#   family and nothing else.  It is compiled once per SIMD level (into
#   fastopt._<level>._core) and publishes the table `CoreAPI` of its entry
#   points as a capsule.
# * The fronts, _optim.pyx, _batchnorm.pyx, _softmax.pyx and _train.pyx, are
#   compiled once: they own what the user sees (the `def` API, argument
#   checks, FusedStep, BatchNormContext), validate every argument, and call
#   the chosen level's kernels through the table (`core`, _common.pxi) with
#   clean input and the GIL released.
#
# This file declares only types, so cimporting it imports nothing at run
# time; the table's layout is versioned by the capsule's name.
from libc.stdint cimport int64_t, uint16_t, uint32_t, uint64_t

cdef extern from *:
    """
    #define FASTOPT_CORE_CAPSULE "fastopt._core.api_v2"
    """
    const char *FASTOPT_CORE_CAPSULE


ctypedef fused floating:
    float
    double


# Dtype codes of float arrays (the fronts' `dtype_code`).
cdef enum DType:
    DT_OTHER = -1
    DT_F32 = 0
    DT_F64 = 1
    DT_F16 = 2
    DT_BF16 = 3


# How a kernel's array is stored (what a Segment or a Job records).
cdef enum Store:
    NATIVE = 0      # the loop's own type (float or double); for an optional copy: none
    F16 = 1         # float16, round to nearest even
    BF16 = 2        # bfloat16, round to nearest even
    BF16_SR = 3     # bfloat16, stochastic rounding (reads like BF16)
    SPLIT = 4       # a bfloat16 parameter holding the high 16 bits of its float32
                    # master, whose low 16 bits are another uint16 array (`out` of a
                    # Segment: the parameter; `param`: the low bits)


# ------------------------------------------------------------------ train ---

ctypedef struct TrainCore:
    # dst[i] = src[idx[i]] for i in [0, n): rows of `rowbytes` bytes
    void (*gather_rows)(char *dst, const char *src, const int64_t *idx, Py_ssize_t n,
                        Py_ssize_t rowbytes) noexcept nogil
    # avg = beta*avg + (1-beta)*x over n elements
    void (*ewa_f32)(float *avg, const float *x, Py_ssize_t n, double beta) noexcept nogil
    void (*ewa_f64)(double *avg, const double *x, Py_ssize_t n, double beta) noexcept nogil


# ------------------------------------------------------------------ optim ---
# A `Segment` is one parameter array with its gradient, state and
# coefficients; `run_segments` updates a list of them as one job (the design
# is described in _optim.pyx).

cdef enum Kind:
    ADAM = 0
    RMSPROP = 1
    SGD = 2
    CHECK = 3       # no update: set *coef.found if the gradient holds inf or NaN
    UNSCALE = 4     # no update: grad *= coef.inv_scale, in place
    ADAGRAD = 5
    ADAMAX = 6
    NADAM = 7
    RADAM = 8
    ADADELTA = 9
    ASGD = 10
    RPROP = 11
    LION = 12
    FACTORED = 13   # Adafactor: not a segment kind (its steps run as FactorJobs)


ctypedef struct Coef:
    int kind
    bint maximize, l2, amsgrad, centered, momentum, nesterov, first
    bint rectify                   # RAdam: rho_t > 5, the rectified update
    bint average                   # ASGD: mu != 1 (ax moves toward param; else ax = param)
    double lr, weight_decay, eps
    double inv_scale               # 1/grad_scale (1: no loss scaling)
    unsigned char *found           # CHECK: set to 1 when a gradient is not finite
    # Adam (and Adamax, NAdam, RAdam, Lion: one_minus_beta1 is the weight of
    # torch's exp_avg.lerp_(grad, 1 - beta1))
    double beta1, one_minus_beta1, beta2, one_minus_beta2
    double step_size               # lr / (1 - beta1**step); Adagrad: lr / (1 + (step-1)*lr_decay)
    double bias_correction2_sqrt   # sqrt(1 - beta2**step)
    double decay                   # 1 - lr*weight_decay (decoupled), else 1; ASGD: 1 - lambd*eta
    # RMSprop (Adadelta: rho, 1 - rho)
    double alpha, one_minus_alpha
    # SGD / RMSprop momentum; ASGD: the averaging weight mu
    double mu, one_minus_dampening
    # NAdam, RAdam
    double bias_correction1, bias_correction2   # 1 - beta**step
    double grad_coef, avg_coef     # NAdam: lr*(1-mu)/(1-mu_product), lr*mu_next/(1-mu_product_next)
    double rect                    # RAdam: the variance rectification term
    # ASGD
    double eta
    # Rprop
    double etaminus, etaplus, step_size_min, step_size_max


ctypedef struct Segment:
    void *param     # the parameter, or its float32 master copy
    void *grad
    void *s1        # exp_avg | square_avg | momentum_buffer
    void *s2        # exp_avg_sq | momentum_buffer (RMSprop)
    void *s3        # max_exp_avg_sq | grad_avg
    void *out       # float16/bfloat16 parameter written from the master, or NULL
    Py_ssize_t n
    Py_ssize_t offset   # of the first element in the concatenation of segments
    bint is_double
    int gk, sk, ok      # Store codes of the gradient, the state and `out`
    uint32_t key        # of this array's stochastic rounding at this step
    const Coef *coef


# Gradient clipping: the gradients cut into fixed chunks (`Chunk`), one
# partial per chunk.
cdef enum NormKind:
    NORM_2 = 0
    NORM_1 = 1
    NORM_INF = 2
    NORM_P = 3

ctypedef struct Chunk:
    void *data
    Py_ssize_t n
    bint is_double
    int kind            # Store code: NATIVE, F16 or BF16 (read as float32)


ctypedef struct NormJob:
    const Chunk *chunks
    double *part        # per chunk: its sum (or max)
    int mode
    double p
    double coef         # the scale (clip_grad_norm_) or the bound (clip_grad_value_)


# Adafactor (not elementwise): the parameter as B matrices of R x C (its last
# two axes), cut into units fixed by the shape (`FactorJob.rb` rows by `cb`
# columns of one matrix; an unfactored 0-d or 1-d parameter: chunks of C
# elements), whose sums are combined in unit order (see _core_optim.pxi.tp).
ctypedef struct FactorJob:
    bint is_double, maximize
    bint factored            # R x C statistics (>= 2-d), else a variance like param
    int gk, ok               # Store codes of the gradient and of `out` (NATIVE: none)
    void *param              # the parameter, or its float32 master
    const void *grad
    void *out                # the float16/bfloat16 parameter written from the master, or NULL
    void *row_var            # factored: (B, R); else the variance, like param
    void *col_var            # factored: (B, C); else NULL
    Py_ssize_t B, R, C       # unfactored: B = R = 1, C elements
    Py_ssize_t rb, cb        # rows and columns per unit (unfactored: cb elements)
    Py_ssize_t nrb, ncb      # units per matrix along R and C
    Py_ssize_t mb            # > 0: a unit is mb whole matrices (each fits a unit), else 0
    Py_ssize_t nunits        # mb: ceil(B / mb); else B * nrb * ncb (unfactored: ncb)
    Py_ssize_t nparts        # partial sums: B (mb), else nunits
    double *unit_part        # (nparts,) work: each matrix's (mb) or unit's sum
    double *row_part         # (B, ncb, R) work (factored)
    double *col_part         # (B, nrb, C) work (factored)
    double *mean             # (B,) work: max(mean of row_var, eps1), in the loop's type
    # the step's numbers (torch's names)
    double inv_scale         # 1/grad_scale
    double w                 # step**beta2_decay, the weight of the statistics' lerp
    double eps1, eps2, d
    double rho               # min(lr, 1/sqrt(step))
    double decay             # 1 - lr*weight_decay
    # set by the core
    int stage                # the pass the units run: 1, 2, 3
    double param_norm        # |p|, before the step (torch's param.norm(2), in the loop's type)
    double update_norm       # |u| (torch's update.norm(2), in the loop's type)
    double alpha, scale      # the step: p -= scale * u, scale = alpha / max(1, |u|/(sqrt(n)*d))
    Py_ssize_t first         # its first unit in the numbering of the step's units


ctypedef struct FactorBatch:  # the jobs of one step (the core's context)
    FactorJob **jobs
    Py_ssize_t njobs


cdef inline double max_nan(double a, double b) noexcept nogil:
    """max(a, b); NaN in either gives NaN (torch's max of |x|)."""
    return a if (a > b or a != a) else b


ctypedef struct OptimCore:
    # every segment's update (or CHECK / UNSCALE pass), one threaded job
    void (*run_segments)(const Segment *segs, Py_ssize_t nseg, Py_ssize_t total) noexcept nogil
    # j.part[k] = chunk k's partial norm (j.mode, j.p), for k in [0, nchunks)
    void (*norm_parts)(NormJob *j, Py_ssize_t nchunks, Py_ssize_t total) noexcept nogil
    # every chunk scaled by j.coef / clamped to [-j.coef, j.coef], in place
    void (*scale)(const NormJob *j, Py_ssize_t nchunks, Py_ssize_t total) noexcept nogil
    void (*clamp)(const NormJob *j, Py_ssize_t nchunks, Py_ssize_t total) noexcept nogil
    # 16-bit <-> float32 (code F16, BF16 or, for narrow, BF16_SR with r_i = hash32(key + i))
    void (*widen)(const uint16_t *h, float *f, Py_ssize_t n, int code) noexcept nogil
    void (*narrow)(const float *f, uint16_t *h, Py_ssize_t n, int code, uint32_t key) noexcept nogil
    # one Adafactor step of each of the jobs (their work arrays allocated,
    # their numbers set): three threaded passes over all their units
    void (*factored)(FactorJob **jobs, Py_ssize_t njobs) noexcept nogil

# -------------------------------------------------------------- batchnorm ---
# x viewed as (outer, C, inner), cut into boxes: a fixed partition that
# depends only on the shape (see _batchnorm.pyx).
ctypedef struct BnPlan:
    Py_ssize_t outer, C, inner, m   # m = outer*inner values per channel
    bint rows                       # row layout (else segment layout)
    Py_ssize_t og, il, cc           # box extent along outer, inner, channels
    Py_ssize_t R                    # row layout, inner == 1: rows per group
    Py_ssize_t ni                   # boxes along inner (segment layout)
    Py_ssize_t nk                   # channel chunks (= C in the segment layout)
    Py_ssize_t U                    # boxes per channel (chunk)
    Py_ssize_t nbox                 # nk * U
    int nt                          # threads


# What a call computes, and where (the front allocates every array).
ctypedef struct BnJob:
    int xk                # Store code of x, dy and the output (NATIVE, F16, BF16)
    bint backward         # else the forward pass
    bint stats            # run the first pass (forward: training; backward: always)
    bint training         # backward: the training formula for dx
    bint update           # forward: update the running statistics
    double momentum, eps
    double *mean          # (C,) forward: the batch mean (out); backward: saved mean
    double *invstd        # (C,) forward: out (holds M2 until finished); backward: saved
    double *A             # (C,) second pass: out = A*z + B*(x - mean) + K
    double *B             #      (forward: z unused, B = gamma*invstd, K = beta;
    double *K             #       backward inference: B unused)
    double *P1            # (U*C,) per-box partial results of the first pass
    double *P2


ctypedef struct BatchNormCore:
    # Cut (outer, C, inner) into boxes, and the team size for the call.
    void (*plan)(BnPlan *p, Py_ssize_t outer, Py_ssize_t C, Py_ssize_t inner) noexcept nogil
    # Both passes of a forward (dy NULL; r1, r2 the running statistics, or
    # NULL without them) or backward (r1, r2 = dgamma, dbeta) call over
    # non-empty x, in the loop type (16-bit x, dy, out: float, j.xk).
    void (*run_f32)(const BnPlan *p, const BnJob *j, const float *x, const float *dy,
                    float *out, const float *gamma, const float *beta,
                    float *r1, float *r2) noexcept nogil
    void (*run_f64)(const BnPlan *p, const BnJob *j, const double *x, const double *dy,
                    double *out, const double *gamma, const double *beta,
                    double *r1, double *r2) noexcept nogil
    # Forward inference, C channels: j.mean, j.invstd from the running
    # statistics, and the coefficients j.B, j.K of the y pass.
    void (*infer_f32)(const BnJob *j, Py_ssize_t C, const float *gamma, const float *beta,
                      const float *rmean, const float *rvar) noexcept nogil
    void (*infer_f64)(const BnJob *j, Py_ssize_t C, const double *gamma, const double *beta,
                      const double *rmean, const double *rvar) noexcept nogil


# ---------------------------------------------------------------- softmax ---

# Elements of a row per chunk: a row's partial sums are taken per chunk and
# combined in chunk order (8 KiB-16 KiB: in L1).  The front sizes the partials
# of the few-long-rows schedule (SmJob.pmax, .part) with it.
cdef enum:
    SM_CHUNK = 2048

cdef enum SmMode:
    LOG_SOFTMAX = 0
    SOFTMAX = 1
    XENT = 2


ctypedef struct SmPart:
    double s        # sum exp(x_c - M)
    double dot      # sum q_c (x_c - M) over the classes that need it
    double qsum     # sum q_c (probability targets)


ctypedef struct SmJob:
    int mode                # SmMode
    bint is_double
    int xk                  # Store code of x and out: NATIVE, F16 or BF16 (then computed in float)
    Py_ssize_t n, c, nchunk
    const void *x           # (N, C) rows
    void *out               # log_softmax/softmax output, or dlogits (NULL: loss only)
    # cross-entropy (targets and weights are float32 for 16-bit logits)
    const int64_t *y        # class indices (N,), or NULL
    const void *t           # class probabilities (N, C), or NULL
    const void *w           # class weights (C,), or NULL
    int64_t ignore
    double eps              # label smoothing
    double wsum             # sum of the weights (C without weights)
    double scale            # gradient scale: 1/D for 'mean', else 1
    double *loss            # per-row loss (N,)
    # few long rows: partials per (row, chunk), row-major
    double *pmax
    SmPart *part


ctypedef struct SoftmaxCore:
    # every row of a job: log_softmax/softmax over the last axis, cross-entropy
    void (*run_rows)(const SmJob *j) noexcept nogil
    # log_softmax (log_out) or softmax over the middle axis of an (outer, C, inner) array
    void (*run_cols_f32)(const float *x, float *out, Py_ssize_t outer, Py_ssize_t c,
                         Py_ssize_t inner, bint log_out) noexcept nogil
    void (*run_cols_f64)(const double *x, double *out, Py_ssize_t outer, Py_ssize_t c,
                         Py_ssize_t inner, bint log_out) noexcept nogil
    # cross-entropy: the first y[i] > limit, or -1 (uint64 class indices)
    Py_ssize_t (*first_above)(const uint64_t *y, Py_ssize_t n, uint64_t limit) noexcept nogil
    # the first class index outside [0, c) other than `ignore`, or -1; total = the
    # sum of w[y_i] (w NULL: the count) over the rows not ignored
    Py_ssize_t (*check_classes_f32)(const int64_t *y, Py_ssize_t n, Py_ssize_t c, int64_t ignore,
                                    const float *w, double *total) noexcept nogil
    Py_ssize_t (*check_classes_f64)(const int64_t *y, Py_ssize_t n, Py_ssize_t c, int64_t ignore,
                                    const double *w, double *total) noexcept nogil
    # the sum of v[0:n] in a fixed order
    double (*ordered_sum)(const double *v, Py_ssize_t n) noexcept nogil
    # test hooks: out = exp(x) (nonpos: the variant for x <= 0), out = log(x)
    void (*exp_f32)(const float *x, float *out, Py_ssize_t n, bint nonpos) noexcept nogil
    void (*exp_f64)(const double *x, double *out, Py_ssize_t n, bint nonpos) noexcept nogil
    void (*log_f64)(const double *x, double *out, Py_ssize_t n) noexcept nogil

# ------------------------------------------------------------- the table ---

ctypedef struct CoreAPI:
    Py_ssize_t size         # sizeof(CoreAPI) of the core's build: checked by the fronts

    TrainCore train

    OptimCore optim

    BatchNormCore batchnorm

    SoftmaxCore softmax
