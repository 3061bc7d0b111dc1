"""The cases: their inputs and the implementations that are timed on them.

The optimizers are declared once, in `OPTIMIZERS`; `optimizer_impls` makes
every implementation of one (NumPy, in-place NumPy, the functional kernel,
fastopt's optimizer class, the peers) from its declaration.
"""
import inspect
import math
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Optional

import numpy as np

import fastopt

from .. import _baselines as B
from .. import _kinds
from . import peers, settings
from .settings import (ALPHA, BETAS, ELEMENTWISE, EPS_ADAM, EPS_BN, EPS_RMS, FAMILIES, LR_ADAM,
                       LR_RMS, LR_SGD, MOMENTUM, WD_ADAMW)


@dataclass
class Work:
    """Inputs and implementations of one case (see the package docstring)."""
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


# ------------------------------------------------------------- optimizers ---

@dataclass(frozen=True)
class OptimizerSpec:
    """How the benchmark runs one optimizer (an entry of `OPTIMIZERS`)."""
    kernel: str             # fastopt's functional kernel: kernel(p, g, *state, **hp)
    hp: dict                # its hyperparameters, which torch.optim's and fastopt's classes share
    numpy: Callable         # `fastopt._baselines`: (p, g, *state[, t], **numpy_hp) -> (p, *state)
    inplace: Callable       # the same in place, with a `work` array
    numpy_hp: dict          # the same hyperparameters, as the baselines name them
    slots: tuple            # the state arrays, in argument order (PyTorch's names): `_state`
    counts_steps: bool      # the kernel (step=t) and the baselines (t) take the step number
    cls: Optional[str] = None       # fastopt's (and fastopt.torch's) optimizer class
    torch: Optional[str] = None     # the torch.optim class timed with --peers
    torch_kw: dict = field(default_factory=lambda: {"fused": True})   # ... with these options
    numba: Optional[Callable] = None    # numba_hp -> factory timed with --peers (one array)
    starts: tuple = ()      # what each state array starts at (default 0): `_starts`
    not_kernel: tuple = ()  # keys of `hp` the kernel does not take (they start the state)
    scalars: dict = field(default_factory=dict)   # the kernel's per-array numbers: their starts
    calls: int = 2          # steps before the result is compared with NumPy's

    @property
    def traffic(self):
        """Compulsory traffic per parameter element, in elements: the parameter
        and each state array read and written, the gradient read."""
        return 3 + 2 * len(self.slots)


def _state(kind, hp):
    """The state arrays a kind's kernel takes with hyperparameters `hp` (the
    rest at their defaults), in its argument order: as `kind` declares them."""
    needs = kind.needs({**kind.defaults(), **hp})
    return tuple(slot.name for slot, need in zip(kind.slots, needs) if need)


def _starts(kind, hp):
    """What those state arrays start at (Rprop's step sizes: lr), as declared."""
    group = {**kind.defaults(), **hp}
    return tuple(kind.start(slot, group) for slot, need in zip(kind.slots, kind.needs(group))
                 if need)


def _scalars(kind, hp):
    """The per-parameter numbers of `kind` (NAdam's mu_product, ASGD's eta
    and mu), which its kernel takes and returns: {name: start}."""
    group = {**kind.defaults(), **hp}
    return {x.name: kind.start(x, group) for x in kind.scalars}


def _declared(kind, *names):
    """The declared defaults (torch's) of hyperparameters `names` of `kind`."""
    defaults = kind.defaults()
    return {k: defaults[k] for k in names}


def _kind_spec(kind, hp, numpy, inplace, numpy_hp, **kw):
    """The `OptimizerSpec` of one of the other kinds: its kernel, class and
    torch.optim class by name, its state as declared."""
    return OptimizerSpec(
        kernel=f"{kind.native}_step", hp=hp, numpy=numpy, inplace=inplace, numpy_hp=numpy_hp,
        slots=_state(kind, hp), starts=_starts(kind, hp), scalars=_scalars(kind, hp),
        counts_steps="t" in inspect.signature(numpy).parameters, cls=kind.name, **kw)


_ADAM_HP = dict(lr=LR_ADAM, betas=BETAS, eps=EPS_ADAM)
_RMS_HP = dict(lr=LR_RMS, alpha=ALPHA, eps=EPS_RMS)
_SGD_HP = dict(lr=LR_SGD, momentum=MOMENTUM, dampening=MOMENTUM)
_ADAM_NUMPY_HP = dict(lr=LR_ADAM, b1=BETAS[0], b2=BETAS[1], eps=EPS_ADAM)

