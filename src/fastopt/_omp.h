/* OpenMP behind one header: without OpenMP the calls become serial no-ops.
 * fastopt's kernels run on its own thread pool (_pool.h); OpenMP decides
 * the team size, so that OMP_NUM_THREADS and threadpoolctl apply. */
#ifndef FASTOPT_OMP_H
#define FASTOPT_OMP_H
#ifdef _OPENMP
#include <omp.h>
#define FASTOPT_OPENMP _OPENMP
#else
#define FASTOPT_OPENMP 0
static inline int omp_get_max_threads(void) { return 1; }
static inline int omp_get_thread_num(void) { return 0; }
static inline int omp_get_num_threads(void) { return 1; }
static inline void omp_set_num_threads(int n) { (void)n; }
#endif

/* OpenMP's team size for the calling thread (OMP_NUM_THREADS,
 * omp_set_num_threads, threadpoolctl) within OMP_THREAD_LIMIT. */
static inline int fastopt_omp_threads(void) {
    int n = omp_get_max_threads();
#if FASTOPT_OPENMP >= 200805
    int limit = omp_get_thread_limit();
    if (limit > 0 && limit < n) n = limit;
#endif
    return n > 0 ? n : 1;
}
#endif
