"""A random search (hypothesis) over the validation layer of every public
function and optimizer method.

Each case starts from a valid call and changes one argument:

* to something that must be refused (wrong type, dtype or byte order for an
  array that is written, shape, layout, read-only, unaligned, aliasing,
  huge/negative/NaN/inf numbers, arrays for scalars, strings...): the call
  must raise TypeError/ValueError (IndexError where documented) and leave
  every array, optimizer and the thread cap byte-identical;
* or to an equivalent input that must be accepted (an array that is only read,
  byte-swapped, strided, Fortran-ordered, read-only or unaligned; class
  indices of another integer dtype): the results must have the same bits as
  the plain call's.

The numbers of cases tried, refused cleanly and accepted with identical
results are printed at the end of the pytest run (conftest.py).  A crash or a
hang stops the run.  The second half checks random valid shapes near the
kernels' blocking constants against the NumPy references of the other tests.
FASTOPT_FUZZ_EXAMPLES sets the cases per API (default 60, about 20 s in all).
"""
import collections
import math
import os
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastopt
from fastopt import _config
from fastopt.optim import Optimizer
from conftest import DTYPES, tol
from test_batchnorm import close as bn_close
from test_batchnorm import ref_backward, ref_forward
from test_optim_kernels import adam_cases, check_one_step, rmsprop_cases, sgd_cases
from test_softmax import check_ce, ref_log_softmax
from test_training import ref_ewa, ref_take_rows

# Read by conftest.py's terminal summary.
COUNTS = collections.Counter()
OTHER = ">" if np.little_endian else "<"
ERRORS = (TypeError, ValueError)

# ------------------------------------------------------------- mutations ---


def swapped(a):
    return a.astype(a.dtype.newbyteorder(OTHER))


def strided(a):
    b = np.zeros(a.shape + (2,), a.dtype)
    b[..., 0] = a
    return b[..., 0]


def read_only(a):
    a = a.copy()
    a.flags.writeable = False
    return a


def unaligned(a):
    raw = np.zeros(a.nbytes + 1, np.uint8)
    u = raw[1:].view(a.dtype).reshape(a.shape)
    u[...] = a
    return u


def reversed_view(a):
    return a.reshape(-1)[::-1].reshape(a.shape) if a.ndim else a


class Slot:
    """How an argument may be broken.

    role: "write" (array updated in place), "read" (array only read),
    "index" (class indices), "idx64" (take_rows' int64 rows), "real",
    "int", "flag", "choice", "list" (of written arrays), "grads" (a list of
    read arrays) or "other" (the API lists its own bad values).  `half_ok`:
    float16 is a valid dtype there (a 16-bit parameter or gradient: its
    numerics are tested in test_lowprec.py), so it is not tried as bad.
    """

    def __init__(self, role, *, optional=False, lo=None, hi=None, lo_open=False,
                 hi_open=False, inf_ok=False, free_shape=False, bad=(), item=None,
                 half_ok=False):
        self.role, self.optional, self.lo, self.hi = role, optional, lo, hi
        self.lo_open, self.hi_open, self.inf_ok = lo_open, hi_open, inf_ok
        self.half_ok = half_ok
        self.free_shape, self.bad = free_shape, list(bad)
        self.item = item        # lists: the slot of each element


REAL_BAD = [math.nan, "0.5", b"1", np.array([0.5]), 1j, object(), [0.5], 10**400, -10**400]
INT_BAD = [1.5, np.float64(2.0), "3", np.array([3]), np.array([[1]]), [1], object(), True]
NON_FLOAT = [np.int32, np.int64, np.float16, np.complex64, np.bool_, object]


def _bad_shapes(shape):
    out = [shape + (1,), shape + (2,)]
    if shape:
        out += [shape[:-1], shape[:-1] + (shape[-1] + 1,), ()]
        if shape[-1] > 0:
            out.append(shape[:-1] + (shape[-1] - 1,))
    else:
        out += [(1,), (2,)]
    return out


def _other_float(a):
    return np.float64 if a.dtype == np.float32 else np.float32


