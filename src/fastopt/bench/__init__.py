"""``python -m fastopt bench``: fastopt against NumPy (and optional peers) on this machine.

Every case times three ways of doing the same work: the straightforward
NumPy code, careful in-place NumPy (both from `fastopt._baselines`), and
fastopt; optionally fastopt on one thread (scaling), other fastopt entry
points, and PyTorch/numba (``--peers``).  Each result is compared with a
float64 run of the straightforward NumPy code on the same inputs before it
is timed; a mismatch is reported as FAILED (no time shown) and the exit code
is 1.  Bad command-line input exits with code 2 and a one-line message.

Design
------
* A `Case` is (family, label, make, traffic): ``make(dtype, peers)`` builds a
  `Work` (input arrays and implementation factories); ``traffic`` counts the
  compulsory memory traffic in elements (every input read once, every output
  written once), or is None for kernels that are not memory-bound.
* An implementation is a factory ``impl(state) -> step``: it binds fresh
  copies of the inputs once, and ``step()`` does one unit of work and returns
  the result arrays.  Optimizer steps alternate between two gradients so the
  compared result depends on every hyperparameter.  The optimizers are
  declared once (`OPTIMIZERS`: kernel, NumPy baselines, hyperparameters,
  state), and one factory makes all their implementations from that.
* Times are medians of samples of repeated calls (`measure`); the JSON
  output also has the fastest sample (useful on a busy machine).
* The table fits the terminal (`layout` drops the least useful columns on a
  narrow one), and the report ends with a `verdict`: per family, the
  geometric-mean speedup over NumPy and over each peer, and every case where
  fastopt was slower than NumPy with its likely cause (`slow_causes`).

Modules: `settings` (families, sizes, shapes, hyperparameters), `cases`
(inputs and implementations), `peers` (PyTorch, numba), `lowprec` (the
``--dtype float16|bfloat16`` report), `timing` (timing, checking,
contention), `report` (table, verdict, header, chart), `cli` (`main`).
The names below are re-exported for the tests and benchmarks; to replace
one for a test, replace it in the module that defines it (e.g.
``fastopt.bench.settings.MODELS``, ``fastopt.bench.timing.measure``).
"""
from .cases import OPTIMIZERS, Case, OptimizerSpec, Work, build_cases
from .cases import _fastopt_torch_adam  # noqa: F401  (benchmarks/test_bench_torch.py)
from .cli import main
from .lowprec import LowpCase, half_dtype, lowp_cases, run_lowp
from .peers import available_peers
from .report import (COLUMNS, contention_lines, cpu_probe, fmt_ratio, fmt_row, fmt_time, layout,
                     machine_load, slow_causes, speedups, summarize, verdict)
from .settings import (BN_SHAPES, ELEMENTWISE, EPS_BN, FAMILIES, MODELS, QUICK_SIZES, SIZES,
                       SOFTMAX_SHAPES, BadInput, resnet18_shapes)
from .timing import (BUSY_PROGRAM, BUSY_SECONDS, Reference, Result, busy_processes, compare,
                     every_core_busy, fastopt_threads, fresh, measure, measure_pair,
                     probe_bandwidth, reference, run_case, run_contention)

__all__ = [
    "main", "OPTIMIZERS", "OptimizerSpec", "Case", "Work", "build_cases", "LowpCase",
    "half_dtype", "lowp_cases", "run_lowp", "available_peers", "COLUMNS", "contention_lines",
    "cpu_probe", "fmt_ratio", "fmt_row", "fmt_time", "layout", "machine_load", "slow_causes",
    "speedups", "summarize", "verdict", "BN_SHAPES", "ELEMENTWISE", "EPS_BN", "FAMILIES",
    "MODELS", "QUICK_SIZES", "SIZES", "SOFTMAX_SHAPES", "BadInput", "resnet18_shapes",
    "BUSY_PROGRAM", "BUSY_SECONDS", "Reference", "Result", "busy_processes", "compare",
    "every_core_busy", "fastopt_threads", "fresh", "measure", "measure_pair", "probe_bandwidth",
    "reference", "run_case", "run_contention",
]
