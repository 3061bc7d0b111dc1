#!/usr/bin/env python
"""Run the MPI tests (tests/mpi) under mpiexec, once per rank count.

    python tools/run_mpi_tests.py                 # mpiexec -n 2, then mpiexec -n 3
    python tools/run_mpi_tests.py -n 3 -- -k clip # one rank count, pytest options after --
    python tools/run_mpi_tests.py -n 2 --script tests/mpi/cases/faults.py -- raise-in-step

Each rank runs pytest on the same tests (they call collectives), or with
--script that script (arguments after --), with its output in a file of
its own; afterwards every rank's output is printed, and the run fails if
any rank failed, crashed or did not finish within --timeout seconds (then
mpiexec and every rank are killed; a rank that hangs has printed the stack
of every thread first).  Exit status: 0 if every rank of every run passed,
1 otherwise, 2 if mpiexec or mpi4py is missing.

Ranks run as ``python -m mpi4py``: an exception that escapes a rank, or
Ctrl-C, ends the whole job (``MPI_Abort``) instead of leaving the other
ranks waiting in a collective.  And a rank that has finished waits at most
--grace seconds for the others to finish too: if they do not, they are
waiting in a collective it never joined (a test that skipped one on some
ranks), so it makes those on this machine print their stacks and ends the
job, rather than leaving it to the timeout.
"""
import argparse
import os
import runpy
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests", "mpi")


def _machine():
    """This machine's identity (its boot id: the same in every network namespace)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        import socket
        return socket.gethostname()


def worker(outdir, timeout, grace, run):
    """One rank: `run()` (returns an exit status) with stdout/stderr in
    outdir/rank<r>.log and the status in rank<r>.rc; then the wait for the
    other ranks (see the module's docstring)."""
    import faulthandler

    from mpi4py import MPI

    world = MPI.COMM_WORLD
    rank = world.Get_rank()
    done = world.Dup()          # the end-of-run barrier: no test's message can match it
    ranks = done.allgather((_machine(), os.getpid()))
    log = open(os.path.join(outdir, f"rank{rank}.log"), "w", buffering=1)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    # A rank that hangs in a collective shows where, before it is killed,
    # or when a finished rank asks (SIGUSR1).
    faulthandler.dump_traceback_later(max(timeout - 5, 1), exit=False, file=log)
    if hasattr(signal, "SIGUSR1"):
        faulthandler.register(signal.SIGUSR1, file=log, all_threads=True)
    rc = run()
    faulthandler.cancel_dump_traceback_later()
    with open(os.path.join(outdir, f"rank{rank}.rc"), "w") as f:
        f.write(str(rc))
    sys.stdout.flush()
    sys.stderr.flush()
    request = done.Ibarrier()
    deadline = time.monotonic() + grace
    while not request.Test():
        if time.monotonic() > deadline:
            late = [r for r in range(len(ranks))
                    if not os.path.exists(os.path.join(outdir, f"rank{r}.rc"))]
            print(f"rank {rank} finished (exit status {rc}) but rank(s) "
                  f"{', '.join(map(str, late)) or '?'} did not within {grace:g} s: they wait in "
                  "a collective that this rank never joined; their stacks (if on this "
                  "machine) are in their output; aborting the job", flush=True)
            for r in late:
                machine, pid = ranks[r]
                if machine == _machine() and hasattr(signal, "SIGUSR1"):
                    os.kill(pid, signal.SIGUSR1)
            time.sleep(1.0)
            world.Abort(rc or 1)
            os._exit(rc or 1)   # MPICH's MPI_Abort may return before the launcher ends the job
        time.sleep(0.02)
    done.Free()
    return rc


def run_pytest(args):
    import pytest
    return int(pytest.main(["-p", "no:cacheprovider", *args]))


def run_script(path, args):
    """Run `path` as __main__ with `args`; its exit status (an exception escapes)."""
    sys.argv = [path, *args]
    try:
        runpy.run_path(path, run_name="__main__")
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


def launch(mpiexec, n, timeout, grace, worker_args, label=""):
    """mpiexec -n `n` of this script's worker; returns (ok, report text)."""
    outdir = tempfile.mkdtemp(prefix=f"fastopt-mpi-{n}-")
    name = f"mpiexec -n {n}{label}"
    try:
        cmd = [*mpiexec, "-n", str(n), sys.executable, "-m", "mpi4py", os.path.abspath(__file__),
               "--worker", outdir, "--timeout", str(timeout), "--grace", str(grace), *worker_args]
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
            lines.append(f"----- {name}, rank {r}: {status} -----")
            lines.append(open(log).read().rstrip() if os.path.exists(log) else "(no output)")
        if launcher_out.strip():
            lines.append(f"----- {name}: launcher output -----")
            lines.append(launcher_out.rstrip())
        if timed_out:
            failed.insert(0, f"timed out after {timeout} s (killed)")
        elif proc.returncode != 0 and not failed:
            failed.append(f"mpiexec exit status {proc.returncode}")
        verdict = ("FAILED: " + "; ".join(failed)) if failed else "every rank passed"
        lines.append(f"===== {name}: {verdict} ({seconds:.1f} s) =====")
        return not failed, "\n".join(lines)
    finally:
        shutil.rmtree(outdir, ignore_errors=True)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    rest = []
    if "--" in argv:
        k = argv.index("--")
        argv, rest = argv[:k], argv[k + 1:]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", type=int, action="append", dest="ranks",
                   help="number of ranks (repeatable; default: 2 and 3)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per mpiexec run")
    p.add_argument("--grace", type=float, default=10.0,
                   help="seconds a finished rank waits for the others (default 10)")
    p.add_argument("--script", help="run this script on every rank instead of pytest")
    p.add_argument("--mpiexec", default=None, help="the launcher (default: mpiexec on PATH "
                   "or next to this Python); a command with arguments is split like a shell's")
    p.add_argument("--worker", metavar="DIR", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        if args.script:
            run = lambda: run_script(args.script, rest)  # noqa: E731
        else:
            run = lambda: run_pytest(rest or ["-q", TESTS])  # noqa: E731
        return worker(args.worker, args.timeout, args.grace, run)
    if args.mpiexec:
        import shlex
        mpiexec = shlex.split(args.mpiexec)
    else:
        found = shutil.which("mpiexec") or shutil.which(
            "mpiexec", path=os.path.dirname(sys.executable))
        mpiexec = [found] if found else None
    if not mpiexec:
        print("error: no mpiexec found (pip install \"fastopt[mpi]\")", file=sys.stderr)
        return 2
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        print("error: mpi4py is not installed (pip install \"fastopt[mpi]\")", file=sys.stderr)
        return 2
    if args.script:
        worker_args = ["--script", os.path.abspath(args.script), "--", *rest]
        label = " ".join(["", os.path.relpath(args.script, ROOT), *rest])
    else:
        worker_args, label = ["--", *(rest or ["-q", TESTS])], ""
    ok = True
    for n in args.ranks or [2, 3]:
        passed, report = launch(mpiexec, n, args.timeout, args.grace, worker_args, label)
        print(report, flush=True)
        ok = ok and passed
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