def candidates(api, values):
    """(description, mutate(values) -> values, expectation) for every slot."""
    out = []
    arrays = {k: v for k, v in values.items() if isinstance(v, np.ndarray) and k in api.slots}

    def setter(key, make):
        def mutate(vals):
            vals[key] = make(vals.get(key))
            return vals
        return mutate

    for key, slot in api.slots.items():
        v = values.get(key)
        role = slot.role
        bad = list(slot.bad)
        if role in ("real", "int"):
            bad += REAL_BAD if role == "real" else INT_BAD
            if role == "int" and slot.hi is not None:
                bad += [10**400, slot.hi + 1]
            if slot.lo is not None:
                bad += [slot.lo - 1] + ([slot.lo] if slot.lo_open else [])
            if slot.hi is not None and math.isfinite(slot.hi):
                bad += [slot.hi + 1] + ([slot.hi] if slot.hi_open else [])
            if role == "real":
                bad += [-math.inf] + ([] if slot.inf_ok else [math.inf])
            if not slot.optional:
                bad.append(None)
        elif role == "flag":
            bad.append(np.array([1, 2]))
        elif role == "choice":
            bad += ["avg", "", None, 3, b"mean"]
        for b in bad:
            out.append((f"{key}={b!r:.40}", setter(key, lambda _, b=b: b), "error"))
        if not isinstance(v, np.ndarray) and role not in ("list", "grads"):
            continue
        if role in ("write", "read"):
            for b in ([v.tolist(), 1.0, "abc"] + ([] if slot.optional else [None])):
                out.append((f"{key} not an array", setter(key, lambda _, b=b: b), "error"))
            for dt in NON_FLOAT:
                if slot.half_ok and dt is np.float16:
                    continue
                out.append((f"{key} as {np.dtype(dt)}", setter(key, lambda a, dt=dt: a.astype(dt)),
                            "error"))
            if not slot.free_shape:
                # (an array that sets the shape also sets the dtype the others must have)
                out.append((f"{key} other float", setter(
                    key, lambda a: a.astype(_other_float(a))), "error"))
                for shp in _bad_shapes(v.shape):
                    out.append((f"{key} shape {shp}", setter(
                        key, lambda a, shp=shp: np.zeros(shp, a.dtype)), "error"))
            layouts = [("swapped", swapped), ("read-only", read_only)]
            if v.size > 1:
                layouts.append(("strided", strided))
            if v.size > 0:
                layouts.append(("unaligned", unaligned))
            if v.size and sum(d > 1 for d in v.shape) >= 2:
                layouts.append(("fortran", np.asfortranarray))
            for name, f in layouts:
                out.append((f"{key} {name}", setter(key, f), "error" if role == "write" else "same"))
            if role == "write" and v.size > 0:
                for other, w in arrays.items():
                    if other != key and w.shape == v.shape and w.dtype == v.dtype:
                        in_place_ok = other in api.may_alias.get(key, ())   # (out=x)
                        if not in_place_ok:
                            out.append((f"{other} is {key}", _alias(key, other), "error"))
                        if not (in_place_ok and v.size == 1) and \
                                other not in api.view_alias_ok.get(key, ()):
                            out.append((f"{other} reversed view of {key}",
                                        _alias(key, other, True), "error"))
        elif role == "index":
            n = v.shape[0]
            for dt in ("<i8", ">i8", ">u8", np.int32, np.uint16, np.int16):
                out.append((f"{key} as {np.dtype(dt)}", setter(key, lambda a, dt=dt: a.astype(dt)),
                            "same"))
            for name, f in (("strided", strided), ("read-only", read_only), ("unaligned", unaligned)):
                if v.size > (1 if name == "strided" else 0):
                    out.append((f"{key} {name}", setter(key, f), "same"))
            for dt in (np.float32, np.float64, np.bool_, object):
                out.append((f"{key} as {np.dtype(dt)}", setter(key, lambda a, dt=dt: a.astype(dt)),
                            "error"))
            if n:
                for bad_value, dt in ((api.classes, np.int64), (-1, np.int64), (2**63, np.uint64),
                                      (2**64 - 100, ">u8")):
                    out.append((f"{key}[0]={bad_value}", setter(
                        key, lambda a, b=bad_value, dt=dt: _with_first(a.astype(dt), b)), "error"))
            out.append((f"{key} shape", setter(key, lambda a: np.zeros((n + 1,), a.dtype)), "error"))
        elif role == "idx64":
            for name, f in (("swapped", swapped), ("strided", strided), ("read-only", read_only),
                            ("unaligned", unaligned)):
                if v.size > (1 if name == "strided" else 0):
                    out.append((f"{key} {name}", setter(key, f), "same"))
            for dt in (np.int32, np.uint64, np.float64, np.bool_):
                out.append((f"{key} as {np.dtype(dt)}", setter(key, lambda a, dt=dt: a.astype(dt)),
                            "error"))
            out.append((f"{key} 2-d", setter(key, lambda a: a.reshape(1, -1)), "error"))
            if v.size:
                for b in (api.rows, -1, 2**62):
                    out.append((f"{key}[0]={b}", setter(key, lambda a, b=b: _with_first(a, b)),
                                "error"))
        elif role in ("list", "grads"):
            for b in (None, 42, "abc"):
                out.append((f"{key}={type(b).__name__}", setter(key, lambda _, b=b: b), "error"))
            for i, a in enumerate(v):
                if a is None:
                    continue
                for desc, mut, expect in candidates(_One(slot.item), {"a": a}):
                    out.append((f"{key}[{i}]: {desc}", _in_list(key, i, mut), expect))
            if role == "list" and v and v[0].size:
                out.append((f"{key} twice", setter(key, lambda lst: lst + [lst[0]]), "error"))
                out.append((f"{key} overlapping", setter(
                    key, lambda lst: lst + [reversed_view(lst[0])]), "error"))
    return out


class _One:
    """A one-argument API, to reuse `candidates` for list elements."""

    def __init__(self, slot):
        self.slots = {"a": slot}
        self.may_alias = self.view_alias_ok = {}


def _with_first(a, value):
    a = a.copy()
    a.reshape(-1)[0] = value
    return a


def _alias(key, other, view=False):
    def mutate(vals):
        vals[other] = reversed_view(vals[key]) if view else vals[key]
        return vals
    return mutate


def _in_list(key, i, mut):
    def mutate(vals):
        lst = list(vals[key])
        lst[i] = mut({"a": lst[i]})["a"]
        vals[key] = lst
        return vals
    return mutate


# --------------------------------------------------- copies and snapshots ---

def clone_optimizer(opt):
    groups = [{k: (v if k != "params" else [p.copy() for p in v]) for k, v in g.items()}
              for g in opt.param_groups]
    new = type(opt)(groups)
    new.load_state_dict(opt.state_dict())
    return new


def deep_copy(v):
    if isinstance(v, np.ndarray):
        return v.copy()
    if isinstance(v, Optimizer):
        return clone_optimizer(v)
    if isinstance(v, list):
        return [deep_copy(x) for x in v]
    if isinstance(v, tuple):
        return tuple(deep_copy(x) for x in v)
    if isinstance(v, dict):
        return {k: deep_copy(x) for k, x in v.items()}
    return v


def _collect(v, arrays, meta):
    if isinstance(v, np.ndarray):
        while isinstance(v, np.ndarray):
            arrays.append(v)
            v = v.base
    elif isinstance(v, Optimizer):
        _collect(list(v._fused.params), arrays, meta)
        groups = v.param_groups
        if isinstance(groups, list) and all(isinstance(g, dict) for g in groups):
            groups = [sorted((k, repr(x)) for k, x in g.items() if k != "params") for g in groups]
        meta.append(repr(groups))       # (a mutated case may have made them anything)
        for st_ in v.state:
            _collect(list(st_.values()), arrays, meta)
        meta.append(v.steps.tobytes())
    elif isinstance(v, (list, tuple)):
        for x in v:
            _collect(x, arrays, meta)
    elif isinstance(v, dict):
        for x in v.values():
            _collect(x, arrays, meta)


def snapshot(values):
    arrays, meta = [], [_config._thread_limit]
    _collect(values, arrays, meta)
    return [(a, a.tobytes()) for a in arrays], meta


def unchanged(values, snap):
    arrays, meta = snapshot(values)
    return [b for _, b in arrays] == [b for _, b in snap[0]] and meta == snap[1]


def bits(v):
    """Something that compares equal exactly when the values have the same bits."""
    if isinstance(v, np.ndarray):
        return ("array", v.dtype.newbyteorder("=").str, v.shape,
                v.astype(v.dtype.newbyteorder("=")).tobytes())
    if isinstance(v, float):
        return ("float", struct.pack("<d", v))
    if isinstance(v, (list, tuple)):
        return tuple(bits(x) for x in v)
    if isinstance(v, dict):
        return tuple((k, bits(x)) for k, x in sorted(v.items()))
    if isinstance(v, Optimizer):
        params = [p for g in v.param_groups for p in g["params"]]
        return bits((params, [dict(st_) for st_ in v.state], v.steps))
    if isinstance(v, fastopt.BatchNormContext):
        return bits((v.x, v.gamma, v.mean, v.invstd, v.training, v.axis))
    return repr(v)


# ---------------------------------------------------------------- the APIs ---

