"""fastopt.distributed with Adafactor, on several ranks.

Adafactor's state is not elementwise (a row and a column of second-moment
statistics per matrix of a parameter, the norms of whole parameters in its
update), so it works in replicated mode only: every rank steps the whole
model with the mean gradient, each parameter in its own shape.  The
reference is one process stepping with the mean gradient, bit for bit: the
gradients of `exact_grads` have a mean that is exact for any number of
ranks, so one reference serves 1, 2, ... P ranks (sub-communicators).
Random gradients, whose mean rounds, are checked against the mean summed
in NumPy.  Shard mode refuses Adafactor on every rank, with nothing changed.

As in the other MPI tests, every rank runs every test and the assertions
come after the test's collectives, on values gathered from every rank.
"""
import numpy as np
import pytest

import fastopt
from .mpihelp import (MPI, RANK, WORLD, assert_none, differences, DistributedOptimizer,
                      goes_on_as, load_saved, make_params, mean_grads, rank_grads, run,
                      same_on_every_rank, saved_on, sd_differences, sub, with_groups)

P = WORLD.size

# 0-d and 1-d parameters (one `variance` each), 2-d and 3-d ones (`row_var`
# and `col_var`), empty ones whose factored state is not (a (0, 4) matrix
# has a column of 4), a column vector (7, 1, 2) and a matrix large enough
# for several threads' chunks.
SHAPES = [(), (0,), (1,), (17,), (3, 5), (0, 4), (7, 1, 2), (33, 31), (2, 3, 5), (2, 0, 3)]
OPTIONS = [
    pytest.param(dict(lr=0.05), id="defaults"),
    pytest.param(dict(lr=0.05, beta2_decay=-0.5, eps=(1e-6, 1e-2), d=2.0,
                      weight_decay=0.1, maximize=True), id="options"),
]


def params_(dtype, seed=0):
    return make_params(SHAPES, (dtype,), seed)


def build(kw, params):
    """Adafactor over two param groups (the second at half the lr)."""
    return with_groups(fastopt.Adafactor, kw, params)


def factored(sd):
    """The shapes of the factored statistics in a state dict (what must not be 1-D views)."""
    return {k: v.shape for k, v in sd.items() if k.endswith(("row_var", "col_var"))}


