# Training-loop kernels (the core side of fastopt._train, included by
# _core.pyx): a parallel row gather (mini-batches) and a fused exponentially
# weighted average.  The design is described in _train.pyx.
from libc.stdint cimport int64_t
from libc.string cimport memcpy

# Work per thread below which a kernel stays on the calling thread.  Measured
# (2 cores, float32): a 392 KiB gather takes ~5 us on one thread and gains
# nothing from a second one; from ~800 KiB two threads are 1.3-2x faster.
# EWA: 64k elements take ~2.3 us on one thread (a 2-thread team is no
# faster); 128k elements 7.5 us on one thread, 4.5 us on two.
DEF TRAIN_GRAIN_BYTES = 262144
DEF TRAIN_GRAIN = 65536
# Chunks a thread claims at a time: rows of about TRAIN_CHUNK_BYTES (gather), TRAIN_CHUNK
# elements (EWA, whole cache lines).
DEF TRAIN_CHUNK_BYTES = 65536
DEF TRAIN_CHUNK = 8192


# ----------------------------------------------------------------- kernels ---

cdef inline void copy_rows(char *dst, const char *src, const int64_t *idx,
                           Py_ssize_t lo, Py_ssize_t hi, Py_ssize_t rowbytes) noexcept nogil:
    # dst[i] = src[idx[i]] for rows i in [lo, hi)
    cdef Py_ssize_t i
    if rowbytes == 8:
        for i in range(lo, hi):
            memcpy(dst + i * 8, src + idx[i] * 8, 8)
    elif rowbytes == 4:
        for i in range(lo, hi):
            memcpy(dst + i * 4, src + idx[i] * 4, 4)
    else:
        for i in range(lo, hi):
            memcpy(dst + i * rowbytes, src + idx[i] * rowbytes, rowbytes)


ctypedef struct GatherTask:
    char *dst
    const char *src
    const int64_t *idx
    Py_ssize_t n, rowbytes
    Py_ssize_t rows             # per chunk


cdef void gather_chunk(void *ctx, Py_ssize_t k) noexcept nogil:
    cdef const GatherTask *t = <const GatherTask *>ctx
    copy_rows(t.dst, t.src, t.idx, k * t.rows, min((k + 1) * t.rows, t.n), t.rowbytes)


cdef void gather_rows(char *dst, const char *src, const int64_t *idx,
                      Py_ssize_t n, Py_ssize_t rowbytes) noexcept nogil:
    cdef int nt = threads_for(n * rowbytes, TRAIN_GRAIN_BYTES)
    cdef GatherTask t
    if nt == 1:
        copy_rows(dst, src, idx, 0, n, rowbytes)
        return
    t.dst = dst
    t.src = src
    t.idx = idx
    t.n = n
    t.rowbytes = rowbytes
    t.rows = max(1, TRAIN_CHUNK_BYTES // rowbytes)
    run_chunks(gather_chunk, &t, (n + t.rows - 1) // t.rows, nt)


cdef inline void ewa_range(floating *avg, const floating *x, Py_ssize_t lo, Py_ssize_t hi,
                           floating b, floating cb) noexcept nogil:
    # avg = beta*avg + (1-beta)*x
    cdef Py_ssize_t i
    for i in range(lo, hi):
        avg[i] = b * avg[i] + cb * x[i]


ctypedef struct EwaTask:
    bint is_double
    void *avg
    const void *x
    Py_ssize_t n
    double b, cb


cdef void ewa_chunk(void *ctx, Py_ssize_t k) noexcept nogil:
    cdef const EwaTask *t = <const EwaTask *>ctx
    cdef Py_ssize_t lo = k * TRAIN_CHUNK, hi = min(lo + TRAIN_CHUNK, t.n)
    if t.is_double:
        ewa_range(<double *>t.avg, <const double *>t.x, lo, hi, t.b, t.cb)
    else:
        ewa_range(<float *>t.avg, <const float *>t.x, lo, hi, <float>t.b, <float>t.cb)


cdef void ewa(floating *avg, const floating *x, Py_ssize_t n, double beta) noexcept nogil:
    cdef floating b = <floating>beta, cb = <floating>(1.0 - beta)
    cdef int nt = threads_for(n, TRAIN_GRAIN)
    cdef EwaTask t
    if nt == 1:
        ewa_range(avg, x, 0, n, b, cb)
        return
    t.is_double = floating is double
    t.avg = avg
    t.x = x
    t.n = n
    t.b = b
    t.cb = cb
    run_chunks(ewa_chunk, &t, (n + TRAIN_CHUNK - 1) // TRAIN_CHUNK, nt)
