# Log-softmax, softmax and cross-entropy kernels (the core side of fastopt._softmax,
# included by _core.pyx).  The design is described in _softmax.pyx.
from libc.math cimport INFINITY
from libc.stdint cimport int64_t, uint16_t, uint64_t
from libc.stdlib cimport free, malloc

cdef extern from "_vmath.h" nogil:
    float fastopt_expf(float x)
    double fastopt_exp(double x)
    float fastopt_expf_nonpos(float x)
    double fastopt_exp_nonpos(double x)
    double fastopt_log(double x)
    # lane reductions: fixed order, the same at every SIMD level
    float fastopt_max_f(const float *x, Py_ssize_t n)
    double fastopt_max_d(const double *x, Py_ssize_t n)
    double fastopt_dot_f(const float *w, const float *x, float m, Py_ssize_t n, int skip_zero)
    double fastopt_dot_d(const double *w, const double *x, double m, Py_ssize_t n, int skip_zero)

# (SM_CHUNK, the elements of a row per chunk, is in _core.pxd: the front sizes
# the partials of the few-long-rows schedule with it.)
# Rows with fewer classes go through the blocked small-C path, SM_SMALL_ROWS at a time.
DEF SM_SMALL_C = 64
DEF SM_SMALL_ROWS = 256
# Elements per thread below which a kernel stays on the calling thread.
DEF SM_GRAIN = 8192
# Columns per block in the strided (non-last axis) kernel.
DEF SM_COLS = 64
# Elements per chunk of a threaded call (a thread claims one chunk of rows,
# or of column blocks, at a time).
DEF SM_TASK = 16384


# ------------------------------------------------------------ primitives ---

cdef inline floating vexp(floating x) noexcept nogil:
    """exp(x) for x <= 0 or NaN (all that softmax needs: x - max)."""
    if floating is float:
        return fastopt_expf_nonpos(x)
    else:
        return fastopt_exp_nonpos(x)


cdef inline floating span_max(const floating *x, Py_ssize_t n) noexcept nogil:
    """max of x[0:n]; NaN is skipped here (it propagates through the sum)."""
    if floating is float:
        return fastopt_max_f(x, n)
    else:
        return fastopt_max_d(x, n)


cdef inline double span_dot(const floating *w, const floating *x, Py_ssize_t n, floating m,
                            bint skip_zero) noexcept nogil:
    """sum_i w_i (x_i - m) in double (w NULL: all ones; x NULL: sum_i w_i).  skip_zero: a term
    with w_i = 0 is 0 even where x_i = -inf (otherwise 0 * -inf = NaN)."""
    if floating is float:
        return fastopt_dot_f(w, x, m, n, skip_zero)
    else:
        return fastopt_dot_d(w, x, m, n, skip_zero)


cdef inline double span_sum(const floating *e, Py_ssize_t n) noexcept nogil:
    """sum of e[0:n] in double."""
    return span_dot(e, <const floating *>NULL, n, 0, False)


cdef void span_exp(const floating *x, floating *e, Py_ssize_t n, floating m) noexcept nogil:
    # e = exp(x - m)
    cdef Py_ssize_t i
    for i in range(n):
        e[i] = vexp(x[i] - m)


# ------------------------------------------------------------------- rows ---

cdef inline bint ignored(const SmJob *j, Py_ssize_t i) noexcept nogil:
    return j.mode == XENT and j.y != NULL and j.y[i] == j.ignore


cdef inline double weight_at(const floating *w, Py_ssize_t c) noexcept nogil:
    return <double>w[c] if w != NULL else 1.0


# 16-bit x and out (float16/bfloat16): every pass reads its chunk of x as
# float32 (converted into a buffer on the thread's stack) and writes its
# chunk of results into a float32 buffer that is then rounded into out; the
# arithmetic is the float32 path's.  Where that path keeps exp(x - M) in out
# between passes, the 16-bit path keeps it in a float32 row buffer (or
# computes it again when there is none).

