"""fastopt.distributed on several ranks: both modes against one process,
against each other and across ranks; clipping; checkpoints across rank
counts; state memory; agreement checks; threads; the sampler.

Every rank runs every test; assertions come after the test's collectives
and compare values that are the same on every rank, so a failure fails on
every rank and no rank is left waiting in a collective.
"""
import math
import os

import numpy as np
import pytest

import fastopt
from fastopt.distributed import DistributedSampler
from .mpihelp import (CASE_IDS, CASES, MPI, WORLD, DistributedOptimizer, copies, exact_grads,
                     make_params, mean_grads, none_at, rank_grads, same_on_every_rank,
                     state_nbytes, with_groups)

P = WORLD.size
RANK = WORLD.rank
LAST = P - 1


def train(cls, kw, params, steps, *, shard=None, comm=WORLD, clip=None):
    """`steps` steps of the case's optimizer over two param groups, with None
    gradients, a weight-decay change at step 25 and a StepLR schedule.

    shard=None is the single-process reference: the mean of the gradients
    of comm.size ranks.  Else each rank steps with its own gradients
    through a DistributedOptimizer.  clip=(max_norm, norm_type) clips the
    mean gradient first.  Returns (optimizer, wrapper or None, norms).
    """
    opt = with_groups(cls, kw, params)
    dopt = None if shard is None else DistributedOptimizer(opt, comm, shard=shard)
    sched = fastopt.lr_scheduler.StepLR(dopt or opt, step_size=10, gamma=0.5)
    norms = []
    for t in range(steps):
        none = none_at(t, len(params))
        if t == 25:
            opt.param_groups[0]["weight_decay"] = 0.05
        if dopt is None:
            grads = mean_grads(params, t, comm.size, none)
            if clip:
                norms.append(fastopt.clip_grad_norm_(grads, *clip))
            opt.step(grads)
        else:
            grads = rank_grads(params, t, comm.rank, none)
            if clip:
                dopt.reduce(grads)
                norms.append(dopt.clip_grad_norm_(*clip))
                dopt.step()
            else:
                dopt.step(grads)
        sched.step()
    return opt, dopt, norms


def assert_close(got, ref):
    for g, r in zip(got, ref):
        if g.dtype == np.float32:
            np.testing.assert_allclose(g, r, rtol=2e-5, atol=1e-6)
        else:
            np.testing.assert_allclose(g, r, rtol=1e-12, atol=0)


def assert_same_state_dict(a, b, exact=True):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], np.ndarray) and a[k].dtype.kind == "f":
            if exact:
                np.testing.assert_array_equal(a[k], b[k], err_msg=k)
            else:
                assert_close([a[k]], [b[k]])
        else:
            assert np.array_equal(a[k], b[k]), k


# ---------------------------------------------------------- equivalence ---

@pytest.mark.parametrize("dtypes", [(np.float64,), (np.float32, np.float64)],
                         ids=["float64", "mixed"])
@pytest.mark.parametrize("cls,kw", CASES, ids=CASE_IDS)
def test_both_modes_match_one_process_and_each_other(cls, kw, dtypes):
    ref_p, rep_p, sh_p = (make_params(dtypes=dtypes) for _ in range(3))
    ref, _, _ = train(cls, kw, ref_p, 50)
    _, rep, _ = train(cls, kw, rep_p, 50, shard=False)
    _, sh, _ = train(cls, kw, sh_p, 50, shard=True)
    sd_rep, sd_sh = rep.state_dict(), sh.state_dict()
    assert same_on_every_rank(rep_p) and same_on_every_rank(sh_p)
    for a, b in zip(rep_p, sh_p):
        np.testing.assert_array_equal(a, b)          # the two modes: the same bits
    assert_close(rep_p, ref_p)                       # one process: to rounding
    np.testing.assert_array_equal(rep.steps, ref.steps)
    np.testing.assert_array_equal(sh.steps, ref.steps)
    if RANK == 0:
        assert_same_state_dict(sd_sh, sd_rep)
        assert_same_state_dict(sd_rep, ref.state_dict(), exact=False)
    else:
        assert sd_sh is None


