"""fastopt.torch's optimizers under torch.distributed: DistributedDataParallel
and ZeroRedundancyOptimizer on two CPU processes (gloo).

Two processes started with torch.multiprocessing train the same float64 model
for a few steps on their halves of each batch; the parameters must be the same
bits on both ranks, and equal (to rtol 1e-12) to those of one process trained
on the whole batches with the same optimizer.  DDP averages the ranks'
gradients of their mean losses, which is the gradient of the whole batch's
mean loss: the runs differ only by the order of additions.  With
ZeroRedundancyOptimizer, the consolidated state dict is the one process's
optimizer state, and resuming from it gives the bits of training on.
Skipped without torch.distributed or its gloo backend.  The processes are started once for all
the tests here (about 5 s, most of it importing torch).
"""
import copy
import datetime
import os
import time
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
fo = pytest.importorskip("fastopt.torch")
dist = pytest.importorskip("torch.distributed")

if not (dist.is_available() and dist.is_gloo_available()):
    pytest.skip("torch.distributed with the gloo backend is not available",
                allow_module_level=True)

with warnings.catch_warnings():
    # importing torch.distributed.optim scripts its functional optimizers with
    # torch.jit, which warns that it is deprecated
    warnings.simplefilter("ignore", DeprecationWarning)
    from torch.distributed.optim import ZeroRedundancyOptimizer  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

import fastopt  # noqa: E402

WORLD = 2
STEPS = 5
BATCH = 6           # per rank
LR = 1e-2
TIMEOUT = 120       # seconds for the two processes, a hang fails the test


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(),
                               torch.nn.Linear(16, 16), torch.nn.Tanh(),
                               torch.nn.Linear(16, 4)).double()


def batches(seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(WORLD * BATCH, 8, generator=g, dtype=torch.float64),
             torch.randn(WORLD * BATCH, 4, generator=g, dtype=torch.float64))
            for _ in range(STEPS)]


def train(model, opt, part=slice(None), seed=1):
    for x, y in batches(seed):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x[part]), y[part]).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def worker(rank, store, out):
    """One rank: every scenario in turn; what it saw goes to out/rank<rank>.pt."""
    torch.set_num_threads(1)
    fastopt.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=TIMEOUT))
    part = slice(rank * BATCH, (rank + 1) * BATCH)
    seen = {}
    try:
        model = DDP(make_model())
        seen["ddp"] = train(model, fo.Adam(model.parameters(), lr=LR), part)

        for view in (False, True):
            def zero(model):
                return ZeroRedundancyOptimizer(model.parameters(), optimizer_class=fo.Adam,
                                               lr=LR, parameters_as_bucket_view=view)
            model = DDP(make_model())
            opt = zero(model)
            seen[f"zero view={view}"] = train(model, opt, part)
            seen[f"zero view={view} local"] = (type(opt.optim).__name__,
                                               len(opt.optim.param_groups[0]["params"]))
            # A checkpoint: the whole state gathered on rank 0 (a copy: the
            # state dict holds the live tensors), then given to every rank.
            opt.consolidate_state_dict(to=0)
            ckpt = [copy.deepcopy(opt.state_dict()) if rank == 0 else None]
            dist.broadcast_object_list(ckpt, src=0)
            # (a copy again: load_state_dict sets the entries other ranks own to None)
            seen[f"zero view={view} state"] = copy.deepcopy(ckpt[0])
            # Training on, and resumed from the checkpoint in a new model and
            # optimizer (ZeroRedundancyOptimizer.load_state_dict assigns each
            # rank's share into its optimizer's state), must give the same bits.
            weights = copy.deepcopy(model.module.state_dict())
            went_on = train(model, opt, part, seed=2)
            resumed = make_model()
            resumed.load_state_dict(weights)
            resumed = DDP(resumed)
            opt = zero(resumed)
            opt.load_state_dict(ckpt[0])
            seen[f"zero view={view} resumed"] = (went_on, train(resumed, opt, part, seed=2))

        model = DDP(make_model())
        try:
            ZeroRedundancyOptimizer(model.parameters(), optimizer_class=fo.Adam, lr=LR,
                                    overlap_with_ddp=True)
        except ValueError as exc:
            seen["overlap"] = str(exc)
        else:
            seen["overlap"] = None
    finally:
        dist.destroy_process_group()
    torch.save(seen, os.path.join(out, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """What each of the two ranks saw."""
    out = tmp_path_factory.mktemp("ddp")
    ctx = torch.multiprocessing.start_processes(
        worker, args=(str(out / "store"), str(out)), nprocs=WORLD, join=False,
        start_method="spawn")
    deadline = time.monotonic() + TIMEOUT
    try:
        while not ctx.join(timeout=1):      # raises if a rank failed
            if time.monotonic() > deadline:
                pytest.fail(f"the {WORLD} processes did not finish in {TIMEOUT} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def single():
    """One process, the whole batches, the same optimizer."""
    model = make_model()
    opt = fo.Adam(model.parameters(), lr=LR)
    return train(model, opt), opt


def assert_same_training(ranks, key, single):
    """The ranks hold the same bits, equal to the one-process run."""
    ref, _ = single
    for a, b in zip(ranks[0][key], ranks[1][key]):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    for a, r in zip(ranks[0][key], ref):
        np.testing.assert_allclose(a.numpy(), r.numpy(), rtol=1e-12, atol=0)
    # and the run went somewhere: the parameters moved from their start
    assert all(not torch.equal(a, p) for a, p in zip(ranks[0][key], make_model().parameters()))


def test_ddp_with_fastopt_adam(ranks, single):
    assert_same_training(ranks, "ddp", single)


@pytest.mark.parametrize("view", [False, True], ids=["params", "bucket_view"])
def test_zero_redundancy_optimizer_with_fastopt_adam(ranks, single, view):
    key = f"zero view={view}"
    assert_same_training(ranks, key, single)
    # each rank's fastopt.torch.Adam stepped its own share of the parameters
    local = [r[f"{key} local"] for r in ranks]
    assert [name for name, _ in local] == ["Adam", "Adam"]
    assert all(n > 0 for _, n in local)
    assert sum(n for _, n in local) == len(single[0])
    # the consolidated state dict is the one-process optimizer's state
    ref = single[1].state_dict()
    got = ranks[0][f"{key} state"]
    assert len(got["state"]) == len(ref["state"])
    for i, st in ref["state"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            np.testing.assert_allclose(got["state"][i][name].numpy(), st[name].numpy(),
                                       rtol=1e-10, atol=0)
        assert float(got["state"][i]["step"]) == STEPS
    # resuming from it gives the bits of training on
    for r in ranks:
        went_on, resumed = r[f"{key} resumed"]
        for a, b in zip(went_on, resumed):
            np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_zero_overlap_with_ddp_is_refused_clearly(ranks):
    # overlap_with_ddp=True steps a functional optimizer that torch derives
    # from a torch.optim class it knows; it refuses other classes when built.
    for r in ranks:
        assert r["overlap"] is not None, "overlap_with_ddp=True was accepted"
        assert "functional optimizer" in r["overlap"]
        assert "fastopt.torch.Adam" in r["overlap"]
