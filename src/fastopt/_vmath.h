/* Vectorizable exp (float and double) and log (double), and the lane
 * reductions (max, sums) of the softmax kernels.
 *
 * libm's exp is an opaque call per element, so gcc cannot vectorize a loop
 * that uses it (without -ffast-math, which fastopt never uses).  These are
 * static inline and branch-free (only compares that become blends), so a loop
 * calling them vectorizes at every SIMD level, and the scalar and vector code
 * compute bit-identical results (no fma: the build uses -ffp-contract=off).
 *
 *   exp(x) = 2^k * exp(r),  k = round(x / ln2),  r = x - k*ln2 in [-ln2/2, ln2/2]
 *
 * - k is rounded with the 1.5*2^p "shift" trick; its integer value is read from
 *   the low mantissa bits of x/ln2 + shift (no float->int conversion, so NaN
 *   does not reach an int conversion).
 * - All bit manipulation is in unsigned integers (wrap-around is defined):
 *   for NaN input the bit patterns are arbitrary, and signed arithmetic on
 *   them would overflow or shift negative values, undefined behaviour.  For
 *   every non-NaN input the values are the same as the signed ones.
 * - r uses a Cody-Waite split of ln2: k*LN2_HI is exact (LN2_HI has few
 *   significant bits), x - k*LN2_HI is exact (Sterbenz), LN2_LO adds the rest.
 * - exp(r) = 1 + r + r^2 * P(r): float, P of degree 4 fitted for minimal
 *   relative error on [-ln2/2, ln2/2] (truncation error 3e-9 = 0.03 ulp);
 *   double, Taylor to degree 13 (truncation error 5e-18).
 * - 2^k is applied as two multiplications by normal powers of two: 2^k1 and
 *   2^k2 (k1 + k2 = k), or, for x <= 0 (`_nonpos`, softmax's x - max),
 *   2^(k+64) and 2^-64 (float; 2^(k+512) and 2^-512 for double).  The first
 *   is exact, so results in the subnormal range are rounded once, like any
 *   other product, instead of being flushed.
 *
 * log(x) (double; one per softmax row, but many rows are short): x = 2^k m,
 * m in [sqrt(2)/2, sqrt(2)), f = m - 1, s = f/(2+f), and
 *   log(m) = 2 atanh(s) = f - f^2/2 + s (f^2/2 + R),  R = sum_n 2 s^(2n)/(2n+1)
 * (the series to n = 10: truncation < 1e-17), log(x) = k ln2 + log(m) with
 * the same ln2 split.  Subnormal x is scaled by 2^54 first; 0 gives -inf,
 * +inf gives +inf, x < 0 and NaN give NaN.  Accuracy <= 2 ulp.
 *
 * Special values of exp: x is first clamped to [LO, HI] (a compare-and-select that
 * keeps NaN).  Above HI the result overflows to +inf, +inf gives +inf; below
 * LO every result is 0 (exp(LO) is below half the smallest subnormal), -inf
 * gives 0; NaN gives NaN.  Accuracy (tests/test_softmax.py checks it against
 * numpy's exp over dense ranges): float <= 1 ulp for normal results;
 * double <= 2 ulp.
 */
#ifndef FASTOPT_VMATH_H
#define FASTOPT_VMATH_H
#include <math.h>
#include <stddef.h>
#include <stdint.h>

typedef union { float f; uint32_t u; } fastopt_f32bits;
typedef union { double f; uint64_t u; } fastopt_f64bits;

