"""Deterministic cases whose results are pinned bit for bit (tests/test_bitpins.py).

Each case builds its inputs from a fixed seed (``numpy.random.default_rng`` of
the CRC-32 of the case's name), runs fastopt and returns every array it
computed: updated parameters, every state array, master copies, step counts,
returned values (as float64 arrays) and flags.  `digest` reduces them to one
SHA-256; tools/bitpins.py stores the digests in tests/data/bitpins.json and
test_bitpins.py recomputes them.

Sizes hit SIMD tails (1, 7, 31, 33), the optimizer's 4096-element chunks
(4095, 4097, 9000) and its threaded grain (70000 float32 values are 4
grains), and the other kernels' chunks and grains (noted where they are
chosen).  Cases marked ``bf16`` need ml_dtypes (bfloat16 arrays or state).

The inputs come from NumPy's Generator (``standard_normal``, ``random``,
``integers``, ``choice``...) and NumPy/ml_dtypes casts to float16/bfloat16:
NumPy does not promise the Generator's streams across versions, so a NumPy
that changed them would move the pins without any change in fastopt (the
pins were made with the NumPy and ml_dtypes that tests/data/bitpins.json
names).  The digests hash the arrays' bytes in native order: the pins are
those of a little-endian machine.
"""
import hashlib
import zlib
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

import fastopt
from fastopt import lr_scheduler

try:
    import ml_dtypes
    BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:           # the bf16 extra is optional: its cases are skipped
    ml_dtypes = None
    BF16 = None

STEPS = 20
# Functional kernels: SIMD tails, around the 4096-element chunk, threaded.
SIZES = (1, 7, 31, 33, 4095, 4097, 9000, 70000)
# Optimizer objects: the same sizes, some as 2-D shapes, plus a 0-d and an empty array.
MODEL_SHAPES = ((), (0,), (1,), (7,), (31,), (3, 11), (45, 91), (4097,), (90, 100), (70000,))
# clip_grad_norm_ and EWA thread from 2 * 65536 elements: one array above that.
BIG = 140000
# Gradient magnitudes, cycled over the steps (clipping applies to some steps only).
GRAD_SCALES = (1.0, 0.01, 3.0, 0.1, 0.001, 0.5, 2.0)


class Case(NamedTuple):
    fn: Callable[..., list[Any]]
    args: tuple[Any, ...]
    bf16: bool          # needs ml_dtypes


CASES: dict[str, Case] = {}


def _add(name: str, fn: Callable[..., list[Any]], *args: Any, bf16: bool = False) -> None:
    assert name not in CASES, name
    CASES[name] = Case(fn, args, bf16)


def run_case(name: str) -> list[np.ndarray]:
    """The outputs of case `name`, as arrays."""
    case = CASES[name]
    if case.bf16 and BF16 is None:
        raise RuntimeError(f"case {name} needs ml_dtypes")
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    return [np.asarray(a) for a in case.fn(rng, *case.args)]


def digest(outputs: list[np.ndarray]) -> str:
    """SHA-256 of the arrays' dtypes, shapes and raw bytes, in order."""
    h = hashlib.sha256()
    for a in outputs:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.name}|{a.dtype.str}|{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()


# ------------------------------------------------------------- helpers ---

def _dtype(name: str) -> np.dtype[Any]:
    return BF16 if name == "bfloat16" else np.dtype(name)


def _is_half(dt: np.dtype[Any]) -> bool:
    return dt.itemsize == 2


def _randn(rng: np.random.Generator, shape: Any, dtype: Any, scale: float = 1.0) -> np.ndarray:
    return np.asarray(rng.standard_normal(shape) * scale).astype(dtype)     # 0-d: an array


def _grad(rng: np.random.Generator, shape: Any, dtype: Any, scale: float = 1.0) -> np.ndarray:
    """Uniform in [-scale, scale): five times cheaper to draw than normal
    values, which made most of the cases' time."""
    dtype = np.dtype(dtype)
    wide = np.float64 if dtype == np.float64 else np.float32
    u = rng.random(shape, dtype=wide)
    return np.asarray((u - wide(0.5)) * wide(2 * scale)).astype(dtype)     # 0-d: an array


def _tag(opts: dict[str, Any]) -> str:
    """A short name for a set of keyword arguments."""
    if not opts:
        return "default"
    parts = []
    for k, v in opts.items():
        parts.append(k if v is True else f"{k}={v}")
    return ",".join(parts)


# --------------------------------------------------- functional kernels ---

def _functional(rng, kernel, dtype, opts, grad_dtype=None, layout="contiguous", sizes=SIZES):
    """`kernel` over each size for STEPS steps; a 16-bit `dtype` goes through a
    float32 master (gradients of `grad_dtype`, default the param's)."""
    dt = _dtype(dtype)
    half = _is_half(dt)
    wdt = np.float32 if half else dt
    gdt = _dtype(grad_dtype) if grad_dtype else dt
    out = []
    for n in sizes:
        p = _randn(rng, n, dt)
        master = p.astype(np.float32) if half else None
        extra = {} if master is None else {"master": master}
        zeros = lambda: np.zeros(n, wdt)     # noqa: E731
        if kernel in ("adam_step", "adamw_step"):
            st = [zeros(), zeros()] + ([zeros()] if opts.get("amsgrad") else [])
        elif kernel == "rmsprop_step":
            st = [zeros()]
            if opts.get("momentum", 0) > 0:
                st.append(zeros())
                extra["momentum_buffer"] = st[-1]
            if opts.get("centered"):
                st.append(zeros())
                extra["grad_avg"] = st[-1]
        else:
            st = [zeros()] if opts.get("momentum", 0) > 0 else []
        for step in range(1, STEPS + 1):
            scale = GRAD_SCALES[step % len(GRAD_SCALES)]
            if layout == "strided":           # read only: copied first
                g = _grad(rng, 2 * n, gdt, scale)[::2]
            elif layout == "byteswapped":
                g = _grad(rng, n, gdt, scale).astype(gdt.newbyteorder(">"))
            else:
                g = _grad(rng, n, gdt, scale)
            if kernel in ("adam_step", "adamw_step"):
                getattr(fastopt, kernel)(p, g, st[0], st[1], step=step,
                                         max_exp_avg_sq=st[2] if len(st) > 2 else None,
                                         **opts, **extra)
            elif kernel == "rmsprop_step":
                fastopt.rmsprop_step(p, g, st[0], **opts, **extra)
            else:
                fastopt.sgd_step(p, g, st[0] if st else None, first_step=step == 1,
                                 **opts, **extra)
        out += [p] + ([master] if half else []) + st
    return out


ADAM_OPTS = [dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, **o) for o in (
    {}, {"amsgrad": True}, {"maximize": True}, {"amsgrad": True, "maximize": True},
    {"weight_decay": 0.05}, {"weight_decay": 0.05, "amsgrad": True},
    {"weight_decay": 0.05, "maximize": True},
    {"weight_decay": 0.05, "decoupled_weight_decay": True},
    {"weight_decay": 0.05, "decoupled_weight_decay": True, "amsgrad": True, "maximize": True})]
