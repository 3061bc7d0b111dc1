/* fastopt's thread pool.  Compiled into fastopt._runtime only (one pool per
 * process); kernel modules call it through fastopt_pool_api (_pool_api.h).
 *
 * Design
 * ------
 * A job is `nchunks` fixed chunks, run as fn(ctx, chunk).  The chunks are
 * split into `nt` contiguous ranges, one per participant; the calling thread
 * is participant 0 and pool worker w is participant w.  Each participant
 * claims chunks from its own range first (one claim counter per range, each
 * on its own cache line), then from the other ranges in turn.
 *
 * * The caller never waits for a worker that has not started: once every
 *   range is exhausted it waits only for the chunks that running workers
 *   have claimed (a completion counter).  A worker that did not get a CPU
 *   claims nothing, so on a machine where other processes keep every core
 *   busy a call costs about what it costs on one thread, instead of waiting
 *   for a scheduler time slice as a fork-join team does at its barrier.
 * * Locality: on a quiet machine each participant runs its own range, the
 *   same one call after call (the same chunks, hence the same core's caches;
 *   one counter shared by all threads measured 30-50% slower because chunks
 *   moved between the cores).  FASTOPT_POOL_REVERSE runs each range from its
 *   end, for a second pass that starts where the first one stopped.
 * * Results never depend on the team: the caller fixes the chunks.
 * * Idle workers poll for the next job, calling sched_yield() between polls
 *   so that a busy process on their core keeps running, for `spin_ns` after
 *   their last job (2 ms by default: longer than the usual gap between two
 *   kernel calls, since waking a sleeping thread costs tens of microseconds
 *   on a virtual machine), then sleep on a condition variable.  The caller
 *   signals the condition variable only when some worker is asleep.
 *   (Polling with `pause`, even only for 100 us after each job, made calls
 *   on a busy machine erratic: at times 1.8x faster than on one thread, at
 *   times 1.3x slower, with means up to twice those of sched_yield().)
 * * A second caller (another Python thread; kernels release the GIL) finds
 *   the pool busy and runs its job alone, at once: it never waits either.
 * * Workers are started on first use and when a job wants more.  After
 *   fork() the child has no workers: a pthread_atfork handler resets the
 *   pool, and the child starts its own when it needs them.
 *
 * A late worker (one that saw job g but got no CPU until the caller had moved
 * on) must not run chunks of a later job with job g's fn and ctx.  Each claim
 * counter holds the job's generation in its high 32 bits and the number of
 * claims in the low 32; a claim is a compare-and-swap that succeeds only for
 * the participant's own generation.  The caller resets the counters to the
 * new generation before it writes the new job's description (release fence;
 * the workers read the description, then fence with acquire), so a worker
 * that read any part of a newer description fails every claim.  (The
 * generation repeats after 2^32 jobs: a worker would have to stall between
 * two instructions for that long.)
 *
 * Backends: POSIX threads with C11 atomics (Linux, macOS, other Unix with
 * gcc/clang); where they are missing (MSVC) an OpenMP parallel region whose
 * threads claim the same chunks the same way; without OpenMP, serial. */
#ifndef FASTOPT_POOL_H
#define FASTOPT_POOL_H
#include "_pool_api.h"
#include "_omp.h"

#if defined(FASTOPT_POOL_FORCE_OPENMP) && FASTOPT_OPENMP
#define FASTOPT_POOL_BACKEND 2
#elif !defined(_WIN32)
#define FASTOPT_POOL_BACKEND 1
#elif FASTOPT_OPENMP
#define FASTOPT_POOL_BACKEND 2
#else
#define FASTOPT_POOL_BACKEND 0
#endif
static const char *const FASTOPT_POOL_BACKEND_NAME[] = {"serial", "pthreads", "openmp"};

#define FO_MAX_THREADS 256
#define FO_LINE 64
#define FO_GEN_SHIFT 32
#define FO_MAX_CHUNKS 0x7fffffffLL     /* claims per range fit in the low 32 bits */

