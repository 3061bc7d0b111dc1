# Batch Normalization forward and backward, fused and multithreaded.
#
# Design
# ------
# * x is viewed as (outer, C, inner): outer = prod(shape[:axis]), inner =
#   prod(shape[axis+1:]).  NCHW has a large inner (one contiguous segment of
#   H*W values per (n, c)); NHWC and (N, C) have inner == 1 (rows of C
#   contiguous channels).
# * The work is cut into *boxes*, a FIXED partition that depends only on the
#   shape (never on the thread count):
#     - segment layout (inner >= SEGMENT_MIN): a box is one channel x a group
#       of `og` consecutive outer indices x a chunk of `il` inner values, about
#       BOX elements in all;
#     - row layout (small inner): a box is a block of `og` consecutive rows x
#       a chunk of `cc` channels, about BOX elements; the loops run along the
#       contiguous channel axis, so they vectorize across channels (with few
#       channels, over groups of rows: see "row layout" below).
#   Boxes are numbered b = k*U + u: k the channel (chunk), u in [0, U) the
#   box's place along the channel's reduction (the same U for every channel).
# * Forward statistics: every box yields, per channel, (count, mean, M2) in
#   double from two passes over the box while it is in cache (a shifted sum,
#   then the sum of squared deviations from the box mean: never
#   E[x^2] - E[x]^2).  The shift (the box's first value) makes a constant
#   channel's deviations exactly zero.  The boxes of a channel are then merged
#   in order u = 0, 1, ... with Chan's formula.  Backward sums (sum dy and
#   sum dy*(x - mean)) use the same boxes, merged in the same fixed order.
#   Every box is computed by one thread with a fixed order of operations, so
#   the results are bit-identical for any number of threads.
# * Reductions inside a segment keep LANES independent double accumulators
#   (lane k takes the values i = k mod LANES): the compiler vectorizes them
#   without reassociating anything (no -ffast-math), and the order is fixed.
# * Passes over memory.  Forward: one statistics pass (each box read twice,
#   the second time from cache) and one pass that reads x and writes y.
#   Backward: one pass reading x and dy for the sums and one that reads them
#   again and writes dx.  Both passes are jobs on the thread pool; the boxes
#   are visited in the order of x in memory (streaming), each thread taking
#   the same range of boxes in both passes, the second pass in reverse order
#   so that it starts on the data the first pass left in the caches (L2, and
#   the L3 for the rest).  (Running both passes per channel while the channel
#   is in L2, which reads x from memory only once, measured slower in NCHW:
#   a channel is many short strided segments.)
# * Arithmetic of the y and dx passes is in double (float32 inputs are widened
#   and the result rounded once); the per-channel coefficients are computed in
#   double once per call.  Saved statistics (ctx.mean, ctx.invstd) are float64.
# * float16/bfloat16 x, dy (and so y, dx): the loops read and write them
#   through `ld`/`st` with a storage tag (_half.pxi), widening to double as
#   for float32; results are rounded to float32 and then to x's dtype.
#   gamma, beta, the running statistics and dgamma, dbeta are float32 then.
# * The `def` functions validate everything before `nogil`; nothing is
#   written when a check fails.  Scratch (the per-box partial statistics, a
#   few arrays of C doubles) is a small float64 array allocated per call.
include "_common.pxi"
include "_half.pxi"

cimport cython
from libc.math cimport sqrt
import numpy as np

# Values per box (row layout: at least MIN_ROWS rows, at most 64 Ki values):
# a box is read twice in a row, so it must stay in L1/L2.
DEF BOX = 8192
# Inner sizes below this use the row layout.
DEF SEGMENT_MIN = 16
# Row layout: channels per box at most (so many channels with a small batch
# still give several boxes).
DEF CHUNK_C = 1024
# Row layout: rows per box at least, so that the per-box partial results (two
# doubles per channel) stay below a sixteenth of x's float32 size.
DEF MIN_ROWS = 64
# Row layout: rows are taken R at a time so that the loops along the
# contiguous axis run over up to GROUP_V values, i.e. at least 32 independent
# 8-double accumulators: enough to hide the latency of their updates (with
# one row of 64 channels at a time, that latency made the statistics pass
# three times slower).
DEF GROUP_V = 256
# Independent accumulators per segment reduction.
DEF LANES = 32
# Elements per thread below which a call stays on the calling thread.
DEF GRAIN = 32768
# Channels per task when merging partial statistics.
DEF MERGE_C = 64


ctypedef struct Plan:
    Py_ssize_t outer, C, inner, m   # m = outer*inner values per channel
    bint rows                       # row layout (else segment layout)
    Py_ssize_t og, il, cc           # box extent along outer, inner, channels
    Py_ssize_t R                    # row layout, inner == 1: rows per group
    Py_ssize_t ni                   # boxes along inner (segment layout)
    Py_ssize_t nk                   # channel chunks (= C in the segment layout)
    Py_ssize_t U                    # boxes per channel (chunk)
    Py_ssize_t nbox                 # nk * U
    int nt                          # threads


ctypedef struct Box:
    Py_ssize_t o0, o1, c0, c1, i0, i1, u


