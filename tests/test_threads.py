"""Thread control: get/set_num_threads, OMP_NUM_THREADS, threadpoolctl, show_config."""
import io
import os
import subprocess
import sys

import numpy as np
import pytest
from threadpoolctl import threadpool_info, threadpool_limits

import fastopt

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


FORK_PROGRAM = r"""
import multiprocessing as mp, sys
import numpy as np, fastopt

def work(seed):
    r = np.random.default_rng(seed)
    p = r.standard_normal(1_000_000).astype(np.float32)
    m, v = np.zeros_like(p), np.zeros_like(p)
    fastopt.adam_step(p, p.copy(), m, v, step=1)
    x = r.standard_normal((64, 32, 30, 30)).astype(np.float32)
    y, ctx = fastopt.batch_norm_forward(x, np.ones(32, np.float32), np.zeros(32, np.float32))
    loss = fastopt.cross_entropy(r.standard_normal((256, 5000)).astype(np.float32),
                                 r.integers(0, 5000, 256))
    return float(p.sum()), float(y.sum()), loss, fastopt.get_num_threads()

if __name__ == "__main__":
    expected = [work(s)[:3] for s in range(3)]      # the parent uses its OpenMP threads first
    with mp.get_context("fork").Pool(2) as pool:
        got = pool.map(work, range(3))
    assert [g[:3] for g in got] == expected, (got, expected)
    print("child threads", {g[3] for g in got})
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork() here")
def test_kernels_work_in_forked_children(tmp_path):
    # GNU OpenMP's thread pool does not survive fork(): without care, the
    # first parallel region in a child of a parent that used it never returns.
    script = tmp_path / "fork_children.py"
    script.write_text(FORK_PROGRAM)
    here = os.path.dirname(os.path.dirname(fastopt.__file__))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                       timeout=60, env=dict(os.environ, PYTHONPATH=here))
    assert r.returncode == 0, r.stderr
    assert "child threads" in r.stdout
