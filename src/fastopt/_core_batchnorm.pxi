# Batch Normalization kernels (the core side of fastopt._batchnorm, included by
# _core.pyx): the passes over the boxes, the merges of their partial results
# and the jobs that run them.  The design is described in _batchnorm.pyx.
from libc.math cimport sqrt
from libc.stdint cimport uint16_t

# Values per box (row layout: at least BN_MIN_ROWS rows, at most 64 Ki values):
# a box is read twice in a row, so it must stay in L1/L2.
DEF BN_BOX = 8192
# Inner sizes below this use the row layout.
DEF BN_SEGMENT_MIN = 16
# Row layout: channels per box at most (so many channels with a small batch
# still give several boxes).
DEF BN_CHUNK_C = 1024
# Row layout: rows per box at least, so that the per-box partial results (two
# doubles per channel) stay below a sixteenth of x's float32 size.
DEF BN_MIN_ROWS = 64
# Row layout: rows are taken R at a time so that the loops along the
# contiguous axis run over up to BN_GROUP_V values, i.e. at least 32 independent
# 8-double accumulators: enough to hide the latency of their updates (with
# one row of 64 channels at a time, that latency made the statistics pass
# three times slower).
DEF BN_GROUP_V = 256
# Independent accumulators per segment reduction.
DEF BN_LANES = 32
# Elements per thread below which a call stays on the calling thread.
DEF BN_GRAIN = 32768
# Channels per task when merging partial statistics.
DEF BN_MERGE_C = 64


ctypedef struct BnBox:
    Py_ssize_t o0, o1, c0, c1, i0, i1, u


