"""Low precision: 16-bit conversions, float16/bfloat16 parameters with float32
master weights, bfloat16 optimizer state, loss scaling and GradScaler.

References:
* conversions: NumPy's float16 and ml_dtypes' bfloat16 casts (round to
  nearest even), over every 16-bit pattern and float32 values at and next to
  every rounding boundary;
* half parameters: a float32 step on the master copy (fastopt's float32
  optimizer, itself tested against NumPy), then rounding with NumPy/ml_dtypes;
* bfloat16 state: the float32 step with the state rounded after each update,
  to nearest (ml_dtypes) or stochastically with the generator implemented
  here from its specification (`hash32`, `stochastic_bf16`);
* GradScaler: torch.amp.GradScaler's scales, step for step.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

import fastopt
from conftest import Snapshot, num_threads
from test_optimizers import BIG_SHAPES, CASE_IDS, CASES, SMALL_SHAPES, make_params

try:
    import ml_dtypes
    BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:           # the bf16 extra is optional: those cases skip
    ml_dtypes = None
    BF16 = None

needs_bf16 = pytest.mark.skipif(BF16 is None, reason="ml_dtypes (fastopt[bf16]) not installed")
HALF = [pytest.param(np.float16, id="float16"),
        pytest.param("bfloat16", id="bfloat16", marks=needs_bf16)]
from fastopt import _optim as K  # noqa: E402  (the chosen SIMD level)


def half(name):
    return np.dtype(np.float16) if name is np.float16 else BF16


def bits(a):
    return np.ascontiguousarray(a).view(np.uint16 if a.dtype.itemsize == 2 else np.uint32)


def assert_bits(a, b, msg=""):
    """Equal bit for bit (NaN included)."""
    np.testing.assert_array_equal(bits(a), bits(b), err_msg=msg)


# ------------------------------------------------------------- generator ---

def hash32(x):
    """lowbias32 (the generator's hash), in NumPy uint32 arithmetic."""
    x = np.array(x, dtype=np.uint32)
    x ^= x >> np.uint32(16)
    x *= np.uint32(0x7feb352d)
    x ^= x >> np.uint32(15)
    x *= np.uint32(0x846ca68b)
    x ^= x >> np.uint32(16)
    return x


def draws(key, n):
    """The generator's 32 random bits for elements 0..n-1: hash32(key + i)."""
    return hash32(np.uint32(key) + np.arange(n, dtype=np.uint64).astype(np.uint32))


def stochastic_bf16(x, rnd):
    """float32 x -> bfloat16 bits with stochastic rounding: element i adds the
    high 16 bits of rnd[i] to the float32 bits and keeps the top 16; NaN
    becomes a quiet NaN."""
    x = np.ascontiguousarray(x, dtype=np.float32).ravel()
    u = x.view(np.uint32)
    r = np.asarray(rnd, np.uint32)
    out = (u + (r >> np.uint32(16))) >> np.uint32(16)
    nan = np.isnan(x)
    out[nan] = (u[nan] >> np.uint32(16)) | np.uint32(0x40)
    return out.astype(np.uint16)


def step_key(seed, index, step):
    return int(hash32(hash32(hash32(seed) ^ np.uint32(index)) ^ np.uint32(step)))


def slot_bits(r, slot):
    """The random bits state slot 1, 2 or 3 rounds with, from an element's draw r."""
    return r if slot == 1 else (r << np.uint32(16)) if slot == 2 else hash32(r)


SLOTS = {"exp_avg": 1, "exp_avg_sq": 2, "max_exp_avg_sq": 3, "square_avg": 1,
         "grad_avg": 3}


def slot_of(opt, name):
    if name == "momentum_buffer":
        return 1 if isinstance(opt, fastopt.SGD) else 2
    return SLOTS[name]


# ----------------------------------------------------------- conversions ---

def all_halves(dtype):
    return np.arange(65536, dtype=np.uint32).astype(np.uint16).view(dtype)


def boundary_floats(dtype):
    """float32 values at every rounding boundary between consecutive finite
    16-bit values, one float32 ulp either side, the 16-bit values themselves,
    and specials."""
    h = all_halves(dtype)
    f = h.astype(np.float32)
    f = np.sort(f[np.isfinite(f)])
    mids = (f[:-1].astype(np.float64) + f[1:]) / 2          # exact in float64
    m32 = mids.astype(np.float32)                            # some are not float32 values
    near = [m32, np.nextafter(m32, np.float32(np.inf)), np.nextafter(m32, np.float32(-np.inf))]
    top = np.float64(f[-1])
    ulp = top - np.float64(f[-2])
    edge = np.array([top + ulp / 2], np.float32)              # the overflow boundary
    specials = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, 1e-45, -1e-45,
                         np.finfo(np.float32).max, -np.finfo(np.float32).max,
                         np.finfo(np.float32).tiny, 2.0**-24, 2.0**-25, 3 * 2.0**-26],
                        np.float32)
    out = np.concatenate(near + [f, edge, np.nextafter(edge, np.float32(0)),
                                 np.nextafter(edge, np.float32(np.inf)), specials])
    rng = np.random.default_rng(0)
    rand = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    return np.concatenate([out, -out, rand])


@pytest.mark.parametrize("dtype", HALF)
def test_widening_is_exact_for_every_16_bit_value(dtype):
    dtype = half(dtype)
    h = all_halves(dtype)
    got = np.empty(h.size, np.float32)
    K._convert(h, got)
    want = h.astype(np.float32)
    num = ~np.isnan(want)
    assert_bits(got[num], want[num])
    assert np.isnan(got[~num]).all() and (np.signbit(got) == np.signbit(want)).all()
    hb = bits(h).astype(np.uint32)
    if dtype == np.float16:
        # NaN: payload kept, quiet bit set (what vcvtph2ps gives)
        nan_bits = ((hb & 0x8000) << 16) | 0x7f800000 | ((hb & 0x3ff) << 13) | 0x400000
        assert_bits(got[~num], nan_bits[~num].astype(np.uint32))
    else:
        assert_bits(got, (hb << 16).astype(np.uint32))    # a shift: every bit kept


