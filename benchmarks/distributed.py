#!/usr/bin/env python
"""Benchmark of fastopt.distributed: ResNet-18's parameters, Adam, 1 and 2 ranks.

    python benchmarks/distributed.py                  # launches mpiexec -n 1, then -n 2
    python benchmarks/distributed.py --ranks 1,2,4 --steps 30 --dtype float64
    python benchmarks/distributed.py --state-dtype bfloat16   # Adam's state in bfloat16
    sudo tools/mpi_netns.sh --bench                   # over TCP, across two network namespaces

For each number of ranks and each mode (replicated, shard) and gradient
layout (``flat``: parameters and gradients are `fastopt.flat_views`, sent
in place; ``arrays``: separate arrays, packed into one buffer per step) it
reports the median step time split into its phases (the agreement check,
packing, Reduce_scatter, the division by P, Allgather, unpacking, the fused
update), the optimizer state held per rank, and the time of MPI's own
collectives on the same bytes: ``Reduce_scatter`` + ``Allgatherv`` with the
same counts (what fastopt calls) and one ``Allreduce``, each timed once
after every fastopt step (so that both are measured under the same load).  The one-rank run
also times the plain optimizer (no MPI) on 1 and on all threads.  Ends with
an estimate, on paper, of what 8 and 64 ranks send and hold per step (the
state with float32 and with bfloat16 state, for float32 parameters).

``--mpiexec`` gives another launcher command (tools/mpi_netns.sh passes one
that starts the ranks on two hosts, network namespaces joined by a veth
pair, with the MPI transport forced to TCP); the report names the hosts of
the ranks and the transport variables that were set.

Not collected by pytest (no ``test_`` prefix); ``--quick`` is a smoke run.
"""
import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.abspath(__file__)
# The environment variables that choose MPI's transport (and the threads),
# named in the report when set.
TRANSPORT = ("MPIR_CVAR_CH4_NETMOD", "UCX_TLS", "UCX_NET_DEVICES", "FI_PROVIDER",
             "MPIR_CVAR_NOLOCAL", "OMP_NUM_THREADS")


# ------------------------------------------------------------- worker ---

def _median(xs):
    return float(np.median(xs)) if xs else 0.0