# The values are those of settings.py (PyTorch's defaults); `hp` names them
# as fastopt and PyTorch do, `numpy_hp` as the NumPy baselines do.
OPTIMIZERS = {
    "adam": OptimizerSpec(
        kernel="adam_step", hp=_ADAM_HP, numpy=B.adam_numpy, inplace=B.adam_inplace,
        numpy_hp=dict(_ADAM_NUMPY_HP, weight_decay=0.0, decoupled=False),
        slots=_state(_kinds.ADAM, _ADAM_HP), counts_steps=True,
        cls="Adam", torch="Adam", numba=peers.numba_adam),
    "adamw": OptimizerSpec(
        kernel="adamw_step", hp=dict(_ADAM_HP, weight_decay=WD_ADAMW),
        numpy=B.adam_numpy, inplace=B.adam_inplace,
        numpy_hp=dict(_ADAM_NUMPY_HP, weight_decay=WD_ADAMW, decoupled=True),
        slots=_state(_kinds.ADAMW, _ADAM_HP), counts_steps=True,
        torch="AdamW", numba=peers.numba_adam),
    "rmsprop": OptimizerSpec(
        kernel="rmsprop_step", hp=_RMS_HP,
        numpy=B.rmsprop_numpy, inplace=B.rmsprop_inplace,
        numpy_hp=dict(lr=LR_RMS, alpha=ALPHA, eps=EPS_RMS),
        slots=_state(_kinds.RMSPROP, _RMS_HP), counts_steps=False),
    "sgd": OptimizerSpec(      # the course's Momentum: dampening = momentum
        kernel="sgd_step", hp=_SGD_HP,
        numpy=B.momentum_numpy, inplace=B.momentum_inplace,
        numpy_hp=dict(lr=LR_SGD, beta=MOMENTUM),
        slots=_state(_kinds.SGD, _SGD_HP), counts_steps=False),
}


def _betas(hp):
    return dict(b1=hp["betas"][0], b2=hp["betas"][1])


_ADAGRAD_HP = _declared(_kinds.ADAGRAD, "lr", "lr_decay", "eps")
_ADAMAX_HP = _declared(_kinds.ADAMAX, "lr", "betas", "eps")
_NADAM_HP = _declared(_kinds.NADAM, "lr", "betas", "eps", "momentum_decay")
_RADAM_HP = _declared(_kinds.RADAM, "lr", "betas", "eps")
_ADADELTA_HP = _declared(_kinds.ADADELTA, "lr", "rho", "eps")
_ASGD_HP = _declared(_kinds.ASGD, "lr", "lambd", "alpha", "t0")
_RPROP_HP = _declared(_kinds.RPROP, "lr", "etas", "step_sizes")
_LION_HP = _declared(_kinds.LION, "lr", "betas")
_ETAS, _STEP_SIZES = _RPROP_HP["etas"], _RPROP_HP["step_sizes"]

# torch.optim has a fused CPU implementation of Adagrad only; the others
# are timed with their default one (a loop over the tensors: one, here).
OPTIMIZERS.update({
    "adagrad": _kind_spec(_kinds.ADAGRAD, _ADAGRAD_HP, B.adagrad_numpy, B.adagrad_inplace,
                          dict(_ADAGRAD_HP), torch="Adagrad"),
    "adamax": _kind_spec(_kinds.ADAMAX, _ADAMAX_HP, B.adamax_numpy, B.adamax_inplace,
                         dict(lr=_ADAMAX_HP["lr"], eps=_ADAMAX_HP["eps"], **_betas(_ADAMAX_HP)),
                         torch="Adamax", torch_kw={}),
    "nadam": _kind_spec(_kinds.NADAM, _NADAM_HP, B.nadam_numpy, B.nadam_inplace,
                        dict(lr=_NADAM_HP["lr"], eps=_NADAM_HP["eps"],
                             momentum_decay=_NADAM_HP["momentum_decay"], **_betas(_NADAM_HP)),
                        torch="NAdam", torch_kw={}),
    "radam": _kind_spec(_kinds.RADAM, _RADAM_HP, B.radam_numpy, B.radam_inplace,
                        dict(lr=_RADAM_HP["lr"], eps=_RADAM_HP["eps"], **_betas(_RADAM_HP)),
                        torch="RAdam", torch_kw={}),
    "adadelta": _kind_spec(_kinds.ADADELTA, _ADADELTA_HP, B.adadelta_numpy, B.adadelta_inplace,
                           dict(_ADADELTA_HP), torch="Adadelta", torch_kw={}),
    "asgd": _kind_spec(_kinds.ASGD, _ASGD_HP, B.asgd_numpy, B.asgd_inplace, dict(_ASGD_HP),
                       torch="ASGD", torch_kw={}),
    "rprop": _kind_spec(_kinds.RPROP, _RPROP_HP, B.rprop_numpy, B.rprop_inplace,
                        dict(etaminus=_ETAS[0], etaplus=_ETAS[1], step_min=_STEP_SIZES[0],
                             step_max=_STEP_SIZES[1]),
                        not_kernel=("lr",), torch="Rprop", torch_kw={}),
    # Not in torch.optim.  One step is compared: from the second on, an
    # element whose momentum is within rounding of 0 may take the other
    # sign in float32 than in the float64 reference.
    "lion": _kind_spec(_kinds.LION, _LION_HP, B.lion_numpy, B.lion_inplace,
                       dict(lr=_LION_HP["lr"], **_betas(_LION_HP)), calls=1),
})
MODEL_OPTIMIZER = "adam"        # the `optimizer` family: fastopt.Adam over a model's arrays