ADAMW_OPTS = [dict(lr=3e-3, **o) for o in (
    {}, {"amsgrad": True}, {"maximize": True}, {"weight_decay": 0.1, "amsgrad": True,
                                                "maximize": True})]
RMSPROP_OPTS = [dict(lr=1e-3, **o) for o in (
    {}, {"alpha": 0.9, "eps": 1e-6}, {"weight_decay": 0.01}, {"maximize": True},
    {"momentum": 0.9}, {"centered": True}, {"momentum": 0.9, "centered": True},
    {"momentum": 0.5, "centered": True, "weight_decay": 0.01, "maximize": True})]
SGD_OPTS = [dict(lr=0.05, **o) for o in (
    {}, {"weight_decay": 0.01}, {"maximize": True},
    {"momentum": 0.9}, {"momentum": 0.9, "dampening": 0.1},
    {"momentum": 0.9, "nesterov": True}, {"momentum": 0.8, "nesterov": True, "weight_decay": 0.01},
    {"momentum": 0.9, "dampening": 0.5, "weight_decay": 0.01, "maximize": True},
    {"momentum": 0.9, "nesterov": True, "maximize": True})]
FUNCTIONAL = {"adam_step": ADAM_OPTS, "adamw_step": ADAMW_OPTS,
              "rmsprop_step": RMSPROP_OPTS, "sgd_step": SGD_OPTS}

for _kernel, _all_opts in FUNCTIONAL.items():
    for _opts in _all_opts:
        # named by the options that differ between this kernel's cases
        _shown = {k: v for k, v in _opts.items()
                  if not all(o.get(k, not v) == v for o in _all_opts)}
        for _dt in ("float32", "float64"):
            _add(f"{_kernel}/{_dt}/{_tag(_shown)}", _functional, _kernel, _dt, _opts)
    # 16-bit parameters through a float32 master: the richest options, the
    # gradient 16-bit or float32.
    _rich = _all_opts[-1]
    for _dt in ("float16", "bfloat16"):
        for _gdt in (_dt, "float32"):
            _add(f"{_kernel}/{_dt}/master/grad={_gdt}", _functional, _kernel, _dt, _rich, _gdt,
                 bf16=_dt == "bfloat16")
    # Gradients the kernel copies first (strided, byte-swapped): the same numbers.
    for _layout in ("strided", "byteswapped"):
        _add(f"{_kernel}/float32/{_layout}_grad", _functional, _kernel, "float32", _rich, None,
             _layout, (33, 4097))


# The functional kernels of the kinds after Adam, RMSprop and SGD: their
# state arrays (as torch starts them) and per-parameter numbers.
MORE_KERNELS = {
    "adagrad_step": (("sum",), ()), "adamax_step": (("exp_avg", "exp_inf"), ()),
    "nadam_step": (("exp_avg", "exp_avg_sq"), ("mu_product",)),
    "radam_step": (("exp_avg", "exp_avg_sq"), ()),
    "adadelta_step": (("square_avg", "acc_delta"), ()), "asgd_step": (("ax",), ("eta", "mu")),
    "rprop_step": (("prev", "step_size"), ()), "lion_step": (("exp_avg",), ()),
}
NO_STEP = ("adadelta_step", "rprop_step", "lion_step")


