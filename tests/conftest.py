"""Shared test helpers: sizes that hit SIMD tails and thread boundaries, dtypes,
thread-count control, and snapshots for "nothing changed" assertions."""
import contextlib

import numpy as np
import pytest

import fastopt

# 0 and 1 (degenerate), 7/8/15/16/17 (SIMD tails around 8- and 16-lane vectors),
# 1000 (below the threading threshold), 1_000_003 (several threads, odd tail).
SIZES = [0, 1, 7, 8, 15, 16, 17, 1000, 1_000_003]
DTYPES = [np.float32, np.float64]


def tol(dtype):
    """Relative/absolute tolerance for comparing against a float64 reference."""
    return dict(rtol=2e-5, atol=1e-6) if np.dtype(dtype) == np.float32 else dict(rtol=1e-12, atol=1e-14)


@contextlib.contextmanager
def num_threads(n):
    """Run fastopt's kernels on at most n threads (OpenMP limit and fastopt's cap)."""
    from threadpoolctl import threadpool_limits
    old = fastopt.get_num_threads()
    with threadpool_limits(limits=n, user_api="openmp"):
        fastopt.set_num_threads(n)
        try:
            yield
        finally:
            fastopt.set_num_threads(0)
    assert fastopt.get_num_threads() == old


class Snapshot:
    """Copies of arrays, to assert later that none of them changed."""

    def __init__(self, *arrays):
        self.arrays = [a for a in arrays if isinstance(a, np.ndarray)]
        self.copies = [a.copy() for a in self.arrays]

    def assert_unchanged(self):
        for a, c in zip(self.arrays, self.copies):
            np.testing.assert_array_equal(a, c)


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


def pytest_terminal_summary(terminalreporter):
    """The adversarial cases of test_fuzz_api.py, counted (when it ran)."""
    import sys
    fuzz = sys.modules.get("test_fuzz_api")
    if fuzz is None or not fuzz.COUNTS["cases"]:
        return
    c = fuzz.COUNTS
    bad = c["accepted"] + c["wrong error"] + c["changed"] + c["misread"]
    terminalreporter.write_line(
        f"fuzz_api: {c['cases']} adversarial cases: {c['refused']} refused with "
        f"TypeError/ValueError/IndexError and nothing changed, {c['converted']} equivalent "
        f"inputs accepted with the plain call's bits; {bad} failed (accepted {c['accepted']}, "
        f"other exception {c['wrong error']}, changed an array {c['changed']}, misread "
        f"{c['misread']}); a crash or hang would have stopped the run")


def write_fuzz_counts(request, name, counts):
    """Print a fuzz module's counts after its tests (even under -q)."""
    if not counts["cases"]:
        return
    failed = sum(v for k, v in counts.items() if k.startswith("FAILED"))
    lines = [f"{name}: {counts['cases']} cases, {failed} failed (a crash or hang would "
             "have stopped the run):"]
    lines += [f"  {k}: {v}" for k, v in sorted(counts.items()) if k != "cases"]
    plugins = request.config.pluginmanager
    terminal, capture = plugins.get_plugin("terminalreporter"), plugins.get_plugin("capturemanager")
    if terminal is None or capture is None:
        return
    with capture.global_and_fixture_disabled():
        terminal.write_line("")
        for line in lines:
            terminal.write_line(line)