def _optimizer_inputs(shapes, dtype, spec):
    """Parameters, two gradients (alternating between steps), the state at
    its start (zero, or Rprop's step sizes at lr)."""
    rng = _rng()
    params = [_uniform(rng, s, dtype, 0.1) for s in shapes]
    grads = [[_const(_uniform(rng, s, dtype, 0.01)) for s in shapes] for _ in range(2)]
    starts = spec.starts or (0.0,) * len(spec.slots)
    state = [[np.full(s, v, dtype) for s in shapes] for v in starts]
    return {"p": params, "g": grads, "s": state}


class Impls(NamedTuple):
    """Implementation factories of one optimizer (see `optimizer_impls`)."""
    numpy: Callable
    inplace: Callable
    kernel: Callable            # a loop of functional-kernel calls, one per array
    cls: Optional[Callable]     # fastopt's optimizer class
    peers: dict                 # {label: (library, factory)}
    bridge: Optional[Callable]  # fastopt.torch's class on torch tensors


def optimizer_impls(spec, with_state):
    """Every implementation of the optimizer `spec` over the arrays of an
    `_optimizer_inputs` dict.  Steps alternate between the two gradients and
    return the parameters, and with `with_state` (one array) its state
    arrays too.  Kernels and classes are looked up in `fastopt` when an
    implementation is built, so that a replaced one is what runs."""
    steps = spec.counts_steps

    def result(s):
        """The arrays a step returns (updated in place by all but `numpy_`)."""
        return tuple(s["p"]) + (tuple(st[0] for st in s["s"]) if with_state else ())

    # The argument tuples and keywords are built once, not in the step: a
    # call of ~1 us would otherwise time the Python that assembles them.
    def arguments(s):
        """For each of the two gradients, one (p, g, *state) per array."""
        return [[(p, g, *st) for p, g, *st in zip(s["p"], grads, *s["s"])] for grads in s["g"]]

    def numpy_(s):
        ps = list(s["p"])
        sts = [tuple(st[i] for st in s["s"]) for i in range(len(ps))]   # of array i, now
        (g0, g1), fn, kw = s["g"], spec.numpy, dict(spec.numpy_hp)
        indices = range(len(ps))
        # NAdam's and ASGD's numbers: a dict per array
        wss = [{"ws": {}} if "ws" in inspect.signature(fn).parameters else {} for _ in ps]
        t = 0

        def step():
            nonlocal t
            t += 1
            grads = g1 if t & 1 else g0
            if steps:
                kw["t"] = t
            for i in indices:
                new = fn(ps[i], grads[i], *sts[i], **kw, **wss[i])
                ps[i], sts[i] = new[0], new[1:]
            return (ps[0], *sts[0]) if with_state else tuple(ps)
        return step

    def inplace(s):
        ps = s["p"]
        flat = np.empty(max(p.size for p in ps), ps[0].dtype)    # one workspace, reused
        kws = [dict(spec.numpy_hp, work=flat[:p.size].reshape(p.shape)) for p in ps]
        if "ws" in inspect.signature(spec.inplace).parameters:     # numbers, more scratch
            for kw in kws:
                kw["ws"] = {}
        calls = [list(zip(args, kws)) for args in arguments(s)]
        fn, out = spec.inplace, result(s)
        t = 0

        def step():
            nonlocal t
            t += 1
            ts = (t,) if steps else ()
            for args, kw in calls[t & 1]:
                fn(*args, *ts, **kw)
            return out
        return step

    def kernel(s):
        fn = getattr(fastopt, spec.kernel)
        kw = {k: v for k, v in spec.hp.items() if k not in spec.not_kernel}
        calls, out = arguments(s), result(s)
        names = tuple(spec.scalars)
        numbers = [dict(spec.scalars) for _ in s["p"]]      # each array's, as its kernel returns
        t = 0

        def step():
            nonlocal t
            t += 1
            if steps:
                kw["step"] = t
            if names:
                for k, args in enumerate(calls[t & 1]):
                    new = fn(*args, **kw, **numbers[k])
                    numbers[k] = dict(zip(names, new if isinstance(new, tuple) else (new,)))
            else:
                for args in calls[t & 1]:
                    fn(*args, **kw)
            return out
        return step

    def cls(s):
        ps, (g0, g1) = s["p"], s["g"]
        opt = getattr(fastopt, spec.cls)(ps, **spec.hp)
        out = tuple(ps) + (tuple(opt.state[0][k] for k in spec.slots) if with_state else ())
        t = 0

        def step():
            nonlocal t
            t += 1
            opt.step(g1 if t & 1 else g0)
            return out
        return step

    others = {}
    if spec.torch:
        options = ", ".join(f"{k}={v}" for k, v in spec.torch_kw.items())
        others[f"torch {spec.torch}({options})"] = (
            "torch", peers.torch_optimizer(spec.torch, spec.hp, spec.slots if with_state else (),
                                           spec.torch_kw))
    if spec.numba and with_state:       # a loop over one array
        others["numba parallel loop"] = ("numba", spec.numba(spec.numpy_hp))
    bridge = peers.fastopt_torch(spec.cls, spec.hp) if spec.cls else None
    return Impls(numpy_, inplace, kernel, cls if spec.cls else None, others, bridge)