class Api:
    def __init__(self, name, build, run, slots, errors=ERRORS, may_alias=None,
                 view_alias_ok=None, **extra):
        self.name, self.build, self.run, self.slots = name, build, run, slots
        # may_alias: the same array is allowed (out=x in place); view_alias_ok:
        # a strided view of the written array is allowed (the call copies it
        # before anything is written: the forward pass's x for the backward)
        self.errors, self.may_alias = errors, may_alias or {}
        self.view_alias_ok = view_alias_ok or {}
        self.__dict__.update(extra)

    def outputs(self, values, result):
        """What a call produced: its result and every array it writes."""
        written = [values[k] for k, s in self.slots.items()
                   if s.role in ("write", "list") and k in values]
        return bits((result, written, values.get("opt")))


def shapes(min_dims=0, max_dims=3, max_side=5, min_side=0):
    return st.lists(st.integers(min_side, max_side), min_size=min_dims,
                    max_size=max_dims).map(tuple)


def arr(draw, shape, dtype, positive=False, scale=1.0, shift=0.0):
    """A random array (an ndarray also when 0-d)."""
    seed = draw(st.integers(0, 2**32 - 1))
    a = np.random.default_rng(seed).standard_normal(shape)
    if positive:
        a = np.abs(a)
    return np.asarray(a * scale + shift).astype(dtype)


def build_adam(draw, decoupled=False):
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(shapes())
    v = dict(param=arr(draw, shape, dtype), grad=arr(draw, shape, dtype),
             exp_avg=arr(draw, shape, dtype), exp_avg_sq=arr(draw, shape, dtype, True),
             step=draw(st.integers(1, 10)), lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
             weight_decay=draw(st.sampled_from([0.0, 0.01])), maximize=draw(st.booleans()))
    if draw(st.booleans()):
        v.update(amsgrad=True, max_exp_avg_sq=arr(draw, shape, dtype, True))
    return v


def run_adam(v, fn=fastopt.adam_step):
    kw = {k: x for k, x in v.items() if k not in ("param", "grad", "exp_avg", "exp_avg_sq")}
    return fn(v["param"], v["grad"], v["exp_avg"], v["exp_avg_sq"], **kw)


ADAM_SLOTS = dict(param=Slot("write", free_shape=True), grad=Slot("read"), exp_avg=Slot("write"),
                  exp_avg_sq=Slot("write"), max_exp_avg_sq=Slot("write"),
                  step=Slot("int", lo=1, hi=2**63 - 1), lr=Slot("real", lo=0),
                  betas=Slot("other", bad=[(0.9,), 0.9, "ab", (0.9, 1.0), (1.0, 0.9), (-0.1, 0.9),
                                           (math.nan, 0.9), (0.9, 10**400), None,
                                           np.array([0.9, 0.99])]),
                  eps=Slot("real", lo=0), weight_decay=Slot("real", lo=0), maximize=Slot("flag"))


def build_rmsprop(draw):
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(shapes())
    v = dict(param=arr(draw, shape, dtype), grad=arr(draw, shape, dtype),
             square_avg=arr(draw, shape, dtype, True, shift=1.0), lr=1e-2, alpha=0.99, eps=1e-8,
             weight_decay=0.0, momentum=0.0)
    if draw(st.booleans()):
        v.update(momentum=0.9, momentum_buffer=arr(draw, shape, dtype))
    if draw(st.booleans()):
        v.update(centered=True, grad_avg=arr(draw, shape, dtype, scale=0.1))
    return v


def run_rmsprop(v):
    kw = {k: x for k, x in v.items() if k not in ("param", "grad", "square_avg")}
    return fastopt.rmsprop_step(v["param"], v["grad"], v["square_avg"], **kw)


def build_sgd(draw):
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(shapes())
    v = dict(param=arr(draw, shape, dtype), grad=arr(draw, shape, dtype), lr=0.1,
             momentum=0.0, dampening=0.0, weight_decay=0.0)
    if draw(st.booleans()):
        v.update(momentum=0.9, momentum_buffer=arr(draw, shape, dtype),
                 nesterov=draw(st.booleans()))
    return v


def run_sgd(v):
    kw = {k: x for k, x in v.items() if k not in ("param", "grad")}
    return fastopt.sgd_step(v["param"], v["grad"], **kw)


# Adagrad ... Lion: (kernel, state arrays (True: >= 0), with step, numbers, their slots)
_UNIT_PAIR_BAD = ADAM_SLOTS["betas"].bad
MORE_KERNELS = {
    "adagrad_step": (fastopt.adagrad_step, dict(sum=True), True, {},
                     dict(lr=Slot("real", lo=0), lr_decay=Slot("real", lo=0),
                          weight_decay=Slot("real", lo=0), eps=Slot("real", lo=0))),
    "adamax_step": (fastopt.adamax_step, dict(exp_avg=False, exp_inf=True), True, {},
                    dict(lr=Slot("real", lo=0), betas=ADAM_SLOTS["betas"],
                         eps=Slot("real", lo=0), weight_decay=Slot("real", lo=0))),
    "nadam_step": (fastopt.nadam_step, dict(exp_avg=False, exp_avg_sq=True), True,
                   dict(mu_product=0.5),
                   dict(mu_product=Slot("real", lo=0, hi=1), lr=Slot("real", lo=0),
                        betas=ADAM_SLOTS["betas"], eps=Slot("real", lo=0),
                        weight_decay=Slot("real", lo=0), momentum_decay=Slot("real", lo=0),
                        decoupled_weight_decay=Slot("flag"))),
    "radam_step": (fastopt.radam_step, dict(exp_avg=False, exp_avg_sq=True), True, {},
                   dict(lr=Slot("real", lo=0), betas=ADAM_SLOTS["betas"],
                        eps=Slot("real", lo=0), weight_decay=Slot("real", lo=0),
                        decoupled_weight_decay=Slot("flag"))),
    "adadelta_step": (fastopt.adadelta_step, dict(square_avg=True, acc_delta=True), False, {},
                      dict(lr=Slot("real", lo=0), rho=Slot("real", lo=0, hi=1),
                           eps=Slot("real", lo=0), weight_decay=Slot("real", lo=0))),
    "asgd_step": (fastopt.asgd_step, dict(ax=False), True, dict(eta=0.01, mu=0.5),
                  dict(eta=Slot("real", lo=0), mu=Slot("real", lo=0, hi=1),
                       lr=Slot("real", lo=0), lambd=Slot("real", lo=0),
                       alpha=Slot("real", lo=0), t0=Slot("real"),
                       weight_decay=Slot("real", lo=0))),
    "rprop_step": (fastopt.rprop_step, dict(prev=False, step_size=True), False, {},
                   dict(etas=Slot("other", bad=[(0.5,), 0.5, "ab", (0.0, 1.2), (1.0, 1.2),
                                                (0.5, 1.0), (math.nan, 1.2), (0.5, 10**400),
                                                None, np.array([0.5, 1.2])]),
                        step_sizes=Slot("other", bad=[(1e-6,), 1e-6, (-1e-6, 50),
                                                      (1e-6, math.inf), (math.nan, 50), None]))),
    "lion_step": (fastopt.lion_step, dict(exp_avg=False), False, {},
                  dict(lr=Slot("real", lo=0), betas=ADAM_SLOTS["betas"],
                       weight_decay=Slot("real", lo=0))),
}