def _functional_more(rng, kernel, dtype, opts, grad_dtype=None, sizes=SIZES):
    """`kernel` over each size for STEPS steps (as `_functional`); the
    per-parameter numbers it returns are outputs too."""
    dt = _dtype(dtype)
    half = _is_half(dt)
    wdt = np.float32 if half else dt
    gdt = _dtype(grad_dtype) if grad_dtype else dt
    names, scalar_names = MORE_KERNELS[kernel]
    out = []
    for n in sizes:
        p = _randn(rng, n, dt)
        master = p.astype(np.float32) if half else None
        extra = {} if master is None else {"master": master}
        st = [np.full(n, 1e-2 if s == "step_size" else 0.0, wdt) for s in names]
        scalars = {"mu_product": 1.0, "eta": opts.get("lr", 1e-2), "mu": 1.0}
        scalars = {k: scalars[k] for k in scalar_names}
        for step in range(1, STEPS + 1):
            g = _grad(rng, n, gdt, GRAD_SCALES[step % len(GRAD_SCALES)])
            kw = dict(opts, **extra, **scalars)
            if kernel not in NO_STEP:
                kw["step"] = step
            new = getattr(fastopt, kernel)(p, g, *st, **kw)
            if scalar_names:
                scalars = dict(zip(scalar_names, new if isinstance(new, tuple) else (new,)))
        out += [p] + ([master] if half else []) + st + [np.array(list(scalars.values()))]
    return out


MORE_OPTS = {
    "adagrad_step": [{}, dict(lr=0.05, lr_decay=0.01, weight_decay=0.05, eps=1e-6, maximize=True)],
    "adamax_step": [{}, dict(lr=1e-2, betas=(0.3, 0.9), eps=1e-6, weight_decay=0.05,
                             maximize=True)],
    "nadam_step": [{}, dict(lr=1e-2, betas=(0.8, 0.99), weight_decay=0.05, momentum_decay=0.01,
                            maximize=True),
                   dict(lr=1e-2, weight_decay=0.05, decoupled_weight_decay=True)],
    "radam_step": [{}, dict(lr=1e-2, betas=(0.8, 0.9), weight_decay=0.05, maximize=True),
                   dict(lr=1e-2, betas=(0.4, 0.99), weight_decay=0.05,
                        decoupled_weight_decay=True)],
    "adadelta_step": [{}, dict(lr=0.5, rho=0.8, eps=1e-4, weight_decay=0.05, maximize=True)],
    "asgd_step": [{}, dict(lr=0.05, lambd=0.1, alpha=0.5, t0=7, weight_decay=0.05,
                           maximize=True)],
    "rprop_step": [{}, dict(etas=(0.3, 1.1), step_sizes=(1e-3, 0.07), maximize=True)],
    "lion_step": [{}, dict(lr=1e-2, betas=(0.95, 0.98), weight_decay=0.1, maximize=True)],
}

for _kernel, _all_opts in MORE_OPTS.items():
    for _opts in _all_opts:
        for _dt in ("float32", "float64"):
            _add(f"{_kernel}/{_dt}/{_tag(_opts)}", _functional_more, _kernel, _dt, _opts)
    _rich = _all_opts[1]
    for _dt in ("float16", "bfloat16"):
        for _gdt in (_dt, "float32"):
            _add(f"{_kernel}/{_dt}/master/grad={_gdt}", _functional_more, _kernel, _dt, _rich,
                 _gdt, bf16=_dt == "bfloat16")



def _adafactor(rng, dtype, opts, grad_dtype=None):
    """adafactor_step for STEPS steps over a vector, a matrix, a batch of
    matrices, a tall and a wide one (blocks of rows and columns)."""
    dt = _dtype(dtype)
    half = _is_half(dt)
    wdt = np.float32 if half else dt
    gdt = _dtype(grad_dtype) if grad_dtype else dt
    out = []
    for shape in ((), (4097,), (45, 91), (3, 7, 11), (20000, 3), (2, 9000)):
        p = _randn(rng, shape, dt)
        extra = {"master": p.astype(np.float32)} if half else {}
        if len(shape) >= 2:
            st = {"row_var": np.zeros(shape[:-1] + (1,), wdt),
                  "col_var": np.zeros(shape[:-2] + (1, shape[-1]), wdt)}
        else:
            st = {"variance": np.zeros(shape, wdt)}
        for step in range(1, STEPS + 1):
            g = _grad(rng, shape, gdt, GRAD_SCALES[step % len(GRAD_SCALES)])
            fastopt.adafactor_step(p, g, step=step, **st, **extra, **opts)
        out += [p] + list(extra.values()) + list(st.values())
    return out


ADAFACTOR_OPTS = [{}, dict(lr=0.05, beta2_decay=-0.5, eps=(1e-5, 1e-2), d=2.0, weight_decay=0.1,
                           maximize=True)]
for _opts in ADAFACTOR_OPTS:
    for _dt in ("float32", "float64"):
        _add(f"adafactor_step/{_dt}/{_tag(_opts)}", _adafactor, _dt, _opts)