@pytest.mark.parametrize("kw", OPTIONS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
def test_replicated_gives_one_processs_bits_on_any_number_of_ranks(dtype, kw):
    """On 1, 2, ..., P ranks, parameters of 0 to 3 dimensions in two groups,
    None gradients and an lr change at step 7: the parameters on every rank
    and the whole state dict (the factored statistics in their shapes, the
    step counts) of one process stepping with the mean gradient, bit for
    bit."""
    ref_p = params_(dtype)
    ref = build(kw, ref_p)
    run(ref, ref_p, range(16), MPI.COMM_SELF)
    ref_sd = ref.state_dict()
    problems = []
    for n in range(1, P + 1):
        comm = sub(n)
        if comm == MPI.COMM_NULL:
            continue
        params = params_(dtype)
        dopt = DistributedOptimizer(build(kw, params), comm, shard=False)
        run(dopt, params, range(16), comm)
        sd = dopt.state_dict()
        everywhere = same_on_every_rank(params, comm)
        comm.Free()
        if not everywhere:
            problems.append(f"{n} rank(s): the parameters differ across ranks")
        problems += differences(params, ref_p, f"{n} rank(s): params")
        problems += sd_differences(sd, ref_sd, f"{n} rank(s): state_dict")
    assert_none(problems)
    assert factored(ref_sd)["state.4.row_var"] == (3, 1)
    assert factored(ref_sd)["state.5.col_var"] == (1, 4)
    assert factored(ref_sd)["state.8.col_var"] == (2, 1, 5)
    moved = [not np.array_equal(a, b) for a, b in zip(ref_p, params_(dtype))]
    assert sum(moved) >= 6


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
def test_random_gradients_match_one_process_on_their_mean(dtype):
    """Gradients whose mean rounds: one process stepping with their mean
    (summed in rank order, divided by P) to the rounding of the reduction
    (bit for bit on 2 ranks, where the sum has one order), the same bits on
    every rank."""
    ref_p, params = params_(dtype), params_(dtype)
    ref = build({"lr": 0.05}, ref_p)
    dopt = DistributedOptimizer(build({"lr": 0.05}, params), shard=False)
    for t in range(12):
        none = {2} | ({t % len(params)} if t % 4 == 0 else set())
        ref.step(mean_grads(ref_p, t, P, none))
        dopt.step(rank_grads(params, t, RANK, none))
    problems = [] if same_on_every_rank(params) else ["the parameters differ across ranks"]
    if P <= 2:
        problems += differences(params, ref_p, "params")
    else:
        rtol = 1e-10 if dtype == np.float64 else 1e-4
        for i, (a, b) in enumerate(zip(params, ref_p)):
            if not np.allclose(a, b, rtol=rtol, atol=rtol):
                problems.append(f"params[{i}]: max |difference| {np.abs(a - b).max()}")
    assert_none(problems)


@pytest.mark.parametrize("grad_dtype", [None, np.float32], ids=["16-bit-grads", "float32-grads"])
@pytest.mark.parametrize("half", ["float16", "bfloat16"])
def test_16bit_parameters_give_one_processs_bits(half, grad_dtype):
    """float16/bfloat16 parameters stepped through their float32 masters,
    gradients in their dtype or float32: on 1, 2, ..., P ranks the
    parameters and the state dict (masters included) of one process."""
    if half == "bfloat16":
        half = pytest.importorskip("ml_dtypes").bfloat16
    dtype = np.dtype(half)
    ref_p = params_(dtype)
    ref = build({"lr": 0.05, "weight_decay": 0.1}, ref_p)
    run(ref, ref_p, range(10), MPI.COMM_SELF, grad_dtype=grad_dtype)
    ref_sd = ref.state_dict()
    problems = []
    for n in range(1, P + 1):
        comm = sub(n)
        if comm == MPI.COMM_NULL:
            continue
        params = params_(dtype)
        dopt = DistributedOptimizer(build({"lr": 0.05, "weight_decay": 0.1}, params), comm)
        run(dopt, params, range(10), comm, grad_dtype=grad_dtype)
        sd = dopt.state_dict()
        comm.Free()
        problems += differences(params, ref_p, f"{n} rank(s): params")
        problems += sd_differences(sd, ref_sd, f"{n} rank(s): state_dict")
    assert_none(problems)
    assert "state.4.master_param" in ref_sd
    assert sum(not np.array_equal(a, b) for a, b in zip(ref_p, params_(dtype))) >= 6


@pytest.mark.parametrize("dtype", ["float64", "bfloat16"])
@pytest.mark.parametrize("before,after", [(2, 1), (2, 3), (1, 2)], ids=["2to1", "2to3", "1to2"])
def test_checkpoint_resumes_on_another_number_of_ranks(before, after, dtype):
    """Saved (through np.savez) on `before` ranks, loaded on `after` ranks
    into a new optimizer over the saved parameters: the run goes on bit for
    bit as one uninterrupted process (the factored statistics, and the
    masters of bfloat16 parameters, carried in their shapes)."""
    if P < max(before, after):
        pytest.skip(f"needs {max(before, after)} ranks")
    dtype = np.dtype(pytest.importorskip("ml_dtypes").bfloat16 if dtype == "bfloat16"
                     else dtype)
    kw = {"lr": 0.05, "weight_decay": 0.1}
    ref_p = params_(dtype)
    ref = build(kw, ref_p)
    run(ref, ref_p, range(16), MPI.COMM_SELF)
    problems = []
    saved, params = saved_on(before, lambda ps: build(kw, ps), params_(dtype), range(8))
    comm = sub(after)
    if comm != MPI.COMM_NULL:
        fresh = [q.copy() for q in params]          # the parameters saved with it
        dopt = DistributedOptimizer(build(kw, fresh), comm)
        load_saved(dopt, saved, comm)
        problems += goes_on_as(dopt, fresh, range(8, 16), comm, ref, ref_p)
    assert_none(problems)


def test_continues_from_the_wrapped_optimizers_state():
    """An Adafactor stepped before it is wrapped goes on from its state
    (factored statistics and step counts) as one process does."""
    ref_p, params = params_(np.float64), params_(np.float64)
    ref, opt = build({"lr": 0.05}, ref_p), build({"lr": 0.05}, params)
    run(ref, ref_p, range(12), MPI.COMM_SELF)
    run(opt, params, range(5), MPI.COMM_SELF)       # the same steps on every rank
    dopt = DistributedOptimizer(opt)
    run(dopt, params, range(5, 12), WORLD)
    problems = differences(params, ref_p, "params")
    problems += sd_differences(dopt.state_dict(), ref.state_dict(), "state_dict")
    assert_none(problems)


def test_shard_mode_refuses_adafactor_on_every_rank_and_changes_nothing():
    """shard=True raises the same ValueError on every rank, saying why and
    what to use instead; the optimizer and its parameters are as they were,
    and the ranks are still in step (a replicated wrapper works after)."""
    params = params_(np.float32)
    opt = build({"lr": 0.05}, params)
    run(opt, params, range(3), MPI.COMM_SELF)
    before_p, before_sd = [p.copy() for p in params], opt.state_dict()
    with pytest.raises(ValueError, match=r"shard=True does not support Adafactor: its "
                       r"second-moment statistics \(row_var, col_var\) are factored over "
                       r"whole rows and columns.*use shard=False \(replicated mode") as info:
        DistributedOptimizer(opt, shard=True)
    problems = differences(params, before_p, "params")
    problems += sd_differences(opt.state_dict(), before_sd, "state_dict")
    if len(set(WORLD.allgather(str(info.value)))) != 1:
        problems.append("the ranks raised different errors")
    dopt = DistributedOptimizer(opt, shard=False)
    run(dopt, params, range(3, 5), WORLD)
    if not same_on_every_rank(params):
        problems.append("the parameters differ across ranks after the refusal")
    assert_none(problems)


def test_a_bad_checkpoint_raises_everywhere_and_changes_nothing():
    """A row_var of the parameter's shape (as an elementwise kind would
    have) in rank 0's dict: the same ValueError on every rank, nothing
    loaded."""
    params = params_(np.float64)
    dopt = DistributedOptimizer(build({"lr": 0.05}, params))
    run(dopt, params, range(3), WORLD)
    before_p, before_sd = [p.copy() for p in params], dopt.state_dict()
    bad = dict(before_sd)
    bad["state.4.row_var"] = np.zeros((3, 5))
    with pytest.raises(ValueError, match=r"state\.4\.row_var must be an array of shape "
                                         r"\(3, 1\).*\(on rank 0\)"):
        dopt.load_state_dict(bad if RANK == 0 else None)
    problems = differences(params, before_p, "params")
    problems += sd_differences(dopt.state_dict(), before_sd, "state_dict")
    assert_none(problems)
