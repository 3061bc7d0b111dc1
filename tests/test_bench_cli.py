"""`python -m fastopt bench` and `python -m fastopt`: output, JSON, bad input, and
that a wrong kernel is reported as FAILED (never as a fast result)."""
import contextlib
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


def start_cli(*args, columns=None):
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if columns:
        env["COLUMNS"] = str(columns)
    return subprocess.Popen([sys.executable, "-m", "fastopt", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def finish(proc):
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run_cli(*args, columns=None):
    return finish(start_cli(*args, columns=columns))


@pytest.fixture
def small(monkeypatch):
    """Tiny shapes for the model/BatchNorm/softmax families, a small probe, short timing
    (each replaced in the module of fastopt.bench that defines it)."""
    real_measure = bench.measure
    monkeypatch.setattr(bench.timing, "measure", lambda step, budget, min_samples, **kw:
                        real_measure(step, 1e-3, 1, **kw))
    monkeypatch.setattr(bench.settings, "MODELS",
                        [("3 arrays", [(5, 3), (7,), (2, 2, 3)], True)])
    monkeypatch.setattr(bench.settings, "BN_SHAPES", [((4, 3, 5, 5), 1, True),
                                                      ((6, 2, 3, 4), -1, True), ((16, 5), 1, True)])
    monkeypatch.setattr(bench.settings, "SOFTMAX_SHAPES", [((8, 13), True), ((3, 1), True)])
    monkeypatch.setattr(bench.settings, "ADAFACTOR_SHAPES", [((9, 70), True)])
    real_probe = bench.probe_bandwidth
    monkeypatch.setattr(bench.timing, "probe_bandwidth",
                        lambda threads, mib, budget: real_probe(threads, 4, budget))


def test_quick_adam_prints_a_checked_row():
    r = run_cli("bench", "--quick", "--kernels", "adam", "--sizes", "1000", columns=120)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "CPU:" in out and "SIMD" in out and "probe" in out
    assert "NumPy" in out and "in-place" in out and "fastopt" in out
    rows = [line for line in out.splitlines() if line.strip().startswith("n=1,000 ")]
    assert len(rows) == 1 and rows[0].rstrip().endswith("ok"), out
    assert "All 1 cases match NumPy" in out
    assert "Verdict" in out and "Slower than NumPy" in out
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
    (["--plot", "speedups.txt"], "--plot: speedups.txt: '.txt' is not an image format"),
    (["--plot", "speedups"], "--plot: speedups: no file extension"),
    (["--plot", "/nonexistent-dir/x/s.png"], "--plot: cannot write"),
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


def test_plot_without_matplotlib_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)              # import fails
    monkeypatch.setitem(sys.modules, "matplotlib.backend_bases", None)
    assert bench.main(["--quick", "--plot", str(tmp_path / "p.png")], prog="bench") == 2
    out, err = capsys.readouterr()
    assert out == "" and err == ("bench: error: --plot needs matplotlib: pip install "
                                 "matplotlib (or pip install 'fastopt[plot]')\n")


def test_plot_is_written(tmp_path, small, capsys):
    pytest.importorskip("matplotlib")
    path = tmp_path / "speedups.svg"
    assert bench.main(["--quick", "--kernels", "sgd", "--sizes", "100", "--plot", str(path)]) == 0
    assert path.read_text().lstrip().startswith("<?xml") and "sgd" in path.read_text()


def test_module_dispatch():
    r = run_cli("config")
    assert r.returncode == 0 and "OpenMP" in r.stdout
    r = run_cli("--help")
    assert r.returncode == 0 and "bench" in r.stdout and "--version" in r.stdout
    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout == f"fastopt {fastopt.__version__}\n"
    r = run_cli("config", "--help")
    assert r.returncode == 0 and "SIMD level" in r.stdout


@pytest.mark.parametrize("args,message", [
    ((), "python -m fastopt: error: no command given (choose from bench, config, demo; "
         "see --help)"),
    (("frobnicate",), "python -m fastopt: error: unknown command 'frobnicate' (choose from "
                      "bench, config, demo, --version; see --help)"),
    (("--verbose",), "python -m fastopt: error: unknown option '--verbose'"),
    (("config", "--bogus"), "python -m fastopt config: error: unrecognized arguments: --bogus"),
    (("bench", "--threads", "x"), "python -m fastopt bench: error: argument --threads: "
                                  "invalid int value: 'x'"),
    (("demo", "--epochs", "0"), "python -m fastopt demo: error: --epochs must be >= 1, got 0"),
])
def test_module_errors_are_one_line(args, message):
    r = run_cli(*args)
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), r.stderr


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
    # no time for fastopt, so no ratio (a number with "x") anywhere in the row
    assert "FAILED" in adam_row and not any(t.endswith("x") for t in adam_row.split())
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
    assert families == ["adam", "adamw", "rmsprop", "sgd", "adagrad", "adamax", "nadam",
                        "radam", "adadelta", "asgd", "rprop", "lion", "adafactor", "optimizer",
                        "batchnorm", "batchnorm", "batchnorm", "cross_entropy", "cross_entropy",
                        "log_softmax", "log_softmax"]
    assert data["notes"] == [] or all("skipped" not in n for n in data["notes"])
    factored = data["results"][12]
    assert factored["ok"] and factored["errors"] == {}
    assert factored["extras"]["Adafactor(params).step(grads)"]["error"] is None
    model = data["results"][13]
    assert model["extras"]["loop of adam_step calls"]["error"] is None
    for r in data["results"][4:12]:               # the class, checked as the kernel is
        (extra,) = r["extras"].values()
        assert extra["error"] is None and extra["time_s"] > 0, r["family"]