@pytest.mark.parametrize("dtype", HALF)
def test_rounding_matches_numpy_and_ml_dtypes_at_every_boundary(dtype):
    dtype = half(dtype)
    x = boundary_floats(dtype)
    got = np.empty(x.size, dtype)
    K._convert(x, got)
    with np.errstate(over="ignore", invalid="ignore"):
        want = x.astype(dtype)
    num = ~np.isnan(x)
    assert_bits(got[num], want[num])
    g = bits(got[~num]).astype(np.uint32)
    u = bits(x[~num])
    if dtype == np.float16:    # quiet NaN, sign and the top of the payload
        assert_bits(g, ((u >> 16) & 0x8000) | 0x7e00 | ((u >> 13) & 0x3ff))
    else:
        assert_bits(g, (u >> 16) | 0x40)


def test_hash_matches_its_definition():
    x = np.concatenate([np.arange(1000), np.random.default_rng(1).integers(0, 2**32, 1000)])
    x = x.astype(np.uint32)
    assert_bits(K._hash32(x), hash32(x))
    # lowbias32 reference values (Chris Wellons' hash-prospector)
    assert hash32(0) == 0 and hash32(1) != 1


@needs_bf16
def test_stochastic_rounding_rule_and_unbiasedness():
    rng = np.random.default_rng(2)
    x = np.concatenate([rng.standard_normal(5000).astype(np.float32) * 10.0 ** rng.integers(-30, 30, 5000),
                        np.array([0, -0.0, np.inf, -np.inf, np.nan, 3.0e38, -3.3e38], np.float32)])
    x = x.astype(np.float32)
    for key in (0, 1, 0xdeadbeef, 2**32 - 1):
        got = np.empty(x.size, BF16)
        K._convert(x, got, stochastic_key=key)
        assert_bits(got, stochastic_bf16(x, draws(key, x.size)))
        # always one of the two bfloat16 neighbours of x (x itself if it is one)
        u = bits(x[~np.isnan(x)]) >> np.uint32(16)
        b = bits(got[~np.isnan(x)]).astype(np.uint32)
        assert np.all((b == u) | (b == u + 1))
        exact = (bits(x) & np.uint32(0xffff)) == 0
        assert_bits(got[exact], x[exact].astype(BF16))
    # unbiased: the mean over many keys of round(x) is x
    x = np.full(4096, 1.0 + 2.0**-10, np.float32)      # 1/8 of the way to the next bfloat16
    means = []
    for key in range(50):
        got = np.empty(x.size, BF16)
        K._convert(x, got, stochastic_key=key * 4096)
        means.append(got.astype(np.float64).mean())
    ulp = 2.0**-7
    frac_up = (np.mean(means) - 1.0) / ulp
    assert abs(frac_up - 1 / 8) < 0.01, frac_up           # 204800 draws: sd 0.0007


def levels():
    from fastopt import _dispatch, _runtime
    return [lv for lv in _dispatch._built_levels() if lv in _runtime.cpu_levels()]


_CONVERT_SCRIPT = """
import hashlib, sys, numpy as np
sys.path.insert(0, {tests!r})
from test_lowprec import BF16, all_halves, bits, boundary_floats
from fastopt import _optim as K
h = all_halves(np.float16)
x = boundary_floats(np.float16)
out = hashlib.sha256()
f = np.empty(h.size, np.float32)
K._convert(h, f)
o = np.empty(x.size, np.float16)
K._convert(x, o)
r = [f, o]
if BF16 is not None:
    b = np.empty(x.size, BF16)
    K._convert(x, b)
    s = np.empty(x.size, BF16)
    K._convert(x, s, stochastic_key=12345)
    r += [b, s]
for a in r:
    out.update(bits(a).tobytes())
print(out.hexdigest())
"""


def test_conversions_identical_at_every_simd_level():
    # Each level's kernel core in a process of its own (FASTOPT_SIMD).
    lv = levels()
    if len(lv) < 2:
        pytest.skip("only one SIMD level built for this CPU")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    script = _CONVERT_SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__)))
    out = {level: subprocess.run([sys.executable, "-c", script], env=dict(env, FASTOPT_SIMD=level),
                                 check=True, capture_output=True, text=True).stdout
           for level in lv}
    assert len(set(out.values())) == 1, out


# ------------------------------------------------------ half parameters ---

def mirror_steps(opt, ref, params, masters, nsteps, rng, grad_dtype, check):
    """Step `opt` (half params) and `ref` (float32 masters) with the same
    gradients; `check()` after every step."""
    for _ in range(nsteps):
        grads = [rng.standard_normal(p.shape).astype(np.float32) for p in params]
        gs = [g.astype(grad_dtype) for g in grads]
        opt.step(gs)
        ref.step([g.astype(np.float32) for g in gs])
        check()


@pytest.mark.parametrize("grad_is_half", [False, True], ids=["f32grads", "halfgrads"])
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("cls,kwargs", CASES, ids=CASE_IDS)
def test_half_params_are_a_float32_step_on_the_master_then_rounding(cls, kwargs, dtype,
                                                                     grad_is_half, rng):
    dtype = half(dtype)
    shapes = BIG_SHAPES if grad_is_half else SMALL_SHAPES
    masters = make_params(rng, shapes, np.float32)
    params = [m.astype(dtype) for m in masters]
    masters = [p.astype(np.float32) for p in params]     # the master starts as the param
    opt = cls(params, **kwargs)
    ref = cls(masters, **kwargs)

    def check():
        for i, (p, m) in enumerate(zip(params, masters)):
            assert_bits(opt.state[i]["master_param"], m, f"master {i}")
            assert_bits(p, m.astype(dtype), f"params[{i}]")
            for name, arr in ref.state[i].items():
                assert_bits(opt.state[i][name], arr, f"state[{i}][{name}]")
    check()
    mirror_steps(opt, ref, params, masters, 4 if grad_is_half else 12, rng,
                 dtype if grad_is_half else np.float32, check)
    np.testing.assert_array_equal(opt.steps, ref.steps)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("kernel", ["adam", "adamw", "rmsprop", "sgd"])