/* ------------------------------------------------------------- atomics --- */
#if defined(_MSC_VER) && !defined(__clang__)
#include <intrin.h>
#define FO_TLS __declspec(thread)
typedef volatile __int64 fo_u64;
static unsigned long long fo_load(fo_u64 *p) {
    return (unsigned long long)_InterlockedCompareExchange64(p, 0, 0);
}
static void fo_store(fo_u64 *p, unsigned long long v) { _InterlockedExchange64(p, (__int64)v); }
static int fo_cas(fo_u64 *p, unsigned long long *expected, unsigned long long desired) {
    __int64 old = _InterlockedCompareExchange64(p, (__int64)desired, (__int64)*expected);
    if ((unsigned long long)old == *expected) return 1;
    *expected = (unsigned long long)old;
    return 0;
}
static void fo_add(fo_u64 *p, long long v) { _InterlockedExchangeAdd64(p, v); }
#else
#include <stdatomic.h>
#define FO_TLS _Thread_local
typedef _Atomic unsigned long long fo_u64;
static unsigned long long fo_load(fo_u64 *p) {
    return atomic_load_explicit(p, memory_order_acquire);
}
/* Ordered by the fences and the job number around it (see fo_publish). */
static void fo_store(fo_u64 *p, unsigned long long v) {
    atomic_store_explicit(p, v, memory_order_relaxed);
}
static int fo_cas(fo_u64 *p, unsigned long long *expected, unsigned long long desired) {
    return atomic_compare_exchange_weak_explicit(p, expected, desired, memory_order_acquire,
                                                 memory_order_relaxed);
}
/* Release: the chunk's writes are visible to whoever reads the count. */
static void fo_add(fo_u64 *p, long long v) {
    atomic_fetch_add_explicit(p, (unsigned long long)v, memory_order_release);
}
#endif

/* ------------------------------------------------------ jobs and claims --- */

typedef struct {
    fastopt_chunk_fn fn;
    void *ctx;
    Py_ssize_t nchunks;
    int nt;
    int flags;
} fo_job;

typedef struct {
    fo_u64 v;
    char pad[FO_LINE - sizeof(fo_u64)];
} fo_counter;

static fo_counter fo_range[FO_MAX_THREADS];   /* claims per range: generation << 32 | count */
static fo_counter fo_done;                    /* chunks finished by workers in this job */
static FO_TLS int fo_participant = 0;         /* 0: not a pool worker (or the caller) */

/* Start of range r of a job's chunks (r = nt gives nchunks). */
static Py_ssize_t fo_bound(const fo_job *j, int r) {
    return (Py_ssize_t)((long long)j->nchunks * r / j->nt);
}

/* The next unclaimed index (0, 1, ... within the range) of a range of `len`
 * chunks, or -1 if the range is exhausted or belongs to another job. */
static Py_ssize_t fo_claim(fo_u64 *counter, unsigned gen, Py_ssize_t len) {
    unsigned long long v = fo_load(counter), i;
    for (;;) {
        if ((unsigned)(v >> FO_GEN_SHIFT) != gen) return -1;
        i = v & 0xffffffffULL;
        if ((long long)i >= (long long)len) return -1;
        if (fo_cas(counter, &v, v + 1)) return (Py_ssize_t)i;
    }
}

static void fo_chunk_done(fo_u64 *done);

/* Participant `me` runs chunks of job `gen` until every range is exhausted:
 * its own range first, then the others in turn.  Workers count each chunk
 * in `done` as it finishes; returns the number of chunks run. */
static Py_ssize_t fo_participate(const fo_job *j, unsigned gen, int me, fo_u64 *done) {
    Py_ssize_t ran = 0, lo, hi, i;
    int k, r;
    for (k = 0; k < j->nt; k++) {
        r = me + k < j->nt ? me + k : me + k - j->nt;
        lo = fo_bound(j, r);
        hi = fo_bound(j, r + 1);
        while ((i = fo_claim(&fo_range[r].v, gen, hi - lo)) >= 0) {
            j->fn(j->ctx, (j->flags & FASTOPT_POOL_REVERSE) ? hi - 1 - i : lo + i);
            ran++;
            if (done) fo_chunk_done(done);
        }
    }
    return ran;
}

static void fo_run_serial(const fo_job *j) {
    Py_ssize_t c;
    if (j->flags & FASTOPT_POOL_REVERSE) {
        for (c = j->nchunks - 1; c >= 0; c--) j->fn(j->ctx, c);
    } else {
        for (c = 0; c < j->nchunks; c++) j->fn(j->ctx, c);
    }
}

/* What the pool did (tests and diagnostics); added to by the pool's owner,
 * read by anyone (atomics: no data race, and no cost worth counting). */
