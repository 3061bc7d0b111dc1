"""``python -m fastopt bench``: fastopt against NumPy (and optional peers) on this machine.

Every case times three ways of doing the same work: the straightforward
NumPy code, careful in-place NumPy (both from `fastopt._baselines`), and
fastopt; optionally fastopt on one thread (scaling), other fastopt entry
points, and PyTorch/numba (``--peers``).  Each result is compared with a
float64 run of the straightforward NumPy code on the same inputs before it
is timed; a mismatch is reported as FAILED (no time shown) and the exit code
is 1.  Bad command-line input exits with code 2 and a one-line message.

Design
------
* A `Case` is (family, label, make, traffic): ``make(dtype, peers)`` builds a
  `Work` (input arrays and implementation factories); ``traffic`` counts the
  compulsory memory traffic in elements (every input read once, every output
  written once), or is None for kernels that are not memory-bound.
* An implementation is a factory ``impl(state) -> step``: it binds fresh
  copies of the inputs once, and ``step()`` does one unit of work and returns
  the result arrays.  Optimizer steps alternate between two gradients so the
  compared result depends on every hyperparameter.
* Times are medians of samples of repeated calls (`measure`); the JSON
  output also has the fastest sample (useful on a busy machine).
* The table fits the terminal (`layout` drops the least useful columns on a
  narrow one), and the report ends with a `verdict`: per family, the
  geometric-mean speedup over NumPy and over each peer, and every case where
  fastopt was slower than NumPy with its likely cause (`slow_causes`).
"""
import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import textwrap
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

import fastopt
from fastopt import _baselines as B
from fastopt._cli import Parser, UsageError, check_plot, check_writable

# --------------------------------------------------------------- settings ---

FAMILIES = {
    # name: (fastopt names it needs, one-line description)
    "adam": (("adam_step",), "Adam step on one array (torch.optim.Adam defaults)"),
    "adamw": (("adamw_step",), "AdamW step on one array (weight_decay=1e-2)"),
    "rmsprop": (("rmsprop_step",), "RMSprop step on one array (torch defaults, lr=1e-2)"),
    "sgd": (("sgd_step",), "SGD momentum=0.9 on one array (course Momentum: dampening=0.9)"),
    "optimizer": (("Adam",), "fastopt.Adam(params).step(grads) over a model's arrays"),
    "batchnorm": (("batch_norm_forward", "batch_norm_backward"),
                  "BatchNorm training forward + backward"),
    "cross_entropy": (("cross_entropy",), "cross-entropy loss + gradient (int targets, mean)"),
    "log_softmax": (("log_softmax",), "log-softmax over the last axis"),
}
ELEMENTWISE = ("adam", "adamw", "rmsprop", "sgd")

SIZES = (1_000, 100_000, 1_000_000, 10_000_000)
QUICK_SIZES = (1_000, 1_000_000)
MAX_SIZE = 100_000_000


def resnet18_shapes():
    """Shapes of ResNet-18's 62 parameter arrays (11,689,512 elements)."""
    shapes = [(64, 3, 7, 7), (64,), (64,)]
    cin = 64
    for cout in (64, 128, 256, 512):
        for block in range(2):
            shapes += [(cout, cin, 3, 3), (cout,), (cout,), (cout, cout, 3, 3), (cout,), (cout,)]
            if block == 0 and cin != cout:          # downsampling shortcut
                shapes += [(cout, cin, 1, 1), (cout,), (cout,)]
            cin = cout
    return shapes + [(1000, 512), (1000,)]


# (label, shapes, in --quick)
MODELS = [
    ("ResNet-18, 62 arrays", resnet18_shapes(), True),
    ("500 x 1000", [(1000,)] * 500, True),
    ("10 x 1M", [(1_000_000,)] * 10, False),
]
# (shape, channel axis, in --quick)
BN_SHAPES = [
    ((32, 64, 56, 56), 1, False),
    ((8, 256, 28, 28), 1, True),
    ((256, 512), 1, True),
    ((32, 56, 56, 64), -1, False),
]
# (N, C), in --quick
SOFTMAX_SHAPES = [((64, 50257), True), ((512, 1000), True), ((4096, 10), False)]

# Optimizer hyperparameters: PyTorch's defaults (AdamW's weight decay,
# the course's Momentum beta).
LR_ADAM, BETAS, EPS_ADAM, WD_ADAMW = 1e-3, (0.9, 0.999), 1e-8, 1e-2
LR_RMS, ALPHA, EPS_RMS = 1e-2, 0.99, 1e-8
LR_SGD, MOMENTUM = 1e-2, 0.9
EPS_BN = 1e-5


BadInput = UsageError      # a command-line value that cannot be used (exit code 2)


# ------------------------------------------------------------------ cases ---

@dataclass
class Work:
    """Inputs and implementations of one case (see the module docstring)."""
    inputs: dict
    numpy: Callable
    inplace: Callable
    fastopt: Callable
    names: tuple                       # of the result arrays, for messages
    extras: dict = field(default_factory=dict)   # other fastopt entry points
    peers: dict = field(default_factory=dict)    # other libraries
    calls: int = 2                     # steps before the result is compared


@dataclass
class Case:
    family: str
    label: str
    make: Callable                     # (dtype, peers) -> Work
    traffic: Optional[int]             # compulsory traffic in elements, or None
    elements: int


def _rng():
    return np.random.default_rng(20240607)


def _uniform(rng, shape, dtype, scale=1.0, shift=0.0):
    """Values in [shift - scale, shift + scale) (uniform: quick to draw)."""
    x = rng.random(shape, dtype=dtype)
    x -= 0.5
    x *= 2 * scale
    x += shift
    return x


def _const(a):
    """Mark an input no implementation may change: runs share it (see `fresh`)."""
    a.flags.writeable = False
    return a


def _optimizer_inputs(shapes, dtype, nstate):
    """Parameters, two gradients (alternating between steps), zero state."""
    rng = _rng()
    params = [_uniform(rng, s, dtype, 0.1) for s in shapes]
    grads = [[_const(_uniform(rng, s, dtype, 0.01)) for s in shapes] for _ in range(2)]
    state = [[np.zeros(s, dtype) for s in shapes] for _ in range(nstate)]
    return {"p": params, "g": grads, "s": state}


def _elementwise_case(family, n):
    nstate, traffic = {"adam": (2, 7), "adamw": (2, 7), "rmsprop": (1, 5), "sgd": (1, 5)}[family]

    def make(dtype, peers):
        inputs = _optimizer_inputs([(n,)], dtype, nstate)
        np_fn, inplace_fn, fo_fn, names = _ELEMENTWISE_IMPLS[family]
        work = Work(inputs, np_fn, inplace_fn, fo_fn, names)
        if family in ("adam", "adamw"):
            decoupled = family == "adamw"
            if "torch" in peers:
                work.peers["torch Adam%s(fused=True)" % ("W" if decoupled else "")] = \
                    _torch_adam(decoupled)
            if "numba" in peers:
                work.peers["numba parallel loop"] = _numba_adam(decoupled)
        return work

    return Case(family, f"n={n:,}", make, traffic * n, n)


def _adam_hp(family):
    wd = WD_ADAMW if family == "adamw" else 0.0
    return dict(lr=LR_ADAM, b1=BETAS[0], b2=BETAS[1], eps=EPS_ADAM, weight_decay=wd,
                decoupled=family == "adamw")


def _unpack(s):
    """(p, g0, g1, state arrays) of a one-array optimizer input dict."""
    return s["p"][0], s["g"][0][0], s["g"][1][0], [a[0] for a in s["s"]]


def _adam_impls(family):
    hp = _adam_hp(family)

    def numpy_(s):
        p, g0, g1, (m, v) = _unpack(s)
        t = 0

        def step():
            nonlocal p, m, v, t
            t += 1
            p, m, v = B.adam_numpy(p, g1 if t & 1 else g0, m, v, t, **hp)
            return p, m, v
        return step

    def inplace(s):
        p, g0, g1, (m, v) = _unpack(s)
        work = np.empty_like(p)
        t = 0

        def step():
            nonlocal t
            t += 1
            return B.adam_inplace(p, g1 if t & 1 else g0, m, v, t, **hp, work=work)
        return step

    def fast(s):
        p, g0, g1, (m, v) = _unpack(s)
        kernel = fastopt.adamw_step if family == "adamw" else fastopt.adam_step
        kw = dict(lr=LR_ADAM, betas=BETAS, eps=EPS_ADAM, weight_decay=hp["weight_decay"])
        t = 0

        def step():
            nonlocal t
            t += 1
            kernel(p, g1 if t & 1 else g0, m, v, step=t, **kw)
            return p, m, v
        return step

    return numpy_, inplace, fast, ("param", "exp_avg", "exp_avg_sq")


