"""BatchNorm training forward + backward: fastopt against NumPy, float32.

The ``batchnorm`` cases of ``python -m fastopt bench``: (32, 64, 56, 56) and
(8, 256, 28, 28) NCHW, (256, 512), and (32, 56, 56, 64) NHWC (channel axis
-1).  Members:

* ``numpy``, ``numpy_inplace``: see conftest.py;
* ``fastopt``: the fused kernels writing into reused y and dx (``out=``,
  ``dx_out=``), as a training loop would;
* ``fastopt_alloc``: the same with fresh y and dx arrays every call (their
  first-touch page faults included).

    PYTHONPATH=src python -m pytest benchmarks/test_bench_batchnorm.py --benchmark-only \\
        --benchmark-group-by=group --benchmark-columns=median,iqr,rounds
"""
import pytest

import fastopt
from fastopt import bench

CASES = bench.build_cases(["batchnorm"], [], quick=False)
# build_cases keeps the order of BN_SHAPES: (shape, channel axis, in --quick)
assert len(CASES) == len(bench.BN_SHAPES)
AXIS = {case.label: axis for case, (_, axis, _) in zip(CASES, bench.BN_SHAPES)}


def fastopt_alloc(axis):
    """The report's fastopt step, but with new output arrays on every call."""
    def impl(s):
        x, gamma, beta, dy = s["x"], s["gamma"], s["beta"], s["dy"]

        def step():
            y, ctx = fastopt.batch_norm_forward(x, gamma, beta, eps=bench.EPS_BN, axis=axis)
            return (y,) + tuple(fastopt.batch_norm_backward(dy, ctx))
        return step
    return impl


@pytest.mark.parametrize("impl", ["numpy", "numpy_inplace", "fastopt", "fastopt_alloc"])
@pytest.mark.parametrize("case", CASES)
def test_batchnorm(bench_case, case, impl):
    bench_case(case, fastopt_alloc(AXIS[case.label]) if impl == "fastopt_alloc" else impl)