def test_functional_kernels_on_half_params(kernel, dtype, rng):
    dtype = half(dtype)
    n = 70_001
    p = rng.standard_normal(n).astype(dtype)
    w = p.astype(np.float32)
    w_ref = w.copy()
    st = [np.zeros(n, np.float32) for _ in range(2)]
    st_ref = [np.zeros(n, np.float32) for _ in range(2)]
    for t in range(1, 4):
        g = rng.standard_normal(n).astype(dtype if t % 2 else np.float32)
        if kernel in ("adam", "adamw"):
            f = getattr(fastopt, kernel + "_step")
            f(p, g, *st, step=t, lr=1e-2, master=w)
            f(w_ref, g.astype(np.float32), *st_ref, step=t, lr=1e-2)
        elif kernel == "rmsprop":
            fastopt.rmsprop_step(p, g, st[0], momentum=0.9, momentum_buffer=st[1], master=w)
            fastopt.rmsprop_step(w_ref, g.astype(np.float32), st_ref[0], momentum=0.9,
                                 momentum_buffer=st_ref[1])
        else:
            fastopt.sgd_step(p, g, st[0], lr=0.1, momentum=0.9, first_step=t == 1, master=w)
            fastopt.sgd_step(w_ref, g.astype(np.float32), st_ref[0], lr=0.1, momentum=0.9,
                             first_step=t == 1)
        assert_bits(w, w_ref)
        assert_bits(p, w_ref.astype(dtype))
        for a, b in zip(st, st_ref):
            assert_bits(a, b)


def test_functional_half_param_bad_input_changes_nothing(rng):
    p = rng.standard_normal(10).astype(np.float16)
    g = rng.standard_normal(10).astype(np.float32)
    m, v = np.zeros(10, np.float32), np.zeros(10, np.float32)
    w = p.astype(np.float32)
    snap = Snapshot(p, g, m, v, w)
    cases = [
        (dict(), ValueError, "needs master"),
        (dict(master=w.astype(np.float64)), TypeError, "master must have dtype float32"),
        (dict(master=w[:5]), ValueError, "master has shape"),
        (dict(master=p), TypeError, "master must have dtype float32"),
        (dict(master=m), ValueError, "overlap"),
    ]
    for kw, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            fastopt.adam_step(p, g, m, v, step=1, **kw)
    with pytest.raises(TypeError, match=r"^grad has dtype float64 but param has dtype float16"):
        fastopt.adam_step(p, g.astype(np.float64), m, v, step=1, master=w)
    with pytest.raises(TypeError, match=r"^exp_avg has dtype float64 but master has dtype float32"):
        fastopt.adam_step(p, g, m.astype(np.float64), v, step=1, master=w)
    with pytest.raises(ValueError, match="master is only for float16/bfloat16"):
        fastopt.adam_step(w.copy(), g, m, v, step=1, master=w)
    snap.assert_unchanged()


# ------------------------------------------------------ bfloat16 state ---

def round_state(opt, ref, rounding, active):
    """Round the float32 state of `ref` as `opt` stores it (in place)."""
    steps = ref.steps
    for i, st in enumerate(ref.state):
        if not active[i]:
            continue
        r = draws(step_key(opt.seed, i, steps[i]), opt._fused.params[i].size)
        for name, arr in st.items():
            if name == "master_param":
                continue
            if rounding == "nearest":
                arr[...] = arr.astype(BF16).astype(np.float32)
            else:
                b = stochastic_bf16(arr, slot_bits(r, slot_of(opt, name)))
                arr[...] = b.view(BF16).reshape(arr.shape).astype(np.float32)


@needs_bf16
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("param_dtype", [np.float32, np.float16, "bfloat16"],
                         ids=["f32params", "f16params", "bf16params"])
@pytest.mark.parametrize("cls,kwargs", CASES, ids=CASE_IDS)
def test_bfloat16_state_is_the_float32_step_rounded(cls, kwargs, param_dtype, rounding, rng):
    dtype = np.dtype(BF16 if param_dtype == "bfloat16" else param_dtype)
    shapes = BIG_SHAPES if rounding == "stochastic" else SMALL_SHAPES
    params = [p.astype(dtype) for p in make_params(rng, shapes, np.float32)]
    masters = [p.astype(np.float32) for p in params]
    opt = cls(params, **kwargs, state_dtype="bfloat16", state_rounding=rounding, seed=77)
    ref = cls(masters, **kwargs)
    for st in opt.state:
        for name, arr in st.items():
            assert arr.dtype == (np.float32 if name == "master_param" else BF16)
    for t in range(8):
        grads = [rng.standard_normal(p.shape).astype(np.float32) for p in params]
        grads[1] = None if t == 3 else grads[1]          # a skipped parameter keeps its count
        opt.step(grads)
        ref.step(grads)
        round_state(opt, ref, rounding, [g is not None for g in grads])
        for i, p in enumerate(params):
            assert_bits(p, masters[i].astype(dtype), f"params[{i}] at step {t}")
            for name, arr in ref.state[i].items():
                assert_bits(opt.state[i][name], arr.astype(BF16), f"state[{i}][{name}] step {t}")


@needs_bf16
def test_stochastic_state_depends_on_the_seed_only():
    rng = np.random.default_rng(5)
    p0 = rng.standard_normal((300, 700)).astype(np.float32)
    grads = [[rng.standard_normal(p0.shape).astype(np.float32)] for _ in range(3)]

    def run(seed, threads):
        p = p0.copy()
        opt = fastopt.Adam([p], lr=1e-2, state_dtype="bfloat16", seed=seed)
        with num_threads(threads):
            for g in grads:
                opt.step(g)
        return p, bits(opt.state[0]["exp_avg_sq"])
    a = run(3, 1)
    b = run(3, 2)
    c = run(4, 2)
    assert_bits(a[0], b[0])
    assert_bits(a[1], b[1])
    assert not np.array_equal(a[1], c[1])


@needs_bf16
def test_bad_state_options_change_nothing(rng):
    p = rng.standard_normal(10).astype(np.float32)
    snap = Snapshot(p)
    cases = [
        (dict(state_dtype="float16"), ValueError, "state_dtype='float16' is not supported.*range"),
        (dict(state_dtype="int8"), ValueError, "state_dtype must be None or 'bfloat16'"),
        (dict(state_dtype=np.float16), ValueError, "state_dtype='float16'"),
        (dict(state_dtype=3), TypeError, "state_dtype must be"),
        (dict(state_dtype="bfloat16", state_rounding="up"), ValueError, "state_rounding"),
        (dict(state_dtype="bfloat16", seed=-1), ValueError, "seed"),
        (dict(state_dtype="bfloat16", seed=2**32), ValueError, "seed"),
        (dict(state_dtype="bfloat16", seed=1.5), TypeError, "seed"),
    ]
    for kw, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            fastopt.Adam([p], **kw)
    with pytest.raises(ValueError, match=r"state_dtype='bfloat16' needs float32.*params\[1\] is float64"):
        fastopt.SGD([p, np.zeros(3)], momentum=0.9, state_dtype="bfloat16")
    snap.assert_unchanged()
    assert fastopt.Adam([p], state_dtype=BF16).state_dtype == "bfloat16"


