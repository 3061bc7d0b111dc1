# Optimizer kernels (the core side of fastopt._optim, included by _core.pyx):
# the fused update loops, the segment job, gradient clipping, 16-bit copies.
# The design is described in _optim.pyx; the shared types in _core.pxd.
from libc.math cimport pow, sqrt, fabs, NAN
from libc.stdint cimport uint64_t

# Bytes of parameter per thread below which an update stays on the calling
# thread.  benchmarks/grain.py (2 cores): a second thread pays off for Adam
# from ~16k float32 elements on a quiet machine, ~40k on a busy one; at 32k
# (128 KiB) it gains 1.3x.  float64 elements cost 2-3x more, so a threshold
# in bytes fits both dtypes (16k float64 elements: 1.6x).
DEF OPT_GRAIN = 65536
# Elements per chunk of a threaded update (a thread claims one chunk at a
# time; 16 KiB of float32 per array, whole cache lines).
DEF OPT_CHUNK = 4096


# ----------------------------------------------------------------- kernels ---
# Storage tags (_half.pxi) of the gradient, of the state arrays, and of the
# rounded parameter copy `out` (AsOwn: no copy).  The options that decide
# which state arrays a loop reads and writes are tags too (On/Off): gcc
# vectorizes a loop with a conditional load/store only by unswitching it,
# which it stops doing as the body grows (16-bit stores).  Each combination
# that `segment_range` can reach is its own C function; the others Cython
# writes out are never referenced, and the C compiler drops them unseen.

ctypedef fused GradStore:
    AsOwn
    AsBF16

ctypedef fused StateStore:
    AsOwn
    AsBF16
    AsBF16SR

ctypedef fused CopyStore:
    AsOwn
    AsBF16

ctypedef struct On:
    char unused
ctypedef struct Off:
    char unused

ctypedef fused Amsgrad:
    On
    Off

ctypedef fused Centered:
    On
    Off

ctypedef fused Momentum:
    On
    Off


cdef void adam_range(floating *p, const floating *g, floating *m, floating *v,
                     floating *vmax, floating *out, Py_ssize_t lo, Py_ssize_t hi,
                     const Coef *c, uint32_t key, Amsgrad *ams, GradStore *G, StateStore *S,
                     CopyStore *O) noexcept nogil:
    # g = grad/grad_scale, negated if maximize; L2: g += wd*p; decoupled: p *= 1 - lr*wd
    # m = b1*m + (1-b1)*g;  v = b2*v + (1-b2)*g*g;  amsgrad: vmax = max(vmax, v)
    # p -= (lr/bc1) * m / (sqrt(v)/sqrt(bc2) + eps)
    # (the parameter uses m, v as computed; the stored m, v are rounded to S;
    # stochastic rounding: one draw r per element, its high 16 bits for m, its
    # low 16 bits for v, hash32(r) for vmax)
    cdef floating gs = <floating>(-c.inv_scale if c.maximize else c.inv_scale)
    cdef floating wd = <floating>c.weight_decay, decay = <floating>c.decay
    cdef floating b1 = <floating>c.beta1, cb1 = <floating>c.one_minus_beta1
    cdef floating b2 = <floating>c.beta2, cb2 = <floating>c.one_minus_beta2
    cdef floating step_size = <floating>c.step_size
    cdef floating bc2s = <floating>c.bias_correction2_sqrt, eps = <floating>c.eps
    cdef bint l2 = c.l2
    cdef floating gi, mi, vi, vm, pi
    cdef uint32_t r
    cdef Py_ssize_t i
    for i in range(lo, hi):
        gi = gs * ld(g, i, G)
        pi = p[i]
        if l2:
            gi = gi + wd * pi
        mi = b1 * ld(m, i, S) + cb1 * gi
        vi = b2 * ld(v, i, S) + cb2 * (gi * gi)
        r = draw(S, key, i)
        st(m, i, mi, S, r)
        st(v, i, vi, S, r << 16)
        if Amsgrad is On:
            vm = ld(vmax, i, S)
            # torch.maximum: NaN in either operand gives NaN.  `|`, not `or`:
            # a short-circuit branch here keeps the loop from vectorizing.
            vi = vi if ((vi >= vm) | (vi != vi)) else vm
            st(vmax, i, vi, S, draw(S, r, 0))
        pi = pi * decay - step_size * mi / (fsqrt(vi) / bc2s + eps)
        p[i] = pi
        if CopyStore is not AsOwn:
            st(out, i, pi, O, 0)


