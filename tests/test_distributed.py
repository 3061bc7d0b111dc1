"""fastopt.distributed in one process, and the launch of its MPI tests.

The pieces that need no MPI are tested here directly (the sampler, the
optimizer hooks, the clipping hook, the thread cap, the lazy import; on one
rank in a subprocess, shard mode's refusal of Adafactor).  The
tests that need several ranks are in tests/mpi; the last tests here run
them under ``mpiexec -n 2`` and ``-n 3`` through tools/run_mpi_tests.py,
and jobs with a fault on one rank (tests/mpi/cases/faults.py), which must
end within seconds, with the same error on every rank where the ranks
called different operations (skipped without mpi4py and mpiexec).
"""
import math
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

import fastopt
from conftest import Snapshot
from fastopt import _config, _runtime
from fastopt.distributed import DistributedSampler

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNER = os.path.join(ROOT, "tools", "run_mpi_tests.py")


def run_python(code, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **env})


# ---------------------------------------------------------- lazy import ---

def test_import_does_not_import_mpi4py():
    r = run_python("import sys, fastopt.distributed; print('mpi4py' in sys.modules)")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


def test_without_mpi4py_a_clear_error_and_the_sampler_still_works():
    code = """
import sys
sys.modules["mpi4py"] = None            # as if not installed
import numpy as np, fastopt
from fastopt.distributed import DistributedOptimizer, DistributedSampler
print(DistributedSampler(5, rank=1, num_replicas=2, shuffle=False).indices(0).tolist())
try:
    DistributedOptimizer(fastopt.SGD([np.zeros(3)], lr=0.1))
except ImportError as e:
    print(e)
"""
    r = run_python(code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "[1, 3, 0]",
        'fastopt.distributed needs mpi4py and an MPI library: pip install "fastopt[mpi]"']


# -------------------------------------------------------------- sampler ---

def test_sampler_splits_one_permutation_like_pytorch():
    shares = [DistributedSampler(10, rank=r, num_replicas=3, seed=5).indices(2) for r in range(3)]
    perm = np.random.default_rng([5, 2]).permutation(10)
    padded = np.concatenate([perm, perm[:2]])           # 12 = 3 * ceil(10 / 3)
    for r in range(3):
        np.testing.assert_array_equal(shares[r], padded[r::3])
        assert shares[r].dtype == np.int64
    dropped = [DistributedSampler(10, rank=r, num_replicas=3, seed=5, drop_last=True).indices(2)
               for r in range(3)]
    np.testing.assert_array_equal(np.sort(np.concatenate(dropped)), np.sort(perm[:9]))
    ordered = DistributedSampler(7, rank=0, num_replicas=2, shuffle=False)
    assert ordered.indices(0).tolist() == [0, 2, 4, 6] and len(ordered) == 4
    assert DistributedSampler(0, rank=0, num_replicas=2).indices(0).size == 0


def test_sampler_batches_are_the_single_process_batches():
    """P ranks taking batches of b give exactly the rows of the one-process
    batches of P*b of the same permutation."""
    P, b, n = 3, 4, 48
    one = DistributedSampler(n, rank=0, num_replicas=1, seed=9).indices(1)
    parts = [DistributedSampler(n, rank=r, num_replicas=P, seed=9).indices(1) for r in range(P)]
    for k in range(n // (P * b)):
        together = np.concatenate([p[k * b:(k + 1) * b] for p in parts])
        assert sorted(together) == sorted(one[k * P * b:(k + 1) * P * b])


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(num_examples=-1, rank=0, num_replicas=1), ValueError, "num_examples must be >= 0"),
    (dict(num_examples=3.0, rank=0, num_replicas=1), TypeError, "num_examples must be an integer"),
    (dict(num_examples=3, rank=2, num_replicas=2), ValueError, "rank must be < num_replicas"),
    (dict(num_examples=3, rank=0, num_replicas=0), ValueError, "num_replicas must be >= 1"),
    (dict(num_examples=3, rank=0), TypeError, "pass both rank and num_replicas"),
])
def test_sampler_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        DistributedSampler(**kwargs)