for _dt in ("float16", "bfloat16"):
    for _gdt in (_dt, "float32"):
        _add(f"adafactor_step/{_dt}/master/grad={_gdt}", _adafactor, _dt, ADAFACTOR_OPTS[1], _gdt,
             bf16=_dt == "bfloat16")


# ----------------------------------------------------- optimizer objects ---

# (class, config name) -> (constructor keywords, group 1's overrides)
OPT_CONFIGS = {
    ("SGD", "plain"): (dict(lr=0.05), dict(lr=0.02, weight_decay=0.01)),
    ("SGD", "momentum"): (dict(lr=0.05, momentum=0.9, dampening=0.1),
                          dict(momentum=0.5, dampening=0.0, weight_decay=1e-3)),
    ("SGD", "nesterov"): (dict(lr=0.03, momentum=0.9, nesterov=True),
                          dict(lr=0.01, maximize=True)),
    ("SGD", "maximize"): (dict(lr=0.02, momentum=0.8, weight_decay=0.05, maximize=True),
                          dict(maximize=False, lr=0.04)),
    ("RMSprop", "plain"): (dict(lr=1e-2), dict(alpha=0.9, eps=1e-6)),
    ("RMSprop", "centered"): (dict(lr=1e-3, centered=True, momentum=0.9, weight_decay=1e-2),
                              dict(centered=False, momentum=0.5)),
    ("RMSprop", "maximize"): (dict(lr=1e-3, maximize=True, momentum=0.3),
                              dict(centered=True, lr=3e-3)),
    ("Adam", "plain"): (dict(lr=1e-3), dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-6)),
    ("Adam", "amsgrad"): (dict(lr=1e-2, amsgrad=True, weight_decay=0.01),
                          dict(amsgrad=False, weight_decay=0.0)),
    ("Adam", "decoupled"): (dict(lr=1e-2, maximize=True, decoupled_weight_decay=True,
                                 weight_decay=0.1),
                            dict(decoupled_weight_decay=False, maximize=False)),
    ("AdamW", "plain"): (dict(lr=1e-3), dict(weight_decay=0.0)),
    ("AdamW", "amsgrad"): (dict(lr=1e-2, amsgrad=True, maximize=True),
                           dict(lr=3e-3, weight_decay=0.1)),
}
# Each class's richest config, for the low-precision and loss-scaling cases.
RICH = {"SGD": "momentum", "RMSprop": "centered", "Adam": "amsgrad", "AdamW": "amsgrad"}


def _model(rng, dtypes, shapes=MODEL_SHAPES):
    """Parameters of `shapes`, dtypes cycling through `dtypes`, split into two
    interleaved groups; returns the groups and the flat list (optimizer order)."""
    params = [_randn(rng, s, _dtype(dtypes[i % len(dtypes)])) for i, s in enumerate(shapes)]
    g0, g1 = params[0::2], params[1::2]
    return g0, g1, g0 + g1


def _grads(rng, params, step, scale=1.0, half_grads="mixed"):
    """One step's gradients: None for some parameters (a different set each
    step); 16-bit parameters get 16-bit gradients (even positions) or
    float32 ones (odd), or all float32/16-bit by `half_grads`."""
    scale *= GRAD_SCALES[step % len(GRAD_SCALES)]
    grads = []
    for i, p in enumerate(params):
        if (step + i) % 7 == 0:
            grads.append(None)
            continue
        dt = p.dtype
        if _is_half(dt) and (half_grads == "float32" or half_grads == "mixed" and i % 2):
            dt = np.dtype(np.float32)
        grads.append(_grad(rng, p.shape, dt, scale))
    return grads


def _opt_outputs(opt, params, *extra):
    out = list(params)
    for st in opt.state:
        out += [st[k] for k in sorted(st)]
    out.append(opt.steps)
    return out + [np.asarray(e) for e in extra]


def _make_opt(cls, config, g0, g1, **kw):
    defaults, over = OPT_CONFIGS[(cls, config)]
    return getattr(fastopt, cls)([{"params": g0}, {"params": g1, **over}], **defaults, **kw)


def _optimizer(rng, cls, config, dtypes, kw=None, half_grads="mixed"):
    g0, g1, params = _model(rng, dtypes)
    opt = _make_opt(cls, config, g0, g1, **(kw or {}))
    for step in range(1, STEPS + 1):
        opt.step(_grads(rng, params, step, half_grads=half_grads))
    return _opt_outputs(opt, params)