cdef inline void rmsprop_range(floating *p, const floating *g, floating *sq, floating *buf,
                               floating *gavg, floating *out, Py_ssize_t lo, Py_ssize_t hi,
                               const Coef *c, uint32_t key, GradStore *G, StateStore *S,
                               CopyStore *O) noexcept nogil:
    # One loop testing `centered` and `momentum` (which decide the optional
    # arrays read and written) did not vectorize except with both on: gcc
    # stops unswitching a body this size.  With the options as tags each
    # copy vectorizes (10-60x faster on float32).
    if c.centered:
        if c.momentum:
            rmsprop_loop(p, g, sq, buf, gavg, out, lo, hi, c, key, <On *>NULL, <On *>NULL,
                         G, S, O)
        else:
            rmsprop_loop(p, g, sq, buf, gavg, out, lo, hi, c, key, <On *>NULL, <Off *>NULL,
                         G, S, O)
    elif c.momentum:
        rmsprop_loop(p, g, sq, buf, gavg, out, lo, hi, c, key, <Off *>NULL, <On *>NULL,
                     G, S, O)
    else:
        rmsprop_loop(p, g, sq, buf, gavg, out, lo, hi, c, key, <Off *>NULL, <Off *>NULL,
                     G, S, O)


cdef void rmsprop_loop(floating *p, const floating *g, floating *sq, floating *buf,
                       floating *gavg, floating *out, Py_ssize_t lo, Py_ssize_t hi,
                       const Coef *c, uint32_t key, Centered *centered, Momentum *mom,
                       GradStore *G, StateStore *S, CopyStore *O) noexcept nogil:
    # v = a*v + (1-a)*g*g;  centered: gbar = a*gbar + (1-a)*g, avg = sqrt(v - gbar^2)
    # else avg = sqrt(v);  avg += eps
    # momentum: b = mu*b + g/avg, p -= lr*b;  else p -= lr*g/avg
    cdef floating gs = <floating>(-c.inv_scale if c.maximize else c.inv_scale)
    cdef floating wd = <floating>c.weight_decay, lr = <floating>c.lr, eps = <floating>c.eps
    cdef floating a = <floating>c.alpha, ca = <floating>c.one_minus_alpha, mu = <floating>c.mu
    cdef bint l2 = c.l2
    cdef floating gi, vi, ga, avg, b, pi
    cdef uint32_t r
    cdef Py_ssize_t i
    for i in range(lo, hi):
        gi = gs * ld(g, i, G)
        pi = p[i]
        if l2:
            gi = gi + wd * pi
        vi = a * ld(sq, i, S) + ca * (gi * gi)
        r = draw(S, key, i)
        st(sq, i, vi, S, r)
        if Centered is On:
            ga = a * ld(gavg, i, S) + ca * gi
            st(gavg, i, ga, S, draw(S, r, 0))
            avg = fsqrt(vi - ga * ga) + eps
        else:
            avg = fsqrt(vi) + eps
        if Momentum is On:
            b = mu * ld(buf, i, S) + gi / avg
            st(buf, i, b, S, r << 16)
            pi = pi - lr * b
        else:
            pi = pi - lr * (gi / avg)
        p[i] = pi
        if CopyStore is not AsOwn:
            st(out, i, pi, O, 0)


