"""Bad input to the optimizer kernels: every case raises TypeError/ValueError
naming the argument, before anything is written (every array is unchanged)."""
import numpy as np
import pytest

import fastopt
from conftest import Snapshot

N = 12


class Kernel:
    """A kernel with a valid call: `positional` arrays, keyword `optional`
    arrays, and options that make every array required."""

    def __init__(self, fn, positional, optional, options):
        self.fn, self.positional, self.optional, self.options = fn, positional, optional, options

    @property
    def arrays(self):
        return self.positional + self.optional

    @property
    def in_place(self):
        return [a for a in self.arrays if a != "grad"]

    def valid(self, dtype=np.float32, shape=(N,)):
        rng = np.random.default_rng(0)
        return {a: np.abs(rng.standard_normal(shape)).astype(dtype) for a in self.arrays}

    def call(self, arrays, **options):
        kw = dict(self.options, **options)
        kw.update({a: arrays[a] for a in self.optional if a in arrays})
        self.fn(*(arrays[a] for a in self.positional), **kw)


KERNELS = {
    "adam": Kernel(fastopt.adam_step, ["param", "grad", "exp_avg", "exp_avg_sq"],
                   ["max_exp_avg_sq"], dict(step=3, amsgrad=True)),
    "adamw": Kernel(fastopt.adamw_step, ["param", "grad", "exp_avg", "exp_avg_sq"],
                    ["max_exp_avg_sq"], dict(step=3, amsgrad=True)),
    "rmsprop": Kernel(fastopt.rmsprop_step, ["param", "grad", "square_avg"],
                      ["momentum_buffer", "grad_avg"], dict(momentum=0.9, centered=True)),
    "sgd": Kernel(fastopt.sgd_step, ["param", "grad", "momentum_buffer"], [],
                  dict(lr=0.1, momentum=0.9)),
}
ARRAY_CASES = [(k, a) for k, kern in KERNELS.items() for a in kern.arrays]
IN_PLACE_CASES = [(k, a) for k, kern in KERNELS.items() for a in kern.in_place]


def ident(x):
    return "-".join(map(str, x)) if isinstance(x, tuple) else str(x)


def rejects(kernel, arrays, exc, match, *keep_alive, **options):
    """The call raises `exc` matching `match` and leaves every array (and any
    buffer in `keep_alive` that they view) unchanged."""
    snap = Snapshot(*arrays.values(), *keep_alive)
    with pytest.raises(exc, match=match):
        kernel.call(arrays, **options)
    snap.assert_unchanged()


def named(arg):
    r"""The message starts with the argument's name (exp_avg must not match exp_avg_sq)."""
    return rf"^{arg}\b(?!_)"


# --------------------------------------------------------------- arrays ---

@pytest.mark.parametrize("bad_dtype", [np.int32, np.int64, np.complex64, np.complex128,
                                       np.float16, np.bool_, object])
@pytest.mark.parametrize("kernel,arg", ARRAY_CASES, ids=ident)
def test_non_float_dtype(kernel, arg, bad_dtype):
    if arg == "param" and bad_dtype is np.float16:
        pytest.skip("float16 params are valid, with a float32 master (tests/test_lowprec.py)")
    k = KERNELS[kernel]
    arrays = k.valid()
    arrays[arg] = arrays[arg].astype(bad_dtype)
    rejects(k, arrays, TypeError, named(arg))


@pytest.mark.parametrize("kernel,arg", [c for c in ARRAY_CASES if c[1] != "param"], ids=ident)
@pytest.mark.parametrize("dtypes", [(np.float32, np.float64), (np.float64, np.float32)],
                         ids=["f32-f64", "f64-f32"])
def test_dtype_mismatch(kernel, arg, dtypes):
    k = KERNELS[kernel]
    arrays = k.valid(dtypes[0])
    arrays[arg] = arrays[arg].astype(dtypes[1])
    rejects(k, arrays, TypeError, named(arg) + r".*param")


