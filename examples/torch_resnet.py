#!/usr/bin/env python
"""Train small PyTorch models on the CPU with fastopt.torch and torch.optim.

In float32 (the default) it times one training step (zero_grad, forward,
backward, optimizer step) of the same model with three optimizers --
torch.optim.Adam (default: the for-loop over tensors on the CPU),
torch.optim.Adam(fused=True) and fastopt.torch.Adam -- the optimizer's share
of it, and the speed-up of the training step over torch.optim.Adam's
default:

    python examples/torch_resnet.py                    # MLP 784-512-512-10 and ResNet-18
    python examples/torch_resnet.py --model resnet18 --batch 32 --steps 40
    python examples/torch_resnet.py --threads 1

With ``--dtype bfloat16`` (or ``float16``) it trains the model in that dtype
for 200 steps (``--steps``) with fastopt.torch.AdamW, which updates float32
masters of the 16-bit weights, and with torch.optim.AdamW, which updates the
16-bit weights (and keeps its state) in 16 bits, next to a float32 run of
torch.optim.AdamW from the same initial weights (the 16-bit runs start from
them rounded) on the same batches; it prints how far each 16-bit loss curve
strays from the float32 one over the last 50 steps, the final losses and the
median step times after the warm-up:

    python examples/torch_resnet.py --dtype bfloat16
    python examples/torch_resnet.py --dtype bfloat16 --model mlp --lr 1e-4
    python examples/torch_resnet.py --dtype float16 --model mlp

An update smaller than half a bfloat16 unit of its weight (8 significant
bits) is lost when added to the 16-bit weight: late in training and for
weight decay most of them are.  In float16, torch.optim.AdamW's default eps
(1e-8) and the squares of small gradients round to zero in its float16
state, so its first update divides by zero (the loss is NaN after it).
CPUs without float16 arithmetic run float16 convolutions slowly (a ResNet-18
step takes seconds): ``--model mlp``.

The ResNet-18 is torchvision's (7x7 stride-2 stem and max pool, four stages
of two basic blocks, 1000 classes: 11.7M parameters in 62 tensors), built
here from torch.nn layers; inputs are random 32x32 images (in the 16-bit
runs, a fixed set of 16 batches labelled by a random linear map, cycled).
Rounds alternate the optimizers, so machine noise hits them alike; times are
medians.  Needs ``pip install "fastopt[torch]"``.
"""
import argparse
import copy
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import fastopt
import fastopt.torch as fo


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def resnet18(classes=1000):
    """torchvision's resnet18 (ImageNet stem: 7x7 stride-2 convolution, max pool)."""
    layers = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
              nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, classes)]
    return nn.Sequential(*layers)


def mlp():
    return nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                         nn.Linear(512, 10))


MODELS = {
    "mlp": ("MLP 784-512-512-10", mlp, lambda b: torch.randn(b, 784)),
    "resnet18": ("ResNet-18 on 32x32 images", resnet18, lambda b: torch.randn(b, 3, 32, 32)),
}
OPTIMIZERS = {
    "torch.optim.Adam": lambda ps: torch.optim.Adam(ps, lr=1e-3),
    "torch.optim.Adam(fused=True)": lambda ps: torch.optim.Adam(ps, lr=1e-3, fused=True),
    "fastopt.torch.Adam": lambda ps: fo.Adam(ps, lr=1e-3),
}


def time_model(key, batch, steps, warmup):
    """{optimizer: (median training step, median optimizer.step, median of the
    rest: zero_grad, forward, backward), in seconds, and the largest
    difference between fastopt.torch.Adam and torch.optim.Adam after one
    step, relative to the size of each parameter tensor."""
    label, make, data = MODELS[key]
    torch.manual_seed(0)
    base = make()
    x = data(batch)
    y = torch.randint(0, base[-1].out_features, (batch,))
    runs = {}
    for name, make_opt in OPTIMIZERS.items():
        model = copy.deepcopy(base)
        runs[name] = (model, make_opt(model.parameters()), [], [])
    # A first step, untimed, with the same gradients for all three: their
    # updates must agree to rounding.  (Gradients computed separately can
    # differ in the last bits -- threaded reductions -- and Adam's update has
    # the size of lr whatever the gradient, so where a gradient is near zero
    # the runs drift apart in float32, as between any two implementations.)
    ref = copy.deepcopy(base)
    F.cross_entropy(ref(x), y).backward()
    for model, opt, _, _ in runs.values():
        for p, r in zip(model.parameters(), ref.parameters()):
            p.grad = r.grad.clone()
        opt.step()
    diff = max(float((p - q).detach().abs().max() / q.detach().abs().max())
               for p, q in zip(runs["fastopt.torch.Adam"][0].parameters(),
                               runs["torch.optim.Adam"][0].parameters()))
    for r in range(warmup + steps):
        for name, (model, opt, total, in_step) in runs.items():
            t0 = time.perf_counter()
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            t1 = time.perf_counter()
            opt.step()
            t2 = time.perf_counter()
            if r >= warmup:
                total.append(t2 - t0)
                in_step.append(t2 - t1)
    times = {name: (statistics.median(t), statistics.median(s),
                    statistics.median(a - b for a, b in zip(t, s)))
             for name, (_, _, t, s) in runs.items()}
    n = sum(p.numel() for p in base.parameters())
    return label, len(list(base.parameters())), n, times, diff


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LAST = 50       # the loss curves are compared over the last LAST steps


