"""fastopt's results, pinned bit for bit.

Every case of bitpins_cases.py (functional optimizer kernels, optimizer
objects with every option, 16-bit parameters and bfloat16 state, loss
scaling, gradient clipping, lr schedules, state dicts, BatchNorm, softmax
and cross-entropy, the training helpers) is run here, on 1 thread and on the
default number of threads, and the SHA-256 of all its outputs must equal the
digest stored in tests/data/bitpins.json.

Why these digests must not move
-------------------------------
fastopt computes the same IEEE operations in the same order whatever the
build layout, SIMD level or thread count:

* the kernels are elementwise, or their reductions (norms, BatchNorm
  statistics, softmax sums) run over fixed chunks with a fixed number of
  accumulators combined in a fixed order, independent of the thread count
  and of the vector width;
* they are compiled with -ffp-contract=off (no fused multiply-adds the
  source does not ask for) and without -ffast-math (no reassociation, no
  approximate reciprocals), so each SIMD level rounds every operation as
  the scalar C code says;
* the scalars of a step (bias corrections, 1 - lr * weight_decay, ...) are
  computed in double once per step, outside the vectorized loops;
* stochastic rounding draws its bits from a counter-based hash of (seed,
  parameter, step, element), not from the order of work.

So moving code between modules or compilation units, changing how the
extension modules are built or linked, or changing how work is split
between threads cannot change a single bit: a pin that moves is a change of
numerics.  When a change of numerics is deliberate (or a case is added),
regenerate the pins with ``PYTHONPATH=src python tools/bitpins.py``, which
runs every case at every SIMD level of this CPU and on several thread
counts, and say why in the commit.

The pins were made with the NumPy and ml_dtypes versions the JSON file
names: the cases draw their inputs from NumPy's Generator, whose streams
NumPy does not promise across versions.  Cases that need ml_dtypes skip
without it.
"""
import contextlib
import json
import pathlib

import pytest

from bitpins_cases import BF16, CASES, digest, run_case
from conftest import num_threads
from fastopt import _dispatch

PINS_FILE = pathlib.Path(__file__).parent / "data" / "bitpins.json"
PINNED = json.loads(PINS_FILE.read_text())
PINS = PINNED["cases"]
REGENERATE = "PYTHONPATH=src python tools/bitpins.py"


def test_every_case_is_pinned_and_every_pin_is_a_case():
    assert not set(CASES) - set(PINS), f"cases without a pin: run {REGENERATE}"
    assert not set(PINS) - set(CASES), f"pins of cases that no longer exist: run {REGENERATE}"


@pytest.mark.parametrize("threads", [1, None], ids=["1thread", "default_threads"])
@pytest.mark.parametrize("name", list(CASES))
def test_results_are_bit_identical_to_the_pins(name, threads):
    if CASES[name].bf16 and BF16 is None:
        pytest.skip("ml_dtypes (fastopt[bf16]) not installed")
    pin = PINS.get(name)
    if pin is None:
        pytest.fail(f"{name} has no pin: run {REGENERATE}")
    if isinstance(pin, dict):             # a case pinned per SIMD level
        if _dispatch.LEVEL not in pin:
            pytest.skip(f"{name} is pinned per level, not for {_dispatch.LEVEL}")
        pin = pin[_dispatch.LEVEL]
    with num_threads(1) if threads == 1 else contextlib.nullcontext():
        got = digest(run_case(name))
    assert got == pin, (
        f"{name}: the results at SIMD level {_dispatch.LEVEL} differ from the pinned ones "
        f"(made with NumPy {PINNED['numpy']}, ml_dtypes {PINNED['ml_dtypes']}).  A change of "
        f"numerics must be deliberate: then run {REGENERATE}")