typedef struct {
    fo_u64 jobs;             /* jobs run by a team */
    fo_u64 chunks;           /* their chunks */
    fo_u64 caller_chunks;    /* of which the calling thread ran */
    fo_u64 workers;          /* workers started in this process */
    fo_u64 caller_sleeps;    /* jobs whose caller slept waiting for a worker's chunk */
} fo_stats_t;
static fo_stats_t fo_stats;

#if FASTOPT_POOL_BACKEND == 1
/* ------------------------------------------------------- POSIX threads --- */
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <string.h>
#include <time.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define fo_relax() _mm_pause()
#elif defined(__aarch64__) || defined(__arm__)
#define fo_relax() __asm__ __volatile__("yield" ::: "memory")
#else
#define fo_relax() ((void)0)
#endif

/* The caller waits for the chunks that workers claimed with `pause` for this
 * long (several chunks' time), then sleeps until the last one is done.  A
 * worker that takes longer was preempted holding a chunk; sleeping, rather
 * than spinning or sched_yield(), gives the CPU to whoever needs it (it may
 * be that worker) and gets the caller a waker's priority back when the
 * worker finishes. */
#define FO_CALLER_SPIN_NS 50000LL

static struct {
    _Alignas(FO_LINE) _Atomic unsigned long long seq;   /* job number; workers watch it */
    /* The job's description (relaxed atomics: a late worker may read it
     * while the next job is being set up; see the top of the file). */
    _Atomic(fastopt_chunk_fn) fn;
    _Atomic(void *) ctx;
    _Atomic long long nchunks;
    _Atomic int nt;
    _Atomic int flags;
    _Alignas(FO_LINE) _Atomic int busy;         /* a caller owns the pool */
    _Atomic int sleepers;                       /* workers waiting on `wake` */
    _Atomic int caller_waiting;                 /* the caller waits on `done_cv` */
    _Atomic long long spin_ns;                  /* idle polling before sleeping; < 0: forever */
    _Atomic int hold;                           /* test hook: workers claim nothing */
    _Atomic long long alone;                    /* jobs run alone: the pool was busy */
    _Atomic int nworkers;                       /* started (changed by the owner only) */
    unsigned long long start_seq[FO_MAX_THREADS];
    pthread_mutex_t lock;
    pthread_cond_t wake;                        /* a new job */
    pthread_mutex_t done_lock;
    pthread_cond_t done_cv;                     /* a chunk finished */
} fo_pool = {.spin_ns = 2000000, .lock = PTHREAD_MUTEX_INITIALIZER,
             .wake = PTHREAD_COND_INITIALIZER, .done_lock = PTHREAD_MUTEX_INITIALIZER,
             .done_cv = PTHREAD_COND_INITIALIZER};

static long long fo_now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (long long)t.tv_sec * 1000000000LL + t.tv_nsec;
}

/* Sleep until the job number differs from `seen`. */
static void fo_sleep(unsigned long long seen) {
    pthread_mutex_lock(&fo_pool.lock);
    /* seq_cst, paired with fo_publish: either the caller sees this worker
     * asleep and signals, or this worker sees the new job number. */
    atomic_fetch_add(&fo_pool.sleepers, 1);
    while (atomic_load(&fo_pool.seq) == seen) pthread_cond_wait(&fo_pool.wake, &fo_pool.lock);
    atomic_fetch_sub(&fo_pool.sleepers, 1);
    pthread_mutex_unlock(&fo_pool.lock);
}

static void *fo_worker(void *arg) {
    int me = (int)(Py_ssize_t)arg;
    unsigned long long seen = fo_pool.start_seq[me], s;
    long long idle_since = fo_now_ns(), spin;
    fo_job j;
    fo_participant = me;
    for (;;) {
        s = atomic_load_explicit(&fo_pool.seq, memory_order_acquire);
        if (s != seen) {
            seen = s;
            j.fn = atomic_load_explicit(&fo_pool.fn, memory_order_relaxed);
            j.ctx = atomic_load_explicit(&fo_pool.ctx, memory_order_relaxed);
            j.nchunks = (Py_ssize_t)atomic_load_explicit(&fo_pool.nchunks, memory_order_relaxed);
            j.nt = atomic_load_explicit(&fo_pool.nt, memory_order_relaxed);
            j.flags = atomic_load_explicit(&fo_pool.flags, memory_order_relaxed);
            atomic_thread_fence(memory_order_acquire);
            if (me < j.nt && !atomic_load_explicit(&fo_pool.hold, memory_order_relaxed))
                fo_participate(&j, (unsigned)s, me, &fo_done.v);
            idle_since = fo_now_ns();
            continue;
        }
        spin = atomic_load_explicit(&fo_pool.spin_ns, memory_order_relaxed);
        if (spin >= 0 && fo_now_ns() - idle_since >= spin) {
            fo_sleep(seen);
            idle_since = fo_now_ns();
            continue;
        }
        sched_yield();
    }
    return NULL;
}

