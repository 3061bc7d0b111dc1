"""Every optimizer's whole-model step against torch.optim's fastest CPU path.

For each optimizer kind, on float32:

* ``resnet18``: ResNet-18's 62 parameter arrays (11.7M elements);
* ``500x1000``: 500 arrays of 1000 elements (per-array overhead);
* ``1e7``: one array of 1e7 elements (bandwidth: the step's bytes per
  element, with the memory probe of ``python -m fastopt bench``);
* Adafactor also on one 4096 x 4096 matrix.

Variants: ``numpy`` (a loop of the careful in-place NumPy update over the
arrays, ``python -m fastopt bench``'s "in-place" baseline; its SGD is the
course's Momentum, dampening = momentum), ``fastopt``
(``fastopt.<Kind>.step(grads)`` on NumPy arrays),
``bridge`` (``fastopt.torch.<Kind>.step()``, gradients set as ``.grad``),
``torch`` (``torch.optim.<Kind>`` with ``fused=True`` for Adagrad, Adam,
AdamW and SGD (torch's fused CPU kernels), else ``foreach=True``).  Lion is
not in torch.optim: fastopt only.  Rounds alternate the variants in one
process, so machine noise hits them alike; the table gives medians and the
ratios torch / fastopt and NumPy / fastopt.  The machine's load average is
printed before and after.  Needs torch::

    PYTHONPATH=src python benchmarks/optimizers_vs_torch.py
    PYTHONPATH=src python benchmarks/optimizers_vs_torch.py --kinds Adam Lion --rounds 9
"""
import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch

import fastopt
import fastopt.torch as fo
from fastopt import _kinds
from fastopt.bench import OPTIMIZERS, fresh, probe_bandwidth, resnet18_shapes
from fastopt.bench.cases import _optimizer_inputs, optimizer_impls

FUSED = {"Adagrad", "Adam", "AdamW", "SGD"}
# The state each kind keeps per element in its default configuration, and
# the bytes a step moves per float32 element: param read + written, grad
# read, every state array read + written.
SGD_OPTS = dict(momentum=0.9)


def options(kind):
    return SGD_OPTS if kind == "SGD" else {}


def step_bytes(kind, shape):
    decl = _kinds.KINDS[kind]
    group = {**decl.defaults(), **options(kind)}
    n = int(np.prod(shape))
    state = sum(int(np.prod(s.shape_for(shape))) for s, need in zip(decl.slots, decl.needs(group))
                if need and s.shape_for(shape) is not None)
    return 4 * (3 * n + 2 * state)


def variants(kind, shapes, rng):
    """{name: step()} over fresh copies of the same parameters and gradients."""
    params = [rng.standard_normal(s).astype(np.float32) * 0.1 for s in shapes]
    grads = [[rng.standard_normal(s).astype(np.float32) * 0.01 for s in shapes]
             for _ in range(2)]
    out = {}
    spec = OPTIMIZERS.get(kind.lower())
    if spec is not None:                # (Adafactor: its NumPy baseline is for one matrix)
        out["numpy"] = optimizer_impls(spec, with_state=False).inplace(
            fresh(_optimizer_inputs(shapes, np.float32, spec)))
    ps = [p.copy() for p in params]
    opt = getattr(fastopt, kind)(ps, **options(kind))
    t = [0]

    def numpy_step():
        t[0] += 1
        opt.step(grads[t[0] & 1])
    out["fastopt"] = numpy_step
    tgrads = [[torch.from_numpy(g) for g in gs] for gs in grads]

    def torch_stepper(make):
        tp = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in params]
        o = make(tp)
        c = [0]

        def step():
            c[0] += 1
            for p, g in zip(tp, tgrads[c[0] & 1]):
                p.grad = g
            o.step()
        return step
    if hasattr(fo, kind):
        out["bridge"] = torch_stepper(lambda tp: getattr(fo, kind)(tp, **options(kind)))
    if hasattr(torch.optim, kind):
        path = {"fused": True} if kind in FUSED else {"foreach": True}
        out["torch"] = torch_stepper(lambda tp: getattr(torch.optim, kind)(tp, **options(kind),
                                                                            **path))
    return out


def time_rounds(steps, rounds, budget):
    """Median seconds per step of each variant, rounds alternating them."""
    for s in steps.values():            # warm up (and allocate torch's state)
        s()
        s()
    times = {k: [] for k in steps}
    for _ in range(rounds):
        for k, s in steps.items():
            n, t0 = 0, time.perf_counter()
            while True:
                s()
                n += 1
                dt = time.perf_counter() - t0
                if dt > budget:
                    break
            times[k].append(dt / n)
    return {k: statistics.median(v) for k, v in times.items()}


def fmt(t):
    return f"{t * 1e6:.0f} us" if t < 1e-3 else f"{t * 1e3:.2f} ms"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kinds", nargs="*", default=[k for k in _kinds.KINDS])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--budget", type=float, default=0.15, help="seconds per variant per round")
    args = ap.parse_args(argv)
    threads = fastopt.get_num_threads()
    print(f"load average before: {os.getloadavg()}; fastopt threads {threads}, "
          f"torch threads {torch.get_num_threads()}")
    probe = probe_bandwidth(threads, 64, 0.5)[0]
    print(f"memory probe: {probe / 1e9:.1f} GB/s")
    cases = [("resnet18", resnet18_shapes()), ("500x1000", [(1000,)] * 500),
             ("1e7", [(10_000_000,)])]
    rng = np.random.default_rng(0)
    print(f"{'kind':10} {'case':10} {'numpy':>10} {'fastopt':>10} {'bridge':>10} {'torch':>10} "
          f"{'numpy/fo':>9} {'torch/fo':>9} {'torch/bridge':>12} {'GB/s':>6} {'%probe':>7}")
    for kind in args.kinds:
        kcases = cases + ([("4096x4096", [(4096, 4096)])] if kind == "Adafactor" else [])
        for label, shapes in kcases:
            med = time_rounds(variants(kind, shapes, rng), args.rounds, args.budget)
            fo_t, br, th, npy = med["fastopt"], med.get("bridge"), med.get("torch"), \
                med.get("numpy")
            gbps = pct = ""
            if len(shapes) == 1:
                b = step_bytes(kind, shapes[0])
                gbps = f"{b / fo_t / 1e9:.1f}"
                pct = f"{100 * b / fo_t / probe:.0f}%"
            print(f"{kind:10} {label:10} {fmt(npy) if npy else '-':>10} {fmt(fo_t):>10} "
                  f"{fmt(br) if br else '-':>10} {fmt(th) if th else '-':>10} "
                  f"{npy / fo_t if npy else 0:>8.2f}x {th / fo_t if th else 0:>8.2f}x "
                  f"{th / br if th and br else 0:>11.2f}x {gbps:>6} {pct:>7}", flush=True)
    print(f"load average after: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
