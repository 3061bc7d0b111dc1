# Log-softmax, softmax and cross-entropy (loss and gradient in one kernel).
#
# Design
# ------
# * Every row (the class axis) is reduced in the same fixed way: its max M,
#   then S = sum exp(x - M) accumulated in double, then log S once per row,
#   and outputs as (x - M) - log S, in that order, so logits of any magnitude
#   keep their precision.
# * exp is the cost: `_vmath.h` has a branch-free exp that gcc vectorizes when
#   it is inlined in a loop (libm's is an opaque call per element), and a
#   branch-free log (one per row, but short rows are many).  Being our own,
#   they also give the same bits on every platform and SIMD level.
# * Reductions (max, sums; in `_vmath.h`) use 16 independent accumulators
#   (i mod 16), combined in a fixed order: vectorized without reassociating,
#   and the result is the same at every SIMD level.
# * A row is processed in CHUNK-element chunks; a chunk's partial sums are
#   combined in chunk order.  Usually one thread owns a row and does all its
#   passes while the row is in cache (max; exp, stored into the gradient
#   buffer, and sum; scale).  When there are few long rows, the (row, chunk)
#   pieces are spread over threads in three successive jobs instead, computing
#   exactly the same partial sums: results never depend on the thread count.
# * Rows with few classes (C < SMALL_C) are handled in blocks of rows so that
#   exp and log run over a whole block (vectorized loops, not per-row tails).
# * softmax/log_softmax over a non-last axis view the array as
#   (outer, C, inner) and vectorize across `inner` (contiguous), no transpose.
# * cross_entropy follows torch.nn.functional.cross_entropy.  Per row it uses
#   a weighted target distribution q (sum Q):
#       class index y:  q_c = (1-eps) w_y [c == y] + (eps/C) w_c
#       probabilities:  q_c = w_c ((1-eps) t_c + eps/C)
#   loss_i = -sum_c q_c logp_c = Q log S - sum_c q_c (x_c - M)
#   dlogits_i = (softmax_i Q - q) * scale, scale = 1/D for 'mean', else 1.
# * The `def` functions validate everything (including every class index)
#   before `nogil`; nothing is written when a check fails.
include "_common.pxi"
include "_half.pxi"

from libc.math cimport INFINITY
from libc.stdint cimport int64_t, uint64_t, INT64_MAX
from libc.stdlib cimport free, malloc
import numpy as np

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

# Elements of a row per chunk (partial sums per chunk, combined in order).  8 KiB-16 KiB: in L1.
DEF CHUNK = 2048
# Rows with fewer classes go through the blocked small-C path, SMALL_ROWS at a time.
DEF SMALL_C = 64
DEF SMALL_ROWS = 256
# Elements per thread below which a kernel stays on the calling thread.
DEF GRAIN = 8192
# Columns per block in the strided (non-last axis) kernel.
DEF COLS = 64
# Elements per chunk of a threaded call (a thread claims one chunk of rows,
# or of column blocks, at a time).
DEF TASK = 16384


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

cdef enum Mode:
    LOG_SOFTMAX = 0
    SOFTMAX = 1
    XENT = 2


ctypedef struct Part:
    double s        # sum exp(x_c - M)
    double dot      # sum q_c (x_c - M) over the classes that need it
    double qsum     # sum q_c (probability targets)


ctypedef struct Job:
    int mode
    bint is_double
    int xk                  # Store code of x and out: NATIVE, F16 or BF16 (then computed in float)
    Py_ssize_t n, c, nchunk
    const void *x           # (N, C) rows
    void *out               # log_softmax/softmax output, or dlogits (NULL: loss only)
    # cross-entropy (targets and weights are float32 for 16-bit logits)
    const int64_t *y        # class indices (N,), or NULL
    const void *t           # class probabilities (N, C), or NULL
    const void *w           # class weights (C,), or NULL
    int64_t ignore
    double eps              # label smoothing
    double wsum             # sum of the weights (C without weights)
    double scale            # gradient scale: 1/D for 'mean', else 1
    double *loss            # per-row loss (N,)
    # few long rows: partials per (row, chunk), row-major
    double *pmax
    Part *part


