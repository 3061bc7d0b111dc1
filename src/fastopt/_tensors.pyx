# Tensors of other libraries read in C (DLPack's C exchange API).
#
# `fastopt.torch` reads the `.grad` of every parameter at every optimizer
# step.  Through Python attributes that is one call per value (data_ptr(),
# dtype, shape, stride(), device, ...), each 0.1 us or more, several per
# tensor.  DLPack >= 1.3 lets a tensor type publish C function pointers
# (`type(t).__dlpack_c_exchange_api__`, a capsule "dlpack_exchange_api");
# `dltensor_from_py_object_no_sync` fills a caller-owned `DLTensor` (data
# pointer, device, dtype, shape, strides) in one C call, without allocating
# and without taking a reference.  The struct layouts below are DLPack's
# stable ABI (dlpack.h, major version 1).
#
# `GradReader` holds a fixed list of parameter tensors, what each one's data
# looked like when it was checked (address, dtype, shape, strides), and one
# address per parameter for `FusedStep.step_addresses`.  Its `read` visits
# every parameter in one C loop: the parameter itself (has its data moved?),
# its `.grad` (None skips it), and the gradient's device, dtype, shape and
# strides against the parameter's.  Errors name the parameter.  Where the
# tensor type has no exchange API (older PyTorch), the same checks read
# Python attributes instead: slower, same results.
#
# What DLPack does not carry is checked separately: PyTorch's "negative bit"
# (a lazily negated view such as `z.conj().imag`, whose memory holds -value),
# one `is_neg()` call per gradient.  Such a gradient, or one laid out unlike
# its parameter, is reported for the caller to copy into the parameter's
# layout.  Nor does DLPack say whether the tensor's storage still holds its
# elements (``g.untyped_storage().resize_(0)`` frees the memory under a live
# tensor; torch's own kernels then read out of bounds): the storage's size
# (``len(storage)``, no Python frame) is compared with
# ``(storage_offset + last index + 1) * itemsize``, three C-level calls per
# gradient.  Parameters are checked so when the reader is made: resizing a
# storage always moves its data, which `read` reports (`moved`) for the
# caller to make a new reader.
#
# `read` returns the gradient objects it read, and the caller keeps that list
# until the native step has finished: the step runs without the GIL, and
# another thread replacing ``p.grad`` must not free a gradient under it.
#
# Nothing is cached between steps: every gradient is checked at
# every read.  (Remembering checked gradient objects through weak references
# saved 0.1 us per kept gradient but cost 0.15 us per new one, and new ones
# are the default: zero_grad(set_to_none=True).)
cimport cython
cimport numpy as cnp
from cpython.pycapsule cimport PyCapsule_GetPointer, PyCapsule_IsValid
from cpython.mem cimport PyMem_Malloc, PyMem_Free
from cpython.exc cimport PyErr_Clear
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t, uintptr_t

cnp.import_array()

cdef extern from *:
    """
    /* DLPack 1.x ABI (dlpack.h): only the members fastopt reads are named. */
    typedef struct { int32_t device_type; int32_t device_id; } fo_DLDevice;
    typedef struct { uint8_t code; uint8_t bits; uint16_t lanes; } fo_DLDataType;
    typedef struct {
        void *data; fo_DLDevice device; int32_t ndim; fo_DLDataType dtype;
        int64_t *shape; int64_t *strides; uint64_t byte_offset;
    } fo_DLTensor;
    typedef struct { uint32_t major; uint32_t minor; } fo_DLPackVersion;
    typedef struct fo_DLPackExchangeAPIHeader {
        fo_DLPackVersion version; struct fo_DLPackExchangeAPIHeader *prev_api;
    } fo_DLPackExchangeAPIHeader;
    typedef struct {
        fo_DLPackExchangeAPIHeader header;
        void *managed_tensor_allocator;
        void *managed_tensor_from_py_object_no_sync;
        void *managed_tensor_to_py_object_no_sync;
        int (*dltensor_from_py_object_no_sync)(void *py_object, fo_DLTensor *out);
        void *current_work_stream;
    } fo_DLPackExchangeAPI;
    """
    ctypedef struct fo_DLDevice:
        int32_t device_type
        int32_t device_id
    ctypedef struct fo_DLDataType:
        uint8_t code
        uint8_t bits
        uint16_t lanes
    ctypedef struct fo_DLTensor:
        void *data
        fo_DLDevice device
        int32_t ndim
        fo_DLDataType dtype
        int64_t *shape
        int64_t *strides
        uint64_t byte_offset
    ctypedef struct fo_DLPackVersion:
        uint32_t major
        uint32_t minor
    ctypedef struct fo_DLPackExchangeAPIHeader:
        fo_DLPackVersion version
    ctypedef struct fo_DLPackExchangeAPI:
        fo_DLPackExchangeAPIHeader header
        # 0, or -1 with a Python exception set
        int (*dltensor_from_py_object_no_sync)(void *py_object, fo_DLTensor *out) noexcept

