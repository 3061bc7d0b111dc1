"""Every optimizer against torch.optim: the largest relative difference.

For each kind and option set below, 50 steps over 8 parameters in two
param groups (shapes from 0-d to 3-d, the second group with other
hyperparameters), the same gradients for all:

* float64: fastopt's NumPy class and fastopt.torch's class against
  torch.optim's default (single-tensor) implementation in float64; the
  table gives max |fastopt - torch| / max |torch| over parameters and
  state arrays.
* float32: fastopt's float32 run and torch's own float32 run, each against
  torch's float64 run (the same relative measure); fastopt should be no
  farther than torch.

Lion is not in torch.optim: it is compared with its formula (optax's lion)
written in NumPy float64.  Needs torch::

    PYTHONPATH=src python tools/parity_table.py
"""
import sys

import numpy as np
import torch

import fastopt
import fastopt.torch as fo

SHAPES = [(), (1,), (17,), (3, 5), (1, 9), (40, 30), (1000,), (2, 3, 7)]
SPLIT = 3
OPTIONS = {
    "SGD": [dict(lr=0.01), dict(lr=0.01, momentum=0.9, dampening=0.1, weight_decay=0.1),
            dict(lr=0.01, momentum=0.9, nesterov=True, maximize=True)],
    "RMSprop": [{}, dict(momentum=0.9, centered=True, weight_decay=0.1, maximize=True)],
    "Adam": [{}, dict(amsgrad=True, weight_decay=0.1, maximize=True),
             dict(decoupled_weight_decay=True, weight_decay=0.1)],
    "AdamW": [{}, dict(amsgrad=True, maximize=True)],
    "Adagrad": [{}, dict(lr_decay=0.05, weight_decay=0.1, initial_accumulator_value=0.3,
                         eps=1e-6, maximize=True)],
    "Adamax": [{}, dict(betas=(0.8, 0.95), eps=1e-4, weight_decay=0.1, maximize=True)],
    "NAdam": [{}, dict(weight_decay=0.1, momentum_decay=0.05, maximize=True),
              dict(weight_decay=0.1, decoupled_weight_decay=True)],
    "RAdam": [{}, dict(weight_decay=0.1, maximize=True),
              dict(weight_decay=0.1, decoupled_weight_decay=True)],
    "Adadelta": [{}, dict(lr=0.5, rho=0.5, eps=1e-4, weight_decay=0.1, maximize=True)],
    "ASGD": [{}, dict(lambd=0.1, alpha=0.5, t0=8, weight_decay=0.1, maximize=True)],
    "Rprop": [{}, dict(etas=(0.3, 1.1), step_sizes=(1e-3, 0.07), maximize=True)],
    "Adafactor": [{}, dict(lr=0.03, beta2_decay=-0.5, eps=(1e-20, 1e-2), d=1.5,
                           weight_decay=0.1, maximize=True)],
    "Lion": [{}, dict(lr=0.01, betas=(0.95, 0.98), weight_decay=0.5, maximize=True)],
}
GROUP1 = {"lr": 0.004}


def data(dtype):
    rng = np.random.default_rng(0)
    params = [np.asarray(rng.standard_normal(s)).astype(dtype) for s in SHAPES]
    grads = [[np.asarray(rng.standard_normal(s) * (0.5 + t % 3)).astype(dtype) for s in SHAPES]
             for t in range(50)]
    return params, grads


def groups(ps, opts, kind):
    g1 = dict(GROUP1)
    if kind == "SGD":
        g1["lr"] = 0.002
    return [{"params": ps[:SPLIT]}, {"params": ps[SPLIT:], **g1}]


def run_numpy(kind, opts, dtype):
    params, grads = data(dtype)
    opt = getattr(fastopt, kind)(groups(params, opts, kind), **opts)
    for g in grads:
        opt.step(g)
    return params, [dict(st) for st in opt.state]


def run_torch(cls, kind, opts, dtype):
    params, grads = data(dtype)
    tp = [torch.nn.Parameter(torch.from_numpy(p)) for p in params]
    opt = cls(groups(tp, opts, kind), **opts)
    for gs in grads:
        for p, g in zip(tp, gs):
            p.grad = torch.from_numpy(g)
        opt.step()
    return ([p.detach().numpy() for p in tp],
            [{k: v.numpy() for k, v in opt.state[p].items() if k != "step"} for p in tp])


def lion_formula(opts):
    params, grads = data(np.float64)
    lr, (b1, b2) = opts.get("lr", 1e-4), opts.get("betas", (0.9, 0.99))
    wd, mx = opts.get("weight_decay", 0.0), opts.get("maximize", False)
    ms = [np.zeros_like(p) for p in params]
    for gs in grads:
        for i, (p, g) in enumerate(zip(params, gs)):
            glr = GROUP1["lr"] if i >= SPLIT else lr
            g = -g if mx else g
            p *= 1 - glr * wd
            p -= glr * np.sign(b1 * ms[i] + (1 - b1) * g)
            ms[i] = b2 * ms[i] + (1 - b2) * g
    return params, [{"exp_avg": m} for m in ms]


def rel(a, b):
    """max |a - b| / max |b| over the parameters and the state arrays b has."""
    (pa, sa), (pb, sb) = a, b
    num = den = 0.0
    pairs = list(zip(pa, pb))
    for x, y in zip(sa, sb):
        pairs += [(x[k], y[k]) for k in y if k in x and np.ndim(y[k]) > 0]
    for x, y in pairs:
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        if y.size:
            num = max(num, float(np.abs(x - y).max()))
            den = max(den, float(np.abs(y).max()))
    return num / den if den else 0.0


def main():
    print(f"{'optimizer':10} {'f64 numpy':>10} {'f64 bridge':>10} {'f32 fastopt':>11} "
          f"{'f32 torch':>10}   (max over {'/'.join(str(len(v)) for v in OPTIONS.values())} "
          "option sets)")
    for kind, cases in OPTIONS.items():
        worst = [0.0] * 4
        for opts in cases:
            if kind == "Lion":
                ref64 = lion_formula(opts)
                t32 = None
            else:
                tcls = getattr(torch.optim, kind)
                ref64 = run_torch(tcls, kind, opts, np.float64)
                t32 = run_torch(tcls, kind, opts, np.float32)
            worst[0] = max(worst[0], rel(run_numpy(kind, opts, np.float64), ref64))
            if hasattr(fo, kind):
                worst[1] = max(worst[1], rel(run_torch(getattr(fo, kind), kind, opts, np.float64),
                                             ref64))
            worst[2] = max(worst[2], rel(run_numpy(kind, opts, np.float32), ref64))
            if t32 is not None:
                worst[3] = max(worst[3], rel(t32, ref64))
        cells = [f"{w:.1e}" for w in worst]
        if not hasattr(fo, kind):
            cells[1] = "-"
        if kind == "Lion":
            cells[3] = "-"
        print(f"{kind:10} {cells[0]:>10} {cells[1]:>10} {cells[2]:>11} {cells[3]:>10}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
