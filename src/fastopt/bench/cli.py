"""The command line: options (`parse_args`, checked by `resolve` before
anything runs), `main`, and the run of the float32/float64 report (`_run`).
"""
import argparse
import datetime
import json
import os
import sys

import numpy as np

import fastopt

from .._cli import Parser, check_plot, check_writable
from .._version import __version__
from . import timing
from .cases import build_cases
from .lowprec import half_dtype, run_lowp
from .peers import available_peers
from .report import (contention_lines, cpu_model, fmt_heading, header, is_busy, layout,
                     machine_load, probe_line, slow_causes, speedups, summarize, terminal_width,
                     verdict, write_plot)
from .settings import FAMILIES, MAX_SIZE, QUICK_SIZES, SIZES, BadInput


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
        notes.append(f"--contention: each case is timed again while {timing.busy_processes()} busy "
                     "processes (one per core) run; '+ every core busy' gives fastopt on its "
                     f"{threads} thread(s), on 1 thread, and the ratio")
    opts = argparse.Namespace(dtype=np.dtype(args.dtype), threads=threads,
                              budget=0.03 if args.quick else 0.1,
                              min_samples=3 if args.quick else 5,
                              probe_mib=64 if args.quick else 128, width=width)
    cfg = fastopt.config()
    print("\n".join(header(opts, cfg, notes)), flush=True)
    probe, probes = timing.probe_bandwidth(threads, opts.probe_mib, 3 * opts.budget)
    print("\n".join(probe_line(opts, probe, probes)))
    print()
    print(fmt_heading(columns))
    sys.stdout.flush()

    records, family = [], None
    for case in cases:
        if case.family != family:
            family = case.family
            print(f"{family}: {FAMILIES[family][1]}", flush=True)
        main_, extras, others = timing.run_case(case, opts, peers)
        lines, record = summarize(case, main_, extras, others, opts.dtype.itemsize, probe,
                                  columns)
        if args.contention:
            lines += contention_lines(timing.run_contention(case, opts, peers), record)
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
        report = {"fastopt": __version__, "date": datetime.datetime.now(
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
                   f"fastopt {__version__} vs NumPy, {opts.dtype.name}, {threads} thread(s), "
                   f"{cpu_model()}, {datetime.date.today().isoformat()}")
        print(f"speedup chart written to {args.plot}")
    return 1 if failed else 0

