"""The report: times and ratios formatted, the table's `layout` (it fits the
terminal), one row per case (`summarize`), the `verdict`, the `header`, and
the speedup chart (`write_plot`).
"""
import datetime
import math
import os
import platform
import shutil
import textwrap
import time

import numpy as np

from .._version import __version__


def fmt_time(t):
    if t is None:
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if t >= scale:
            break
    else:
        unit, scale = "ns", 1e-9
    v = t / scale
    return f"{v:.3g} {unit}" if v < 100 else f"{v:.0f} {unit}"


def fmt_ratio(a, b):
    return f"{a / b:.2f}x" if a and b else "-"


# The table's columns in display order: (key, heading, width, align, rank).
# On a narrow terminal `layout` drops columns of the lowest rank first (the
# 1-thread time is in the scaling ratio, the bandwidth in the JSON); rank 9
# columns always stay.
COLUMNS = [("case", "case", 30, "<", 9), ("numpy", "NumPy", 8, ">", 7),
           ("inplace", "in-place", 8, ">", 3), ("fastopt", "fastopt", 8, ">", 9),
           ("fastopt_1t", "1 thread", 8, ">", 0), ("vs_numpy", "vs NumPy", 8, ">", 9),
           ("vs_inplace", "vs in-pl", 8, ">", 6), ("scaling", "scaling", 7, ">", 4),
           ("gbps", "GB/s", 6, ">", 2), ("probe", "%probe", 6, ">", 1),
           ("check", "check", 6, "<", 9)]
NARROW = 100        # below this many terminal columns the table drops columns


def terminal_width():
    """Columns of the terminal (``COLUMNS`` if set; 80 when not a terminal)."""
    return shutil.get_terminal_size().columns


def layout(width, labels, threads):
    """The columns (as in `COLUMNS`) of a table that fits `width` characters.

    The case column is as wide as the longest label (at most 30; a longer
    label gets a line of its own); without a second thread the 1-thread and
    scaling columns are left out.
    """
    case_width = min(max([len(label) + 2 for label in labels] + [12]), 30)
    cols = [(k, h, case_width if k == "case" else w, a, r) for k, h, w, a, r in COLUMNS
            if threads > 1 or k not in ("fastopt_1t", "scaling")]
    total = lambda cs: sum(c[2] for c in cs) + len(cs) - 1      # noqa: E731
    for rank in sorted({c[4] for c in cols if c[4] < 9}):
        if total(cols) <= width:
            break
        # drop one column of this rank at a time, rightmost first
        while total(cols) > width and any(c[4] == rank for c in cols):
            cols.remove(next(c for c in reversed(cols) if c[4] == rank))
    return cols


def fmt_row(values, columns):
    """One table row (or two, if the case label is wider than its column)."""
    cells = [f"{values.get(key, ''):{align}{width}}" for key, _, width, align, _ in columns]
    case = values.get("case", "")
    if len(case) > columns[0][2]:
        return case + "\n" + " " * columns[0][2] + " " + " ".join(cells[1:]).rstrip()
    return " ".join(cells).rstrip()


def fmt_heading(columns):
    return fmt_row({key: heading for key, heading, *_ in columns}, columns)


