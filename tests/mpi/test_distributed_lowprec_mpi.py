"""fastopt.distributed with float16/bfloat16 parameters and bfloat16 state,
on several ranks.

The single-process optimizer stepping with the mean gradient is the
reference, bit for bit: the gradients of `exact_grads` have a mean that is
exact whatever the number of ranks, so one reference serves every number of
ranks (1 to the job's size, on sub-communicators), and random 16-bit
gradients are checked against their mean summed in float32 in rank order
(what the wrapper promises).  Stochastic rounding of bfloat16 state draws
its bits by each element's place in the whole model, so it too gives the
reference's bits with any slicing.

As in test_distributed_mpi.py, every rank runs every test and the
assertions come after the test's collectives, on values every rank shares.
"""
import numpy as np
import pytest

import fastopt
from .mpihelp import (MPI, RANK, WORLD, assert_none, bits, copies, differences,
                      DistributedOptimizer, goes_on_as, load_saved, make_params, rank_grads, run,
                      same_on_every_rank, saved_on, sd_differences, state_nbytes, sub,
                      with_groups)

ml_dtypes = pytest.importorskip("ml_dtypes")

BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
F32 = np.dtype(np.float32)
P = WORLD.size
LAST = P - 1
SEED = 11

# (parameter dtype, state_dtype, state_rounding)
PRECISIONS = [
    pytest.param((F16, None, "stochastic"), id="float16"),
    pytest.param((BF16, None, "stochastic"), id="bfloat16"),
    pytest.param((F16, "bfloat16", "nearest"), id="float16-bf16state-nearest"),
    pytest.param((F16, "bfloat16", "stochastic"), id="float16-bf16state-stochastic"),
    pytest.param((BF16, "bfloat16", "nearest"), id="bfloat16-bf16state-nearest"),
    pytest.param((BF16, "bfloat16", "stochastic"), id="bfloat16-bf16state-stochastic"),
    pytest.param((F32, "bfloat16", "nearest"), id="float32-bf16state-nearest"),
    pytest.param((F32, "bfloat16", "stochastic"), id="float32-bf16state-stochastic"),
]
# Three state arrays each for Adam and RMSprop (the three draws of
# stochastic rounding), one for SGD.
OPTIMIZERS = [
    pytest.param(fastopt.Adam, {"lr": 1e-2, "amsgrad": True, "weight_decay": 0.1}, id="Adam"),
    pytest.param(fastopt.RMSprop, {"lr": 1e-2, "centered": True, "momentum": 0.5},
                 id="RMSprop"),
    pytest.param(fastopt.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True}, id="SGD"),
]


def build(cls, kw, prec, params, seed=SEED):
    _, state_dtype, rounding = prec
    return with_groups(cls, {**kw, "state_dtype": state_dtype, "state_rounding": rounding,
                             "seed": seed}, params)


# ------------------------------------------------------- bit for bit ---

@pytest.mark.parametrize("shard", [False, True], ids=["replicated", "shard"])
@pytest.mark.parametrize("prec", PRECISIONS)
@pytest.mark.parametrize("cls,kw", OPTIMIZERS)
def test_the_same_bits_as_one_process_on_any_number_of_ranks(cls, kw, prec, shard):
    """On 1, 2, ..., P ranks: the parameters and the whole state (masters,
    bfloat16 state) of one process stepping with the mean gradient, bit for
    bit, on every rank; 16-bit gradients, and float32 ones on 2 ranks."""
    dtype = prec[0]
    ref_p = make_params(dtypes=(dtype,))
    ref = build(cls, kw, prec, ref_p)
    run(ref, ref_p, range(16), MPI.COMM_SELF)
    ref_sd = ref.state_dict()
    problems = []
    runs = [(n, None) for n in range(1, P + 1)]
    if dtype.itemsize == 2:
        runs.append((min(P, 2), np.float32))      # float32 gradients of 16-bit parameters
    for n, grad_dtype in runs:
        comm = sub(n)
        if comm == MPI.COMM_NULL:
            continue
        params = make_params(dtypes=(dtype,))
        dopt = DistributedOptimizer(build(cls, kw, prec, params), comm, shard=shard)
        run(dopt, params, range(16), comm, grad_dtype=grad_dtype)
        sd = dopt.state_dict()
        everywhere = same_on_every_rank(params, comm)
        comm.Free()
        what = f"{n} rank(s), {np.dtype(grad_dtype or dtype).name} gradients"
        if not everywhere:
            problems.append(f"{what}: the parameters differ across ranks")
        problems += differences(params, ref_p, f"{what}: params")
        if sd is not None:
            problems += sd_differences(sd, ref_sd, f"{what}: state_dict")
    assert_none(problems)
    changed = [not np.array_equal(bits(a), bits(b)) for a, b in
               zip(ref_p, make_params(dtypes=(dtype,)))]
    assert sum(changed) >= 5                         # the 16-bit parameters did move