@pytest.mark.parametrize("cls,kw", CASES, ids=CASE_IDS)
def test_one_rank_matches_one_process(cls, kw):
    """The same on a communicator of one rank (MPI.COMM_SELF, on every rank)."""
    ref_p, rep_p, sh_p = (make_params() for _ in range(3))
    train(cls, kw, ref_p, 50, comm=MPI.COMM_SELF)
    train(cls, kw, rep_p, 50, shard=False, comm=MPI.COMM_SELF)
    train(cls, kw, sh_p, 50, shard=True, comm=MPI.COMM_SELF)
    for a, b in zip(rep_p, sh_p):
        np.testing.assert_array_equal(a, b)
    assert_close(rep_p, ref_p)


def test_many_steps_stay_bit_identical_across_ranks():
    params = make_params(dtypes=(np.float32, np.float64))
    opt = fastopt.Adam(params, lr=1e-2, amsgrad=True)
    dopt = DistributedOptimizer(opt, shard=True)
    shadow = copies(params)
    dshadow = DistributedOptimizer(fastopt.Adam(shadow, lr=1e-2, amsgrad=True), shard=False)
    for t in range(200):
        dopt.step(rank_grads(params, t, RANK))
        dshadow.step(rank_grads(shadow, t, RANK))
        if t % 50 == 49:
            assert same_on_every_rank(params)
    for a, b in zip(params, shadow):
        np.testing.assert_array_equal(a, b)


def test_flat_buffers_are_used_in_place():
    """Parameters and gradients as views of one buffer each (fastopt.flat_views)
    go to MPI without packing, with the same results as separate arrays."""
    flat_p, params = fastopt.flat_views(make_params())
    flat_g, grads = fastopt.flat_views(params, copy=False)
    loose = make_params()
    for shard in (False, True):
        dopt = DistributedOptimizer(fastopt.Adam(params, lr=1e-2), shard=shard)
        dloose = DistributedOptimizer(fastopt.Adam(loose, lr=1e-2), shard=shard)
        for t in range(5):
            for g, r in zip(grads, rank_grads(params, t, RANK)):
                g[...] = r
            dopt.step(grads)
            dloose.step(rank_grads(loose, t, RANK))
        (f,) = dopt._flats
        assert f.gspan is not None and f.pspan is not None
        if shard:
            assert not f.bufs                        # nothing packed, nothing unpacked
        for a, b in zip(params, loose):
            np.testing.assert_array_equal(a, b)


def test_layout_differing_across_ranks_falls_back_to_packing():
    base = make_params()
    params = fastopt.flat_views(base)[1] if RANK == 0 else copies(base)
    ref = make_params()
    dopt = DistributedOptimizer(fastopt.SGD(params, lr=0.1, momentum=0.9), shard=True)
    for t in range(5):
        dopt.step(rank_grads(params, t, RANK))
    (f,) = dopt._flats
    assert f.pspan is None
    opt = fastopt.SGD(ref, lr=0.1, momentum=0.9)
    for t in range(5):
        opt.step(mean_grads(ref, t, P))
    assert_close(params, ref)
    assert same_on_every_rank(params)


def test_strided_and_read_only_grads_are_packed():
    params, ref = make_params(), make_params()
    dopt = DistributedOptimizer(fastopt.RMSprop(params, lr=1e-2, centered=True), shard=True)
    opt = fastopt.RMSprop(ref, lr=1e-2, centered=True)
    for t in range(3):
        grads = []
        for g in rank_grads(params, t, RANK):
            strided = np.empty(g.shape + (2,), g.dtype)[..., 0]
            strided[...] = g
            strided.flags.writeable = False
            grads.append(strided)
        dopt.step(grads)
        opt.step(mean_grads(ref, t, P))
    assert_close(params, ref)
    assert same_on_every_rank(params)


# ------------------------------------------------------------- clipping ---