@pytest.mark.parametrize("family", bench.ELEMENTWISE)
def test_every_implementation_of_an_optimizer_takes_the_same_steps(family):
    """The NumPy baselines, the kernel loop and the class of every declared
    optimizer agree over 12 float64 steps (RAdam's both branches among
    them), more than the report compares."""
    from fastopt.bench import cases
    spec = bench.OPTIMIZERS[family]
    impls = cases.optimizer_impls(spec, with_state=True)
    inputs = cases._optimizer_inputs([(37,)], np.float64, spec)
    makers = {"numpy": impls.numpy, "inplace": impls.inplace, "kernel": impls.kernel}
    if impls.cls:
        makers["class"] = impls.cls
    results = {}
    for name, make in makers.items():
        step = make(bench.fresh(inputs))
        for _ in range(12):
            out = step()
        results[name] = [np.array(a) for a in out]
    for name, out in results.items():
        for a, b, what in zip(out, results["kernel"], ("param",) + spec.slots):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15, err_msg=f"{name}: {what}")


def test_missing_family_is_skipped_with_a_note(monkeypatch, small, capsys):
    monkeypatch.delattr(fastopt, "log_softmax", raising=False)
    assert bench.main(["--quick", "--kernels", "log_softmax,sgd", "--sizes", "10"]) == 0
    out = capsys.readouterr().out
    assert "log_softmax: skipped, fastopt.log_softmax is not in this build" in out


def test_peers_absent_are_noted(monkeypatch, small, capsys):
    monkeypatch.setattr(bench.peers, "_import", lambda name: None)
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


# ------------------------------------------------------------- layout ---

ALL_LABELS = [c.label for c in bench.build_cases(list(bench.FAMILIES), bench.SIZES, False)]


def table_width(cols):
    return sum(c[2] for c in cols) + len(cols) - 1


@pytest.mark.parametrize("width", [60, 72, 80, 99, 100, 113, 160])
@pytest.mark.parametrize("threads", [1, 2])
def test_layout_fits_the_width(width, threads):
    cols = bench.layout(width, ALL_LABELS, threads)
    keys = [c[0] for c in cols]
    for key in ("case", "fastopt", "vs_numpy", "check"):      # always there
        assert key in keys
    assert keys == [c[0] for c in bench.COLUMNS if c[0] in keys]     # in table order
    if width >= 72:
        assert table_width(cols) <= width
    if width >= 113 and threads > 1:
        assert keys == [c[0] for c in bench.COLUMNS]           # everything fits
    if threads == 1:
        assert "fastopt_1t" not in keys and "scaling" not in keys
    assert ("numpy" in keys) == (width >= 72)


def test_long_labels_get_a_line_of_their_own():
    cols = bench.layout(80, ["short", "a label longer than the case column allows"], 2)
    row = bench.fmt_row({"case": "  a label longer than the case column allows",
                         "fastopt": "1 us", "check": "ok"}, cols)
    first, second = row.splitlines()
    assert first == "  a label longer than the case column allows"
    assert second.startswith(" " * cols[0][2]) and second.endswith("ok")