DEF kDLCPU = 1
DEF kDLFloat = 2
DEF kDLBfloat = 4
DEF MAX_NDIM = 64          # the Python fallback's shape/stride scratch


cdef const fo_DLPackExchangeAPI *exchange_api(object tensor_type) except? NULL:
    """The type's DLPack C exchange API, or NULL if it has none we can use."""
    cap = getattr(tensor_type, "__dlpack_c_exchange_api__", None)
    if cap is None or not PyCapsule_IsValid(cap, b"dlpack_exchange_api"):
        return NULL
    cdef const fo_DLPackExchangeAPI *api = \
        <const fo_DLPackExchangeAPI *>PyCapsule_GetPointer(cap, b"dlpack_exchange_api")
    if api.header.version.major != 1 or api.dltensor_from_py_object_no_sync == NULL:
        return NULL
    return api


def has_exchange_api(tensor_type):
    """Whether `tensor_type` publishes a DLPack C exchange API fastopt can use."""
    return exchange_api(tensor_type) != NULL


# The Python fallback's dtypes: (DLPack type code, bits).
cdef dict _DTYPES = {"torch.float32": (kDLFloat, 32), "torch.float64": (kDLFloat, 64),
                     "torch.float16": (kDLFloat, 16), "torch.bfloat16": (kDLBfloat, 16)}


ctypedef struct Layout:         # a parameter's data as checked at construction
    uintptr_t data
    int32_t ndim
    uint8_t code                # kDLFloat or kDLBfloat
    uint8_t bits                # 16, 32 or 64
    int64_t *shape              # into GradReader.dims
    int64_t *strides
    bint empty                  # no elements