def build_more(name):
    fn, states, with_step, numbers, _ = MORE_KERNELS[name]

    def build(draw):
        dtype = draw(st.sampled_from(DTYPES))
        shape = draw(shapes())
        v = dict(param=arr(draw, shape, dtype), grad=arr(draw, shape, dtype),
                 maximize=draw(st.booleans()), **numbers)
        for s, positive in states.items():
            v[s] = arr(draw, shape, dtype, positive, scale=0.1 if s == "step_size" else 1.0)
        if with_step:
            v["step"] = draw(st.integers(1, 10))
        return v
    return build


def run_more(name):
    fn, states, _, _, _ = MORE_KERNELS[name]

    def run(v):
        kw = {k: x for k, x in v.items() if k not in ("param", "grad", *states)}
        return fn(v["param"], v["grad"], *(v[s] for s in states), **kw)
    return run


def more_slots(name):
    _, states, with_step, _, numbers = MORE_KERNELS[name]
    slots = dict(param=Slot("write", free_shape=True), grad=Slot("read"),
                 **{s: Slot("write") for s in states}, maximize=Slot("flag"), **numbers)
    if with_step:
        slots["step"] = Slot("int", lo=1, hi=2**63 - 1)
    return slots


def build_adafactor(draw):
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(shapes())
    v = dict(param=arr(draw, shape, dtype), grad=arr(draw, shape, dtype),
             step=draw(st.integers(1, 10)), lr=1e-2, beta2_decay=-0.8, eps=(None, 1e-3), d=1.0,
             weight_decay=draw(st.sampled_from([0.0, 0.01])), maximize=draw(st.booleans()))
    if len(shape) >= 2:
        v.update(row_var=arr(draw, shape[:-1] + (1,), dtype, True),
                 col_var=arr(draw, shape[:-2] + (1, shape[-1]), dtype, True))
    else:
        v["variance"] = arr(draw, shape, dtype, True)
    return v


def run_adafactor(v):
    kw = {k: x for k, x in v.items() if k not in ("param", "grad")}
    return fastopt.adafactor_step(v["param"], v["grad"], **kw)


ADAFACTOR_SLOTS = dict(
    param=Slot("write", free_shape=True), grad=Slot("read"),
    row_var=Slot("write", optional=True), col_var=Slot("write", optional=True),
    variance=Slot("write", optional=True), step=Slot("int", lo=1, hi=2**63 - 1),
    lr=Slot("real", lo=0), beta2_decay=Slot("real", hi=0), d=Slot("real", lo=1),
    eps=Slot("other", bad=[(-1.0, 1e-3), (None, -1.0), (None, None), (None,), 1e-3, "ab",
                           (math.nan, 1e-3), (None, math.inf), np.array([1e-30, 1e-3])]),
    weight_decay=Slot("real", lo=0), maximize=Slot("flag"))


def build_clip(draw):
    dtype = draw(st.sampled_from(DTYPES))
    grads = [arr(draw, draw(shapes(1)), dtype) for _ in range(draw(st.integers(1, 3)))]
    return dict(grads=grads, max_norm=draw(st.sampled_from([0.5, 1e9, math.inf])),
                norm_type=draw(st.sampled_from([2.0, 1.0, 3.0, math.inf])))


OPTIMIZERS = {"SGD": (fastopt.SGD, dict(lr=0.1, momentum=0.9)), "RMSprop": (fastopt.RMSprop, {}),
              "Adam": (fastopt.Adam, dict(amsgrad=True)), "AdamW": (fastopt.AdamW, {})}
OPT_HYPER = {"lr": Slot("real", lo=0), "weight_decay": Slot("real", lo=0),
             "momentum": Slot("real", lo=0), "dampening": Slot("real", lo=0, hi=1),
             "alpha": Slot("real", lo=0, hi=1, hi_open=True), "eps": Slot("real", lo=0),
             "betas": ADAM_SLOTS["betas"]}


def build_construct(draw):
    name = draw(st.sampled_from(sorted(OPTIMIZERS)))
    dtype = draw(st.sampled_from(DTYPES))
    params = [arr(draw, draw(shapes(1)), dtype) for _ in range(draw(st.integers(1, 3)))]
    cls, kw = OPTIMIZERS[name]
    v = dict(cls=cls, params=params, **kw)
    return v


def run_construct(v):
    kw = {k: x for k, x in v.items() if k not in ("cls", "params")}
    v["cls"](v["params"], **kw)


def construct_slots(values):
    slots = {"params": Slot("list", item=Slot("write", free_shape=True, half_ok=True))}
    keys = {fastopt.SGD: ["lr", "momentum", "dampening", "weight_decay"],
            fastopt.RMSprop: ["lr", "alpha", "eps", "weight_decay", "momentum"],
            fastopt.Adam: ["lr", "betas", "eps", "weight_decay"],
            fastopt.AdamW: ["lr", "betas", "eps", "weight_decay"]}[values["cls"]]
    slots.update({k: OPT_HYPER[k] for k in keys})
    return slots


def build_opt(draw):
    name = draw(st.sampled_from(sorted(OPTIMIZERS)))
    cls, kw = OPTIMIZERS[name]
    dtype = draw(st.sampled_from(DTYPES))
    params = [arr(draw, draw(shapes(0)), dtype) for _ in range(draw(st.integers(1, 3)))]
    opt = cls(params, **kw)
    opt.step([arr(draw, p.shape, dtype) for p in params])
    grads = [arr(draw, p.shape, dtype) for p in params]
    if len(grads) > 1 and draw(st.booleans()):
        grads[0] = None
    return dict(opt=opt, grads=grads)


def run_step(v):
    v["opt"].step(v["grads"])


def build_scaled_step(draw):
    v = build_opt(draw)
    v["grad_scale"] = draw(st.sampled_from([1.0, 3.0, 2.0**16]))
    return v


def run_scaled_step(v):
    v["opt"].step(v["grads"], grad_scale=v["grad_scale"])


def build_clip_value(draw):
    v = build_clip(draw)
    return dict(grads=v["grads"], clip_value=draw(st.sampled_from([0.0, 0.5, 1e9])))