def _add_peers(work, impls, peers_):
    """Add the peers of `impls` whose library is in `peers_`."""
    for label, (library, factory) in impls.peers.items():
        if library in peers_:
            work.peers[label] = factory


def _elementwise_case(family, n):
    spec = OPTIMIZERS[family]
    impls = optimizer_impls(spec, with_state=True)

    def make(dtype, peers_):
        work = Work(_optimizer_inputs([(n,)], dtype, spec), impls.numpy,
                    impls.inplace, impls.kernel, ("param",) + spec.slots, calls=spec.calls)
        if spec.cls in FAMILIES[family][0]:     # the class too (one array here)
            work.extras[f"{spec.cls}(params).step(grads)"] = impls.cls
        _add_peers(work, impls, peers_)
        return work

    return Case(family, f"n={n:,}", make, spec.traffic * n, n)


def _model_case(label, shapes):
    """Many arrays: fastopt's optimizer class (``fastopt.Adam(params).step(grads)``)
    against NumPy loops, and a loop of functional-kernel calls."""
    n = sum(math.prod(s) for s in shapes)
    spec = OPTIMIZERS[MODEL_OPTIMIZER]
    impls = optimizer_impls(spec, with_state=False)

    def make(dtype, peers_):
        work = Work(_optimizer_inputs(shapes, dtype, spec), impls.numpy,
                    impls.inplace, impls.cls, tuple(f"param[{i}]" for i in range(len(shapes))))
        work.extras[f"loop of {spec.kernel} calls"] = impls.kernel
        if "torch" in peers_:
            work.extras[f"torch.{spec.cls} on torch tensors (incl. setting .grad)"] = impls.bridge
        _add_peers(work, impls, peers_)
        return work

    return Case("optimizer", f"{label} ({n / 1e6:.1f}M)", make, spec.traffic * n, n)


# fastopt.torch.Adam with the `optimizer` family's hyperparameters (as the
# --peers row times it; benchmarks/test_bench_torch.py uses it directly).
_fastopt_torch_adam = optimizer_impls(OPTIMIZERS[MODEL_OPTIMIZER], with_state=False).bridge