/* exp(x) for x in [-104, 89] (nonpos: x <= 0, so k <= 0). */
static inline float fastopt_expf_core(float x, const int nonpos)
{
    const float LOG2E = 1.44269504088896341f;
    const float SHIFT = 12582912.0f;        /* 1.5 * 2^23 */
    const float LN2_HI = 0.693359375f;      /* 355/512: k*LN2_HI exact for |k| < 2^15 */
    const float LN2_LO = -2.12194440e-4f;   /* ln2 - LN2_HI */
    fastopt_f32bits t, s1, s2;
    float k, r, p;
    uint32_t ki, k1;

    t.f = x * LOG2E + SHIFT;
    k = t.f - SHIFT;                        /* round(x / ln2), exactly */
    r = x - k * LN2_HI;
    r = r - k * LN2_LO;
    p = 1.3814602e-3f;
    p = p * r + 8.3687156e-3f;
    p = p * r + 4.1668389e-2f;
    p = p * r + 1.6666521e-1f;
    p = p * r + 4.9999994e-1f;
    p = (p * (r * r) + r) + 1.0f;
    if (nonpos) {
        /* k in [-150, 0]: 2^(k+64) is normal; its exponent field k + 191 is
         * the low 9 bits of bits(t) + 191 (bits(t) = bits(SHIFT) + k, and
         * bits(SHIFT) = 0 mod 512). */
        s1.u = (t.u + 191u) << 23;
        return (p * s1.f) * 5.42101086e-20f;   /* 2^-64 */
    }
    ki = t.u - 0x4b400000u;                 /* k mod 2^32: bits(t) - bits(SHIFT) */
    /* k1 = floor(k/2): an arithmetic shift of k as a signed value (the
     * conversions are modulo 2^32; the shift is arithmetic in gcc, clang and
     * MSVC).  k in [-150, 129]: k1, k - k1 in [-75, 65], so the exponent
     * fields below are in [52, 192]. */
    k1 = (uint32_t)((int32_t)ki >> 1);
    s1.u = (k1 + 127u) << 23;
    s2.u = (ki - k1 + 127u) << 23;
    return (p * s1.f) * s2.f;
}

static inline float fastopt_expf(float x)
{
    x = x < -104.0f ? -104.0f : x;          /* exp(-104) < 2^-150: rounds to 0 */
    x = x > 89.0f ? 89.0f : x;              /* exp(89) > FLT_MAX: +inf */
    return fastopt_expf_core(x, 0);
}

/* exp(x) for x <= 0 or NaN (softmax's x - max): one scaling step fewer. */
static inline float fastopt_expf_nonpos(float x)
{
    x = x < -104.0f ? -104.0f : x;
    return fastopt_expf_core(x, 1);
}

/* exp(x) for x in [-746, 710] (nonpos: x <= 0). */
static inline double fastopt_exp_core(double x, const int nonpos)
{
    const double LOG2E = 1.4426950408889634074;
    const double SHIFT = 6755399441055744.0;  /* 1.5 * 2^52 */
    const double LN2_HI = 6.93147180369123816490e-01;  /* 32 significant bits */
    const double LN2_LO = 1.90821492927058770002e-10;  /* ln2 - LN2_HI */
    fastopt_f64bits t, t1, s1, s2;
    double k, r, p;
    uint64_t ki, k1;

    t.f = x * LOG2E + SHIFT;
    k = t.f - SHIFT;
    r = x - k * LN2_HI;
    r = r - k * LN2_LO;
    /* Taylor series 1/n!, n = 13 .. 2 */
    p = 1.6059043836821613e-10;
    p = p * r + 2.08767569878681e-09;
    p = p * r + 2.505210838544172e-08;
    p = p * r + 2.755731922398589e-07;
    p = p * r + 2.7557319223985893e-06;
    p = p * r + 2.48015873015873e-05;
    p = p * r + 1.984126984126984e-04;
    p = p * r + 1.388888888888889e-03;
    p = p * r + 8.333333333333333e-03;
    p = p * r + 4.1666666666666664e-02;
    p = p * r + 1.6666666666666666e-01;
    p = p * r + 0.5;
    p = (p * (r * r) + r) + 1.0;
    if (nonpos) {
        /* k in [-1077, 0]: 2^(k+512) is normal, exponent field k + 1535 */
        s1.u = (t.u + UINT64_C(1535)) << 52;
        return (p * s1.f) * 7.4583407312002067e-155;   /* 2^-512 */
    }
    ki = t.u - UINT64_C(0x4338000000000000);     /* k mod 2^64 */
    /* k1 = round(k/2), taken the same way: a 64-bit arithmetic shift would
     * not vectorize below AVX-512. */
    t1.f = k * 0.5 + SHIFT;
    k1 = t1.u - UINT64_C(0x4338000000000000);
    /* k in [-1077, 1025]: k1, k - k1 in [-539, 513], exponent fields in [484, 1536] */
    s1.u = (k1 + 1023u) << 52;
    s2.u = (ki - k1 + 1023u) << 52;
    return (p * s1.f) * s2.f;
}

