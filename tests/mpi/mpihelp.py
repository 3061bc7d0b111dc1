"""Helpers of the MPI tests: the same model on every rank, each rank's
gradients, and the single-process reference (the mean over ranks)."""
import hashlib
import io

import numpy as np
from mpi4py import MPI

import fastopt
from fastopt.distributed import DistributedOptimizer
# Every optimizer and option: the single-process tests' cases (pytest puts
# tests/ on sys.path for tests/mpi too).
from test_optimizers import CASE_IDS, CASES

WORLD = MPI.COMM_WORLD
RANK = WORLD.rank

# 0-d, empty, tiny and SIMD-tail arrays and two larger ones: with 2 or 3
# ranks the slice boundaries fall inside arrays, and some ranks own no
# element of the small ones.
SHAPES = [(), (0,), (1,), (17,), (3, 5), (7, 1, 2), (1000,), (33, 31)]


def make_params(shapes=SHAPES, dtypes=(np.float64,), seed=0):
    """The same initial parameters on every rank (dtypes cycle over the arrays)."""
    rng = np.random.default_rng(seed)
    return [np.array(rng.standard_normal(s), dtypes[i % len(dtypes)]) for i, s in enumerate(shapes)]


def copies(arrays):
    return [a.copy() for a in arrays]


def rank_grads(params, step, rank, none=(), seed=1):
    """Rank `rank`'s gradients at `step` (None at the indices in `none`)."""
    rng = np.random.default_rng([seed, step, rank])
    return [None if i in none else np.array(rng.standard_normal(p.shape), p.dtype)
            for i, p in enumerate(params)]


def mean_grads(params, step, nranks, none=(), seed=1):
    """The single-process gradient: the mean of the ranks' gradients."""
    per_rank = [rank_grads(params, step, r, none, seed) for r in range(nranks)]
    out = []
    for i in range(len(params)):
        if i in none:
            out.append(None)
            continue
        total = per_rank[0][i].copy()
        for r in range(1, nranks):
            total += per_rank[r][i]
        total /= nranks
        out.append(total)
    return out


def exact_grads(params, step, rank, nranks, seed=2):
    """Gradients whose mean over ranks is exactly ``base`` for any number of
    ranks and any order of summation: ``base + c_r * d`` with small dyadic
    base and d and weights c_r summing to zero ([0], [1, -1], [1, -1, 0]...)."""
    rng = np.random.default_rng([seed, step])
    c = [0, 0] if nranks == 1 else ([1, -1] + [0] * (nranks - 2))
    out = []
    for p in params:
        base = rng.integers(-64, 65, p.shape) / 64.0
        d = rng.integers(-64, 65, p.shape) / 64.0
        out.append(np.array(base + c[rank] * d, p.dtype))
    return out


def none_at(step, n):
    """Which gradients are None at `step`: parameter 2 always, another every third step."""
    return {2} | ({step % n} if step % 3 == 0 else set())


def with_groups(cls, kw, params):
    """The optimizer of a case over two param groups (the second at half the
    lr), the parameters in the order of `params`."""
    lr = kw.get("lr", cls(params[:1], **kw).defaults["lr"])
    return cls([{"params": params[:4]},
                {"params": params[4:], "lr": lr / 2}], **kw)


def exact(params, t, comm, grad_dtype=None):
    """This rank's gradients at step t (None at `none_at`): their mean over
    the ranks of `comm` is exact, the same for any number of ranks."""
    gs = exact_grads(params, t, comm.rank, comm.size)
    return [None if i in none_at(t, len(params)) else
            (g if grad_dtype is None else g.astype(grad_dtype)) for i, g in enumerate(gs)]


def run(opt, params, ts, comm, grads=exact, **kw):
    """Steps `ts` of `opt` (an optimizer: comm is one rank; or a wrapper),
    halving the lr at step 7 (it must be in checkpoints)."""
    for t in ts:
        if t == 7:
            opt.param_groups[0]["lr"] *= 0.5
        opt.step(grads(params, t, comm, **kw))


