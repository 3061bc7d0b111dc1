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
# (BatchNormCore)

# ---------------------------------------------------------------- softmax ---
# (SoftmaxCore)

# ------------------------------------------------------------- the table ---

ctypedef struct CoreAPI:
    Py_ssize_t size         # sizeof(CoreAPI) of the core's build: checked by the fronts

    TrainCore train

    # (optim)

    # (batchnorm)

    # (softmax)
