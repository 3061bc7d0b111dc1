/* 16-bit floating-point storage: float16 (IEEE binary16, NumPy's float16) and
 * bfloat16 (the upper half of a float32, ml_dtypes.bfloat16), converted to
 * and from float32.  The one place where fastopt converts: kernels see the
 * 16-bit values as raw uint16_t and compute in float32.
 *
 * Every function is static inline, branch-free (compares become selects) and
 * written with unsigned integer operations (and two exact float additions,
 * for float16 subnormals), so a loop calling it vectorizes at every SIMD
 * level and gives the same bits at every level:
 *
 * - float16 -> float32 is exact: +-inf stays +-inf, subnormals become
 *   normal float32 values, a NaN stays a NaN with its payload and the quiet
 *   bit set (as the F16C instruction vcvtph2ps does: verified over all 65536
 *   values).  bfloat16 -> float32 is a 16-bit shift: exact, every bit kept.
 * - float32 -> float16 and float32 -> bfloat16 round to nearest, ties to
 *   even (overflow gives +-inf; float16 results below 2^-14 are subnormal,
 *   rounded once); a NaN gives a quiet NaN with the sign and the top of the
 *   payload (as vcvtps2ph does: verified over all 2^32 floats).
 * - float32 -> bfloat16 with stochastic rounding: x rounds up (in magnitude)
 *   to the next bfloat16 with probability (|x| - lower)/ulp, driven by the
 *   high 16 bits of a 32-bit random number r: bits(x) + (r >> 16), keep
 *   the top 16 bits.  Unbiased: E[result] = x.
 * - fastopt_hash32 is the counter-based generator behind r (see _optim.pyx).
 *
 * All of this is checked exhaustively against NumPy and ml_dtypes in
 * tests/test_lowprec.py (every 16-bit pattern; float32 values at and next to
 * every rounding boundary), at every SIMD level.
 */
#ifndef FASTOPT_HALF_H
#define FASTOPT_HALF_H
#include <stddef.h>
#include <stdint.h>
#if defined(_MSC_VER) && !defined(__clang__)
#include <intrin.h>
#endif
/* The F16C instructions (x86-64-v3 and up) convert 8 float16 values at once;
 * they give exactly the bits of the functions below (see above), so the
 * block conversions may use them on the levels that have them. */
#if defined(__F16C__) || (defined(_MSC_VER) && defined(__AVX2__))
#include <immintrin.h>
#define FASTOPT_F16C 1
#else
#define FASTOPT_F16C 0
#endif

typedef union { float f; uint32_t u; } fastopt_h32;

static inline float fastopt_f16_to_f32(uint16_t h)
{
    const uint32_t x = h;
    const uint32_t t = (x & 0x7fffu) << 13;             /* exponent and mantissa, in place */
    const uint32_t e = t & 0x0f800000u;                 /* the 5-bit exponent field */
    fastopt_h32 sub, r;
    /* normal: rebias the exponent from 15 to 127; inf and NaN (exponent all
     * ones): once more, to 255, a NaN made quiet */
    uint32_t n = t + 0x38000000u + (e == 0x0f800000u ? 0x38000000u : 0u);
    n |= (e == 0x0f800000u && (t & 0x007fe000u)) ? 0x00400000u : 0u;
    /* subnormal (and zero): 0.5 + m * 2^-24, minus 0.5 (exact) */
    sub.u = (x & 0x3ffu) | 0x3f000000u;
    sub.f = sub.f - 0.5f;
    r.u = (e == 0 ? sub.u : n) | ((x & 0x8000u) << 16);
    return r.f;
}