/* A worker finished a chunk: count it, and wake the caller if it sleeps. */
static void fo_chunk_done(fo_u64 *done) {
    /* seq_cst, paired with fo_wait_done: either the caller sees this count
     * or this worker sees the caller waiting. */
    atomic_fetch_add(done, 1);
    if (atomic_load(&fo_pool.caller_waiting)) {
        pthread_mutex_lock(&fo_pool.done_lock);
        pthread_cond_signal(&fo_pool.done_cv);
        pthread_mutex_unlock(&fo_pool.done_lock);
    }
}

/* The caller: wait until workers have finished `theirs` chunks. */
static void fo_wait_done(Py_ssize_t theirs) {
    long long t0 = 0, k;
    for (k = 0; (Py_ssize_t)fo_load(&fo_done.v) != theirs; k++) {
        if ((k & 63) == 63) {
            if (t0 == 0) {
                t0 = fo_now_ns();
            } else if (fo_now_ns() - t0 > FO_CALLER_SPIN_NS) {
                fo_add(&fo_stats.caller_sleeps, 1);
                pthread_mutex_lock(&fo_pool.done_lock);
                atomic_store(&fo_pool.caller_waiting, 1);
                while ((Py_ssize_t)atomic_load(&fo_done.v) != theirs)
                    pthread_cond_wait(&fo_pool.done_cv, &fo_pool.done_lock);
                atomic_store(&fo_pool.caller_waiting, 0);
                pthread_mutex_unlock(&fo_pool.done_lock);
                return;
            }
        }
        fo_relax();
    }
}

