"""Fused in-place updates allocate nothing the size of their arrays.

NumPy reports its data allocations to tracemalloc, so the traced peak during a
call bounds every temporary array it made."""
import tracemalloc

import numpy as np
import pytest

import fastopt

N = 1 << 20   # 4 MiB per float32 array: any temporary would show


def traced_peak(fn):
    fn()                                  # warm-up (lazy imports, caches)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        fn()
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_optimizer_steps_allocate_no_temporaries(dtype):
    rng = np.random.default_rng(0)
    p, g = rng.standard_normal(N).astype(dtype), rng.standard_normal(N).astype(dtype)
    s = [np.zeros_like(p) for _ in range(3)]
    calls = [
        lambda: fastopt.adam_step(p, g, s[0], s[1], step=3, amsgrad=True, max_exp_avg_sq=s[2]),
        lambda: fastopt.adamw_step(p, g, s[0], s[1], step=3),
        lambda: fastopt.rmsprop_step(p, g, s[0], momentum=0.9, momentum_buffer=s[1],
                                     centered=True, grad_avg=s[2]),
        lambda: fastopt.sgd_step(p, g, s[0], lr=0.1, momentum=0.9),
    ]
    for call in calls:
        assert traced_peak(call) < 64 * 1024


def test_the_measurement_sees_numpy_temporaries():
    # The textbook NumPy update makes temporaries, and tracemalloc sees them.
    p = np.ones(N, np.float32)
    assert traced_peak(lambda: np.subtract(p, 0.1 * p, out=p)) >= p.nbytes
