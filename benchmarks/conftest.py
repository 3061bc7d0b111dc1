"""Shared setup of the pytest-benchmark suite (``benchmarks/test_bench_*.py``).

    pytest benchmarks --benchmark-only --benchmark-group-by=group   # side-by-side tables
    pytest benchmarks --benchmark-only --benchmark-save=base         # save a baseline
    pytest benchmarks --benchmark-only --benchmark-compare=0001      # compare with it
    pytest benchmarks --benchmark-disable -q                         # CI smoke run

Each group is one (kernel, size, dtype) with the members ``numpy`` (the
straightforward NumPy code), ``numpy_inplace`` (careful NumPy with ``out=``)
and ``fastopt``; the NumPy code is `fastopt._baselines`, the same that
``python -m fastopt bench`` times.  Every benchmarked result is checked once
against NumPy before it is timed.

Two fixtures:

* ``bench_case(case, impl, dtype=np.float32)``: benchmark implementation
  `impl` of a case of ``fastopt.bench.build_cases`` -- the same inputs,
  hyperparameters and check as the command-line report.  `impl` is a member
  ("numpy", "numpy_inplace" or "fastopt"), the name of one of the case's
  other fastopt entry points (``Work.extras``), or a factory
  ``impl(inputs) -> step`` of a variant the report does not time::

      from fastopt.bench import SIZES, build_cases
      CASES = build_cases(["adam"], SIZES, quick=False)

      @pytest.mark.parametrize("impl", ["numpy", "numpy_inplace", "fastopt"])
      @pytest.mark.parametrize("case", CASES)
      def test_adam(bench_case, case, impl):
          bench_case(case, impl)

  A case's test id is its family and a short label (``adam-1e5``,
  ``optimizer-500x1000-0.5M``, ``batchnorm-32x64x56x56-NCHW``,
  ``cross_entropy-64x50257``), so that e.g. ``-k "1e3 or 500"`` selects
  cases.  Keep ``impl`` the outer parametrize (it varies fastest): the
  float64 reference is computed once per case.

* ``check_result(got, ref, dtype)``: for hand-written benchmarks, assert that
  a result (an array or a tuple of arrays) matches a NumPy reference within
  the report's tolerance for `dtype`.
"""
import re

import numpy as np
import pytest

import fastopt
from fastopt import bench

IMPLS = {"numpy": "numpy", "numpy_inplace": "inplace", "fastopt": "fastopt"}


def pytest_benchmark_update_machine_info(config, machine_info):
    """Saved runs record fastopt's build, so --benchmark-compare compares like with like."""
    c = fastopt.config()
    machine_info["fastopt"] = {k: c[k] for k in (
        "version", "simd_level", "openmp", "openmp_version", "openmp_library",
        "num_threads", "compiler")}


def pytest_make_parametrize_id(config, val, argname):
    """Short test ids for `fastopt.bench.Case` parameters (see above)."""
    if not isinstance(val, bench.Case):
        return None
    if val.family in bench.ELEMENTWISE:
        n = val.elements
        k = len(str(n)) - 1
        return f"{val.family}-" + (f"1e{k}" if n == 10**k else str(n))
    # "(32, 64, 56, 56) NCHW" -> "32x64x56x56-NCHW", "500 x 1000 (0.5M)" -> "500x1000-0.5M"
    label = re.sub(r"\(([\d, ]+)\)", lambda m: "x".join(m.group(1).split(", ")), val.label)
    return "-".join([val.family] + re.findall(r"[\w.]+", label.replace(" x ", "x")))


def _as_tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


@pytest.fixture
def check_result():
    def check(got, ref, dtype, names=None):
        got, ref = _as_tuple(got), _as_tuple(ref)
        names = names or [f"result[{i}]" for i in range(len(ref))]
        error = bench.compare(got, bench.Reference(ref, dtype), names)
        assert error is None, error
    return check


_references = {}      # (family, label, dtype) -> float64 NumPy result; the last case only


def _reference(case, work, dtype):
    key = (case.family, case.label, dtype.name)
    if key not in _references:
        _references.clear()
        _references[key] = bench.reference(work, dtype)
    return _references[key]


@pytest.fixture
def bench_case(benchmark):
    def run(case, impl, dtype=np.float32):
        dtype = np.dtype(dtype)
        work = case.make(dtype, {})
        if callable(impl):
            factory = impl
        elif impl in IMPLS:
            factory = getattr(work, IMPLS[impl])
        else:
            factory = work.extras[impl]
        step = factory(bench.fresh(work.inputs))
        for _ in range(work.calls):
            out = step()
        error = bench.compare(out, _reference(case, work, dtype), work.names)
        assert error is None, f"{getattr(impl, '__name__', impl)}: {error}"
        benchmark.group = f"{case.family} {case.label} {dtype.name}"
        benchmark.extra_info["elements"] = case.elements
        if case.traffic:
            benchmark.extra_info["bytes"] = case.traffic * dtype.itemsize
        benchmark(step)
    return run