def test_minibatches_over_given_indices(rng):
    X = rng.standard_normal((10, 3))
    y = np.arange(10)
    idx = np.array([7, 2, 9, 4, 0])
    batches = list(fastopt.minibatches(X, y, 2, indices=idx, shuffle=False, copy=True))
    assert [yb.tolist() for _, yb in batches] == [[7, 2], [9, 4], [0]]
    np.testing.assert_array_equal(batches[0][0], X[[7, 2]])
    shuffled = [yb for _, yb in fastopt.minibatches(X, y, 5, indices=idx, rng=0)]
    assert sorted(shuffled[0].tolist()) == sorted(idx.tolist())
    with pytest.raises(ValueError, match=r"row numbers in \[0, 10\)"):
        fastopt.minibatches(X, y, 2, indices=[3, 10])
    with pytest.raises(TypeError, match="1-D array of integers"):
        fastopt.minibatches(X, y, 2, indices=[0.5])


# ------------------------------------------------------ optimizer hooks ---

def test_with_params_copies_groups_and_state_layout(rng):
    params = [rng.standard_normal((4, 5)), rng.standard_normal(3), rng.standard_normal(6)]
    opt = fastopt.SGD([{"params": params[:2], "momentum": 0.9},
                       {"params": params[2:], "lr": 0.5}], lr=0.1)
    opt.param_groups[0]["momentum"] = 0.0            # changed after construction
    views = [p.reshape(-1)[1:3] for p in params]
    new = opt.with_params(views)
    assert type(new) is fastopt.SGD
    assert [g["lr"] for g in new.param_groups] == [0.1, 0.5]
    assert [list(st) for st in new.state] == [["momentum_buffer"]] * 2 + [[]]
    assert new.state[0]["momentum_buffer"].shape == (2,)
    new.param_groups[0]["momentum"] = 0.9            # the buffer is still there
    before = [p.copy().reshape(-1) for p in params]
    new.step([np.ones(2)] * 3)                       # first momentum step: buffer = g
    for p, b, lr in zip(params, before, [0.1, 0.1, 0.5]):
        b[1:3] -= lr                                 # the views' elements, and only those
        np.testing.assert_array_equal(p.reshape(-1), b)
    with pytest.raises(ValueError, match="expected 3 arrays"):
        opt.with_params(views[:2])


