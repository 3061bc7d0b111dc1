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
    #define FASTOPT_CORE_CAPSULE "fastopt._core.api_v1"
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


# ------------------------------------------------------------------ train ---

ctypedef struct TrainCore:
    # dst[i] = src[idx[i]] for i in [0, n): rows of `rowbytes` bytes
    void (*gather_rows)(char *dst, const char *src, const int64_t *idx, Py_ssize_t n,
                        Py_ssize_t rowbytes) noexcept nogil
    # avg = beta*avg + (1-beta)*x over n elements
    void (*ewa_f32)(float *avg, const float *x, Py_ssize_t n, double beta) noexcept nogil
    void (*ewa_f64)(double *avg, const double *x, Py_ssize_t n, double beta) noexcept nogil


# ------------------------------------------------------------------ optim ---
# (OptimCore)

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
# (SoftmaxCore)

# ------------------------------------------------------------- the table ---

ctypedef struct CoreAPI:
    Py_ssize_t size         # sizeof(CoreAPI) of the core's build: checked by the fronts

    TrainCore train

    # (optim)

    BatchNormCore batchnorm

    # (softmax)
