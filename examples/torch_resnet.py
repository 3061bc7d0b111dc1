#!/usr/bin/env python
"""Train small PyTorch models on the CPU with fastopt.torch.Adam and torch.optim.Adam.

Times one training step (zero_grad, forward, backward, optimizer step) of
the same model with three optimizers -- torch.optim.Adam (default: the
for-loop over tensors on the CPU), torch.optim.Adam(fused=True) and
fastopt.torch.Adam -- the optimizer's share of it, and the speed-up of the
training step over torch.optim.Adam's default:

    python examples/torch_resnet.py                    # MLP 784-512-512-10 and ResNet-18
    python examples/torch_resnet.py --model resnet18 --batch 32 --steps 40
    python examples/torch_resnet.py --threads 1

The ResNet-18 is torchvision's (7x7 stride-2 stem and max pool, four stages
of two basic blocks, 1000 classes: 11.7M parameters in 62 tensors), built
here from torch.nn layers; inputs are random 32x32 images.  Rounds alternate the three optimizers,
so machine noise hits them alike; times are medians.  Needs
``pip install "fastopt[torch]"``.
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


def ms(t):
    return f"{t * 1e3:.2f} ms"


def main(argv=None):
    p = argparse.ArgumentParser(prog="torch_resnet.py", description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["all"] + list(MODELS), default="all")
    p.add_argument("--batch", type=int, default=None,
                   help="batch size (default: 64 for the MLP, 16 for the ResNet)")
    p.add_argument("--steps", type=int, default=30, help="timed steps per optimizer")
    p.add_argument("--warmup", type=int, default=3)
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
        label, ntensors, n, times, diff = time_model(key, batch, args.steps, args.warmup)
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
