/* Vectorizable exp (float and double) and log (double).
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

static inline double fastopt_log(double x)
{
    const double LN2_HI = 6.93147180369123816490e-01;
    const double LN2_LO = 1.90821492927058770002e-10;
    const double TWO52 = 4503599627370496.0;
    const int64_t SQRT_HALF = INT64_C(0x3fe6a09e667f3bcd);   /* bits of sqrt(2)/2 */
    fastopt_f64bits u, m, kb;
    double k, f, s, z, hfsq, r, y;
    int64_t ix;
    int small = x < 2.2250738585072014e-308;                  /* subnormal (or <= 0) */

    u.f = small ? x * 18014398509481984.0 : x;                /* 2^54 */
    /* Move m's range to [sqrt(2)/2, sqrt(2)): the exponent field of
     * ix = bits(x) + (bits(1) - bits(sqrt(2)/2)) is k + 1023. */
    ix = u.i + (INT64_C(0x3ff0000000000000) - SQRT_HALF);
    m.i = (ix & INT64_C(0x000fffffffffffff)) + SQRT_HALF;
    /* k as a double without an int64 -> double conversion (none below AVX-512) */
    kb.i = INT64_C(0x4330000000000000) | ((ix >> 52) & 0x7ff);
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
    y = x == 0.0 ? -1.0 / 0.0 : y;
    y = x < 0.0 ? 0.0 / 0.0 : y;
    y = x > 1.7976931348623157e308 ? x : y;                    /* +inf */
    return x != x ? x : y;
}

#endif