def test_adamw_with_params_keeps_decoupled_weight_decay(rng):
    p = rng.standard_normal(8)
    q = p.copy()
    opt = fastopt.AdamW([p], lr=0.1, weight_decay=0.5, amsgrad=True)
    new = opt.with_params([q])
    g = rng.standard_normal(8)
    opt.step([g])
    new.step([g])
    np.testing.assert_array_equal(p, q)
    assert "max_exp_avg_sq" in new.state[0]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_with_params_sr_keys_give_slices_the_bits_of_the_whole(dtype, rng):
    """Two optimizers over the halves of one parameter, keyed by their place in
    it, round bfloat16 state stochastically as the optimizer of the whole
    does; the keys survive a rebinding of the state (an assigned array)."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    dt = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(np.float32)
    p = rng.standard_normal(300).astype(dt)
    whole = fastopt.Adam([p], lr=1e-2, amsgrad=True, state_dtype="bfloat16", seed=3)
    q = p.copy()
    halves = [q[:131], q[131:]]
    first = whole.with_params([halves[0]], _sr_keys=[(0, 0)])
    second = whole.with_params([halves[1]], _sr_keys=[(0, 131)])
    unkeyed = whole.with_params([q[131:].copy()])
    for t in range(6):
        g = rng.standard_normal(300).astype(np.float32)
        whole.step([g])
        first.step([g[:131]])
        second.step([g[131:]])
        unkeyed.step([g[131:]])
        if t == 2:          # rebinds the native step to the state it holds
            second.state[0]["exp_avg"] = second.state[0]["exp_avg"].copy()
    np.testing.assert_array_equal(q.view(np.uint8), p.view(np.uint8))
    for name, arr in whole.state[0].items():
        both = np.concatenate([first.state[0][name], second.state[0][name]])
        np.testing.assert_array_equal(both.view(np.uint8), arr.view(np.uint8), err_msg=name)
    # Without the keys the second half draws other bits.
    assert not np.array_equal(unkeyed.state[0]["exp_avg_sq"].view(np.uint16),
                              second.state[0]["exp_avg_sq"].view(np.uint16))


def test_check_state_dict_changes_nothing(rng):
    params = [rng.standard_normal(5)]
    opt = fastopt.Adam(params, lr=0.1)
    opt.step([np.ones(5)])
    sd = opt.state_dict()
    sd["param_groups.0.lr"] = 0.25
    other = fastopt.Adam([params[0].copy()], lr=0.1)
    snap = Snapshot(*other.state[0].values())
    groups, steps, arrays, rounding = other.check_state_dict(sd)
    assert groups[0]["lr"] == 0.25 and groups[0]["params"][0] is other.param_groups[0]["params"][0]
    assert steps.tolist() == [1]
    for name in ("exp_avg", "exp_avg_sq"):      # private copies of what was checked
        key = f"state.0.{name}"
        np.testing.assert_array_equal(arrays[key], sd[key])
        assert not np.shares_memory(arrays[key], sd[key])
    snap.assert_unchanged()
    assert other.param_groups[0]["lr"] == 0.1 and other.steps.tolist() == [0]
    del sd["state.0.exp_avg"]
    with pytest.raises(ValueError, match="missing 'state.0.exp_avg'"):
        other.check_state_dict(sd)


def test_check_param_groups(rng):
    opt = fastopt.RMSprop([rng.standard_normal(3)])
    opt.check_param_groups()
    opt.param_groups[0]["alpha"] = 1.5
    with pytest.raises(ValueError, match="alpha"):
        opt.check_param_groups()


def test_shard_mode_refuses_adafactor_and_changes_nothing():
    """One rank (MPI's singleton start, in a subprocess: no mpiexec needed):
    shard=True refuses Adafactor, whose factored state does not cut into
    element slices, with a ValueError saying why and what to use, and
    changes nothing; replicated mode then steps as one process does."""
    pytest.importorskip("mpi4py")
    code = """
import numpy as np, fastopt
from fastopt.distributed import DistributedOptimizer

def model():
    rng = np.random.default_rng(0)
    return [rng.standard_normal(s) for s in [(), (4,), (3, 5), (2, 3, 4)]]

def same(a, b):         # bit for bit (eps[0] None is saved as NaN)
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()

def grads(t):
    rng = np.random.default_rng(t)
    return [rng.standard_normal(p.shape) for p in params]

params, ref_p = model(), model()
opt, ref = fastopt.Adafactor(params, lr=0.05), fastopt.Adafactor(ref_p, lr=0.05)
opt.step(grads(0)); ref.step(grads(0))
before_p, before_sd = [p.copy() for p in params], opt.state_dict()
try:
    DistributedOptimizer(opt, shard=True)
except ValueError as e:
    print(e)
after = opt.state_dict()
print(all(same(a, b) for a, b in zip(params, before_p)) and after.keys() == before_sd.keys()
      and all(same(after[k], before_sd[k]) for k in after))
dopt = DistributedOptimizer(opt, shard=False)
for t in range(1, 6):
    dopt.step(grads(t)); ref.step(grads(t))
print(all(same(a, b) for a, b in zip(params, ref_p)),
      dopt.local_optimizer.state[3]["row_var"].shape)
"""
    r = run_python(code)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("shard=True does not support Adafactor: its second-moment "
                               "statistics (row_var, col_var) are factored over whole rows "
                               "and columns of each parameter")
    assert "use shard=False (replicated mode" in lines[0]
    assert lines[0].endswith("(on rank 0)")
    assert lines[1:] == ["True", "True (2, 3, 1)"]


# --------------------------------------------------------- clip across ---

@pytest.mark.parametrize("p", [2.0, 1.0, math.inf, 3.0])
def test_clip_grad_norm_allgather_combines_parts(p, rng):
    """Three 'processes' holding parts of the gradients: each gets the norm
    of all the parts together and clips its own part."""
    whole = [rng.standard_normal(40_000), rng.standard_normal((30, 7))]
    parts = [[whole[0][:15_000]], [whole[0][15_000:], whole[1][:10]], [whole[1][10:]]]
    partials = []
    for part in parts:          # first pass: collect each part's partial
        fastopt.clip_grad_norm_([a.copy() for a in part], 1e300, p,
                                allgather=lambda x: partials.append(x) or [x])
    ref = [a.copy() for a in whole]
    want = fastopt.clip_grad_norm_(ref, 1.0, p)
    for part in parts:
        got = fastopt.clip_grad_norm_(part, 1.0, p, allgather=lambda x: list(partials))
        assert got == pytest.approx(want, rel=1e-14)
    np.testing.assert_allclose(whole[0], ref[0], rtol=1e-14)
    np.testing.assert_allclose(whole[1], ref[1], rtol=1e-14)


def test_clip_grad_norm_allgather_propagates_nan():
    g = [np.ones(4)]
    assert math.isnan(fastopt.clip_grad_norm_(g, 1.0, allgather=lambda x: [x, math.nan]))
    g = [np.ones(4)]
    assert math.isnan(fastopt.clip_grad_norm_(g, 1.0, math.inf,
                                              allgather=lambda x: [math.nan, x]))


# -------------------------------------------------------------- threads ---

@pytest.fixture
def restore_threads():
    yield
    _config._set_default_cap(0, None)
    fastopt.set_num_threads(None)


def test_default_thread_cap_and_what_overrides_it(restore_threads, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    full = fastopt.get_num_threads()
    _config._set_default_cap(1, "2 MPI ranks share this node's 2 CPUs")
    assert fastopt.get_num_threads() == 1
    assert "default cap: 2 MPI ranks share this node's 2 CPUs" in _show()
    fastopt.set_num_threads(2)                       # the user's choice wins
    assert fastopt.get_num_threads() == min(2, _runtime.max_threads())
    assert "default cap" not in _show()
    fastopt.set_num_threads(None)                    # back to the default cap
    assert fastopt.get_num_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "2")       # so does OMP_NUM_THREADS
    assert fastopt.get_num_threads() == full
    assert fastopt.config()["thread_cap_reason"] is None


def _show():
    import io
    buf = io.StringIO()
    fastopt.show_config(file=buf)
    return buf.getvalue()


# ------------------------------------------------------- the MPI tests ---

def _mpi_runner():
    """The runner, or a skip (a failure where FASTOPT_REQUIRE_MPI is set, as in CI)."""
    missing = None
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        missing = 'needs mpi4py (pip install "fastopt[mpi]")'
    if not missing and not (shutil.which("mpiexec")
                            or shutil.which("mpiexec", path=os.path.dirname(sys.executable))):
        missing = "needs mpiexec (an MPI library)"
    if not missing and not os.path.exists(RUNNER):
        missing = "needs the source tree's tools/run_mpi_tests.py"
    if missing:
        if os.environ.get("FASTOPT_REQUIRE_MPI"):
            pytest.fail(f"FASTOPT_REQUIRE_MPI is set but this {missing}")
        pytest.skip(missing)
    return RUNNER


@pytest.mark.slow
@pytest.mark.parametrize("n", [2, 3])
def test_mpi_tests_pass_on_n_ranks(n):
    runner = _mpi_runner()
    r = subprocess.run([sys.executable, runner, "-n", str(n), "--timeout", "900"],
                       capture_output=True, text=True, timeout=1000)
    assert r.returncode == 0, (r.stdout + r.stderr)[-30000:]
    assert f"mpiexec -n {n}: every rank passed" in r.stdout


@pytest.mark.slow
def test_mpi_runner_fails_when_one_rank_fails_or_hangs():
    runner = _mpi_runner()
    cases = os.path.join(ROOT, "tests", "mpi", "cases")
    r = subprocess.run([sys.executable, runner, "-n", "2", "--timeout", "60", "--",
                        "-q", os.path.join(cases, "case_fail.py")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert "rank 0: exit status 0" in r.stdout and "rank 1: exit status 1" in r.stdout
    assert "deliberate failure on the last rank" in r.stdout
    assert "FAILED: rank 1: exit status 1" in r.stdout
    # The last rank skips a barrier: once it has waited --grace seconds for
    # the others, it has them print their stacks and ends the job.
    r = subprocess.run([sys.executable, runner, "-n", "2", "--timeout", "60", "--grace", "3",
                        "--", "-q", os.path.join(cases, "case_hang.py")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert "rank 1 finished (exit status 0) but rank(s) 0 did not within 3 s" in r.stdout
    assert "FAILED: rank 0: no exit status (crashed or killed)" in r.stdout
    assert "timed out" not in r.stdout
    assert "test_last_rank_skips_a_barrier" in r.stdout    # the hung rank's stack
    # With a longer grace, the timeout ends it.
    r = subprocess.run([sys.executable, runner, "-n", "2", "--timeout", "12", "--grace", "60",
                        "--", "-q", os.path.join(cases, "case_hang.py")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert "FAILED: timed out after 12.0 s (killed)" in r.stdout
    assert "test_last_rank_skips_a_barrier" in r.stdout


# ------------------------------------------------- jobs with a fault ---

FAULTS = os.path.join(ROOT, "tests", "mpi", "cases", "faults.py")


def _run_faults(scenario, n=2):
    """tests/mpi/cases/faults.py `scenario` on `n` ranks: (runner's exit
    status, its output, each rank's output).  The job must end within 10 s
    of the fault on every rank (mpiexec returns when all ranks have ended)."""
    runner = _mpi_runner()
    r = subprocess.run([sys.executable, runner, "-n", str(n), "--timeout", "60", "--script",
                        FAULTS, "--", scenario], capture_output=True, text=True, timeout=90)
    ended = time.time()
    assert "timed out" not in r.stdout, r.stdout[-5000:]
    faults = [float(t) for t in re.findall(r"^fault at ([\d.]+)$", r.stdout, re.M)]
    assert faults, r.stdout[-5000:]
    assert ended - max(faults) < 10, f"the job ended {ended - max(faults):.1f} s after the fault"
    parts = re.split(r"^----- mpiexec -n \d+ \S+ \S+, rank (\d+): .* -----$", r.stdout,
                     flags=re.M)
    logs = {int(rank): text for rank, text in zip(parts[1::2], parts[2::2])}
    assert sorted(logs) == list(range(n)), r.stdout[-5000:]
    return r.returncode, r.stdout, logs


@pytest.mark.parametrize("scenario,expect", [
    ("raise-between", ["RuntimeError: deliberate failure between reduce and step on rank 1",
                       "MPI_Abort(MPI_COMM_WORLD, 1)"]),
    ("sigint-between", ["KeyboardInterrupt", "MPI_Abort(MPI_COMM_WORLD, 130)"]),
    ("raise-in-step", ["RuntimeError: deliberate failure in the update on rank 1",
                       "fastopt.distributed: DistributedOptimizer.step(grads) failed on rank 1"]),
    ("sigint-in-step", ["KeyboardInterrupt",
                        "fastopt.distributed: DistributedOptimizer.step(grads) failed on rank 1"]),
])
def test_a_fault_on_one_rank_ends_the_whole_job(scenario, expect):
    """Between reduce and step, `python -m mpi4py` ends the job; inside a
    collective call, fastopt aborts it itself (the script there catches the
    errors of step and would go on)."""
    rc, out, logs = _run_faults(scenario)
    assert rc == 1, out[-5000:]
    assert "FAILED: rank 0: no exit status (crashed or killed)" in out
    for text in expect:
        assert text in logs[1], logs[1]
    assert "going on" not in out and "the job went on" not in out


@pytest.mark.parametrize("n", [2, 3])
def test_different_operations_raise_the_same_error_on_every_rank(n):
    rc, out, logs = _run_faults("mismatches", n)
    assert rc == 0, out[-5000:]
    errors = [re.findall(r"^error: (.*)$", logs[r], re.M) for r in range(n)]
    assert all(e == errors[0] for e in errors), errors
    others = "rank 1" if n == 2 else "ranks 1, 2"
    want = [("DistributedOptimizer.state_dict()", "DistributedOptimizer.step(grads)"),
            ("DistributedOptimizer.clip_grad_norm_(...)", "DistributedOptimizer.step()"),
            ("DistributedSampler(...)", "DistributedOptimizer.step(grads)"),
            ("DistributedOptimizer.reduce(grads)", "DistributedOptimizer.step(grads)"),
            ("DistributedOptimizer.load_state_dict(...)", "DistributedOptimizer.state_dict()")] * 2
    assert errors[0] == [f"RuntimeError: ranks called different collective operations: {a} "
                         f"(on rank 0); {b} (on {others}); every rank must make the same "
                         "collective calls in the same order" for a, b in want]
    for r in range(n):
        assert logs[r].count("still in step: True") == 2, logs[r]