def _rmsprop_impls():
    hp = dict(lr=LR_RMS, alpha=ALPHA, eps=EPS_RMS)

    def numpy_(s):
        p, g0, g1, (sq,) = _unpack(s)
        t = 0

        def step():
            nonlocal p, sq, t
            t += 1
            p, sq = B.rmsprop_numpy(p, g1 if t & 1 else g0, sq, **hp)
            return p, sq
        return step

    def inplace(s):
        p, g0, g1, (sq,) = _unpack(s)
        work = np.empty_like(p)
        t = 0

        def step():
            nonlocal t
            t += 1
            return B.rmsprop_inplace(p, g1 if t & 1 else g0, sq, **hp, work=work)
        return step

    def fast(s):
        p, g0, g1, (sq,) = _unpack(s)
        t = 0

        def step():
            nonlocal t
            t += 1
            fastopt.rmsprop_step(p, g1 if t & 1 else g0, sq, **hp)
            return p, sq
        return step

    return numpy_, inplace, fast, ("param", "square_avg")


def _sgd_impls():
    def numpy_(s):
        p, g0, g1, (v,) = _unpack(s)
        t = 0

        def step():
            nonlocal p, v, t
            t += 1
            p, v = B.momentum_numpy(p, g1 if t & 1 else g0, v, lr=LR_SGD, beta=MOMENTUM)
            return p, v
        return step

    def inplace(s):
        p, g0, g1, (v,) = _unpack(s)
        work = np.empty_like(p)
        t = 0

        def step():
            nonlocal t
            t += 1
            return B.momentum_inplace(p, g1 if t & 1 else g0, v, lr=LR_SGD, beta=MOMENTUM,
                                      work=work)
        return step

    def fast(s):
        p, g0, g1, (v,) = _unpack(s)
        t = 0

        def step():
            nonlocal t
            t += 1
            fastopt.sgd_step(p, g1 if t & 1 else g0, v, lr=LR_SGD, momentum=MOMENTUM,
                             dampening=MOMENTUM)
            return p, v
        return step

    return numpy_, inplace, fast, ("param", "momentum_buffer")


_ELEMENTWISE_IMPLS = {"adam": _adam_impls("adam"), "adamw": _adam_impls("adamw"),
                      "rmsprop": _rmsprop_impls(), "sgd": _sgd_impls()}


# Many arrays: fastopt.Adam(params).step(grads) against NumPy loops.

def _model_case(label, shapes):
    n = sum(math.prod(s) for s in shapes)
    hp = _adam_hp("adam")

    def numpy_(s):
        ps, (g0, g1), (ms, vs) = s["p"], s["g"], s["s"]
        t = 0

        def step():
            nonlocal t
            t += 1
            gs = g1 if t & 1 else g0
            for i in range(len(ps)):
                ps[i], ms[i], vs[i] = B.adam_numpy(ps[i], gs[i], ms[i], vs[i], t, **hp)
            return tuple(ps)
        return step

    def inplace(s):
        ps, (g0, g1), (ms, vs) = s["p"], s["g"], s["s"]
        flat = np.empty(max(p.size for p in ps), ps[0].dtype)
        works = [flat[:p.size].reshape(p.shape) for p in ps]
        t = 0

        def step():
            nonlocal t
            t += 1
            gs = g1 if t & 1 else g0
            for p, g, m, v, w in zip(ps, gs, ms, vs, works):
                B.adam_inplace(p, g, m, v, t, **hp, work=w)
            return tuple(ps)
        return step

    def fast(s):
        ps, (g0, g1) = s["p"], s["g"]
        opt = fastopt.Adam(ps, lr=LR_ADAM, betas=BETAS, eps=EPS_ADAM)
        t = 0

        def step():
            nonlocal t
            t += 1
            opt.step(g1 if t & 1 else g0)
            return tuple(ps)
        return step

    def loop(s):
        ps, (g0, g1), (ms, vs) = s["p"], s["g"], s["s"]
        kw = dict(lr=LR_ADAM, betas=BETAS, eps=EPS_ADAM)
        t = 0

        def step():
            nonlocal t
            t += 1
            gs = g1 if t & 1 else g0
            for p, g, m, v in zip(ps, gs, ms, vs):
                fastopt.adam_step(p, g, m, v, step=t, **kw)
            return tuple(ps)
        return step

    def make(dtype, peers):
        work = Work(_optimizer_inputs(shapes, dtype, 2), numpy_, inplace, fast,
                    tuple(f"param[{i}]" for i in range(len(shapes))))
        work.extras["loop of adam_step calls"] = loop
        if "torch" in peers:
            work.extras["torch.Adam on torch tensors (incl. setting .grad)"] = _fastopt_torch_adam
            work.peers["torch Adam(fused=True)"] = _torch_adam(False)
        return work

    return Case("optimizer", f"{label} ({n / 1e6:.1f}M)", make, 7 * n, n)


def _batchnorm_case(shape, axis):
    def numpy_(s):
        x, gamma, beta, dy = s["x"], s["gamma"], s["beta"], s["dy"]

        def step():
            y, cache = B.batch_norm_numpy(x, gamma, beta, EPS_BN, axis)
            return (y,) + B.batch_norm_backward_numpy(dy, cache)
        return step

    def inplace(s):
        x, gamma, beta, dy = s["x"], s["gamma"], s["beta"], s["dy"]
        ws = {}

        def step():
            y = B.batch_norm_inplace(x, gamma, beta, EPS_BN, axis, ws=ws)
            return (y,) + B.batch_norm_backward_inplace(dy, ws=ws)
        return step

    def fast(s):
        x, gamma, beta, dy = s["x"], s["gamma"], s["beta"], s["dy"]
        y, dx = np.empty_like(x), np.empty_like(x)

        def step():
            _, ctx = fastopt.batch_norm_forward(x, gamma, beta, eps=EPS_BN, axis=axis, out=y)
            return (y,) + tuple(fastopt.batch_norm_backward(dy, ctx, dx_out=dx))
        return step

    def make(dtype, peers):
        rng = _rng()
        c = shape[axis]
        inputs = {"x": _uniform(rng, shape, dtype, 2.0, 0.5),
                  "gamma": _uniform(rng, (c,), dtype, 0.2, 1.0),
                  "beta": _uniform(rng, (c,), dtype, 0.2),
                  "dy": _uniform(rng, shape, dtype)}
        inputs = {k: _const(v) for k, v in inputs.items()}
        work = Work(inputs, numpy_, inplace, fast, ("y", "dx", "dgamma", "dbeta"), calls=1)
        if "torch" in peers:
            work.peers["torch F.batch_norm fwd+bwd"] = _torch_batchnorm(axis)
        return work

    layout = {1: "NCHW", -1: "NHWC"}[axis] if len(shape) == 4 else "N, C"
    n = math.prod(shape)
    # forward reads x, writes y; backward reads x and dy, writes dx
    return Case("batchnorm", f"{shape} {layout}", make, 5 * n, n)


def _softmax_case(family, shape):
    def numpy_(s):
        x, target = s["x"], s["target"]
        if family == "log_softmax":
            return lambda: (B.log_softmax_numpy(x),)

        def step():
            loss, d = B.cross_entropy_numpy(x, target)
            return np.asarray(loss), d
        return step

    def inplace(s):
        x, target = s["x"], s["target"]
        ws = {}
        if family == "log_softmax":
            return lambda: (B.log_softmax_inplace(x, ws=ws),)

        def step():
            loss, d = B.cross_entropy_inplace(x, target, ws=ws)
            return np.asarray(loss), d
        return step

    def fast(s):
        x, target = s["x"], s["target"]
        out = np.empty_like(x)
        if family == "log_softmax":
            return lambda: (fastopt.log_softmax(x, out=out),)

        def step():
            loss, d = fastopt.cross_entropy(x, target, return_grad=True, grad_out=out)
            return np.asarray(loss), d
        return step

    def make(dtype, peers):
        rng = _rng()
        inputs = {"x": _const(_uniform(rng, shape, dtype, 5.0)),
                  "target": _const(rng.integers(0, shape[1], shape[0]))}
        names = ("log_softmax",) if family == "log_softmax" else ("loss", "dlogits")
        work = Work(inputs, numpy_, inplace, fast, names, calls=1)
        if "torch" in peers:
            label = ("torch F.log_softmax" if family == "log_softmax"
                     else "torch F.cross_entropy fwd+bwd")
            work.peers[label] = _torch_softmax(family)
        return work

    return Case(family, f"{shape}", make, None, math.prod(shape))