cdef void make_plan(Plan *p, Py_ssize_t outer, Py_ssize_t C, Py_ssize_t inner) noexcept nogil:
    """Cut (outer, C, inner) into boxes."""
    p.outer = outer
    p.C = C
    p.inner = inner
    p.m = outer * inner
    p.rows = inner < SEGMENT_MIN
    if p.rows:
        p.il = inner
        p.ni = 1
        p.cc = max(1, min(C, CHUNK_C // max(1, inner)))
        p.nk = (C + p.cc - 1) // p.cc
        p.og = max(MIN_ROWS, BOX // max(1, p.cc * inner))
        # Groups of R rows are contiguous only when a box holds every channel.
        p.R = max(1, GROUP_V // p.cc) if inner == 1 and p.cc == C else 1
        p.og = max(p.R, p.og - p.og % p.R)
    else:
        p.R = 1
        p.cc = 1
        p.nk = C
        if inner >= BOX:
            p.il = BOX
            p.og = 1
        else:
            p.il = inner
            p.og = BOX // inner
        p.ni = (inner + p.il - 1) // p.il
    p.og = min(p.og, outer) if outer > 0 else 1
    p.U = ((outer + p.og - 1) // p.og) * p.ni
    p.nbox = p.nk * p.U
    p.nt = threads_for(outer * C * inner, GRAIN)


cdef inline void box_of(const Plan *p, Py_ssize_t b, Box *x) noexcept nogil:
    cdef Py_ssize_t k = b // p.U, u = b % p.U
    cdef Py_ssize_t g = u // p.ni, j = u % p.ni
    x.u = u
    x.c0 = k * p.cc
    x.c1 = min(p.C, x.c0 + p.cc)
    x.o0 = g * p.og
    x.o1 = min(p.outer, x.o0 + p.og)
    x.i0 = j * p.il
    x.i1 = min(p.inner, x.i0 + p.il)


cdef inline Py_ssize_t box_count(const Plan *p, Py_ssize_t u) noexcept nogil:
    """Values per channel in the boxes at place u (the same for every channel)."""
    cdef Py_ssize_t g = u // p.ni, j = u % p.ni
    cdef Py_ssize_t o0 = g * p.og, i0 = j * p.il
    return (min(p.outer, o0 + p.og) - o0) * (min(p.inner, i0 + p.il) - i0)


# ------------------------------------------------------ segment reductions ---

cdef inline void zero_lanes(double *acc) noexcept nogil:
    cdef int k
    for k in range(LANES):
        acc[k] = 0.0


cdef inline double sum_lanes(const double *acc) noexcept nogil:
    # Pairwise, in a fixed order.
    cdef double t[LANES]
    cdef int k, w = LANES // 2
    for k in range(LANES):
        t[k] = acc[k]
    while w >= 1:
        for k in range(w):
            t[k] = t[k] + t[k + w]
        w = w // 2
    return t[0]


cdef inline const floating *at(const floating *x, Py_ssize_t off, Storage *t) noexcept nogil:
    """x + off elements of its storage."""
    if Storage is AsOwn:
        return x + off
    else:
        return <const floating *>(<const uint16_t *>x + off)


# float16 spans are widened SPAN16 values at a time into a float32 buffer
# (F16C where the level has it) and go through the float32 loops: converting
# float16 one element at a time in these loops cost twice BatchNorm's own work.
# SPAN16 is a multiple of LANES, so every value keeps its lane.
DEF SPAN16 = 512


cdef inline floating *widen16(const floating *p, Py_ssize_t off, Py_ssize_t n,
                              float *buf) noexcept nogil:
    """p[off:off+n] (float16 bits) as float32, in buf."""
    fastopt_f16_to_f32_n(<const uint16_t *>p + off, buf, n)
    return <floating *>buf


cdef inline void lanes_shifted(const floating *p, Py_ssize_t n, double shift,
                               double *acc, Storage *t) noexcept nogil:
    # acc[k] += sum over i = k (mod LANES) of (p[i] - shift)
    cdef Py_ssize_t i, nw = n - n % LANES, b
    cdef int k
    cdef float buf[SPAN16]
    if floating is float and Storage is AsF16:
        for b in range(0, n, SPAN16):
            lanes_shifted(widen16(p, b, min(SPAN16, n - b), buf), min(SPAN16, n - b),
                          shift, acc, <AsOwn *>NULL)
    else:
        for i in range(0, nw, LANES):
            for k in range(LANES):
                acc[k] += <double>ld(p, i + k, t) - shift
        for k in range(n - nw):
            acc[k] += <double>ld(p, nw + k, t) - shift


cdef inline void lanes_sqdev(const floating *p, Py_ssize_t n, double mean,
                             double *acc, Storage *t) noexcept nogil:
    # acc[k] += sum over i = k (mod LANES) of (p[i] - mean)^2
    cdef Py_ssize_t i, nw = n - n % LANES, b
    cdef int k
    cdef double d
    cdef float buf[SPAN16]
    if floating is float and Storage is AsF16:
        for b in range(0, n, SPAN16):
            lanes_sqdev(widen16(p, b, min(SPAN16, n - b), buf), min(SPAN16, n - b),
                        mean, acc, <AsOwn *>NULL)
    else:
        for i in range(0, nw, LANES):
            for k in range(LANES):
                d = <double>ld(p, i + k, t) - mean
                acc[k] += d * d
        for k in range(n - nw):
            d = <double>ld(p, nw + k, t) - mean
            acc[k] += d * d


cdef inline void lanes_grad(const floating *x, const floating *dy, Py_ssize_t n,
                            double mean, double *a1, double *a2, Storage *t) noexcept nogil:
    # a1[k] += sum dy;  a2[k] += sum dy*(x - mean)   (over i = k mod LANES)
    cdef Py_ssize_t i, nw = n - n % LANES, b, m
    cdef int k
    cdef double g
    cdef float bx[SPAN16]
    cdef float bg[SPAN16]
    if floating is float and Storage is AsF16:
        for b in range(0, n, SPAN16):
            m = min(SPAN16, n - b)
            lanes_grad(widen16(x, b, m, bx), widen16(dy, b, m, bg), m, mean, a1, a2,
                       <AsOwn *>NULL)
    else:
        for i in range(0, nw, LANES):
            for k in range(LANES):
                g = <double>ld(dy, i + k, t)
                a1[k] += g
                a2[k] += g * (<double>ld(x, i + k, t) - mean)
        for k in range(n - nw):
            g = <double>ld(dy, nw + k, t)
            a1[k] += g
            a2[k] += g * (<double>ld(x, nw + k, t) - mean)


# ------------------------------------------------------------- row layout ---
# inner == 1: a box is rows [o0, o1) x channels [c0, c1).  Loops run along a
# row (vectorized across channels) with one accumulator per channel.  With
# few channels, R consecutive rows (contiguous: the box holds every channel)
# form one run of V = R*nc values, with R accumulators per channel that are
# added in a fixed order at the end of the box; a last incomplete group is
# taken row by row.  Per-channel arrays are then repeated R times.

cdef inline void repeat(const double *src, Py_ssize_t nc, Py_ssize_t R,
                        double *dst) noexcept nogil:
    cdef Py_ssize_t r, c
    for r in range(R):
        for c in range(nc):
            dst[r * nc + c] = src[c]


cdef inline void fold(const double *acc, Py_ssize_t nc, Py_ssize_t R,
                      double *out) noexcept nogil:
    # out[c] = acc[c] + acc[nc + c] + ... + acc[(R-1)*nc + c]
    cdef Py_ssize_t r, c
    cdef double t
    for c in range(nc):
        t = acc[c]
        for r in range(1, R):
            t = t + acc[r * nc + c]
        out[c] = t


cdef inline Py_ssize_t run_length(const Plan *p, Py_ssize_t o, Py_ssize_t o1,
                                  Py_ssize_t nc) noexcept nogil:
    """Values in the run starting at row o: a group of R rows or one row."""
    return p.R * nc if o + p.R <= o1 else nc


cdef inline void run_shifted(const floating *x, Py_ssize_t n, const double *rep,
                             double *acc, Storage *t) noexcept nogil:
    # acc[v] += x[v] - rep[v]
    cdef Py_ssize_t v, b
    cdef float buf[SPAN16]
    if floating is float and Storage is AsF16:
        for b in range(0, n, SPAN16):
            run_shifted(widen16(x, b, min(SPAN16, n - b), buf), min(SPAN16, n - b),
                        rep + b, acc + b, <AsOwn *>NULL)
    else:
        for v in range(n):
            acc[v] += <double>ld(x, v, t) - rep[v]


cdef inline void run_sqdev(const floating *x, Py_ssize_t n, const double *rep,
                           double *acc, Storage *t) noexcept nogil:
    # acc[v] += (x[v] - rep[v])^2
    cdef Py_ssize_t v, b
    cdef double d
    cdef float buf[SPAN16]
    if floating is float and Storage is AsF16:
        for b in range(0, n, SPAN16):
            run_sqdev(widen16(x, b, min(SPAN16, n - b), buf), min(SPAN16, n - b),
                      rep + b, acc + b, <AsOwn *>NULL)
    else:
        for v in range(n):
            d = <double>ld(x, v, t) - rep[v]
            acc[v] += d * d


cdef inline void run_grad(const floating *x, const floating *dy, Py_ssize_t n,
                          const double *rep, double *a1, double *a2, Storage *t) noexcept nogil:
    # a1[v] += dy[v];  a2[v] += dy[v]*(x[v] - rep[v])
    cdef Py_ssize_t v, b, m
    cdef double g
    cdef float bx[SPAN16]
    cdef float bg[SPAN16]
    if floating is float and Storage is AsF16:
        for b in range(0, n, SPAN16):
            m = min(SPAN16, n - b)
            run_grad(widen16(x, b, m, bx), widen16(dy, b, m, bg), m, rep + b, a1 + b,
                     a2 + b, <AsOwn *>NULL)
    else:
        for v in range(n):
            g = <double>ld(dy, v, t)
            a1[v] += g
            a2[v] += g * (<double>ld(x, v, t) - rep[v])


cdef inline void run_affine(const floating *x, const floating *z, floating *out, Py_ssize_t n,
                            const double *mu, const double *a, const double *b,
                            const double *k, Storage *t) noexcept nogil:
    # out = b*(x - mu) + k (z NULL);  a*z (b NULL);  a*z + b*(x - mu) + k
    cdef Py_ssize_t v, s, m
    cdef float bx[SPAN16]
    cdef float bz[SPAN16]
    cdef float bo[SPAN16]
    if floating is float and Storage is AsF16:
        for s in range(0, n, SPAN16):
            m = min(SPAN16, n - s)
            run_affine(widen16(x, s, m, bx) if b != NULL else NULL,
                       widen16(z, s, m, bz) if z != NULL else NULL, <floating *>bo, m,
                       mu + s, a + s if a != NULL else NULL, b + s if b != NULL else NULL,
                       k + s, <AsOwn *>NULL)
            fastopt_f32_to_f16_n(bo, <uint16_t *>out + s, m)
    else:
        if z == NULL:
            for v in range(n):
                st(out, v, <floating>(b[v] * (<double>ld(x, v, t) - mu[v]) + k[v]), t, 0)
        elif b == NULL:
            for v in range(n):
                st(out, v, <floating>(a[v] * <double>ld(z, v, t)), t, 0)
        else:
            for v in range(n):
                st(out, v, <floating>(a[v] * <double>ld(z, v, t)
                                      + b[v] * (<double>ld(x, v, t) - mu[v]) + k[v]), t, 0)


cdef void row_stats(const Plan *p, const floating *x, const Box *bx, Py_ssize_t n,
                    double *mean, double *m2, Storage *t) noexcept nogil:
    # mean = x0 + sum(x - x0)/n  (x0: the box's first row);  M2 = sum((x - mean)^2)
    cdef Py_ssize_t C = p.C, c0 = bx.c0, nc = bx.c1 - bx.c0, R = p.R, V = R * nc
    cdef Py_ssize_t o, v, L
    cdef double s_acc[GROUP_V]
    cdef double s_rep[GROUP_V]
    cdef double *acc = &s_acc[0] if R > 1 else mean + c0
    cdef double *rep = &s_rep[0] if R > 1 else m2 + c0
    cdef const floating *first = at(x, bx.o0 * C + c0, t)
    cdef const floating *run
    cdef double d
    for v in range(nc):
        rep[v] = <double>ld(first, v, t)
    repeat(rep, nc, R, rep)
    for v in range(V):
        acc[v] = 0.0
    o = bx.o0
    while o < bx.o1:
        L = run_length(p, o, bx.o1, nc)
        run_shifted(at(x, o * C + c0, t), L, rep, acc, t)
        o = o + L // nc
    if R > 1:
        fold(acc, nc, R, acc)
    for v in range(nc):
        mean[c0 + v] = rep[v] + acc[v] / <double>n
    if R > 1:
        repeat(mean + c0, nc, R, rep)
    else:
        acc = m2 + c0
        rep = mean + c0
    for v in range(V):
        acc[v] = 0.0
    o = bx.o0
    while o < bx.o1:
        L = run_length(p, o, bx.o1, nc)
        run_sqdev(at(x, o * C + c0, t), L, rep, acc, t)
        o = o + L // nc
    if R > 1:
        fold(acc, nc, R, m2 + c0)


cdef void row_grad_sums(const Plan *p, const floating *x, const floating *dy,
                        const Box *bx, const double *mean,
                        double *s1, double *s2, Storage *t) noexcept nogil:
    # s1 = sum(dy);  s2 = sum(dy*(x - mean))
    cdef Py_ssize_t C = p.C, c0 = bx.c0, nc = bx.c1 - bx.c0, R = p.R, V = R * nc
    cdef Py_ssize_t o, v, L, off
    cdef double s_a1[GROUP_V]
    cdef double s_a2[GROUP_V]
    cdef double s_rep[GROUP_V]
    cdef double *a1 = &s_a1[0] if R > 1 else s1 + c0
    cdef double *a2 = &s_a2[0] if R > 1 else s2 + c0
    cdef const double *rep = mean + c0
    if R > 1:
        rep = &s_rep[0]
    cdef double g
    if R > 1:
        repeat(mean + c0, nc, R, s_rep)
    for v in range(V):
        a1[v] = 0.0
        a2[v] = 0.0
    o = bx.o0
    while o < bx.o1:
        L = run_length(p, o, bx.o1, nc)
        off = o * C + c0
        run_grad(at(x, off, t), at(dy, off, t), L, rep, a1, a2, t)
        o = o + L // nc
    if R > 1:
        fold(a1, nc, R, s1 + c0)
        fold(a2, nc, R, s2 + c0)


cdef void row_affine(const Plan *p, const floating *x, const floating *z,
                     floating *out, const Box *bx, const double *mean,
                     const double *A, const double *B, const double *K,
                     Storage *t) noexcept nogil:
    cdef Py_ssize_t C = p.C, c0 = bx.c0, nc = bx.c1 - bx.c0, R = p.R
    cdef Py_ssize_t o, v, L, off
    cdef double s_m[GROUP_V]
    cdef double s_a[GROUP_V]
    cdef double s_b[GROUP_V]
    cdef double s_k[GROUP_V]
    cdef const double *mu = mean + c0
    cdef const double *a = A + c0 if A != NULL else NULL
    cdef const double *b = B + c0 if B != NULL else NULL
    cdef const double *k = K + c0
    if R > 1:
        repeat(mu, nc, R, s_m)
        mu = s_m
        repeat(k, nc, R, s_k)
        k = s_k
        if a != NULL:
            repeat(a, nc, R, s_a)
            a = s_a
        if b != NULL:
            repeat(b, nc, R, s_b)
            b = s_b
    o = bx.o0
    while o < bx.o1:
        L = run_length(p, o, bx.o1, nc)
        off = o * C + c0
        run_affine(at(x, off, t), at(z, off, t) if z != NULL else NULL,
                   <floating *>at(out, off, t), L, mu, a, b, k, t)
        o = o + L // nc


# ------------------------------------------------------------- box passes ---

cdef void box_stats(const Plan *p, const floating *x, Py_ssize_t b,
                    double *P1, double *P2, Storage *t) noexcept nogil:
    """Per channel of box b: its mean -> P1[u*C + c], its M2 -> P2[u*C + c]."""
    cdef Box bx
    box_of(p, b, &bx)
    cdef Py_ssize_t C = p.C, inner = p.inner, o, c, n = box_count(p, bx.u)
    cdef double *mean = P1 + bx.u * C
    cdef double *m2 = P2 + bx.u * C
    cdef double acc[LANES]
    cdef double shift, mu
    if inner == 1:
        row_stats(p, x, &bx, n, mean, m2, t)
        return
    for c in range(bx.c0, bx.c1):
        shift = <double>ld(x, (bx.o0 * C + c) * inner + bx.i0, t)
        zero_lanes(acc)
        for o in range(bx.o0, bx.o1):
            lanes_shifted(at(x, (o * C + c) * inner + bx.i0, t), bx.i1 - bx.i0, shift, acc, t)
        mu = shift + sum_lanes(acc) / <double>n
        zero_lanes(acc)
        for o in range(bx.o0, bx.o1):
            lanes_sqdev(at(x, (o * C + c) * inner + bx.i0, t), bx.i1 - bx.i0, mu, acc, t)
        mean[c] = mu
        m2[c] = sum_lanes(acc)


cdef void box_grad_sums(const Plan *p, const floating *x, const floating *dy,
                        const double *mean, Py_ssize_t b,
                        double *P1, double *P2, Storage *t) noexcept nogil:
    """Per channel of box b: sum(dy) -> P1[u*C + c], sum(dy*(x - mean)) -> P2."""
    cdef Box bx
    box_of(p, b, &bx)
    cdef Py_ssize_t C = p.C, inner = p.inner, o, c, off
    cdef double *s1 = P1 + bx.u * C
    cdef double *s2 = P2 + bx.u * C
    cdef double a1[LANES]
    cdef double a2[LANES]
    if inner == 1:
        row_grad_sums(p, x, dy, &bx, mean, s1, s2, t)
        return
    for c in range(bx.c0, bx.c1):
        zero_lanes(a1)
        zero_lanes(a2)
        for o in range(bx.o0, bx.o1):
            off = (o * C + c) * inner + bx.i0
            lanes_grad(at(x, off, t), at(dy, off, t), bx.i1 - bx.i0, mean[c], a1, a2, t)
        s1[c] = sum_lanes(a1)
        s2[c] = sum_lanes(a2)


cdef void box_affine(const Plan *p, const floating *x, const floating *z,
                     floating *out, Py_ssize_t b, const double *mean,
                     const double *A, const double *B, const double *K,
                     Storage *t) noexcept nogil:
    """out = A*z + B*(x - mean) + K per channel over box b (z may be NULL: A
    unused; B may be NULL: x unused).  Forward: y = scale*(x - mean) + beta;
    backward: dx = a*dy + b*(x - mean) + k, or dx = a*dy in inference."""
    cdef Box bx
    box_of(p, b, &bx)
    cdef Py_ssize_t C = p.C, inner = p.inner, o, c, i, off
    cdef double a, bb, mu, k
    if inner == 1:
        row_affine(p, x, z, out, &bx, mean, A, B, K, t)
        return
    for c in range(bx.c0, bx.c1):
        mu = mean[c]
        k = K[c] if K != NULL else 0.0
        a = A[c] if A != NULL else 0.0
        bb = B[c] if B != NULL else 0.0
        for o in range(bx.o0, bx.o1):
            off = (o * C + c) * inner + bx.i0
            seg_affine(at(x, off, t), at(z, off, t) if z != NULL else NULL,
                       <floating *>at(out, off, t), bx.i1 - bx.i0, mu, a, bb, k, B != NULL, t)


cdef inline void seg_affine(const floating *x, const floating *z, floating *out, Py_ssize_t n,
                            double mu, double a, double bb, double k, bint has_b,
                            Storage *t) noexcept nogil:
    # out = bb*(x - mu) + k (z NULL);  a*z (no bb);  a*z + bb*(x - mu) + k
    cdef Py_ssize_t i, s, m
    cdef float bx[SPAN16]
    cdef float bz[SPAN16]
    cdef float bo[SPAN16]
    if floating is float and Storage is AsF16:
        for s in range(0, n, SPAN16):
            m = min(SPAN16, n - s)
            seg_affine(widen16(x, s, m, bx) if has_b else NULL,
                       widen16(z, s, m, bz) if z != NULL else NULL, <floating *>bo, m,
                       mu, a, bb, k, has_b, <AsOwn *>NULL)
            fastopt_f32_to_f16_n(bo, <uint16_t *>out + s, m)
    else:
        if z == NULL:
            for i in range(n):
                st(out, i, <floating>(bb * (<double>ld(x, i, t) - mu) + k), t, 0)
        elif not has_b:
            for i in range(n):
                st(out, i, <floating>(a * <double>ld(z, i, t)), t, 0)
        else:
            for i in range(n):
                st(out, i, <floating>(a * <double>ld(z, i, t) + bb * (<double>ld(x, i, t) - mu)
                                      + k), t, 0)


# ------------------------------------------------------------------ merges ---

cdef void merge_stats(const Plan *p, Py_ssize_t c0, Py_ssize_t c1,
                      const double *P1, const double *P2,
                      double *mean, double *m2) noexcept nogil:
    """Chan's merge of the boxes' (count, mean, M2) in order u = 0, 1, ...:
    d = mean_b - mean;  mean += d*n_b/n;  M2 += M2_b + d^2*n_a*n_b/n."""
    cdef Py_ssize_t u, c, C = p.C
    cdef double na = <double>box_count(p, 0), nb, n, f, g, d
    for c in range(c0, c1):
        mean[c] = P1[c]
        m2[c] = P2[c]
    for u in range(1, p.U):
        nb = <double>box_count(p, u)
        n = na + nb
        f = nb / n
        g = na * nb / n
        for c in range(c0, c1):
            d = P1[u * C + c] - mean[c]
            mean[c] = mean[c] + d * f
            m2[c] = m2[c] + P2[u * C + c] + d * d * g
        na = n


cdef void merge_sums(const Plan *p, Py_ssize_t c0, Py_ssize_t c1,
                     const double *P1, const double *P2,
                     double *s1, double *s2) noexcept nogil:
    cdef Py_ssize_t u, c, C = p.C
    for c in range(c0, c1):
        s1[c] = P1[c]
        s2[c] = P2[c]
    for u in range(1, p.U):
        for c in range(c0, c1):
            s1[c] = s1[c] + P1[u * C + c]
            s2[c] = s2[c] + P2[u * C + c]


# ------------------------------------------------------------------ drivers ---

ctypedef struct Job:
    int xk                # Store code of x, dy and the output (NATIVE, F16, BF16)
    bint backward         # else the forward pass
    bint stats            # run the first pass (forward: training; backward: always)
    bint training         # backward: the training formula for dx
    bint update           # forward: update the running statistics
    double momentum, eps
    double *mean          # (C,) forward: the batch mean (out); backward: saved mean
    double *invstd        # (C,) forward: out (holds M2 until finished); backward: saved
    double *A             # (C,) second pass: out = A*z + B*(x - mean) + K
    double *B             #      (forward: z unused, B = gamma*invstd, K = beta;
    double *K             #       backward inference: B unused)
    double *P1            # (U*C,) per-box partial results of the first pass
    double *P2


cdef void fwd_finish(const Plan *p, const Job *j, const floating *gamma,
                     const floating *beta, floating *rmean, floating *rvar,
                     Py_ssize_t c0, Py_ssize_t c1) noexcept nogil:
    """Channels [c0, c1): merge the boxes, then invstd, the running stats and
    the coefficients of the y pass."""
    merge_stats(p, c0, c1, j.P1, j.P2, j.mean, j.invstd)
    cdef Py_ssize_t c
    cdef double m = <double>p.m, mom = j.momentum, m2
    for c in range(c0, c1):
        m2 = j.invstd[c]
        j.invstd[c] = 1.0 / sqrt(m2 / m + j.eps)
        j.B[c] = <double>gamma[c] * j.invstd[c]
        j.K[c] = <double>beta[c]
        if j.update:
            # running = (1 - momentum)*running + momentum*batch (unbiased var)
            rmean[c] = <floating>(mom * j.mean[c] + (1.0 - mom) * <double>rmean[c])
            rvar[c] = <floating>(mom * (m2 / (m - 1.0)) + (1.0 - mom) * <double>rvar[c])


cdef void bwd_finish(const Plan *p, const Job *j, const floating *gamma,
                     floating *dgamma, floating *dbeta,
                     Py_ssize_t c0, Py_ssize_t c1) noexcept nogil:
    """Channels [c0, c1): dbeta = sum dy, dgamma = invstd*sum(dy*(x - mean));
    training: dx = g*invstd/m * (m*dy - dbeta - x_hat*dgamma), i.e.
    A = g*invstd, B = -A*invstd*dgamma/m, K = -A*dbeta/m; inference: dx = A*dy."""
    merge_sums(p, c0, c1, j.P1, j.P2, j.K, j.B)
    cdef Py_ssize_t c
    cdef double m = <double>p.m, db, dg, a
    for c in range(c0, c1):
        db = j.K[c]
        dg = j.B[c] * j.invstd[c]
        dbeta[c] = <floating>db
        dgamma[c] = <floating>dg
        a = <double>gamma[c] * j.invstd[c]
        j.A[c] = a
        j.B[c] = -(a * j.invstd[c]) * dg / m
        j.K[c] = -a * db / m


cdef inline void finish(const Plan *p, const Job *j, const floating *gamma,
                        const floating *beta, floating *r1, floating *r2,
                        Py_ssize_t c0, Py_ssize_t c1) noexcept nogil:
    if j.backward:
        bwd_finish(p, j, gamma, r1, r2, c0, c1)
    else:
        fwd_finish(p, j, gamma, beta, r1, r2, c0, c1)


cdef inline Py_ssize_t nth_box(const Plan *p, Py_ssize_t i) noexcept nogil:
    """The i-th box in the order of x in memory: outer group, then channel
    (chunk), then inner chunk."""
    cdef Py_ssize_t j = i % p.ni, t = i // p.ni
    return (t % p.nk) * p.U + (t // p.nk) * p.ni + j


cdef inline void first_pass(const Plan *p, const Job *j, const floating *x,
                            const floating *dy, Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    if floating is float:
        if j.xk == F16:
            first_pass_as(p, j, x, dy, lo, hi, <AsF16 *>NULL)
            return
        if j.xk == BF16:
            first_pass_as(p, j, x, dy, lo, hi, <AsBF16 *>NULL)
            return
    first_pass_as(p, j, x, dy, lo, hi, <AsOwn *>NULL)


cdef void first_pass_as(const Plan *p, const Job *j, const floating *x, const floating *dy,
                        Py_ssize_t lo, Py_ssize_t hi, Storage *t) noexcept nogil:
    cdef Py_ssize_t i, b
    for i in range(lo, hi):
        b = nth_box(p, i)
        if j.backward:
            box_grad_sums(p, x, dy, j.mean, b, j.P1, j.P2, t)
        else:
            box_stats(p, x, b, j.P1, j.P2, t)


cdef inline void second_pass(const Plan *p, const Job *j, const floating *x,
                             const floating *dy, floating *out,
                             Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    if floating is float:
        if j.xk == F16:
            second_pass_as(p, j, x, dy, out, lo, hi, <AsF16 *>NULL)
            return
        if j.xk == BF16:
            second_pass_as(p, j, x, dy, out, lo, hi, <AsBF16 *>NULL)
            return
    second_pass_as(p, j, x, dy, out, lo, hi, <AsOwn *>NULL)


cdef void second_pass_as(const Plan *p, const Job *j, const floating *x, const floating *dy,
                         floating *out, Py_ssize_t lo, Py_ssize_t hi,
                         Storage *t) noexcept nogil:
    # Boxes in reverse order: the ones the first pass read last are still
    # in the caches.
    cdef const double *B = NULL if j.backward and not j.training else j.B
    cdef Py_ssize_t i = hi
    while i > lo:
        i = i - 1
        box_affine(p, x, dy, out, nth_box(p, i), j.mean, j.A, B, j.K, t)


ctypedef struct Task:            # a call's arrays, for the chunk functions
    const Plan *p
    const Job *j
    bint is_double
    const void *x
    const void *dy
    void *out
    const void *gamma
    const void *beta
    void *r1
    void *r2


cdef void first_chunk(void *ctx, Py_ssize_t i) noexcept nogil:
    cdef const Task *t = <const Task *>ctx
    if t.is_double:
        first_pass(t.p, t.j, <const double *>t.x, <const double *>t.dy, i, i + 1)
    else:
        first_pass(t.p, t.j, <const float *>t.x, <const float *>t.dy, i, i + 1)


cdef void finish_chunk(void *ctx, Py_ssize_t k) noexcept nogil:
    cdef const Task *t = <const Task *>ctx
    cdef Py_ssize_t c0 = k * MERGE_C, c1 = min(t.p.C, (k + 1) * MERGE_C)
    if t.is_double:
        finish(t.p, t.j, <const double *>t.gamma, <const double *>t.beta,
               <double *>t.r1, <double *>t.r2, c0, c1)
    else:
        finish(t.p, t.j, <const float *>t.gamma, <const float *>t.beta,
               <float *>t.r1, <float *>t.r2, c0, c1)


cdef void second_chunk(void *ctx, Py_ssize_t i) noexcept nogil:
    cdef const Task *t = <const Task *>ctx
    if t.is_double:
        second_pass(t.p, t.j, <const double *>t.x, <const double *>t.dy, <double *>t.out, i, i + 1)
    else:
        second_pass(t.p, t.j, <const float *>t.x, <const float *>t.dy, <float *>t.out, i, i + 1)


cdef void run(const Plan *p, const Job *j, const floating *x, const floating *dy,
              floating *out, const floating *gamma, const floating *beta,
              floating *r1, floating *r2) noexcept nogil:
    """Both passes of a forward (dy NULL; r1, r2 the running stats) or
    backward (r1, r2 = dgamma, dbeta) call: three jobs over the boxes (in
    the order of x in memory), the channels, and the boxes again in reverse.
    A thread takes the same range of boxes in both passes."""
    cdef Task t
    t.p = p
    t.j = j
    t.is_double = floating is double
    t.x = x
    t.dy = dy
    t.out = out
    t.gamma = gamma
    t.beta = beta
    t.r1 = r1
    t.r2 = r2
    if j.stats:
        run_chunks(first_chunk, &t, p.nbox, p.nt)
        run_chunks(finish_chunk, &t, (p.C + MERGE_C - 1) // MERGE_C, p.nt)
    run_chunks(second_chunk, &t, p.nbox, p.nt, True)


# ---------------------------------------------------------------- wrappers ---

cdef inline void *data_or_null(object a):
    return cnp.PyArray_DATA(<cnp.ndarray>a) if a is not None else NULL


cdef void run_arrays(const Plan *p, const Job *j, cnp.ndarray x, object dy, cnp.ndarray out,
                     cnp.ndarray gamma, object beta, object r1, object r2):
    """`run` on validated arrays of x's dtype (None for the ones a call has not)."""
    cdef void *xp = cnp.PyArray_DATA(x)
    cdef void *dyp = data_or_null(dy)
    cdef void *outp = cnp.PyArray_DATA(out)
    cdef void *gp = cnp.PyArray_DATA(gamma)
    cdef void *bp = data_or_null(beta)
    cdef void *r1p = data_or_null(r1)
    cdef void *r2p = data_or_null(r2)
    cdef bint is_double = cnp.PyArray_TYPE(x) == cnp.NPY_FLOAT64
    with nogil:
        if is_double:
            run(p, j, <const double *>xp, <const double *>dyp, <double *>outp,
                <const double *>gp, <const double *>bp, <double *>r1p, <double *>r2p)
        else:
            run(p, j, <const float *>xp, <const float *>dyp, <float *>outp,
                <const float *>gp, <const float *>bp, <float *>r1p, <float *>r2p)


cdef inline object read_only_view(object a):
    cdef cnp.ndarray v = <cnp.ndarray>a.view()
    cnp.PyArray_CLEARFLAGS(v, cnp.NPY_ARRAY_WRITEABLE)
    return v


@cython.final
@cython.auto_pickle(False)
cdef class BatchNormContext:
    """What `batch_norm_backward` needs from a `batch_norm_forward` call.

    Made only by `batch_norm_forward` (``BatchNormContext()`` raises
    TypeError; an empty context from ``BatchNormContext.__new__`` or
    ``copy.copy`` is rejected by the backward pass).  The context records the
    forward's shape, channel axis, dtype and blocking in C, and holds its own
    views of the arrays it reads, which Python code never receives: reshaping
    or resizing the caller's `x` or `gamma` after the forward pass cannot
    change what the backward pass reads (their *values* are read, not
    copied: do not modify them before the backward pass).

    Attributes (read only)
    ----------------------
    x, gamma : ndarray
        Read-only views of the arrays the forward pass read: the inputs
        themselves when they were C-contiguous, aligned and in native byte
        order, else the forward's private copies.  Each access returns a new
        view.
    mean, invstd : ndarray, float64, shape (C,)
        Read-only views of the statistics used: the batch mean and
        1/sqrt(var + eps) in training, the running ones in inference.  Kept
        in float64 whatever x's dtype (they are computed in double): backward
        then uses exactly the x_hat of the forward pass.
    training : bool
    axis : int
        The channel axis, normalized to >= 0.
    """
    cdef object _x, _gamma, _mean, _invstd     # never handed out
    cdef tuple shape                           # x's shape at the forward pass
    cdef void *xdata
    cdef void *gdata
    cdef void *mdata
    cdef void *sdata
    cdef int typenum, gtypenum                 # x's and gamma's (float32 for 16-bit x)
    cdef Py_ssize_t outer, C, inner
    cdef bint ready
    cdef readonly bint training
    cdef readonly int axis

    def __init__(self, *args, **kwargs):
        raise TypeError("BatchNormContext cannot be created directly: batch_norm_forward "
                        "returns one")

    cdef void record(self, cnp.ndarray x, cnp.ndarray gamma, cnp.ndarray mean,
                     cnp.ndarray invstd, bint training, int axis, Py_ssize_t outer,
                     Py_ssize_t C, Py_ssize_t inner):
        self._x = (<object>x).view()
        self._gamma = (<object>gamma).view()
        # The statistics are written only by the forward pass: read-only from
        # here on, so no view of them can be made writeable.
        cnp.PyArray_CLEARFLAGS(mean, cnp.NPY_ARRAY_WRITEABLE)
        cnp.PyArray_CLEARFLAGS(invstd, cnp.NPY_ARRAY_WRITEABLE)
        self._mean = mean
        self._invstd = invstd
        self.shape = (<object>x).shape
        self.xdata = cnp.PyArray_DATA(x)
        self.gdata = cnp.PyArray_DATA(gamma)
        self.mdata = cnp.PyArray_DATA(mean)
        self.sdata = cnp.PyArray_DATA(invstd)
        self.typenum = cnp.PyArray_TYPE(x)
        self.gtypenum = cnp.PyArray_TYPE(gamma)
        self.outer = outer
        self.C = C
        self.inner = inner
        self.training = training
        self.axis = axis
        self.ready = True

    cdef int verify(self) except -1:
        """The context is complete and its arrays are what the forward pass left."""
        if not self.ready:
            raise ValueError("ctx is an empty BatchNormContext: use the one returned by "
                             "batch_norm_forward")
        cdef cnp.ndarray x = <cnp.ndarray>self._x
        cdef cnp.ndarray g = <cnp.ndarray>self._gamma
        cdef cnp.ndarray m = <cnp.ndarray>self._mean
        cdef cnp.ndarray s = <cnp.ndarray>self._invstd
        if (cnp.PyArray_DATA(x) != self.xdata or cnp.PyArray_TYPE(x) != self.typenum
                or (<object>x).shape != self.shape or not direct(x)
                or cnp.PyArray_DATA(g) != self.gdata or cnp.PyArray_TYPE(g) != self.gtypenum
                or cnp.PyArray_NDIM(g) != 1 or cnp.PyArray_DIM(g, 0) != self.C or not direct(g)
                or cnp.PyArray_DATA(m) != self.mdata or cnp.PyArray_SIZE(m) != self.C
                or cnp.PyArray_DATA(s) != self.sdata or cnp.PyArray_SIZE(s) != self.C):
            raise ValueError("ctx was modified after batch_norm_forward")
        return 0

    @property
    def x(self):
        return read_only_view(self._x) if self.ready else None

    @property
    def gamma(self):
        return read_only_view(self._gamma) if self.ready else None

    @property
    def mean(self):
        return read_only_view(self._mean) if self.ready else None

    @property
    def invstd(self):
        return read_only_view(self._invstd) if self.ready else None

    def __repr__(self):
        if not self.ready:
            return "BatchNormContext(empty)"
        return (f"BatchNormContext(shape={self.shape}, dtype={(<object>self._x).dtype}, "
                f"axis={self.axis}, training={self.training})")


cdef inline cnp.ndarray channel_vector(object a, str name, cnp.ndarray x, Py_ssize_t C,
                                       bint in_place=False):
    """A (C,) array with x's dtype; for 16-bit x, float32 (or, if only read,
    x's dtype, converted to float32)."""
    cdef bint half = dtype_code(x) == DT_F16 or dtype_code(x) == DT_BF16
    cdef cnp.ndarray arr = any_float_array(a, name) if half else float_array(a, name)
    cdef int code = dtype_code(arr)
    if half and code != DT_F32 and (in_place or code != dtype_code(x)):
        raise TypeError(f"{name} has dtype {arr.dtype} but x has dtype {x.dtype} (for {x.dtype} "
                        f"x: float32{'' if in_place else ' or ' + str(x.dtype)})")
    if not half and cnp.PyArray_TYPE(arr) != cnp.PyArray_TYPE(x):
        raise TypeError(f"{name} has dtype {arr.dtype} but x has dtype {x.dtype}")
    if cnp.PyArray_NDIM(arr) != 1 or cnp.PyArray_DIM(arr, 0) != C:
        raise ValueError(f"{name} must have shape ({C},) (the channels of x), "
                         f"got {(<object>arr).shape}")
    return np.asarray(arr, dtype=np.float32) if half else arr


cdef inline int channel_axis(object axis, int ndim) except -1:
    cdef object a = integer(axis, "axis")
    if not -ndim <= a < ndim:
        raise ValueError(f"axis {a} is out of bounds for x with {ndim} dimensions")
    return <int>(a + ndim if a < 0 else a)


cdef inline int no_overlap(cnp.ndarray w, str wname, list others, tuple names) except -1:
    """The written array `w` shares no memory with any of `others`."""
    cdef Py_ssize_t i
    for i in range(len(others)):
        check_disjoint([w, others[i]], (wname, names[i]))
    return 0


def batch_norm_forward(x, gamma, beta, running_mean=None, running_var=None, *,
                       training=True, momentum=0.1, eps=1e-5, axis=1, out=None):
    """Batch Normalization forward pass, fused and parallel.

    Follows ``torch.nn.functional.batch_norm``.  Per channel c (index `axis`
    of x), over the m values of the other axes::

        training:   mean = sum(x)/m,  var = sum((x - mean)**2)/m   (biased)
        inference:  mean = running_mean,  var = running_var
        x_hat = (x - mean) / sqrt(var + eps)
        y = gamma * x_hat + beta

    In training, `running_mean` and `running_var` (if given) are updated in
    place as PyTorch does::

        running_mean = (1 - momentum)*running_mean + momentum*mean
        running_var  = (1 - momentum)*running_var  + momentum*var*m/(m - 1)

    Statistics are computed stably (per-block two-pass mean and sum of squared
    deviations merged with Chan's formula, in double for float32), results
    are identical for any number of threads, and a constant channel gives
    x_hat = 0 exactly.  NaN or Inf in a channel of x propagate to that
    channel of y, and in training make that channel's batch statistics, and
    so its running_mean/running_var, NaN or Inf (other channels unaffected),
    as in PyTorch.

    Parameters
    ----------
    x : ndarray, float32, float64, float16 or bfloat16, shape (N, C, *spatial) or (N, *spatial, C)
        At least 2-D.  Non-contiguous, unaligned or byte-swapped input is
        copied first.  16-bit x is computed as float32 x (statistics in
        double) and y rounded to x's dtype.
    gamma, beta : ndarray, shape (C,), x's dtype
        (float32 or x's dtype for 16-bit x.)
    running_mean, running_var : ndarray, shape (C,), x's dtype, optional
        C-contiguous, aligned, writeable, native byte order; float32 for
        16-bit x.  Required in inference; in training give both or neither.
    training : bool
    momentum : float in [0, 1]
    eps : float > 0
    axis : int
        The channel axis: 1 for NCHW / (N, C), -1 for channels-last (NHWC).
    out : ndarray, optional
        Receives y: like x, C-contiguous, aligned, writeable, native byte
        order, not overlapping the inputs.

    Returns
    -------
    y : ndarray
        `out` if given.
    ctx : BatchNormContext
        For `batch_norm_backward`.

    Raises
    ------
    ValueError
        "Expected more than 1 value per channel when training" if training
        with m <= 1; bad shapes, axis, momentum, eps or `out`.  Nothing is
        written when an error is raised.
    TypeError
        Wrong types or dtypes.
    """
    cdef cnp.ndarray X = any_float_array(x, "x")
    cdef int nd = cnp.PyArray_NDIM(X)
    if nd < 2:
        raise ValueError(f"x must have at least 2 dimensions (N, C, ...), got shape {x.shape}")
    cdef int ax = channel_axis(axis, nd)
    cdef tuple shape = (<object>X).shape
    cdef Py_ssize_t C = shape[ax], outer = 1, inner = 1, i
    for i in range(ax):
        outer *= <Py_ssize_t>shape[i]
    for i in range(ax + 1, nd):
        inner *= <Py_ssize_t>shape[i]
    cdef cnp.ndarray G = channel_vector(gamma, "gamma", X, C)
    cdef cnp.ndarray Bt = channel_vector(beta, "beta", X, C)
    cdef object RM = None, RV = None
    if (running_mean is None) != (running_var is None):
        raise ValueError("give both running_mean and running_var, or neither")
    if running_mean is not None:
        RM = writable(channel_vector(running_mean, "running_mean", X, C, True), "running_mean")
        RV = writable(channel_vector(running_var, "running_var", X, C, True), "running_var")
    cdef bint train = bool(training)
    if not train and RM is None:
        raise ValueError("training=False needs running_mean and running_var")
    cdef double mom = real(momentum, "momentum")
    if not 0.0 <= mom <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {mom!r}")
    cdef double eps_ = real(eps, "eps")
    if not eps_ > 0.0:
        raise ValueError(f"eps must be > 0, got {eps_!r}")
    if train and outer * inner <= 1:
        raise ValueError("Expected more than 1 value per channel when training, "
                         f"got input of shape {shape}")
    cdef cnp.ndarray Y = None
    if out is not None:
        Y = writable(like_any(out, "out", X, "x"), "out")
        no_overlap(Y, "out", [X, G, Bt, RM, RV],
                   ("x", "gamma", "beta", "running_mean", "running_var"))
    if RM is not None:
        no_overlap(RM, "running_mean", [X, G, Bt, RV], ("x", "gamma", "beta", "running_var"))
        no_overlap(RV, "running_var", [X, G, Bt], ("x", "gamma", "beta"))

    X = readable(X)
    G = readable(G)
    Bt = readable(Bt)
    if Y is None:
        Y = np.empty(shape, X.dtype)

    cdef Plan p
    make_plan(&p, outer, C, inner)
    cdef cnp.ndarray mean = np.empty(C, dtype=np.float64)
    cdef cnp.ndarray invstd = np.empty(C, dtype=np.float64)
    cdef cnp.ndarray work = np.empty(3 * C + (2 * p.U * C if train and p.U > 1 else 0),
                                     dtype=np.float64)
    cdef double *W = <double *>cnp.PyArray_DATA(work)
    cdef Job j
    j.xk = store_of(dtype_code(X))
    j.backward = False
    j.stats = train
    j.training = train
    j.update = RM is not None
    j.momentum = mom
    j.eps = eps_
    j.mean = <double *>cnp.PyArray_DATA(mean)
    j.invstd = <double *>cnp.PyArray_DATA(invstd)
    j.A = W
    j.B = W + C
    j.K = W + 2 * C
    j.P1 = W + 3 * C
    j.P2 = W + 3 * C + p.U * C
    if p.U == 1:
        # One box per channel: its results are the statistics (merging is a copy).
        j.P1 = j.mean
        j.P2 = j.invstd
    if not train:
        # Inference: the running statistics, in double.
        mean[:] = RM
        np.divide(1.0, np.sqrt(np.add(RV, eps_, dtype=np.float64)), out=invstd)
        work[C:2 * C] = invstd * G
        work[2 * C:3 * C] = Bt
    if outer * C * inner > 0:
        run_arrays(&p, &j, X, None, Y, G, Bt, RM, RV)

    cdef BatchNormContext ctx = BatchNormContext.__new__(BatchNormContext)
    ctx.record(X, G, mean, invstd, train, ax, outer, C, inner)
    return Y, ctx


def batch_norm_backward(dy, ctx, *, dx_out=None):
    """Batch Normalization backward pass, fused and parallel.

    With x_hat = (x - mean)*invstd from the forward pass, per channel over
    its m values::

        dbeta  = sum(dy)
        dgamma = sum(dy * x_hat)
        training:   dx = gamma*invstd/m * (m*dy - dbeta - x_hat*dgamma)
        inference:  dx = gamma*invstd * dy

    (the gradients of ``torch.nn.functional.batch_norm``).  Sums are in double
    in a fixed order: identical results for any number of threads.

    Parameters
    ----------
    dy : ndarray
        Gradient of the loss with respect to y: the dtype and shape x had in
        the forward pass (non-contiguous, unaligned or byte-swapped input is
        copied first).
    ctx : BatchNormContext
        From `batch_norm_forward`.
    dx_out : ndarray, optional
        Receives dx: like dy, C-contiguous, aligned, writeable, native byte
        order, not overlapping x, dy or gamma.

    Returns
    -------
    dx, dgamma, dbeta : ndarray
        dx like x (`dx_out` if given); dgamma and dbeta of shape (C,), the
        dtype of ctx.gamma (x's dtype, float32 for 16-bit x).
    """
    if not isinstance(ctx, BatchNormContext):
        raise TypeError(f"ctx must be the BatchNormContext returned by batch_norm_forward, "
                        f"got {type(ctx).__name__}")
    cdef BatchNormContext cx = <BatchNormContext>ctx
    cx.verify()
    # Everything below uses the shapes and arrays the context recorded.
    cdef cnp.ndarray X = <cnp.ndarray>cx._x
    cdef cnp.ndarray G = <cnp.ndarray>cx._gamma
    cdef cnp.ndarray DY = like_any(dy, "dy", X, "x")
    cdef cnp.ndarray DX = None
    if dx_out is not None:
        DX = writable(like_any(dx_out, "dx_out", X, "x"), "dx_out")
        no_overlap(DX, "dx_out", [X, DY, G], ("x", "dy", "gamma"))
    DY = readable(DY)
    if DX is None:
        DX = cnp.PyArray_EMPTY(cnp.PyArray_NDIM(X), cnp.PyArray_DIMS(X), cx.typenum, 0)
    cdef Py_ssize_t C = cx.C, outer = cx.outer, inner = cx.inner
    cdef cnp.npy_intp nc = C
    cdef cnp.ndarray dgamma = cnp.PyArray_ZEROS(1, &nc, cx.gtypenum, 0)
    cdef cnp.ndarray dbeta = cnp.PyArray_ZEROS(1, &nc, cx.gtypenum, 0)
    cdef Plan p
    make_plan(&p, outer, C, inner)
    cdef cnp.ndarray work = np.empty(3 * C + (2 * p.U * C if p.U > 1 else 0), dtype=np.float64)
    cdef double *W = <double *>cnp.PyArray_DATA(work)
    cdef Job j
    j.xk = store_of(dtype_code(X))
    j.backward = True
    j.stats = True
    j.training = cx.training
    j.update = False
    j.mean = <double *>cx.mdata
    j.invstd = <double *>cx.sdata
    j.A = W
    j.B = W + C
    j.K = W + 2 * C
    j.P1 = W + 3 * C
    j.P2 = W + 3 * C + p.U * C
    if p.U == 1:
        j.P1 = j.K     # merge_sums: K = sum dy, B = sum dy*(x - mean)
        j.P2 = j.B
    if outer * C * inner > 0:
        run_arrays(&p, &j, X, DY, DX, G, None, dgamma, dbeta)
    return DX, dgamma, dbeta