@pytest.mark.parametrize("kernel,arg", [c for c in ARRAY_CASES if c[1] != "param"], ids=ident)
@pytest.mark.parametrize("shape", [(N + 1,), (N - 1,), (N, 1), (1, N), (), (3, 4)])
def test_shape_mismatch(kernel, arg, shape):
    k = KERNELS[kernel]
    arrays = k.valid()
    arrays[arg] = np.zeros(shape, np.float32)
    rejects(k, arrays, ValueError, named(arg) + r".*shape")


@pytest.mark.parametrize("bad", [[1.0] * N, (1.0,) * N, 1.0, None, "abc"], ids=repr)
@pytest.mark.parametrize("kernel,arg",
                         [(k, a) for k, kern in KERNELS.items() for a in kern.positional],
                         ids=ident)
def test_not_an_ndarray(kernel, arg, bad):
    """No silent conversion of lists (an update of a hidden copy would be lost)."""
    k = KERNELS[kernel]
    arrays = k.valid()
    arrays[arg] = bad
    if bad is None and arg == "momentum_buffer":     # sgd: optional, but momentum > 0
        rejects(k, arrays, ValueError, "momentum_buffer")
    else:
        rejects(k, arrays, TypeError, named(arg))


@pytest.mark.parametrize("kernel,arg", [(k, a) for k, kern in KERNELS.items()
                                        for a in kern.optional], ids=ident)
def test_optional_state_not_an_ndarray(kernel, arg):
    k = KERNELS[kernel]
    arrays = k.valid()
    arrays[arg] = [0.0] * N
    rejects(k, arrays, TypeError, named(arg))


@pytest.mark.parametrize("kernel,arg", IN_PLACE_CASES, ids=ident)
def test_in_place_array_not_contiguous(kernel, arg):
    k = KERNELS[kernel]
    arrays = k.valid()
    base = np.zeros(2 * N, np.float32)
    arrays[arg] = base[::2]
    rejects(k, arrays, ValueError, named(arg) + r".*contiguous", base)


@pytest.mark.parametrize("kernel,arg", IN_PLACE_CASES, ids=ident)
def test_in_place_array_fortran_order(kernel, arg):
    k = KERNELS[kernel]
    arrays = k.valid(shape=(3, 4))
    arrays[arg] = np.asfortranarray(arrays[arg])
    rejects(k, arrays, ValueError, named(arg) + r".*contiguous")


@pytest.mark.parametrize("kernel,arg", IN_PLACE_CASES, ids=ident)
def test_in_place_array_read_only(kernel, arg):
    k = KERNELS[kernel]
    arrays = k.valid()
    arrays[arg].flags.writeable = False
    rejects(k, arrays, ValueError, named(arg) + r".*read-only")


@pytest.mark.parametrize("kernel,arg", IN_PLACE_CASES, ids=ident)
def test_in_place_array_misaligned(kernel, arg):
    k = KERNELS[kernel]
    arrays = k.valid()
    raw = np.zeros(4 * N + 1, np.uint8)
    arrays[arg] = raw[1:].view(np.float32)
    assert not arrays[arg].flags.aligned
    rejects(k, arrays, ValueError, named(arg) + r".*aligned", raw)


def overlap_cases():
    for name, k in KERNELS.items():
        order = k.positional[:2] + [a for a in k.arrays if a not in k.positional[:2]]
        for i, a in enumerate(order):
            for b in order[i + 1:]:
                yield name, a, b


@pytest.mark.parametrize("how", ["same", "partial"])
@pytest.mark.parametrize("kernel,first,second", list(overlap_cases()), ids=ident)
def test_overlapping_arrays(kernel, first, second, how):
    """State arrays may not share memory with each other, param or grad."""
    k = KERNELS[kernel]
    arrays = k.valid()
    base = np.arange(2 * N, dtype=np.float32)
    if how == "same":
        arrays[first] = arrays[second] = base[:N]
    else:                               # one element in common
        arrays[first], arrays[second] = base[:N], base[N - 1:2 * N - 1]
    rejects(k, arrays, ValueError, rf"{first} and {second} overlap", base)