def build_cases(families, sizes, quick):
    """The cases of `families`, in the order of FAMILIES."""
    cases = []
    for family in FAMILIES:
        if family not in families:
            continue
        if family in ELEMENTWISE:
            cases += [_elementwise_case(family, n) for n in sizes]
        elif family == "optimizer":
            cases += [_model_case(lb, shapes) for lb, shapes, q in MODELS if q or not quick]
        elif family == "batchnorm":
            cases += [_batchnorm_case(sh, ax) for sh, ax, q in BN_SHAPES if q or not quick]
        else:
            cases += [_softmax_case(family, sh) for sh, q in SOFTMAX_SHAPES if q or not quick]
    return cases


# ---------------------------------------------------------- low precision ---
# `--dtype float16|bfloat16` runs these instead: each case times a 16-bit way
# of doing a job against the float32 kernel doing the same job (the ratio is
# what the 16-bit variant is for), after checking the 16-bit result against
# the float32 one within the 16-bit type's rounding.

@dataclass
class LowpCase:
    family: str
    label: str
    make: Callable          # (half dtype) -> (float32 factory, 16-bit factory, check)
    elements: int


def half_dtype(name):
    """numpy float16, or ml_dtypes' bfloat16 (raises BadInput without it)."""
    if name == "float16":
        return np.dtype(np.float16)
    try:
        import ml_dtypes
    except ImportError:
        raise BadInput(f"--dtype {name} needs ml_dtypes: pip install ml_dtypes "
                       "(or pip install 'fastopt[bf16]')") from None
    return np.dtype(ml_dtypes.bfloat16)


def _lowp_adam(n, how):
    """Adam (torch defaults) on n elements: float32 against `how` =
    ("state", rounding): bfloat16 state; ("params", grads16): 16-bit params
    with float32 master and state, float32 or 16-bit gradients."""
    def make(half):
        rng = _rng()
        p0 = _uniform(rng, n, np.float32, 0.1)
        gs = [_uniform(rng, n, np.float32, 0.01) for _ in range(2)]

        def stepper(opt, grads):
            t = 0

            def step():
                nonlocal t
                t += 1
                opt.step([grads[t & 1]])
                return opt
            return step

        def f32():
            return stepper(fastopt.Adam([p0.copy()]), gs)

        if how[0] == "state":
            def f16():
                return stepper(fastopt.Adam([p0.copy()], state_dtype="bfloat16",
                                            state_rounding=how[1]), gs)
        else:
            def f16():
                grads = [g.astype(half) for g in gs] if how[1] else gs
                return stepper(fastopt.Adam([p0.astype(half)]), grads)

        def check(o32, o16):
            if how[0] == "params":
                # exactly: the float32 step on the master, then rounding
                ref = fastopt.Adam([p0.astype(half).astype(np.float32)])
                grads = [g.astype(half).astype(np.float32) for g in gs] if how[1] else gs
                step = stepper(ref, grads)
                step()
                step()
                want = ref._fused.params[0].astype(half)
                same = np.array_equal(o16._fused.params[0].view(np.uint16), want.view(np.uint16))
                return None if same else "params differ from the float32 step, rounded"
            # bfloat16 state changes an update by its rounding (2**-8 relative)
            a, b = o32._fused.params[0], o16._fused.params[0]
            bad = np.abs(b - a) > 2.0**-5 * np.abs(a - p0).max()
            return None if not bad.any() else (f"params differ from float32 beyond the "
                                               f"bfloat16 rounding at {int(bad.sum())} of {n}")
        return f32, f16, check

    if how[0] == "state":
        label = f"n={n:,}, bfloat16 state ({how[1]})"
    else:
        label = f"n={n:,}, HALF params" + (", HALF grads" if how[1] else ", float32 grads")
    return LowpCase("adam", label, make, n)


def _lowp_softmax(family, shape):
    def make(half):
        rng = _rng()
        x32 = _uniform(rng, shape, np.float32, 5.0)
        target = rng.integers(0, shape[1], shape[0])

        def impl(x):
            out = np.empty_like(x)
            if family == "log_softmax":
                return lambda: fastopt.log_softmax(x, out=out)
            return lambda: fastopt.cross_entropy(x, target, return_grad=True, grad_out=out)[1]

        def check(r32, r16):
            want = np.asarray(fastopt.cross_entropy(x32.astype(half).astype(np.float32), target,
                              return_grad=True)[1] if family != "log_softmax" else
                              fastopt.log_softmax(x32.astype(half).astype(np.float32)))
            same = np.array_equal(r16.view(np.uint16), want.astype(half).view(np.uint16))
            return None if same else "differs from the float32 kernel on the same logits"
        return (lambda: impl(x32)), (lambda: impl(x32.astype(half))), check
    return LowpCase(family, f"{shape}", make, math.prod(shape))


def _lowp_batchnorm(shape, axis):
    def make(half):
        rng = _rng()
        c = shape[axis]
        x32, dy32 = _uniform(rng, shape, np.float32, 2.0, 0.5), _uniform(rng, shape, np.float32)
        gamma, beta = _uniform(rng, (c,), np.float32, 0.2, 1.0), _uniform(rng, (c,), np.float32, 0.2)

        def impl(x, dy):
            y, dx = np.empty_like(x), np.empty_like(x)

            def step():
                _, ctx = fastopt.batch_norm_forward(x, gamma, beta, axis=axis, out=y)
                fastopt.batch_norm_backward(dy, ctx, dx_out=dx)
                return dx
            return step

        def check(r32, r16):
            return None if np.allclose(r16.astype(np.float32), r32, rtol=2.0**-6,
                                       atol=2.0**-6 * np.abs(r32).max()) else "dx differs"
        return (lambda: impl(x32, dy32)), (lambda: impl(x32.astype(half), dy32.astype(half))), check
    return LowpCase("batchnorm", f"{shape}", make, math.prod(shape))


def measure_pair(steps, budget, min_samples):
    """{name: median seconds per call} of two `steps`, their samples taken
    alternately so that a busy machine slows both alike (`measure`'s rules)."""
    n = {}
    for k, st in steps.items():
        n[k] = 1
        while True:
            t0 = time.perf_counter()
            for _ in range(n[k]):
                st()
            if time.perf_counter() - t0 >= budget / 40 or n[k] >= 1 << 20:
                break
            n[k] *= 2
    samples = {k: [] for k in steps}
    start = time.perf_counter()
    while (len(samples[next(iter(steps))]) < min_samples
           or time.perf_counter() - start < 2 * budget) and len(samples[next(iter(steps))]) < 200:
        for k, st in steps.items():
            t0 = time.perf_counter()
            for _ in range(n[k]):
                st()
            samples[k].append((time.perf_counter() - t0) / n[k])
    return {k: statistics.median(v) for k, v in samples.items()}


def lowp_cases(families, n, quick):
    """The low-precision cases of `families` for one-array size n."""
    cases = []
    if "adam" in families:
        cases += [_lowp_adam(n, ("state", "stochastic")), _lowp_adam(n, ("state", "nearest")),
                  _lowp_adam(n, ("params", False)), _lowp_adam(n, ("params", True))]
    for family in ("cross_entropy", "log_softmax"):
        if family in families:
            cases += [_lowp_softmax(family, sh) for sh, q in SOFTMAX_SHAPES if q or not quick]
    if "batchnorm" in families:
        cases += [_lowp_batchnorm(sh, ax) for sh, ax, q in BN_SHAPES if q or not quick]
    return cases


