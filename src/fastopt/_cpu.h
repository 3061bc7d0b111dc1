/* Which SIMD levels the running CPU (and OS) supports, and where the OpenMP
 * runtime was loaded from.  Used once, at import, to pick kernel modules. */
#ifndef FASTOPT_CPU_H
#define FASTOPT_CPU_H
#include "_omp.h"

#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__) || defined(_M_IX86)
#define FASTOPT_X86 1
#else
#define FASTOPT_X86 0
#endif

#if FASTOPT_X86 && defined(_MSC_VER) && !defined(__clang__)
#include <intrin.h>
#include <immintrin.h>
static int fastopt_cpuid_bit(int leaf, int sub, int reg, int bit) {
    int r[4]; __cpuidex(r, leaf, sub); return (r[reg] >> bit) & 1;
}
/* x86-64-v3: AVX2, FMA, BMI1/2, F16C, MOVBE, LZCNT and OS support for YMM. */
static int fastopt_has_avx2(void) {
    if (!fastopt_cpuid_bit(1, 0, 2, 27)) return 0;                 /* OSXSAVE */
    if ((_xgetbv(0) & 0x6) != 0x6) return 0;                       /* XMM|YMM state */
    return fastopt_cpuid_bit(7, 0, 1, 5) && fastopt_cpuid_bit(1, 0, 2, 12) &&
           fastopt_cpuid_bit(7, 0, 1, 3) && fastopt_cpuid_bit(7, 0, 1, 8) &&
           fastopt_cpuid_bit(1, 0, 2, 29) && fastopt_cpuid_bit(1, 0, 2, 22);
}
/* x86-64-v4: AVX-512 F, BW, CD, DQ, VL and OS support for ZMM. */
static int fastopt_has_avx512(void) {
    if (!fastopt_has_avx2()) return 0;
    if ((_xgetbv(0) & 0xe6) != 0xe6) return 0;
    return fastopt_cpuid_bit(7, 0, 1, 16) && fastopt_cpuid_bit(7, 0, 1, 30) &&
           fastopt_cpuid_bit(7, 0, 1, 28) && fastopt_cpuid_bit(7, 0, 1, 17) &&
           fastopt_cpuid_bit(7, 0, 1, 31);
}
#elif FASTOPT_X86
static int fastopt_has_avx2(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2");
}
static int fastopt_has_avx512(void) {
    __builtin_cpu_init();
    return fastopt_has_avx2() && __builtin_cpu_supports("avx512f") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512cd") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
}
#else
static int fastopt_has_avx2(void) { return 0; }
static int fastopt_has_avx512(void) { return 0; }
#endif

#if FASTOPT_OPENMP && !defined(_WIN32)
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <dlfcn.h>
/* Path of the shared library that provides the OpenMP runtime. */
static const char *fastopt_openmp_library(void) {
    Dl_info info;
    if (dladdr((void *)&omp_get_max_threads, &info) && info.dli_fname) return info.dli_fname;
    return "";
}
#elif FASTOPT_OPENMP
static const char *fastopt_openmp_library(void) { return "vcomp"; }
#else
static const char *fastopt_openmp_library(void) { return ""; }
#endif
#endif