@pytest.mark.parametrize("kernel", KERNELS)
def test_adjacent_views_of_one_buffer_are_fine(kernel):
    """Disjoint views of one buffer are not an overlap (a flat parameter store)."""
    k = KERNELS[kernel]
    rng = np.random.default_rng(1)
    base = np.abs(rng.standard_normal(len(k.arrays) * N))
    views = {a: base[i * N:(i + 1) * N] for i, a in enumerate(k.arrays)}
    copies = {a: v.copy() for a, v in views.items()}
    before = views["param"].copy()
    k.call(views)
    k.call(copies)
    for a in k.arrays:
        np.testing.assert_array_equal(views[a], copies[a])
    assert not np.array_equal(views["param"], before)     # it did update


# --------------------------------------------------- grad is read only ---

def grad_variants(grad):
    """Ways to pass the same gradient values in a layout the kernels must copy."""
    strided = np.zeros(2 * grad.size, grad.dtype)
    strided[::2] = grad.ravel()
    readonly = grad.copy()
    readonly.flags.writeable = False
    raw = np.zeros(grad.nbytes + 1, np.uint8)
    misaligned = raw[1:].view(grad.dtype).reshape(grad.shape)
    misaligned[...] = grad
    return {"strided": strided[::2].reshape(grad.shape), "reversed": grad[::-1].copy()[::-1],
            "read-only": readonly, "misaligned": misaligned,
            "fortran": np.asfortranarray(grad.reshape(4, -1)).reshape(4, -1)}


