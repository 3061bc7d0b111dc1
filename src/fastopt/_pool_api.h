/* The interface of fastopt's thread pool, as the kernel modules see it.
 *
 * The pool itself (_pool.h) is compiled into one module, fastopt._runtime, so
 * that the process has one pool whatever the number of SIMD builds of the
 * kernels; the kernel core reaches it through the `fastopt_pool_api` table
 * that fastopt._runtime publishes as a capsule (see _core_threads.pxi). */
#ifndef FASTOPT_POOL_API_H
#define FASTOPT_POOL_API_H
#include <Python.h>     /* Py_ssize_t */

/* One chunk of a job.  A job is fn(ctx, c) for every c in [0, nchunks); the
 * chunks must be independent of each other and fixed by the caller (never
 * dependent on the number of threads), so that results are too. */
typedef void (*fastopt_chunk_fn)(void *ctx, Py_ssize_t chunk);

/* Flags of run(): each thread takes the chunks of its range from the end
 * (a second pass over data that a first pass left in the caches). */
#define FASTOPT_POOL_REVERSE 1

typedef struct {
    /* Runs the job on up to `nt` threads, the calling thread included, and
     * returns when every chunk has run.  Never blocks on a thread that has
     * not started: the caller runs whatever no other thread has claimed. */
    void (*run)(fastopt_chunk_fn fn, void *ctx, Py_ssize_t nchunks, int nt, int flags);
    /* The team size for a kernel called from this thread: OpenMP's
     * (OMP_NUM_THREADS, threadpoolctl, OMP_THREAD_LIMIT) capped by
     * fastopt.set_num_threads.  The one place the cap is kept. */
    int (*max_threads)(void);
} fastopt_pool_api;

/* The capsule's name; the number changes with the table's layout. */
#define FASTOPT_POOL_CAPSULE "fastopt._runtime.pool_api_v2"

#endif