cdef inline const floating *x_chunk(const SmJob *j, Py_ssize_t off, Py_ssize_t n,
                                    floating *buf) noexcept nogil:
    """x[off:off+n] (flat) as the loop's type: x itself, or `buf` converted."""
    if floating is float:
        if j.xk != NATIVE:
            widen_n(<const uint16_t *>j.x + off, buf, n, j.xk)
            return buf
    return <const floating *>j.x + off


cdef inline floating *out_chunk(const SmJob *j, Py_ssize_t off, floating *buf) noexcept nogil:
    """Where results for out[off:...] are written: out itself, or `buf`
    (then `out_flush`)."""
    if floating is float:
        if j.xk != NATIVE:
            return buf
    return <floating *>j.out + off


cdef inline void out_flush(const SmJob *j, Py_ssize_t off, Py_ssize_t n,
                           const floating *buf) noexcept nogil:
    if floating is float:
        if j.xk != NATIVE:
            narrow_n(buf, <uint16_t *>j.out + off, n, j.xk)


cdef inline double x_at(const SmJob *j, Py_ssize_t off) noexcept nogil:
    """x[off] (flat), in double."""
    if j.xk == F16:
        return fastopt_f16_to_f32((<const uint16_t *>j.x)[off])
    if j.xk == BF16:
        return fastopt_bf16_to_f32((<const uint16_t *>j.x)[off])
    if j.is_double:
        return (<const double *>j.x)[off]
    return (<const float *>j.x)[off]


cdef inline void zero_out(const SmJob *j, Py_ssize_t off, Py_ssize_t n) noexcept nogil:
    # an ignored row has a zero gradient (0 has all-zero bits in every dtype)
    cdef Py_ssize_t k
    if j.out == NULL:
        return
    if j.xk != NATIVE:
        for k in range(n):
            (<uint16_t *>j.out)[off + k] = 0
    elif j.is_double:
        for k in range(n):
            (<double *>j.out)[off + k] = 0
    else:
        for k in range(n):
            (<float *>j.out)[off + k] = 0


cdef void q_chunk(const SmJob *j, Py_ssize_t i, Py_ssize_t lo, Py_ssize_t hi,
                  floating *q) noexcept nogil:
    # probability targets: q_c = w_c * ((1-eps) t_c + eps/C) for c in [lo, hi)
    cdef const floating *t = <const floating *>j.t + i * j.c
    cdef const floating *w = <const floating *>j.w
    cdef floating a = <floating>(1.0 - j.eps), b = <floating>(j.eps / j.c)
    cdef Py_ssize_t c
    if j.eps == 0:
        for c in range(lo, hi):
            q[c - lo] = t[c]
    else:
        for c in range(lo, hi):
            q[c - lo] = t[c] * a + b
    if w != NULL:
        for c in range(lo, hi):
            q[c - lo] = q[c - lo] * w[c]


cdef inline bint exps_in_out(const SmJob *j) noexcept nogil:
    """Whether exp(x - M) is written into out, to be scaled in place later
    (softmax, dlogits in the native dtype)."""
    return j.out != NULL and j.mode != LOG_SOFTMAX and j.xk == NATIVE


cdef inline floating *exp_dest(const SmJob *j, Py_ssize_t off, floating *scratch,
                               floating *keep) noexcept nogil:
    """Where exp(x - M) of out[off:...] goes: out when it is scaled in place
    later, else `keep` (a row buffer that keeps it for the write pass) if
    there is one, else scratch."""
    if exps_in_out(j):
        return <floating *>j.out + off
    return keep if keep != NULL else scratch