cdef void make_plan(BnPlan *p, Py_ssize_t outer, Py_ssize_t C, Py_ssize_t inner) noexcept nogil:
    """Cut (outer, C, inner) into boxes."""
    p.outer = outer
    p.C = C
    p.inner = inner
    p.m = outer * inner
    p.rows = inner < BN_SEGMENT_MIN
    if p.rows:
        p.il = inner
        p.ni = 1
        p.cc = max(1, min(C, BN_CHUNK_C // max(1, inner)))
        p.nk = (C + p.cc - 1) // p.cc
        p.og = max(BN_MIN_ROWS, BN_BOX // max(1, p.cc * inner))
        # Groups of R rows are contiguous only when a box holds every channel.
        p.R = max(1, BN_GROUP_V // p.cc) if inner == 1 and p.cc == C else 1
        p.og = max(p.R, p.og - p.og % p.R)
    else:
        p.R = 1
        p.cc = 1
        p.nk = C
        if inner >= BN_BOX:
            p.il = BN_BOX
            p.og = 1
        else:
            p.il = inner
            p.og = BN_BOX // inner
        p.ni = (inner + p.il - 1) // p.il
    p.og = min(p.og, outer) if outer > 0 else 1
    p.U = ((outer + p.og - 1) // p.og) * p.ni
    p.nbox = p.nk * p.U
    p.nt = threads_for(outer * C * inner, BN_GRAIN)


cdef inline void box_of(const BnPlan *p, Py_ssize_t b, BnBox *x) noexcept nogil:
    cdef Py_ssize_t k = b // p.U, u = b % p.U
    cdef Py_ssize_t g = u // p.ni, j = u % p.ni
    x.u = u
    x.c0 = k * p.cc
    x.c1 = min(p.C, x.c0 + p.cc)
    x.o0 = g * p.og
    x.o1 = min(p.outer, x.o0 + p.og)
    x.i0 = j * p.il
    x.i1 = min(p.inner, x.i0 + p.il)


cdef inline Py_ssize_t box_count(const BnPlan *p, Py_ssize_t u) noexcept nogil:
    """Values per channel in the boxes at place u (the same for every channel)."""
    cdef Py_ssize_t g = u // p.ni, j = u % p.ni
    cdef Py_ssize_t o0 = g * p.og, i0 = j * p.il
    return (min(p.outer, o0 + p.og) - o0) * (min(p.inner, i0 + p.il) - i0)


# ------------------------------------------------------ segment reductions ---

cdef inline void zero_lanes(double *acc) noexcept nogil:
    cdef int k
    for k in range(BN_LANES):
        acc[k] = 0.0


cdef inline double sum_lanes(const double *acc) noexcept nogil:
    # Pairwise, in a fixed order.
    cdef double t[BN_LANES]
    cdef int k, w = BN_LANES // 2
    for k in range(BN_LANES):
        t[k] = acc[k]
    while w >= 1:
        for k in range(w):
            t[k] = t[k] + t[k + w]
        w = w // 2
    return t[0]


cdef inline const floating *at(const floating *x, Py_ssize_t off, NearStorage *t) noexcept nogil:
    """x + off elements of its storage."""
    if NearStorage is AsOwn:
        return x + off
    else:
        return <const floating *>(<const uint16_t *>x + off)


# float16 spans are widened BN_SPAN16 values at a time into a float32 buffer
# (F16C where the level has it) and go through the float32 loops: converting
# float16 one element at a time in these loops cost twice BatchNorm's own work.
# BN_SPAN16 is a multiple of BN_LANES, so every value keeps its lane.
DEF BN_SPAN16 = 512


cdef inline floating *widen16(const floating *p, Py_ssize_t off, Py_ssize_t n,
                              float *buf) noexcept nogil:
    """p[off:off+n] (float16 bits) as float32, in buf."""
    fastopt_f16_to_f32_n(<const uint16_t *>p + off, buf, n)
    return <floating *>buf


cdef inline void lanes_shifted(const floating *p, Py_ssize_t n, double shift,
                               double *acc, NearStorage *t) noexcept nogil:
    # acc[k] += sum over i = k (mod BN_LANES) of (p[i] - shift)
    cdef Py_ssize_t i, nw = n - n % BN_LANES, b
    cdef int k
    cdef float buf[BN_SPAN16]
    if floating is float and NearStorage is AsF16:
        for b in range(0, n, BN_SPAN16):
            lanes_shifted(widen16(p, b, min(BN_SPAN16, n - b), buf), min(BN_SPAN16, n - b),
                          shift, acc, <AsOwn *>NULL)
    else:
        for i in range(0, nw, BN_LANES):
            for k in range(BN_LANES):
                acc[k] += <double>ld(p, i + k, t) - shift
        for k in range(n - nw):
            acc[k] += <double>ld(p, nw + k, t) - shift


cdef inline void lanes_sqdev(const floating *p, Py_ssize_t n, double mean,
                             double *acc, NearStorage *t) noexcept nogil:
    # acc[k] += sum over i = k (mod BN_LANES) of (p[i] - mean)^2
    cdef Py_ssize_t i, nw = n - n % BN_LANES, b
    cdef int k
    cdef double d
    cdef float buf[BN_SPAN16]
    if floating is float and NearStorage is AsF16:
        for b in range(0, n, BN_SPAN16):
            lanes_sqdev(widen16(p, b, min(BN_SPAN16, n - b), buf), min(BN_SPAN16, n - b),
                        mean, acc, <AsOwn *>NULL)
    else:
        for i in range(0, nw, BN_LANES):
            for k in range(BN_LANES):
                d = <double>ld(p, i + k, t) - mean
                acc[k] += d * d
        for k in range(n - nw):
            d = <double>ld(p, nw + k, t) - mean
            acc[k] += d * d


cdef inline void lanes_grad(const floating *x, const floating *dy, Py_ssize_t n,
                            double mean, double *a1, double *a2, NearStorage *t) noexcept nogil:
    # a1[k] += sum dy;  a2[k] += sum dy*(x - mean)   (over i = k mod BN_LANES)
    cdef Py_ssize_t i, nw = n - n % BN_LANES, b, m
    cdef int k
    cdef double g
    cdef float bx[BN_SPAN16]
    cdef float bg[BN_SPAN16]
    if floating is float and NearStorage is AsF16:
        for b in range(0, n, BN_SPAN16):
            m = min(BN_SPAN16, n - b)
            lanes_grad(widen16(x, b, m, bx), widen16(dy, b, m, bg), m, mean, a1, a2,
                       <AsOwn *>NULL)
    else:
        for i in range(0, nw, BN_LANES):
            for k in range(BN_LANES):
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


cdef inline Py_ssize_t run_length(const BnPlan *p, Py_ssize_t o, Py_ssize_t o1,
                                  Py_ssize_t nc) noexcept nogil:
    """Values in the run starting at row o: a group of R rows or one row."""
    return p.R * nc if o + p.R <= o1 else nc


cdef inline void run_shifted(const floating *x, Py_ssize_t n, const double *rep,
                             double *acc, NearStorage *t) noexcept nogil:
    # acc[v] += x[v] - rep[v]
    cdef Py_ssize_t v, b
    cdef float buf[BN_SPAN16]
    if floating is float and NearStorage is AsF16:
        for b in range(0, n, BN_SPAN16):
            run_shifted(widen16(x, b, min(BN_SPAN16, n - b), buf), min(BN_SPAN16, n - b),
                        rep + b, acc + b, <AsOwn *>NULL)
    else:
        for v in range(n):
            acc[v] += <double>ld(x, v, t) - rep[v]


cdef inline void run_sqdev(const floating *x, Py_ssize_t n, const double *rep,
                           double *acc, NearStorage *t) noexcept nogil:
    # acc[v] += (x[v] - rep[v])^2
    cdef Py_ssize_t v, b
    cdef double d
    cdef float buf[BN_SPAN16]
    if floating is float and NearStorage is AsF16:
        for b in range(0, n, BN_SPAN16):
            run_sqdev(widen16(x, b, min(BN_SPAN16, n - b), buf), min(BN_SPAN16, n - b),
                      rep + b, acc + b, <AsOwn *>NULL)
    else:
        for v in range(n):
            d = <double>ld(x, v, t) - rep[v]
            acc[v] += d * d


cdef inline void run_grad(const floating *x, const floating *dy, Py_ssize_t n,
                          const double *rep, double *a1, double *a2, NearStorage *t) noexcept nogil:
    # a1[v] += dy[v];  a2[v] += dy[v]*(x[v] - rep[v])
    cdef Py_ssize_t v, b, m
    cdef double g
    cdef float bx[BN_SPAN16]
    cdef float bg[BN_SPAN16]
    if floating is float and NearStorage is AsF16:
        for b in range(0, n, BN_SPAN16):
            m = min(BN_SPAN16, n - b)
            run_grad(widen16(x, b, m, bx), widen16(dy, b, m, bg), m, rep + b, a1 + b,
                     a2 + b, <AsOwn *>NULL)
    else:
        for v in range(n):
            g = <double>ld(dy, v, t)
            a1[v] += g
            a2[v] += g * (<double>ld(x, v, t) - rep[v])


cdef inline void run_affine(const floating *x, const floating *z, floating *out, Py_ssize_t n,
                            const double *mu, const double *a, const double *b,
                            const double *k, NearStorage *t) noexcept nogil:
    # out = b*(x - mu) + k (z NULL);  a*z (b NULL);  a*z + b*(x - mu) + k
    cdef Py_ssize_t v, s, m
    cdef float bx[BN_SPAN16]
    cdef float bz[BN_SPAN16]
    cdef float bo[BN_SPAN16]
    if floating is float and NearStorage is AsF16:
        for s in range(0, n, BN_SPAN16):
            m = min(BN_SPAN16, n - s)
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


cdef void row_stats(const BnPlan *p, const floating *x, const BnBox *bx, Py_ssize_t n,
                    double *mean, double *m2, NearStorage *t) noexcept nogil:
    # mean = x0 + sum(x - x0)/n  (x0: the box's first row);  M2 = sum((x - mean)^2)
    cdef Py_ssize_t C = p.C, c0 = bx.c0, nc = bx.c1 - bx.c0, R = p.R, V = R * nc
    cdef Py_ssize_t o, v, L
    cdef double s_acc[BN_GROUP_V]
    cdef double s_rep[BN_GROUP_V]
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


cdef void row_grad_sums(const BnPlan *p, const floating *x, const floating *dy,
                        const BnBox *bx, const double *mean,
                        double *s1, double *s2, NearStorage *t) noexcept nogil:
    # s1 = sum(dy);  s2 = sum(dy*(x - mean))
    cdef Py_ssize_t C = p.C, c0 = bx.c0, nc = bx.c1 - bx.c0, R = p.R, V = R * nc
    cdef Py_ssize_t o, v, L, off
    cdef double s_a1[BN_GROUP_V]
    cdef double s_a2[BN_GROUP_V]
    cdef double s_rep[BN_GROUP_V]
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


cdef void row_affine(const BnPlan *p, const floating *x, const floating *z,
                     floating *out, const BnBox *bx, const double *mean,
                     const double *A, const double *B, const double *K,
                     NearStorage *t) noexcept nogil:
    cdef Py_ssize_t C = p.C, c0 = bx.c0, nc = bx.c1 - bx.c0, R = p.R
    cdef Py_ssize_t o, v, L, off
    cdef double s_m[BN_GROUP_V]
    cdef double s_a[BN_GROUP_V]
    cdef double s_b[BN_GROUP_V]
    cdef double s_k[BN_GROUP_V]
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

cdef void box_stats(const BnPlan *p, const floating *x, Py_ssize_t b,
                    double *P1, double *P2, NearStorage *t) noexcept nogil:
    """Per channel of box b: its mean -> P1[u*C + c], its M2 -> P2[u*C + c]."""
    cdef BnBox bx
    box_of(p, b, &bx)
    cdef Py_ssize_t C = p.C, inner = p.inner, o, c, n = box_count(p, bx.u)
    cdef double *mean = P1 + bx.u * C
    cdef double *m2 = P2 + bx.u * C
    cdef double acc[BN_LANES]
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


cdef void box_grad_sums(const BnPlan *p, const floating *x, const floating *dy,
                        const double *mean, Py_ssize_t b,
                        double *P1, double *P2, NearStorage *t) noexcept nogil:
    """Per channel of box b: sum(dy) -> P1[u*C + c], sum(dy*(x - mean)) -> P2."""
    cdef BnBox bx
    box_of(p, b, &bx)
    cdef Py_ssize_t C = p.C, inner = p.inner, o, c, off
    cdef double *s1 = P1 + bx.u * C
    cdef double *s2 = P2 + bx.u * C
    cdef double a1[BN_LANES]
    cdef double a2[BN_LANES]
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


cdef void box_affine(const BnPlan *p, const floating *x, const floating *z,
                     floating *out, Py_ssize_t b, const double *mean,
                     const double *A, const double *B, const double *K,
                     NearStorage *t) noexcept nogil:
    """out = A*z + B*(x - mean) + K per channel over box b (z may be NULL: A
    unused; B may be NULL: x unused).  Forward: y = scale*(x - mean) + beta;
    backward: dx = a*dy + b*(x - mean) + k, or dx = a*dy in inference."""
    cdef BnBox bx
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
                            NearStorage *t) noexcept nogil:
    # out = bb*(x - mu) + k (z NULL);  a*z (no bb);  a*z + bb*(x - mu) + k
    cdef Py_ssize_t i, s, m
    cdef float bx[BN_SPAN16]
    cdef float bz[BN_SPAN16]
    cdef float bo[BN_SPAN16]
    if floating is float and NearStorage is AsF16:
        for s in range(0, n, BN_SPAN16):
            m = min(BN_SPAN16, n - s)
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

cdef void merge_stats(const BnPlan *p, Py_ssize_t c0, Py_ssize_t c1,
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


cdef void merge_sums(const BnPlan *p, Py_ssize_t c0, Py_ssize_t c1,
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

cdef void fwd_finish(const BnPlan *p, const BnJob *j, const floating *gamma,
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


cdef void bwd_finish(const BnPlan *p, const BnJob *j, const floating *gamma,
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


cdef void infer_coefs(const BnJob *j, Py_ssize_t C, const floating *gamma,
                      const floating *beta, const floating *rmean,
                      const floating *rvar) noexcept nogil:
    """Inference: the running statistics in double (j.mean, j.invstd) and the
    coefficients of the y pass, B = gamma*invstd and K = beta."""
    cdef Py_ssize_t c
    for c in range(C):
        j.mean[c] = <double>rmean[c]
        j.invstd[c] = 1.0 / sqrt(<double>rvar[c] + j.eps)
        j.B[c] = j.invstd[c] * <double>gamma[c]
        j.K[c] = <double>beta[c]


cdef inline void finish(const BnPlan *p, const BnJob *j, const floating *gamma,
                        const floating *beta, floating *r1, floating *r2,
                        Py_ssize_t c0, Py_ssize_t c1) noexcept nogil:
    if j.backward:
        bwd_finish(p, j, gamma, r1, r2, c0, c1)
    else:
        fwd_finish(p, j, gamma, beta, r1, r2, c0, c1)


cdef inline Py_ssize_t nth_box(const BnPlan *p, Py_ssize_t i) noexcept nogil:
    """The i-th box in the order of x in memory: outer group, then channel
    (chunk), then inner chunk."""
    cdef Py_ssize_t j = i % p.ni, t = i // p.ni
    return (t % p.nk) * p.U + (t // p.nk) * p.ni + j


cdef inline void first_pass(const BnPlan *p, const BnJob *j, const floating *x,
                            const floating *dy, Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    if floating is float:
        if j.xk == F16:
            first_pass_as(p, j, x, dy, lo, hi, <AsF16 *>NULL)
            return
        if j.xk == BF16:
            first_pass_as(p, j, x, dy, lo, hi, <AsBF16 *>NULL)
            return
    first_pass_as(p, j, x, dy, lo, hi, <AsOwn *>NULL)


cdef void first_pass_as(const BnPlan *p, const BnJob *j, const floating *x, const floating *dy,
                        Py_ssize_t lo, Py_ssize_t hi, NearStorage *t) noexcept nogil:
    cdef Py_ssize_t i, b
    for i in range(lo, hi):
        b = nth_box(p, i)
        if j.backward:
            box_grad_sums(p, x, dy, j.mean, b, j.P1, j.P2, t)
        else:
            box_stats(p, x, b, j.P1, j.P2, t)


cdef inline void second_pass(const BnPlan *p, const BnJob *j, const floating *x,
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


cdef void second_pass_as(const BnPlan *p, const BnJob *j, const floating *x, const floating *dy,
                         floating *out, Py_ssize_t lo, Py_ssize_t hi,
                         NearStorage *t) noexcept nogil:
    # Boxes in reverse order: the ones the first pass read last are still
    # in the caches.
    cdef const double *B = NULL if j.backward and not j.training else j.B
    cdef Py_ssize_t i = hi
    while i > lo:
        i = i - 1
        box_affine(p, x, dy, out, nth_box(p, i), j.mean, j.A, B, j.K, t)


ctypedef struct BnTask:            # a call's arrays, for the chunk functions
    const BnPlan *p
    const BnJob *j
    bint is_double
    const void *x
    const void *dy
    void *out
    const void *gamma
    const void *beta
    void *r1
    void *r2


cdef void first_chunk(void *ctx, Py_ssize_t i) noexcept nogil:
    cdef const BnTask *t = <const BnTask *>ctx
    if t.is_double:
        first_pass(t.p, t.j, <const double *>t.x, <const double *>t.dy, i, i + 1)
    else:
        first_pass(t.p, t.j, <const float *>t.x, <const float *>t.dy, i, i + 1)


cdef void finish_chunk(void *ctx, Py_ssize_t k) noexcept nogil:
    cdef const BnTask *t = <const BnTask *>ctx
    cdef Py_ssize_t c0 = k * BN_MERGE_C, c1 = min(t.p.C, (k + 1) * BN_MERGE_C)
    if t.is_double:
        finish(t.p, t.j, <const double *>t.gamma, <const double *>t.beta,
               <double *>t.r1, <double *>t.r2, c0, c1)
    else:
        finish(t.p, t.j, <const float *>t.gamma, <const float *>t.beta,
               <float *>t.r1, <float *>t.r2, c0, c1)


cdef void second_chunk(void *ctx, Py_ssize_t i) noexcept nogil:
    cdef const BnTask *t = <const BnTask *>ctx
    if t.is_double:
        second_pass(t.p, t.j, <const double *>t.x, <const double *>t.dy, <double *>t.out, i, i + 1)
    else:
        second_pass(t.p, t.j, <const float *>t.x, <const float *>t.dy, <float *>t.out, i, i + 1)


cdef void bn_run(const BnPlan *p, const BnJob *j, const floating *x, const floating *dy,
              floating *out, const floating *gamma, const floating *beta,
              floating *r1, floating *r2) noexcept nogil:
    """Both passes of a forward (dy NULL; r1, r2 the running stats) or
    backward (r1, r2 = dgamma, dbeta) call: three jobs over the boxes (in
    the order of x in memory), the channels, and the boxes again in reverse.
    A thread takes the same range of boxes in both passes."""
    cdef BnTask t
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
        run_chunks(finish_chunk, &t, (p.C + BN_MERGE_C - 1) // BN_MERGE_C, p.nt)
    run_chunks(second_chunk, &t, p.nbox, p.nt, True)