cdef void sgd_range(floating *p, const floating *g, floating *buf, floating *out,
                    Py_ssize_t lo, Py_ssize_t hi, const Coef *c, uint32_t key, Momentum *mom,
                    GradStore *G, StateStore *S, CopyStore *O) noexcept nogil:
    # g += wd*p;  momentum: b = g at the first step, else b = mu*b + (1-dampening)*g;
    # g = g + mu*b (nesterov) or g = b;  p -= lr*g
    cdef floating gs = <floating>(-c.inv_scale if c.maximize else c.inv_scale)
    cdef floating wd = <floating>c.weight_decay, lr = <floating>c.lr
    cdef floating mu = <floating>c.mu, damp1 = <floating>c.one_minus_dampening
    cdef bint l2 = c.l2, nesterov = c.nesterov, first = c.first
    cdef floating gi, b, pi
    cdef Py_ssize_t i
    for i in range(lo, hi):
        gi = gs * ld(g, i, G)
        pi = p[i]
        if l2:
            gi = gi + wd * pi
        if Momentum is On:
            # (selects, not branches: the buffer is read either way)
            b = mu * ld(buf, i, S) + damp1 * gi
            b = gi if first else b
            st(buf, i, b, S, draw(S, key, i))
            gi = (gi + mu * b) if nesterov else b
        pi = pi - lr * gi
        p[i] = pi
        if CopyStore is not AsOwn:
            st(out, i, pi, O, 0)


cdef inline void kernel_range(floating *p, const Segment *s, Py_ssize_t lo, Py_ssize_t hi,
                              GradStore *G, StateStore *S, CopyStore *O) noexcept nogil:
    """The segment's kind of update on elements [lo, hi) (p: its param, typed)."""
    cdef int kind = s.coef.kind
    cdef const floating *g = <const floating *>s.grad
    cdef floating *s1 = <floating *>s.s1
    cdef floating *s2 = <floating *>s.s2
    cdef floating *s3 = <floating *>s.s3
    cdef floating *out = <floating *>s.out
    if kind == ADAM:
        if s.coef.amsgrad:
            adam_range(p, g, s1, s2, s3, out, lo, hi, s.coef, s.key, <On *>NULL, G, S, O)
        else:
            adam_range(p, g, s1, s2, s3, out, lo, hi, s.coef, s.key, <Off *>NULL, G, S, O)
    elif kind == RMSPROP:
        rmsprop_range(p, g, s1, s2, s3, out, lo, hi, s.coef, s.key, G, S, O)
    elif s.coef.momentum:
        sgd_range(p, g, s1, out, lo, hi, s.coef, s.key, <On *>NULL, G, S, O)
    else:
        sgd_range(p, g, s1, out, lo, hi, s.coef, s.key, <Off *>NULL, G, S, O)


cdef inline void float_range(const Segment *s, Py_ssize_t lo, Py_ssize_t hi,
                             StateStore *S) noexcept nogil:
    # The gradient is float32 or the 16-bit type of the parameter.
    cdef float *p = <float *>s.param
    if s.ok == F16:
        f16_blocks(s, lo, hi, S)
    elif s.ok == BF16:
        if s.gk == BF16:
            kernel_range(p, s, lo, hi, <AsBF16 *>NULL, S, <AsBF16 *>NULL)
        else:
            kernel_range(p, s, lo, hi, <AsOwn *>NULL, S, <AsBF16 *>NULL)
    else:
        kernel_range(p, s, lo, hi, <AsOwn *>NULL, S, <AsOwn *>NULL)


# float16 is converted a block at a time: the bit-exact conversions of
# _half.h cost several times the Adam arithmetic per element, and the block
# conversions use the F16C instructions where the level has them (the same
# bits).  The block's float32 gradient and updated master stay in L1.
DEF F16_BLOCK = 1024


