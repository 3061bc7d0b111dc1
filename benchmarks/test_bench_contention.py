"""fastopt's threads while other processes keep every core busy, float32.

``adam_step`` on 1e5 elements and ``Adam.step`` over 500 arrays of 1000:
one group per case, with fastopt on its default threads and on 1 thread, on
the machine as it is (``quiet``) and while busy processes, one per core,
keep every core busy (``busy``; started and stopped by each benchmark, as
``python -m fastopt bench --contention`` does).  Targets: busy, the
default-thread median within 1.5x of the 1-thread median; quiet, the
default threads at least 1.5x faster than 1 thread (on 2 or more cores).

    PYTHONPATH=src python -m pytest benchmarks/test_bench_contention.py --benchmark-only \\
        --benchmark-group-by=group --benchmark-columns=median,iqr,mean,rounds
"""
import contextlib

import numpy as np
import pytest

from fastopt import bench

DTYPE = np.dtype(np.float32)
CASES = (bench.build_cases(["adam"], [100_000], quick=False)
         + [c for c in bench.build_cases(["optimizer"], [], quick=False)
            if c.label.startswith("500 x 1000")])


@pytest.mark.parametrize("threads", ["default_threads", "1_thread"])
@pytest.mark.parametrize("machine", ["quiet", "busy"])
@pytest.mark.parametrize("case", CASES)
def test_contention(benchmark, case, machine, threads):
    work = case.make(DTYPE, {})
    step = work.fastopt(bench.fresh(work.inputs))
    with bench.fastopt_threads(1 if threads == "1_thread" else 0):
        for _ in range(work.calls):
            out = step()
        error = bench.compare(out, bench.reference(work, DTYPE), work.names)
        assert error is None, error
        benchmark.group = f"contention: {case.family} {case.label} {DTYPE.name}"
        benchmark.extra_info["busy_processes"] = bench.busy_processes() if machine == "busy" else 0
        busy = (bench.every_core_busy(bench.busy_processes()) if machine == "busy"
                else contextlib.nullcontext())
        with busy:
            benchmark(step)