class _GroupHyper:
    """Mutations of the optimizer's param_groups before a step."""

    @staticmethod
    def candidates(values):
        opt = values["opt"]
        out = []
        for key in opt.param_groups[0]:
            if key == "params":
                continue          # (read at construction only)
            if key in OPT_HYPER:
                for desc, mut, expect in candidates(_One(OPT_HYPER[key]), {"a": opt.param_groups[0][key]}):
                    if expect == "error":
                        out.append((f"param_groups[0][{key!r}]: {desc}", _set_group(key, mut), "error"))
            out.append((f"param_groups[0] without {key!r}", _del_group(key), "error"))
        out.append(("param_groups=42", _set_groups(42), "error"))
        out.append(("an extra group", _set_groups("extra"), "error"))
        out.append(("grads of another length", lambda v: dict(v, grads=v["grads"] + [None]), "error"))
        return out


def _set_group(key, mut):
    def mutate(vals):
        g = vals["opt"].param_groups[0]
        g[key] = mut({"a": g[key]})["a"]
        return vals
    return mutate


def _del_group(key):
    def mutate(vals):
        del vals["opt"].param_groups[0][key]
        return vals
    return mutate


def _set_groups(value):
    def mutate(vals):
        opt = vals["opt"]
        if value == "extra":
            opt.param_groups = opt.param_groups + [dict(opt.param_groups[0], params=[])]
        else:
            opt.param_groups = value
        return vals
    return mutate


def build_load(draw):
    v = build_opt(draw)
    opt = v["opt"]
    sd = opt.state_dict()
    sd = {k: (np.asarray(x + 1) if isinstance(x, np.ndarray) and k.startswith("state.") else x)
          for k, x in sd.items()}
    return dict(opt=opt, sd=sd)


def run_load(v):
    v["opt"].load_state_dict(v["sd"])


def load_candidates(values):
    sd = values["sd"]
    out = [("state_dict=42", lambda v: dict(v, sd=42), "error"),
           ("state_dict=None", lambda v: dict(v, sd=None), "error"),
           ("state_dict a list", lambda v: dict(v, sd=list(v["sd"].items())), "error")]
    for key, x in sd.items():
        bads = [None, "x", object()]
        if key.endswith(".step"):
            bads += [2**63 - 1, 2**63, np.uint64(2**64 - 1), -1, 1.5, True, np.array([3])]
        elif key.startswith("state."):
            bads += [np.zeros(x.shape + (1,), x.dtype), x.astype(np.float16), x.tolist()]
        elif key == "optimizer":
            bads += ["SGD" if x != "SGD" else "Adam", np.array([x, x])]
        elif key.endswith(".params"):
            bads += [np.asarray(x) + 1, np.array([], np.int64)]
        elif key.split(".")[-1] in OPT_HYPER:
            bads += [b for b in (REAL_BAD + [-1.0])
                     if not (key.endswith("betas") and isinstance(b, list))]
        else:
            bads = [np.array([True, False])] if isinstance(x, bool) else []
        for b in bads:
            out.append((f"sd[{key!r}]={b!r:.30}", _set_sd(key, b), "error"))
        out.append((f"sd without {key!r}", _set_sd(key, _MISSING), "error"))
    out.append(("sd with an extra key", _set_sd("state.99.step", 0), "error"))
    out.append(("sd with a non-string key", _set_sd(7, 0), "error"))
    return out


_MISSING = object()


def _set_sd(key, value):
    def mutate(vals):
        sd = dict(vals["sd"])
        if value is _MISSING:
            del sd[key]
        else:
            sd[key] = value
        vals["sd"] = sd
        return vals
    return mutate


def build_bn(draw):
    dtype = draw(st.sampled_from(DTYPES))
    shape = (draw(st.integers(2, 5)), draw(st.integers(1, 5))) + draw(shapes(0, 2, 4, 1))
    axis = draw(st.sampled_from([1, -1] if len(shape) > 2 else [1]))
    C = shape[axis]
    v = dict(x=arr(draw, shape, dtype), gamma=arr(draw, (C,), dtype), beta=arr(draw, (C,), dtype),
             axis=axis, training=draw(st.booleans()), momentum=0.1, eps=1e-5)
    if np.prod(shape) // C < 2:
        v["training"] = False
    if draw(st.booleans()) or not v["training"]:
        v.update(running_mean=arr(draw, (C,), dtype),
                 running_var=arr(draw, (C,), dtype, True, shift=1.0))
    if draw(st.booleans()):
        v["out"] = np.zeros(shape, dtype)
    return v


def run_bn(v):
    kw = {k: x for k, x in v.items() if k not in ("x", "gamma", "beta")}
    return fastopt.batch_norm_forward(v["x"], v["gamma"], v["beta"], **kw)


BN_SLOTS = dict(x=Slot("read", free_shape=True, half_ok=True), gamma=Slot("read"), beta=Slot("read"),
                running_mean=Slot("write"), running_var=Slot("write"), out=Slot("write", optional=True),
                axis=Slot("int", bad=[5, -5]), training=Slot("flag"),
                momentum=Slot("real", lo=0, hi=1), eps=Slot("real", lo=0, lo_open=True))


def build_bn_backward(draw):
    v = build_bn(draw)
    v.pop("out", None)
    if v["training"]:            # (the forward pass would update them: not the backward's doing)
        v.pop("running_mean", None)
        v.pop("running_var", None)
    v["dy"] = arr(draw, v["x"].shape, v["x"].dtype)
    if draw(st.booleans()):
        v["dx_out"] = np.zeros(v["x"].shape, v["x"].dtype)
    v["ctx"] = "forward"
    return v


def run_bn_backward(v):
    kw = {k: x for k, x in v.items() if k not in ("x", "gamma", "beta", "dy", "ctx", "dx_out")}
    _, ctx = fastopt.batch_norm_forward(v["x"], v["gamma"], v["beta"], **kw)
    if v["ctx"] == "empty":
        ctx = fastopt.BatchNormContext.__new__(fastopt.BatchNormContext)
    elif v["ctx"] == "other shape":
        _, ctx = fastopt.batch_norm_forward(np.ones((3, 2, 2)), np.ones(2), np.zeros(2))
    elif v["ctx"] != "forward":
        ctx = v["ctx"]
    return fastopt.batch_norm_backward(v["dy"], ctx, dx_out=v.get("dx_out"))


def build_softmax(draw):
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(shapes(1, 3))
    v = dict(x=arr(draw, shape, dtype, scale=5.0), axis=draw(st.integers(-len(shape), len(shape) - 1)))
    if draw(st.booleans()):
        v["out"] = np.zeros(shape, dtype)
    return v


SOFTMAX_SLOTS = dict(x=Slot("read", free_shape=True, half_ok=True), out=Slot("write", optional=True),
                     axis=Slot("int", bad=[3, -4]))


