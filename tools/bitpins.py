#!/usr/bin/env python
"""Compute the bit-for-bit pins of tests/bitpins_cases.py: tests/data/bitpins.json.

    PYTHONPATH=src python tools/bitpins.py            # compute and write the pins
    PYTHONPATH=src python tools/bitpins.py --check    # compare with the stored pins

Every case runs at every SIMD level this build and CPU have (a process per
level, ``FASTOPT_SIMD=<level>``), on 1 thread, on the default number of
threads and, in a process of its own, on one thread more than the default
(``OMP_NUM_THREADS``).  fastopt's results do not depend on the level or the
thread count, so each case gets one SHA-256.  A case whose results differ
between levels is stored with one digest per level and reported (exit
status 1); results that differ between thread counts are a bug, reported
and never stored.

Regenerate the pins only for a deliberate change of fastopt's numerics (or a
new case), and say so in the commit: tests/test_bitpins.py explains what
they guard.  ml_dtypes is required here (the bfloat16 cases must be pinned
too).
"""
import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
PINS = ROOT / "tests" / "data" / "bitpins.json"
sys.path.insert(0, str(ROOT / "tests"))


def worker(caps):
    """Digest every case once per thread cap (0: the default); print JSON."""
    import fastopt
    from fastopt import _dispatch
    import bitpins_cases
    if bitpins_cases.BF16 is None:
        sys.exit("tools/bitpins.py needs ml_dtypes (pip install ml_dtypes): the bfloat16 "
                 "cases must be pinned too")
    runs = []
    for cap in caps:
        fastopt.set_num_threads(cap)
        start = time.perf_counter()
        digests = {name: bitpins_cases.digest(bitpins_cases.run_case(name))
                   for name in bitpins_cases.CASES}
        runs.append({"threads": fastopt.get_num_threads(), "digests": digests,
                     "seconds": time.perf_counter() - start})
        fastopt.set_num_threads(None)
    json.dump({"level": _dispatch.LEVEL, "runs": runs}, sys.stdout)


def run_worker(level, caps, **env):
    out = subprocess.run([sys.executable, __file__, "--worker", ",".join(map(str, caps))],
                         env=dict(os.environ, FASTOPT_SIMD=level, **env),
                         capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"FASTOPT_SIMD={level}: the cases failed:\n{out.stderr}")
    result = json.loads(out.stdout)
    if result["level"] != level:
        sys.exit(f"FASTOPT_SIMD={level} ran level {result['level']}")
    return result["runs"]


def compute():
    """{case: {(level, threads): digest}} over every level and thread count."""
    import fastopt
    from fastopt import _dispatch, _runtime
    levels = [lv for lv in _dispatch._built_levels()
              if lv in _runtime.cpu_levels() or lv == "native"]
    default = fastopt.get_num_threads()
    found: dict[str, dict[tuple[str, int], str]] = {}
    threads = set()
    for level in levels:
        runs = run_worker(level, [1, 0]) + run_worker(level, [0],
                                                      OMP_NUM_THREADS=str(default + 1))
        for run in runs:
            print(f"  {level:8s} {run['threads']} thread(s): {len(run['digests'])} cases "
                  f"in {run['seconds']:.1f} s", file=sys.stderr)
            threads.add(run["threads"])
            for name, d in run["digests"].items():
                found.setdefault(name, {})[(level, run["threads"])] = d
    return levels, sorted(threads), found


def merge(found):
    """One digest per case, or one per level for a case that differs between
    levels; the cases that differ between thread counts at a level."""
    pins, by_level, by_threads = {}, [], []
    for name, runs in found.items():
        per_level = {}
        for (level, _), d in runs.items():
            per_level.setdefault(level, set()).add(d)
        if any(len(ds) > 1 for ds in per_level.values()):
            by_threads.append(name)
            continue
        digests = {level: ds.pop() for level, ds in per_level.items()}
        if len(set(digests.values())) == 1:
            pins[name] = next(iter(digests.values()))
        else:
            pins[name] = digests
            by_level.append(name)
    return pins, by_level, by_threads


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true",
                    help="compare with the stored pins instead of writing them")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker is not None:
        return worker([int(c) for c in args.worker.split(",")])

    import numpy as np
    import fastopt
    import ml_dtypes
    start = time.perf_counter()
    levels, threads, found = compute()
    pins, by_level, by_threads = merge(found)
    print(f"{len(found)} cases at levels {', '.join(levels)} on {threads} threads "
          f"in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    status = 0
    for name in by_threads:
        status = 1
        print(f"DIFFERS BETWEEN THREAD COUNTS (not pinned): {name}", file=sys.stderr)
    for name in by_level:
        status = 1
        print(f"differs between SIMD levels (pinned per level): {name}", file=sys.stderr)
    if args.check:
        stored = json.loads(PINS.read_text())["cases"]
        moved = sorted(n for n in set(stored) | set(pins) if stored.get(n) != pins.get(n))
        for name in moved:
            print(f"moved: {name}", file=sys.stderr)
        print(f"{len(moved)} of {len(found)} pins moved", file=sys.stderr)
        return 1 if moved or status else 0
    if by_threads:
        print("not written: results that depend on the thread count are a bug",
              file=sys.stderr)
        return 1
    PINS.parent.mkdir(exist_ok=True)
    PINS.write_text(json.dumps({
        "about": "SHA-256 of the outputs of each case of tests/bitpins_cases.py "
                 "(tests/test_bitpins.py); written by tools/bitpins.py",
        "fastopt": fastopt.__version__, "numpy": np.__version__,
        "ml_dtypes": ml_dtypes.__version__,
        "levels": levels, "threads": threads,
        "cases": pins,
    }, indent=1, sort_keys=False) + "\n")
    print(f"wrote {PINS.relative_to(ROOT)}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