cdef void chunk_part(const SmJob *j, Py_ssize_t i, Py_ssize_t lo, Py_ssize_t hi, floating m,
                     const floating *x, const floating *e, SmPart *pt,
                     floating *qbuf) noexcept nogil:
    """Partial sums of row i over classes [lo, hi), given x there and
    e = exp(x - m)."""
    cdef Py_ssize_t n = hi - lo
    pt.s = span_sum(e, n)
    pt.dot = 0.0
    pt.qsum = 0.0
    if j.mode != XENT:
        return
    if j.t != NULL:
        # 0 * log(0) = 0: a class with q_c = 0 adds nothing, even at x_c = -inf
        q_chunk(j, i, lo, hi, qbuf)
        pt.dot = span_dot(qbuf, x, n, m, True)
        pt.qsum = span_sum(qbuf, n)
    elif j.eps != 0:
        # smoothing term sum_c w_c (x_c - M); w_c * -inf is -inf or NaN, as in PyTorch
        pt.dot = span_dot(<const floating *>j.w + lo if j.w != NULL else NULL, x, n, m, False)


cdef double row_coef(const SmJob *j, Py_ssize_t i, floating m, SmPart tot, double log_s,
                     double *loss) noexcept nogil:
    """From row i's totals (and log S): its loss (cross-entropy) and the
    coefficient that the chunk writes use (log S; 1/S; Q*scale/S)."""
    cdef double eps = j.eps, wy, dy, q
    cdef int64_t y
    if j.mode == LOG_SOFTMAX:
        return log_s
    if j.mode == SOFTMAX:
        return 1.0 / tot.s
    if j.y != NULL:
        y = j.y[i]
        wy = weight_at(<const floating *>j.w, y)
        dy = x_at(j, i * j.c + y) - <double>m
        # -w_y logp_y,  logp_y = (x_y - M) - log S
        loss[0] = -wy * (dy - log_s)
        q = wy
        if eps != 0:
            # (1-eps) nll + eps/C * sum_c -w_c logp_c
            loss[0] = (1.0 - eps) * loss[0] + eps / j.c * (j.wsum * log_s - tot.dot)
            q = (1.0 - eps) * wy + eps / j.c * j.wsum
    else:
        loss[0] = tot.qsum * log_s - tot.dot
        q = tot.qsum
    return q * j.scale / tot.s


cdef void chunk_write(const SmJob *j, Py_ssize_t i, Py_ssize_t lo, Py_ssize_t hi, floating m,
                      double coef, const floating *x, const floating *e, floating *o,
                      floating *qbuf) noexcept nogil:
    """The outputs of row i over classes [lo, hi) into o[0:hi-lo], from x and
    e = exp(x - M) there (e may be o itself)."""
    cdef const floating *w = <const floating *>j.w
    cdef floating a = <floating>coef, b, sc = <floating>j.scale
    cdef Py_ssize_t c, n = hi - lo, y
    if j.mode == LOG_SOFTMAX:
        for c in range(n):
            o[c] = (x[c] - m) - a
    elif j.mode == SOFTMAX:
        for c in range(n):
            o[c] = e[c] * a
    elif j.t != NULL:
        # dlogits = (softmax Q - q) * scale
        q_chunk(j, i, lo, hi, qbuf)
        for c in range(n):
            o[c] = e[c] * a - qbuf[c] * sc
    else:
        if j.eps == 0:
            for c in range(n):
                o[c] = e[c] * a
        else:
            b = <floating>(j.eps / j.c * j.scale)
            if w == NULL:
                for c in range(n):
                    o[c] = e[c] * a - b
            else:
                for c in range(n):
                    o[c] = e[c] * a - b * w[lo + c]
        y = j.y[i]
        if lo <= y < hi:
            o[y - lo] = o[y - lo] - <floating>((1.0 - j.eps) * weight_at(w, y) * j.scale)


cdef inline bint writes(const SmJob *j) noexcept nogil:
    return j.out != NULL


