"""`python -m fastopt bench` and `python -m fastopt`: output, JSON, bad input, and
that a wrong kernel is reported as FAILED (never as a fast result)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import fastopt
from fastopt import _baselines as B
from fastopt import bench

SRC = os.path.dirname(os.path.dirname(os.path.abspath(fastopt.__file__)))


def start_cli(*args):
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-m", "fastopt", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def finish(proc):
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run_cli(*args):
    return finish(start_cli(*args))


@pytest.fixture
def small(monkeypatch):
    """Tiny shapes for the model/BatchNorm/softmax families, a small probe, short timing."""
    real_measure = bench.measure
    monkeypatch.setattr(bench, "measure", lambda step, budget, min_samples, **kw:
                        real_measure(step, 1e-3, 1, **kw))
    monkeypatch.setattr(bench, "MODELS", [("3 arrays", [(5, 3), (7,), (2, 2, 3)], True)])
    monkeypatch.setattr(bench, "BN_SHAPES", [((4, 3, 5, 5), 1, True), ((6, 2, 3, 4), -1, True),
                                             ((16, 5), 1, True)])
    monkeypatch.setattr(bench, "SOFTMAX_SHAPES", [((8, 13), True), ((3, 1), True)])
    real_probe = bench.probe_bandwidth
    monkeypatch.setattr(bench, "probe_bandwidth",
                        lambda threads, mib, budget: real_probe(threads, 4, budget))


def test_quick_adam_prints_a_checked_row():
    r = run_cli("bench", "--quick", "--kernels", "adam", "--sizes", "1000")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "CPU:" in out and "SIMD" in out and "probe" in out
    assert "NumPy" in out and "in-place" in out and "fastopt" in out
    rows = [line for line in out.splitlines() if line.strip().startswith("n=1,000 ")]
    assert len(rows) == 1 and rows[0].rstrip().endswith("ok"), out
    assert "All 1 cases match NumPy" in out
    assert "Traceback" not in r.stderr


def test_json_has_the_expected_fields(tmp_path, small, capsys):
    path = tmp_path / "bench.json"
    assert bench.main(["--quick", "--kernels", "adam,sgd", "--sizes", "100,2000",
                       "--json", str(path)]) == 0
    data = json.loads(path.read_text())
    assert data["failed"] == 0 and data["quick"] is True and data["dtype"] == "float32"
    assert data["probe"]["bytes_per_s"] > 0
    assert data["config"]["simd_level"] == fastopt.config()["simd_level"]
    assert [(r["family"], r["elements"]) for r in data["results"]] == [
        ("adam", 100), ("adam", 2000), ("sgd", 100), ("sgd", 2000)]
    for r in data["results"]:
        assert r["ok"] and r["errors"] == {}
        for key in ("numpy_s", "inplace_s", "fastopt_s", "speedup_vs_numpy",
                    "speedup_vs_inplace", "gbps", "probe_fraction"):
            assert r[key] > 0, key
        assert r["bytes"] == {"adam": 7, "sgd": 5}[r["family"]] * 4 * r["elements"]
        assert 0 < r["best_s"]["fastopt"] <= r["fastopt_s"]
    assert str(path) in capsys.readouterr().out


BAD_INPUT = [
    (["--kernels", "adam,bogus"], "bogus"),
    (["--kernels", ","], "--kernels"),
    (["--sizes", "10,abc"], "abc"),
    (["--sizes", "0"], "'0'"),
    (["--sizes", "1.5"], "1.5"),
    (["--sizes", "1e12"], "limit"),
    (["--threads", "0"], "--threads"),
    (["--threads", "two"], "--threads"),
    (["--dtype", "int8"], "int8"),
    (["--json", "/nonexistent-dir/x/out.json"], "--json"),
    (["--json", "/"], "directory"),
    (["--bogus-option"], "--bogus-option"),
]


@pytest.fixture(scope="module")
def bad_input_runs():
    """All bad-input commands, started at once (each is a fresh interpreter)."""
    procs = [start_cli("bench", "--quick", *args) for args, _ in BAD_INPUT]
    return [finish(p) for p in procs]


@pytest.mark.parametrize("k", range(len(BAD_INPUT)), ids=[" ".join(a) for a, _ in BAD_INPUT])
def test_bad_input_exits_2_with_one_line(bad_input_runs, k):
    r, words = bad_input_runs[k], BAD_INPUT[k][1]
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0] and words in lines[0], r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_plot_without_matplotlib_is_a_clear_error(tmp_path):
    try:
        import matplotlib  # noqa: F401
        pytest.skip("matplotlib is installed")
    except ImportError:
        pass
    r = run_cli("bench", "--quick", "--plot", str(tmp_path / "p.png"))
    assert r.returncode == 2 and "matplotlib" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_module_dispatch():
    r = run_cli("config")
    assert r.returncode == 0 and "OpenMP" in r.stdout
    r = run_cli("frobnicate")
    assert r.returncode == 2 and "unknown command" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("--help")
    assert r.returncode == 0 and "bench" in r.stdout


def test_demo_missing_is_a_clear_error(monkeypatch, capsys):
    from fastopt.__main__ import main
    monkeypatch.setitem(sys.modules, "fastopt.demo", None)      # import fails
    assert main(["demo"]) == 2
    assert "fastopt.demo" in capsys.readouterr().err


def test_wrong_kernel_is_reported_failed(monkeypatch, small, capsys):
    real = fastopt.adam_step

    def wrong_adam_step(param, grad, exp_avg, exp_avg_sq, **kw):
        real(param, grad, exp_avg, exp_avg_sq, **kw)
        param.flat[-1] += 1e-3          # one element off by the size of an update
    monkeypatch.setattr(fastopt, "adam_step", wrong_adam_step)
    assert bench.main(["--quick", "--kernels", "adam,sgd", "--sizes", "1000"]) == 1
    out = capsys.readouterr().out
    adam_row = next(line for line in out.splitlines() if line.startswith("  n=1,000"))
    assert "FAILED" in adam_row and "x" not in adam_row.split()[3]
    assert "FAILED fastopt: param[999]" in out
    assert "FAILED: 1 of 2 cases" in out                  # sgd still ok


def test_kernel_raising_is_reported_failed(monkeypatch, small, capsys):
    def broken(*args, **kw):
        raise RuntimeError("kernel exploded")
    monkeypatch.setattr(fastopt, "sgd_step", broken)
    assert bench.main(["--quick", "--kernels", "sgd", "--sizes", "10"]) == 1
    assert "RuntimeError: kernel exploded" in capsys.readouterr().out


# Stand-ins for the kernels of other families, built from the NumPy
# baselines, so the whole report can be exercised whatever this build has.

class _Adam:
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8):
        self.params, self.t, self.kw = params, 0, dict(lr=lr, betas=betas, eps=eps)
        self.m = [np.zeros_like(p) for p in params]
        self.v = [np.zeros_like(p) for p in params]

    def step(self, grads):
        self.t += 1
        for p, g, m, v in zip(self.params, grads, self.m, self.v):
            fastopt.adam_step(p, g, m, v, step=self.t, **self.kw)


def _bn_forward(x, gamma, beta, *, eps, axis, out):
    y, cache = B.batch_norm_numpy(x, gamma, beta, eps, axis)
    out[...] = y
    return out, cache


def _bn_backward(dy, ctx, *, dx_out):
    dx, dgamma, dbeta = B.batch_norm_backward_numpy(dy, ctx)
    dx_out[...] = dx
    return dx_out, dgamma, dbeta


def _cross_entropy(logits, target, *, return_grad, grad_out):
    loss, d = B.cross_entropy_numpy(logits, target)
    grad_out[...] = d
    return loss, grad_out


def _log_softmax(x, *, out):
    out[...] = B.log_softmax_numpy(x)
    return out


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_every_family_runs_when_its_api_is_present(monkeypatch, small, tmp_path, dtype):
    for name, fn in [("Adam", _Adam), ("batch_norm_forward", _bn_forward),
                     ("batch_norm_backward", _bn_backward),
                     ("cross_entropy", _cross_entropy), ("log_softmax", _log_softmax)]:
        monkeypatch.setattr(fastopt, name, fn, raising=False)
    path = tmp_path / "all.json"
    assert bench.main(["--quick", "--sizes", "50", "--dtype", dtype, "--json", str(path)]) == 0
    data = json.loads(path.read_text())
    families = [r["family"] for r in data["results"]]
    assert families == ["adam", "adamw", "rmsprop", "sgd", "optimizer", "batchnorm",
                        "batchnorm", "batchnorm", "cross_entropy", "cross_entropy",
                        "log_softmax", "log_softmax"]
    assert data["notes"] == [] or all("skipped" not in n for n in data["notes"])
    model = data["results"][4]
    assert model["extras"]["loop of adam_step calls"]["error"] is None


def test_missing_family_is_skipped_with_a_note(monkeypatch, small, capsys):
    monkeypatch.delattr(fastopt, "log_softmax", raising=False)
    assert bench.main(["--quick", "--kernels", "log_softmax,sgd", "--sizes", "10"]) == 0
    out = capsys.readouterr().out
    assert "log_softmax: skipped, fastopt.log_softmax is not in this build" in out


def test_peers_absent_are_noted(monkeypatch, small, capsys):
    monkeypatch.setattr(bench, "_import", lambda name: None)
    assert bench.main(["--quick", "--peers", "--kernels", "adam", "--sizes", "10"]) == 0
    assert "torch and numba not installed, skipped" in capsys.readouterr().out


def test_measure_returns_the_median_per_call():
    calls = []
    median, best = bench.measure(lambda: calls.append(1), budget=0.01, min_samples=3)
    assert 0 < best <= median < 1e-3 and len(calls) > 3


def test_compare_names_the_first_bad_element():
    r = np.arange(6, dtype=np.float64).reshape(2, 3) / 3
    ref = bench.Reference([r], np.float32)
    got = r.astype(np.float32)
    assert bench.compare([got], ref, ("y",)) is None
    got[1, 2] = 7
    assert bench.compare([got], ref, ("y",)).startswith("y[1, 2] = 7")
    got[1, 2] = np.nan
    assert "y[1, 2] = nan" in bench.compare([got], ref, ("y",))
    assert "shape" in bench.compare([got[0]], ref, ("y",))
    assert bench.compare([got.astype(np.float64)], bench.Reference([r], np.float64),
                         ("y",)) is not None                 # float64: float32 rounding is an error


def test_more_threads_than_openmp_allows_is_noted(small, capsys):
    assert bench.main(["--quick", "--threads", "512", "--kernels", "sgd", "--sizes", "10"]) == 0
    out = capsys.readouterr().out
    assert "--threads 512: fastopt can start at most" in out
    assert fastopt.get_num_threads() < 512


def test_plot_writes_a_png(small, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path = tmp_path / "speedups.png"
    assert bench.main(["--quick", "--kernels", "sgd", "--sizes", "10,100", "--plot",
                       str(path)]) == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