@pytest.mark.parametrize("variant", ["strided", "reversed", "read-only", "misaligned",
                                     "fortran"])
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_any_grad_layout_gives_the_same_result(kernel, variant, dtype):
    k = KERNELS[kernel]
    shape = (4, N // 4) if variant == "fortran" else (N,)
    arrays = k.valid(dtype, shape)
    grad = grad_variants(arrays["grad"])[variant]
    assert variant == "read-only" or not grad.flags.c_contiguous or not grad.flags.aligned
    np.testing.assert_array_equal(grad, arrays["grad"])
    expected = {a: v.copy() for a, v in arrays.items()}
    k.call(expected)
    arrays["grad"] = grad
    snap = Snapshot(grad)
    k.call(arrays)
    snap.assert_unchanged()
    for a in k.in_place:
        np.testing.assert_array_equal(arrays[a], expected[a], err_msg=a)


# -------------------------------------------------------------- scalars ---

NON_FINITE = [np.nan, np.inf, -np.inf]
NOT_A_NUMBER = ["0.1", b"0.1", None, 1j, [0.1], object()]


def scalar_cases():
    """(kernel, option, bad value, exception, message pattern)."""
    for kernel in ("adam", "adamw"):
        for v in (0, -1, np.int64(0)):
            yield kernel, "step", v, ValueError, r"^step\b"
        for v in (1.0, 2.5, True, "1", None, np.float64(2.0)):
            yield kernel, "step", v, TypeError, r"^step\b"
        for v in [(1.0, 0.999), (-0.1, 0.999), (np.nan, 0.999), (np.inf, 0.999)]:
            yield kernel, "betas", v, ValueError, r"^betas\[0\]"
        for v in [(0.9, 1.0), (0.9, -1e-3), (0.9, np.nan), (0.9, 2.0)]:
            yield kernel, "betas", v, ValueError, r"^betas\[1\]"
        for v in [0.9, (0.9,), (0.9, 0.99, 0.999), None]:
            yield kernel, "betas", v, TypeError, r"^betas\b"
        yield kernel, "betas", ("a", 0.9), TypeError, r"^betas\[0\]"
        yield kernel, "betas", (0.9, None), TypeError, r"^betas\[1\]"
    for kernel in KERNELS:
        options = ["lr", "weight_decay"] + (["eps"] if kernel != "sgd" else [])
        for opt in options:
            for v in [-1e-3, -np.inf] + NON_FINITE:
                yield kernel, opt, v, ValueError, rf"^{opt}\b"
            for v in NOT_A_NUMBER:
                yield kernel, opt, v, TypeError, rf"^{opt}\b"
    for v in [1.0, 1.5, -0.1] + NON_FINITE:
        yield "rmsprop", "alpha", v, ValueError, r"^alpha\b"
    yield "rmsprop", "alpha", "0.9", TypeError, r"^alpha\b"
    for kernel in ("rmsprop", "sgd"):
        for v in [-0.1] + NON_FINITE:
            yield kernel, "momentum", v, ValueError, r"^momentum\b"
        yield kernel, "momentum", "0.9", TypeError, r"^momentum\b"
    for v in [-0.1, 1.5] + NON_FINITE:
        yield "sgd", "dampening", v, ValueError, r"^dampening\b"
    yield "sgd", "dampening", "0", TypeError, r"^dampening\b"


@pytest.mark.parametrize("kernel,option,value,exc,match", list(scalar_cases()),
                         ids=lambda x: repr(x) if not isinstance(x, type) else x.__name__)
def test_bad_scalar(kernel, option, value, exc, match):
    k = KERNELS[kernel]
    rejects(k, k.valid(), exc, match, **{option: value})


def test_scalars_of_numpy_types_are_accepted():
    k = KERNELS["adam"]
    a, b = k.valid(), k.valid()
    k.call(a, step=np.int32(3), lr=np.float32(1e-3), betas=(np.float64(0.9), 0.999),
           eps=np.float16(1e-4), weight_decay=np.int64(0))
    k.call(b, step=3, lr=float(np.float32(1e-3)), betas=(0.9, 0.999),
           eps=float(np.float16(1e-4)), weight_decay=0.0)
    for name in k.arrays:
        np.testing.assert_array_equal(a[name], b[name])


def test_betas_may_be_a_list_as_in_pytorch():
    k = KERNELS["adam"]
    a, b = k.valid(), k.valid()
    k.call(a, step=2, betas=[0.8, 0.99])
    k.call(b, step=2, betas=(0.8, 0.99))
    for name in k.arrays:
        np.testing.assert_array_equal(a[name], b[name])


# ------------------------------------------------ options and their states ---

def test_amsgrad_requires_max_exp_avg_sq():
    for name in ("adam", "adamw"):
        k = KERNELS[name]
        arrays = k.valid()
        arrays["max_exp_avg_sq"] = None
        rejects(k, arrays, ValueError, "max_exp_avg_sq")


@pytest.mark.parametrize("kernel", ["rmsprop", "sgd"])
def test_momentum_requires_momentum_buffer(kernel):
    k = KERNELS[kernel]
    arrays = k.valid()
    arrays["momentum_buffer"] = None
    rejects(k, arrays, ValueError, "momentum_buffer")


def test_centered_requires_grad_avg():
    k = KERNELS["rmsprop"]
    arrays = k.valid()
    arrays["grad_avg"] = None
    rejects(k, arrays, ValueError, "grad_avg")


@pytest.mark.parametrize("options", [dict(momentum=0.0), dict(momentum=0.9, dampening=0.1),
                                     dict(momentum=0.0, dampening=0.5)], ids=repr)
def test_nesterov_needs_momentum_and_no_dampening(options):
    k = KERNELS["sgd"]
    rejects(k, k.valid(), ValueError, "nesterov", nesterov=True, **options)


def test_sgd_lr_is_required():
    p, g = np.zeros(3), np.zeros(3)
    snap = Snapshot(p, g)
    with pytest.raises(TypeError, match="lr"):
        fastopt.sgd_step(p, g)
    snap.assert_unchanged()


@pytest.mark.parametrize("kernel", KERNELS)
def test_unknown_keyword(kernel):
    k = KERNELS[kernel]
    rejects(k, k.valid(), TypeError, "learning_rate", learning_rate=0.1)