@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf, 3.0])
def test_clip_grad_norm_of_the_mean_gradient(norm_type):
    clip = (0.5, norm_type)
    ref_p, rep_p, sh_p = (make_params() for _ in range(3))
    _, _, ref_norms = train(fastopt.Adam, {}, ref_p, 20, clip=clip)
    _, _, rep_norms = train(fastopt.Adam, {}, rep_p, 20, shard=False, clip=clip)
    _, _, sh_norms = train(fastopt.Adam, {}, sh_p, 20, shard=True, clip=clip)
    assert len(set(WORLD.allgather(tuple(sh_norms)))) == 1       # every rank: the same norm
    assert rep_norms == sh_norms
    np.testing.assert_allclose(sh_norms, ref_norms, rtol=1e-13)
    assert max(ref_norms) > 0.5                                  # it did clip
    for a, b in zip(rep_p, sh_p):
        np.testing.assert_array_equal(a, b)
    assert_close(sh_p, ref_p)


def test_clip_nonfinite_raises_on_every_rank():
    params = make_params()
    dopt = DistributedOptimizer(fastopt.SGD(params, lr=0.1), shard=True)
    grads = rank_grads(params, 0, RANK)
    if RANK == LAST:
        grads[6][3] = np.nan
    dopt.reduce(grads)
    with pytest.raises(RuntimeError, match="non-finite"):
        dopt.clip_grad_norm_(1.0, error_if_nonfinite=True)


def test_clip_arguments_must_agree():
    params = make_params()
    dopt = DistributedOptimizer(fastopt.SGD(params, lr=0.1))
    dopt.reduce(rank_grads(params, 0, RANK))
    with pytest.raises(ValueError, match=r"ranks disagree on clip_grad_norm_ arguments"):
        dopt.clip_grad_norm_(1.0 if RANK != LAST else 2.0)
    with pytest.raises(ValueError, match=r"max_norm.*\(on rank"):
        dopt.clip_grad_norm_(1.0 if RANK != LAST else -1.0)
    before = copies(params)
    dopt.step()                                      # still reduced: one step applies it
    assert not all(np.array_equal(a, b) for a, b in zip(params, before))
    with pytest.raises(RuntimeError, match="reduce"):
        dopt.step()


# ---------------------------------------------------------- checkpoints ---

def _run_exact(dopt, params, steps, start, comm):
    for t in range(start, start + steps):
        if t == 5:
            dopt.param_groups[0]["lr"] *= 0.5        # must be in the checkpoint
        dopt.step(exact_grads(params, t, comm.rank, comm.size))


@pytest.mark.parametrize("shard_after", [False, True], ids=["to-replicated", "to-shard"])
@pytest.mark.parametrize("shard_before", [False, True], ids=["replicated", "shard"])
@pytest.mark.parametrize("before,after", [(2, 1), (2, 3), (1, 2)], ids=["2to1", "2to3", "1to2"])
def test_checkpoint_resumes_on_another_number_of_ranks(before, after, shard_before, shard_after):
    if P < max(before, after):
        pytest.skip(f"needs {max(before, after)} ranks")
    cls, kw = fastopt.Adam, {"lr": 1e-2, "amsgrad": True, "weight_decay": 0.1}
    # The uninterrupted run, in one process (the exact mean gradient).
    ref_p = make_params()
    ref = cls(ref_p, **kw)
    for t in range(20):
        if t == 5:
            ref.param_groups[0]["lr"] *= 0.5
        ref.step(exact_grads(ref_p, t, 0, 1))
    # 10 steps on `before` ranks, a checkpoint, 10 more on `after` ranks.
    sd = params = None
    comm = WORLD.Split(0 if RANK < before else MPI.UNDEFINED)
    if comm != MPI.COMM_NULL:
        params = make_params()
        dopt = DistributedOptimizer(cls(params, **kw), comm, shard=shard_before)
        _run_exact(dopt, params, 10, 0, comm)
        sd = dopt.state_dict()
        comm.Free()
    sd, params = WORLD.bcast((sd, params), root=0)   # "saved" by rank 0, read by all
    comm = WORLD.Split(0 if RANK < after else MPI.UNDEFINED)
    if comm != MPI.COMM_NULL:
        dopt = DistributedOptimizer(cls(params, **kw), comm, shard=shard_after)
        dopt.load_state_dict(sd if comm.rank == 0 else None)
        _run_exact(dopt, params, 10, 10, comm)
        final = dopt.state_dict()
        comm.Free()
        for a, b in zip(params, ref_p):
            np.testing.assert_array_equal(a, b)
        if final is not None:
            assert_same_state_dict(final, ref.state_dict())


