"""fastopt.distributed with Adagrad, Adamax, NAdam, RAdam, Adadelta, ASGD,
Rprop and Lion, on several ranks.

The reference is one process stepping with the mean gradient, bit for bit:
the gradients of `exact_grads` have a mean that is exact for any number of
ranks, so one reference serves 1, 2, ... P ranks (sub-communicators).
Their updates are elementwise, so both modes apply; the per-parameter
numbers of NAdam (mu_product) and ASGD (eta, mu) are not cut into slices:
every rank keeps the whole of each, and checkpoints carry them across
numbers of ranks.

As in the other MPI tests, every rank runs every test and the assertions
come after the test's collectives, on values gathered from every rank.
"""
import numpy as np
import pytest

import fastopt
from .mpihelp import (MPI, RANK, WORLD, assert_none, differences, DistributedOptimizer,
                      goes_on_as, load_saved, make_params, run, same_on_every_rank, saved_on,
                      sd_differences, state_nbytes, sub, with_groups)

P = WORLD.size
DTYPES = (np.float32, np.float64)          # cycled over the parameters

# Each kind with options that make every part of its state matter (ASGD
# crosses t0, RAdam's default betas take both branches within 16 steps).
KINDS = [
    pytest.param(fastopt.Adagrad, dict(lr=0.05, lr_decay=0.01, weight_decay=0.1,
                                       initial_accumulator_value=0.2), id="Adagrad"),
    pytest.param(fastopt.Adamax, dict(lr=0.01, weight_decay=0.1), id="Adamax"),
    pytest.param(fastopt.NAdam, dict(lr=0.01, momentum_decay=0.05, weight_decay=0.1),
                 id="NAdam"),
    pytest.param(fastopt.NAdam, dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True),
                 id="NAdam-decoupled"),
    pytest.param(fastopt.RAdam, dict(lr=0.01, weight_decay=0.1), id="RAdam"),
    pytest.param(fastopt.Adadelta, dict(lr=0.5, rho=0.8, weight_decay=0.1), id="Adadelta"),
    pytest.param(fastopt.ASGD, dict(lr=0.05, lambd=0.01, t0=4, weight_decay=0.1), id="ASGD"),
    pytest.param(fastopt.Rprop, dict(lr=0.02, etas=(0.4, 1.3), step_sizes=(1e-4, 1.0)),
                 id="Rprop"),
    pytest.param(fastopt.Lion, dict(lr=0.01, weight_decay=0.1), id="Lion"),
]
# The kinds whose state has numbers besides the arrays, and Rprop (its
# step sizes start at lr, not zero).
WITH_NUMBERS = [KINDS[2], KINDS[6], KINDS[7]]


def params_():
    return make_params(dtypes=DTYPES)


@pytest.mark.parametrize("shard", [False, True], ids=["replicated", "shard"])
@pytest.mark.parametrize("cls,kw", KINDS)
def test_the_same_bits_as_one_process_on_any_number_of_ranks(cls, kw, shard):
    """On 1, 2, ..., P ranks, float32 and float64 parameters in two groups,
    None gradients and an lr change: the parameters on every rank and the
    whole state dict (step counts and scalars included) of one process
    stepping with the mean gradient, bit for bit."""
    ref_p = params_()
    ref = with_groups(cls, kw, ref_p)
    run(ref, ref_p, range(16), MPI.COMM_SELF)
    ref_sd = ref.state_dict()
    problems = []
    for n in range(1, P + 1):
        comm = sub(n)
        if comm == MPI.COMM_NULL:
            continue
        params = params_()
        dopt = DistributedOptimizer(with_groups(cls, kw, params), comm, shard=shard)
        run(dopt, params, range(16), comm)
        sd = dopt.state_dict()
        everywhere = same_on_every_rank(params, comm)
        comm.Free()
        if not everywhere:
            problems.append(f"{n} rank(s): the parameters differ across ranks")
        problems += differences(params, ref_p, f"{n} rank(s): params")
        if sd is not None:
            problems += sd_differences(sd, ref_sd, f"{n} rank(s): state_dict")
    assert_none(problems)
    moved = [not np.array_equal(a, b) for a, b in zip(ref_p, params_())]
    assert sum(moved) >= 6


@pytest.mark.parametrize("cls,kw", WITH_NUMBERS)
def test_every_rank_keeps_the_whole_numbers_and_its_slice_of_the_arrays(cls, kw):
    """Shard: the arrays are cut (their bytes over the ranks add up to one
    copy), the per-parameter numbers are not (each rank has all of them, the
    same values, after steps that gave some ranks no element of a
    parameter)."""
    params = params_()
    opt = with_groups(cls, kw, params)
    names = cls._kind.scalar_names
    numbers = len(names) * 4 * len(params)                  # 0-d float32 each
    full = state_nbytes(opt)
    dopt = DistributedOptimizer(opt, shard=True)
    run(dopt, params, range(6), WORLD)
    local = dopt.local_optimizer
    mine = state_nbytes(local)
    total = WORLD.allreduce(mine)
    values = [[float(st[k]) for k in names] for st in local.state]
    shapes = {st[k].shape for st in local.state for k in names}
    problems = []
    if total != full + (P - 1) * numbers:
        problems.append(f"state bytes over the ranks {total}, expected {full} + "
                        f"{P - 1} x {numbers}")
    if shapes != ({()} if names else set()):
        problems.append(f"the numbers have shapes {shapes}")
    if len({repr(v) for v in WORLD.allgather(values)}) != 1:
        problems.append("the numbers differ across ranks")
    assert_none(problems)


