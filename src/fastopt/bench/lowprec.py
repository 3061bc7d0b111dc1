"""``--dtype float16|bfloat16``: each case times a 16-bit way of doing a job
against the float32 kernel doing the same job (the ratio is what the 16-bit
variant is for), after checking the 16-bit result against the float32 one
within the 16-bit type's rounding.
"""
import argparse
import json
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

import fastopt

from .._version import __version__
from . import settings, timing
from .cases import _rng, _uniform
from .report import fmt_ratio, fmt_time, header, terminal_width
from .settings import FAMILIES, BadInput
from .timing import fastopt_threads


@dataclass
class LowpCase:
    """A 16-bit way of doing a job (`make` builds it and its float32 counterpart)."""
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
    with float32 master and state, float32 or 16-bit gradients.  A step
    returns the parameter array (the optimizer updates it in place)."""
    def make(half):
        rng = _rng()
        p0 = _uniform(rng, n, np.float32, 0.1)
        gs = [_uniform(rng, n, np.float32, 0.01) for _ in range(2)]

        def stepper(param, grads, **kw):
            opt = fastopt.Adam([param], **kw)
            t = 0

            def step():
                nonlocal t
                t += 1
                opt.step([grads[t & 1]])
                return param
            return step

        def f32():
            return stepper(p0.copy(), gs)

        if how[0] == "state":
            def f16():
                return stepper(p0.copy(), gs, state_dtype="bfloat16", state_rounding=how[1])
        else:
            def f16():
                return stepper(p0.astype(half), [g.astype(half) for g in gs] if how[1] else gs)

        def check(p32, p16):
            if how[0] == "params":
                # exactly: the float32 step on the master, then rounding
                step = stepper(p0.astype(half).astype(np.float32),
                               [g.astype(half).astype(np.float32) for g in gs] if how[1] else gs)
                step()
                want = step().astype(half)
                same = np.array_equal(p16.view(np.uint16), want.view(np.uint16))
                return None if same else "params differ from the float32 step, rounded"
            # bfloat16 state changes an update by its rounding (2**-8 relative)
            bad = np.abs(p16 - p32) > 2.0**-5 * np.abs(p32 - p0).max()
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


def lowp_cases(families, n, quick):
    """The low-precision cases of `families` for one-array size n."""
    cases = []
    if "adam" in families:
        cases += [_lowp_adam(n, ("state", "stochastic")), _lowp_adam(n, ("state", "nearest")),
                  _lowp_adam(n, ("params", False)), _lowp_adam(n, ("params", True))]
    for family in ("cross_entropy", "log_softmax"):
        if family in families:
            cases += [_lowp_softmax(family, sh) for sh, q in settings.SOFTMAX_SHAPES
                      if q or not quick]
    if "batchnorm" in families:
        cases += [_lowp_batchnorm(sh, ax) for sh, ax, q in settings.BN_SHAPES if q or not quick]
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
                    times = timing.measure_pair(steps, budget, min_samples)
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
            json.dump({"fastopt": __version__, "config": cfg, "dtype": half.name,
                       "threads": threads, "quick": args.quick, "notes": notes,
                       "results": records, "failed": len(failed)}, f, indent=1)
        print(f"results written to {args.json}")
    return 1 if failed else 0