def digest(arrays):
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def same_on_every_rank(arrays, comm=WORLD):
    """True if `arrays` are bit-identical on every rank of `comm`."""
    return len(set(comm.allgather(digest(arrays)))) == 1


def state_nbytes(opt):
    return sum(a.nbytes for st in opt.state for a in st.values())


def bits(a):
    a = np.ascontiguousarray(a)
    return a.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def differences(got, want, what):
    """What differs between two lists of arrays, bit for bit (dtypes too)."""
    out = []
    for i, (a, b) in enumerate(zip(got, want)):
        if a.dtype != b.dtype or a.shape != b.shape or not np.array_equal(bits(a), bits(b)):
            out.append(f"{what}[{i}] differs")
    return out


def sd_differences(got, want, what):
    """What differs between two state dicts, bit for bit."""
    if got.keys() != want.keys():
        return [f"{what}: keys {sorted(set(got) ^ set(want))}"]
    out = []
    for k in want:
        a, b = got[k], want[k]
        if isinstance(b, np.ndarray) and b.dtype.kind in "fV" and b.ndim:
            out += differences([a], [b], f"{what}[{k!r}]")
        elif not np.array_equal(a, b):
            out.append(f"{what}[{k!r}]: {a!r} != {b!r}")
    return out


def assert_none(problems):
    """Every rank's `problems`, gathered: the test fails on every rank or on none."""
    everyone = [p for r, mine in enumerate(WORLD.allgather(problems)) for p in
                (f"rank {r}: {x}" for x in mine)]
    assert not everyone, "\n".join(everyone[:20])


def sub(n):
    """A communicator of ranks 0..n-1 (MPI.COMM_NULL on the others)."""
    return WORLD.Split(0 if RANK < n else MPI.UNDEFINED)


def saved_on(n, make, params, ts, shard=False):
    """Steps `ts` of DistributedOptimizer(make(params)) on ranks 0..n-1, then
    its state dict saved through np.savez: (the bytes, `params` as saved),
    rank 0's, on every rank."""
    saved = None
    comm = sub(n)
    if comm != MPI.COMM_NULL:
        dopt = DistributedOptimizer(make(params), comm, shard=shard)
        run(dopt, params, ts, comm)
        sd = dopt.state_dict()
        comm.Free()
        if sd is not None:
            buf = io.BytesIO()
            np.savez(buf, **sd)
            saved = buf.getvalue()
    return WORLD.bcast((saved, params if RANK == 0 else None), root=0)


def load_saved(dopt, saved, comm):
    """`saved` (of `saved_on`) loaded into `dopt` (rank 0 reads it)."""
    dopt.load_state_dict(dict(np.load(io.BytesIO(saved))) if comm.rank == 0 else None)


def goes_on_as(dopt, params, ts, comm, ref, ref_params):
    """Steps `ts` of `dopt` over `params` on `comm` (freed after), then what
    differs from the one-process run `ref` over `ref_params` (parameters and
    state dict, bit for bit) and across the ranks."""
    run(dopt, params, ts, comm)
    final = dopt.state_dict()
    everywhere = same_on_every_rank(params, comm)
    comm.Free()
    problems = [] if everywhere else ["the parameters differ across ranks"]
    problems += differences(params, ref_params, "params")
    if final is not None:
        problems += sd_differences(final, ref.state_dict(), "state_dict")
    return problems


__all__ = ["WORLD", "RANK", "SHAPES", "CASES", "CASE_IDS", "make_params", "copies",
           "rank_grads", "mean_grads", "exact_grads", "none_at", "with_groups", "exact", "run",
           "digest",
           "same_on_every_rank", "state_nbytes", "bits", "differences", "sd_differences",
           "assert_none", "sub", "saved_on", "load_saved", "goes_on_as", "DistributedOptimizer",
           "MPI"]