# -------------------------------------------------------- other families ---

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

    def make(dtype, peers_):
        rng = _rng()
        c = shape[axis]
        inputs = {"x": _uniform(rng, shape, dtype, 2.0, 0.5),
                  "gamma": _uniform(rng, (c,), dtype, 0.2, 1.0),
                  "beta": _uniform(rng, (c,), dtype, 0.2),
                  "dy": _uniform(rng, shape, dtype)}
        inputs = {k: _const(v) for k, v in inputs.items()}
        work = Work(inputs, numpy_, inplace, fast, ("y", "dx", "dgamma", "dbeta"), calls=1)
        if "torch" in peers_:
            work.peers["torch F.batch_norm fwd+bwd"] = peers.torch_batchnorm(axis)
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

    def make(dtype, peers_):
        rng = _rng()
        inputs = {"x": _const(_uniform(rng, shape, dtype, 5.0)),
                  "target": _const(rng.integers(0, shape[1], shape[0]))}
        names = ("log_softmax",) if family == "log_softmax" else ("loss", "dlogits")
        work = Work(inputs, numpy_, inplace, fast, names, calls=1)
        if "torch" in peers_:
            label = ("torch F.log_softmax" if family == "log_softmax"
                     else "torch F.cross_entropy fwd+bwd")
            work.peers[label] = peers.torch_softmax(family)
        return work

    return Case(family, f"{shape}", make, None, math.prod(shape))


def _adafactor_case(shape):
    """Adafactor on one matrix: the functional kernel, the class, NumPy, torch's
    foreach path (its fastest on the CPU), and fastopt.torch's class."""
    kind = _kinds.ADAFACTOR
    hp = dict(lr=kind.hyper("lr").default)
    np_hp = dict(hp, beta2_decay=kind.hyper("beta2_decay").default, eps2=kind.hyper("eps").default[1],
                 d=kind.hyper("d").default)
    rows, cols = shape[:-1] + (1,), shape[:-2] + (1, shape[-1])

    def inputs(dtype):
        rng = _rng()
        return {"p": [_uniform(rng, shape, dtype, 0.1)],
                "g": [[_const(_uniform(rng, shape, dtype, 0.01))] for _ in range(2)],
                "s": [[np.zeros(rows, dtype)], [np.zeros(cols, dtype)]]}

    def stepper(update):
        def impl(s):
            p, (rv,), (cv,) = s["p"][0], *s["s"]
            grads = [g[0] for g in s["g"]]
            t = 0

            def step():
                nonlocal t, p, rv, cv
                t += 1
                p, rv, cv = update(p, grads[t & 1], rv, cv, t)
                return p, rv, cv
            return step
        return impl

    def numpy_(p, g, rv, cv, t):
        return B.adafactor_numpy(p, g, rv, cv, t, **np_hp)

    def inplace(s):
        work = np.empty_like(s["p"][0])
        return stepper(lambda p, g, rv, cv, t: B.adafactor_inplace(p, g, rv, cv, t, **np_hp,
                                                                   work=work))(s)

    def kernel(p, g, rv, cv, t):
        fastopt.adafactor_step(p, g, step=t, row_var=rv, col_var=cv, **hp)
        return p, rv, cv

    def cls(s):
        opt = fastopt.Adafactor(s["p"], **hp)
        grads = [g for g in s["g"]]
        st = opt.state[0]
        t = 0

        def step():
            nonlocal t
            t += 1
            opt.step(grads[t & 1])
            return s["p"][0], st["row_var"], st["col_var"]
        return step

    def make(dtype, peers_):
        work = Work(inputs(dtype), stepper(numpy_), inplace, stepper(kernel),
                    ("param", "row_var", "col_var"))
        work.extras["Adafactor(params).step(grads)"] = cls
        if "torch" in peers_:
            work.peers["torch Adafactor(foreach=True)"] = peers.torch_optimizer(
                "Adafactor", hp, ("row_var", "col_var"), {"foreach": True})
            work.extras["fastopt.torch.Adafactor on torch tensors (incl. setting .grad)"] = \
                peers.fastopt_torch("Adafactor", hp, ("row_var", "col_var"))
        return work

    n = math.prod(shape)
    # compulsory: read param and grad, write param (the kernel makes 3 passes)
    return Case("adafactor", f"{shape}", make, 3 * n, n)


def build_cases(families, sizes, quick):
    """The cases of `families`, in the order of FAMILIES."""
    cases = []
    for family in FAMILIES:
        if family not in families:
            continue
        if family in ELEMENTWISE:
            cases += [_elementwise_case(family, n) for n in sizes]
        elif family == "optimizer":
            cases += [_model_case(lb, shapes) for lb, shapes, q in settings.MODELS
                      if q or not quick]
        elif family == "batchnorm":
            cases += [_batchnorm_case(sh, ax) for sh, ax, q in settings.BN_SHAPES
                      if q or not quick]
        elif family == "adafactor":
            cases += [_adafactor_case(sh) for sh, q in settings.ADAFACTOR_SHAPES
                      if q or not quick]
        else:
            cases += [_softmax_case(family, sh) for sh, q in settings.SOFTMAX_SHAPES
                      if q or not quick]
    return cases