def build_ce(draw):
    dtype = draw(st.sampled_from(DTYPES))
    n, c = draw(st.integers(0, 6)), draw(st.integers(1, 6))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    v = dict(logits=arr(draw, (n, c), dtype, scale=3.0), reduction=draw(st.sampled_from(["sum", "none"])),
             label_smoothing=draw(st.sampled_from([0.0, 0.1])), ignore_index=-100,
             return_grad=True)
    if draw(st.booleans()):
        v["target"] = rng.integers(0, c, n)
    else:
        v["target"] = rng.dirichlet(np.ones(c), n).astype(dtype).reshape(n, c)
        v["ignore_index"] = -100
    if draw(st.booleans()):
        v["weight"] = rng.uniform(0.5, 2, c).astype(dtype)
    if draw(st.booleans()):
        v["grad_out"] = np.zeros((n, c), dtype)
    return v


def run_ce(v):
    kw = {k: x for k, x in v.items() if k not in ("logits", "target")}
    return fastopt.cross_entropy(v["logits"], v["target"], **kw)


def ce_slots(values):
    slots = dict(logits=Slot("read", free_shape=True, half_ok=True), weight=Slot("read", optional=True,
                                                                   bad=[np.array([-1.0])]),
                 grad_out=Slot("write", optional=True), reduction=Slot("choice"),
                 label_smoothing=Slot("real", lo=0, hi=1),
                 ignore_index=Slot("int", lo=-2**63, hi=2**63 - 1), return_grad=Slot("flag"))
    slots["target"] = Slot("index") if values["target"].ndim == 1 else Slot("read")
    c = values["logits"].shape[1]
    if "weight" in values:
        w = values["weight"]
        slots["weight"].bad = [np.full(c, -1.0, w.dtype), np.full(c, np.nan, w.dtype),
                               np.full(c, np.inf, w.dtype)]
    if values["target"].ndim == 2:
        slots["ignore_index"] = Slot("int", lo=-2**63, hi=2**63 - 1, bad=[0, 5])
    return slots


def build_take(draw):
    rows = draw(st.integers(1, 8))
    X = arr(draw, (rows,) + draw(shapes(0, 2, 4)), draw(st.sampled_from(DTYPES)))
    idx = np.random.default_rng(draw(st.integers(0, 99))).integers(0, rows, draw(st.integers(0, 6)))
    v = dict(X=X, idx=idx)
    if draw(st.booleans()):
        v["out"] = np.zeros((len(idx),) + X.shape[1:], X.dtype)
    return v


def run_take(v):
    return fastopt.take_rows(v["X"], v["idx"], v.get("out"))


def take_candidates(values):
    X = values["X"]
    out = [("X a list", lambda v: dict(v, X=v["X"].tolist()), "error"),
           ("X 0-d", lambda v: dict(v, X=np.array(1.0)), "error"),
           ("X of objects", lambda v: dict(v, X=v["X"].astype(object)), "error")]
    if X.size > 1:
        out.append(("X strided", lambda v: dict(v, X=strided(v["X"])), "error"))
    if "out" in values:
        o = values["out"]
        out += [("out of another dtype", lambda v: dict(v, out=v["out"].astype(np.int8)), "error"),
                ("out swapped", lambda v: dict(v, out=swapped(v["out"])), "error"),
                ("out read-only", lambda v: dict(v, out=read_only(v["out"])), "error"),
                ("out a list", lambda v: dict(v, out=v["out"].tolist()), "error"),
                ("out shape", lambda v: dict(v, out=np.zeros(o.shape + (1,), o.dtype)), "error")]
        if o.size > 1:
            out.append(("out strided", lambda v: dict(v, out=strided(v["out"])), "error"))
        if o.size and o.shape == X.shape:
            out.append(("out is X", lambda v: dict(v, out=v["X"]), "error"))
    return out


def build_minibatches(draw):
    m = draw(st.integers(0, 9))
    return dict(X=np.arange(m * 2.0).reshape(m, 2), Y=np.arange(m), batch_size=draw(st.integers(1, 4)),
                rng=draw(st.integers(0, 9)))


def run_minibatches(v):
    kw = {k: x for k, x in v.items() if k not in ("X", "Y", "batch_size")}
    return [tuple(b.copy() for b in batch)
            for batch in fastopt.minibatches(v["X"], v["Y"], v["batch_size"], **kw)]


MINIBATCH_SLOTS = dict(batch_size=Slot("int", lo=1), shuffle=Slot("flag"), drop_last=Slot("flag"),
                       copy=Slot("flag"),
                       X=Slot("other", bad=[np.array(1.0), np.zeros((99, 2))]),
                       Y=Slot("other", bad=[np.array(1), np.zeros(99)]),
                       rng=Slot("other", bad=["seed", -1, 1.5]))


def build_ewa_update(draw):
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(shapes())
    return dict(avg=arr(draw, shape, dtype), x=arr(draw, shape, dtype), beta=0.9)


def run_ewa_update(v):
    return fastopt.ewa_update(v["avg"], v["x"], v["beta"])


def build_bias(draw):
    v = build_ewa_update(draw)
    del v["x"]
    v["t"] = draw(st.integers(1, 9))
    return v


def run_bias(v):
    return fastopt.bias_corrected(v["avg"], v["beta"], v["t"], out=v.get("out"))


def build_ewa(draw):
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(shapes())
    return dict(beta=0.8, x=arr(draw, shape, dtype), x2=arr(draw, shape, dtype))


def run_ewa(v):
    e = fastopt.EWA(v["beta"])
    e.update(v["x"])
    return e.update(v["x2"])


def build_flat(draw):
    dtype = draw(st.sampled_from(DTYPES))
    return dict(arrays=[arr(draw, draw(shapes()), dtype) for _ in range(draw(st.integers(1, 3)))])


def run_flat(v):
    kw = {k: x for k, x in v.items() if k != "arrays"}
    return fastopt.flat_views(v["arrays"], **kw)


FLAT_SLOTS = dict(arrays=Slot("other", bad=[7, None, [np.ones(2, np.float32), np.ones(2)],
                                            [np.ones(3, np.int64)], [np.ones(2), (2, "x")],
                                            [np.ones(2), (-1,)], [np.ones(2), 5]]),
                  dtype=Slot("other", bad=[np.int64, ">f4", "abc", np.float16]),
                  copy=Slot("flag"))


def build_log_uniform(draw):
    return dict(low=1e-4, high=1.0, size=draw(st.sampled_from([None, 3, (2, 2)])), rng=0)


def run_log_uniform(v):
    return fastopt.log_uniform(v["low"], v["high"], v["size"], v["rng"])


def build_sample_beta(draw):
    return dict(low=0.9, high=0.999, size=draw(st.sampled_from([None, 4])), rng=1)


def run_sample_beta(v):
    return fastopt.sample_beta(v["low"], v["high"], v["size"], v["rng"])


