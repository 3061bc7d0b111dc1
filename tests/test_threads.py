"""Thread control: get/set_num_threads, OMP_NUM_THREADS, threadpoolctl, show_config."""
import io
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from threadpoolctl import threadpool_info, threadpool_limits

import fastopt
from conftest import num_threads
from fastopt import _config, _runtime

OPENMP = fastopt.config()["openmp"]
needs_openmp = pytest.mark.skipif(not OPENMP, reason="built without OpenMP")


def run_python(code, **env):
    """Run `code` in a fresh interpreter that imports this fastopt; its stdout."""
    environ = dict(os.environ, **env)
    here = os.path.dirname(os.path.dirname(fastopt.__file__))
    environ["PYTHONPATH"] = os.pathsep.join([here, environ.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_set_num_threads_caps_and_resets():
    default = fastopt.get_num_threads()
    assert default >= 1
    try:
        fastopt.set_num_threads(1)
        assert fastopt.get_num_threads() == 1
        fastopt.set_num_threads(default + 5)      # a cap above OpenMP's team size
        assert fastopt.get_num_threads() == default
        fastopt.set_num_threads(np.int64(1))
        assert fastopt.get_num_threads() == 1
        fastopt.set_num_threads(None)
        assert fastopt.get_num_threads() == default
        fastopt.set_num_threads(1)
        fastopt.set_num_threads(0)
        assert fastopt.get_num_threads() == default
    finally:
        fastopt.set_num_threads(0)


@pytest.mark.parametrize("bad,exc", [(-1, ValueError), (1.5, TypeError), ("2", TypeError),
                                     (True, TypeError), ([2], TypeError)])
def test_set_num_threads_rejects(bad, exc):
    before = fastopt.get_num_threads()
    with pytest.raises(exc, match=r"^n must"):
        fastopt.set_num_threads(bad)
    assert fastopt.get_num_threads() == before


@needs_openmp
@pytest.mark.parametrize("n", ["1", "3"])
def test_omp_num_threads_is_honoured(n):
    out = run_python("import fastopt; print(fastopt.get_num_threads(), "
                     "fastopt.config()['omp_num_threads_env'])", OMP_NUM_THREADS=n)
    assert out.split() == [n, n]


def test_without_openmp_one_thread():
    if OPENMP:
        assert fastopt.config()["openmp_library"]
    else:
        assert fastopt.get_num_threads() == 1


@needs_openmp
def test_fewer_threads_than_asked_still_update_everything():
    """OMP_THREAD_LIMIT=1 (or OMP_DYNAMIC) can give a smaller team than asked
    for: every element must still be updated."""
    code = ("import numpy as np, fastopt\n"
            "p = np.ones(1_000_003, np.float32); g = np.ones_like(p)\n"
            "fastopt.sgd_step(p, g, lr=1.0)\n"
            "print(int((p == 0).sum()))")
    assert run_python(code, OMP_THREAD_LIMIT="1") == "1000003"
    assert run_python(code, OMP_DYNAMIC="true") == "1000003"


@needs_openmp
def test_threadpoolctl_sees_fastopt_openmp():
    entries = [e for e in threadpool_info() if e["user_api"] == "openmp"]
    assert entries, threadpool_info()
    lib = os.path.realpath(fastopt.config()["openmp_library"])
    assert any(os.path.realpath(e["filepath"]) == lib for e in entries), (lib, entries)


@needs_openmp
def test_threadpool_limits_lowers_num_threads():
    default = fastopt.get_num_threads()
    with threadpool_limits(1, user_api="openmp"):
        assert fastopt.get_num_threads() == 1
        p, g = np.ones(300_001), np.ones(300_001)
        fastopt.sgd_step(p, g, lr=1.0)              # still updates everything
        assert np.all(p == 0)
    assert fastopt.get_num_threads() == default


def test_show_config_reports_the_build_and_runtime():
    buf = io.StringIO()
    fastopt.show_config(file=buf)
    text = buf.getvalue()
    c = fastopt.config()
    assert f"fastopt {fastopt.__version__}" in text
    assert c["simd_level"] in text and "SIMD" in text
    assert "OpenMP" in text
    if c["openmp"]:
        assert str(c["openmp_version"]) in text
    else:
        assert "NO" in text
    assert f"threads:       {fastopt.get_num_threads()}" in text
    assert c["compiler"] in text
    assert " ".join(c["cflags"]) in text
    if c["sanitize"]:        # FASTOPT_SANITIZE build (tools/sanitize.sh)
        assert "-fsanitize=" in text and "sanitizers:" in text
    else:
        assert any(f in text for f in ("-O3", "/O2"))


def test_show_config_thread_count_follows_the_cap():
    try:
        fastopt.set_num_threads(1)
        buf = io.StringIO()
        fastopt.show_config(file=buf)
        assert "threads:       1 " in buf.getvalue()
    finally:
        fastopt.set_num_threads(0)


def test_show_config_prints_to_stdout(capsys):
    fastopt.show_config()
    assert "fastopt" in capsys.readouterr().out


# ------------------------------------------------------------ thread pool ---

POSIX_POOL = _runtime.pool_backend() == "pthreads"
needs_posix_pool = pytest.mark.skipif(not POSIX_POOL, reason="needs fastopt's POSIX thread pool")
needs_pool = pytest.mark.skipif(not POSIX_POOL or fastopt.get_num_threads() < 2,
                                reason="needs fastopt's POSIX thread pool and 2 threads")


@pytest.mark.parametrize("env, spin_ns, words", [
    ({}, 2_000_000, "workers yield-spin 2 ms then sleep; OMP_WAIT_POLICY unset"),
    ({"OMP_WAIT_POLICY": "passive"}, 0, "workers sleep after each job; OMP_WAIT_POLICY=passive"),
    ({"OMP_WAIT_POLICY": " Active "}, -1, "workers yield-spin while idle; OMP_WAIT_POLICY=Active"),
    ({"OMP_WAIT_POLICY": "sometimes"}, 2_000_000, "'sometimes' not understood, ignored"),
    ({"GOMP_SPINCOUNT": "300000"}, 3_000_000, "yield-spin 3 ms then sleep; GOMP_SPINCOUNT=300000"),
    ({"GOMP_SPINCOUNT": "50k"}, 500_000, "yield-spin 500 us then sleep; GOMP_SPINCOUNT=50k"),
    ({"GOMP_SPINCOUNT": "2M"}, 20_000_000, "yield-spin 20 ms"),
    ({"GOMP_SPINCOUNT": "0", "OMP_WAIT_POLICY": "active"}, 0, "GOMP_SPINCOUNT=0"),
    ({"GOMP_SPINCOUNT": "infinite", "OMP_WAIT_POLICY": "passive"}, -1, "while idle"),
    ({"GOMP_SPINCOUNT": "INFINITY"}, -1, "while idle; GOMP_SPINCOUNT=INFINITY"),
    ({"GOMP_SPINCOUNT": "-5", "OMP_WAIT_POLICY": "passive"}, 0,
     "OMP_WAIT_POLICY=passive; GOMP_SPINCOUNT='-5' not understood, ignored"),
    ({"GOMP_SPINCOUNT": "1x"}, 2_000_000, "GOMP_SPINCOUNT='1x' not understood"),
])
def test_wait_policy_reads_the_openmp_environment(env, spin_ns, words):
    got, text = _config.wait_policy(env)
    assert got == spin_ns
    assert words in text


@pytest.mark.parametrize("env, words", [
    ({"OMP_WAIT_POLICY": "passive"}, "workers sleep after each job; OMP_WAIT_POLICY=passive"),
    ({"GOMP_SPINCOUNT": "10k"}, "workers yield-spin 100 us then sleep; GOMP_SPINCOUNT=10k"),
])
def test_wait_policy_is_applied_and_reported(env, words):
    env = {"OMP_WAIT_POLICY": "", "GOMP_SPINCOUNT": "", **env}
    env = {k: v for k, v in env.items() if v}
    code = ("import os\n"
            "for k in ('OMP_WAIT_POLICY', 'GOMP_SPINCOUNT'):\n"
            f"    os.environ.pop(k, None) if k not in {sorted(env)!r} else None\n"
            "import fastopt; fastopt.show_config()")
    out = run_python(code, **env)
    line = next(ln for ln in out.splitlines() if "threads:" in ln)
    if fastopt.config()["thread_pool"] == "pthreads":
        assert "fastopt pool: caller never waits for unstarted workers; " + words in line


def test_show_config_reports_the_thread_policy():
    c = fastopt.config()
    assert c["thread_pool"] in ("pthreads", "openmp", "serial")
    assert c["wait_policy"] == _config.WAIT_POLICY
    buf = io.StringIO()
    fastopt.show_config(file=buf)
    if c["thread_pool"] == "pthreads":
        assert ("(fastopt pool: caller never waits for unstarted workers; "
                + c["wait_policy"]) in buf.getvalue()


def probe_run(nchunks, nt, **kw):
    who, order = _runtime._probe(nchunks, nt, **kw)
    assert sorted(order.tolist()) == list(range(nchunks)), "every chunk runs exactly once"
    return who, order


@needs_posix_pool
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("nchunks, nt", [(10, 2), (7, 3), (1, 2), (2, 5), (0, 2), (5, 1)])
def test_held_workers_leave_every_chunk_to_the_caller_in_range_order(nchunks, nt, reverse):
    # The caller runs its own range first, then the others': each from its
    # start, or with reverse from its end.
    _runtime._hold_workers(True)
    try:
        who, order = probe_run(nchunks, nt, reverse=reverse)
    finally:
        _runtime._hold_workers(False)
    assert (who == 0).all()
    team = max(1, min(nt, nchunks))
    bounds = [nchunks * r // team for r in range(team + 1)]
    ranges = [list(range(bounds[r], bounds[r + 1])) for r in range(team)]
    expected = [c for rng in ranges for c in (rng[::-1] if reverse else rng)]
    assert np.argsort(order).tolist() == expected


@needs_pool
def test_workers_take_part_when_the_caller_is_slow():
    # The caller sleeps in each of its chunks, so a worker soon claims the rest.
    who, _ = probe_run(400, 2, caller_sleep=0.002)
    assert 1 in who
    assert _runtime.pool_stats()["workers"] >= 1


def reference_and_threaded(call):
    """call() -> tuple of arrays, on 1 thread and on the default threads."""
    with num_threads(1):
        expected = [np.copy(a) for a in call()]
    return expected, [np.copy(a) for a in call()]


def kernel_calls():
    r = np.random.default_rng(5)
    f32 = lambda *s: r.standard_normal(s).astype(np.float32)   # noqa: E731
    p0, g = f32(300_001), f32(300_001)
    x, dy = f32(8, 64, 20, 20), f32(8, 64, 20, 20)
    gamma, beta = f32(64), f32(64)
    logits, target = f32(256, 1000), r.integers(0, 1000, 256)
    X, idx = f32(5000, 300), r.permutation(5000)
    grads = [f32(100_000) for _ in range(5)]

    def adam():
        p, m, v = p0.copy(), np.zeros_like(p0), np.zeros_like(p0)
        fastopt.adam_step(p, g, m, v, step=2)
        return p, m, v

    def batch_norm():
        y, ctx = fastopt.batch_norm_forward(x, gamma, beta)
        return (y,) + fastopt.batch_norm_backward(dy, ctx)

    def xent():
        loss, d = fastopt.cross_entropy(logits, target, return_grad=True, reduction="none")
        return loss, d

    def clip():
        gs = [a.copy() for a in grads]
        return [np.array(fastopt.clip_grad_norm_(gs, 1.0))] + gs

    return {"adam": adam, "batch_norm": batch_norm, "cross_entropy": xent,
            "take_rows": lambda: (fastopt.take_rows(X, idx),), "clip_grad_norm_": clip}


@needs_pool
@pytest.mark.parametrize("name", ["adam", "batch_norm", "cross_entropy", "take_rows",
                                  "clip_grad_norm_"])
def test_caller_finishes_alone_when_workers_hold_back(name):
    # Workers that never claim a chunk (as when they get no CPU) cost the
    # caller nothing: it runs the whole job itself, with the same result.
    call = kernel_calls()[name]
    before = _runtime.pool_stats()
    _runtime._hold_workers(True)
    try:
        expected, got = reference_and_threaded(call)
    finally:
        _runtime._hold_workers(False)
    after = _runtime.pool_stats()
    assert after["jobs"] > before["jobs"], "the call went through the pool"
    assert after["chunks"] - before["chunks"] == after["caller_chunks"] - before["caller_chunks"]
    for e, g in zip(expected, got):
        np.testing.assert_array_equal(e, g)


@needs_pool
def test_a_second_caller_runs_alone_while_the_pool_is_busy():
    # Thread A holds the pool (its job blocks until released); kernels called
    # meanwhile from this thread must run at once on their own thread, not
    # wait for A.  (If they waited, this test would hang, not fail: the calls
    # run in a thread joined with a timeout, and A is released in any case.)
    calls = kernel_calls()
    expected = {}
    with num_threads(1):
        for name, call in calls.items():
            expected[name] = [np.copy(a) for a in call()]
    _runtime._hold_workers(True)
    holder = threading.Thread(target=_runtime._probe, args=(4, 2), kwargs={"block": True})
    results, errors = {}, []

    def run_all():
        try:
            for name, call in calls.items():
                results[name] = [np.copy(a) for a in call()]
        except BaseException as exc:       # reported below
            errors.append(exc)
    try:
        holder.start()
        while not _runtime.pool_stats()["busy"]:
            time.sleep(0.001)
        alone = _runtime.pool_stats()["alone"]
        runner = threading.Thread(target=run_all)
        runner.start()
        runner.join(timeout=120)
        assert not runner.is_alive(), "a kernel waited for the busy pool"
        assert _runtime.pool_stats()["busy"], "the holder's job is still running"
        assert _runtime.pool_stats()["alone"] - alone >= len(calls)
    finally:
        _runtime._open_probe()
        holder.join()
        _runtime._hold_workers(False)
    assert not errors, errors
    for name in calls:
        for e, g in zip(expected[name], results[name]):
            np.testing.assert_array_equal(e, g)


@needs_openmp
def test_omp_num_threads_1_starts_no_worker():
    code = ("import numpy as np, fastopt\n"
            "from fastopt import _runtime\n"
            "p = np.ones(2_000_000, np.float32)\n"
            "fastopt.sgd_step(p, np.ones_like(p), lr=1.0)\n"
            "s = _runtime.pool_stats()\n"
            "print(fastopt.get_num_threads(), s['jobs'], s['workers_started'], int(p.sum()))")
    assert run_python(code, OMP_NUM_THREADS="1").split() == ["1", "0", "0", "0"]


@needs_posix_pool
@needs_openmp
def test_workers_start_when_first_needed_and_as_the_cap_grows():
    code = ("import numpy as np, fastopt\n"
            "from fastopt import _runtime\n"
            "p = np.ones(2_000_000, np.float32)\n"
            "started = [_runtime.pool_stats()['workers_started']]\n"
            "for cap in (1, 2, 3, 2):\n"
            "    fastopt.set_num_threads(cap)\n"
            "    fastopt.sgd_step(p, np.ones_like(p), lr=1.0)\n"
            "    started.append(_runtime.pool_stats()['workers_started'])\n"
            "print(*started, int(p.sum()))")
    assert run_python(code, OMP_NUM_THREADS="3").split() == ["0", "0", "1", "2", "2", "-6000000"]


# ------------------------------------------------------------------- fork ---

FORK_PROGRAM = r"""
import multiprocessing as mp, sys
import numpy as np, fastopt
from fastopt import _runtime

def work(seed):
    r = np.random.default_rng(seed)
    p = r.standard_normal(1_000_000).astype(np.float32)
    m, v = np.zeros_like(p), np.zeros_like(p)
    fastopt.adam_step(p, p.copy(), m, v, step=1)
    x = r.standard_normal((64, 32, 30, 30)).astype(np.float32)
    y, ctx = fastopt.batch_norm_forward(x, np.ones(32, np.float32), np.zeros(32, np.float32))
    loss = fastopt.cross_entropy(r.standard_normal((256, 5000)).astype(np.float32),
                                 r.integers(0, 5000, 256))
    # a job whose caller is slow, so that a worker of this process takes part
    who, _ = _runtime._probe(400, 2, caller_sleep=0.002)
    return (float(p.sum()), float(y.sum()), loss, fastopt.get_num_threads(),
            _runtime.pool_stats()["workers_started"], 1 in who)

if __name__ == "__main__":
    expected = [work(s) for s in range(3)]      # the parent uses its threads first
    with mp.get_context("fork").Pool(2) as pool:
        got = pool.map(work, range(3))
    assert [g[:3] for g in got] == [e[:3] for e in expected], (got, expected)
    threads = fastopt.get_num_threads()
    for g in got:
        # each child runs threaded, on workers it started itself
        assert g[3] == threads, (g, threads)
        assert g[4] == threads - 1, g
        assert g[5] == (threads > 1), g
    print("child threads", {g[3] for g in got})
"""


def run_script(tmp_path, text, *args, timeout=120):
    script = tmp_path / "program.py"
    script.write_text(text)
    here = os.path.dirname(os.path.dirname(fastopt.__file__))
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, PYTHONPATH=here))


@needs_posix_pool
@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork() here")
def test_kernels_run_threaded_in_forked_children(tmp_path):
    # The pool's workers do not survive fork(); a child starts its own.
    r = run_script(tmp_path, FORK_PROGRAM)
    assert r.returncode == 0, r.stderr
    assert "child threads" in r.stdout


GOMP_FORK_PROGRAM = r"""
import ctypes, os, sys, traceback

# The parent runs a GNU OpenMP parallel region through another library (here
# libgomp itself, called through ctypes), so libgomp's thread pool exists...
gomp = ctypes.CDLL(sys.argv[1])
Body = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
seen = []
body = Body(lambda data: seen.append(gomp.omp_get_thread_num()))
gomp.GOMP_parallel.argtypes = [Body, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
gomp.GOMP_parallel(body, None, 2, 0)
assert sorted(seen) == [0, 1], seen
assert "fastopt" not in sys.modules

# ...then forks; the child imports fastopt for the first time and runs
# threaded kernels (a GNU OpenMP parallel region would never return there).
pid = os.fork()
if pid == 0:
    import signal
    signal.alarm(100)       # a hang ends the child (and fails the test)
    code = 1
    try:
        import numpy as np, fastopt
        from fastopt import _runtime
        r = np.random.default_rng(0)
        p = r.standard_normal(1_000_000).astype(np.float32)
        g = r.standard_normal(1_000_000).astype(np.float32)
        x = r.standard_normal((16, 32, 30, 30)).astype(np.float32)
        logits = r.standard_normal((256, 5000)).astype(np.float32)
        def run():
            q, m, v = p.copy(), np.zeros_like(p), np.zeros_like(p)
            fastopt.adam_step(q, g, m, v, step=1)
            y, ctx = fastopt.batch_norm_forward(x, np.ones(32, np.float32), np.zeros(32, np.float32))
            loss = fastopt.cross_entropy(logits, r.integers(0, 5000, 256) * 0)
            return q, y, loss
        got = run()
        threads = fastopt.get_num_threads()
        fastopt.set_num_threads(1)
        expected = run()
        fastopt.set_num_threads(0)
        assert all(np.array_equal(a, b) for a, b in zip(got, expected))
        assert threads == int(sys.argv[2]), threads
        assert _runtime.pool_stats()["workers_started"] == threads - 1
        print("child ran threaded kernels on", threads, "threads", flush=True)
        code = 0
    except BaseException:
        traceback.print_exc()
    os._exit(code)
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""


@needs_posix_pool
@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork() here")
@pytest.mark.skipif("gomp" not in os.path.basename(fastopt.config()["openmp_library"]),
                    reason="the hang this guards against is GNU OpenMP's")
def test_fork_child_of_a_gnu_openmp_parent_imports_fastopt_and_runs_threaded(tmp_path):
    r = run_script(tmp_path, GOMP_FORK_PROGRAM, fastopt.config()["openmp_library"],
                   str(fastopt.get_num_threads()), timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "child ran threaded kernels" in r.stdout