def spread_grads(params, t, rank, dtype):
    """Rank `rank`'s gradients at step t, of `dtype`, with exponents spread
    over 2**-12..2**12, so that the order of a sum changes its rounding."""
    rng = np.random.default_rng([3, t, rank])
    return [np.array(rng.standard_normal(p.shape) * 2.0 ** rng.integers(-12, 13, p.shape), dtype)
            for p in params]


def mean32(params, t, nranks, dtype):
    """The mean of the ranks' `spread_grads`, summed in float32 in rank order."""
    per_rank = [spread_grads(params, t, r, dtype) for r in range(nranks)]
    out = []
    for i in range(len(params)):
        total = per_rank[0][i].astype(np.float32)
        for r in range(1, nranks):
            total += per_rank[r][i]
        total /= nranks
        out.append(total)
    return out


@pytest.mark.parametrize("grad_dtype", ["param", "float32"])
@pytest.mark.parametrize("prec", [PRECISIONS[0], PRECISIONS[5]])
def test_random_gradients_are_summed_in_float32_in_rank_order(prec, grad_dtype):
    """Gradients whose sum rounds: the mean is float32((g_0 + g_1 + ...) / P),
    summed in float32 in rank order (16-bit or float32 on the wire), in both
    modes, on every rank."""
    dtype = prec[0]
    wire = dtype if grad_dtype == "param" else F32
    ref_p, rep_p, sh_p = (make_params(dtypes=(dtype,)) for _ in range(3))
    ref = build(fastopt.Adam, {"lr": 1e-2}, prec, ref_p)
    rep = DistributedOptimizer(build(fastopt.Adam, {"lr": 1e-2}, prec, rep_p), shard=False)
    sh = DistributedOptimizer(build(fastopt.Adam, {"lr": 1e-2}, prec, sh_p), shard=True)
    for t in range(8):
        ref.step(mean32(ref_p, t, P, wire))
        rep.step(spread_grads(rep_p, t, RANK, wire))
        sh.step(spread_grads(sh_p, t, RANK, wire))
    ref_sd, sd = ref.state_dict(), sh.state_dict()
    problems = differences(rep_p, ref_p, "replicated") + differences(sh_p, ref_p, "shard")
    if sd is not None:
        problems += sd_differences(sd, ref_sd, "shard state_dict")
    if not (same_on_every_rank(rep_p) and same_on_every_rank(sh_p)):
        problems.append("the parameters differ across ranks")
    assert_none(problems)


def test_sixteen_bit_parameters_in_one_buffer_are_sent_in_place():
    """bfloat16 parameters and gradients as views of one buffer each go to MPI
    without packing (as their bits), with the results of separate arrays."""
    from fastopt import _layout
    shapes = [p.shape for p in make_params()]
    prec = (BF16, "bfloat16", "stochastic")
    loose = make_params(dtypes=(BF16,))
    _, params = _layout.aligned_views(shapes, [BF16] * len(shapes))
    _, grads = _layout.aligned_views(shapes, [BF16] * len(shapes))
    for p, q in zip(params, loose):
        p[...] = q
    for shard in (False, True):
        dopt = DistributedOptimizer(build(fastopt.Adam, {}, prec, params), shard=shard)
        dloose = DistributedOptimizer(build(fastopt.Adam, {}, prec, loose), shard=shard)
        for t in range(4):
            for g, r in zip(grads, rank_grads(params, t, RANK)):
                g[...] = r
            dopt.step(grads)
            dloose.step(rank_grads(loose, t, RANK))
        (f,) = dopt._flats
        in_place = f.pspan is not None and f.gspan is not None and BF16 not in f.bufs
        assert in_place                              # nothing packed
        assert_none(differences(params, loose, f"shard={shard}: params"))