ctypedef struct Bufs:           # a thread's work space (its stack), SM_CHUNK values each
    void *scratch               # exp(x - M) of a chunk
    void *q                     # target distribution of a chunk
    void *x                     # 16-bit x of a chunk, converted
    void *o                     # results of a chunk before they are rounded into 16-bit out
    void *row                   # exp(x - M) of a whole row, kept for the write pass (or NULL)


cdef void one_row(const SmJob *j, Py_ssize_t i, const Bufs *b, floating *scratch) noexcept nogil:
    """All passes over row i on this thread, chunk by chunk (scratch: b.scratch, typed)."""
    cdef floating *qbuf = <floating *>b.q
    cdef floating *xbuf = <floating *>b.x
    cdef floating *row = <floating *>b.row
    cdef const floating *xs
    cdef floating m = -INFINITY, mk
    cdef floating *e
    cdef SmPart tot, pt
    cdef double coef
    cdef Py_ssize_t k, lo, hi, base = i * j.c
    if ignored(j, i):
        zero_out(j, base, j.c)
        j.loss[i] = 0.0
        return
    for k in range(j.nchunk):
        lo = k * SM_CHUNK
        hi = min(lo + SM_CHUNK, j.c)
        mk = span_max(x_chunk(j, base + lo, hi - lo, xbuf), hi - lo)
        m = mk if mk > m else m
    tot.s = tot.dot = tot.qsum = 0.0
    for k in range(j.nchunk):
        lo = k * SM_CHUNK
        hi = min(lo + SM_CHUNK, j.c)
        xs = x_chunk(j, base + lo, hi - lo, xbuf)
        e = exp_dest(j, base + lo, scratch, row + lo if row != NULL else NULL)
        span_exp(xs, e, hi - lo, m)
        chunk_part(j, i, lo, hi, m, xs, e, &pt, qbuf)
        tot.s += pt.s
        tot.dot += pt.dot
        tot.qsum += pt.qsum
    coef = row_coef(j, i, m, tot, fastopt_log(tot.s), &j.loss[i])
    if writes(j):
        for k in range(j.nchunk):
            lo = k * SM_CHUNK
            hi = min(lo + SM_CHUNK, j.c)
            # exp(x - M) kept: in the row buffer, or still in scratch (one chunk)
            chunk_output(j, i, lo, hi, m, coef, b, row + lo if row != NULL else
                         scratch if j.nchunk == 1 else NULL)


cdef inline void chunk_output(const SmJob *j, Py_ssize_t i, Py_ssize_t lo, Py_ssize_t hi,
                              floating m, double coef, const Bufs *b,
                              const floating *kept) noexcept nogil:
    """The write pass over classes [lo, hi) of row i; `kept`: exp(x - M)
    there if a row buffer kept it."""
    cdef Py_ssize_t off = i * j.c + lo, n = hi - lo
    cdef const floating *xs = NULL
    cdef const floating *e = NULL
    cdef floating *o = out_chunk(j, off, <floating *>b.o)
    cdef floating *scratch
    if j.mode == LOG_SOFTMAX:
        xs = x_chunk(j, off, n, <floating *>b.x)        # (log_softmax needs no exps)
    elif exps_in_out(j):
        e = o
    elif kept != NULL:
        e = kept
    else:
        scratch = <floating *>b.scratch
        span_exp(x_chunk(j, off, n, <floating *>b.x), scratch, n, m)
        e = scratch
    chunk_write(j, i, lo, hi, m, coef, xs, e, o, <floating *>b.q)
    out_flush(j, off, n, o)