cdef void f16_blocks(const Segment *s, Py_ssize_t lo, Py_ssize_t hi,
                     StateStore *S) noexcept nogil:
    """Elements [lo, hi) of a float16 parameter, F16_BLOCK at a time: the
    gradient widened into a buffer (if float16), the float32 update of the
    master, the parameter rounded from it."""
    cdef float gbuf[F16_BLOCK]
    cdef Segment t
    cdef Py_ssize_t b0, n
    cdef Py_ssize_t ssize = 4 if StateStore is AsOwn else 2
    cdef float *p
    t = s[0]
    t.out = NULL
    b0 = lo
    while b0 < hi:
        n = min(F16_BLOCK, hi - b0)
        # the block as a segment of its own: element i is element b0 + i
        p = <float *>s.param + b0
        t.param = p
        t.s1 = <char *>s.s1 + b0 * ssize if s.s1 != NULL else NULL
        t.s2 = <char *>s.s2 + b0 * ssize if s.s2 != NULL else NULL
        t.s3 = <char *>s.s3 + b0 * ssize if s.s3 != NULL else NULL
        t.key = s.key + <uint32_t>b0
        if s.gk == F16:
            fastopt_f16_to_f32_n(<const uint16_t *>s.grad + b0, gbuf, n)
            t.grad = gbuf
        else:
            t.grad = <float *>s.grad + b0
        kernel_range(p, &t, 0, n, <AsOwn *>NULL, S, <AsOwn *>NULL)
        fastopt_f32_to_f16_n(p, <uint16_t *>s.out + b0, n)
        b0 += n


cdef bint nonfinite_range(const void *x, Py_ssize_t lo, Py_ssize_t hi, int gk,
                          bint is_double) noexcept nogil:
    """Whether x[lo:hi] holds an inf or NaN: an exponent field of all ones
    (integer compares, OR-reduced: vectorized, no floating-point exceptions)."""
    cdef const uint16_t *h = <const uint16_t *>x
    cdef const uint32_t *w = <const uint32_t *>x
    cdef const uint64_t *d = <const uint64_t *>x
    cdef uint16_t e16 = 0x7c00 if gk == F16 else 0x7f80
    cdef unsigned int acc = 0
    cdef Py_ssize_t i
    if gk == F16 or gk == BF16:
        for i in range(lo, hi):
            acc |= (h[i] & e16) == e16
    elif is_double:
        for i in range(lo, hi):
            acc |= (d[i] & 0x7ff0000000000000ULL) == 0x7ff0000000000000ULL
    else:
        for i in range(lo, hi):
            acc |= (w[i] & 0x7f800000U) == 0x7f800000U
    return acc != 0


cdef void scale_grad(floating *g, Py_ssize_t lo, Py_ssize_t hi, floating inv,
                     Storage *G) noexcept nogil:
    # g = g * (1/grad_scale), rounded to g's storage
    cdef Py_ssize_t i
    for i in range(lo, hi):
        st(g, i, ld(g, i, G) * inv, G, 0)