@pytest.mark.parametrize("columns", [80, 100, 132])
def test_every_line_fits_the_terminal(columns, monkeypatch, small, capsys):
    monkeypatch.setenv("COLUMNS", str(columns))
    assert bench.main(["--quick", "--kernels", "adam,optimizer,batchnorm", "--sizes", "1000"]) == 0
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= columns
    heading = next(line for line in out.splitlines() if line.startswith("case"))
    if columns == 80:
        assert "1 thread" not in heading and "%probe" not in heading
    if columns == 132 and fastopt.get_num_threads() > 1:
        assert heading.split() == ["case", "NumPy", "in-place", "fastopt", "1", "thread", "vs",
                                   "NumPy", "vs", "in-pl", "scaling", "GB/s", "%probe", "check"]


# ------------------------------------------------------------- verdict ---

def record(family, case, numpy_s, fastopt_s, peers=None, ok=True, **kw):
    r = {"family": family, "case": case, "ok": ok, "numpy_s": numpy_s, "fastopt_s": fastopt_s,
         "speedup_vs_numpy": numpy_s / fastopt_s, "speedup_vs_inplace": numpy_s / fastopt_s / 2,
         "scaling": 1.8, "best_s": {"fastopt": fastopt_s}, "cpu_share": {"numpy": 1.0},
         "probe_fraction": 0.3, "peers": {k: {"time_s": v, "error": None}
                                          for k, v in (peers or {}).items()}}
    r.update(kw)
    return r


QUIET = {"loadavg": 0.1, "cpu_probe": 1.0}


def test_speedups_are_geometric_means_per_family_and_peer():
    records = [record("adam", "a", 8.0, 1.0, {"torch Adam(fused=True)": 2.0}),
               record("adam", "b", 2.0, 1.0, {"torch Adam(fused=True)": 8.0}),
               record("sgd", "c", 3.0, 1.0),
               record("sgd", "d", 1e9, 1.0, ok=False)]                 # failed: not counted
    table = bench.speedups(records)
    assert table["adam"] == {"cases": 2, "numpy": pytest.approx(4.0),
                             "inplace": pytest.approx(2.0), "torch": pytest.approx(4.0)}
    assert table["sgd"] == {"cases": 1, "numpy": pytest.approx(3.0),
                            "inplace": pytest.approx(1.5)}
    assert table["all"]["cases"] == 3
    assert table["all"]["numpy"] == pytest.approx((8 * 2 * 3) ** (1 / 3))
    assert table["all"]["torch"] == pytest.approx(4.0)


def test_verdict_lists_the_cases_slower_than_numpy():
    records = [record("adam", "n=1,000", 2.0, 1.0), record("sgd", "n=10", 1.0, 2.0)]
    lines = bench.verdict(records, QUIET, 2, 2, 80)
    text = "\n".join(lines)
    assert lines[0].startswith("Verdict")
    assert "  adam" in text and "2.00x" in text and "0.50x" in text
    assert "Slower than NumPy: 1 of the 2 cases." in text
    assert "sgd n=10: 0.50x; likely:" in text
    assert max(map(len, lines)) <= 80
    assert "none of the 1 cases" in "\n".join(bench.verdict(records[:1], QUIET, 2, 2, 80))


@pytest.mark.parametrize("change,load,cause", [
    ({}, {"loadavg": 7.0, "cpu_probe": 0.4}, "the machine is busy (load average 7.0 on 2 CPUs"),
    ({}, {"loadavg": 0.2, "cpu_probe": 0.5}, "a probe thread got 50% of a CPU"),
    ({}, {"loadavg": 1.9, "cpu_probe": 1.0}, "no cause found"),   # its own threads' load
    ({"cpu_share": {"numpy": 1.0, "fastopt_1t": 0.3}}, QUIET, "the timing thread got 30%"),
    ({"cpu_share": {"numpy": 1.0, "fastopt": 0.3}}, QUIET, "no cause found"),   # waits for its team
    ({"best_s": {"fastopt": 1e-6}, "fastopt_s": 2e-6}, QUIET, "noisy timing"),
    ({"scaling": 0.5}, QUIET, "threads slow it down here (1 thread is 2.00x faster)"),
    ({"fastopt_s": 1e-6, "best_s": {"fastopt": 1e-6}}, QUIET, "mostly fixed overhead"),
    ({"probe_fraction": 0.95}, QUIET, "memory-bound"),
    ({}, QUIET, "no cause found"),
])
def test_slow_causes(change, load, cause):
    r = record("sgd", "n=10", 1.0, 2.0)
    r.update(change)
    causes = bench.slow_causes(r, load, 2, 2)
    assert any(cause in c for c in causes), causes
    if cause != "no cause found":
        assert not any("no cause found" in c for c in causes)