static inline double fastopt_exp(double x)
{
    x = x < -746.0 ? -746.0 : x;            /* exp(-746) < 2^-1075: rounds to 0 */
    x = x > 710.0 ? 710.0 : x;              /* exp(710) > DBL_MAX: +inf */
    return fastopt_exp_core(x, 0);
}

static inline double fastopt_exp_nonpos(double x)
{
    x = x < -746.0 ? -746.0 : x;
    return fastopt_exp_core(x, 1);
}

static inline double fastopt_log(double x)
{
    const double LN2_HI = 6.93147180369123816490e-01;
    const double LN2_LO = 1.90821492927058770002e-10;
    const double TWO52 = 4503599627370496.0;
    const uint64_t SQRT_HALF = UINT64_C(0x3fe6a09e667f3bcd);  /* bits of sqrt(2)/2 */
    fastopt_f64bits u, m, kb;
    double k, f, s, z, hfsq, r, y;
    uint64_t ix;
    int small = x < 2.2250738585072014e-308;                  /* subnormal (or <= 0) */

    u.f = small ? x * 18014398509481984.0 : x;                /* 2^54 */
    /* Move m's range to [sqrt(2)/2, sqrt(2)): the exponent field of
     * ix = bits(x) + (bits(1) - bits(sqrt(2)/2)) is k + 1023.  (Unsigned: for
     * NaN and negative x, whose results are selected away below, the sum
     * wraps.) */
    ix = u.u + (UINT64_C(0x3ff0000000000000) - SQRT_HALF);
    m.u = (ix & UINT64_C(0x000fffffffffffff)) + SQRT_HALF;
    /* k as a double without an int64 -> double conversion (none below AVX-512) */
    kb.u = UINT64_C(0x4330000000000000) | ((ix >> 52) & 0x7ff);
    k = (kb.f - TWO52) - (small ? 1077.0 : 1023.0);
    f = m.f - 1.0;
    s = f / (2.0 + f);
    z = s * s;
    /* R = sum_{n=1..10} 2 z^n / (2n+1) */
    r = 0.09523809523809523;
    r = r * z + 0.10526315789473684;
    r = r * z + 0.11764705882352941;
    r = r * z + 0.13333333333333333;
    r = r * z + 0.15384615384615385;
    r = r * z + 0.18181818181818182;
    r = r * z + 0.2222222222222222;
    r = r * z + 0.2857142857142857;
    r = r * z + 0.4;
    r = r * z + 0.6666666666666666;
    r = r * z;
    hfsq = 0.5 * f * f;
    y = k * LN2_HI - ((hfsq - (s * (hfsq + r) + k * LN2_LO)) - f);
    y = x == 0.0 ? -(double)INFINITY : y;
    y = x < 0.0 ? (double)NAN : y;
    y = x > 1.7976931348623157e308 ? x : y;                    /* +inf */
    return x != x ? x : y;
}

/* ------------------------------------------------------- lane reductions ---
 * max and sums over x[0:n] with FASTOPT_LANES = 16 independent accumulators
 * (element i goes to lane i % 16 for i < n - n % 16; the rest is added in
 * order after the lanes are combined in lane order).  The order is fixed, so
 * every SIMD level (and the scalar fallback) gives the same bits.  gcc does
 * not vectorize such reductions itself without -ffast-math (it may not
 * reorder them), so the lanes are written with vector extensions. */
#define FASTOPT_LANES 16

