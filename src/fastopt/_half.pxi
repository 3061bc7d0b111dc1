# 16-bit storage for the kernels (included by _core.pyx, after _core_common.pxi).
#
# A kernel loop reads and writes its arrays through `ld`/`st`, which take a
# storage *tag*: an empty struct type that selects, at compile time, how the
# array is stored.  Loops take their tags as fused-type arguments (passed as
# NULL pointers), so Cython writes one C function per combination that is
# used, each a plain loop with the conversions inlined, which gcc
# vectorizes; the formulas exist once.  (Storage codes passed as constant
# ints instead rely on gcc inlining every loop into every call site, which
# it stops doing when there are many.)  Pointers keep the loop's own type
# (`floating *`); for 16-bit storage they point at uint16 bits and are
# reinterpreted here.  The conversions themselves are in _half.h, the one
# place that converts.
from libc.stdint cimport uint16_t, uint32_t

cdef extern from "_half.h" nogil:
    float fastopt_f16_to_f32(uint16_t h)
    uint16_t fastopt_f32_to_f16(float f)
    float fastopt_bf16_to_f32(uint16_t h)
    uint16_t fastopt_f32_to_bf16(float f)
    uint16_t fastopt_f32_to_bf16_sr(float f, uint32_t rnd)
    uint32_t fastopt_hash32(uint32_t x)
    void fastopt_flag_set(unsigned char *flag)
    # n values at once (F16C where the level has it: the same bits)
    void fastopt_f16_to_f32_n(const uint16_t *src, float *dst, Py_ssize_t n)
    void fastopt_f32_to_f16_n(const float *src, uint16_t *dst, Py_ssize_t n)
    void fastopt_bf16_to_f32_n(const uint16_t *src, float *dst, Py_ssize_t n)
    void fastopt_f32_to_bf16_n(const float *src, uint16_t *dst, Py_ssize_t n)


# Storage codes at run time: `Store` (_core.pxd).  The same, as compile-time tags:
ctypedef struct AsOwn:
    char unused
ctypedef struct AsF16:
    char unused
ctypedef struct AsBF16:
    char unused
ctypedef struct AsBF16SR:
    char unused

ctypedef fused Storage:
    AsOwn
    AsF16
    AsBF16
    AsBF16SR

# The storages of arrays that are only read, or written rounded to nearest
# (BatchNorm, softmax, gradient clipping and unscaling): kernels over these
# exist without a stochastic-rounding variant that nothing would call.
ctypedef fused NearStorage:
    AsOwn
    AsF16
    AsBF16


cdef inline floating ld(const floating *a, Py_ssize_t i, Storage *tag) noexcept nogil:
    """a[i] as the loop's type."""
    if Storage is AsF16:
        return <floating>fastopt_f16_to_f32((<const uint16_t *>a)[i])
    elif Storage is AsBF16 or Storage is AsBF16SR:
        return <floating>fastopt_bf16_to_f32((<const uint16_t *>a)[i])
    else:
        return a[i]


cdef inline void st(floating *a, Py_ssize_t i, floating x, Storage *tag,
                    uint32_t rnd) noexcept nogil:
    """a[i] = x, rounded to the storage; AsBF16SR rounds stochastically with
    the high 16 bits of `rnd` (see `draw`)."""
    if Storage is AsF16:
        (<uint16_t *>a)[i] = fastopt_f32_to_f16(<float>x)
    elif Storage is AsBF16:
        (<uint16_t *>a)[i] = fastopt_f32_to_bf16(<float>x)
    elif Storage is AsBF16SR:
        (<uint16_t *>a)[i] = fastopt_f32_to_bf16_sr(<float>x, rnd)
    else:
        a[i] = x


cdef inline uint32_t draw(Storage *tag, uint32_t key, Py_ssize_t i) noexcept nogil:
    """The random bits of element i for stochastic rounding: the counter-based
    generator hash32(key + i) (mod 2**32); 0 for the other storages."""
    if Storage is AsBF16SR:
        return fastopt_hash32(key + <uint32_t>i)
    else:
        return 0


cdef inline void widen_n(const uint16_t *h, float *f, Py_ssize_t n, int code) noexcept nogil:
    """f[0:n] = h[0:n] as float32 (code F16 or BF16)."""
    if code == F16:
        fastopt_f16_to_f32_n(h, f, n)
    else:
        fastopt_bf16_to_f32_n(h, f, n)


cdef inline void narrow_n(const float *f, uint16_t *h, Py_ssize_t n, int code) noexcept nogil:
    """h[0:n] = f[0:n] rounded to nearest even (code F16 or BF16)."""
    if code == F16:
        fastopt_f32_to_f16_n(f, h, n)
    else:
        fastopt_f32_to_bf16_n(f, h, n)