@pytest.mark.parametrize("cls,kw", WITH_NUMBERS)
def test_both_modes_continue_from_the_wrapped_optimizers_state(cls, kw):
    """An optimizer stepped before it is wrapped (its numbers and step
    sizes no longer at their start): both modes go on from its state as
    one process does."""
    ref_p, rep_p, sh_p = params_(), params_(), params_()
    opts = [with_groups(cls, kw, p) for p in (ref_p, rep_p, sh_p)]
    for opt, p in zip(opts, (ref_p, rep_p, sh_p)):
        run(opt, p, range(5), MPI.COMM_SELF)             # the same steps on every rank
    run(opts[0], ref_p, range(5, 12), MPI.COMM_SELF)
    rep = DistributedOptimizer(opts[1], shard=False)
    sh = DistributedOptimizer(opts[2], shard=True)
    for dopt, p in ((rep, rep_p), (sh, sh_p)):
        run(dopt, p, range(5, 12), WORLD)
    sd_rep, sd_sh = rep.state_dict(), sh.state_dict()
    problems = differences(rep_p, ref_p, "replicated") + differences(sh_p, ref_p, "shard")
    problems += sd_differences(sd_rep, opts[0].state_dict(), "replicated state_dict")
    if sd_sh is not None:
        problems += sd_differences(sd_sh, opts[0].state_dict(), "shard state_dict")
    assert_none(problems)


@pytest.mark.parametrize("modes", [(False, True), (True, False), (True, True)],
                         ids=["replicated-to-shard", "shard-to-replicated", "shard-to-shard"])
@pytest.mark.parametrize("before,after", [(2, 1), (2, 3), (1, 2)], ids=["2to1", "2to3", "1to2"])
@pytest.mark.parametrize("cls,kw", WITH_NUMBERS)
def test_checkpoint_resumes_on_another_number_of_ranks(cls, kw, before, after, modes):
    """Saved (through np.savez) on `before` ranks, loaded on `after` ranks
    into a new optimizer over the saved parameters (its numbers at their
    start): the run goes on bit for bit as one uninterrupted process."""
    if P < max(before, after):
        pytest.skip(f"needs {max(before, after)} ranks")
    ref_p = params_()
    ref = with_groups(cls, kw, ref_p)
    run(ref, ref_p, range(16), MPI.COMM_SELF)
    problems = []
    saved, params = saved_on(before, lambda ps: with_groups(cls, kw, ps), params_(), range(8),
                             shard=modes[0])
    comm = sub(after)
    if comm != MPI.COMM_NULL:
        fresh = [q.copy() for q in params]          # the parameters saved with it
        dopt = DistributedOptimizer(with_groups(cls, kw, fresh), comm, shard=modes[1])
        load_saved(dopt, saved, comm)
        problems += goes_on_as(dopt, fresh, range(8, 16), comm, ref, ref_p)
    assert_none(problems)


def test_a_bad_number_in_a_checkpoint_raises_everywhere_and_changes_nothing():
    params = params_()
    dopt = DistributedOptimizer(fastopt.NAdam(params, lr=0.01), shard=True)
    run(dopt, params, range(3), WORLD)
    before, state_before = [p.copy() for p in params], dopt.state_dict()
    bad = fastopt.NAdam(params_(), lr=0.01).state_dict()
    bad["state.3.mu_product"] = np.zeros(2, np.float32)
    with pytest.raises(ValueError, match=r"state\.3\.mu_product must be an array of shape \(\) "
                                         r"and dtype float32.*\(on rank 0\)"):
        dopt.load_state_dict(bad if RANK == 0 else None)
    state_after = dopt.state_dict()
    problems = differences(params, before, "params")
    if RANK == 0:
        problems += sd_differences(state_after, state_before, "state_dict")
    assert_none(problems)


@pytest.mark.parametrize("shard", [False, True], ids=["replicated", "shard"])
@pytest.mark.parametrize("cls,kw", WITH_NUMBERS + [KINDS[8]])
def test_bfloat16_parameters_and_state_give_one_processs_bits(cls, kw, shard):
    """bfloat16 parameters with float32 masters and bfloat16 state rounded
    stochastically (its bits drawn by each element's place in the model): on
    1, 2, ..., P ranks the bits of one process."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bf16 = np.dtype(ml_dtypes.bfloat16)
    kw = dict(kw, state_dtype="bfloat16", seed=5)
    ref_p = make_params(dtypes=(bf16,))
    ref = with_groups(cls, kw, ref_p)
    run(ref, ref_p, range(10), MPI.COMM_SELF)
    ref_sd = ref.state_dict()
    problems = []
    for n in range(1, P + 1):
        comm = sub(n)
        if comm == MPI.COMM_NULL:
            continue
        params = make_params(dtypes=(bf16,))
        dopt = DistributedOptimizer(with_groups(cls, kw, params), comm, shard=shard)
        run(dopt, params, range(10), comm)
        sd = dopt.state_dict()
        comm.Free()
        problems += differences(params, ref_p, f"{n} rank(s): params")
        if sd is not None:
            problems += sd_differences(sd, ref_sd, f"{n} rank(s): state_dict")
    assert_none(problems)