cdef inline bint ignored(const Job *j, Py_ssize_t i) noexcept nogil:
    return j.mode == XENT and j.y != NULL and j.y[i] == j.ignore


cdef inline double weight_at(const floating *w, Py_ssize_t c) noexcept nogil:
    return <double>w[c] if w != NULL else 1.0


# 16-bit x and out (float16/bfloat16): every pass reads its chunk of x as
# float32 (converted into a buffer on the thread's stack) and writes its
# chunk of results into a float32 buffer that is then rounded into out; the
# arithmetic is the float32 path's.  Where that path keeps exp(x - M) in out
# between passes, the 16-bit path keeps it in a float32 row buffer (or
# computes it again when there is none).

cdef inline const floating *x_chunk(const Job *j, Py_ssize_t off, Py_ssize_t n,
                                    floating *buf) noexcept nogil:
    """x[off:off+n] (flat) as the loop's type: x itself, or `buf` converted."""
    if floating is float:
        if j.xk != NATIVE:
            widen_n(<const uint16_t *>j.x + off, buf, n, j.xk)
            return buf
    return <const floating *>j.x + off


cdef inline floating *out_chunk(const Job *j, Py_ssize_t off, floating *buf) noexcept nogil:
    """Where results for out[off:...] are written: out itself, or `buf`
    (then `out_flush`)."""
    if floating is float:
        if j.xk != NATIVE:
            return buf
    return <floating *>j.out + off


cdef inline void out_flush(const Job *j, Py_ssize_t off, Py_ssize_t n,
                           const floating *buf) noexcept nogil:
    if floating is float:
        if j.xk != NATIVE:
            narrow_n(buf, <uint16_t *>j.out + off, n, j.xk)


cdef inline double x_at(const Job *j, Py_ssize_t off) noexcept nogil:
    """x[off] (flat), in double."""
    if j.xk == F16:
        return fastopt_f16_to_f32((<const uint16_t *>j.x)[off])
    if j.xk == BF16:
        return fastopt_bf16_to_f32((<const uint16_t *>j.x)[off])
    if j.is_double:
        return (<const double *>j.x)[off]
    return (<const float *>j.x)[off]


cdef inline void zero_out(const Job *j, Py_ssize_t off, Py_ssize_t n) noexcept nogil:
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