def run_lowp(args, families, sizes, threads, notes):
    """The `--dtype float16|bfloat16` report; returns the exit status."""
    half = half_dtype(args.dtype)
    budget, min_samples = (0.03, 3) if args.quick else (0.1, 5)
    cases = lowp_cases(families, max(sizes), args.quick)
    try:
        half_dtype("bfloat16")
    except BadInput:
        cases = [c for c in cases if "bfloat16 state" not in c.label]
        notes = notes + ["bfloat16 state: skipped, ml_dtypes is not installed"]
    cfg = fastopt.config()
    opts = argparse.Namespace(dtype=half, threads=threads, width=terminal_width())
    print("\n".join(header(opts, cfg, notes, legend=[
        ("times", f"medians of samples taken alternately from the float32 and the {half.name} "
         f"way of doing the same job; ratio = float32 time / {half.name} time (above 1: "
         f"{half.name} is faster)"),
        ("check", f"the {half.name} result is compared with the float32 one before it is timed "
         "(16-bit outputs: equal to the float32 kernel on the same inputs, rounded)")])),
        flush=True)
    print()
    cols = [("case", 46, "<"), ("float32", 9, ">"), (half.name, 9, ">"), ("ratio", 7, ">"),
            ("check", 6, "<")]
    row = lambda v: " ".join(f"{x:{a}{w}}" for x, (_, w, a) in zip(v, cols)).rstrip()  # noqa: E731
    print(row([c[0] for c in cols]))
    records, family = [], None
    for case in cases:
        if case.family != family:
            family = case.family
            print(f"{family}: {FAMILIES[family][1]}", flush=True)
        label = case.label.replace("HALF", half.name)
        times, error = {}, None
        try:
            with fastopt_threads(threads):
                f32, f16, check = case.make(half)
                steps = {"float32": f32(), half.name: f16()}
                outs = {k: [st() for _ in range(2)][-1] for k, st in steps.items()}
                error = check(outs["float32"], outs[half.name])
                if not error:
                    times = measure_pair(steps, budget, min_samples)
        except Exception as exc:          # a broken kernel must not stop the report
            error = f"{type(exc).__name__}: {exc}"
        t32, t16 = times.get("float32"), times.get(half.name)
        print(row([f"  {label}", fmt_time(t32), "FAILED" if error else fmt_time(t16),
                   fmt_ratio(t32, t16), "FAILED" if error else "ok"]), flush=True)
        if error:
            print(f"      FAILED: {error}")
        records.append({"family": case.family, "case": label, "elements": case.elements,
                        "float32_s": t32, "half_s": t16,
                        "ratio": t32 / t16 if t32 and t16 else None, "ok": not error,
                        "error": error})
    failed = [r for r in records if not r["ok"]]
    print()
    print(f"FAILED: {len(failed)} of {len(records)} cases" if failed
          else f"All {len(records)} cases match float32.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"fastopt": cfg["version"], "config": cfg, "dtype": half.name,
                       "threads": threads, "quick": args.quick, "notes": notes,
                       "results": records, "failed": len(failed)}, f, indent=1)
        print(f"results written to {args.json}")
    return 1 if failed else 0


# ------------------------------------------------------------------ peers ---

def _import(name):
    try:
        return __import__(name)
    except ImportError:
        return None


def available_peers(threads):
    """{name: module} of the importable peer libraries, set to `threads` threads."""
    peers = {}
    torch = _import("torch")
    if torch is not None:
        torch.set_num_threads(threads)
        peers["torch"] = torch
    numba = _import("numba")
    if numba is not None:
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        peers["numba"] = numba
    return peers


def _tensor(a):
    """A torch tensor sharing `a`'s memory (read-only inputs too: torch warns
    about those, but the peers never write to them)."""
    import torch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(a)


def _torch_stepper(s, make_opt, moments):
    """A step of the optimizer `make_opt(params)` on torch tensors sharing the
    parameters' memory, the gradients assigned each step as a training loop's
    backward does; returns the parameters (and, with `moments` and one array,
    its exp_avg and exp_avg_sq)."""
    ps = [_tensor(p).requires_grad_() for p in s["p"]]
    gs = [[_tensor(g) for g in grads] for grads in s["g"]]
    opt = make_opt(ps)
    t = 0

    def step():
        nonlocal t
        t += 1
        for p, g in zip(ps, gs[t & 1]):
            p.grad = g
        opt.step()
        out = tuple(p.detach().numpy() for p in ps)
        if moments and len(ps) == 1:     # one array: compare the moments as well
            st = opt.state[ps[0]]
            out += (st["exp_avg"].numpy(), st["exp_avg_sq"].numpy())
        return out
    return step


def _torch_adam(decoupled):
    def impl(s):
        import torch
        cls = torch.optim.AdamW if decoupled else torch.optim.Adam
        wd = WD_ADAMW if decoupled else 0.0
        return _torch_stepper(s, lambda ps: cls(ps, lr=LR_ADAM, betas=BETAS, eps=EPS_ADAM,
                                                weight_decay=wd, fused=True), True)
    return impl


def _fastopt_torch_adam(s):
    """fastopt.torch.Adam (the bridge: reads p.grad, one native step)."""
    import fastopt.torch as fo
    return _torch_stepper(s, lambda ps: fo.Adam(ps, lr=LR_ADAM, betas=BETAS, eps=EPS_ADAM),
                          False)


def _numba_adam(decoupled):
    import numba

    @numba.njit(parallel=True, cache=False)
    def kernel(p, g, m, v, decay, b1, b2, step_size, bc2_sqrt, eps):
        for i in numba.prange(p.size):
            p[i] *= decay
            m[i] = b1 * m[i] + (1 - b1) * g[i]
            v[i] = b2 * v[i] + (1 - b2) * g[i] * g[i]
            p[i] -= step_size * m[i] / (math.sqrt(v[i]) / bc2_sqrt + eps)

    def impl(s):
        p, g0, g1, (m, v) = _unpack(s)
        decay = 1 - LR_ADAM * WD_ADAMW if decoupled else 1.0
        b1, b2 = BETAS
        t = 0

        def step():
            nonlocal t
            t += 1
            kernel(p, g1 if t & 1 else g0, m, v, decay, b1, b2, LR_ADAM / (1 - b1**t),
                   math.sqrt(1 - b2**t), EPS_ADAM)
            return p, m, v
        return step
    return impl


def _torch_batchnorm(axis):
    def impl(s):
        import torch
        import torch.nn.functional as F
        # the inputs are read-only: autograd needs leaves of its own for x, w, b
        x = _tensor(s["x"]).clone().requires_grad_()
        w = _tensor(s["gamma"]).clone().requires_grad_()
        b = _tensor(s["beta"]).clone().requires_grad_()
        dy = _tensor(s["dy"])
        if axis == -1:      # NHWC array -> channels_last NCHW view, no copy
            to_nchw = (0, 3, 1, 2)
            xin, dy = x.permute(to_nchw), dy.permute(to_nchw)
        else:
            xin = x

        def step():
            y = F.batch_norm(xin, None, None, w, b, training=True, eps=EPS_BN)
            dx, dw, db = torch.autograd.grad(y, (x, w, b), dy)
            if axis == -1:
                y = y.permute(0, 2, 3, 1)
            return y.detach().numpy(), dx.numpy(), dw.numpy(), db.numpy()
        return step
    return impl


def _torch_softmax(family):
    def impl(s):
        import torch
        import torch.nn.functional as F
        x = _tensor(s["x"])
        if family == "log_softmax":
            def step():
                with torch.no_grad():
                    return (F.log_softmax(x, dim=-1).numpy(),)
            return step
        x = x.clone().requires_grad_()
        target = _tensor(s["target"])

        def step():
            loss = F.cross_entropy(x, target)
            (d,) = torch.autograd.grad(loss, x)
            return loss.detach().numpy(), d.numpy()
        return step
    return impl


# ---------------------------------------------------------------- running ---

def measure(step, budget, min_samples, max_samples=200):
    """(median, least) seconds per call of `step()` over the samples.

    Calls are grouped into samples of ~budget/20 s (so short calls are not
    dominated by the timer), and samples are taken until `budget` seconds
    have passed (at least `min_samples`, or 3 of very slow calls).  The
    calibration calls warm up.
    """
    n = 1
    target = budget / 20
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        dt = time.perf_counter() - t0
        if dt >= target or n >= 1 << 22:
            break
        n = min(n * 10, max(n + 1, int(n * 1.2 * target / max(dt, 1e-9))))
    samples, total = [], 0.0
    # at least min_samples (but 3 will do for calls slower than budget/3)
    while (len(samples) < 3 or len(samples) < min_samples and total < 3 * budget
           or total < budget and len(samples) < max_samples):
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        dt = time.perf_counter() - t0
        samples.append(dt / n)
        total += dt
    return statistics.median(samples), min(samples)


def fresh(obj, dtype=None):
    """A deep copy of the arrays in `obj` (nested dicts/lists), for one
    implementation to update; read-only inputs are shared, not copied.
    Floating arrays are converted to `dtype` if given."""
    if isinstance(obj, np.ndarray):
        if dtype is not None and obj.dtype.kind == "f":
            return obj.astype(dtype)
        return obj if not obj.flags.writeable else obj.copy()
    if isinstance(obj, dict):
        return {k: fresh(v, dtype) for k, v in obj.items()}
    if isinstance(obj, list):
        return [fresh(v, dtype) for v in obj]
    return obj