static inline uint16_t fastopt_f32_to_f16(float f)
{
    fastopt_h32 x, s;
    uint32_t a, sign, normal, sub, r;
    x.f = f;
    sign = (x.u >> 16) & 0x8000u;
    a = x.u & 0x7fffffffu;
    /* normal results (|f| in [2^-14, 65520)): rebias, then add just under
     * half an ulp plus the ulp's lowest bit (ties to even) and truncate.
     * (For other |f| this wraps around harmlessly: unsigned arithmetic.) */
    normal = (a - ((127u - 15u) << 23) + 0xfffu + ((a >> 13) & 1u)) >> 13;
    /* subnormal results (|f| < 2^-14): |f| + 0.5 puts |f| on the grid of
     * 2^-24 steps (the ulp of 0.5), rounding to nearest even as every IEEE
     * addition does; the low bits are then the float16 mantissa (0x400,
     * the smallest normal, when it rounds up).  The one floating-point
     * operation here, and an exact one. */
    s.u = a;
    s.f = s.f + 0.5f;
    sub = s.u - 0x3f000000u;
    r = a < 0x38800000u ? sub : normal;
    r = a >= 0x477ff000u ? 0x7c00u : r;                 /* rounds to >= 65536: inf */
    r = a > 0x7f800000u ? (0x7e00u | ((a >> 13) & 0x3ffu)) : r;   /* NaN */
    return (uint16_t)(r | sign);
}

static inline float fastopt_bf16_to_f32(uint16_t h)
{
    fastopt_h32 r;
    r.u = (uint32_t)h << 16;
    return r.f;
}

static inline uint16_t fastopt_f32_to_bf16(float f)
{
    fastopt_h32 x;
    uint32_t r;
    x.f = f;
    /* + 0x7fff + lowest kept bit: round to nearest, ties to even; the carry
     * may reach the exponent (next binade, or inf after the largest) */
    r = (x.u + 0x7fffu + ((x.u >> 16) & 1u)) >> 16;
    r = (x.u & 0x7fffffffu) > 0x7f800000u ? (x.u >> 16) | 0x40u : r;   /* NaN: quiet */
    return (uint16_t)r;
}

/* Stochastic rounding with the random bits `rnd` (its high 16 bits are used). */
static inline uint16_t fastopt_f32_to_bf16_sr(float f, uint32_t rnd)
{
    fastopt_h32 x;
    uint32_t r;
    x.f = f;
    r = (x.u + (rnd >> 16)) >> 16;      /* inf + (< 2^16) stays inf */
    r = (x.u & 0x7fffffffu) > 0x7f800000u ? (x.u >> 16) | 0x40u : r;
    return (uint16_t)r;
}

/* Block conversions: n values from src to dst. */
static inline void fastopt_f16_to_f32_n(const uint16_t *src, float *dst, ptrdiff_t n)
{
    ptrdiff_t i = 0;
#if FASTOPT_F16C
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))));
#endif
    for (; i < n; i++)
        dst[i] = fastopt_f16_to_f32(src[i]);
}

static inline void fastopt_f32_to_f16_n(const float *src, uint16_t *dst, ptrdiff_t n)
{
    ptrdiff_t i = 0;
#if FASTOPT_F16C
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(dst + i),
                         _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
#endif
    for (; i < n; i++)
        dst[i] = fastopt_f32_to_f16(src[i]);
}

static inline void fastopt_bf16_to_f32_n(const uint16_t *src, float *dst, ptrdiff_t n)
{
    ptrdiff_t i;
    for (i = 0; i < n; i++)
        dst[i] = fastopt_bf16_to_f32(src[i]);
}

static inline void fastopt_f32_to_bf16_n(const float *src, uint16_t *dst, ptrdiff_t n)
{
    ptrdiff_t i;
    for (i = 0; i < n; i++)
        dst[i] = fastopt_f32_to_bf16(src[i]);
}

/* A 32-bit integer hash with full avalanche (Chris Wellons' "lowbias32"):
 * the counter-based generator of stochastic rounding is
 * r = fastopt_hash32(key + index). */
static inline uint32_t fastopt_hash32(uint32_t x)
{
    x ^= x >> 16;
    x *= 0x7feb352du;
    x ^= x >> 15;
    x *= 0x846ca68bu;
    x ^= x >> 16;
    return x;
}

/* Set a flag that several threads may set at once (all to 1); it is read
 * after the parallel region has ended. */
static inline void fastopt_flag_set(unsigned char *flag)
{
#if defined(_MSC_VER) && !defined(__clang__)
    _InterlockedExchange8((volatile char *)flag, 1);
#else
    __atomic_store_n(flag, (unsigned char)1, __ATOMIC_RELAXED);
#endif
}

#endif