def test_bfloat16_without_ml_dtypes_names_the_extra():
    code = ("import sys; sys.modules['ml_dtypes'] = None\n"
            "import numpy as np, fastopt\n"
            "try:\n"
            "    fastopt.Adam([np.zeros(3, np.float32)], state_dtype='bfloat16')\n"
            "except ImportError as e:\n"
            "    print(e)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout
    assert "state_dtype='bfloat16' needs the ml_dtypes package" in out
    assert "fastopt[bf16]" in out


# --------------------------------------------------------- loss scaling ---

@pytest.mark.parametrize("scale", [2.0**16, 3.0, 0.25])
@pytest.mark.parametrize("cls,kwargs", CASES, ids=CASE_IDS)
def test_grad_scale_divides_inside_the_step(cls, kwargs, scale, rng):
    params = make_params(rng, BIG_SHAPES, np.float32) + make_params(rng, [(5,)], np.float64)
    refs = [p.copy() for p in params]
    opt, ref = cls(params, **kwargs), cls(refs, **kwargs)
    for _ in range(3):
        grads = [rng.standard_normal(p.shape).astype(p.dtype) for p in params]
        for g in grads:
            g *= g.dtype.type(scale)
        opt.step(grads, grad_scale=scale)
        assert opt.found_inf is False
        ref.step([np.multiply(g, g.dtype.type(1 / scale), out=np.empty_like(g)) for g in grads])
    for p, q in zip(params, refs):
        assert_bits(p, q)


@pytest.mark.parametrize("where", ["first", "middle", "last", "tail"])
@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
@pytest.mark.parametrize("grad_dtype", ["float32", "float16", "bfloat16"])
def test_inf_or_nan_gradient_skips_the_step_and_changes_nothing(grad_dtype, bad, where, rng):
    if grad_dtype == "bfloat16" and BF16 is None:
        pytest.skip("ml_dtypes not installed")
    pdt = np.float32 if grad_dtype == "float32" else (np.float16 if grad_dtype == "float16" else BF16)
    shapes = [(3,), (70_000,), (17,)]
    params = [p.astype(pdt) for p in make_params(rng, shapes, np.float32)]
    kw = dict(state_dtype="bfloat16") if BF16 is not None else {}
    opt = fastopt.Adam(params, lr=1e-2, amsgrad=True, **kw)
    good = lambda: [rng.standard_normal(p.shape).astype(pdt) for p in params]  # noqa: E731
    opt.step(good(), grad_scale=8.0)
    grads = good()
    k, i = {"first": (0, 0), "middle": (1, 35_001), "last": (2, 16), "tail": (1, 69_999)}[where]
    grads[k][i] = bad
    arrays = params + [a for st in opt.state for a in st.values()]
    snap = Snapshot(*arrays)
    steps = opt.steps
    for threads in (1, 2):
        with num_threads(threads):
            opt.step(grads, grad_scale=8.0)
        assert opt.found_inf is True
        snap.assert_unchanged()
        np.testing.assert_array_equal(opt.steps, steps)
    opt.step(good(), grad_scale=8.0)
    assert opt.found_inf is False and (opt.steps == steps + 1).all()


def test_without_grad_scale_nothing_is_checked(rng):
    p = rng.standard_normal(10).astype(np.float32)
    opt = fastopt.SGD([p], lr=0.1)
    g = np.ones(10, np.float32)
    g[2] = np.nan
    opt.step([g])                         # NaN propagates, as in PyTorch
    assert np.isnan(p[2]) and opt.found_inf is False


@pytest.mark.parametrize("value,exc,msg", [
    (0.0, ValueError, "grad_scale must be > 0"),
    (-2.0, ValueError, "grad_scale must be > 0"),
    (float("inf"), ValueError, "grad_scale must be finite"),
    (float("nan"), ValueError, "grad_scale must be finite"),
    ("2", TypeError, "grad_scale must be a real number"),
    ([2.0], TypeError, "grad_scale must be a real number"),
    (1e-300, ValueError, "grad_scale must be >= 2\\*\\*-127"),
])
def test_bad_grad_scale_changes_nothing(value, exc, msg, rng):
    p = rng.standard_normal(10).astype(np.float32)
    opt = fastopt.Adam([p])
    opt.step([np.ones(10, np.float32)])
    snap = Snapshot(p, *opt.state[0].values())
    with pytest.raises(exc, match=msg):
        opt.step([np.ones(10, np.float32)], grad_scale=value)
    snap.assert_unchanged()
    assert (opt.steps == 1).all()


def test_bad_half_gradients_name_the_argument(rng):
    params = [np.zeros(4), np.zeros(4, np.float16), np.zeros(4, np.float32)]
    opt = fastopt.Adam(params)
    snap = Snapshot(*params)
    g16 = np.ones(4, np.float16)
    with pytest.raises(TypeError, match=r"grads\[0\] has dtype float16 but params\[0\] has dtype float64"):
        opt.step([g16, None, None])
    with pytest.raises(TypeError, match=r"grads\[1\] has dtype float64 but params\[1\] .*float16 or float32"):
        opt.step([None, np.ones(4), None])
    with pytest.raises(TypeError, match=r"grads\[2\] has dtype float16 but params\[2\] has dtype float32"):
        opt.step([None, None, g16])
    if BF16 is not None:
        with pytest.raises(TypeError, match=r"grads\[1\] has dtype bfloat16 but params\[1\]"):
            opt.step([None, np.ones(4, BF16), None])
    snap.assert_unchanged()
    assert (opt.steps == 0).all()


# ------------------------------------------------------------ GradScaler ---

def test_grad_scaler_defaults_follow_pytorch():
    s = fastopt.GradScaler()
    assert s.get_scale() == 2.0**16 and s.get_growth_factor() == 2.0
    assert s.get_backoff_factor() == 0.5 and s.get_growth_interval() == 2000
    assert s.state_dict() == {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                              "growth_interval": 2000, "_growth_tracker": 0}


@pytest.mark.parametrize("init,growth,backoff,interval", [
    (2.0**16, 2.0, 0.5, 2000), (2.0**16, 2.0, 0.5, 3), (1000.3, 3.0, 0.3, 2), (7.0, 1.5, 0.9, 1)])
def test_grad_scaler_scales_follow_torch(init, growth, backoff, interval):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(7)
    ours = fastopt.GradScaler(init, growth, backoff, interval)
    theirs = torch.amp.GradScaler("cpu", init_scale=init, growth_factor=growth,
                                  backoff_factor=backoff, growth_interval=interval)
    p = np.zeros(3, np.float32)
    opt = fastopt.SGD([p], lr=0.1)
    tp = torch.zeros(3, requires_grad=True)
    topt = torch.optim.SGD([tp], lr=0.1)
    for it in range(80):
        bad = rng.random() < 0.25
        g = np.arange(1, 4, dtype=np.float32) * np.float32(ours.get_scale())
        if bad:
            g[1] = np.nan
        ours.step(opt, [g])
        ours.update()
        topt.zero_grad()
        loss = (tp * torch.arange(1, 4, dtype=torch.float32)).sum()
        theirs.scale(loss * (float("nan") if bad else 1.0)).backward()
        theirs.step(topt)
        theirs.update()
        assert ours.get_scale() == theirs.get_scale(), it
        assert ours.state_dict() == theirs.state_dict(), it
        np.testing.assert_allclose(p, tp.detach().numpy(), rtol=1e-6)
    assert ours.get_scale() != init


@pytest.mark.parametrize("cls,kwargs", CASES[:6], ids=CASE_IDS[:6])
def test_optimizer_unscale_and_found_inf_step(cls, kwargs, rng):
    # The interface GradScaler uses: unscale_ divides in place and reports
    # non-finite gradients; step(found_inf=True) changes nothing.
    shapes = [(5000,), (7, 3)]
    params = make_params(rng, shapes, np.float32)
    opt = cls(params, **kwargs)
    scale = 2.0**12
    true = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    grads = [g * np.float32(scale) for g in true]
    assert opt.unscale_(grads, scale) is False
    for g, t in zip(grads, true):
        assert_bits(g, t * np.float32(scale) * np.float32(1 / scale))
    bad = [g * np.float32(scale) for g in grads]
    bad[1][2, 1] = np.inf
    assert opt.unscale_(bad, scale) is True         # scaled all the same, as torch's unscale_
    assert_bits(bad[0], grads[0] * np.float32(scale) * np.float32(1 / scale))
    opt.step(grads)
    snap = Snapshot(*params, *[a for st in opt.state for a in st.values()])
    steps = opt.state_dict()
    opt.step(grads, found_inf=True)
    snap.assert_unchanged()
    assert opt.found_inf is True
    assert {k: v for k, v in opt.state_dict().items() if "step" in k} == \
        {k: v for k, v in steps.items() if "step" in k}
    opt.step(grads)
    assert opt.found_inf is False


def test_unscale_then_clip_equals_clipping_the_true_gradients(rng):
    shapes = [(70_000,), (33,)]
    params = make_params(rng, shapes, np.float32)
    refs = [p.copy() for p in params]
    opt, ref = fastopt.Adam(params, lr=1e-2), fastopt.Adam(refs, lr=1e-2)
    scaler = fastopt.GradScaler(init_scale=2.0**10)
    for _ in range(4):
        true = [rng.standard_normal(p.shape).astype(np.float32) for p in params]
        grads = scaler.scale(true)
        assert all(g.dtype == np.float32 for g in grads)
        scaler.unscale_(opt, grads)
        for g, tg in zip(grads, true):
            assert_bits(g, tg * np.float32(2.0**10) * np.float32(2.0**-10))
        n1 = fastopt.clip_grad_norm_(grads, 50.0)
        scaler.step(opt, grads)
        scaler.update()
        n2 = fastopt.clip_grad_norm_(true, 50.0)
        ref.step(true)
        assert n1 == n2
        for p, q in zip(params, refs):
            assert_bits(p, q)


def test_unscale_then_clip_follows_torch(rng):
    torch = pytest.importorskip("torch")
    n = 1000
    w0 = rng.standard_normal(n).astype(np.float32)
    p = w0.copy()
    opt = fastopt.SGD([p], lr=0.1, momentum=0.9)
    scaler = fastopt.GradScaler(init_scale=2.0**12, growth_interval=3)
    tp = torch.tensor(w0.copy(), requires_grad=True)
    topt = torch.optim.SGD([tp], lr=0.1, momentum=0.9)
    tscaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=3)
    for t in range(10):
        target = rng.standard_normal(n).astype(np.float32)
        bad = t == 4
        g = (p - target) * np.float32(2 / n)           # d/dw of mean((w - target)^2)
        grads = scaler.scale([g])
        if bad:
            grads[0][5] = np.inf
        scaler.unscale_(opt, grads)
        fastopt.clip_grad_norm_(grads, 0.05)
        scaler.step(opt, grads)
        assert opt.found_inf == bad
        scaler.update()
        topt.zero_grad()
        loss = ((tp - torch.from_numpy(target)) ** 2).mean()
        tscaler.scale(loss * (float("inf") if bad else 1.0)).backward()
        tscaler.unscale_(topt)
        torch.nn.utils.clip_grad_norm_([tp], 0.05)
        tscaler.step(topt)
        tscaler.update()
        assert scaler.get_scale() == tscaler.get_scale()
        np.testing.assert_allclose(p, tp.detach().numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("norm_type", [2.0, 1.0, np.inf, 3.0])
@pytest.mark.parametrize("dtype", HALF)
def test_clip_grad_norm_of_16_bit_gradients(dtype, norm_type, rng):
    dtype = half(dtype)
    grads = [rng.standard_normal(s).astype(dtype) for s in [(70_001,), (3, 5), (0,)]]
    wide = [g.astype(np.float32) for g in grads]
    total = fastopt.clip_grad_norm_(grads, 1.0, norm_type=norm_type)
    assert total == fastopt.clip_grad_norm_(wide, 1.0, norm_type=norm_type)
    for g, w in zip(grads, wide):                    # scaled in float32, rounded once
        assert_bits(g, w.astype(dtype))


@pytest.mark.parametrize("dtype", HALF)
def test_clip_grad_value_of_16_bit_gradients(dtype, rng):
    # From the formula: clamp in float32 to [-c, c], rounded once to the dtype.
    dtype = half(dtype)
    grads = [(rng.standard_normal(s) * 3).astype(dtype) for s in [(70_001,), (3, 5), (0,)]]
    grads[1][0, 0] = np.nan
    grads[1][0, 1] = -np.inf
    c = 1.3
    want = [np.clip(g.astype(np.float32), np.float32(-c), np.float32(c)).astype(dtype)
            for g in grads]
    fastopt.clip_grad_value_(grads, c)
    for g, w in zip(grads, want):
        assert_bits(g, w)


@pytest.mark.parametrize("dtype", HALF)
def test_unscale_of_16_bit_gradients(dtype, rng):
    dtype = half(dtype)
    params = [np.zeros(40_000, dtype), np.zeros(7, np.float32)]
    grads = [rng.standard_normal(40_000).astype(dtype), rng.standard_normal(7).astype(np.float32)]
    want = [(g.astype(np.float32) * np.float32(1 / 3.0)).astype(g.dtype) for g in grads]
    opt = fastopt.SGD(params, lr=0.1)
    assert opt._fused.unscale_(grads, 3.0) is False
    for g, w in zip(grads, want):
        assert_bits(g, w)
    grads[0][123] = np.inf
    assert opt._fused.unscale_(grads, 3.0) is True


@pytest.mark.parametrize("dtype", HALF)
def test_grad_scaler_with_half_params_and_gradients(dtype, rng):
    dtype = half(dtype)
    params = [rng.standard_normal(s).astype(dtype) for s in [(40_000,), (9,)]]
    masters = [p.astype(np.float32) for p in params]
    opt = fastopt.AdamW(params, lr=1e-3)
    ref = fastopt.AdamW(masters, lr=1e-3)
    scaler = fastopt.GradScaler(init_scale=2.0**8, growth_interval=2)
    for _ in range(6):
        true = [(rng.standard_normal(p.shape) * 1e-3).astype(dtype) for p in params]
        grads = scaler.scale(true)                       # computed in float32, rounded once
        for g, tg in zip(grads, true):
            assert g.dtype == dtype
            assert_bits(g, (tg.astype(np.float32) * np.float32(scaler.get_scale())).astype(dtype))
        s = scaler.get_scale()
        scaler.step(opt, grads)
        scaler.update()
        if not opt.found_inf:
            ref.step([g.astype(np.float32) * np.float32(1 / s) for g in grads])
        for p, m in zip(params, masters):
            assert_bits(p, m.astype(dtype))


def test_grad_scaler_call_order_errors(rng):
    p = np.zeros(3, np.float32)
    opt = fastopt.SGD([p], lr=0.1)
    s = fastopt.GradScaler()
    g = [np.ones(3, np.float32)]
    with pytest.raises(RuntimeError, match="No inf checks"):
        s.update()
    s.unscale_(opt, g)
    with pytest.raises(RuntimeError, match="already been called"):
        s.unscale_(opt, g)
    s.step(opt, g)
    with pytest.raises(RuntimeError, match="step\\(\\) has already been called"):
        s.step(opt, g)
    with pytest.raises(RuntimeError, match="after step"):
        s.unscale_(opt, g)
    s.update()
    s.step(opt, g)          # a new iteration
    with pytest.raises(TypeError, match="fastopt optimizer"):
        s.step(object(), g)


def test_grad_scaler_bad_arguments():
    for kw, exc, msg in [(dict(init_scale=0.0), ValueError, "init_scale"),
                         (dict(init_scale="1"), TypeError, "init_scale"),
                         (dict(growth_factor=1.0), ValueError, "growth_factor must be > 1"),
                         (dict(backoff_factor=1.0), ValueError, "backoff_factor"),
                         (dict(backoff_factor=0.0), ValueError, "backoff_factor"),
                         (dict(growth_interval=0), ValueError, "growth_interval"),
                         (dict(growth_interval=2.5), TypeError, "growth_interval")]:
        with pytest.raises(exc, match=msg):
            fastopt.GradScaler(**kw)
    s = fastopt.GradScaler()
    with pytest.raises(TypeError, match="outputs"):
        s.scale("loss")
    with pytest.raises(ValueError, match="new_scale"):
        s.update(new_scale=float("inf"))


def test_grad_scaler_state_dict_round_trip_and_bad_dicts(tmp_path):
    s = fastopt.GradScaler(init_scale=1024.0, growth_interval=2)
    p = np.zeros(2, np.float32)
    opt = fastopt.SGD([p], lr=0.1)
    for _ in range(3):
        s.step(opt, [np.ones(2, np.float32)])
        s.update()
    sd = s.state_dict()
    np.savez(tmp_path / "s.npz", **sd)
    t = fastopt.GradScaler()
    t.load_state_dict(dict(np.load(tmp_path / "s.npz")))
    assert t.state_dict() == sd
    before = t.state_dict()
    for bad, exc in [({**sd, "scale": -1.0}, ValueError), ({**sd, "growth_factor": 0.5}, ValueError),
                     ({k: v for k, v in sd.items() if k != "scale"}, ValueError),
                     ({**sd, "extra": 1}, ValueError), ({**sd, "_growth_tracker": -1}, ValueError),
                     ({}, RuntimeError)]:
        with pytest.raises(exc):
            t.load_state_dict(bad)
        assert t.state_dict() == before


def test_disabled_grad_scaler_is_transparent(rng):
    p = np.zeros(3, np.float32)
    opt = fastopt.SGD([p], lr=0.5)
    s = fastopt.GradScaler(enabled=False)
    x = np.ones(3, np.float32)
    assert s.scale(x) is x and s.get_scale() == 1.0 and s.state_dict() == {}
    s.unscale_(opt, [x])
    s.step(opt, [x])
    s.update()
    np.testing.assert_array_equal(p, -0.5 * x)
    np.testing.assert_array_equal(x, 1.0)


def test_unscale_bad_gradients_change_nothing(rng):
    p = [np.zeros(8, np.float32), np.zeros(8, np.float32)]
    opt = fastopt.SGD(p, lr=0.1)
    s = fastopt.GradScaler()
    buf = np.ones(16, np.float32)
    ro = np.ones(8, np.float32)
    ro.flags.writeable = False
    snap = Snapshot(buf, *p)
    for grads, exc, msg in [([buf[:8], buf[4:12]], ValueError, r"grads\[0\] and grads\[1\] overlap"),
                            ([buf[::2], None], ValueError, r"grads\[0\] must be C-contiguous"),
                            ([ro, None], ValueError, r"grads\[0\] is read-only"),
                            ([p[0], None], ValueError, r"grads\[0\] overlaps params\[0\]")]:
        with pytest.raises(exc, match=msg):
            s.unscale_(opt, grads)
        snap.assert_unchanged()


# ------------------------------------------------------------ state dicts ---

@needs_bf16
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_state_dict_round_trip_with_masters_and_bf16_state(rounding, rng, tmp_path):
    def make(params):
        return fastopt.AdamW([{"params": params[:2]}, {"params": params[2:], "lr": 1e-2}],
                             amsgrad=True, state_dtype="bfloat16", state_rounding=rounding,
                             seed=9)
    init = [rng.standard_normal(s).astype(d) for s, d in
            [((50, 30), np.float16), ((7,), BF16), ((40_000,), np.float32)]]
    grads = [[rng.standard_normal(p.shape).astype(np.float32) for p in init] for _ in range(6)]
    a = [p.copy() for p in init]
    opt = make(a)
    for g in grads[:3]:
        opt.step(g)
    np.savez(tmp_path / "opt.npz", **opt.state_dict())
    b = [init[0].copy(), init[1].copy(), a[2].copy()]                 # the 16-bit params are stale...
    fresh = make(b)
    fresh.load_state_dict(dict(np.load(tmp_path / "opt.npz")))
    for x, y in zip(a, b):                       # ...until the masters are loaded
        assert_bits(x, y)
    for g in grads[3:]:
        opt.step(g)
        fresh.step(g)
    for x, y in zip(a, b):
        assert_bits(x, y)
    for s1, s2 in zip(opt.state, fresh.state):
        for k in s1:
            assert_bits(s1[k], s2[k])


@needs_bf16
def test_mismatched_state_dicts_are_rejected_and_change_nothing(rng):
    p32 = rng.standard_normal(20).astype(np.float32)
    p16 = p32.astype(np.float16)
    g = [rng.standard_normal(20).astype(np.float32)]
    fp32 = fastopt.Adam([p32.copy()])
    fp32.step(g)
    bf = fastopt.Adam([p32.copy()], state_dtype="bfloat16")
    bf.step(g)
    half = fastopt.Adam([p16.copy()])
    half.step(g)
    cases = [
        (bf, fp32.state_dict(), "state_dtype None but this optimizer keeps state_dtype='bfloat16'"),
        (fp32, bf.state_dict(), "state_dtype 'bfloat16' but this optimizer keeps state_dtype=None"),
        (half, fp32.state_dict(), "missing 'state.0.master_param'"),
        (fp32, half.state_dict(), "keys this optimizer lacks"),
        (bf, {**bf.state_dict(), "state_rounding": "up"}, "state_rounding"),
        (bf, {**bf.state_dict(), "seed": -3}, "seed"),
        (bf, {**bf.state_dict(), "state.0.exp_avg": np.zeros(20, np.float32)}, "dtype bfloat16"),
        (half, {**half.state_dict(), "state.0.master_param": np.zeros(20)}, "dtype float32"),
    ]
    for opt, sd, msg in cases:
        arrays = opt._fused.params + [a for st in opt.state for a in st.values()]
        snap = Snapshot(*arrays)
        steps = opt.steps
        with pytest.raises(ValueError, match=msg):
            opt.load_state_dict(sd)
        snap.assert_unchanged()
        np.testing.assert_array_equal(opt.steps, steps)
    # the rounding mode and seed travel with the state
    other = fastopt.Adam([p32.copy()], state_dtype="bfloat16", state_rounding="nearest", seed=5)
    other.load_state_dict(bf.state_dict())
    assert (other.state_rounding, other.seed) == (bf.state_rounding, bf.seed)


# --------------------------------------------------- threads, SIMD levels ---

@needs_bf16
def test_low_precision_steps_identical_on_1_2_3_threads(rng):
    shapes = [(100_003,), (64, 1000), (5,)]
    init = [rng.standard_normal(s).astype(d) for s, d in zip(shapes, [np.float16, BF16, np.float32])]
    grads = [[rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(3)]
    results = []
    for threads in (1, 2, 3):
        params = [p.copy() for p in init]
        opt = fastopt.RMSprop(params, momentum=0.5, centered=True, state_dtype="bfloat16")
        with num_threads(threads):
            for g in grads:
                opt.step(g, grad_scale=4.0)
        results.append([bits(p) for p in params] +
                       [bits(a) for st in opt.state for a in st.values()])
    for r in results[1:]:
        for x, y in zip(results[0], r):
            assert_bits(x, y)


_LEVEL_SCRIPT = """
import hashlib, numpy as np, fastopt, ml_dtypes
bf = ml_dtypes.bfloat16
rng = np.random.default_rng(3)
shapes = [(100_003,), (3, 17)]
params = [rng.standard_normal(s).astype(d) for s, d in zip(shapes, [np.float16, bf])]
h = hashlib.sha256()
for cls in (fastopt.Adam, fastopt.RMSprop, fastopt.SGD):
    ps = [p.copy() for p in params]
    kw = dict(momentum=0.9) if cls is fastopt.SGD else {}
    opt = cls(ps, state_dtype="bfloat16", **kw)
    for t in range(3):
        opt.step([rng.standard_normal(s).astype(np.float16 if t else np.float32)
                  .astype(p.dtype if t else np.float32) for s, p in zip(shapes, ps)], grad_scale=2.0)
    for a in ps + [a for st in opt.state for a in st.values()]:
        h.update(np.ascontiguousarray(a).view(np.uint8).tobytes())
print(h.hexdigest())
"""


@needs_bf16
def test_low_precision_steps_identical_at_every_simd_level():
    lv = levels()
    if len(lv) < 2:
        pytest.skip("only one SIMD level built for this CPU")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = {level: subprocess.run([sys.executable, "-c", _LEVEL_SCRIPT],
                                 env=dict(env, FASTOPT_SIMD=level), check=True,
                                 capture_output=True, text=True).stdout for level in lv}
    assert len(set(out.values())) == 1, out


# ------------------------------------------------------------ bench report ---

@pytest.fixture
def tiny_bench(monkeypatch):
    from fastopt import bench
    monkeypatch.setattr(bench.settings, "SOFTMAX_SHAPES", [((8, 130), True)])
    monkeypatch.setattr(bench.settings, "BN_SHAPES", [((4, 3, 5, 5), 1, True)])
    real = bench.measure_pair
    monkeypatch.setattr(bench.timing, "measure_pair", lambda steps, budget, n: real(steps, 1e-3, 1))
    return bench


@pytest.mark.parametrize("dtype", ["float16", pytest.param("bfloat16", marks=needs_bf16)])
def test_bench_16_bit_report(dtype, tiny_bench, tmp_path, capsys):
    import json
    path = tmp_path / "lowp.json"
    assert tiny_bench.main(["--dtype", dtype, "--quick", "--kernels",
                            "adam,cross_entropy,log_softmax,batchnorm", "--sizes", "3000",
                            "--threads", "1", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"n=3,000, {dtype} params, {dtype} grads" in out
    data = json.loads(path.read_text())
    assert data["dtype"] == dtype and data["failed"] == 0
    fams = [r["family"] for r in data["results"]]
    # (bfloat16 state, two of the Adam cases, needs ml_dtypes)
    assert fams == ["adam"] * (4 if BF16 is not None else 2) + [
        "cross_entropy", "log_softmax", "batchnorm"]
    assert all(r["ok"] and r["float32_s"] > 0 and r["half_s"] > 0 and r["ratio"] > 0
               for r in data["results"])


def test_bench_16_bit_report_fails_a_wrong_kernel(tiny_bench, monkeypatch, capsys):
    real = fastopt.log_softmax

    def wrong(x, axis=-1, out=None):
        r = real(x, axis=axis, out=out)
        if r.dtype == np.float16:
            r.flat[3] += np.float16(0.5)
        return r
    monkeypatch.setattr(fastopt, "log_softmax", wrong)
    assert tiny_bench.main(["--dtype", "float16", "--quick", "--kernels", "log_softmax",
                            "--threads", "1"]) == 1
    assert "FAILED" in capsys.readouterr().out


def test_bench_bfloat16_without_ml_dtypes_is_bad_input():
    code = ("import sys; sys.modules['ml_dtypes'] = None\n"
            "from fastopt import bench\n"
            "sys.exit(bench.main(['--dtype', 'bfloat16', '--quick']))\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "needs ml_dtypes" in r.stderr and "fastopt[bf16]" in r.stderr


@needs_bf16
def test_demo_trains_with_bfloat16_state(capsys):
    pytest.importorskip("sklearn")
    from fastopt import demo
    assert demo.main(["--optimizers", "adam,momentum", "--epochs", "3",
                      "--state-dtype", "bfloat16"]) == 0
    out = capsys.readouterr().out
    final = [line.split() for line in out.splitlines() if line.strip().startswith(("adam", "momentum"))
             and "%" in line and "epoch" not in line]
    assert len(final) == 2 and all(float(f[2].rstrip("%")) > 90 for f in final), out
    assert demo.main(["--epochs", "1", "--state-dtype", "bfloat16", "--dtype", "float64"]) == 2


def test_sr_keys_make_the_bits_independent_of_how_a_parameter_is_cut(rng):
    # One parameter, or its two halves as parameters keyed by their place in
    # it: stochastic rounding draws the same bits for every element.
    from fastopt import _layout, _optim
    bf16 = pytest.importorskip("ml_dtypes").bfloat16
    p = rng.standard_normal(1000).astype(np.float32)
    halves = [p[:379].copy(), p[379:].copy()]

    def native(params, keys):
        states, masters = _layout.state_arrays(params, [(True, True, False)] * len(params),
                                               np.dtype(bf16))
        steps = np.zeros(len(params), np.int64)
        f = _optim.FusedStep("adam", params, [0] * len(params), 1, states, masters, steps,
                             state_dtype="bfloat16", state_rounding="stochastic", seed=5,
                             sr_keys=keys)
        return f, states

    group = [{"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0,
              "amsgrad": False, "maximize": False, "decoupled_weight_decay": False}]
    whole, ws = native([p], None)
    cut, cs = native(halves, [(0, 0), (0, 379)])
    for t in range(3):
        g = rng.standard_normal(1000).astype(np.float32)
        whole.step([g], [dict(group[0], params=[p])])
        cut.step([g[:379].copy(), g[379:].copy()], [dict(group[0], params=halves)])
    np.testing.assert_array_equal(np.concatenate(halves), p)
    for k in range(2):
        np.testing.assert_array_equal(np.concatenate([cs[0][k], cs[1][k]]).view(np.uint16),
                                      ws[0][k].view(np.uint16))
    with pytest.raises(ValueError, match=r"sr_keys\[0\] must be a pair"):
        native([p], [(0, -1)])


@pytest.mark.parametrize("kind, group, slots", [
    ("adam", {"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.1,
              "amsgrad": False, "maximize": False, "decoupled_weight_decay": True},
     (True, True, False)),
    ("sgd", {"lr": 0.1, "momentum": 0.9, "dampening": 0.0, "weight_decay": 0.0,
             "nesterov": False, "maximize": False}, (True, False, False)),
])
@pytest.mark.parametrize("grad16", [True, False])
def test_split_master_is_the_float32_master(kind, group, slots, grad16, rng):
    # A bfloat16 parameter whose master is split (the parameter holds its
    # high 16 bits, a uint16 array the low ones) computes the float32
    # master's bits exactly; the parameter is that master truncated.
    from fastopt import _layout, _optim
    bf16 = pytest.importorskip("ml_dtypes").bfloat16
    n = 3000                                    # blocks of 1024 and a tail
    start = rng.standard_normal(n).astype(bf16)

    def native(split):
        p = start.copy()
        states, masters = _layout.state_arrays([p], [slots])
        if split:
            masters = [np.zeros(n, np.uint16)]  # low bits of an exact master: 0
        else:
            _optim._convert(p, masters[0])
        steps = np.zeros(1, np.int64)
        f = _optim.FusedStep(kind, [p], [0], 1, states, masters, steps)
        return f, p, masters[0], states

    a, pa, low, sa = native(True)
    b, pb, master, sb = native(False)
    for t in range(5):
        g = rng.standard_normal(n).astype(np.float32)
        g = g.astype(bf16) if grad16 else g
        a.step([g.copy()], [dict(group, params=[pa])])
        b.step([g.copy()], [dict(group, params=[pb])])
    whole = (pa.view(np.uint16).astype(np.uint32) << 16) | low
    np.testing.assert_array_equal(whole.view(np.float32), master)
    np.testing.assert_array_equal(pa.view(np.uint16), (master.view(np.uint32) >> 16))
    for x, y in zip(sa[0], sb[0]):
        if x is not None:
            np.testing.assert_array_equal(x, y)
    assert not np.array_equal(pa.view(np.uint16), pb.view(np.uint16))   # truncated vs rounded