def _rss():
    """(current, peak) resident memory of this process in bytes (Linux), else (0, 0)."""
    try:
        fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
        return tuple(int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM"))
    except (OSError, KeyError, ValueError):
        return 0, 0


def worker(out, steps, dtype, state_dtype=None):
    from mpi4py import MPI

    import fastopt
    from fastopt.bench import resnet18_shapes
    from fastopt.distributed import DistributedOptimizer

    comm = MPI.COMM_WORLD
    P, rank = comm.Get_size(), comm.Get_rank()
    dtype = np.dtype(dtype)
    shapes = resnet18_shapes()
    rng = np.random.default_rng(0)
    init = [rng.standard_normal(s).astype(dtype) * 0.01 for s in shapes]
    grad_rng = np.random.default_rng([1, rank])
    grads_arrays = [grad_rng.standard_normal(s).astype(dtype) for s in shapes]
    n = sum(a.size for a in init)
    result = {"ranks": P, "elements": n, "itemsize": dtype.itemsize, "dtype": dtype.name,
              "state_dtype": state_dtype,
              "arrays": len(shapes), "rows": [], "mpi": MPI.Get_library_version().splitlines()[0],
              "hosts": comm.allgather(MPI.Get_processor_name())}

    def timed(fn, reps):
        ts = []
        for _ in range(reps):
            comm.Barrier()
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return ts

    if P == 1:      # the single-process step, on all threads and on one
        params = [a.copy() for a in init]
        opt = fastopt.Adam(params, state_dtype=state_dtype)
        for threads in (None, 1):
            fastopt.set_num_threads(threads)
            opt.step(grads_arrays)
            ts = timed(lambda: opt.step(grads_arrays), steps)
            result[f"plain_{threads or 'all'}"] = {"step": _median(ts),
                                                   "threads": fastopt.get_num_threads()}
        fastopt.set_num_threads(None)
        del opt, params

    # MPI's own collectives on the same bytes, split as fastopt splits them,
    # each timed once after every fastopt step: both see the same machine
    # (the load of a shared machine, a TCP link's state) through the run.
    raw_calls, raw = {}, {}
    if P > 1:
        share = -(-n // P)
        counts = [min(share, max(0, n - r * share)) for r in range(P)]
        displs = [min(r * share, n) for r in range(P)]
        send = np.ones(n, dtype)
        part = np.empty(counts[rank], dtype)
        whole = np.empty(n, dtype)
        raw_calls = {"reduce_scatter": lambda: comm.Reduce_scatter(send, part, counts),
                     "allgather": lambda: comm.Allgatherv(part, [whole, (counts, displs)]),
                     "allreduce": lambda: comm.Allreduce(send, whole)}
        for fn in raw_calls.values():
            fn()

    for shard in (False, True):
        for layout in ("flat", "arrays"):
            if layout == "flat":
                _, params = fastopt.flat_views(init)
                _, grads = fastopt.flat_views(params, copy=False)
                for g, a in zip(grads, grads_arrays):
                    g[...] = a
            else:
                params, grads = [a.copy() for a in init], grads_arrays
            opt = fastopt.Adam(params, state_dtype=state_dtype)
            # What the wrapper makes resident: the state it touches (shard:
            # its slice's; the wrapped optimizer's zeroed arrays stay
            # untouched) and its communication buffers.
            rss0 = _rss()[0]
            dopt = DistributedOptimizer(opt, shard=shard)
            for _ in range(3):
                dopt.step(grads)
            phases = {}
            totals = []
            for _ in range(steps):
                comm.Barrier()
                t = time.perf_counter()
                dopt.step(grads)
                totals.append(time.perf_counter() - t)
                for k, v in dopt.timings.items():
                    phases.setdefault(k, []).append(v)
                for k, fn in raw_calls.items():
                    raw.setdefault(k, []).extend(timed(fn, 1))
            state = sum(a.nbytes for st in dopt.local_optimizer.state for a in st.values())
            row = {"mode": "shard" if shard else "replicated", "layout": layout,
                   "step": _median(totals), "threads": fastopt.get_num_threads(),
                   "state_bytes": state, "rss_growth": float(_rss()[0] - rss0),
                   **{k: _median(v) for k, v in phases.items()}}
            # The slowest rank sets the pace: report the max over ranks of each median.
            row = {k: (max(comm.allgather(v)) if isinstance(v, float) else v)
                   for k, v in row.items()}
            row["state_bytes_max"] = max(comm.allgather(state))
            result["rows"].append(row)
            if P > 1:
                f = dopt._flats[0]
                assert (f.counts, f.displs) == (counts, displs), "not fastopt's split"
            del dopt, opt, params, grads
            gc.collect()

    if raw:
        result["raw"] = {k: max(comm.allgather(_median(v))) for k, v in raw.items()}
    if rank == 0:
        with open(out, "w") as fh:
            json.dump(result, fh)


# ------------------------------------------------------------- report ---

def _t(s):
    return "-" if not s else (f"{s * 1e3:.2f} ms" if s >= 1e-3 else f"{s * 1e6:.0f} us")


def _mb(b):
    return f"{b / 1e6:.1f} MB"


def report(results, link_gbs, latency_us):
    first = results[0]
    n, item = first["elements"], first["itemsize"]
    G = n * item
    bf16 = first.get("state_dtype") == "bfloat16"
    state = f"bfloat16 state {_mb(2 * n * 2)}" if bf16 else f"state {_mb(2 * G)}"
    lines = [f"fastopt.distributed: ResNet-18's {first['arrays']} parameter arrays, {n:,} "
             f"{first['dtype']} elements ({_mb(G)} of gradients), Adam ({state})",
             f"MPI: {first['mpi']}; {os.cpu_count()} CPUs; medians, the slowest rank's"]
    hosts = max(results, key=lambda r: r["ranks"]).get("hosts", [])
    if len(set(hosts)) > 1:
        lines.append("ranks on hosts " + ", ".join(f"{r}: {h}" for r, h in enumerate(hosts)))
    chosen = [f"{k}={os.environ[k]}" for k in TRANSPORT if k in os.environ]
    if chosen:
        lines.append("transport and threads: " + " ".join(chosen))
    lines.append("")
    one = next((r for r in results if r["ranks"] == 1), None)
    if one:
        same = one["plain_all"]["threads"] == one["plain_1"]["threads"]
        for key in ("plain_1",) if same else ("plain_all", "plain_1"):
            p = one[key]
            lines.append(f"  one process, no MPI, {p['threads']} thread(s): Adam.step "
                         f"{_t(p['step'])}")
        lines.append("")
    head = (f"{'ranks':>5} {'mode':>10} {'layout':>6} {'thr':>3} {'step':>9} {'check':>8} "
            f"{'pack':>8} {'red-scat':>9} {'1/P':>8} {'allgath':>9} {'unpack':>8} "
            f"{'update':>9} {'state/rank':>11} {'RSS +':>9}")
    lines += [head, "-" * len(head)]
    for res in results:
        for r in res["rows"]:
            lines.append(
                f"{res['ranks']:>5} {r['mode']:>10} {r['layout']:>6} {r['threads']:>3} "
                f"{_t(r['step']):>9} {_t(r['check']):>8} {_t(r['pack']):>8} "
                f"{_t(r['reduce_scatter']):>9} {_t(r['scale']):>8} {_t(r['allgather']):>9} "
                f"{_t(r['unpack']):>8} {_t(r['update']):>9} {_mb(r['state_bytes_max']):>11} "
                f"{_mb(r['rss_growth']):>9}")
    lines.append("RSS +: resident memory the wrapper added (the state it touched, its buffers)")
    for res in results:
        P = res["ranks"]
        if P == 1 or "raw" not in res:
            continue
        raw = res["raw"]
        wire = 2 * (P - 1) / P * G
        rsag = raw["reduce_scatter"] + raw["allgather"]
        lines += ["", f"{P} ranks, MPI's own collectives on the same {_mb(G)}: "
                  f"Reduce_scatter {_t(raw['reduce_scatter'])} + Allgatherv "
                  f"{_t(raw['allgather'])} = {_t(rsag)} ({wire / rsag / 1e9:.2f} GB/s bus "
                  f"bandwidth); Allreduce {_t(raw['allreduce'])} "
                  f"({wire / raw['allreduce'] / 1e9:.2f} GB/s)"]
        for r in res["rows"]:
            comm_t = r["reduce_scatter"] + r["allgather"]
            lines.append(f"  {r['mode']:>10} {r['layout']:>6}: fastopt's reduce-scatter + "
                         f"allgather {_t(comm_t)} = {comm_t / rsag:.2f}x MPI's "
                         f"({comm_t / raw['allreduce']:.2f}x its Allreduce); with packing "
                         f"and unpacking {(comm_t + r['pack'] + r['unpack']) / rsag:.2f}x")
        if one:
            base1 = one["plain_1"]["step"]
            for r in res["rows"]:
                if r["mode"] == "shard":
                    lines.append(f"  shard {r['layout']:>6}: update {_t(r['update'])} on "
                                 f"{r['threads']} thread(s) = {r['update'] / base1:.2f}x the "
                                 f"one-process step on 1 thread ({_t(base1)}); 1/P = {1 / P:.2f}")
    lines += ["", estimate(n, item, link_gbs, latency_us)]
    return "\n".join(lines)


def estimate(n, item, link_gbs, latency_us, ranks=(8, 64)):
    """What P ranks send and hold per step, on paper (ring/recursive-halving
    collectives: (P-1)/P of the bytes each way per collective); the state
    per rank with float32 state and, for float32 parameters, bfloat16 state."""
    G = n * item
    states = [("float32" if item == 4 else "float64", item)] + ([("bfloat16", 2)] if item == 4
                                                                  else [])
    out = [f"On paper, per step and per rank, {n:,} elements x {item} bytes, Adam "
           f"(2 state arrays), a {link_gbs:g} GB/s link per rank, {latency_us:g} us per message:",
           f"{'ranks':>5} {'sent (=received)':>17} {'link time':>10} {'messages':>8} "
           f"{'state':>9} {'state repl.':>11} {'state shard':>11} {'comm buffers':>13}"]
    for P in ranks:
        sent = 2 * (P - 1) / P * G
        msgs = 2 * (P - 1)              # ring: P-1 steps per collective
        t = sent / (link_gbs * 1e9) + msgs * latency_us * 1e-6
        for k, (name, sitem) in enumerate(states):
            S = 2 * n * sitem
            comm = (f"{P:>5} {_mb(sent):>17} {_t(t):>10} {msgs:>8}" if k == 0
                    else " " * 43)      # the same messages whatever the state
            buffers = _mb(G / P) + " + " + _mb(G) + "*" if k == 0 else ""
            out.append(f"{comm} {name:>9} {_mb(S):>11} {_mb(S / P):>11} {buffers:>13}".rstrip())
    out.append("  * the slice of the mean gradient, and one whole-model buffer (packing, "
               "and the replicated allgather; none in shard mode with flat_views)")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", default="1,2", help="comma-separated rank counts (default 1,2)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--state-dtype", choices=("float32", "bfloat16"), default="float32",
                   help="Adam's state (bfloat16: needs ml_dtypes and --dtype float32)")
    p.add_argument("--link-gbs", type=float, default=12.5,
                   help="per-rank link bandwidth for the estimate, GB/s (12.5: 100 Gb/s)")
    p.add_argument("--latency-us", type=float, default=2.0)
    p.add_argument("--quick", action="store_true", help="3 steps (smoke run)")
    p.add_argument("--json", metavar="PATH", help="also save the raw results")
    p.add_argument("--mpiexec", help="the launcher command, split like a shell's (default: "
                   "mpiexec on PATH or next to this Python)")
    p.add_argument("--worker", metavar="OUT", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    steps = 3 if args.quick else args.steps
    state_dtype = None if args.state_dtype == "float32" else args.state_dtype
    if state_dtype and args.dtype != "float32":
        p.error("--state-dtype bfloat16 needs --dtype float32")
    if args.worker:
        worker(args.worker, steps, args.dtype, state_dtype)
        return 0
    if args.mpiexec:
        import shlex
        mpiexec = shlex.split(args.mpiexec)
    else:
        found = shutil.which("mpiexec") or shutil.which("mpiexec",
                                                        path=os.path.dirname(sys.executable))
        mpiexec = [found] if found else None
    if not mpiexec:
        print('error: no mpiexec (pip install "fastopt[mpi]")', file=sys.stderr)
        return 2
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for P in [int(s) for s in args.ranks.split(",")]:
            out = os.path.join(tmp, f"{P}.json")
            # python -m mpi4py: a rank that fails ends the job (no rank left waiting).
            cmd = [*mpiexec, "-n", str(P), sys.executable, "-m", "mpi4py", HERE, "--worker", out,
                   "--steps", str(steps), "--dtype", args.dtype, "--state-dtype", args.state_dtype]
            r = subprocess.run(cmd, timeout=1800)
            if r.returncode != 0 or not os.path.exists(out):
                print(f"error: mpiexec -n {P} failed (exit status {r.returncode})", file=sys.stderr)
                return 1
            results.append(json.load(open(out)))
    print(report(results, args.link_gbs, args.latency_us))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