#if (defined(__GNUC__) || defined(__clang__)) && !defined(FASTOPT_SCALAR_LANES)
#include <string.h>
/* Vectors of the target's native width (wider generic vectors are lowered
 * badly, through the stack); the lanes stay i % 16 whatever the width. */
#if defined(__AVX512F__)
#define FASTOPT_VBYTES 64
#elif defined(__AVX__)
#define FASTOPT_VBYTES 32
#else
#define FASTOPT_VBYTES 16
#endif
typedef float fastopt_vf __attribute__((vector_size(FASTOPT_VBYTES)));
typedef int32_t fastopt_vfm __attribute__((vector_size(FASTOPT_VBYTES)));
typedef double fastopt_vd __attribute__((vector_size(FASTOPT_VBYTES)));
typedef int64_t fastopt_vdm __attribute__((vector_size(FASTOPT_VBYTES)));
typedef float fastopt_vh __attribute__((vector_size(FASTOPT_VBYTES / 2)));  /* as many floats as a fastopt_vd has doubles */
#define FASTOPT_ND (FASTOPT_VBYTES / 8)

/* (macros, not functions: no vector-valued function ABI involved) */
/* a vector from p (any alignment) */
#define FASTOPT_LOAD(V, p) __extension__ ({ V v_; memcpy(&v_, (p), sizeof v_); v_; })
/* FASTOPT_ND elements as doubles: p[k], and p[k] - m computed in the element type */
#define FASTOPT_WIDE_f(p) __builtin_convertvector(FASTOPT_LOAD(fastopt_vh, p), fastopt_vd)
#define FASTOPT_WIDE_d(p) FASTOPT_LOAD(fastopt_vd, p)
#define FASTOPT_WIDE_DIFF_f(p, m) __builtin_convertvector(FASTOPT_LOAD(fastopt_vh, p) - (m), fastopt_vd)
#define FASTOPT_WIDE_DIFF_d(p, m) (FASTOPT_LOAD(fastopt_vd, p) - (m))
/* lane-wise v > m ? v : m (v, m: variables; M: the mask type) */
#define FASTOPT_VMAX(V, M, v, m) ((V)((((M)((v) > (m))) & (M)(v)) | (~((M)((v) > (m))) & (M)(m))))
#define FASTOPT_VECTOR_LANES 1
#else
#define FASTOPT_VECTOR_LANES 0
#endif

/* T: element type, S: suffix (f, d), V: native vector of T, M: its mask type */
#define FASTOPT_REDUCTIONS(T, S, V, M)                                                  \
static inline T fastopt_max_##S(const T *x, ptrdiff_t n)                                \
{                                                                                       \
    ptrdiff_t i, j, nb = n - n % FASTOPT_LANES;                                         \
    T r = -(T)INFINITY, m[FASTOPT_LANES];                                               \
    if (nb > 0) {                                                                       \
        FASTOPT_MAX_LANES(T, S, V, M)                                                   \
        for (j = 0; j < FASTOPT_LANES; j++) r = m[j] > r ? m[j] : r;                    \
    }                                                                                   \
    for (i = nb; i < n; i++) r = x[i] > r ? x[i] : r;                                   \
    return r;                                                                           \
}                                                                                       \
/* sum_i w_i (x_i - m) in double; w NULL: sum_i (x_i - m); x NULL: sum_i w_i.         \
 * skip_zero: a term with w_i == 0 is 0 even if x_i - m is infinite. */                \
static inline double fastopt_dot_##S(const T *w, const T *x, T m, ptrdiff_t n,         \
                                     int skip_zero)                                     \
{                                                                                       \
    ptrdiff_t i, j, nb = n - n % FASTOPT_LANES;                                         \
    double s = 0.0, acc[FASTOPT_LANES], t;                                              \
    if (nb > 0) {                                                                       \
        FASTOPT_DOT_LANES(T, S)                                                         \
        for (j = 0; j < FASTOPT_LANES; j++) s = s + acc[j];                             \
    }                                                                                   \
    for (i = nb; i < n; i++) {                                                          \
        t = x == NULL ? (double)w[i] : w == NULL ? (double)(x[i] - m)                   \
            : (double)w[i] * (double)(x[i] - m);                                        \
        s = s + (skip_zero && w != NULL && w[i] == 0 ? 0.0 : t);                        \
    }                                                                                   \
    return s;                                                                           \
}

