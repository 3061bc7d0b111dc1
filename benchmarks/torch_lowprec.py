"""fastopt.torch with 16-bit parameters and bfloat16 state against float32.

Two comparisons of ``fastopt.torch.Adam.step()`` (and, for scale, of
``torch.optim.Adam(fused=True)`` on the same tensors), each in one process:

* ``resnet18``: the 62 parameter tensors of torchvision's ResNet-18 (11.7M
  elements; their shapes written out below) as bfloat16 parameters with
  bfloat16 gradients, updated through float32 masters, against the same
  tensors in float32.  Both move 28 bytes per element: the bfloat16 step
  reads and writes the 4-byte master where the float32 step reads and writes
  the parameter, and reads a 2-byte gradient but writes the 2-byte
  parameter too; it also rounds the parameter.
* ``state``: one float32 parameter of 1e7 elements with
  ``state_dtype="bfloat16"`` (stochastic and nearest rounding) against
  float32 state: 20 bytes per parameter moved instead of 28.

Rounds alternate the variants, so machine noise hits them alike; the table
gives each variant's median time per step and its ratio to the float32 row.
The machine (CPU, its 16-bit instructions, load average before and after) is
printed with it.  Needs torch and ml_dtypes::

    PYTHONPATH=src python benchmarks/torch_lowprec.py
    PYTHONPATH=src python benchmarks/torch_lowprec.py --threads 1 --rounds 30
"""
import argparse
import datetime
import os
import platform
import statistics
import sys
import time

import torch

import fastopt
import fastopt.torch as fo

# torchvision.models.resnet18(): conv1, bn1, then per basic block conv1, bn1,
# conv2, bn2 (and a 1x1 downsample convolution and its BatchNorm where the
# stage starts with stride 2), then fc; BatchNorm has a weight and a bias.
RESNET18 = (
    [(64, 3, 7, 7), (64,), (64,)]
    + [(64, 64, 3, 3), (64,), (64,)] * 4
    + [(128, 64, 3, 3), (128,), (128,), (128, 128, 3, 3), (128,), (128,),
       (128, 64, 1, 1), (128,), (128,)]
    + [(128, 128, 3, 3), (128,), (128,)] * 2
    + [(256, 128, 3, 3), (256,), (256,), (256, 256, 3, 3), (256,), (256,),
       (256, 128, 1, 1), (256,), (256,)]
    + [(256, 256, 3, 3), (256,), (256,)] * 2
    + [(512, 256, 3, 3), (512,), (512,), (512, 512, 3, 3), (512,), (512,),
       (512, 256, 1, 1), (512,), (512,)]
    + [(512, 512, 3, 3), (512,), (512,)] * 2
    + [(1000, 512), (1000,)])
assert len(RESNET18) == 62
assert sum(torch.Size(s).numel() for s in RESNET18) == 11_689_512


def params(shapes, dtype):
    """Parameters with gradients (set once: every step reads them again)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for s in shapes:
        p = torch.nn.Parameter((torch.randn(s, generator=g) * 0.05).to(dtype))
        p.grad = (torch.randn(s, generator=g) * 1e-3).to(dtype)
        out.append(p)
    return out


def resnet18_variants():
    return {
        "fastopt.torch.Adam, float32": fo.Adam(params(RESNET18, torch.float32)),
        "fastopt.torch.Adam, bfloat16 (float32 masters)": fo.Adam(params(RESNET18, torch.bfloat16)),
        "torch.optim.Adam(fused=True), float32":
            torch.optim.Adam(params(RESNET18, torch.float32), fused=True),
        "torch.optim.Adam(fused=True), bfloat16 (no masters)":
            torch.optim.Adam(params(RESNET18, torch.bfloat16), fused=True),
    }


def state_variants(n):
    return {
        "fastopt.torch.Adam, float32 state": fo.Adam(params([(n,)], torch.float32)),
        "fastopt.torch.Adam, bfloat16 state (stochastic)":
            fo.Adam(params([(n,)], torch.float32), state_dtype="bfloat16"),
        "fastopt.torch.Adam, bfloat16 state (nearest)":
            fo.Adam(params([(n,)], torch.float32), state_dtype="bfloat16",
                    state_rounding="nearest"),
        "torch.optim.Adam(fused=True), float32 state":
            torch.optim.Adam(params([(n,)], torch.float32), fused=True),
    }


def compare(title, opts, rounds, number):
    """Median seconds per step of each optimizer, rounds interleaved."""
    for opt in opts.values():       # state allocated, first-step paths taken
        for _ in range(2):
            opt.step()
    times = {name: [] for name in opts}
    for _ in range(rounds):
        for name, opt in opts.items():
            t0 = time.perf_counter()
            for _ in range(number):
                opt.step()
            times[name].append((time.perf_counter() - t0) / number)
    med = {name: statistics.median(t) for name, t in times.items()}
    base = next(iter(med.values()))
    print(f"\n{title}")
    print(f"  {'optimizer.step()':52s} {'median':>10s} {'ratio':>7s}")
    for name, t in med.items():
        print(f"  {name:52s} {t * 1e3:7.2f} ms {t / base:7.2f}")
    return med


def cpu():
    """The CPU's name and the 16-bit arithmetic it has (Linux: /proc/cpuinfo)."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    name = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    has = [f for f in ("f16c", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16") if f in flags]
    return f"{name}; 16-bit: {', '.join(has) or 'none listed'}"


def load():
    return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg()) if hasattr(os, "getloadavg") else "?"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=None,
                   help="threads for fastopt and torch (default: their default)")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--state-size", type=int, default=10**7)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
        fastopt.set_num_threads(args.threads)
    print(f"{datetime.date.today()}: fastopt {fastopt.__version__} (SIMD "
          f"{fastopt.config()['simd_level']}, {fastopt.get_num_threads()} thread(s)), "
          f"torch {torch.__version__} ({torch.get_num_threads()} thread(s))")
    print(f"CPU: {cpu()}; {os.cpu_count()} logical cores")
    print(f"load average before: {load()}")
    compare(f"ResNet-18's 62 parameter tensors ({11_689_512 / 1e6:.1f}M elements), Adam",
            resnet18_variants(), args.rounds, 3)
    compare(f"one parameter of {args.state_size:.0e} float32 elements, Adam",
            state_variants(args.state_size), args.rounds, 3)
    print(f"\nload average after: {load()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