@cython.auto_pickle(False)
cdef class GradReader:
    """The gradients of a fixed list of CPU tensors, for one optimizer step.

    Parameters
    ----------
    params : list
        The parameter tensors (float32/float64/float16/bfloat16, CPU, dense; checked by the
        caller), each at most once.  Each must lie within its storage
        (ValueError naming it otherwise).
    names : list of str
        How errors name each parameter ("param_groups[0]['params'][3]").
    tensor_type : type
        The library's tensor class, for its DLPack C exchange API.
    use_api : bool
        False reads Python attributes even where the API exists (tests).
    """
    cdef readonly list params
    cdef readonly tuple all_params      # returned when every parameter has a grad
    cdef list names
    cdef readonly Py_ssize_t n
    cdef const fo_DLPackExchangeAPI *api
    cdef Layout *lay
    cdef bint *has_grad
    cdef bint *seen
    cdef readonly list relayout, moved, fresh     # set by `read`
    cdef int64_t *dims
    cdef int64_t[2 * MAX_NDIM] scratch
    cdef readonly cnp.ndarray addr      # np.uintp, one per parameter (0: no grad)
    cdef uintptr_t *av
    cdef object tensor_type
    cdef object is_neg              # the unbound method (no bound-method object per call)
    cdef object untyped_storage     # the same, for the storage check
    cdef object storage_offset

    def __cinit__(self):
        self.lay = NULL
        self.has_grad = NULL
        self.seen = NULL
        self.dims = NULL

    def __dealloc__(self):
        PyMem_Free(self.lay)
        PyMem_Free(self.has_grad)
        PyMem_Free(self.seen)
        PyMem_Free(self.dims)

    def __init__(self, list params, list names, tensor_type, bint use_api=True):
        if self.lay != NULL:
            raise RuntimeError("GradReader is already initialized")
        cdef Py_ssize_t n = len(params), i, k, total = 0
        if len(names) != n:
            raise ValueError("names must have one entry per parameter")
        self.api = exchange_api(tensor_type) if use_api else NULL
        self.tensor_type = tensor_type
        self.is_neg = getattr(tensor_type, "is_neg", None) or (lambda t: t.is_neg())
        self.untyped_storage = getattr(tensor_type, "untyped_storage", None) or \
            (lambda t: t.storage().untyped())
        self.storage_offset = getattr(tensor_type, "storage_offset", None) or \
            (lambda t: t.storage_offset())
        self.params = list(params)
        self.all_params = tuple(params)
        self.names = list(names)
        self.n = n
        cdef fo_DLTensor t
        cdef list described = []
        for i in range(n):
            self.describe(params[i], &t, i, False)
            for k in range(t.ndim):
                if t.shape[k] == 0:
                    break
            else:
                self.check_storage(params[i], &t, i, False)
            described.append((<uintptr_t>t.data, t.ndim, t.dtype.code, t.dtype.bits,
                              [t.shape[k] for k in range(t.ndim)],
                              [t.strides[k] for k in range(t.ndim)]))
            total += t.ndim
        self.lay = <Layout *>PyMem_Malloc(max(n, 1) * sizeof(Layout))
        self.has_grad = <bint *>PyMem_Malloc(max(n, 1) * sizeof(bint))
        self.seen = <bint *>PyMem_Malloc(max(n, 1) * sizeof(bint))
        self.dims = <int64_t *>PyMem_Malloc(max(2 * total, 1) * sizeof(int64_t))
        if self.lay == NULL or self.has_grad == NULL or self.seen == NULL or self.dims == NULL:
            raise MemoryError()
        for i in range(n):
            self.has_grad[i] = self.seen[i] = False
        cdef Py_ssize_t off = 0, ndim
        cdef Layout *L
        for i in range(n):
            data, ndim, code, bits, shape, strides = described[i]
            L = &self.lay[i]
            L.data = data
            L.ndim = ndim
            L.code = code
            L.bits = bits
            L.shape = self.dims + off
            L.strides = self.dims + off + ndim
            L.empty = False
            for k in range(ndim):
                L.shape[k] = shape[k]
                L.strides[k] = strides[k]
                if shape[k] == 0:
                    L.empty = True
            off += 2 * ndim
        cdef cnp.npy_intp nn = n
        self.addr = <cnp.ndarray>cnp.PyArray_ZEROS(1, &nn, cnp.NPY_UINTP, 0)
        self.av = <uintptr_t *>cnp.PyArray_DATA(self.addr)

    @property
    def uses_exchange_api(self):
        return self.api != NULL

    # ------------------------------------------------------------ describe

    cdef int describe(self, object t, fo_DLTensor *out, Py_ssize_t i, bint is_grad) except -1:
        """Fill `out` for tensor `t` (parameter i, or its gradient): a float32,
        float64, float16 or bfloat16 CPU tensor with strides, else an error
        naming it."""
        if self.api != NULL:
            if self.api.dltensor_from_py_object_no_sync(<void *>t, out) != 0:
                PyErr_Clear()       # the library's message is replaced by one naming the tensor
                self.unreadable(t, i, is_grad)
        else:
            self.describe_py(t, out, i, is_grad)
        if (out.device.device_type != kDLCPU or out.dtype.lanes != 1 or out.byte_offset != 0
                or not ((out.dtype.code == kDLFloat and (out.dtype.bits == 16
                                                          or out.dtype.bits == 32
                                                          or out.dtype.bits == 64))
                        or (out.dtype.code == kDLBfloat and out.dtype.bits == 16))):
            self.unsupported(t, out, i, is_grad)
        return 0

    cdef str what(self, Py_ssize_t i, bint is_grad):
        return f"the gradient of {self.names[i]}" if is_grad else self.names[i]

    cdef int unreadable(self, object t, Py_ssize_t i, bint is_grad) except -1:
        if not isinstance(t, self.tensor_type):
            raise TypeError(f"{self.what(i, is_grad)} must be a tensor, got {type(t).__name__}")
        layout = getattr(t, "layout", None)
        if layout is not None and str(layout) != "torch.strided":
            raise TypeError(f"{self.what(i, is_grad)} is a {layout} tensor; fastopt.torch "
                            "takes dense (strided) tensors only")
        raise TypeError(f"{self.what(i, is_grad)} cannot be read as a dense CPU tensor "
                        "through DLPack")

    cdef int unsupported(self, object t, const fo_DLTensor *out, Py_ssize_t i,
                         bint is_grad) except -1:
        if out.device.device_type != kDLCPU:
            raise TypeError(f"{self.what(i, is_grad)} is on {t.device}; fastopt.torch works "
                            "on CPU tensors only")
        if out.byte_offset != 0:
            raise ValueError(f"{self.what(i, is_grad)}: a DLPack byte_offset is not supported")
        raise TypeError(f"{self.what(i, is_grad)} has dtype {t.dtype}; fastopt.torch takes "
                        "float32, float64, float16 and bfloat16 tensors")

    cdef int describe_py(self, object t, fo_DLTensor *out, Py_ssize_t i, bint is_grad) except -1:
        """`describe` without the exchange API: the same fields from Python."""
        if not isinstance(t, self.tensor_type):
            raise TypeError(f"{self.what(i, is_grad)} must be a tensor, got {type(t).__name__}")
        if str(t.layout) != "torch.strided":
            raise TypeError(f"{self.what(i, is_grad)} is a {t.layout} tensor; fastopt.torch "
                            "takes dense (strided) tensors only")
        shape = tuple(t.shape)
        strides = t.stride()
        cdef int nd = len(shape), k
        if nd > MAX_NDIM:
            raise ValueError(f"{self.what(i, is_grad)} has more than {MAX_NDIM} dimensions")
        for k in range(nd):
            self.scratch[k] = shape[k]
            self.scratch[MAX_NDIM + k] = strides[k]
        out.ndim = nd
        out.shape = self.scratch
        out.strides = self.scratch + MAX_NDIM
        out.byte_offset = 0
        out.device.device_type = kDLCPU if t.is_cpu else 0
        out.device.device_id = 0
        dt = str(t.dtype)
        out.dtype.code, out.dtype.bits = _DTYPES.get(dt, (255, 32))
        out.dtype.lanes = 1
        out.data = <void *><uintptr_t>t.data_ptr() if t.is_cpu else NULL
        return 0

    # ----------------------------------------------------------------- read

    def same_params(self, groups):
        """Whether the param groups still hold exactly these parameters, in order."""
        cdef Py_ssize_t k = 0, j, m
        cdef list ps
        for g in groups:
            ps = g["params"] if type(g["params"]) is list else list(g["params"])
            m = len(ps)
            if k + m > self.n:
                return False
            for j in range(m):
                if ps[j] is not self.params[k + j]:
                    return False
            k += m
        return k == self.n

    def read(self):
        """Read every parameter's gradient into `addr` (0 where it is None).

        Returns ``(updated, grads)``: the parameters that have a gradient
        (`all_params` when all do) and a new list of the gradient tensors
        read, one per parameter (None where none), which the caller must keep
        until it no longer uses `addr` (it holds the memory `addr` points
        to).  Sets:

        relayout -- indices whose gradient must first be copied into the
                    parameter's layout (other strides, a negated view, no
                    memory of its own), or None;
        moved    -- indices of parameters whose data is no longer what was
                    checked (``p.data = ...``), or None: rebuild, read again;
        fresh    -- indices of parameters with a gradient that are not yet
                    marked `seen`, or None.

        Raises TypeError/ValueError naming the parameter for a gradient that
        is not a tensor, is sparse, on another device, of another dtype or
        shape, or whose storage no longer holds all its elements.
        """
        cdef Py_ssize_t i, k, count = 0
        cdef fo_DLTensor t
        cdef Layout *L
        cdef object p, g
        cdef list grads = [None] * self.n
        self.relayout = self.moved = self.fresh = None
        for i in range(self.n):
            p = self.params[i]
            L = &self.lay[i]
            self.av[i] = 0
            self.has_grad[i] = False
            self.describe(p, &t, i, False)
            if not self.matches(&t, L, True):
                if self.moved is None:
                    self.moved = []
                self.moved.append(i)
                continue
            g = p.grad
            if g is None:
                continue
            grads[i] = g        # from here on the step holds it
            self.describe(g, &t, i, True)
            if t.dtype.bits != L.bits or t.dtype.code != L.code:
                raise TypeError(f"the gradient of {self.names[i]} has dtype {g.dtype} but "
                                f"the parameter has dtype {p.dtype}")
            if t.ndim != L.ndim:
                self.shape_error(g, p, i)
            for k in range(L.ndim):
                if t.shape[k] != L.shape[k]:
                    self.shape_error(g, p, i)
            if not L.empty:
                self.check_storage(g, &t, i, True)
            if self.matches(&t, L, False) and (t.data != NULL or L.empty) and not self.is_neg(g):
                self.av[i] = <uintptr_t>t.data if not L.empty else 1
            else:
                if self.relayout is None:
                    self.relayout = []
                self.relayout.append(i)
            if not self.seen[i]:
                if self.fresh is None:
                    self.fresh = []
                self.fresh.append(i)
            self.has_grad[i] = True
            count += 1
        if self.moved is not None:
            for i in range(self.n):
                self.av[i] = 0
            self.relayout = self.fresh = None
            return (), grads
        if count == self.n:
            return self.all_params, grads
        return [self.params[i] for i in range(self.n) if self.has_grad[i]], grads

    cdef int check_storage(self, object t, const fo_DLTensor *d, Py_ssize_t i,
                           bint is_grad) except -1:
        """Tensor `t` (described by `d`, at least one element) lies within its
        storage: ``(storage_offset + last index + 1) * itemsize <= nbytes``."""
        cdef int64_t last = 0, offset, need
        cdef Py_ssize_t nbytes
        cdef int k
        for k in range(d.ndim):
            last += (d.shape[k] - 1) * d.strides[k]
        storage = self.untyped_storage(t)
        nbytes = len(storage)           # bytes, through the C length slot
        offset = self.storage_offset(t)
        need = (offset + last + 1) * (d.dtype.bits // 8)
        if nbytes < need or offset < 0 or last < 0:
            raise ValueError(
                f"{self.what(i, is_grad)} needs {need} bytes of storage (storage offset "
                f"{offset}, shape {tuple(t.shape)}, strides {tuple(t.stride())}) but its "
                f"storage holds {nbytes} (was the storage resized?)")
        return 0

    def is_seen(self, Py_ssize_t i):
        """Whether parameter i is marked `seen`."""
        if not 0 <= i < self.n:
            raise IndexError(i)
        return bool(self.seen[i])

    def mark_unseen(self, indices):
        """Parameters whose optimizer state was reset (`read` lists them in `fresh` again)."""
        for i in indices:
            if not 0 <= i < self.n:
                raise IndexError(i)
            self.seen[<Py_ssize_t>i] = False

    def mark_seen(self, indices):
        """Parameters that have optimizer state (`read` leaves them out of `fresh`)."""
        for i in indices:
            if not 0 <= i < self.n:
                raise IndexError(i)
            self.seen[<Py_ssize_t>i] = True

    cdef bint matches(self, const fo_DLTensor *t, const Layout *L, bint check_data) noexcept:
        """Same shape, dtype and memory layout as `L` (strides of size-1 dims
        do not matter; nor any stride of an empty tensor)."""
        cdef int k
        if t.ndim != L.ndim or t.dtype.bits != L.bits or t.dtype.code != L.code:
            return False
        if check_data and <uintptr_t>t.data != L.data and not L.empty:
            return False
        for k in range(L.ndim):
            if t.shape[k] != L.shape[k]:
                return False
        if L.empty:
            return True
        for k in range(L.ndim):
            if L.shape[k] != 1 and t.strides[k] != L.strides[k]:
                return False
        return True

    cdef int shape_error(self, object g, object p, Py_ssize_t i) except -1:
        raise ValueError(f"the gradient of {self.names[i]} has shape {tuple(g.shape)} but "
                         f"the parameter has shape {tuple(p.shape)}")

    def set_address(self, Py_ssize_t i, uintptr_t address):
        """Point parameter i's entry at a gradient the caller laid out itself."""
        if not 0 <= i < self.n:
            raise IndexError(i)
        self.av[i] = address if address != 0 or not self.lay[i].empty else 1


def clear_grads(groups):
    """``p.grad = None`` for every parameter of the param groups: torch's
    ``zero_grad(set_to_none=True)`` as one C loop."""
    cdef object p
    for g in groups:
        for p in g["params"]:
            if p.grad is not None:
                p.grad = None