def test_clip_grad_norm_of_the_float32_mean_gradient():
    """Clipping between reduce and step: the norm of the float32 mean gradient,
    the same on every rank and in both modes, as one process computes it."""
    prec = (BF16, "bfloat16", "stochastic")
    ref_p, rep_p, sh_p = (make_params(dtypes=(BF16,)) for _ in range(3))
    ref = build(fastopt.Adam, {"lr": 1e-2}, prec, ref_p)
    dopts = [DistributedOptimizer(build(fastopt.Adam, {"lr": 1e-2}, prec, p), shard=shard)
             for p, shard in ((rep_p, False), (sh_p, True))]
    ref_norms, norms = [], [[], []]
    for t in range(6):
        g = mean32(ref_p, t, P, BF16)
        ref_norms.append(fastopt.clip_grad_norm_(g, 1.0))
        ref.step(g)
        for k, (dopt, p) in enumerate(zip(dopts, (rep_p, sh_p))):
            dopt.reduce(spread_grads(p, t, RANK, BF16))
            norms[k].append(dopt.clip_grad_norm_(1.0))
            dopt.step()
    everywhere = len(set(WORLD.allgather(tuple(norms[1])))) == 1
    problems = differences(rep_p, sh_p, "replicated against shard")
    assert_none(problems)
    assert everywhere and norms[0] == norms[1]
    np.testing.assert_allclose(norms[1], ref_norms, rtol=1e-6)
    assert min(ref_norms) > 1.0                      # it did clip
    masters = [s["master_param"] for s in dopts[0].optimizer.state]
    for a, b in zip(masters, [s["master_param"] for s in ref.state]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------- checkpoints ---

@pytest.mark.parametrize("prec", [PRECISIONS[5], PRECISIONS[0], PRECISIONS[2]])
@pytest.mark.parametrize("shard_after", [False, True], ids=["to-replicated", "to-shard"])
@pytest.mark.parametrize("shard_before", [False, True], ids=["replicated", "shard"])
@pytest.mark.parametrize("before,after", [(2, 1), (2, 3), (1, 2)], ids=["2to1", "2to3", "1to2"])
def test_checkpoint_resumes_on_another_number_of_ranks(before, after, shard_before,
                                                       shard_after, prec):
    """Saved (through np.savez) on `before` ranks, loaded on `after` ranks by
    an optimizer with another seed over the initial parameters: the masters
    bring the parameters back, the seed comes from the checkpoint, and the
    run goes on bit for bit as one uninterrupted process."""
    if P < max(before, after):
        pytest.skip(f"needs {max(before, after)} ranks")
    cls, kw = fastopt.Adam, {"lr": 1e-2, "amsgrad": True, "weight_decay": 0.1}
    dtype = prec[0]
    ref_p = make_params(dtypes=(dtype,))
    ref = build(cls, kw, prec, ref_p)
    run(ref, ref_p, range(20), MPI.COMM_SELF)
    problems = []
    saved, _ = saved_on(before, lambda ps: build(cls, kw, prec, ps), make_params(dtypes=(dtype,)),
                        range(10), shard=shard_before)
    comm = sub(after)
    if comm != MPI.COMM_NULL:
        params = make_params(dtypes=(dtype,))        # the initial values
        dopt = DistributedOptimizer(build(cls, kw, prec, params, seed=0), comm,
                                    shard=shard_after)
        load_saved(dopt, saved, comm)
        if not same_on_every_rank(params, comm):
            problems.append("the parameters differ across ranks after loading")
        seeds = (dopt.optimizer.seed, dopt.local_optimizer.seed)
        if prec[1] is not None and seeds != (SEED, SEED):
            problems.append(f"seeds {seeds} after loading, not the checkpoint's {SEED}")
        problems += goes_on_as(dopt, params, range(10, 20), comm, ref, ref_p)
    assert_none(problems)


def test_load_state_dict_of_another_state_dtype_raises_everywhere_and_changes_nothing():
    params = make_params(dtypes=(BF16,))
    dopt = DistributedOptimizer(fastopt.Adam(params, state_dtype="bfloat16"), shard=True)
    dopt.step(rank_grads(params, 0, RANK))
    before, state_before = copies(params), dopt.state_dict()
    other = fastopt.Adam(make_params(dtypes=(BF16,))).state_dict()
    with pytest.raises(ValueError, match=r"state dict has state_dtype None but this optimizer "
                                         r"keeps state_dtype='bfloat16' \(on rank 0\)"):
        dopt.load_state_dict(other if RANK == 0 else None)
    state_after = dopt.state_dict()
    problems = differences(params, before, "params")
    if RANK == 0:
        problems += sd_differences(state_after, state_before, "state_dict")
    assert_none(problems)


# ------------------------------------------------- the wrapped state ---

@pytest.mark.parametrize("prec", [PRECISIONS[1], PRECISIONS[5]])
def test_both_modes_continue_from_the_wrapped_optimizers_state(prec):
    """An optimizer stepped (or loaded) before it is wrapped: both modes go on
    from its state, step counts and masters, as one process does."""
    dtype = prec[0]
    ref_p, rep_p, sh_p = (make_params(dtypes=(dtype,)) for _ in range(3))
    opts = [build(fastopt.Adam, {"lr": 1e-2}, prec, p) for p in (ref_p, rep_p, sh_p)]
    for opt, p in zip(opts, (ref_p, rep_p, sh_p)):
        run(opt, p, range(5), MPI.COMM_SELF)        # the same steps on every rank
    run(opts[0], ref_p, range(5, 12), MPI.COMM_SELF)
    rep = DistributedOptimizer(opts[1], shard=False)
    sh = DistributedOptimizer(opts[2], shard=True)
    for dopt, p in ((rep, rep_p), (sh, sh_p)):
        run(dopt, p, range(5, 12), WORLD)
    sd = sh.state_dict()
    problems = differences(rep_p, ref_p, "replicated") + differences(sh_p, ref_p, "shard")
    if sd is not None:
        problems += sd_differences(sd, opts[0].state_dict(), "shard state_dict")
    assert_none(problems)


# --------------------------------------------------------------- memory ---

def test_shard_keeps_one_pth_of_the_state_and_of_the_masters():
    params = [np.zeros(100_003, BF16), np.zeros((300, 301), BF16), np.zeros(7, F16)]
    opt = fastopt.Adam(params, amsgrad=True, state_dtype="bfloat16")
    full = state_nbytes(opt)
    assert full == (100_003 + 300 * 301 + 7) * (3 * 2 + 4)     # 3 bfloat16 arrays + a master
    sh = DistributedOptimizer(opt, shard=True)
    mine = state_nbytes(sh.local_optimizer)
    total = WORLD.allreduce(mine)
    assert total == full                             # each element's state on one rank
    n = 100_003 + 300 * 301
    assert mine <= 10 * (-(-n // P) + 7)


# ------------------------------------------------------------- errors ---

def test_gradient_dtypes_are_checked_on_every_rank_and_change_nothing():
    params = make_params(dtypes=(BF16, F16))
    dopt = DistributedOptimizer(fastopt.Adam(params, lr=1e-2), shard=True)
    dopt.step(rank_grads(params, 0, RANK))
    before = copies(params)
    grads = rank_grads(params, 1, RANK)
    if RANK == LAST:
        grads[6] = grads[6].astype(F16)              # params[6] is bfloat16
    with pytest.raises(TypeError, match=r"grads\[6\] has dtype float16 but params\[6\] has "
                                        r"dtype bfloat16 \(or float32\) \(on rank \d\)"):
        dopt.step(grads)
    grads = rank_grads(params, 1, RANK)
    grads[2] = grads[2].astype(np.float64)
    with pytest.raises(TypeError, match=r"grads\[2\] has dtype float64 but params\[2\] has "
                                        r"dtype bfloat16 \(or float32\)"):
        dopt.step(grads)
    if P > 1:
        grads = rank_grads(params, 1, RANK)
        if RANK == LAST:
            grads[3] = grads[3].astype(F32)          # float32: fine alone, not on one rank
        with pytest.raises(ValueError, match=r"ranks disagree on the gradients given in "
                                             r"float32: rank 0 has \(\), rank \d has \(3,\)"):
            dopt.step(grads)
    assert_none(differences(params, before, "params"))
    dopt.step([g.astype(F32) for g in rank_grads(params, 1, RANK)])     # still in step
    assert same_on_every_rank(params)


@pytest.mark.parametrize("name,match", [
    ("state_dtype", r"ranks disagree on state_dtype: rank 0 has 'bfloat16', rank \d has None"),
    ("rounding", r"ranks disagree on state_rounding: rank 0 has 'stochastic', rank \d has "
                 r"'nearest'"),
    ("seed", r"ranks disagree on seed: rank 0 has 0, rank \d has 1"),
    ("master", r"ranks disagree on the state of params\[7\]"),
])
def test_low_precision_options_must_agree(name, match):
    if P == 1:
        pytest.skip("needs 2 ranks")
    odd = RANK == LAST
    params = make_params(dtypes=(BF16,))
    kw = {"state_dtype": "bfloat16"}
    if odd and name == "state_dtype":
        kw = {}
    if odd and name == "rounding":
        kw["state_rounding"] = "nearest"
    if odd and name == "seed":
        kw["seed"] = 1
    opt = fastopt.Adam(params, **kw)
    if odd and name == "master":                     # the same parameter, another true value
        opt.state[7]["master_param"][0, 0] += 2.0 ** -20
    with pytest.raises(ValueError, match=match):
        DistributedOptimizer(opt, shard=True)


def test_bfloat16_state_needs_float32_or_16_bit_parameters():
    with pytest.raises(ValueError, match="state_dtype='bfloat16' needs float32, float16 or "
                                         "bfloat16 parameters, but params\\[0\\] is float64"):
        fastopt.Adam(make_params(), state_dtype="bfloat16")
