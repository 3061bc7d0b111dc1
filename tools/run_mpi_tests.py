#!/usr/bin/env python
"""Run the MPI tests (tests/mpi) under mpiexec, once per rank count.

    python tools/run_mpi_tests.py                 # mpiexec -n 2, then mpiexec -n 3
    python tools/run_mpi_tests.py -n 3 -- -k clip # one rank count, pytest options after --

Each rank runs pytest on the same tests (they call collectives) with its
output in a file of its own; afterwards every rank's output is printed,
and the run fails if any rank failed, crashed or did not finish within
--timeout seconds (then mpiexec and every rank are killed; a rank that
hangs has printed the stack of every thread first).  Exit status: 0 if
every rank of every run passed, 1 otherwise, 2 if mpiexec or mpi4py is
missing.
"""
import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests", "mpi")


def worker(outdir, timeout, pytest_args):
    """One rank: pytest with stdout/stderr in outdir/rank<r>.log, exit status in .rc."""
    import faulthandler

    import pytest
    from mpi4py import MPI

    rank = MPI.COMM_WORLD.Get_rank()
    log = open(os.path.join(outdir, f"rank{rank}.log"), "w", buffering=1)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    # A rank that hangs in a collective shows where, before it is killed.
    faulthandler.dump_traceback_later(max(timeout - 5, 1), exit=False, file=log)
    rc = int(pytest.main(["-p", "no:cacheprovider", *pytest_args]))
    faulthandler.cancel_dump_traceback_later()
    with open(os.path.join(outdir, f"rank{rank}.rc"), "w") as f:
        f.write(str(rc))
    sys.stdout.flush()
    return rc


def launch(mpiexec, n, timeout, pytest_args):
    """mpiexec -n `n` of this script's worker; returns (ok, report text)."""
    outdir = tempfile.mkdtemp(prefix=f"fastopt-mpi-{n}-")
    try:
        cmd = [mpiexec, "-n", str(n), sys.executable, os.path.abspath(__file__),
               "--worker", outdir, "--timeout", str(timeout), "--", *pytest_args]
        # Ranks busy-poll while they wait in a collective; with more ranks
        # than cores (3 on a 2-core machine) they would take turns with the
        # scheduler.  Waiting ranks yield their core instead (MPICH, Open MPI).
        env = {"MPIR_CVAR_ENABLE_HEAVY_YIELD": "1", "OMPI_MCA_mpi_yield_when_idle": "1",
               **os.environ}
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True, text=True, env=env)
        try:
            launcher_out, _ = proc.communicate(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            launcher_out, _ = proc.communicate()
            timed_out = True
        seconds = time.perf_counter() - start
        lines, failed = [], []
        for r in range(n):
            log = os.path.join(outdir, f"rank{r}.log")
            rc_file = os.path.join(outdir, f"rank{r}.rc")
            rc = open(rc_file).read().strip() if os.path.exists(rc_file) else None
            status = "no exit status (crashed or killed)" if rc is None else f"exit status {rc}"
            if rc != "0":
                failed.append(f"rank {r}: {status}")
            lines.append(f"----- mpiexec -n {n}, rank {r}: {status} -----")
            lines.append(open(log).read().rstrip() if os.path.exists(log) else "(no output)")
        if launcher_out.strip():
            lines.append(f"----- mpiexec -n {n}: launcher output -----")
            lines.append(launcher_out.rstrip())
        if timed_out:
            failed.insert(0, f"timed out after {timeout} s (killed)")
        elif proc.returncode != 0 and not failed:
            failed.append(f"mpiexec exit status {proc.returncode}")
        verdict = ("FAILED: " + "; ".join(failed)) if failed else "every rank passed"
        lines.append(f"===== mpiexec -n {n}: {verdict} ({seconds:.1f} s) =====")
        return not failed, "\n".join(lines)
    finally:
        shutil.rmtree(outdir, ignore_errors=True)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    pytest_args = []
    if "--" in argv:
        k = argv.index("--")
        argv, pytest_args = argv[:k], argv[k + 1:]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", type=int, action="append", dest="ranks",
                   help="number of ranks (repeatable; default: 2 and 3)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per mpiexec run")
    p.add_argument("--mpiexec", default=None, help="the launcher (default: mpiexec on PATH "
                   "or next to this Python)")
    p.add_argument("--worker", metavar="DIR", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args.worker, args.timeout, pytest_args or ["-q", TESTS])
    mpiexec = args.mpiexec or shutil.which("mpiexec") or shutil.which(
        "mpiexec", path=os.path.dirname(sys.executable))
    if mpiexec is None:
        print("error: no mpiexec found (pip install \"fastopt[mpi]\")", file=sys.stderr)
        return 2
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        print("error: mpi4py is not installed (pip install \"fastopt[mpi]\")", file=sys.stderr)
        return 2
    ok = True
    for n in args.ranks or [2, 3]:
        passed, report = launch(mpiexec, n, args.timeout, pytest_args or ["-q", TESTS])
        print(report, flush=True)
        ok = ok and passed
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