cdef inline void segment_range(const Segment *s, Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    """Update elements [lo, hi) of one segment."""
    if s.coef.kind == CHECK:
        if nonfinite_range(s.grad, lo, hi, s.gk, s.is_double):
            fastopt_flag_set(s.coef.found)
    elif s.coef.kind == UNSCALE:
        if s.is_double:
            scale_grad(<double *>s.grad, lo, hi, s.coef.inv_scale, <AsOwn *>NULL)
        elif s.gk == F16:
            scale_grad(<float *>s.grad, lo, hi, <float>s.coef.inv_scale, <AsF16 *>NULL)
        elif s.gk == BF16:
            scale_grad(<float *>s.grad, lo, hi, <float>s.coef.inv_scale, <AsBF16 *>NULL)
        else:
            scale_grad(<float *>s.grad, lo, hi, <float>s.coef.inv_scale, <AsOwn *>NULL)
    elif s.is_double:
        kernel_range(<double *>s.param, s, lo, hi, <AsOwn *>NULL, <AsOwn *>NULL, <AsOwn *>NULL)
    elif s.sk == BF16:
        float_range(s, lo, hi, <AsBF16 *>NULL)
    elif s.sk == BF16_SR:
        float_range(s, lo, hi, <AsBF16SR *>NULL)
    else:
        float_range(s, lo, hi, <AsOwn *>NULL)


ctypedef struct SegmentJob:
    const Segment *segs
    Py_ssize_t nseg, total


cdef void segments_chunk(void *ctx, Py_ssize_t c) noexcept nogil:
    """Elements [c*OPT_CHUNK, (c+1)*OPT_CHUNK) of the concatenation of the segments."""
    cdef const SegmentJob *j = <const SegmentJob *>ctx
    cdef const Segment *segs = j.segs
    cdef Py_ssize_t lo = c * OPT_CHUNK, hi = min(lo + OPT_CHUNK, j.total)
    cdef Py_ssize_t k = 0, top = j.nseg, mid, a, b
    # Segments are sorted by offset: find the first that ends after lo.
    while k < top:
        mid = (k + top) // 2
        if segs[mid].offset + segs[mid].n <= lo:
            k = mid + 1
        else:
            top = mid
    while k < j.nseg and segs[k].offset < hi:
        a = max(lo - segs[k].offset, 0)
        b = min(hi - segs[k].offset, segs[k].n)
        if a < b:
            segment_range(&segs[k], a, b)
        k += 1


cdef void run_segments(const Segment *segs, Py_ssize_t nseg, Py_ssize_t total) noexcept nogil:
    """Update every segment; one job of fixed chunks across all of them."""
    cdef Py_ssize_t k, nbytes = 0
    for k in range(nseg):
        nbytes += segs[k].n * (8 if segs[k].is_double else 4)
    cdef int nt = threads_for(nbytes, OPT_GRAIN)
    if nt == 1:
        for k in range(nseg):
            segment_range(&segs[k], 0, segs[k].n)
        return
    cdef SegmentJob j
    j.segs = segs
    j.nseg = nseg
    j.total = total
    run_chunks(segments_chunk, &j, (total + OPT_CHUNK - 1) // OPT_CHUNK, nt)


# ------------------------------------------------------- gradient clipping ---

cdef double chunk_norm(const floating *x, Py_ssize_t n, int mode, double p,
                       Storage *t) noexcept nogil:
    # 2: sum x^2;  1: sum |x|;  inf: max |x|;  p: sum |x|^p   (all in double)
    cdef double acc[8]
    cdef Py_ssize_t i, j, n8 = n - n % 8
    cdef double a
    cdef double tot[8]
    for j in range(8):
        acc[j] = 0.0
    if mode == NORM_2:
        for i in range(0, n8, 8):
            for j in range(8):
                a = <double>ld(x, i + j, t)
                acc[j] = acc[j] + a * a
        for i in range(n8, n):
            a = <double>ld(x, i, t)
            acc[i - n8] = acc[i - n8] + a * a
    elif mode == NORM_1:
        for i in range(0, n8, 8):
            for j in range(8):
                acc[j] = acc[j] + fabs(<double>ld(x, i + j, t))
        for i in range(n8, n):
            acc[i - n8] = acc[i - n8] + fabs(<double>ld(x, i, t))
    elif mode == NORM_INF:
        # The max alone drops NaN; the sum of |x| (terms >= 0, so never
        # inf - inf) is NaN exactly when some x is.  Both vectorize.
        for j in range(8):
            tot[j] = 0.0
        for i in range(0, n8, 8):
            for j in range(8):
                a = fabs(<double>ld(x, i + j, t))
                acc[j] = a if a > acc[j] else acc[j]
                tot[j] = tot[j] + a
        for i in range(n8, n):
            a = fabs(<double>ld(x, i, t))
            acc[i - n8] = a if a > acc[i - n8] else acc[i - n8]
            tot[i - n8] = tot[i - n8] + a
        for j in range(8):
            if tot[j] != tot[j]:
                return NAN
        return max(max(max(acc[0], acc[1]), max(acc[2], acc[3])),
                   max(max(acc[4], acc[5]), max(acc[6], acc[7])))
    else:
        for i in range(n):
            acc[i % 8] = acc[i % 8] + pow(fabs(<double>ld(x, i, t)), p)
    return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))


cdef inline double chunk_value(const Chunk *c, int mode, double p) noexcept nogil:
    if c.is_double:
        return chunk_norm(<const double *>c.data, c.n, mode, p, <AsOwn *>NULL)
    if c.kind == F16:
        return chunk_norm(<const float *>c.data, c.n, mode, p, <AsF16 *>NULL)
    if c.kind == BF16:
        return chunk_norm(<const float *>c.data, c.n, mode, p, <AsBF16 *>NULL)
    return chunk_norm(<const float *>c.data, c.n, mode, p, <AsOwn *>NULL)


