"""Drift of half-size (bfloat16) optimizer state against float32 state.

Trains the digits MLP of ``python -m fastopt demo`` (fastopt.demo.train) with
each optimizer that keeps state, once with float32 state and then with
bfloat16 state rounded to nearest and stochastically (several seeds), all
from the same initial weights and batch order, and prints a Markdown table:
final epoch loss, test accuracy, and the relative distance
||theta - theta_fp32|| / ||theta_fp32|| of all parameters after the run.

The row "fp32, init + 1 ulp" is float32 state started from weights moved by
one ulp (a random sign per weight): how far any tiny perturbation drifts on
this problem, the floor against which the bfloat16 rows are read.

    PYTHONPATH=src python tools/lowprec_drift.py [--epochs 15] [--seeds 3]
"""
import argparse

import numpy as np

from fastopt import demo


def flat(model):
    return np.concatenate([p.ravel().astype(np.float64) for p in model.params])


SECOND_MOMENT = {"adam": "exp_avg_sq", "rmsprop": "square_avg"}


def second_moment(name, opt):
    key = SECOND_MOMENT.get(name)
    if key is None:
        return np.nan
    return float(sum(np.sum(st[key].astype(np.float64)) for st in opt.state))


def run(name, data, epochs, state=None, nudge=False):
    if nudge:
        # Same weights one ulp away: wrap the model's constructor.
        orig = demo.MLP.__init__

        def init(self, *a, **k):
            orig(self, *a, **k)
            rng = np.random.default_rng(1)
            for p in self.params:
                p[...] = np.where(rng.random(p.shape) < 0.5,
                                  np.nextafter(p, np.inf), np.nextafter(p, -np.inf))
        demo.MLP.__init__ = init
    try:
        h = demo.train(name, data, epochs=epochs, verbose=False, state=state)
    finally:
        if nudge:
            demo.MLP.__init__ = orig
    return (h["epoch_loss"][-1], h["test_acc"][-1], flat(h["model"]), len(h["costs"]),
            second_moment(name, h["optimizer"]))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--seeds", type=int, default=3, help="seeds of stochastic rounding")
    ap.add_argument("--optimizers", default="momentum,rmsprop,adam")
    args = ap.parse_args()
    data = demo.load_data(0)
    print("| optimizer | state | final loss | test accuracy | rel. distance to fp32 "
          "| 2nd moment / fp32 |")
    print("|---|---|---|---|---|---|")
    for name in args.optimizers.split(","):
        loss0, acc0, th0, steps, v0 = run(name, data, args.epochs)
        rows = [("fp32", [(loss0, acc0, 0.0, 1.0)])]
        loss, acc, th, _, v = run(name, data, args.epochs, nudge=True)
        rows.append(("fp32, init + 1 ulp", [(loss, acc, np.linalg.norm(th - th0) / np.linalg.norm(th0),
                                             v / v0)]))
        configs = [("bf16 nearest", [{"state_dtype": "bfloat16", "state_rounding": "nearest"}]),
                   ("bf16 stochastic", [{"state_dtype": "bfloat16", "state_rounding": "stochastic",
                                         "seed": s} for s in range(args.seeds)])]
        for label, states in configs:
            res = []
            for st in states:
                loss, acc, th, _, v = run(name, data, args.epochs, state=st)
                res.append((loss, acc, np.linalg.norm(th - th0) / np.linalg.norm(th0), v / v0))
            rows.append((label + (f" ({len(res)} seeds)" if len(res) > 1 else ""), res))
        for label, res in rows:
            r = np.array(res)
            print(f"| {name} ({steps} steps) | {label} | {cell(r, 0, '.4f')} | "
                  f"{cell(r, 1, '.2%')} | {cell(r, 2, '.2e')} | "
                  f"{cell(r, 3, '.3f') if name in SECOND_MOMENT else '-'} |")


def cell(r, col, fmt):
    """One value, or the range over several runs."""
    lo, hi = r[:, col].min(), r[:, col].max()
    return f"{lo:{fmt}}" if len(r) == 1 else f"{lo:{fmt}} - {hi:{fmt}}"


if __name__ == "__main__":
    main()