SAMPLE_OTHER = dict(size=Slot("other", bad=[-1, "a", 1.5, (2, -1)]),
                    rng=Slot("other", bad=["seed", -1, 1.5]))


def build_threads(draw):
    return dict(n=draw(st.integers(0, 4)))


def run_threads(v):
    fastopt.set_num_threads(v["n"])
    fastopt.set_num_threads(0)          # (a valid call's cap is not kept)


APIS = [
    Api("adam_step", build_adam, run_adam, ADAM_SLOTS),
    Api("adamw_step", lambda d: {k: x for k, x in build_adam(d).items()},
        lambda v: run_adam(v, fastopt.adamw_step), ADAM_SLOTS),
    Api("rmsprop_step", build_rmsprop, run_rmsprop,
        dict(param=Slot("write", free_shape=True), grad=Slot("read"), square_avg=Slot("write"),
             momentum_buffer=Slot("write", optional=True), grad_avg=Slot("write", optional=True),
             lr=Slot("real", lo=0), alpha=Slot("real", lo=0, hi=1, hi_open=True),
             eps=Slot("real", lo=0), weight_decay=Slot("real", lo=0),
             momentum=Slot("real", lo=0), centered=Slot("flag"))),
    Api("sgd_step", build_sgd, run_sgd,
        dict(param=Slot("write", free_shape=True), grad=Slot("read"),
             momentum_buffer=Slot("write", optional=True), lr=Slot("real", lo=0),
             momentum=Slot("real", lo=0), dampening=Slot("real", lo=0, hi=1),
             weight_decay=Slot("real", lo=0), nesterov=Slot("flag"))),
    *[Api(name, build_more(name), run_more(name), more_slots(name)) for name in MORE_KERNELS],
    Api("adafactor_step", build_adafactor, run_adafactor, ADAFACTOR_SLOTS),
    Api("clip_grad_norm_", build_clip, lambda v: fastopt.clip_grad_norm_(
        v["grads"], v["max_norm"], v["norm_type"]),
        dict(grads=Slot("list", item=Slot("write", free_shape=True, optional=True, half_ok=True)),
             max_norm=Slot("real", lo=0, inf_ok=True),
             norm_type=Slot("real", lo=0, lo_open=True, inf_ok=True, bad=["2", "inf"]))),
    Api("clip_grad_value_", build_clip_value, lambda v: fastopt.clip_grad_value_(
        v["grads"], v["clip_value"]),
        dict(grads=Slot("list", item=Slot("write", free_shape=True, optional=True, half_ok=True)),
             clip_value=Slot("real", lo=0))),
    Api("optimizer construction", build_construct, run_construct, None),
    Api("optimizer step", build_opt, run_step,
        dict(grads=Slot("grads", item=Slot("read", optional=True), bad=[np.zeros(3)]))),
    Api("optimizer step with grad_scale", build_scaled_step, run_scaled_step,
        dict(grads=Slot("grads", item=Slot("read", optional=True), bad=[np.zeros(3)]),
             grad_scale=Slot("real", lo=0, lo_open=True, optional=True))),
    Api("load_state_dict", build_load, run_load, {}),
    Api("batch_norm_forward", build_bn, run_bn, BN_SLOTS),
    Api("batch_norm_backward", build_bn_backward, run_bn_backward,
        dict(x=Slot("read", free_shape=True), dy=Slot("read"), dx_out=Slot("write", optional=True),
             ctx=Slot("other", bad=[None, 42, ("x", "gamma"), "empty", "other shape"])),
        view_alias_ok={"dx_out": ("x",)}),
    Api("log_softmax", build_softmax, lambda v: fastopt.log_softmax(**v), SOFTMAX_SLOTS,
        may_alias={"out": ("x",)}),
    Api("softmax", build_softmax, lambda v: fastopt.softmax(**v), SOFTMAX_SLOTS,
        may_alias={"out": ("x",)}),
    Api("cross_entropy", build_ce, run_ce, None, classes=None),
    Api("take_rows", build_take, run_take, dict(idx=Slot("idx64")),
        errors=(TypeError, ValueError, IndexError)),
    Api("minibatches", build_minibatches, run_minibatches, MINIBATCH_SLOTS),
    Api("ewa_update", build_ewa_update, run_ewa_update,
        dict(avg=Slot("write", free_shape=True), x=Slot("read"),
             beta=Slot("real", lo=0, hi=1, hi_open=True))),
    Api("bias_corrected", build_bias, run_bias,
        dict(beta=Slot("real", lo=0, hi=1, hi_open=True), t=Slot("int", lo=1, hi=2**63 - 1),
             out=Slot("other", bad=["out", 3, [0.0]]))),
    Api("EWA", build_ewa, run_ewa,
        dict(beta=Slot("real", lo=0, hi=1, hi_open=True),
             x2=Slot("other", bad=[np.zeros(99), "abc", np.zeros((2, 99))]))),
    Api("flat_views", build_flat, run_flat, FLAT_SLOTS),
    Api("log_uniform", build_log_uniform, run_log_uniform,
        dict(low=Slot("real", lo=0, lo_open=True, bad=[2.0]), high=Slot("real", lo=0, lo_open=True,
                                                                           bad=[1e-5]),
             **SAMPLE_OTHER)),
    Api("sample_beta", build_sample_beta, run_sample_beta,
        dict(low=Slot("real", lo=0, hi=1, hi_open=True, bad=[0.9999]),
             high=Slot("real", lo=0, hi=1, hi_open=True, bad=[0.5]), **SAMPLE_OTHER)),
    Api("set_num_threads", build_threads, run_threads,
        dict(n=Slot("int", lo=0, hi=2**31 - 1, optional=True))),
]
SPECIAL = {"optimizer step": _GroupHyper.candidates, "load_state_dict": load_candidates,
           "take_rows": take_candidates}


def slots_for(api, values):
    if api.name == "optimizer construction":
        return construct_slots(values)
    if api.name == "cross_entropy":
        return ce_slots(values)
    return api.slots


def all_candidates(api, values):
    api.slots = slots_for(api, values)
    if api.name == "cross_entropy":
        api.classes = values["logits"].shape[1]
    if api.name == "take_rows":
        api.rows = values["X"].shape[0]
    out = candidates(api, values)
    if api.name in SPECIAL:
        out += SPECIAL[api.name](values)
    return out