def summarize(case, main, extras, others, itemsize, probe, columns):
    """The table row of one case, and its JSON record."""
    t = {k: r.time for k, r in main.items()}
    failed = {k: r.error for k, r in list(main.items()) + list(extras.items()) if r.error}
    fo = t["fastopt"]
    gbps = case.traffic * itemsize / fo / 1e9 if case.traffic and fo else None
    record = {
        "family": case.family, "case": case.label, "elements": case.elements,
        "numpy_s": t["numpy"], "inplace_s": t["inplace"], "fastopt_s": fo,
        "fastopt_1thread_s": t.get("fastopt_1t"),
        "speedup_vs_numpy": t["numpy"] / fo if fo and t["numpy"] else None,
        "speedup_vs_inplace": t["inplace"] / fo if fo and t["inplace"] else None,
        "scaling": t["fastopt_1t"] / fo if fo and t.get("fastopt_1t") else None,
        "best_s": {k: r.best for k, r in main.items()},
        "cpu_share": {k: r.cpu for k, r in main.items()},
        "bytes": case.traffic * itemsize if case.traffic else None,
        "gbps": gbps, "probe_fraction": gbps * 1e9 / probe if gbps else None,
        "ok": not failed, "errors": failed,
        "extras": {k: {"time_s": r.time, "best_s": r.best, "error": r.error}
                   for k, r in extras.items()},
        "peers": {k: {"time_s": r.time, "best_s": r.best, "error": r.error}
                  for k, r in others.items()},
    }
    values = {
        "case": f"  {case.label}", "numpy": fmt_time(t["numpy"]),
        "inplace": fmt_time(t["inplace"]),
        "fastopt": "FAILED" if main["fastopt"].error else fmt_time(fo),
        "fastopt_1t": "FAILED" if "fastopt_1t" in failed else fmt_time(t.get("fastopt_1t")),
        "vs_numpy": fmt_ratio(t["numpy"], fo), "vs_inplace": fmt_ratio(t["inplace"], fo),
        "scaling": fmt_ratio(t.get("fastopt_1t"), fo),
        "gbps": f"{gbps:.1f}" if gbps else "-",
        "probe": f"{record['probe_fraction']:.0%}" if gbps else "-",
        "check": "FAILED" if failed else "ok",
    }
    for col in ("numpy", "inplace"):
        if main[col].error:
            values[col] = "FAILED"
    lines = [fmt_row(values, columns)]
    # Sub-rows: other fastopt entry points (checked like fastopt) and peers
    # (a peer that errs or differs is noted, not counted as a failure).
    for name, r in list(extras.items()) + list(others.items()):
        label = f"    + {'fastopt ' if name in extras else ''}{name}: "
        if r.error:
            lines.append(label + ("FAILED" if name in extras else f"not timed ({r.error})"))
        elif fo:
            lines.append(label + f"{fmt_time(r.time)} -> fastopt " + (
                f"{r.time / fo:.2f}x faster" if r.time >= fo else f"{fo / r.time:.2f}x slower"))
    for col, err in failed.items():
        lines.append(f"      FAILED {col}: {err}")
    return lines, record


def contention_lines(busy, record):
    """The sub-row of a case timed under contention; adds it to the JSON `record`."""
    fo, one = busy["fastopt"], busy["fastopt_1t"]
    record["contention"] = {k: {"time_s": r.time, "best_s": r.best, "error": r.error}
                            for k, r in busy.items()}
    record["contention"]["ratio_to_1thread"] = fo.time / one.time if fo.time and one.time else None
    if fo.error or one.error:
        record["ok"] = False
        record["errors"].update({f"contention {k}": r.error
                                 for k, r in (("fastopt", fo), ("1 thread", one)) if r.error})
        return ["    + every core busy: FAILED " + (fo.error or one.error)]
    line = (f"    + every core busy: fastopt {fmt_time(fo.time)}, 1 thread {fmt_time(one.time)}, "
            f"ratio {fo.time / one.time:.2f}")
    others = [f"{k} {fmt_time(r.time)}" for k, r in busy.items()
              if k not in ("fastopt", "fastopt_1t") and not r.error]
    return [line + (f"; {', '.join(others)}" if others else "")]


# ---------------------------------------------------------------- verdict ---

def cpu_probe(seconds=0.1):
    """The share of one CPU a spinning thread of this process gets (1.0 when
    a core is free; on a machine whose cores are all busy, less)."""
    wall, cpu = time.perf_counter(), time.thread_time()
    while time.perf_counter() - wall < seconds:
        pass
    return min((time.thread_time() - cpu) / (time.perf_counter() - wall), 1.0)