def tolerance(dtype):
    """(rtol, atol relative to the largest reference magnitude) for `dtype` results."""
    return (1e-4, 1e-5) if np.dtype(dtype) == np.float32 else (1e-10, 1e-12)


class Reference:
    """Float64 reference results and the error allowed for each value:
    rtol*|ref| + atol*max|ref| with the `tolerance` of the results' dtype.
    (The allowed errors are computed when comparing, not kept: at 1e7
    elements they would hold another float64 copy of every result.)"""

    def __init__(self, arrays, dtype):
        self.rtol, self.atol = tolerance(dtype)
        self.arrays = [np.asarray(a, dtype=np.float64) for a in arrays]
        self.scale = [float(np.max(np.abs(r))) if r.size else 0.0 for r in self.arrays]

    def allowed(self, i):
        allowed = np.abs(self.arrays[i])
        allowed *= self.rtol
        allowed += self.atol * self.scale[i]
        return allowed


def compare(got, ref, names):
    """None if every result matches the `Reference` `ref`, else what differs."""
    if len(got) != len(ref.arrays):
        return f"returned {len(got)} results, expected {len(ref.arrays)}"
    for k, (name, a, r) in enumerate(zip(names, got, ref.arrays)):
        a = np.asarray(a)
        if a.shape != r.shape:
            return f"{name} has shape {a.shape}, expected {r.shape}"
        err = np.subtract(a, r, dtype=np.float64)
        err = np.abs(err, out=err) if err.ndim else abs(err)
        bad = ~(err <= ref.allowed(k))  # NaN is bad
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            where = f"{name}[{', '.join(map(str, np.unravel_index(i, r.shape)))}]" \
                if r.ndim else name
            return (f"{where} = {a.flat[i]:.7g}, NumPy reference {r.flat[i]:.7g} "
                    f"({int(bad.sum())} of {bad.size} values beyond rtol={ref.rtol:g})")
    return None


@contextlib.contextmanager
def fastopt_threads(n):
    """fastopt's kernels use at most `n` threads inside the block."""
    fastopt.set_num_threads(n)
    try:
        yield
    finally:
        fastopt.set_num_threads(0)


@dataclass
class Result:
    time: Optional[float] = None       # median seconds per call
    best: Optional[float] = None       # the fastest sample's seconds per call
    error: Optional[str] = None        # why the result was not timed
    cpu: Optional[float] = None        # share of a CPU the timing thread got (1: never waited)


def _error_text(exc):
    msg = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {msg}"


def checked_step(impl, work, ref, threads):
    """`impl` built on fresh copies of the inputs, run `work.calls` times and
    its result compared with `ref`: (step, None), or (None, why not)."""
    try:
        with fastopt_threads(threads):
            step = impl(fresh(work.inputs))
            for _ in range(work.calls):
                out = step()
            error = compare(out, ref, work.names)
    except Exception as exc:        # a broken kernel must not stop the report
        return None, _error_text(exc)
    return (None, error) if error else (step, None)


def run_impl(impl, work, ref, threads, budget, min_samples):
    """Build, check and time one implementation on fresh copies of the inputs."""
    step, error = checked_step(impl, work, ref, threads)
    if error:
        return Result(error=error)
    try:
        with fastopt_threads(threads):
            wall, cpu = time.perf_counter(), time.thread_time()
            median, best = measure(step, budget, min_samples)
            share = (time.thread_time() - cpu) / max(time.perf_counter() - wall, 1e-9)
            return Result(time=median, best=best, cpu=min(share, 1.0))
    except Exception as exc:
        return Result(error=_error_text(exc))


def reference(work, dtype):
    """The `Reference` for `dtype` results: the straightforward NumPy code
    run in float64 on the same inputs, after `work.calls` steps."""
    step = work.numpy(fresh(work.inputs, np.float64))
    for _ in range(work.calls):
        out = step()
    return Reference(out, dtype)


def run_case(case, opts, peers):
    """Every implementation of `case`: {column: Result}, extras, peers."""
    work = case.make(opts.dtype, peers)
    ref = reference(work, opts.dtype)
    run = lambda impl, threads: run_impl(impl, work, ref, threads,  # noqa: E731
                                         opts.budget, opts.min_samples)
    main = {"numpy": run(work.numpy, 1), "inplace": run(work.inplace, 1),
            "fastopt": run(work.fastopt, opts.threads)}
    if opts.threads > 1:
        main["fastopt_1t"] = run(work.fastopt, 1)
    extras = {name: run(impl, opts.threads) for name, impl in work.extras.items()}
    others = {name: run(impl, opts.threads) for name, impl in work.peers.items()}
    return main, extras, others


def probe_bandwidth(threads, mib, budget):
    """Memory bandwidth (bytes/s) of NumPy streams on `threads` Python threads.

    Two streams over float64 arrays of `mib` MiB, each thread on its own
    contiguous chunk: a copy (``np.copyto(dst, src)``, counted as 2 passes:
    read src, write dst) and an in-place add (``np.add(a, b, out=a)``, 3
    passes: read a and b, write a -- the access pattern of an in-place
    optimizer step).  Each is timed by its best sample, as STREAM reports
    bandwidth: the probe estimates what the machine can do.  Returns the
    better of the two, and both.
    """
    n = mib * 2**20 // 8
    src, dst = np.ones(n), np.zeros(n)
    bounds = np.linspace(0, n, threads + 1).astype(int)
    chunks = [(dst[lo:hi], src[lo:hi]) for lo, hi in zip(bounds[:-1], bounds[1:])]
    with ThreadPoolExecutor(threads) as pool:
        def copy():
            list(pool.map(lambda c: np.copyto(c[0], c[1]), chunks))

        def add():
            list(pool.map(lambda c: np.add(c[0], c[1], out=c[0]), chunks))
        copy_bw = 2 * dst.nbytes / measure(copy, budget, 5)[1]
        add_bw = 3 * dst.nbytes / measure(add, budget, 5)[1]
    return max(copy_bw, add_bw), {"copy": copy_bw, "add": add_bw}


# ------------------------------------------------------------- contention ---

# A process that keeps one core busy: a Python loop, like the data-loading
# workers or other training runs that share a machine.  It stops by itself at
# its deadline, or as soon as its parent is gone.
BUSY_PROGRAM = """
import os, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
deadline, parent = time.monotonic() + float(sys.argv[1]), os.getppid()
print("busy", flush=True)
while time.monotonic() < deadline and os.getppid() == parent:
    for _ in range(10000):
        pass
"""
BUSY_SECONDS = 120