def test_cpu_probe_is_a_share_of_one_cpu():
    assert 0 < bench.cpu_probe(0.02) <= 1.0


def test_json_has_the_verdict(tmp_path, small):
    path = tmp_path / "bench.json"
    assert bench.main(["--quick", "--kernels", "adam,sgd", "--sizes", "100",
                       "--json", str(path)]) == 0
    data = json.loads(path.read_text())
    assert set(data["speedups"]) == {"adam", "sgd", "all"}
    assert data["speedups"]["all"]["cases"] == 2
    assert set(data["load"]) == {"loadavg", "cpu_probe"}
    for r in data["results"]:
        assert 0 < r["cpu_share"]["fastopt"] <= 1
    slower = {(s["family"], s["case"]) for s in data["slower_than_numpy"]}
    assert slower == {(r["family"], r["case"]) for r in data["results"]
                      if r["speedup_vs_numpy"] < 1}


def test_contention_adds_a_row_per_case(small, tmp_path, capsys):
    path = tmp_path / "busy.json"
    assert bench.main(["--quick", "--contention", "--kernels", "adam,sgd", "--sizes", "1000",
                       "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"--contention: each case is timed again while {bench.busy_processes()} busy" in out
    rows = [line for line in out.splitlines() if "+ every core busy:" in line]
    assert len(rows) == 2 and all("1 thread" in r and "ratio" in r for r in rows), out
    data = json.loads(path.read_text())
    assert data["contention"] is True
    for r in data["results"]:
        c = r["contention"]
        assert c["fastopt"]["time_s"] > 0 and c["fastopt_1t"]["time_s"] > 0
        assert c["ratio_to_1thread"] == c["fastopt"]["time_s"] / c["fastopt_1t"]["time_s"]


def test_contention_failure_is_reported(monkeypatch, small, capsys):
    real = fastopt.sgd_step

    def wrong_when_busy(param, *args, **kw):      # right on a quiet machine only
        real(param, *args, **kw)
        if busy_now:
            param.flat[0] += 1.0
    busy_now = False
    real_busy = bench.every_core_busy

    @contextlib.contextmanager
    def flagging_busy(n, seconds=bench.BUSY_SECONDS):
        nonlocal busy_now
        with real_busy(n, seconds):
            busy_now = True
            try:
                yield
            finally:
                busy_now = False
    monkeypatch.setattr(fastopt, "sgd_step", wrong_when_busy)
    monkeypatch.setattr(bench.timing, "every_core_busy", flagging_busy)
    assert bench.main(["--quick", "--contention", "--kernels", "sgd", "--sizes", "100"]) == 1
    out = capsys.readouterr().out
    assert "+ every core busy: FAILED param[0]" in out and "FAILED: 1 of 1 cases" in out


def psutil_children():
    """(pid, argv) of this process's children, from /proc (Linux)."""
    me, found = os.getpid(), []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
        except (OSError, ValueError, IndexError):
            continue
        if ppid == me:
            found.append((int(pid), argv))
    return found


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads /proc")
@pytest.mark.parametrize("exc", [None, RuntimeError, KeyboardInterrupt])
def test_busy_processes_are_always_reaped(exc):
    before = {pid for pid, _ in psutil_children()}
    with pytest.raises(exc) if exc else contextlib.nullcontext():
        with bench.every_core_busy(2):
            running = [pid for pid, argv in psutil_children() if pid not in before]
            assert len(running) == 2
            if exc:
                raise exc
    left = {pid for pid, _ in psutil_children()} - before
    assert not left, "busy processes left behind (running or zombie)"


def test_busy_process_stops_by_itself():
    p = subprocess.Popen([sys.executable, "-c", bench.BUSY_PROGRAM, "0.2"],
                         stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        assert p.stdout.readline().strip() == b"busy"
        assert p.wait(timeout=60) == 0      # its deadline, not a kill
    finally:
        p.kill()
        p.wait()
        p.stdout.close()
