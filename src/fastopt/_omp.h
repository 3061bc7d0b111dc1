/* OpenMP behind one header: without OpenMP the calls become serial no-ops
 * and Cython's prange/parallel run on one thread. */
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
#endif