cdef void scale_range(floating *x, Py_ssize_t n, double coef, Storage *t) noexcept nogil:
    # 16-bit: computed in float32 and rounded
    cdef floating c = <floating>coef
    cdef Py_ssize_t i
    for i in range(n):
        st(x, i, ld(x, i, t) * c, t, 0)


cdef inline void scale_chunk(const Chunk *c, double coef) noexcept nogil:
    if c.is_double:
        scale_range(<double *>c.data, c.n, coef, <AsOwn *>NULL)
    elif c.kind == F16:
        scale_range(<float *>c.data, c.n, coef, <AsF16 *>NULL)
    elif c.kind == BF16:
        scale_range(<float *>c.data, c.n, coef, <AsBF16 *>NULL)
    else:
        scale_range(<float *>c.data, c.n, coef, <AsOwn *>NULL)


cdef void clamp_range(floating *x, Py_ssize_t n, double clip, Storage *t) noexcept nogil:
    # x = min(max(x, -clip), clip); NaN stays NaN (both comparisons are false).
    # 16-bit: compared in float32, the bound rounded to the storage as stored.
    cdef floating hi = <floating>clip, lo = -hi, v
    cdef Py_ssize_t i
    for i in range(n):
        v = ld(x, i, t)
        v = hi if v > hi else v
        v = lo if v < lo else v
        st(x, i, v, t, 0)


cdef void norm_chunk(void *ctx, Py_ssize_t k) noexcept nogil:
    cdef NormJob *j = <NormJob *>ctx
    j.part[k] = chunk_value(&j.chunks[k], j.mode, j.p)


cdef void scale_job_chunk(void *ctx, Py_ssize_t k) noexcept nogil:
    cdef const NormJob *j = <const NormJob *>ctx
    scale_chunk(&j.chunks[k], j.coef)


cdef void clamp_job_chunk(void *ctx, Py_ssize_t k) noexcept nogil:
    cdef const NormJob *j = <const NormJob *>ctx
    cdef const Chunk *c = &j.chunks[k]
    if c.is_double:
        clamp_range(<double *>c.data, c.n, j.coef, <AsOwn *>NULL)
    elif c.kind == F16:
        clamp_range(<float *>c.data, c.n, j.coef, <AsF16 *>NULL)
    elif c.kind == BF16:
        clamp_range(<float *>c.data, c.n, j.coef, <AsBF16 *>NULL)
    else:
        clamp_range(<float *>c.data, c.n, j.coef, <AsOwn *>NULL)


cdef void norm_parts(NormJob *j, Py_ssize_t nchunks, Py_ssize_t total) noexcept nogil:
    run_chunks(norm_chunk, j, nchunks, threads_for(total, OPT_GRAIN))


cdef void scale_chunks(const NormJob *j, Py_ssize_t nchunks, Py_ssize_t total) noexcept nogil:
    run_chunks(scale_job_chunk, <void *>j, nchunks, threads_for(total, OPT_GRAIN))


cdef void clamp_chunks(const NormJob *j, Py_ssize_t nchunks, Py_ssize_t total) noexcept nogil:
    run_chunks(clamp_job_chunk, <void *>j, nchunks, threads_for(total, OPT_GRAIN))


# ---------------------------------------------------------- 16-bit copies ---

cdef void widen(const uint16_t *h, float *f, Py_ssize_t n, int code) noexcept nogil:
    widen_n(h, f, n, code)


cdef void narrow(const float *f, uint16_t *h, Py_ssize_t n, int code,
                 uint32_t key) noexcept nogil:
    # h = f rounded to the 16-bit type (BF16_SR: r_i = hash32(key + i))
    cdef Py_ssize_t i
    if code == BF16_SR:
        for i in range(n):
            h[i] = fastopt_f32_to_bf16_sr(f[i], fastopt_hash32(key + <uint32_t>i))
    else:
        narrow_n(f, h, n, code)