/* Start workers until there are `want` (or as many as the system allows). */
static void fo_grow(int want) {
    pthread_attr_t attr;
    pthread_t tid;
    sigset_t all, old;
    size_t stack = 0;
    if (pthread_attr_init(&attr) != 0) return;
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    /* The kernels keep up to ~64 KiB of scratch on the stack; some systems
     * give new threads only 512 KiB. */
    if (pthread_attr_getstacksize(&attr, &stack) != 0 || stack < ((size_t)2 << 20))
        pthread_attr_setstacksize(&attr, (size_t)2 << 20);
    /* Signals go to the application's threads, never to a worker. */
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    while (fo_pool.nworkers < want) {
        int me = fo_pool.nworkers + 1;
        fo_pool.start_seq[me] = atomic_load_explicit(&fo_pool.seq, memory_order_relaxed);
        if (pthread_create(&tid, &attr, fo_worker, (void *)(Py_ssize_t)me) != 0) break;
        fo_pool.nworkers = me;
        fo_add(&fo_stats.workers, 1);
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    pthread_attr_destroy(&attr);
}

/* Make job `j` the current one; returns its generation. */
static unsigned fo_publish(const fo_job *j) {
    unsigned long long s = atomic_load_explicit(&fo_pool.seq, memory_order_relaxed) + 1;
    unsigned gen = (unsigned)s;
    int r;
    for (r = 0; r < j->nt; r++) fo_store(&fo_range[r].v, (unsigned long long)gen << FO_GEN_SHIFT);
    fo_store(&fo_done.v, 0);
    /* Counters first: a late worker that reads any of what follows fails its claims. */
    atomic_thread_fence(memory_order_release);
    atomic_store_explicit(&fo_pool.fn, j->fn, memory_order_relaxed);
    atomic_store_explicit(&fo_pool.ctx, j->ctx, memory_order_relaxed);
    atomic_store_explicit(&fo_pool.nchunks, (long long)j->nchunks, memory_order_relaxed);
    atomic_store_explicit(&fo_pool.nt, j->nt, memory_order_relaxed);
    atomic_store_explicit(&fo_pool.flags, j->flags, memory_order_relaxed);
    atomic_store(&fo_pool.seq, s);      /* seq_cst: see fo_sleep */
    if (atomic_load(&fo_pool.sleepers) > 0) {
        pthread_mutex_lock(&fo_pool.lock);
        pthread_cond_broadcast(&fo_pool.wake);
        pthread_mutex_unlock(&fo_pool.lock);
    }
    return gen;
}

static void fo_run(fastopt_chunk_fn fn, void *ctx, Py_ssize_t nchunks, int nt, int flags) {
    fo_job j = {fn, ctx, nchunks, nt, flags};
    int idle = 0;
    Py_ssize_t mine;
    if (j.nt > FO_MAX_THREADS) j.nt = FO_MAX_THREADS;
    if (j.nt > nchunks) j.nt = (int)nchunks;
    if (j.nt <= 1 || nchunks > FO_MAX_CHUNKS) {
        fo_run_serial(&j);
        return;
    }
    if (!atomic_compare_exchange_strong(&fo_pool.busy, &idle, 1)) {
        atomic_fetch_add_explicit(&fo_pool.alone, 1, memory_order_relaxed);
        fo_run_serial(&j);
        return;
    }
    if (fo_pool.nworkers < j.nt - 1) fo_grow(j.nt - 1);
    if (j.nt > fo_pool.nworkers + 1) j.nt = fo_pool.nworkers + 1;
    if (j.nt <= 1) {
        atomic_store_explicit(&fo_pool.busy, 0, memory_order_release);
        fo_run_serial(&j);
        return;
    }
    mine = fo_participate(&j, fo_publish(&j), 0, NULL);
    /* Every range is exhausted: wait for the chunks running workers claimed. */
    fo_wait_done(nchunks - mine);
    fo_add(&fo_stats.jobs, 1);
    fo_add(&fo_stats.chunks, nchunks);
    fo_add(&fo_stats.caller_chunks, mine);
    atomic_store_explicit(&fo_pool.busy, 0, memory_order_release);
}

/* In a forked child: the workers do not exist there.  Only plain stores
 * (a mutex another thread held at fork() must not be touched). */
static void fo_atfork_child(void) {
    static const pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
    static const pthread_cond_t cond = PTHREAD_COND_INITIALIZER;
    memcpy((void *)&fo_pool.lock, &lock, sizeof lock);
    memcpy((void *)&fo_pool.wake, &cond, sizeof cond);
    memcpy((void *)&fo_pool.done_lock, &lock, sizeof lock);
    memcpy((void *)&fo_pool.done_cv, &cond, sizeof cond);
    atomic_store_explicit(&fo_pool.caller_waiting, 0, memory_order_relaxed);
    fo_pool.nworkers = 0;
    fo_store(&fo_stats.jobs, 0);
    fo_store(&fo_stats.chunks, 0);
    fo_store(&fo_stats.caller_chunks, 0);
    fo_store(&fo_stats.workers, 0);
    fo_store(&fo_stats.caller_sleeps, 0);
    atomic_store_explicit(&fo_pool.alone, 0, memory_order_relaxed);
    atomic_store_explicit(&fo_pool.sleepers, 0, memory_order_relaxed);
    atomic_store_explicit(&fo_pool.busy, 0, memory_order_relaxed);
}

static int fo_init(void) { return pthread_atfork(NULL, NULL, fo_atfork_child); }
static void fo_set_spin(long long ns) { atomic_store(&fo_pool.spin_ns, ns); }
static void fo_hold(int hold) { atomic_store(&fo_pool.hold, hold); }
static long long fo_alone(void) { return atomic_load(&fo_pool.alone); }
static int fo_workers(void) { return fo_pool.nworkers; }
static int fo_busy(void) { return atomic_load(&fo_pool.busy); }

#elif FASTOPT_POOL_BACKEND == 2
/* -------------------------------------------------------- OpenMP team --- */
/* The region's threads claim the chunks exactly as above; its barrier makes
 * every claim belong to the current job. */
static void fo_chunk_done(fo_u64 *done) { fo_add(done, 1); }   /* (unused: no counting) */
static fo_u64 fo_busy_flag;
static fo_u64 fo_seq;
static fo_u64 fo_alone_count;

static void fo_run(fastopt_chunk_fn fn, void *ctx, Py_ssize_t nchunks, int nt, int flags) {
    fo_job j = {fn, ctx, nchunks, nt, flags};
    unsigned long long idle = 0;
    unsigned gen;
    int r;
    long long mine = 0;
    if (j.nt > FO_MAX_THREADS) j.nt = FO_MAX_THREADS;
    if (j.nt > nchunks) j.nt = (int)nchunks;
    if (j.nt <= 1 || nchunks > FO_MAX_CHUNKS) {
        fo_run_serial(&j);
        return;
    }
    if (!fo_cas(&fo_busy_flag, &idle, 1)) {
        fo_add(&fo_alone_count, 1);
        fo_run_serial(&j);
        return;
    }
    gen = (unsigned)(fo_load(&fo_seq) + 1);
    fo_store(&fo_seq, gen);
    for (r = 0; r < j.nt; r++) fo_store(&fo_range[r].v, (unsigned long long)gen << FO_GEN_SHIFT);
    #pragma omp parallel num_threads(j.nt)
    {
        /* The team may be smaller than asked: the missing ranges are claimed by the others. */
        int me = omp_get_thread_num();
        Py_ssize_t ran;
        fo_participant = me;
        ran = fo_participate(&j, gen, me < j.nt ? me : 0, NULL);
        if (me == 0) mine = ran;
    }
    fo_participant = 0;
    fo_add(&fo_stats.jobs, 1);
    fo_add(&fo_stats.chunks, nchunks);
    fo_add(&fo_stats.caller_chunks, mine);
    fo_store(&fo_busy_flag, 0);
}

static int fo_init(void) { return 0; }
static void fo_set_spin(long long ns) { (void)ns; }
static void fo_hold(int hold) { (void)hold; }
static long long fo_alone(void) { return (long long)fo_load(&fo_alone_count); }
static int fo_workers(void) { return omp_get_max_threads() - 1; }
static int fo_busy(void) { return (int)fo_load(&fo_busy_flag); }

#else
/* ---------------------------------------------------------------- serial --- */
static void fo_chunk_done(fo_u64 *done) { fo_add(done, 1); }   /* (unused) */
static void fo_run(fastopt_chunk_fn fn, void *ctx, Py_ssize_t nchunks, int nt, int flags) {
    fo_job j = {fn, ctx, nchunks, nt, flags};
    fo_run_serial(&j);
}
static int fo_init(void) { return 0; }
static void fo_set_spin(long long ns) { (void)ns; }
static void fo_hold(int hold) { (void)hold; }
static long long fo_alone(void) { return 0; }
static int fo_workers(void) { return 0; }
static int fo_busy(void) { return 0; }
#endif

/* ------------------------------------------------ what _runtime.pyx uses --- */

/* The thread cap of fastopt.set_num_threads (0: none), read once by every
 * kernel call (an aligned int: a call sees the old cap or the new one). */
static volatile int fo_thread_limit = 0;
static void fastopt_pool_set_thread_limit(int n) { fo_thread_limit = n > 0 ? n : 0; }
static int fo_max_threads(void) {
    int nt = fastopt_omp_threads();
    int cap = fo_thread_limit;
    return cap > 0 && cap < nt ? cap : nt;
}

static const fastopt_pool_api fastopt_pool_table = {fo_run, fo_max_threads};

/* Registers the fork handler; returns the table (NULL if that failed). */
static const fastopt_pool_api *fastopt_pool_init(void) {
    return fo_init() == 0 ? &fastopt_pool_table : NULL;
}
static const char *fastopt_pool_backend(void) { return FASTOPT_POOL_BACKEND_NAME[FASTOPT_POOL_BACKEND]; }
static void fastopt_pool_set_spin(long long ns) { fo_set_spin(ns); }
static void fastopt_pool_hold_workers(int hold) { fo_hold(hold); }
static int fastopt_pool_participant(void) { return fo_participant; }
static void fastopt_pool_stats(long long out[8]) {
    out[0] = (long long)fo_load(&fo_stats.jobs);
    out[1] = (long long)fo_load(&fo_stats.chunks);
    out[2] = (long long)fo_load(&fo_stats.caller_chunks);
    out[3] = (long long)fo_load(&fo_stats.workers);
    out[4] = fo_workers();
    out[5] = fo_alone();
    out[6] = fo_busy();
    out[7] = (long long)fo_load(&fo_stats.caller_sleeps);
}
#endif