def busy_processes():
    """One busy process per core this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextlib.contextmanager
def every_core_busy(n, seconds=BUSY_SECONDS):
    """Inside the block, `n` processes keep a core busy each; they are killed
    and reaped on leaving it (also on an exception or Ctrl-C)."""
    procs = []
    try:
        for _ in range(n):
            procs.append(subprocess.Popen([sys.executable, "-c", BUSY_PROGRAM, str(seconds)],
                                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE))
        for p in procs:
            p.stdout.readline()             # it is running
        yield
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()
            p.stdout.close()


def call_times(step, budget):
    """Seconds per call of `step()` for `budget` seconds, call by call (calls
    under 20 us in groups): on a busy machine, where this process gets its
    core in time slices, a sample then seldom spans a slice given to another
    process, and the median is the time of a call that ran."""
    n = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        if time.perf_counter() - t0 >= 20e-6 or n >= 1 << 16:
            break
        n *= 2
    times, end = [], time.perf_counter() + budget
    while time.perf_counter() < end or len(times) < 5:
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        times.append((time.perf_counter() - t0) / n)
    return times


CONTENTION_ROUNDS = 3


def run_contention(case, opts, peers):
    """fastopt (default threads and 1 thread) and the peers, checked, then
    timed in turns while every core is kept busy: {column: Result}."""
    work = case.make(opts.dtype, peers)
    ref = reference(work, opts.dtype)
    impls = {"fastopt": (work.fastopt, opts.threads), "fastopt_1t": (work.fastopt, 1)}
    impls.update({name: (impl, opts.threads) for name, impl in work.peers.items()})
    results, steps = {}, {}
    with every_core_busy(busy_processes()):
        for name, (impl, threads) in impls.items():
            step, error = checked_step(impl, work, ref, threads)
            if error:
                results[name] = Result(error=error)
            else:
                steps[name] = (step, threads, [])
        for _ in range(CONTENTION_ROUNDS):      # in turns: all see the same machine
            for step, threads, times in steps.values():
                with fastopt_threads(threads):
                    times += call_times(step, opts.budget)
    for name, (_, _, times) in steps.items():
        results[name] = Result(time=statistics.median(times), best=min(times))
    return {name: results[name] for name in impls}


def contention_lines(busy, record):
    """The sub-row of a case timed under contention; adds it to the JSON `record`."""
    fo, one = busy["fastopt"], busy["fastopt_1t"]
    record["contention"] = {k: {"time_s": r.time, "best_s": r.best, "error": r.error}
                            for k, r in busy.items()}
    record["contention"]["ratio_to_1thread"] = fo.time / one.time if fo.time and one.time else None
    if fo.error or one.error:
        record["ok"] = False
        record["errors"].update({f"contention {k}": r.error
                                 for k, r in (("fastopt", fo), ("1 thread", one)) if r.error})
        return ["    + every core busy: FAILED " + (fo.error or one.error)]
    line = (f"    + every core busy: fastopt {fmt_time(fo.time)}, 1 thread {fmt_time(one.time)}, "
            f"ratio {fo.time / one.time:.2f}")
    others = [f"{k} {fmt_time(r.time)}" for k, r in busy.items()
              if k not in ("fastopt", "fastopt_1t") and not r.error]
    return [line + (f"; {', '.join(others)}" if others else "")]


# ------------------------------------------------------------------ output ---

def fmt_time(t):
    if t is None:
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if t >= scale:
            break
    else:
        unit, scale = "ns", 1e-9
    v = t / scale
    return f"{v:.3g} {unit}" if v < 100 else f"{v:.0f} {unit}"


def fmt_ratio(a, b):
    return f"{a / b:.2f}x" if a and b else "-"


# The table's columns in display order: (key, heading, width, align, rank).
# On a narrow terminal `layout` drops columns of the lowest rank first (the
# 1-thread time is in the scaling ratio, the bandwidth in the JSON); rank 9
# columns always stay.
COLUMNS = [("case", "case", 30, "<", 9), ("numpy", "NumPy", 8, ">", 7),
           ("inplace", "in-place", 8, ">", 3), ("fastopt", "fastopt", 8, ">", 9),
           ("fastopt_1t", "1 thread", 8, ">", 0), ("vs_numpy", "vs NumPy", 8, ">", 9),
           ("vs_inplace", "vs in-pl", 8, ">", 6), ("scaling", "scaling", 7, ">", 4),
           ("gbps", "GB/s", 6, ">", 2), ("probe", "%probe", 6, ">", 1),
           ("check", "check", 6, "<", 9)]
NARROW = 100        # below this many terminal columns the table drops columns


def terminal_width():
    """Columns of the terminal (``COLUMNS`` if set; 80 when not a terminal)."""
    return shutil.get_terminal_size().columns


def layout(width, labels, threads):
    """The columns (as in `COLUMNS`) of a table that fits `width` characters.

    The case column is as wide as the longest label (at most 30; a longer
    label gets a line of its own); without a second thread the 1-thread and
    scaling columns are left out.
    """
    case_width = min(max([len(label) + 2 for label in labels] + [12]), 30)
    cols = [(k, h, case_width if k == "case" else w, a, r) for k, h, w, a, r in COLUMNS
            if threads > 1 or k not in ("fastopt_1t", "scaling")]
    total = lambda cs: sum(c[2] for c in cs) + len(cs) - 1      # noqa: E731
    for rank in sorted({c[4] for c in cols if c[4] < 9}):
        if total(cols) <= width:
            break
        # drop one column of this rank at a time, rightmost first
        while total(cols) > width and any(c[4] == rank for c in cols):
            cols.remove(next(c for c in reversed(cols) if c[4] == rank))
    return cols


def fmt_row(values, columns):
    """One table row (or two, if the case label is wider than its column)."""
    cells = [f"{values.get(key, ''):{align}{width}}" for key, _, width, align, _ in columns]
    case = values.get("case", "")
    if len(case) > columns[0][2]:
        return case + "\n" + " " * columns[0][2] + " " + " ".join(cells[1:]).rstrip()
    return " ".join(cells).rstrip()


def fmt_heading(columns):
    return fmt_row({key: heading for key, heading, *_ in columns}, columns)


def summarize(case, main, extras, others, itemsize, probe, columns):
    """The table row of one case, and its JSON record."""
    t = {k: r.time for k, r in main.items()}
    failed = {k: r.error for k, r in list(main.items()) + list(extras.items()) if r.error}
    fo = t["fastopt"]
    gbps = case.traffic * itemsize / fo / 1e9 if case.traffic and fo else None
    record = {
        "family": case.family, "case": case.label, "elements": case.elements,
        "numpy_s": t["numpy"], "inplace_s": t["inplace"], "fastopt_s": fo,
        "fastopt_1thread_s": t.get("fastopt_1t"),
        "speedup_vs_numpy": t["numpy"] / fo if fo and t["numpy"] else None,
        "speedup_vs_inplace": t["inplace"] / fo if fo and t["inplace"] else None,
        "scaling": t["fastopt_1t"] / fo if fo and t.get("fastopt_1t") else None,
        "best_s": {k: r.best for k, r in main.items()},
        "cpu_share": {k: r.cpu for k, r in main.items()},
        "bytes": case.traffic * itemsize if case.traffic else None,
        "gbps": gbps, "probe_fraction": gbps * 1e9 / probe if gbps else None,
        "ok": not failed, "errors": failed,
        "extras": {k: {"time_s": r.time, "best_s": r.best, "error": r.error}
                   for k, r in extras.items()},
        "peers": {k: {"time_s": r.time, "best_s": r.best, "error": r.error}
                  for k, r in others.items()},
    }
    values = {
        "case": f"  {case.label}", "numpy": fmt_time(t["numpy"]),
        "inplace": fmt_time(t["inplace"]),
        "fastopt": "FAILED" if main["fastopt"].error else fmt_time(fo),
        "fastopt_1t": "FAILED" if "fastopt_1t" in failed else fmt_time(t.get("fastopt_1t")),
        "vs_numpy": fmt_ratio(t["numpy"], fo), "vs_inplace": fmt_ratio(t["inplace"], fo),
        "scaling": fmt_ratio(t.get("fastopt_1t"), fo),
        "gbps": f"{gbps:.1f}" if gbps else "-",
        "probe": f"{record['probe_fraction']:.0%}" if gbps else "-",
        "check": "FAILED" if failed else "ok",
    }
    for col in ("numpy", "inplace"):
        if main[col].error:
            values[col] = "FAILED"
    lines = [fmt_row(values, columns)]
    # Sub-rows: other fastopt entry points (checked like fastopt) and peers
    # (a peer that errs or differs is noted, not counted as a failure).
    for name, r in list(extras.items()) + list(others.items()):
        label = f"    + {'fastopt ' if name in extras else ''}{name}: "
        if r.error:
            lines.append(label + ("FAILED" if name in extras else f"not timed ({r.error})"))
        elif fo:
            lines.append(label + f"{fmt_time(r.time)} -> fastopt " + (
                f"{r.time / fo:.2f}x faster" if r.time >= fo else f"{fo / r.time:.2f}x slower"))
    for col, err in failed.items():
        lines.append(f"      FAILED {col}: {err}")
    return lines, record


# ----------------------------------------------------------------- verdict ---

def cpu_probe(seconds=0.1):
    """The share of one CPU a spinning thread of this process gets (1.0 when
    a core is free; on a machine whose cores are all busy, less)."""
    wall, cpu = time.perf_counter(), time.thread_time()
    while time.perf_counter() - wall < seconds:
        pass
    return min((time.thread_time() - cpu) / (time.perf_counter() - wall), 1.0)


def machine_load():
    """The 1-minute load average (None where unknown) and a `cpu_probe`."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"loadavg": load, "cpu_probe": cpu_probe()}


def is_busy(load, cpus):
    """Other programs compete for the CPUs: a probe thread got less than 90%
    of a CPU.  (The load average is reported, not used: it lags a minute
    and counts the benchmark's own threads, so on a 2-core machine a
    benchmark alone raises it above 1.)"""
    return load["cpu_probe"] < 0.9


def geomean(values):
    values = [v for v in values if v]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def peer_library(name):
    """The library a peer timing belongs to: 'torch Adam(fused=True)' -> 'torch'."""
    return name.split()[0]