#if FASTOPT_VECTOR_LANES
#define FASTOPT_MAX_LANES(T, S, V, M)                                                   \
    V mv[FASTOPT_LANES * sizeof(T) / FASTOPT_VBYTES], a_;                               \
    const ptrdiff_t per = FASTOPT_VBYTES / sizeof(T), nv = FASTOPT_LANES / per;         \
    ptrdiff_t v;                                                                        \
    for (v = 0; v < nv; v++) mv[v] = (V){0} - (T)INFINITY;                              \
    for (i = 0; i < nb; i += FASTOPT_LANES)                                             \
        for (v = 0; v < nv; v++) {                                                      \
            a_ = FASTOPT_LOAD(V, x + i + v * per);                                      \
            mv[v] = FASTOPT_VMAX(V, M, a_, mv[v]);                                      \
        }                                                                               \
    memcpy(m, mv, sizeof mv);
/* the three cases as separate loops (no per-element branch) */
#define FASTOPT_DOT_LANES(T, S)                                                         \
    fastopt_vd av[FASTOPT_LANES / FASTOPT_ND], t_;                                      \
    ptrdiff_t v, p;                                                                     \
    for (v = 0; v < FASTOPT_LANES / FASTOPT_ND; v++) av[v] = (fastopt_vd){0};           \
    for (i = 0; i < nb; i += FASTOPT_LANES)                                             \
        for (v = 0; v < FASTOPT_LANES / FASTOPT_ND; v++) {                              \
            p = i + v * FASTOPT_ND;                                                     \
            if (x == NULL) {                                                            \
                t_ = FASTOPT_WIDE_##S(w + p);                                           \
            } else if (w == NULL) {                                                     \
                t_ = FASTOPT_WIDE_DIFF_##S(x + p, m);                                   \
            } else {                                                                    \
                t_ = FASTOPT_WIDE_##S(w + p) * FASTOPT_WIDE_DIFF_##S(x + p, m);         \
                if (skip_zero)                                                          \
                    t_ = (fastopt_vd)((fastopt_vdm)t_ & (FASTOPT_WIDE_##S(w + p) != 0)); \
            }                                                                           \
            av[v] = av[v] + t_;                                                         \
        }                                                                               \
    memcpy(acc, av, sizeof av);
#else
#define FASTOPT_MAX_LANES(T, S, V, M)                                                   \
    for (j = 0; j < FASTOPT_LANES; j++) m[j] = -(T)INFINITY;                            \
    for (i = 0; i < nb; i += FASTOPT_LANES)                                             \
        for (j = 0; j < FASTOPT_LANES; j++) m[j] = x[i + j] > m[j] ? x[i + j] : m[j];
#define FASTOPT_DOT_LANES(T, S)                                                         \
    for (j = 0; j < FASTOPT_LANES; j++) acc[j] = 0.0;                                   \
    for (i = 0; i < nb; i += FASTOPT_LANES)                                             \
        for (j = 0; j < FASTOPT_LANES; j++) {                                           \
            t = x == NULL ? (double)w[i + j] : w == NULL ? (double)(x[i + j] - m)       \
                : (double)w[i + j] * (double)(x[i + j] - m);                            \
            acc[j] = acc[j] + (skip_zero && w != NULL && w[i + j] == 0 ? 0.0 : t);      \
        }
#endif

#if !FASTOPT_VECTOR_LANES
typedef float fastopt_vf;           /* unused by the scalar lanes */
typedef double fastopt_vd;
typedef int fastopt_vfm, fastopt_vdm;
#endif
FASTOPT_REDUCTIONS(float, f, fastopt_vf, fastopt_vfm)
FASTOPT_REDUCTIONS(double, d, fastopt_vd, fastopt_vdm)

#endif