def train_16bit(key, dtype, batch, steps, warmup, lr):
    """Train the model in `dtype` with fastopt.torch.AdamW and torch.optim.AdamW,
    and in float32 with torch.optim.AdamW, all from the same initial weights on
    the same batches.  {run: (losses, training step times, optimizer.step
    times)}, the times after `warmup` steps."""
    label, make, data = MODELS[key]
    torch.manual_seed(0)
    base = make()
    classes = base[-1].out_features
    # A fixed set of batches labelled by a random linear map: a task the
    # models can learn, so the loss keeps falling over the run.
    xs = [data(batch) for _ in range(16)]
    teacher = torch.randn(xs[0][0].numel(), classes)
    ys = [(x.flatten(1) @ teacher).argmax(1) for x in xs]
    name = str(dtype).removeprefix("torch.")
    runs = {}
    for run, dt, make_opt in ((f"fastopt.torch.AdamW, {name}", dtype, fo.AdamW),
                              (f"torch.optim.AdamW, {name}", dtype, torch.optim.AdamW),
                              ("torch.optim.AdamW, float32", torch.float32, torch.optim.AdamW)):
        model = copy.deepcopy(base).to(dt)
        runs[run] = (model, make_opt(model.parameters(), lr=lr), dt, [], [], [])
    for t in range(steps):
        x, y = xs[t % len(xs)], ys[t % len(xs)]
        for model, opt, dt, losses, total, in_step in runs.values():
            t0 = time.perf_counter()
            opt.zero_grad()
            # The loss in float32 (as autocast computes it): the curves then
            # differ by the training, not by rounding the loss to 16 bits.
            loss = F.cross_entropy(model(x.to(dt)).float(), y)
            loss.backward()
            t1 = time.perf_counter()
            opt.step()
            t2 = time.perf_counter()
            losses.append(loss.item())
            if t >= warmup:
                total.append(t2 - t0)
                in_step.append(t2 - t1)
    n = sum(p.numel() for p in base.parameters())
    return label, len(list(base.parameters())), n, {
        run: (losses, total, in_step) for run, (_, _, _, losses, total, in_step) in runs.items()}


def report_16bit(key, dtype, batch, steps, warmup, lr):
    label, ntensors, n, runs = train_16bit(key, dtype, batch, steps, warmup, lr)
    last = min(LAST, steps)
    print(f"\n{label}, batch {batch}: {n / 1e6:.2f}M parameters in {ntensors} tensors, "
          f"{steps} steps, lr {lr:g}")
    print(f"  {'optimizer, model dtype':32s} {'final loss':>10s} "
          f"{'max |loss - float32 loss|':>26s} {'mean':>7s} {'train step':>11s} {'opt.step':>10s}")
    ref = runs["torch.optim.AdamW, float32"][0]
    for run, (losses, total, in_step) in runs.items():
        gaps = [abs(a - b) for a, b in zip(losses[-last:], ref[-last:])]
        times = (f"{ms(statistics.median(total)):>11s} {ms(statistics.median(in_step)):>10s}"
                 if total else "")
        print(f"  {run:32s} {losses[-1]:10.4f} {max(gaps):26.1e} {sum(gaps) / last:7.1e} {times}")
    timed = (f"step times: medians after {warmup} steps" if steps > warmup
             else "no step times: --steps is not above --warmup")
    print(f"  (loss gaps over the last {last} steps; {timed})")


def ms(t):
    return f"{t * 1e3:.2f} ms"


def main(argv=None):
    p = argparse.ArgumentParser(prog="torch_resnet.py", description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["all"] + list(MODELS), default="all")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32",
                   help="float32: time three optimizers; bfloat16, float16: train the "
                        "model in that dtype and compare the loss with float32's")
    p.add_argument("--batch", type=int, default=None,
                   help="batch size (default: 64 for the MLP, 16 for the ResNet)")
    p.add_argument("--steps", type=int, default=None,
                   help="timed steps per optimizer in float32 (default 30), training steps "
                        "in 16 bits (default 200)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW's lr in 16 bits (default 1e-3)")
    p.add_argument("--threads", type=int, default=None,
                   help="threads for torch and fastopt (default: torch's default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
        fastopt.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, fastopt {fastopt.__version__} "
          f"(SIMD {fastopt.config()['simd_level']}), {torch.get_num_threads()} thread(s)")
    keys = list(MODELS) if args.model == "all" else [args.model]
    for key in keys:
        batch = args.batch or (64 if key == "mlp" else 16)
        if args.dtype != "float32":
            report_16bit(key, DTYPES[args.dtype], batch, args.steps or 200, args.warmup, args.lr)
            continue
        label, ntensors, n, times, diff = time_model(key, batch, args.steps or 30, args.warmup)
        print(f"\n{label}, batch {batch}: {n / 1e6:.2f}M parameters in {ntensors} tensors")
        print(f"  {'optimizer':30s} {'train step':>11s} {'fwd+bwd':>11s} {'opt.step':>11s} "
              f"{'share':>6s} {'speed-up':>9s}")
        base = times["torch.optim.Adam"][0]
        for name, (total, step, rest) in times.items():
            print(f"  {name:30s} {ms(total):>11s} {ms(rest):>11s} {ms(step):>11s} "
                  f"{step / total:6.0%} {base / total:8.2f}x")
        print(f"  after one step, fastopt.torch.Adam vs torch.optim.Adam: max difference "
              f"{diff:.1e} of a parameter tensor's size (float32 rounding)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