def speedups(records):
    """{family (and "all"): {"numpy", "inplace", <peer library>...: geometric
    mean of the speedups, "cases": n}} over the cases that passed."""
    out = {}
    groups = {}
    for r in records:
        if r["ok"] and r["fastopt_s"]:
            groups.setdefault(r["family"], []).append(r)
    groups["all"] = [r for rs in groups.values() for r in rs]
    for family, rs in groups.items():
        row = {"cases": len(rs), "numpy": geomean(r["speedup_vs_numpy"] for r in rs),
               "inplace": geomean(r["speedup_vs_inplace"] for r in rs)}
        for r in rs:
            for name, p in r["peers"].items():
                if p["time_s"] and not p["error"]:
                    row.setdefault(peer_library(name), []).append(p["time_s"] / r["fastopt_s"])
        out[family] = {k: geomean(v) if isinstance(v, list) else v for k, v in row.items()}
    return out


def slow_causes(record, load, cpus, threads):
    """Likely reasons why fastopt was slower than NumPy in `record` (a list of
    phrases, most likely first)."""
    causes = []
    # The runs on one thread: a share below 1 there is time spent preempted.
    # (A multi-threaded run's calling thread also waits for its team.)
    one_thread = ("numpy", "inplace", "fastopt_1t") + (("fastopt",) if threads == 1 else ())
    shares = [v for k, v in record["cpu_share"].items() if k in one_thread and v is not None]
    if is_busy(load, cpus) or (shares and min(shares) < 0.8):
        facts = [f"load average {load['loadavg']:.1f} on {cpus} CPUs"] \
            if load["loadavg"] is not None else []
        facts.append(f"a probe thread got {load['cpu_probe']:.0%} of a CPU")
        if shares:
            facts.append(f"the timing thread got {min(shares):.0%}")
        causes.append(f"the machine is busy ({', '.join(facts)}): rerun when it is quiet")
    best = record["best_s"]
    if best.get("fastopt") and record["fastopt_s"] > 1.5 * best["fastopt"]:
        causes.append(f"noisy timing (fastopt's median is {record['fastopt_s'] / best['fastopt']:.1f}x "
                      "its fastest sample)")
    if threads > 1 and record["scaling"] and record["scaling"] < 0.9:
        causes.append(f"threads slow it down here (1 thread is {1 / record['scaling']:.2f}x "
                      "faster): try --threads 1")
    if record["fastopt_s"] < 2e-6:
        causes.append("a call this short is mostly fixed overhead")
    if record["probe_fraction"] and record["probe_fraction"] > 0.8:
        causes.append(f"memory-bound: fastopt streams at {record['probe_fraction']:.0%} of the "
                      "probed bandwidth, so both wait for memory")
    return causes or ["no cause found: please report it with the --json output"]


def verdict(records, load, cpus, threads, width):
    """The report's conclusion: a table of geometric-mean speedups per family
    (over NumPy, in-place NumPy and every peer library timed), then every
    case where fastopt was slower than NumPy, with its likely cause."""
    table = speedups(records)
    if not records or table["all"]["cases"] == 0:
        return []
    peers = sorted({k for row in table.values() for k in row} - {"cases", "numpy", "inplace"})
    cols = [("cases", "cases", 5), ("numpy", "vs NumPy", 8), ("inplace", "vs in-place", 11)]
    cols += [(p, f"vs {p}", max(8, len(p) + 3)) for p in peers]
    lines = ["Verdict: speedup of fastopt, the geometric mean over each family's cases "
             "(2.00x: twice as fast)"]
    lines = [w for line in lines for w in textwrap.wrap(line, width)]
    lines.append("  " + f"{'family':14}" + " ".join(f"{h:>{w}}" for _, h, w in cols))
    for family, row in table.items():
        cells = [f"{row['cases']:>5}"] + [
            f"{row[k]:>{w - 1}.2f}x" if row.get(k) else f"{'-':>{w}}" for k, _, w in cols[1:]]
        lines.append("  " + f"{family:14}" + " ".join(cells))
    slow = [r for r in records if r["ok"] and r["speedup_vs_numpy"] and r["speedup_vs_numpy"] < 1]
    n = len(records)
    if not slow:
        lines.append(f"Slower than NumPy: none of the {n} cases.")
        return lines
    lines.append(f"Slower than NumPy: {len(slow)} of the {n} cases.")
    for r in slow:
        text = (f"{r['family']} {r['case']}: {r['speedup_vs_numpy']:.2f}x; likely: "
                + "; ".join(slow_causes(r, load, cpus, threads)))
        lines += textwrap.wrap(text, width, initial_indent="  ", subsequent_indent="    ")
    return lines


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _omp_env():
    """The OpenMP environment variables that change timings, if set."""
    keys = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_PROC_BIND")
    found = [f"{k}={os.environ[k]}" for k in keys if os.environ.get(k)]
    return f" [{' '.join(found)}]" if found else ""


def _wrap(key, text, width=NARROW):
    return textwrap.wrap(text, min(width, NARROW), initial_indent=f"  {key + ':':10}",
                         subsequent_indent=" " * 12)