def machine_load():
    """The 1-minute load average (None where unknown) and a `cpu_probe`."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"loadavg": load, "cpu_probe": cpu_probe()}


def is_busy(load, cpus):
    """Other programs compete for the CPUs: a probe thread got less than 90%
    of a CPU.  (The load average is reported, not used: it lags a minute
    and counts the benchmark's own threads, so on a 2-core machine a
    benchmark alone raises it above 1.)"""
    return load["cpu_probe"] < 0.9


def geomean(values):
    values = [v for v in values if v]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def peer_library(name):
    """The library a peer timing belongs to: 'torch Adam(fused=True)' -> 'torch'."""
    return name.split()[0]


def speedups(records):
    """{family (and "all"): {"numpy", "inplace", <peer library>...: geometric
    mean of the speedups, "cases": n}} over the cases that passed."""
    out = {}
    groups = {}
    for r in records:
        if r["ok"] and r["fastopt_s"]:
            groups.setdefault(r["family"], []).append(r)
    groups["all"] = [r for rs in groups.values() for r in rs]
    for family, rs in groups.items():
        row = {"cases": len(rs), "numpy": geomean(r["speedup_vs_numpy"] for r in rs),
               "inplace": geomean(r["speedup_vs_inplace"] for r in rs)}
        for r in rs:
            for name, p in r["peers"].items():
                if p["time_s"] and not p["error"]:
                    row.setdefault(peer_library(name), []).append(p["time_s"] / r["fastopt_s"])
        out[family] = {k: geomean(v) if isinstance(v, list) else v for k, v in row.items()}
    return out


def slow_causes(record, load, cpus, threads):
    """Likely reasons why fastopt was slower than NumPy in `record` (a list of
    phrases, most likely first)."""
    causes = []
    # The runs on one thread: a share below 1 there is time spent preempted.
    # (A multi-threaded run's calling thread also waits for its team.)
    one_thread = ("numpy", "inplace", "fastopt_1t") + (("fastopt",) if threads == 1 else ())
    shares = [v for k, v in record["cpu_share"].items() if k in one_thread and v is not None]
    if is_busy(load, cpus) or (shares and min(shares) < 0.8):
        facts = [f"load average {load['loadavg']:.1f} on {cpus} CPUs"] \
            if load["loadavg"] is not None else []
        facts.append(f"a probe thread got {load['cpu_probe']:.0%} of a CPU")
        if shares:
            facts.append(f"the timing thread got {min(shares):.0%}")
        causes.append(f"the machine is busy ({', '.join(facts)}): rerun when it is quiet")
    best = record["best_s"]
    if best.get("fastopt") and record["fastopt_s"] > 1.5 * best["fastopt"]:
        causes.append(f"noisy timing (fastopt's median is {record['fastopt_s'] / best['fastopt']:.1f}x "
                      "its fastest sample)")
    if threads > 1 and record["scaling"] and record["scaling"] < 0.9:
        causes.append(f"threads slow it down here (1 thread is {1 / record['scaling']:.2f}x "
                      "faster): try --threads 1")
    if record["fastopt_s"] < 2e-6:
        causes.append("a call this short is mostly fixed overhead")
    if record["probe_fraction"] and record["probe_fraction"] > 0.8:
        causes.append(f"memory-bound: fastopt streams at {record['probe_fraction']:.0%} of the "
                      "probed bandwidth, so both wait for memory")
    return causes or ["no cause found: please report it with the --json output"]


def verdict(records, load, cpus, threads, width):
    """The report's conclusion: a table of geometric-mean speedups per family
    (over NumPy, in-place NumPy and every peer library timed), then every
    case where fastopt was slower than NumPy, with its likely cause."""
    table = speedups(records)
    if not records or table["all"]["cases"] == 0:
        return []
    peers = sorted({k for row in table.values() for k in row} - {"cases", "numpy", "inplace"})
    cols = [("cases", "cases", 5), ("numpy", "vs NumPy", 8), ("inplace", "vs in-place", 11)]
    cols += [(p, f"vs {p}", max(8, len(p) + 3)) for p in peers]
    lines = ["Verdict: speedup of fastopt, the geometric mean over each family's cases "
             "(2.00x: twice as fast)"]
    lines = [w for line in lines for w in textwrap.wrap(line, width)]
    lines.append("  " + f"{'family':14}" + " ".join(f"{h:>{w}}" for _, h, w in cols))
    for family, row in table.items():
        cells = [f"{row['cases']:>5}"] + [
            f"{row[k]:>{w - 1}.2f}x" if row.get(k) else f"{'-':>{w}}" for k, _, w in cols[1:]]
        lines.append("  " + f"{family:14}" + " ".join(cells))
    slow = [r for r in records if r["ok"] and r["speedup_vs_numpy"] and r["speedup_vs_numpy"] < 1]
    n = len(records)
    if not slow:
        lines.append(f"Slower than NumPy: none of the {n} cases.")
        return lines
    lines.append(f"Slower than NumPy: {len(slow)} of the {n} cases.")
    for r in slow:
        text = (f"{r['family']} {r['case']}: {r['speedup_vs_numpy']:.2f}x; likely: "
                + "; ".join(slow_causes(r, load, cpus, threads)))
        lines += textwrap.wrap(text, width, initial_indent="  ", subsequent_indent="    ")
    return lines


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _omp_env():
    """The OpenMP environment variables that change timings, if set."""
    keys = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_PROC_BIND")
    found = [f"{k}={os.environ[k]}" for k in keys if os.environ.get(k)]
    return f" [{' '.join(found)}]" if found else ""


def _wrap(key, text, width=NARROW):
    return textwrap.wrap(text, min(width, NARROW), initial_indent=f"  {key + ':':10}",
                         subsequent_indent=" " * 12)


def header(opts, cfg, notes, legend=None):
    """The report's first lines: machine, settings, legend, notes (`legend`:
    (key, text) items replacing the NumPy report's)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    omp = (f"OpenMP {cfg['openmp_version']} ({os.path.basename(cfg['openmp_library'] or '?')})"
           if cfg["openmp"] else "no OpenMP (one thread)")
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    items = [
        ("CPU", f"{cpu_model()}, {cpus} logical CPUs available ({platform.machine()})"),
        ("fastopt", f"SIMD {cfg['simd_level']}, {omp}{_omp_env()}, {opts.threads} thread(s)"
         + ("; '1 thread': the same kernel on one thread, scaling = its time / fastopt's"
            if opts.threads > 1 and legend is None else "")),
    ] + (legend if legend is not None else [
        ("NumPy", f"{np.__version__} (its elementwise code and reductions run on one thread)"),
        ("times", f"{np.dtype(opts.dtype).name}, medians; 'vs X' = X's time / fastopt's time"),
        ("GB/s", "compulsory traffic (every input read once, every output written once) / "
         "fastopt's time; %probe over 100% means the data fits in cache, or that the kernel "
         "streams memory faster than NumPy's copy and add (the probe is a lower bound)"),
        ("check", "every result is compared with a float64 run of the straightforward NumPy "
         "code before it is timed"),
    ]) + [("note", n) for n in notes]
    lines = [f"fastopt {__version__} benchmark, {now}"]
    for key, text in items:
        lines += _wrap(key, text, opts.width)
    return lines


def probe_line(opts, probe, probes):
    return _wrap("memory", f"probe {probe / 1e9:.1f} GB/s: the better of two {opts.threads}-"
                 f"thread NumPy streams over {opts.probe_mib} MiB arrays (best of several "
                 f"runs), copy {probes['copy'] / 1e9:.1f} GB/s (read + write) and in-place add "
                 f"{probes['add'] / 1e9:.1f} GB/s (2 reads + write)", opts.width)


def write_plot(path, records, title):
    """A bar chart of the speedups of `records` over NumPy and in-place NumPy."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    recs = [r for r in records if r["speedup_vs_numpy"]]
    labels = [f"{r['family']} {r['case']}" for r in recs]
    y = np.arange(len(recs))
    fig, ax = plt.subplots(figsize=(9, 0.3 * len(recs) + 1.5))
    ax.barh(y - 0.2, [r["speedup_vs_numpy"] for r in recs], 0.4, label="vs NumPy")
    ax.barh(y + 0.2, [r["speedup_vs_inplace"] or 0 for r in recs], 0.4,
            label="vs in-place NumPy")
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set_yticks(y, labels)
    ax.invert_yaxis()
    ax.set_xlabel("speedup of fastopt (x, log scale)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