def _run_case(api, values, desc, mutate, expect):
    COUNTS["cases"] += 1
    if expect == "error":
        bad = mutate(deep_copy(values))
        snap = snapshot(bad)
        try:
            api.run(bad)
        except api.errors:
            pass
        except Exception as e:                   # a wrong exception type
            COUNTS["wrong error"] += 1
            raise AssertionError(f"{api.name}, {desc}: {type(e).__name__}: {e}") from e
        else:
            COUNTS["accepted"] += 1
            raise AssertionError(f"{api.name}, {desc}: accepted")
        if not unchanged(bad, snap):
            COUNTS["changed"] += 1
            raise AssertionError(f"{api.name}, {desc}: an array changed")
        COUNTS["refused"] += 1
    else:
        ref_values = deep_copy(values)
        ref = api.outputs(ref_values, api.run(ref_values))
        mut_values = mutate(deep_copy(values))
        got = api.outputs(mut_values, api.run(mut_values))
        if got != ref:
            COUNTS["misread"] += 1
            raise AssertionError(f"{api.name}, {desc}: result differs from the plain call's")
        COUNTS["converted"] += 1


FUZZ = settings(max_examples=int(os.environ.get("FASTOPT_FUZZ_EXAMPLES", 60)), deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])


@pytest.mark.parametrize("api", APIS, ids=[a.name for a in APIS])
@FUZZ
@given(data=st.data())
def test_bad_or_equivalent_arguments(api, data):
    values = api.build(data.draw)
    cands = all_candidates(api, values)
    same = [c for c in cands if c[2] == "same"]
    if same and data.draw(st.integers(0, 2), label="equivalent input") == 0:
        cands = same                  # a third of the cases where there are any
    desc, mutate, expect = data.draw(st.sampled_from(cands), label="case")
    _run_case(api, values, desc, mutate, expect)


@pytest.mark.parametrize("api", APIS, ids=[a.name for a in APIS])
@settings(max_examples=5, deadline=None)
@given(data=st.data())
def test_valid_calls_are_valid(api, data):
    """The starting points are valid calls (else every case above is moot)."""
    values = api.build(data.draw)
    api.run(deep_copy(values))


# ====================================== valid shapes near blocking constants ===
# Sizes around the kernels' constants: SIMD widths (8, 16, 32 lanes), thread
# grains (8192, 16384, 65536 elements), chunks (NORM_CHUNK 16384, softmax's
# CHUNK 2048, SMALL_C 64, SMALL_ROWS 256, COLS 64; BatchNorm's BOX 8192,
# SEGMENT_MIN 16, CHUNK_C 1024, MIN_ROWS 64, GROUP_V 256).

def near(*values):
    return st.sampled_from(values).flatmap(lambda v: st.integers(max(v - 2, 0), v + 2))


NEAR = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
OPT_CASES = [*adam_cases(), *rmsprop_cases(), *sgd_cases()]


@NEAR
@given(n=near(16, 32, 4096, 16384, 32768), case=st.sampled_from(OPT_CASES),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_near_blocking_optimizer_kernels(n, case, dtype, seed):
    check_one_step(case, n, dtype, np.random.default_rng(seed), step=2)


@NEAR
@given(sizes=st.lists(near(8, 16384, 32768), min_size=1, max_size=3),
       norm_type=st.sampled_from([2.0, 1.0, 3.0, math.inf]), dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 2**16))
def test_near_blocking_clip_grad_norm(sizes, norm_type, dtype, seed):
    rng = np.random.default_rng(seed)
    grads = [rng.standard_normal(n).astype(dtype) for n in sizes]
    flat = np.concatenate([g.astype(np.float64) for g in grads])
    ref = np.linalg.norm(flat, ord=norm_type) if flat.size else 0.0
    before = [g.copy() for g in grads]
    total = fastopt.clip_grad_norm_(grads, 0.5, norm_type)
    np.testing.assert_allclose(total, ref, rtol=1e-12)
    coef = min(0.5 / (ref + 1e-6), 1.0)
    for g, b in zip(grads, before):
        np.testing.assert_allclose(g, b.astype(np.float64) * coef, **tol(dtype))


@NEAR
@given(n=near(2, 64, 256), c=near(1, 16, 64, 1024), inner=near(1, 16, 64),
       dtype=st.sampled_from(DTYPES), training=st.booleans(), seed=st.integers(0, 2**16))
def test_near_blocking_batch_norm(n, c, inner, dtype, training, seed):
    if n * inner < 2 or c < 1 or n * c * inner > 600_000:
        return
    rng = np.random.default_rng(seed)
    shape = (n, c, inner) if inner > 1 else (n, c)
    x = (rng.standard_normal(shape) * 2 + 0.5).astype(dtype)
    gamma, beta = rng.uniform(0.5, 1.5, c).astype(dtype), rng.standard_normal(c).astype(dtype)
    rm, rv = rng.standard_normal(c).astype(dtype), rng.uniform(0.5, 2, c).astype(dtype)
    y_ref, mean, invstd, rm_ref, rv_ref = ref_forward(x, gamma, beta, rm, rv, training, 0.1, 1e-5, 1)
    y, ctx = fastopt.batch_norm_forward(x, gamma, beta, rm, rv, training=training)
    bn_close(y, y_ref, dtype, "y")
    bn_close(rm, rm_ref, dtype, "running_mean")
    dy = rng.standard_normal(shape).astype(dtype)
    for a, b, what in zip(fastopt.batch_norm_backward(dy, ctx),
                          ref_backward(dy, x, gamma, mean, invstd, training, 1), "dx dgamma dbeta".split()):
        bn_close(a, b, dtype, what)


@NEAR
@given(n=near(1, 256, 512), c=near(1, 64, 2048), dtype=st.sampled_from(DTYPES),
       kind=st.sampled_from(["class", "prob"]), seed=st.integers(0, 2**16))
def test_near_blocking_softmax_and_cross_entropy(n, c, dtype, kind, seed):
    if c == 0 or n * c > 600_000:
        return
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n, c)) * 3).astype(dtype)
    np.testing.assert_allclose(fastopt.log_softmax(x), ref_log_softmax(x), **tol(dtype))
    xt = np.ascontiguousarray(x.T)              # the class axis first: the strided kernel
    np.testing.assert_allclose(fastopt.softmax(xt, axis=0), np.exp(ref_log_softmax(xt, axis=0)),
                               **tol(dtype))
    target = rng.integers(0, c, n) if kind == "class" else rng.random((n, c)).astype(dtype)
    check_ce(x, target, dtype, reduction="sum")


@NEAR
@given(rows=near(1, 4096, 16384), cols=st.sampled_from([1, 2, 16, 17]), dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 2**16))
def test_near_blocking_take_rows_and_ewa(rows, cols, dtype, seed):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((max(rows, 1), cols)).astype(dtype)
    idx = rng.integers(0, len(X), rows)
    np.testing.assert_array_equal(fastopt.take_rows(X, idx), ref_take_rows(X, idx))
    avg, x = X.reshape(-1).copy(), rng.standard_normal(X.size).astype(dtype)
    expected = ref_ewa(avg, x, 0.9)
    fastopt.ewa_update(avg, x, 0.9)
    np.testing.assert_allclose(avg, expected, **tol(dtype))