def header(opts, cfg, notes, legend=None):
    """The report's first lines: machine, settings, legend, notes (`legend`:
    (key, text) items replacing the NumPy report's)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    omp = (f"OpenMP {cfg['openmp_version']} ({os.path.basename(cfg['openmp_library'] or '?')})"
           if cfg["openmp"] else "no OpenMP (one thread)")
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    items = [
        ("CPU", f"{cpu_model()}, {cpus} logical CPUs available ({platform.machine()})"),
        ("fastopt", f"SIMD {cfg['simd_level']}, {omp}{_omp_env()}, {opts.threads} thread(s)"
         + ("; '1 thread': the same kernel on one thread, scaling = its time / fastopt's"
            if opts.threads > 1 and legend is None else "")),
    ] + (legend if legend is not None else [
        ("NumPy", f"{np.__version__} (its elementwise code and reductions run on one thread)"),
        ("times", f"{np.dtype(opts.dtype).name}, medians; 'vs X' = X's time / fastopt's time"),
        ("GB/s", "compulsory traffic (every input read once, every output written once) / "
         "fastopt's time; %probe over 100% means the data fits in cache, or that the kernel "
         "streams memory faster than NumPy's copy and add (the probe is a lower bound)"),
        ("check", "every result is compared with a float64 run of the straightforward NumPy "
         "code before it is timed"),
    ]) + [("note", n) for n in notes]
    lines = [f"fastopt {cfg['version']} benchmark, {now}"]
    for key, text in items:
        lines += _wrap(key, text, opts.width)
    return lines


def probe_line(opts, probe, probes):
    return _wrap("memory", f"probe {probe / 1e9:.1f} GB/s: the better of two {opts.threads}-"
                 f"thread NumPy streams over {opts.probe_mib} MiB arrays (best of several "
                 f"runs), copy {probes['copy'] / 1e9:.1f} GB/s (read + write) and in-place add "
                 f"{probes['add'] / 1e9:.1f} GB/s (2 reads + write)", opts.width)


# -------------------------------------------------------------------- CLI ---

def parse_args(argv, prog):
    p = Parser(prog=prog, description="Time fastopt's kernels against NumPy on this machine; "
                "every result is checked against NumPy first.",
                epilog="The table fits the terminal's width (set COLUMNS to choose); the "
                "report ends with a verdict.  Exit status: 0 all results match NumPy, 1 a "
                "result did not match (FAILED in the table), 2 bad input")
    sci = lambda sizes: ",".join(f"{n:.0e}".replace("e+0", "e") for n in sizes)  # noqa: E731
    p.add_argument("--quick", action="store_true",
                   help="fewer cases and shorter timing (a few seconds)")
    p.add_argument("--sizes", metavar="N,N,...",
                   help="element counts for the one-array optimizer kernels "
                        f"(default {sci(SIZES)}; --quick: {sci(QUICK_SIZES)})")
    p.add_argument("--kernels", metavar="NAME,...",
                   help=f"kernel families to run (default all): {', '.join(FAMILIES)}")
    p.add_argument("--threads", type=int, metavar="N",
                   help="threads for fastopt (default: all OpenMP allows); with N > 1 a "
                        "1-thread column shows the scaling")
    p.add_argument("--dtype", choices=("float32", "float64", "float16", "bfloat16"),
                   default="float32",
                   help="dtype of every array (default float32); float16/bfloat16: the "
                        "low-precision variants (16-bit params, bfloat16 state, 16-bit "
                        "logits and activations) against the same work in float32")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--plot", metavar="PATH.png",
                   help="bar chart of the speedups, in the format of the extension "
                        "(.png, .svg, .pdf...; needs matplotlib)")
    p.add_argument("--peers", action="store_true",
                   help="also time PyTorch and numba, if installed, on the same work")
    p.add_argument("--contention", action="store_true",
                   help="also time each case while busy processes (one per core, started "
                        "and stopped by the run) keep every core busy: fastopt on its default "
                        "threads and on 1 thread, and their ratio")
    return p.parse_args(argv)


def parse_sizes(text):
    sizes = []
    for tok in text.split(","):
        tok = tok.strip().replace("_", "")
        try:
            v = float(tok)
        except ValueError:
            raise BadInput(f"--sizes: {tok!r} is not a number (expected e.g. 1000,1e5,1e6)")
        if not v.is_integer() or v < 1:
            raise BadInput(f"--sizes: {tok!r} is not a positive whole number of elements")
        if v > MAX_SIZE:
            raise BadInput(f"--sizes: {tok} is above the limit of {MAX_SIZE:.0e} elements")
        sizes.append(int(v))
    return sizes


def parse_kernels(text):
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise BadInput("--kernels: no kernel named")
    unknown = [n for n in names if n not in FAMILIES and n != "all"]
    if unknown:
        raise BadInput(f"--kernels: unknown kernel {unknown[0]!r} "
                       f"(choose from {', '.join(FAMILIES)})")
    return list(FAMILIES) if "all" in names else names


def resolve(args):
    """Checked options (raises BadInput naming the option), before anything runs."""
    if args.threads is not None and args.threads < 1:
        raise BadInput(f"--threads must be >= 1, got {args.threads}")
    families = parse_kernels(args.kernels) if args.kernels is not None else list(FAMILIES)
    sizes = parse_sizes(args.sizes) if args.sizes is not None else \
        list(QUICK_SIZES if args.quick else SIZES)
    if args.dtype in ("float16", "bfloat16"):
        half_dtype(args.dtype)
        if args.plot:
            raise BadInput(f"--plot is for the float32/float64 report, not --dtype {args.dtype}")
    if args.json:
        check_writable(args.json, "--json")
    if args.plot:
        check_plot(args.plot, "--plot", extra="plot")
    return families, sizes


def write_plot(path, records, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    recs = [r for r in records if r["speedup_vs_numpy"]]
    labels = [f"{r['family']} {r['case']}" for r in recs]
    y = np.arange(len(recs))
    fig, ax = plt.subplots(figsize=(9, 0.3 * len(recs) + 1.5))
    ax.barh(y - 0.2, [r["speedup_vs_numpy"] for r in recs], 0.4, label="vs NumPy")
    ax.barh(y + 0.2, [r["speedup_vs_inplace"] or 0 for r in recs], 0.4,
            label="vs in-place NumPy")
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set_yticks(y, labels)
    ax.invert_yaxis()
    ax.set_xlabel("speedup of fastopt (x, log scale)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None, prog="fastopt-bench"):
    """Run the benchmark; returns 0 (all checks passed), 1 (a check failed) or 2 (bad input).

    `argv` defaults to ``sys.argv[1:]``; `prog` names the command in messages.
    """
    args = parse_args(sys.argv[1:] if argv is None else argv, prog)
    try:
        families, sizes = resolve(args)
    except BadInput as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2

    cap = getattr(fastopt._config, "_thread_limit", 0)
    try:
        return _run(args, families, sizes)
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return 130
    finally:
        fastopt.set_num_threads(cap)


def _run(args, families, sizes):
    notes = []
    fastopt.set_num_threads(0)
    most = fastopt.get_num_threads()
    threads = args.threads or most
    if threads > most:
        notes.append(f"--threads {threads}: fastopt can start at most {most} here "
                     "(OpenMP limit, e.g. OMP_NUM_THREADS); using "
                     f"{most}")
        threads = most
    load = machine_load()
    cpus = os.cpu_count() or 1
    if is_busy(load, cpus):
        notes.append(f"load average {load['loadavg'] or 0:.1f} on {cpus} CPUs, a spinning "
                     f"thread got {load['cpu_probe']:.0%} of a CPU: other programs are "
                     "running, so times are slower and noisier than on an idle machine")
    present = []
    for family in families:
        missing = [n for n in FAMILIES[family][0] if not hasattr(fastopt, n)]
        if missing:
            notes.append(f"{family}: skipped, fastopt.{missing[0]} is not in this build")
        else:
            present.append(family)
    peers = {}
    if args.peers:
        peers = available_peers(threads)
        absent = [n for n in ("torch", "numba") if n not in peers]
        if absent:
            notes.append(f"--peers: {' and '.join(absent)} not installed, skipped")
        if "numba" in peers:
            notes.append("--peers: numba is compared on the one-array Adam/AdamW only")

    if args.dtype in ("float16", "bfloat16"):
        return run_lowp(args, present, sizes, threads, notes)
    cases = build_cases(present, sizes, args.quick)
    width = terminal_width()
    columns = layout(width, [c.label for c in cases], threads)
    if args.contention:
        notes.append(f"--contention: each case is timed again while {busy_processes()} busy "
                     "processes (one per core) run; '+ every core busy' gives fastopt on its "
                     f"{threads} thread(s), on 1 thread, and the ratio")
    opts = argparse.Namespace(dtype=np.dtype(args.dtype), threads=threads,
                              budget=0.03 if args.quick else 0.1,
                              min_samples=3 if args.quick else 5,
                              probe_mib=64 if args.quick else 128, width=width)
    cfg = fastopt.config()
    print("\n".join(header(opts, cfg, notes)), flush=True)
    probe, probes = probe_bandwidth(threads, opts.probe_mib, 3 * opts.budget)
    print("\n".join(probe_line(opts, probe, probes)))
    print()
    print(fmt_heading(columns))
    sys.stdout.flush()

    records, family = [], None
    for case in cases:
        if case.family != family:
            family = case.family
            print(f"{family}: {FAMILIES[family][1]}", flush=True)
        main_, extras, others = run_case(case, opts, peers)
        lines, record = summarize(case, main_, extras, others, opts.dtype.itemsize, probe,
                                  columns)
        if args.contention:
            lines += contention_lines(run_contention(case, opts, peers), record)
        records.append(record)
        print("\n".join(lines), flush=True)

    failed = [r for r in records if not r["ok"]]
    print()
    if failed:
        print(f"FAILED: {len(failed)} of {len(records)} cases did not match NumPy: "
              + ", ".join(f"{r['family']} {r['case']}" for r in failed))
    else:
        print(f"All {len(records)} cases match NumPy.")
    # The load over the run: the larger of the two measurements.
    end = machine_load()
    load = {"loadavg": max(load["loadavg"] or 0, end["loadavg"] or 0)
            if load["loadavg"] is not None else None,
            "cpu_probe": min(load["cpu_probe"], end["cpu_probe"])}
    conclusion = verdict(records, load, cpus, threads, width)
    if conclusion:
        print()
        print("\n".join(conclusion))

    if args.json:
        report = {"fastopt": cfg["version"], "date": datetime.datetime.now(
                      datetime.timezone.utc).isoformat(timespec="seconds"),
                  "machine": {"cpu": cpu_model(), "logical_cpus": os.cpu_count(),
                              "platform": cfg["platform"]},
                  "config": cfg, "numpy": np.__version__, "dtype": opts.dtype.name,
                  "threads": threads, "quick": args.quick, "contention": args.contention,
                  "probe": {"bytes_per_s": probe, "copy_bytes_per_s": probes["copy"],
                            "add_bytes_per_s": probes["add"], "array_mib": opts.probe_mib},
                  "notes": notes, "load": load, "speedups": speedups(records) if records else {},
                  "slower_than_numpy": [
                      {"family": r["family"], "case": r["case"],
                       "causes": slow_causes(r, load, cpus, threads)}
                      for r in records if r["ok"] and (r["speedup_vs_numpy"] or 1) < 1],
                  "results": records, "failed": len(failed)}
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"results written to {args.json}")
    if args.plot and records:
        write_plot(args.plot, records,
                   f"fastopt {cfg['version']} vs NumPy, {opts.dtype.name}, {threads} thread(s), "
                   f"{cpu_model()}, {datetime.date.today().isoformat()}")
        print(f"speedup chart written to {args.plot}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