cdef void small_rows(const SmJob *j, Py_ssize_t r0, Py_ssize_t r1, const Bufs *bf,
                     floating *scratch) noexcept nogil:
    """Rows [r0, r1) with C < SM_SMALL_C: the same arithmetic as one_row, but exp
    and log run over a block of rows at once (vectorized loops): with few
    classes, per-row scalar work would dominate."""
    cdef Py_ssize_t c = j.c, rows = min(max(SM_CHUNK // c, 1), SM_SMALL_ROWS)
    cdef Py_ssize_t b0, b1, i, k, r
    cdef floating mrow[SM_SMALL_ROWS]
    cdef SmPart part[SM_SMALL_ROWS]
    cdef double sums[SM_SMALL_ROWS]
    cdef double logs[SM_SMALL_ROWS]
    cdef floating *qbuf = <floating *>bf.q
    cdef floating *e
    cdef floating *er
    cdef floating *o
    cdef const floating *xb
    cdef const floating *xr
    cdef double coef
    b0 = r0
    while b0 < r1:
        b1 = min(b0 + rows, r1)
        # rows b0..b1 are contiguous in x, out and the buffers
        xb = x_chunk(j, b0 * c, (b1 - b0) * c, <floating *>bf.x)
        e = exp_dest(j, b0 * c, scratch, NULL)
        for i in range(b0, b1):
            r = i - b0
            xr = xb + r * c
            er = e + r * c
            mrow[r] = span_max(xr, c)
            for k in range(c):
                er[k] = xr[k] - mrow[r]
        for k in range((b1 - b0) * c):
            e[k] = vexp(e[k])
        for i in range(b0, b1):
            r = i - b0
            chunk_part(j, i, 0, c, mrow[r], xb + r * c, e + r * c, &part[r], qbuf)
            sums[r] = part[r].s
        for r in range(b1 - b0):
            logs[r] = fastopt_log(sums[r])
        o = out_chunk(j, b0 * c, <floating *>bf.o) if writes(j) else NULL
        for i in range(b0, b1):
            r = i - b0
            if ignored(j, i):
                if o != NULL:
                    for k in range(c):
                        o[r * c + k] = 0
                j.loss[i] = 0.0
                continue
            coef = row_coef(j, i, mrow[r], part[r], logs[r], &j.loss[i])
            if o != NULL:
                chunk_write(j, i, 0, c, mrow[r], coef, xb + r * c, e + r * c, o + r * c, qbuf)
        if o != NULL:
            out_flush(j, b0 * c, (b1 - b0) * c, o)
        b0 = b1


cdef void rows_range(const floating *x, const SmJob *j, Py_ssize_t r0, Py_ssize_t r1) noexcept nogil:
    cdef floating scratch[SM_CHUNK]
    cdef floating qbuf[SM_CHUNK]
    cdef floating xbuf[SM_CHUNK]
    cdef floating obuf[SM_CHUNK]
    cdef Bufs b
    cdef Py_ssize_t i
    b.scratch = scratch
    b.q = qbuf
    b.x = xbuf
    b.o = obuf
    b.row = NULL
    if j.c < SM_SMALL_C:
        small_rows(j, r0, r1, &b, scratch)
        return
    if writes(j) and j.mode != LOG_SOFTMAX and not exps_in_out(j) and j.nchunk > 1:
        # 16-bit out: keep each row's exp(x - M) for the write pass (without
        # the memory, it is computed again there)
        b.row = malloc(j.c * sizeof(floating))
    for i in range(r0, r1):
        one_row(j, i, &b, scratch)
    free(b.row)


# Few long rows: the (row, chunk) pieces in three parallel steps.

cdef void piece_max(const floating *x, const SmJob *j, Py_ssize_t it) noexcept nogil:
    cdef floating xbuf[SM_CHUNK]
    cdef Py_ssize_t i = it // j.nchunk, lo = (it % j.nchunk) * SM_CHUNK
    cdef Py_ssize_t hi = min(lo + SM_CHUNK, j.c)
    if not ignored(j, i):
        j.pmax[it] = span_max(x_chunk(j, i * j.c + lo, hi - lo, xbuf), hi - lo)


cdef inline floating piece_row_max(const floating *x, const SmJob *j, Py_ssize_t i) noexcept nogil:
    cdef floating m = -INFINITY, mk
    cdef Py_ssize_t k
    for k in range(j.nchunk):
        mk = <floating>j.pmax[i * j.nchunk + k]
        m = mk if mk > m else m
    return m


cdef void piece_sums(const floating *x, const SmJob *j, Py_ssize_t it) noexcept nogil:
    cdef floating scratch[SM_CHUNK]
    cdef floating qbuf[SM_CHUNK]
    cdef floating xbuf[SM_CHUNK]
    cdef Py_ssize_t i = it // j.nchunk, lo = (it % j.nchunk) * SM_CHUNK
    cdef Py_ssize_t hi = min(lo + SM_CHUNK, j.c)
    cdef floating m
    cdef floating *e
    cdef const floating *xs
    if ignored(j, i):
        return
    m = piece_row_max(x, j, i)
    xs = x_chunk(j, i * j.c + lo, hi - lo, xbuf)
    e = exp_dest(j, i * j.c + lo, scratch, NULL)
    span_exp(xs, e, hi - lo, m)
    chunk_part(j, i, lo, hi, m, xs, e, &j.part[it], qbuf)


cdef double piece_coef(const SmJob *j, Py_ssize_t i, floating *m, double *loss) noexcept nogil:
    cdef SmPart tot
    cdef Py_ssize_t k
    m[0] = piece_row_max(<const floating *>j.x, j, i)
    tot.s = tot.dot = tot.qsum = 0.0
    for k in range(j.nchunk):
        tot.s += j.part[i * j.nchunk + k].s
        tot.dot += j.part[i * j.nchunk + k].dot
        tot.qsum += j.part[i * j.nchunk + k].qsum
    return row_coef(j, i, m[0], tot, fastopt_log(tot.s), loss)


cdef void piece_write(const floating *x, const SmJob *j, Py_ssize_t it) noexcept nogil:
    cdef floating scratch[SM_CHUNK]
    cdef floating qbuf[SM_CHUNK]
    cdef floating xbuf[SM_CHUNK]
    cdef floating obuf[SM_CHUNK]
    cdef Bufs b
    cdef Py_ssize_t i = it // j.nchunk, lo = (it % j.nchunk) * SM_CHUNK
    cdef Py_ssize_t hi = min(lo + SM_CHUNK, j.c)
    cdef floating m
    cdef double coef, loss
    if ignored(j, i):
        zero_out(j, i * j.c + lo, hi - lo)
        return
    b.scratch = scratch
    b.q = qbuf
    b.x = xbuf
    b.o = obuf
    b.row = NULL
    scratch[0] = 0      # (chunk_output fills it before use; gcc cannot tell)
    coef = piece_coef(j, i, &m, &loss)
    chunk_output(j, i, lo, hi, m, coef, &b, NULL)


cdef void max_piece_chunk(void *ctx, Py_ssize_t it) noexcept nogil:
    cdef const SmJob *j = <const SmJob *>ctx
    if j.is_double:
        piece_max(<const double *>j.x, j, it)
    else:
        piece_max(<const float *>j.x, j, it)


cdef void sums_piece_chunk(void *ctx, Py_ssize_t it) noexcept nogil:
    cdef const SmJob *j = <const SmJob *>ctx
    if j.is_double:
        piece_sums(<const double *>j.x, j, it)
    else:
        piece_sums(<const float *>j.x, j, it)


cdef void write_piece_chunk(void *ctx, Py_ssize_t it) noexcept nogil:
    cdef const SmJob *j = <const SmJob *>ctx
    if j.is_double:
        piece_write(<const double *>j.x, j, it)
    else:
        piece_write(<const float *>j.x, j, it)


cdef void run_pieces(const floating *x, const SmJob *j, int nt) noexcept nogil:
    cdef Py_ssize_t i, pieces = j.n * j.nchunk
    cdef floating m
    run_chunks(max_piece_chunk, <void *>j, pieces, nt)
    run_chunks(sums_piece_chunk, <void *>j, pieces, nt)
    if writes(j):
        run_chunks(write_piece_chunk, <void *>j, pieces, nt)
    if j.mode == XENT:
        for i in range(j.n):
            if ignored(j, i):
                j.loss[i] = 0.0
            else:
                piece_coef(j, i, &m, &j.loss[i])


ctypedef struct RowTask:
    const SmJob *j
    Py_ssize_t rows         # per chunk


cdef void rows_chunk(void *ctx, Py_ssize_t k) noexcept nogil:
    cdef const RowTask *t = <const RowTask *>ctx
    cdef Py_ssize_t r0 = k * t.rows, r1 = min(r0 + t.rows, t.j.n)
    if t.j.is_double:
        rows_range(<const double *>t.j.x, t.j, r0, r1)
    else:
        rows_range(<const float *>t.j.x, t.j, r0, r1)


cdef void run_rows(const SmJob *j) noexcept nogil:
    """Every row of the job, on as many threads as the work warrants."""
    cdef int nt = threads_for(j.n * j.c, SM_GRAIN)
    cdef Py_ssize_t block
    cdef RowTask t
    if nt > 1 and j.nchunk > 1 and j.n < 4 * nt:
        if j.is_double:
            run_pieces(<const double *>j.x, j, nt)
        else:
            run_pieces(<const float *>j.x, j, nt)
        return
    if nt == 1:
        if j.is_double:
            rows_range(<const double *>j.x, j, 0, j.n)
        else:
            rows_range(<const float *>j.x, j, 0, j.n)
        return
    # Chunks of about SM_TASK elements; with few classes, whole blocks of small_rows.
    t.j = j
    t.rows = max(1, SM_TASK // j.c)
    if j.c < SM_SMALL_C:
        block = min(max(SM_CHUNK // j.c, 1), SM_SMALL_ROWS)
        t.rows = max(block, t.rows - t.rows % block)
    run_chunks(rows_chunk, &t, (j.n + t.rows - 1) // t.rows, nt)


# -------------------------------------------------------- strided axis ---

cdef void col_block(const floating *x, floating *out, Py_ssize_t c, Py_ssize_t inner,
                    Py_ssize_t o, Py_ssize_t j0, Py_ssize_t nb, bint log_out) noexcept nogil:
    """Columns j0..j0+nb of slab o of an (outer, C, inner) array: softmax over
    C for each column, vectorized across the (contiguous) columns."""
    cdef floating m[SM_COLS]
    cdef double s[SM_COLS]
    cdef floating a[SM_COLS]
    cdef floating v
    cdef Py_ssize_t base = o * c * inner + j0, k, jj
    cdef const floating *xr
    cdef floating *orow
    for jj in range(nb):
        m[jj] = -INFINITY
        s[jj] = 0.0
    for k in range(c):
        xr = x + base + k * inner
        for jj in range(nb):
            v = xr[jj]
            m[jj] = v if v > m[jj] else m[jj]
    for k in range(c):
        xr = x + base + k * inner
        orow = out + base + k * inner
        if log_out:
            for jj in range(nb):
                s[jj] = s[jj] + <double>vexp(xr[jj] - m[jj])
        else:
            for jj in range(nb):
                v = vexp(xr[jj] - m[jj])
                orow[jj] = v
                s[jj] = s[jj] + <double>v
    for jj in range(nb):
        a[jj] = <floating>fastopt_log(s[jj]) if log_out else <floating>(1.0 / s[jj])
    for k in range(c):
        xr = x + base + k * inner
        orow = out + base + k * inner
        if log_out:
            for jj in range(nb):
                orow[jj] = (xr[jj] - m[jj]) - a[jj]
        else:
            for jj in range(nb):
                orow[jj] = orow[jj] * a[jj]


ctypedef struct ColTask:
    bint is_double, log_out
    const void *x
    void *out
    Py_ssize_t c, inner
    Py_ssize_t per          # blocks of SM_COLS columns per slab
    Py_ssize_t nblock       # outer * per
    Py_ssize_t blocks       # per chunk


cdef inline void col_blocks(const floating *x, floating *out, const ColTask *t,
                            Py_ssize_t b0, Py_ssize_t b1) noexcept nogil:
    cdef Py_ssize_t it, o, j0
    for it in range(b0, b1):
        o = it // t.per
        j0 = (it % t.per) * SM_COLS
        col_block(x, out, t.c, t.inner, o, j0, min(SM_COLS, t.inner - j0), t.log_out)


cdef void cols_chunk(void *ctx, Py_ssize_t k) noexcept nogil:
    cdef const ColTask *t = <const ColTask *>ctx
    cdef Py_ssize_t b0 = k * t.blocks, b1 = min(b0 + t.blocks, t.nblock)
    if t.is_double:
        col_blocks(<const double *>t.x, <double *>t.out, t, b0, b1)
    else:
        col_blocks(<const float *>t.x, <float *>t.out, t, b0, b1)


cdef void run_cols(const floating *x, floating *out, Py_ssize_t outer, Py_ssize_t c,
                   Py_ssize_t inner, bint log_out) noexcept nogil:
    cdef ColTask t
    t.is_double = floating is double
    t.log_out = log_out
    t.x = x
    t.out = out
    t.c = c
    t.inner = inner
    t.per = (inner + SM_COLS - 1) // SM_COLS
    t.nblock = outer * t.per
    t.blocks = max(1, SM_TASK // (SM_COLS * c))
    run_chunks(cols_chunk, &t, (t.nblock + t.blocks - 1) // t.blocks,
               threads_for(outer * c * inner, SM_GRAIN))


# ----------------------------------------- cross-entropy: checks, total ---

cdef Py_ssize_t first_above(const uint64_t *y, Py_ssize_t n, uint64_t limit) noexcept nogil:
    """Index of the first y[i] > limit, or -1."""
    cdef Py_ssize_t i
    for i in range(n):
        if y[i] > limit:
            return i
    return -1


cdef Py_ssize_t check_classes(const int64_t *y, Py_ssize_t n, Py_ssize_t c, int64_t ignore,
                              const floating *w, double *total) noexcept nogil:
    """Index of the first class index outside [0, C) (ignore_index excepted),
    or -1; `total` = sum of w[y_i] over the rows not ignored (their count
    without weights), in order."""
    cdef Py_ssize_t i, count = 0
    cdef int64_t v
    cdef double tw = 0.0
    for i in range(n):
        v = y[i]
        if v == ignore:
            continue
        if v < 0 or v >= c:
            return i
        count += 1
        if w != NULL:
            tw += <double>w[v]
    total[0] = tw if w != NULL else <double>count
    return -1


cdef double ordered_sum(const double *v, Py_ssize_t n) noexcept nogil:
    """sum of v in a fixed order (4 interleaved partial sums)."""
    cdef double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0
    cdef Py_ssize_t i, nb = n - n % 4
    for i in range(0, nb, 4):
        s0 += v[i]
        s1 += v[i + 1]
        s2 += v[i + 2]
        s3 += v[i + 3]
    for i in range(nb, n):
        s0 += v[i]
    return (s0 + s1) + (s2 + s3)


# ------------------------------------------------------------ test hooks ---

cdef void exp_array(const floating *x, floating *out, Py_ssize_t n, bint nonpos) noexcept nogil:
    cdef Py_ssize_t i
    if nonpos:
        for i in range(n):
            out[i] = vexp(x[i])
    elif floating is float:
        for i in range(n):
            out[i] = fastopt_expf(x[i])
    else:
        for i in range(n):
            out[i] = fastopt_exp(x[i])


cdef void log_array(const double *x, double *out, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        out[i] = fastopt_log(x[i])