def test_load_state_dict_error_raises_everywhere_and_changes_nothing():
    params = make_params()
    dopt = DistributedOptimizer(fastopt.Adam(params), shard=True)
    dopt.step(rank_grads(params, 0, RANK))
    before = dopt.state_dict()
    sgd = fastopt.SGD(make_params(), lr=0.1).state_dict()
    with pytest.raises(ValueError, match=r"for optimizer 'SGD', not 'Adam' \(on rank 0\)"):
        dopt.load_state_dict(sgd if RANK == 0 else None)
    good = fastopt.Adam(make_params()).state_dict()
    bad = dict(good)
    bad["state.6.exp_avg"] = np.zeros(999)
    with pytest.raises(ValueError, match=r"state\.6\.exp_avg must be an array of shape"):
        dopt.load_state_dict(bad if RANK == 0 else None)
    after = dopt.state_dict()
    if RANK == 0:
        assert_same_state_dict(before, after)


# --------------------------------------------------------------- memory ---

def test_shard_keeps_one_pth_of_the_state():
    params = [np.zeros(100_003), np.zeros((300, 301)), np.zeros(7), np.zeros((), np.float32)]
    opt = fastopt.Adam(params, amsgrad=True)
    full = state_nbytes(opt)
    sh = DistributedOptimizer(opt, shard=True)
    mine = state_nbytes(sh.local_optimizer)
    assert WORLD.allreduce(mine) == full             # each element's state on one rank
    n64 = 100_003 + 300 * 301 + 7
    assert mine <= 3 * 8 * -(-n64 // P) + 3 * 4      # at most a slice's worth (+ the float32)
    rep = DistributedOptimizer(fastopt.Adam(copies(params), amsgrad=True), shard=False)
    assert state_nbytes(rep.local_optimizer) == full


# ------------------------------------------------------------ agreement ---

def _different(name):
    """A rank-dependent construction: the last rank differs in `name`."""
    odd = RANK == LAST
    params = make_params()
    if name == "lr":
        return fastopt.Adam(params, lr=2e-3 if odd else 1e-3), False
    if name == "shape":
        if odd:
            params[4] = np.zeros((5, 3))
        return fastopt.Adam(params), False
    if name == "dtype":
        if odd:
            params[6] = params[6].astype(np.float32)
        return fastopt.Adam(params), False
    if name == "class":
        return (fastopt.AdamW if odd else fastopt.Adam)(params), False
    if name == "count":
        return fastopt.Adam(params[:-1] if odd else params), False
    if name == "mode":
        return fastopt.Adam(params), odd
    if name == "amsgrad":
        return fastopt.Adam(params, amsgrad=odd), False
    if name == "values":
        if odd:
            params[7][3, 4] += 1e-9
        return fastopt.Adam(params), False
    raise AssertionError(name)


@pytest.mark.parametrize("name,match", [
    ("lr", r"ranks disagree on param_groups\[0\]\['lr'\]: rank 0 has 0.001, rank \d has 0.002"),
    ("shape", r"ranks disagree on params\[4\]: rank 0 has \('<f8', \(3, 5\)\)"),
    ("dtype", r"ranks disagree on params\[6\]"),
    ("class", r"ranks disagree on optimizer class: rank 0 has 'Adam', rank \d has 'AdamW'"),
    ("count", r"ranks disagree on parameters per group"),
    ("mode", r"ranks disagree on mode: rank 0 has 'replicated', rank \d has 'shard'"),
    ("amsgrad", r"ranks disagree on state\[0\]"),
    ("values", r"ranks disagree on the values of params\[7\]"),
])
def test_construction_mismatch_raises_on_every_rank(name, match):
    if P == 1:
        pytest.skip("needs 2 ranks")
    opt, shard = _different(name)
    with pytest.raises(ValueError, match=match):
        DistributedOptimizer(opt, shard=shard)


def test_construction_error_on_one_rank_raises_on_every_rank():
    opt = fastopt.Adam(make_params())
    with pytest.raises(TypeError, match=rf"optimizer must be a fastopt optimizer.*\(on rank {LAST}\)"):
        DistributedOptimizer("not an optimizer" if RANK == LAST else opt)
    with pytest.raises(TypeError, match=r"shard must be True or False"):
        DistributedOptimizer(opt, shard="yes" if RANK == LAST else True)


def _bad_call(kind, params, grads, dopt):
    if RANK != LAST:
        return grads
    if kind == "dtype":
        grads[6] = grads[6].astype(np.float32)
    elif kind == "shape":
        grads[7] = grads[7].T.copy()
    elif kind == "type":
        grads[3] = grads[3].tolist()
    elif kind == "count":
        grads = grads[:-1]
    elif kind == "none":
        grads[5] = None
    elif kind == "lr":
        dopt.param_groups[0]["lr"] = 0.5
    elif kind == "bad_lr":
        dopt.param_groups[0]["lr"] = -1.0
    return grads


@pytest.mark.parametrize("shard", [False, True], ids=["replicated", "shard"])
@pytest.mark.parametrize("kind,exc,match", [
    ("dtype", TypeError, r"grads\[6\] has dtype float32 but params\[6\] has dtype float64 \(on rank \d\)"),
    ("shape", ValueError, r"grads\[7\] has shape \(31, 33\) but params\[7\] has shape \(33, 31\)"),
    ("type", TypeError, r"grads\[3\] must be a numpy.ndarray or None, got list"),
    ("count", ValueError, r"expected 8 grads"),
    ("none", ValueError, r"ranks disagree on the gradients that are None"),
    ("lr", ValueError, r"ranks disagree on param_groups\[0\]\['lr'\]"),
    ("bad_lr", ValueError, r"lr.*\(on rank \d\)"),
])
def test_bad_step_on_one_rank_raises_on_every_rank_and_changes_nothing(shard, kind, exc, match):
    if P == 1 and kind in ("none", "lr"):
        pytest.skip("needs 2 ranks")
    params = make_params()
    dopt = DistributedOptimizer(fastopt.Adam(params, lr=1e-2), shard=shard)
    dopt.step(rank_grads(params, 0, RANK))
    before, state_before = copies(params), dopt.state_dict()
    grads = _bad_call(kind, params, rank_grads(params, 1, RANK), dopt)
    with pytest.raises(exc, match=match):
        dopt.step(grads)
    for a, b in zip(params, before):
        np.testing.assert_array_equal(a, b)
    state_after = dopt.state_dict()
    if RANK == 0:
        assert_same_state_dict(state_before, state_after)
    dopt.param_groups[0]["lr"] = 1e-2
    dopt.step(rank_grads(params, 1, RANK))           # the ranks are still in step
    assert same_on_every_rank(params)


def test_one_agreement_per_call(monkeypatch):
    """Each collective call starts with one agreement (one 16-byte Allgather)
    naming it; step(grads) is one call, not reduce then step."""
    import fastopt.distributed as d
    calls = []
    agree = d._agree
    monkeypatch.setattr(d, "_agree", lambda comm, op, *a: calls.append(op) or agree(comm, op, *a))
    params = make_params()
    dopt = DistributedOptimizer(fastopt.Adam(params), shard=True)
    for t in range(3):
        dopt.step(rank_grads(params, t, RANK))
    dopt.reduce(rank_grads(params, 3, RANK))
    dopt.clip_grad_norm_(1.0)
    dopt.step()
    dopt.state_dict()
    assert calls == (["DistributedOptimizer(...)"] + ["DistributedOptimizer.step(grads)"] * 3
                     + ["DistributedOptimizer.reduce(grads)",
                        "DistributedOptimizer.clip_grad_norm_(...)",
                        "DistributedOptimizer.step()", "DistributedOptimizer.state_dict()"])


def test_step_after_reduce_checks_the_hyperparameters_again():
    if P == 1:
        pytest.skip("needs 2 ranks")
    params = make_params()
    dopt = DistributedOptimizer(fastopt.SGD(params, lr=0.1))
    dopt.reduce(rank_grads(params, 0, RANK))
    before = copies(params)
    if RANK == LAST:
        dopt.param_groups[0]["lr"] = 0.2
    with pytest.raises(ValueError, match=r"ranks disagree on param_groups\[0\]\['lr'\]"):
        dopt.step()
    for a, b in zip(params, before):
        np.testing.assert_array_equal(a, b)
    dopt.param_groups[0]["lr"] = 0.1
    dopt.step()                                      # still reduced: applies it
    assert same_on_every_rank(params)


# -------------------------------------------------------------- threads ---

def test_threads_default_to_cores_over_ranks_per_node():
    if "OMP_NUM_THREADS" in os.environ:
        pytest.skip("OMP_NUM_THREADS chooses the thread count")
    from fastopt import _runtime
    node = WORLD.Split_type(MPI.COMM_TYPE_SHARED)
    ranks, cpus = node.size, set().union(*node.allgather(os.sched_getaffinity(0)))
    node.Free()
    DistributedOptimizer(fastopt.SGD([np.zeros(3)], lr=0.1))
    want = max(1, len(cpus) // ranks)
    assert fastopt.get_num_threads() == min(_runtime.max_threads(), want)
    shown = fastopt.config()["thread_cap_reason"]
    if ranks > 1:
        assert shown == f"{ranks} MPI ranks share this node's {len(cpus)} CPUs"
    fastopt.set_num_threads(2)                       # the user's choice wins
    try:
        assert fastopt.get_num_threads() == min(_runtime.max_threads(), 2)
        assert fastopt.config()["thread_cap_reason"] is None
    finally:
        fastopt.set_num_threads(None)
    assert fastopt.get_num_threads() == min(_runtime.max_threads(), want)


# -------------------------------------------------------------- sampler ---

def test_sampler_shares_one_permutation():
    sampler = DistributedSampler(103, seed=7)
    shares = WORLD.allgather(sampler.indices(3))
    assert {len(s) for s in shares} == {-(-103 // P)}
    together = np.concatenate(shares)
    perm = np.random.default_rng([7, 3]).permutation(103)
    padded = np.resize(perm, len(together))
    for r in range(P):
        np.testing.assert_array_equal(shares[r], padded[r::P])
    assert set(together.tolist()) == set(range(103))
    assert not np.array_equal(sampler.indices(3), sampler.indices(4))
    with pytest.raises(ValueError, match="ranks disagree on DistributedSampler arguments"):
        DistributedSampler(103, seed=7 if RANK != LAST else 8)


@pytest.mark.parametrize("shard", [False, True], ids=["replicated", "shard"])
def test_training_on_shares_of_each_batch_matches_one_process(shard):
    """Softmax regression: P ranks with batches of b rows from the sampler
    give the single-process run with batches of P*b rows."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((240, 5))
    y = rng.integers(0, 3, 240)
    b = 8

    def run(params, opt, sampler, batch):
        W, c = params
        for epoch in range(2):
            for xb, yb in fastopt.minibatches(X, y, batch, indices=sampler.indices(epoch),
                                              shuffle=False):
                _, dz = fastopt.cross_entropy(xb @ W + c, yb, return_grad=True)
                opt.step([xb.T @ dz, dz.sum(axis=0)])

    init = [rng.standard_normal((5, 3)), np.zeros(3)]
    ref = copies(init)
    run(ref, fastopt.Adam(ref, lr=1e-2),
        DistributedSampler(240, seed=3, rank=0, num_replicas=1), P * b)
    mine = copies(init)
    dopt = DistributedOptimizer(fastopt.Adam(mine, lr=1e-2), shard=shard)
    run(mine, dopt, DistributedSampler(240, seed=3), b)
    assert same_on_every_rank(mine)
    assert_close(mine, ref)
    assert not np.allclose(mine[0], init[0])


# -------------------------------------------------------------- example ---

def test_digits_example_reaches_95_percent_in_both_modes():
    pytest.importorskip("sklearn")
    import importlib.util
    path = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "train_digits_mpi.py")
    spec = importlib.util.spec_from_file_location("train_digits_mpi", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    data = example.load_data(0)
    rep, _ = example.train("adam", data, WORLD, False, verbose=False)
    sh, _ = example.train("adam", data, WORLD, True, verbose=False)
    assert rep == sh                                 # bit-identical training
    assert rep >= 0.95