def _poison(grads, value):
    """Put `value` into the middle of the last non-empty gradient."""
    g = next(g for g in reversed(grads) if g is not None and g.size)
    g.flat[g.size // 2] = value


def _scaled(rng, cls, config, dtypes, kw=None):
    """step(grads, grad_scale=S) with gradients S times too large; steps 6 and
    13 hold an inf (then a NaN): nothing changes, found_inf is True."""
    g0, g1, params = _model(rng, dtypes)
    opt = _make_opt(cls, config, g0, g1, **(kw or {}))
    found = []
    for step in range(1, STEPS + 1):
        S = 1024.0 if step < 10 else 96.0
        grads = _grads(rng, params, step, scale=S)
        if step in (6, 13):
            _poison(grads, np.inf if step == 6 else np.nan)
        opt.step(grads, grad_scale=S)
        found.append(opt.found_inf)
    return _opt_outputs(opt, params, found)


MIXED = ("float32", "float64")
for (_cls, _config) in OPT_CONFIGS:
    for _dts in (("float32",), ("float64",), MIXED):
        _add(f"{_cls}/{_config}/{'+'.join(_dts)}", _optimizer, _cls, _config, _dts)
for _cls, _config in RICH.items():
    for _rounding in ("nearest", "stochastic"):
        _kw = dict(state_dtype="bfloat16", state_rounding=_rounding, seed=1234)
        _add(f"{_cls}/{_config}/float32/state=bfloat16-{_rounding}", _optimizer, _cls, _config,
             ("float32",), _kw, bf16=True)
    _add(f"{_cls}/{_config}/float16", _optimizer, _cls, _config, ("float16",))
    _add(f"{_cls}/{_config}/float16+float32/grads=float32", _optimizer, _cls, _config,
         ("float16", "float32"), None, "float32")
    _add(f"{_cls}/{_config}/bfloat16", _optimizer, _cls, _config, ("bfloat16",), bf16=True)
    _add(f"{_cls}/{_config}/bfloat16+float16/state=bfloat16-stochastic", _optimizer, _cls,
         _config, ("bfloat16", "float16"), dict(state_dtype="bfloat16", seed=77), bf16=True)
    _add(f"{_cls}/{_config}/float16/state=bfloat16-nearest", _optimizer, _cls, _config,
         ("float16",), dict(state_dtype="bfloat16", state_rounding="nearest"), "float16",
         bf16=True)
    _add(f"{_cls}/{_config}/float32+float64/grad_scale", _scaled, _cls, _config, MIXED)
    _add(f"{_cls}/{_config}/float16/grad_scale", _scaled, _cls, _config, ("float16",))
    _add(f"{_cls}/{_config}/float32+bfloat16/grad_scale/state=bfloat16", _scaled, _cls, _config,
         ("float32", "bfloat16"), dict(state_dtype="bfloat16", seed=5), bf16=True)


# --------------------------------------------------------------- clipping ---

CLIP_SHAPES = MODEL_SHAPES + ((BIG,),)
# max_norm about the norm of the middle gradient scales: some steps clip, some not.
MAX_NORM = {2: 60.0, 1: 3e4, float("inf"): 1.5, 3: 12.0}


def _clip_norm(rng, norm_type, dtypes):
    """clip_grad_norm_ before every SGD step; the norms are outputs too."""
    g0, g1, params = _model(rng, dtypes, CLIP_SHAPES)
    opt = fastopt.SGD([{"params": g0}, {"params": g1, "lr": 0.02}], lr=0.01, momentum=0.9)
    norms = []
    for step in range(1, STEPS + 1):
        grads = _grads(rng, params, step)
        norms.append(fastopt.clip_grad_norm_(grads, MAX_NORM[norm_type], norm_type))
        opt.step(grads)
    return _opt_outputs(opt, params, grads[-1], norms)


def _clip_value(rng, dtypes):
    g0, g1, params = _model(rng, dtypes, CLIP_SHAPES)
    opt = fastopt.Adam([{"params": g0}, {"params": g1, "lr": 3e-3}], lr=1e-3)
    for step in range(1, STEPS + 1):
        grads = _grads(rng, params, step)
        fastopt.clip_grad_value_(grads, 0.25 * (1 + step % 3))
        opt.step(grads)
    return _opt_outputs(opt, params, grads[-1])


def _flat_clip(rng, dtype):
    """The flat-buffer layout: parameters and gradients views of one buffer
    each, clip_grad_norm_ on the flat gradient buffer."""
    flat_p, params = fastopt.flat_views([_randn(rng, s, dtype) for s in CLIP_SHAPES])
    flat_g, grads = fastopt.flat_views(params, copy=False)
    opt = fastopt.AdamW(params, lr=1e-2)
    norms = []
    for step in range(1, STEPS + 1):
        scale = GRAD_SCALES[step % len(GRAD_SCALES)]
        for g in grads:
            g[...] = _grad(rng, g.shape, dtype, scale)
        norms.append(fastopt.clip_grad_norm_(flat_g, 50.0))
        opt.step(grads)
    return _opt_outputs(opt, [flat_p, flat_g], norms)


for _p in MAX_NORM:
    _ptag = "inf" if _p == float("inf") else str(_p)
    _add(f"clip_grad_norm_/p={_ptag}/float32+float64", _clip_norm, _p, MIXED)
    _add(f"clip_grad_norm_/p={_ptag}/float16", _clip_norm, _p, ("float16",))
    _add(f"clip_grad_norm_/p={_ptag}/bfloat16+float32", _clip_norm, _p, ("bfloat16", "float32"),
         bf16=True)
_add("clip_grad_value_/float32+float64", _clip_value, MIXED)
_add("clip_grad_value_/float16", _clip_value, ("float16",))
_add("clip_grad_value_/bfloat16", _clip_value, ("bfloat16",), bf16=True)
for _dt in MIXED:
    _add(f"flat_views+clip_grad_norm_/{_dt}", _flat_clip, _dt)


# ------------------------------------------------------ GradScaler, lr, state ---

def _grad_scaler(rng, cls, dtypes, unscale_every):
    """GradScaler drives the scale (growth every 4 clean steps, backoff on
    inf); every `unscale_every` steps: unscale_, then clip, then step."""
    g0, g1, params = _model(rng, dtypes)
    opt = _make_opt(cls, RICH[cls], g0, g1)
    scaler = fastopt.GradScaler(init_scale=2.0**10, growth_interval=4)
    scales, norms = [], []
    for step in range(1, STEPS + 1):
        grads = [None if g is None else scaler.scale(g)
                 for g in _grads(rng, params, step, half_grads="float32")]
        if step in (5, 14):
            _poison(grads, np.inf)
        if step % unscale_every == 0:
            scaler.unscale_(opt, grads)
            norms.append(fastopt.clip_grad_norm_(grads, 5.0))
        scaler.step(opt, grads)
        scaler.update()
        scales.append(scaler.get_scale())
    return _opt_outputs(opt, params, scales, norms)


_add("GradScaler/Adam/float16", _grad_scaler, "Adam", ("float16",), 3)
_add("GradScaler/SGD/float32+float16", _grad_scaler, "SGD", ("float32", "float16"), 2)
_add("GradScaler/AdamW/bfloat16", _grad_scaler, "AdamW", ("bfloat16",), 5, bf16=True)


def _scheduled(rng, cls, config, dtypes, make_sched):
    """An lr scheduler stepped after every optimizer step; the lrs are outputs."""
    g0, g1, params = _model(rng, dtypes)
    opt = _make_opt(cls, config, g0, g1)
    sched = make_sched(opt)
    lrs = []
    for step in range(1, STEPS + 1):
        opt.step(_grads(rng, params, step))
        if isinstance(sched, lr_scheduler.ReduceLROnPlateau):
            sched.step(float(np.abs(params[-1]).sum()))
        else:
            sched.step()
        lrs.append([g["lr"] for g in opt.param_groups])
    return _opt_outputs(opt, params, lrs)


SCHEDULES = {
    "SequentialLR(LinearLR,CosineAnnealingLR)": ("Adam", "plain", lambda o: lr_scheduler.SequentialLR(
        o, [lr_scheduler.LinearLR(o, start_factor=0.01, total_iters=5),
            lr_scheduler.CosineAnnealingLR(o, T_max=15)], milestones=[5])),
    "OneCycleLR": ("SGD", "nesterov", lambda o: lr_scheduler.OneCycleLR(
        o, max_lr=0.1, total_steps=STEPS + 1)),
    "StepLR": ("RMSprop", "centered", lambda o: lr_scheduler.StepLR(o, step_size=4, gamma=0.5)),
    "CosineAnnealingWarmRestarts": ("AdamW", "amsgrad", lambda o: (
        lr_scheduler.CosineAnnealingWarmRestarts(o, T_0=3, T_mult=2, eta_min=1e-5))),
    "InverseTimeLR": ("Adam", "amsgrad", lambda o: lr_scheduler.InverseTimeLR(o, decay_rate=0.3)),
    "ExponentialLR": ("SGD", "momentum", lambda o: lr_scheduler.ExponentialLR(o, gamma=0.9)),
    "MultiStepLR": ("RMSprop", "plain", lambda o: lr_scheduler.MultiStepLR(
        o, milestones=[3, 9, 15], gamma=0.3)),
    "LambdaLR": ("AdamW", "plain", lambda o: lr_scheduler.LambdaLR(o, lambda e: 1 / (1 + e) ** 0.5)),
    "ReduceLROnPlateau": ("SGD", "plain", lambda o: lr_scheduler.ReduceLROnPlateau(
        o, mode="max", factor=0.5, patience=1)),
}
for _name, (_cls, _config, _make) in SCHEDULES.items():
    _add(f"lr_scheduler/{_name}/{_cls}", _scheduled, _cls, _config, MIXED, _make)


def _resumed(rng, cls, dtypes, kw=None):
    """Half the steps, state_dict into a fresh optimizer over copies of the
    parameters, the other half there."""
    g0, g1, params = _model(rng, dtypes)
    opt = _make_opt(cls, RICH[cls], g0, g1, **(kw or {}))
    for step in range(1, STEPS // 2 + 1):
        opt.step(_grads(rng, params, step))
    sd = opt.state_dict()
    c0, c1 = [p.copy() for p in g0], [p.copy() for p in g1]
    for p in c0 + c1:          # the load restores 16-bit parameters from their masters
        if _is_half(p.dtype):
            p[...] = 0
    opt2 = _make_opt(cls, RICH[cls], c0, c1, **(kw or {}))
    opt2.load_state_dict(sd)
    copies = c0 + c1
    for step in range(STEPS // 2 + 1, STEPS + 1):
        opt2.step(_grads(rng, copies, step))
    return _opt_outputs(opt2, copies)


def _added_group(rng, cls, dtypes):
    """The second group joins after 8 steps (add_param_group)."""
    g0, g1, _ = _model(rng, dtypes)
    defaults, over = OPT_CONFIGS[(cls, RICH[cls])]
    opt = getattr(fastopt, cls)([{"params": g0}], **defaults)
    for step in range(1, STEPS + 1):
        if step == 9:
            opt.add_param_group({"params": g1, **over})
        params = g0 + g1 if step >= 9 else g0
        opt.step(_grads(rng, params, step))
    return _opt_outputs(opt, g0 + g1)


for _cls in RICH:
    _add(f"state_dict/{_cls}/float32+float64", _resumed, _cls, MIXED)
    _add(f"add_param_group/{_cls}/float32+float64", _added_group, _cls, MIXED)
_add("state_dict/Adam/float16/state=bfloat16-stochastic", _resumed, "Adam", ("float16",),
     dict(state_dtype="bfloat16", seed=9), bf16=True)


# -------------------------------------------------------------- BatchNorm ---

# (shape, channel axis): 2-D; few and many (> CHUNK_C = 1024) channels; the row
# layout (inner < 16) and the segment layout, with inner above the 8192-value
# box; channels-last; sizes above the 32768-element grain (threads).
BN_SHAPES = [((2, 5), 1), ((64, 7), 1), ((300, 33), 1), ((70, 1500), 1), ((9000, 8), 1),
             ((4, 5, 6), 1), ((8, 3, 17, 19), 1), ((16, 8, 32, 32), 1), ((2, 3, 100, 100), 1),
             ((8, 17, 19, 3), -1), ((16, 16, 16, 40), -1)]


def _batchnorm(rng, shape, axis, dtype):
    """Two training steps (forward, backward, running stats updated), one
    without running stats, then inference with the running stats."""
    dt = _dtype(dtype)
    cdt = np.float32 if _is_half(dt) else dt      # gamma, beta, running stats
    C = shape[axis]
    gamma = (1 + 0.2 * rng.standard_normal(C)).astype(cdt)
    beta = (0.1 * rng.standard_normal(C)).astype(cdt)
    rm, rv = np.zeros(C, cdt), np.ones(C, cdt)
    shift = rng.standard_normal(C)

    def x_and_dy():
        where = [1] * len(shape)
        where[axis] = C
        x = (_grad(rng, shape, np.float64, 3.0) + shift.reshape(where)).astype(dt)
        return x, _grad(rng, shape, dt)

    out = []

    def both(x, dy, **kw):
        y, ctx = fastopt.batch_norm_forward(x, gamma, beta, axis=axis, **kw)
        out.extend([y, ctx.mean, ctx.invstd, *fastopt.batch_norm_backward(dy, ctx)])

    for _ in range(2):
        both(*x_and_dy(), running_mean=rm, running_var=rv, momentum=0.3)
    both(*x_and_dy(), eps=1e-3)
    both(*x_and_dy(), running_mean=rm, running_var=rv, training=False)
    return out + [rm, rv]


for _shape, _axis in BN_SHAPES:
    for _dt in ("float32", "float64", "float16", "bfloat16"):
        _name = f"batch_norm/{'x'.join(map(str, _shape))}/axis={_axis}/{_dt}"
        _add(_name, _batchnorm, _shape, _axis, _dt, bf16=_dt == "bfloat16")


# ---------------------------------------------------- softmax, cross-entropy ---

# (shape, axis): 1-D; C below SMALL_C = 64 (the blocked path, 256 rows a
# block) and above; rows of several 2048-element chunks; one long row (the
# few-long-rows schedule); a non-last axis (the strided kernel); sizes above
# the 8192-element grain.
SOFTMAX_SHAPES = [((7,), -1), ((70000,), -1), ((1, 1), -1), ((300, 10), -1), ((257, 63), -1),
                  ((64, 65), -1), ((33, 1000), -1), ((3, 4097), -1), ((2, 9000), -1),
                  ((100, 40), 0), ((4, 33, 50), 1), ((16, 100, 20), 1)]


def _logits(rng, shape, dt, axis=-1, masked=True):
    """Logits of mixed magnitudes along `axis`; if `masked`, a -inf (a masked
    class) in every third row."""
    last = np.moveaxis(np.empty(shape), axis, -1).shape      # the class axis last
    x = rng.standard_normal(last) * rng.choice([0.5, 4.0, 40.0], size=last)
    if masked and last[-1] > 1:
        x.reshape(-1, last[-1])[::3, last[-1] // 2] = -np.inf
    return np.ascontiguousarray(np.moveaxis(x, -1, axis)).astype(dt)


def _softmax(rng, shape, axis, dtype):
    x = _logits(rng, shape, _dtype(dtype), axis)
    return [fastopt.log_softmax(x, axis=axis), fastopt.softmax(x, axis=axis)]


CE_SHAPES = [(1, 1), (300, 10), (257, 63), (64, 1000), (4, 9000), (1000, 3)]


def _cross_entropy(rng, shape, dtype, targets):
    """Reductions, label smoothing, class weights and ignored rows, with the
    gradient: every output of each call.  Masked (-inf) logits in a call of
    their own: with label smoothing they make the loss inf."""
    dt = _dtype(dtype)
    half = _is_half(dt)
    n, c = shape
    x = _logits(rng, shape, dt, masked=False)
    weight = rng.uniform(0.2, 2.0, c).astype(np.float32 if half else dt)
    if targets == "index":
        y = rng.integers(0, c, n)
        y_ign = y.copy()
        y_ign[::5] = -100
        y_ign = y_ign.astype(np.int32)
        calls = [(y, dict(reduction="mean")),
                 (y_ign, dict(reduction="sum", weight=weight)),
                 (y_ign, dict(reduction="none", weight=weight, label_smoothing=0.1)),
                 (y, dict(reduction="mean", label_smoothing=0.2)),
                 (y, dict(reduction="mean", weight=weight, ignore_index=c // 2,
                          label_smoothing=0.05))]
    else:
        t = np.exp(rng.standard_normal(shape) * 2)
        t /= t.sum(axis=1, keepdims=True)
        hot = np.arange(0, n, 4)                                # one-hot rows
        t[hot] = 0.0
        t[hot, rng.integers(0, c, len(hot))] = 1.0
        t = t.astype(np.float32 if half else dt)
        t16 = t.astype(dt)
        calls = [(t, dict(reduction="mean")),
                 (t16, dict(reduction="sum", weight=weight)),
                 (t, dict(reduction="none", label_smoothing=0.1)),
                 (t16, dict(reduction="mean", weight=weight, label_smoothing=0.3))]
    out = []
    for target, kw in calls:
        loss, grad = fastopt.cross_entropy(x, target, return_grad=True, **kw)
        out += [loss, grad, fastopt.cross_entropy(x, target, **kw)]
    target, kw = calls[1]
    return out + list(fastopt.cross_entropy(_logits(rng, shape, dt), target, return_grad=True,
                                            **kw))


for _dt in ("float32", "float64", "float16", "bfloat16"):
    for _shape, _axis in SOFTMAX_SHAPES:
        _add(f"softmax/{'x'.join(map(str, _shape))}/axis={_axis}/{_dt}", _softmax, _shape,
             _axis, _dt, bf16=_dt == "bfloat16")
    for _shape in CE_SHAPES:
        for _targets in ("index", "probabilities"):
            _add(f"cross_entropy/{'x'.join(map(str, _shape))}/{_targets}/{_dt}", _cross_entropy,
                 _shape, _dt, _targets, bf16=_dt == "bfloat16")


# --------------------------------------------------------------- training ---

def _ewa(rng, dtype):
    """ewa_update over sizes up to BIG (threaded from 2 * 65536 elements),
    with bias correction; the EWA class on the same arrays."""
    out = []
    for n in (1, 7, 33, 4097, BIG):
        avg = np.zeros(n, dtype)
        ema = fastopt.EWA(0.95)
        raw = fastopt.EWA(0.8, bias_correction=False)
        for t in range(1, STEPS + 1):
            x = _grad(rng, n, dtype, GRAD_SCALES[t % len(GRAD_SCALES)])
            fastopt.ewa_update(avg, x, 0.9)
            value = ema.update(x)
            raw.update(x)
        out += [avg, fastopt.bias_corrected(avg, 0.9, STEPS), value, raw.value]
    return out


def _ewa_numbers(rng):
    ema = fastopt.EWA(0.9)
    values = [ema.update(float(v)) for v in rng.standard_normal(STEPS) * 10 + 20]
    return values + [fastopt.bias_corrected(ema.avg, 0.9, ema.t)]


def _take_rows(rng):
    """Row gathers of several row sizes; the largest above the 256 KiB grain."""
    out = []
    for shape, dt in (((10000, 33), np.float32), ((5000,), np.int64), ((500, 3, 7), np.float64),
                      ((3000, 5), np.uint8), ((1, 4), np.float32)):
        X = (rng.standard_normal(shape) * 100).astype(dt)
        idx = rng.integers(0, shape[0], 2 * shape[0])
        out.append(fastopt.take_rows(X, idx))
        buf = np.empty((len(idx),) + shape[1:], dt)
        out.append(fastopt.take_rows(X, idx[::-1].copy(), out=buf))
    return out


def _minibatches(rng, variant):
    X = rng.standard_normal((1000, 13)).astype(np.float32)
    Y = rng.integers(0, 10, 1000)
    if variant == "fortran":            # not C-contiguous: NumPy's gather
        X = np.asfortranarray(X)
    kw = {"shuffle": True, "rng": 20240601}
    if variant == "drop_last":
        kw["drop_last"] = True
    if variant == "indices":
        kw.update(indices=rng.permutation(1000)[:600], shuffle=False)
    out = []
    for xb, yb in fastopt.minibatches(X, Y, 64, copy=variant == "copy", **kw):
        out += [xb.copy(), yb.copy()]
    # a Generator: a new order each epoch
    gen = np.random.default_rng(3)
    for _ in range(2):
        for xb, yb in fastopt.minibatches(X, Y, 100, rng=gen):
            out += [xb.copy(), yb.copy()]
    return out


for _dt in MIXED:
    _add(f"ewa_update+EWA/{_dt}", _ewa, _dt)
_add("EWA/numbers", _ewa_numbers)
_add("take_rows", _take_rows)
for _variant in ("views", "copy", "drop_last", "indices", "fortran"):
    _add(f"minibatches/{_variant}", _minibatches, _variant)