cdef void q_chunk(const Job *j, Py_ssize_t i, Py_ssize_t lo, Py_ssize_t hi,
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


cdef inline bint exps_in_out(const Job *j) noexcept nogil:
    """Whether exp(x - M) is written into out, to be scaled in place later
    (softmax, dlogits in the native dtype)."""
    return j.out != NULL and j.mode != LOG_SOFTMAX and j.xk == NATIVE


cdef inline floating *exp_dest(const Job *j, Py_ssize_t off, floating *scratch,
                               floating *keep) noexcept nogil:
    """Where exp(x - M) of out[off:...] goes: out when it is scaled in place
    later, else `keep` (a row buffer that keeps it for the write pass) if
    there is one, else scratch."""
    if exps_in_out(j):
        return <floating *>j.out + off
    return keep if keep != NULL else scratch


cdef void chunk_part(const Job *j, Py_ssize_t i, Py_ssize_t lo, Py_ssize_t hi, floating m,
                     const floating *x, const floating *e, Part *pt,
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


cdef double row_coef(const Job *j, Py_ssize_t i, floating m, Part tot, double log_s,
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


cdef void chunk_write(const Job *j, Py_ssize_t i, Py_ssize_t lo, Py_ssize_t hi, floating m,
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


cdef inline bint writes(const Job *j) noexcept nogil:
    return j.out != NULL


ctypedef struct Bufs:           # a thread's work space (its stack), CHUNK values each
    void *scratch               # exp(x - M) of a chunk
    void *q                     # target distribution of a chunk
    void *x                     # 16-bit x of a chunk, converted
    void *o                     # results of a chunk before they are rounded into 16-bit out
    void *row                   # exp(x - M) of a whole row, kept for the write pass (or NULL)


cdef void one_row(const Job *j, Py_ssize_t i, const Bufs *b, floating *scratch) noexcept nogil:
    """All passes over row i on this thread, chunk by chunk (scratch: b.scratch, typed)."""
    cdef floating *qbuf = <floating *>b.q
    cdef floating *xbuf = <floating *>b.x
    cdef floating *row = <floating *>b.row
    cdef const floating *xs
    cdef floating m = -INFINITY, mk
    cdef floating *e
    cdef Part tot, pt
    cdef double coef
    cdef Py_ssize_t k, lo, hi, base = i * j.c
    if ignored(j, i):
        zero_out(j, base, j.c)
        j.loss[i] = 0.0
        return
    for k in range(j.nchunk):
        lo = k * CHUNK
        hi = min(lo + CHUNK, j.c)
        mk = span_max(x_chunk(j, base + lo, hi - lo, xbuf), hi - lo)
        m = mk if mk > m else m
    tot.s = tot.dot = tot.qsum = 0.0
    for k in range(j.nchunk):
        lo = k * CHUNK
        hi = min(lo + CHUNK, j.c)
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
            lo = k * CHUNK
            hi = min(lo + CHUNK, j.c)
            # exp(x - M) kept: in the row buffer, or still in scratch (one chunk)
            chunk_output(j, i, lo, hi, m, coef, b, row + lo if row != NULL else
                         scratch if j.nchunk == 1 else NULL)


cdef inline void chunk_output(const Job *j, Py_ssize_t i, Py_ssize_t lo, Py_ssize_t hi,
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


cdef void small_rows(const Job *j, Py_ssize_t r0, Py_ssize_t r1, const Bufs *bf,
                     floating *scratch) noexcept nogil:
    """Rows [r0, r1) with C < SMALL_C: the same arithmetic as one_row, but exp
    and log run over a block of rows at once (vectorized loops): with few
    classes, per-row scalar work would dominate."""
    cdef Py_ssize_t c = j.c, rows = min(max(CHUNK // c, 1), SMALL_ROWS)
    cdef Py_ssize_t b0, b1, i, k, r
    cdef floating mrow[SMALL_ROWS]
    cdef Part part[SMALL_ROWS]
    cdef double sums[SMALL_ROWS]
    cdef double logs[SMALL_ROWS]
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


cdef void rows_range(const floating *x, const Job *j, Py_ssize_t r0, Py_ssize_t r1) noexcept nogil:
    cdef floating scratch[CHUNK]
    cdef floating qbuf[CHUNK]
    cdef floating xbuf[CHUNK]
    cdef floating obuf[CHUNK]
    cdef Bufs b
    cdef Py_ssize_t i
    b.scratch = scratch
    b.q = qbuf
    b.x = xbuf
    b.o = obuf
    b.row = NULL
    if j.c < SMALL_C:
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

cdef void piece_max(const floating *x, const Job *j, Py_ssize_t it) noexcept nogil:
    cdef floating xbuf[CHUNK]
    cdef Py_ssize_t i = it // j.nchunk, lo = (it % j.nchunk) * CHUNK
    cdef Py_ssize_t hi = min(lo + CHUNK, j.c)
    if not ignored(j, i):
        j.pmax[it] = span_max(x_chunk(j, i * j.c + lo, hi - lo, xbuf), hi - lo)


cdef inline floating piece_row_max(const floating *x, const Job *j, Py_ssize_t i) noexcept nogil:
    cdef floating m = -INFINITY, mk
    cdef Py_ssize_t k
    for k in range(j.nchunk):
        mk = <floating>j.pmax[i * j.nchunk + k]
        m = mk if mk > m else m
    return m


cdef void piece_sums(const floating *x, const Job *j, Py_ssize_t it) noexcept nogil:
    cdef floating scratch[CHUNK]
    cdef floating qbuf[CHUNK]
    cdef floating xbuf[CHUNK]
    cdef Py_ssize_t i = it // j.nchunk, lo = (it % j.nchunk) * CHUNK
    cdef Py_ssize_t hi = min(lo + CHUNK, j.c)
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


cdef double piece_coef(const Job *j, Py_ssize_t i, floating *m, double *loss) noexcept nogil:
    cdef Part tot
    cdef Py_ssize_t k
    m[0] = piece_row_max(<const floating *>j.x, j, i)
    tot.s = tot.dot = tot.qsum = 0.0
    for k in range(j.nchunk):
        tot.s += j.part[i * j.nchunk + k].s
        tot.dot += j.part[i * j.nchunk + k].dot
        tot.qsum += j.part[i * j.nchunk + k].qsum
    return row_coef(j, i, m[0], tot, fastopt_log(tot.s), loss)


cdef void piece_write(const floating *x, const Job *j, Py_ssize_t it) noexcept nogil:
    cdef floating scratch[CHUNK]
    cdef floating qbuf[CHUNK]
    cdef floating xbuf[CHUNK]
    cdef floating obuf[CHUNK]
    cdef Bufs b
    cdef Py_ssize_t i = it // j.nchunk, lo = (it % j.nchunk) * CHUNK
    cdef Py_ssize_t hi = min(lo + CHUNK, j.c)
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
    cdef const Job *j = <const Job *>ctx
    if j.is_double:
        piece_max(<const double *>j.x, j, it)
    else:
        piece_max(<const float *>j.x, j, it)


cdef void sums_piece_chunk(void *ctx, Py_ssize_t it) noexcept nogil:
    cdef const Job *j = <const Job *>ctx
    if j.is_double:
        piece_sums(<const double *>j.x, j, it)
    else:
        piece_sums(<const float *>j.x, j, it)


cdef void write_piece_chunk(void *ctx, Py_ssize_t it) noexcept nogil:
    cdef const Job *j = <const Job *>ctx
    if j.is_double:
        piece_write(<const double *>j.x, j, it)
    else:
        piece_write(<const float *>j.x, j, it)


cdef void run_pieces(const floating *x, const Job *j, int nt) noexcept nogil:
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
    const Job *j
    Py_ssize_t rows         # per chunk


cdef void rows_chunk(void *ctx, Py_ssize_t k) noexcept nogil:
    cdef const RowTask *t = <const RowTask *>ctx
    cdef Py_ssize_t r0 = k * t.rows, r1 = min(r0 + t.rows, t.j.n)
    if t.j.is_double:
        rows_range(<const double *>t.j.x, t.j, r0, r1)
    else:
        rows_range(<const float *>t.j.x, t.j, r0, r1)


cdef void run_rows(const Job *j) noexcept nogil:
    """Every row of the job, on as many threads as the work warrants."""
    cdef int nt = threads_for(j.n * j.c, GRAIN)
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
    # Chunks of about TASK elements; with few classes, whole blocks of small_rows.
    t.j = j
    t.rows = max(1, TASK // j.c)
    if j.c < SMALL_C:
        block = min(max(CHUNK // j.c, 1), SMALL_ROWS)
        t.rows = max(block, t.rows - t.rows % block)
    run_chunks(rows_chunk, &t, (j.n + t.rows - 1) // t.rows, nt)


# -------------------------------------------------------- strided axis ---

cdef void col_block(const floating *x, floating *out, Py_ssize_t c, Py_ssize_t inner,
                    Py_ssize_t o, Py_ssize_t j0, Py_ssize_t nb, bint log_out) noexcept nogil:
    """Columns j0..j0+nb of slab o of an (outer, C, inner) array: softmax over
    C for each column, vectorized across the (contiguous) columns."""
    cdef floating m[COLS]
    cdef double s[COLS]
    cdef floating a[COLS]
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
    Py_ssize_t per          # blocks of COLS columns per slab
    Py_ssize_t nblock       # outer * per
    Py_ssize_t blocks       # per chunk


cdef inline void col_blocks(const floating *x, floating *out, const ColTask *t,
                            Py_ssize_t b0, Py_ssize_t b1) noexcept nogil:
    cdef Py_ssize_t it, o, j0
    for it in range(b0, b1):
        o = it // t.per
        j0 = (it % t.per) * COLS
        col_block(x, out, t.c, t.inner, o, j0, min(COLS, t.inner - j0), t.log_out)


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
    t.per = (inner + COLS - 1) // COLS
    t.nblock = outer * t.per
    t.blocks = max(1, TASK // (COLS * c))
    run_chunks(cols_chunk, &t, (t.nblock + t.blocks - 1) // t.blocks,
               threads_for(outer * c * inner, GRAIN))


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


# ------------------------------------------------------------ functional API ---

cdef inline int norm_axis(object axis, int nd) except -100:
    cdef object a = integer(axis, "axis")
    if not -nd <= a < nd:
        raise np.exceptions.AxisError(f"axis {a} is out of bounds for an array of dimension {nd}")
    return <int>(a + nd if a < 0 else a)


cdef cnp.ndarray _softmax_any(object x, object axis, object out, int mode):
    cdef cnp.ndarray xa = any_float_array(x, "x")
    cdef int nd = cnp.PyArray_NDIM(xa)
    if nd == 0:
        raise ValueError("x must have at least one dimension")
    cdef int ax = norm_axis(axis, nd)
    cdef int xk = store_of(dtype_code(xa))
    cdef cnp.ndarray o
    if out is None:          # native byte order, whatever x's
        o = cnp.PyArray_EMPTY(nd, cnp.PyArray_DIMS(xa), cnp.PyArray_TYPE(xa), 0)
    else:
        o = writable(like_any(out, "out", xa, "x"), "out")
        # out=x (in place) is allowed: the same memory, element for element
        if not (cnp.PyArray_DATA(o) == cnp.PyArray_DATA(xa) and direct(xa)):
            check_disjoint([xa, o], ("x", "out"))
    xa = readable(xa)
    cdef cnp.npy_intp *dims = cnp.PyArray_DIMS(xa)
    cdef Py_ssize_t outer = 1, inner = 1, c = dims[ax], k
    for k in range(ax):
        outer *= dims[k]
    for k in range(ax + 1, nd):
        inner *= dims[k]
    cdef Job j
    cdef bint is_double = cnp.PyArray_TYPE(xa) == cnp.NPY_FLOAT64
    if outer * c * inner == 0:
        return o
    if inner != 1 and xk != NATIVE:
        # 16-bit, class axis not last: rows of a copy with that axis last
        # (16-bit copies: cheap next to the exps), written back
        np.copyto(o, np.moveaxis(_softmax_any(np.ascontiguousarray(np.moveaxis(xa, ax, -1)),
                                              -1, None, mode), -1, ax))
        return o
    if inner == 1:
        j.mode = mode
        j.is_double = is_double
        j.xk = xk
        j.n = outer
        j.c = c
        j.nchunk = (c + CHUNK - 1) // CHUNK
        j.x = cnp.PyArray_DATA(xa)
        j.out = cnp.PyArray_DATA(o)
        j.y = NULL
        j.t = NULL
        j.w = NULL
        j.loss = NULL                        # (cross-entropy only)
        bufs = piece_buffers(&j)
        with nogil:
            run_rows(&j)
    else:
        with nogil:
            if is_double:
                run_cols(<const double *>cnp.PyArray_DATA(xa), <double *>cnp.PyArray_DATA(o),
                         outer, c, inner, mode == LOG_SOFTMAX)
            else:
                run_cols(<const float *>cnp.PyArray_DATA(xa), <float *>cnp.PyArray_DATA(o),
                         outer, c, inner, mode == LOG_SOFTMAX)
    return o


cdef object piece_buffers(Job *j):
    """Partials for the few-long-rows schedule (only rows of several chunks)."""
    j.pmax = NULL
    j.part = NULL
    if j.nchunk < 2:
        return None
    cdef cnp.ndarray b = np.empty(j.n * j.nchunk * 4, dtype=np.float64)
    j.pmax = <double *>cnp.PyArray_DATA(b)
    j.part = <Part *>(j.pmax + j.n * j.nchunk)
    return b


def log_softmax(x, axis=-1, out=None):
    """log(softmax(x)) along `axis`, computed stably in one kernel.

    ``out = (x - max) - log(sum(exp(x - max)))`` with the max and the sum
    taken along `axis` (sum accumulated in double), as
    ``torch.nn.functional.log_softmax``.

    Parameters
    ----------
    x : ndarray, float32, float64, float16 or bfloat16, at least 1-d
        Any layout and byte order (copied first when not native C-contiguous).
        16-bit x is computed in float32 (the max and the sum as for float32)
        and the output rounded to x's dtype.
    axis : int
        The class axis (default: the last).
    out : ndarray, optional
        Like `x`, C-contiguous, aligned, writeable, native byte order; may be
        `x` itself (in place), but not share memory with it otherwise.

    Returns
    -------
    ndarray
        `out`, or a new array like `x`.
    """
    return _softmax_any(x, axis, out, LOG_SOFTMAX)


def softmax(x, axis=-1, out=None):
    """softmax(x) along `axis`: ``exp(x - max) / sum(exp(x - max))``.

    As ``torch.nn.functional.softmax``; the sum is accumulated in double.
    Parameters as in `log_softmax`.
    """
    return _softmax_any(x, axis, out, SOFTMAX)


cdef void log_array(const double *x, double *out, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        out[i] = fastopt_log(x[i])


def _log(x):
    """log of every element of a float64 array with fastopt's log (a test hook)."""
    cdef cnp.ndarray xa = readable(float_array(x, "x"))
    if cnp.PyArray_TYPE(xa) != cnp.NPY_FLOAT64:
        raise TypeError("x must have dtype float64")
    cdef cnp.ndarray o = cnp.PyArray_EMPTY(cnp.PyArray_NDIM(xa), cnp.PyArray_DIMS(xa), cnp.NPY_FLOAT64, 0)
    with nogil:
        log_array(<const double *>cnp.PyArray_DATA(xa), <double *>cnp.PyArray_DATA(o), cnp.PyArray_SIZE(xa))
    return o


def _exp(x, bint nonpositive=False):
    """exp of every element with fastopt's vectorized exp (a test hook);
    `nonpositive`: the variant for x <= 0 that the kernels use."""
    cdef cnp.ndarray xa = readable(float_array(x, "x"))
    cdef cnp.ndarray o = cnp.PyArray_EMPTY(cnp.PyArray_NDIM(xa), cnp.PyArray_DIMS(xa),
                                           cnp.PyArray_TYPE(xa), 0)
    cdef Py_ssize_t n = cnp.PyArray_SIZE(xa)
    with nogil:
        if cnp.PyArray_TYPE(xa) == cnp.NPY_FLOAT64:
            exp_array(<const double *>cnp.PyArray_DATA(xa), <double *>cnp.PyArray_DATA(o), n, nonpositive)
        else:
            exp_array(<const float *>cnp.PyArray_DATA(xa), <float *>cnp.PyArray_DATA(o), n, nonpositive)
    return o


cdef Py_ssize_t first_above(const uint64_t *y, Py_ssize_t n, uint64_t limit) noexcept nogil:
    """Index of the first y[i] > limit, or -1."""
    cdef Py_ssize_t i
    for i in range(n):
        if y[i] > limit:
            return i
    return -1


cdef cnp.ndarray compute_like(object a, str name, cnp.ndarray x, str x_name, int xk,
                              bint check_shape=True):
    """A target or weight array for logits `x`: x's dtype (and shape); for
    16-bit x, float32 or x's dtype, returned as float32 (converted)."""
    cdef cnp.ndarray arr = any_float_array(a, name) if xk != NATIVE else float_array(a, name)
    cdef int code = dtype_code(arr)
    if code != dtype_code(x) and not (xk != NATIVE and code == DT_F32):
        raise TypeError(f"{name} has dtype {arr.dtype} but {x_name} has dtype {x.dtype}"
                        + (f" (float32 or {x.dtype} for {x.dtype} {x_name})" if xk != NATIVE
                           else ""))
    if check_shape and not same_shape(arr, x):
        raise ValueError(f"{name} has shape {(<object>arr).shape} but {x_name} has shape "
                         f"{(<object>x).shape}")
    return arr if xk == NATIVE else np.asarray(arr, dtype=np.float32)


cdef cnp.ndarray class_targets(cnp.ndarray t, Py_ssize_t n):
    """A private native int64 copy of class indices of any integer dtype and
    byte order.  The kernel reads only this copy, so no other thread can
    change an index between its check and its use."""
    cdef int typ = cnp.PyArray_TYPE(t)
    if not cnp.PyTypeNum_ISINTEGER(typ):
        raise TypeError(f"target of shape ({n},) must hold integer class indices, "
                        f"got dtype {t.dtype}")
    if not (cnp.PyTypeNum_ISUNSIGNED(typ) and cnp.PyArray_ITEMSIZE(t) == 8):
        return copy_as(t, cnp.NPY_INT64)       # every value fits
    # uint64: values above 2**63 - 1 would wrap to negative indices (even to
    # ignore_index); checked on the copy, which is then read as int64.
    cdef cnp.ndarray y = copy_as(t, cnp.NPY_UINT64)
    cdef const uint64_t *yp = <const uint64_t *>cnp.PyArray_DATA(y)
    cdef Py_ssize_t bad
    with nogil:
        bad = first_above(yp, n, <uint64_t>INT64_MAX)
    if bad >= 0:
        raise ValueError(f"target[{bad}] = {yp[bad]} is out of range")
    return y


def cross_entropy(logits, target, *, weight=None, ignore_index=-100, reduction="mean",
                  label_smoothing=0.0, return_grad=False, grad_out=None):
    """Cross-entropy loss of logits against class indices or probabilities,
    and optionally its gradient, in one fused kernel.

    Follows ``torch.nn.functional.cross_entropy``.  With logp = log_softmax(logits)
    and eps = `label_smoothing`, the loss of row i is::

        class index y_i:  (1-eps) * (-w[y_i] logp[i, y_i]) + eps/C * sum_c(-w[c] logp[i, c])
        probabilities:    sum_c -w[c] t'[i, c] logp[i, c],  t' = (1-eps) t + eps/C

    (w = 1 without `weight`).  'mean' divides the sum over rows by the sum of
    w[y_i] over the rows not ignored (class indices; NaN if all are ignored)
    or by N (probabilities); 'sum' adds; 'none' returns the rows' losses
    (0 for ignored rows).  The gradient is ``softmax * Q - q`` per row, where q
    is the weighted target distribution above (Q its sum), divided by the
    same denominator for 'mean'.

    Parameters
    ----------
    logits : ndarray, float32, float64, float16 or bfloat16, shape (N, C)
        Any layout and byte order (copied first when not native
        C-contiguous).  16-bit logits are computed in float32 (sums in
        double as for float32); the gradient is rounded to their dtype.
    target : ndarray
        Class indices, shape (N,), any integer dtype, byte order and layout,
        each in [0, C) or equal to `ignore_index` (they are copied, then
        checked, and only the copy is used); or class probabilities, shape
        (N, C), the dtype of `logits` (soft labels, or the one-hot Y);
        float32 or the logits' dtype for 16-bit logits.
    weight : ndarray, optional
        Class weights, shape (C,), the dtype of `logits` (float32 or the
        logits' dtype for 16-bit logits), finite and >= 0 (copied, then
        checked).
    ignore_index : int
        Rows whose class index equals it contribute nothing (class indices
        only; must be negative with probabilities, as in PyTorch).
    reduction : {'mean', 'sum', 'none'}
    label_smoothing : float in [0, 1]
    return_grad : bool
        Also return d(loss)/d(logits).
    grad_out : ndarray, optional
        Where to write the gradient (like `logits`, C-contiguous, aligned,
        writeable, native byte order, sharing no memory with `logits`,
        `target` or `weight`); requires ``return_grad=True``.

    Returns
    -------
    loss : float, or ndarray of shape (N,) for reduction='none'
        Sums are accumulated in double.
    (loss, dlogits) when `return_grad` is True.

    Notes
    -----
    A row with a NaN or +inf logit, or only -inf logits, gives NaN for that
    row.  A -inf logit (a masked class) gives a finite loss and a zero
    gradient for that class; with label smoothing the loss becomes +inf (NaN
    if that class's weight is 0), as in PyTorch.  With probability targets a
    class with t'[i, c] * w[c] = 0 adds 0 to the loss even at a -inf logit
    (PyTorch computes 0 * -inf = NaN there).
    """
    cdef cnp.ndarray x = any_float_array(logits, "logits")
    if cnp.PyArray_NDIM(x) != 2:
        raise ValueError(f"logits must have shape (N, C), got shape {(<object>x).shape}")
    cdef cnp.ndarray x_in = x
    x = readable(x)
    cdef Py_ssize_t n = cnp.PyArray_DIM(x, 0), c = cnp.PyArray_DIM(x, 1)
    cdef int xk = store_of(dtype_code(x))
    # targets and weights of 16-bit logits are used as float32
    cdef int typ = cnp.PyArray_TYPE(x) if xk == NATIVE else cnp.NPY_FLOAT32
    if not cnp.PyArray_Check(target):
        raise TypeError(f"target must be a numpy.ndarray, got {type(target).__name__}")
    cdef cnp.ndarray y = None, t = None, w = None, g = None
    cdef int tnd = cnp.PyArray_NDIM(<cnp.ndarray>target)
    if tnd == 1 and cnp.PyArray_DIM(<cnp.ndarray>target, 0) == n:
        y = class_targets(target, n)
    elif tnd == 2:
        t = readable(compute_like(target, "target", x, "logits", xk))
    else:
        raise ValueError(f"target must have shape ({n},) (class indices) or {(n, c)} "
                         f"(probabilities), got shape {(<object>target).shape}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    cdef double eps = real(label_smoothing, "label_smoothing")
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {eps!r}")
    ignore_index = integer(ignore_index, "ignore_index")
    if not -INT64_MAX - 1 <= ignore_index <= INT64_MAX:
        raise ValueError(f"ignore_index must fit in int64, got {ignore_index}")
    if t is not None and ignore_index >= 0:
        raise ValueError("ignore_index is not supported with probability targets "
                         f"(got ignore_index={ignore_index})")
    if weight is not None:
        w = any_float_array(weight, "weight")
        if cnp.PyArray_NDIM(w) != 1 or cnp.PyArray_DIM(w, 0) != c:
            raise ValueError(f"weight must have shape ({c},), got shape {(<object>w).shape}")
        w = compute_like(w, "weight", x, "logits", xk, False)
    if grad_out is not None:
        if not return_grad:
            raise ValueError("grad_out requires return_grad=True")
        g = writable(like_any(grad_out, "grad_out", x, "logits"), "grad_out")
        check_disjoint([x_in, target, weight, g], ("logits", "target", "weight", "grad_out"), 3)
    if w is not None:
        # A private copy (C values: cheap), checked and then read only by us.
        w = copy_as(w, typ)
        if not np.all(w >= 0) or not np.all(np.isfinite(w)):
            raise ValueError("weight must be finite and >= 0")
    cdef Job j
    j.mode = XENT
    j.is_double = typ == cnp.NPY_FLOAT64
    j.xk = xk
    j.n = n
    j.c = c
    j.nchunk = (c + CHUNK - 1) // CHUNK
    j.x = cnp.PyArray_DATA(x)
    j.y = <const int64_t *>cnp.PyArray_DATA(y) if y is not None else NULL
    j.t = cnp.PyArray_DATA(t) if t is not None else NULL
    j.w = cnp.PyArray_DATA(w) if w is not None else NULL
    j.ignore = ignore_index
    j.eps = eps
    cdef double denom = <double>n
    cdef Py_ssize_t bad = -1
    if y is not None:
        with nogil:
            if j.is_double:
                bad = check_classes(j.y, n, c, j.ignore, <const double *>j.w, &denom)
            else:
                bad = check_classes(j.y, n, c, j.ignore, <const float *>j.w, &denom)
        if bad >= 0:
            raise ValueError(f"target[{bad}] = {j.y[bad]} is out of range: class indices "
                             f"must be in [0, {c}) or equal ignore_index ({ignore_index})")
    j.wsum = float(np.sum(w, dtype=np.float64)) if w is not None else <double>c
    j.scale = 1.0 / denom if reduction == "mean" else 1.0
    if return_grad and g is None:
        g = np.empty((<object>x).shape, x.dtype)
    j.out = cnp.PyArray_DATA(g) if g is not None else NULL
    cdef cnp.ndarray rows = cnp.PyArray_EMPTY(1, [n], cnp.NPY_FLOAT64, 0)
    j.loss = <double *>cnp.PyArray_DATA(rows)
    bufs = piece_buffers(&j)
    cdef double total = 0.0
    if n > 0 and c > 0:
        with nogil:
            run_rows(&j)
    elif n > 0:
        rows[:] = 0.0                       # no classes: an empty sum (as PyTorch)
    if reduction == "none":
        loss = rows.astype(x.dtype)
    else:
        total = ordered_sum(j.loss, n)
        if reduction == "mean":
            total = total / denom
        loss = total
    if return_grad:
        return loss, g
    return loss
