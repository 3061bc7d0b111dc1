/* Vectorizable exp for float and double.
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
 * - r uses a Cody-Waite split of ln2: k*LN2_HI is exact (LN2_HI has few
 *   significant bits), x - k*LN2_HI is exact (Sterbenz), LN2_LO adds the rest.
 * - exp(r) = 1 + r + r^2 * P(r): float, P of degree 4 fitted for minimal
 *   relative error on [-ln2/2, ln2/2] (truncation error 3e-9 = 0.03 ulp);
 *   double, Taylor to degree 13 (truncation error 5e-18).
 * - 2^k is applied as two exact multiplications by 2^k1 and 2^k2 (k1 + k2 = k,
 *   each a normal power of two), so results in the subnormal range are
 *   rounded once, like any other product, instead of being flushed.
 *
 * Special values: x is first clamped to [LO, HI] (a compare-and-select that
 * keeps NaN).  Above HI the result overflows to +inf, +inf gives +inf; below
 * LO every result is 0 (exp(LO) is below half the smallest subnormal), -inf
 * gives 0; NaN gives NaN.  Accuracy (tests/test_softmax.py checks it against
 * numpy's exp over dense ranges): float <= 1 ulp for normal results;
 * double <= 2 ulp.
 */
#ifndef FASTOPT_VMATH_H
#define FASTOPT_VMATH_H
#include <stdint.h>

typedef union { float f; int32_t i; } fastopt_f32bits;
typedef union { double f; int64_t i; } fastopt_f64bits;

static inline float fastopt_expf(float x)
{
    const float LO = -104.0f, HI = 89.0f;   /* exp(-104) < 2^-150; exp(89) > FLT_MAX */
    const float LOG2E = 1.44269504088896341f;
    const float SHIFT = 12582912.0f;        /* 1.5 * 2^23 */
    const float LN2_HI = 0.693359375f;      /* 355/512: k*LN2_HI exact for |k| < 2^15 */
    const float LN2_LO = -2.12194440e-4f;   /* ln2 - LN2_HI */
    fastopt_f32bits t, s1, s2;
    float k, r, p;
    int32_t ki, k1;

    x = x < LO ? LO : x;
    x = x > HI ? HI : x;
    t.f = x * LOG2E + SHIFT;
    k = t.f - SHIFT;                        /* round(x / ln2), exactly */
    ki = t.i - 0x4b400000;                  /* ... as an integer: bits(t) - bits(SHIFT) */
    r = x - k * LN2_HI;
    r = r - k * LN2_LO;
    p = 1.3814602e-3f;
    p = p * r + 8.3687156e-3f;
    p = p * r + 4.1668389e-2f;
    p = p * r + 1.6666521e-1f;
    p = p * r + 4.9999994e-1f;
    p = (p * (r * r) + r) + 1.0f;
    k1 = ki >> 1;                           /* k in [-150, 129]: k1, k - k1 in [-75, 65] */
    s1.i = (k1 + 127) << 23;
    s2.i = (ki - k1 + 127) << 23;
    return (p * s1.f) * s2.f;
}

static inline double fastopt_exp(double x)
{
    const double LO = -746.0, HI = 710.0;   /* exp(-746) < 2^-1075; exp(710) > DBL_MAX */
    const double LOG2E = 1.4426950408889634074;
    const double SHIFT = 6755399441055744.0;  /* 1.5 * 2^52 */
    const double LN2_HI = 6.93147180369123816490e-01;  /* 32 significant bits */
    const double LN2_LO = 1.90821492927058770002e-10;  /* ln2 - LN2_HI */
    fastopt_f64bits t, t1, s1, s2;
    double k, r, p;
    int64_t ki, k1;

    x = x < LO ? LO : x;
    x = x > HI ? HI : x;
    t.f = x * LOG2E + SHIFT;
    k = t.f - SHIFT;
    ki = t.i - INT64_C(0x4338000000000000);
    /* k1 = round(k/2), taken the same way: a 64-bit arithmetic shift would
     * not vectorize below AVX-512. */
    t1.f = k * 0.5 + SHIFT;
    k1 = t1.i - INT64_C(0x4338000000000000);
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
    s1.i = (k1 + 1023) << 52;               /* k in [-1077, 1025]: k1, k - k1 in [-539, 513] */
    s2.i = (ki - k1 + 1023) << 52;
    return (p * s1.f) * s2.f;
}

#endif
