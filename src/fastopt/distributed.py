"""Data-parallel training over MPI: fastopt's optimizers on many processes.

Every process (rank) holds the whole model, computes the gradients of its
share of each batch, and calls ``dopt.step(grads)``; the wrapper averages the
gradients over the ranks and applies the same fused update everywhere, so the
parameters stay bit-identical on every rank::

    from mpi4py import MPI             # mpiexec -n 4 python -m mpi4py train.py
    import fastopt
    from fastopt.distributed import DistributedOptimizer, DistributedSampler

    opt = fastopt.Adam(params, lr=1e-3)           # built the same way on every rank
    dopt = DistributedOptimizer(opt, shard=True)
    sampler = DistributedSampler(len(X), seed=0)
    for epoch in range(epochs):
        for xb, yb in fastopt.minibatches(X, y, batch_size // dopt.size,
                                          indices=sampler.indices(epoch), shuffle=False):
            dopt.step(backward(xb, yb))           # this rank's gradients, in parameter order

MPI moves bytes, fastopt does the math.  The parameters of each dtype form
one flat space of elements (all parameters, in order), split by elements
into P contiguous slices, slice r belonging to rank r.  A step is:

1. a check that every rank made the same call, valid, with the same
   hyperparameters and the same None gradients (one Allgather of 16 bytes
   per rank; on a mismatch or a bad gradient on any rank, every rank
   raises the same error, before any large message);
2. ``Reduce_scatter``: rank r receives the sum of everyone's gradients over
   its slice, from one contiguous buffer per dtype (the gradients
   themselves when they are views of one buffer laid out like the
   parameters, as `fastopt.flat_views` makes them; else packed into one);
   the sum is divided by P there, on the slice only (1/P of a pass over the
   gradient bytes);
3. ``shard=False`` (replicated, as Horovod): ``Allgather`` of the mean
   gradient, then the wrapped optimizer's fused step on every rank over
   the whole model.  ``shard=True`` (ZeRO stage 1): the fused step of an
   optimizer of the same class over this rank's slice only (state for 1/P
   of the elements), then ``Allgather`` of the updated parameters.

Every element of the mean gradient is summed once, by its owner, and then
copied, so every rank gets the same bits whatever the MPI library's
reduction order (the MPI standard only recommends, for Allreduce, that all
ranks get the same result); the update kernels are deterministic
(elementwise, or, Adafactor's, summing in a fixed order).  A
bandwidth-optimal Allreduce is itself a reduce-scatter plus an allgather,
so this costs no extra bytes: each rank sends and receives about 2 (P-1)/P
times the gradient bytes per step, in both modes.

Every optimizer class of ``fastopt.optim`` but Adafactor works in both
modes: their updates are elementwise, so a slice steps as the whole would.
Adafactor works replicated only (``shard=True`` refuses it with a
ValueError): its second-moment statistics are factored over whole rows and
columns of each parameter (``row_var``, ``col_var``) and its update takes
norms of whole parameters, so neither its state nor its step cuts into
element slices.  Replicated, every rank steps the wrapped Adafactor over
the whole model, each parameter in its own shape, with the mean gradient:
the bits of one process (16-bit parameters and their float32 masters
included); its factored state is small anyway (a row and a column per
matrix), so sharding it would save little.  The numbers of a
parameter's state besides its arrays (NAdam's ``mu_product``, ASGD's
``eta`` and ``mu``: one 0-d float32 array each) are not cut: in shard mode
every rank keeps the whole of each and updates it at every step of the
parameter, even when it owns none of its elements, so they are the same on
every rank; checkpoints carry them as the single-process format does.

Low precision (float16/bfloat16 parameters, ``state_dtype="bfloat16"``)
works in both modes, with the bits of one process stepping with the mean
gradient, on every rank and for any P:

* The gradient of a 16-bit parameter has its dtype or float32 (the ranks
  must agree on which; a float32 one makes the gradients of its dtype
  cross the wire in float32).  MPI would sum 16-bit values in 16 bits (and
  knows no bfloat16), so step 2 is an ``Alltoallv`` instead: rank r
  receives every rank's part of its slice as it was given (16 bits on the
  wire: the bytes a reduce-scatter sends) and sums them in float32, in
  rank order, then divides by P.  The mean gradient is float32
  ``(g_0 + g_1 + ... + g_{P-1}) / P``: P changes it only by the float32
  rounding of a longer sum, and every rank gets the owner's bits.
* Replicated: the ``Allgather`` of step 3 sends that float32 mean (twice
  the bytes of 16-bit gradients), and every rank steps its whole copy of
  the float32 masters (``state[i]["master_param"]``) and of the state.
* Shard: the masters are sharded with the state (each rank's optimizer
  holds those of its slice, the update writes its slice of the 16-bit
  parameters), and the ``Allgather`` sends the 16-bit parameters.
* Stochastic rounding of bfloat16 state draws each element's random bits
  from (seed, parameter, step count, position in the parameter), and each
  rank's optimizer is told where its slices lie in the model (the private
  ``_sr_keys`` of `fastopt.optim.Optimizer.with_params`): the bits, so the
  results, do not depend on how the model is cut.  Rounding to nearest
  needs no bits.

State bytes per element, held by each rank (Adam: two state arrays; divide
by P for ``shard=True``): float32 parameters, 8 (float32 state) or 4
(bfloat16 state); float16/bfloat16 parameters, 8 + 4 or 4 + 4 (the state
and the master).  In shard mode the wrapped optimizer also keeps, on every
rank, the whole float32 masters it wrote when it was built (4 bytes per
element); the state arrays of a fresh one are never written (zero pages:
address space, not memory).

`clip_grad_norm_` clips the mean gradient by its global norm between
`reduce` and `step`; `state_dict`/`load_state_dict` use the single-process
format (masters, bfloat16 state, its rounding and seed included), so a
checkpoint moves between any numbers of ranks.

Every collective call (construction, `reduce`, `step`, `clip_grad_norm_`,
`state_dict`, `load_state_dict`, and `DistributedSampler`'s construction)
starts with that same 16-byte agreement, which names the operation: ranks
that call different ones (one ``state_dict()`` while another steps) all
raise the same RuntimeError naming both, instead of matching one call's
messages with another's.  Once the ranks have agreed, an exception on one
rank (a bug, MemoryError, Ctrl-C) would leave the others waiting in a
collective forever: the rank prints its traceback and ends the whole job
with ``comm.Abort(1)``.  Launch with ``mpiexec -n 4 python -m mpi4py
train.py`` so that an exception or Ctrl-C anywhere else in a rank's script
ends the job too.

Constructing a `DistributedOptimizer` caps each rank's kernels at
``max(1, cores // ranks_on_this_node)`` threads unless ``OMP_NUM_THREADS``
or `fastopt.set_num_threads` chose (``fastopt.show_config()`` says so).

Needs mpi4py and an MPI library (``pip install "fastopt[mpi]"``); importing
this module does not import mpi4py, using it does.
"""
import contextlib
import hashlib
import numbers
import os
import sys
import time
import traceback

import numpy as np

from . import _config
from . import _optim as _kernels
from .optim import Optimizer

__all__ = ["DistributedOptimizer", "DistributedSampler"]


def _mpi():
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise ImportError('fastopt.distributed needs mpi4py and an MPI library: '
                          'pip install "fastopt[mpi]"') from e
    return MPI


def _world(comm):
    return _mpi().COMM_WORLD if comm is None else comm


# ----------------------------------------------------------- agreement ---

_ERROR_TYPES = {t.__name__: t for t in (TypeError, ValueError, RuntimeError, KeyError, IndexError)}


def _digest(value):
    """A 64-bit digest of repr(value), the same in every process (unlike hash())."""
    h = hashlib.blake2b(repr(value).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little", signed=True)


# Every collective call of this module starts with the same message, whatever
# the operation (see _agree), so ranks that make different calls meet there
# and learn so.  The codes only need to be the same in every process.
_OPERATIONS = ("DistributedOptimizer(...)", "DistributedOptimizer.reduce(grads)",
               "DistributedOptimizer.step(grads)", "DistributedOptimizer.step()",
               "DistributedOptimizer.clip_grad_norm_(...)", "DistributedOptimizer.state_dict()",
               "DistributedOptimizer.load_state_dict(...)", "DistributedSampler(...)")


def _agree(comm, op, error, facts=()):
    """Turn a local outcome into a collective one.

    Every rank calls this at the start of collective operation `op` (one of
    `_OPERATIONS`) with the exception its own checks raised (or None) and
    `facts`, ``(label, value)`` pairs that must be equal on every rank.
    One Allgather of 16 bytes per rank (the operation's code, whether this
    rank failed, a digest of the facts) tells every rank the same thing.
    Returns None if every rank called `op`, is fine and all agree.  Else it
    returns the exception every rank raises: a RuntimeError naming the
    operations if ranks called different ones; the failing ranks' messages
    (the type of the first); or a ValueError naming the first fact on which
    ranks differ.  Nobody is left waiting in a later collective.
    """
    facts = list(facts)
    row = np.array([2 * _OPERATIONS.index(op) + (error is not None), _digest(facts)], np.int64)
    table = np.empty((comm.Get_size(), 2), np.int64)
    comm.Allgather(row, table)
    codes, digests = table[:, 0] // 2, table[:, 1]
    # Different operations: the table says it all (and the ranks' next
    # messages would not match).
    if (codes != codes[0]).any():
        return RuntimeError(_mixed_operations(codes))
    if not (table[:, 0] % 2).any() and (digests == digests[0]).all():
        return None
    # Every rank takes this branch: they all see the same table.
    mine = (type(error).__name__, str(error)) if error is not None else None
    infos = comm.allgather((mine, facts if (digests != digests[0]).any() else None))
    failed = [(r, info[0]) for r, info in enumerate(infos) if info[0] is not None]
    if failed:
        messages = {}
        for r, (_, msg) in failed:
            messages.setdefault(msg, []).append(r)
        text = "; ".join(f"{msg} ({_on_ranks(rs)})" for msg, rs in messages.items())
        return _ERROR_TYPES.get(failed[0][1][0], RuntimeError)(text)
    return ValueError(_disagreement([info[1] for info in infos]))


def _on_ranks(ranks):
    return f"on rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"


def _mixed_operations(codes):
    """'ranks called different collective operations: X (on rank 0); Y (on rank 1)...'"""
    calls = {}
    for r, c in enumerate(codes.tolist()):
        calls.setdefault(c, []).append(r)
    listed = "; ".join(f"{_OPERATIONS[c] if 0 <= c < len(_OPERATIONS) else f'operation {c}'} "
                       f"({_on_ranks(rs)})" for c, rs in calls.items())
    return (f"ranks called different collective operations: {listed}; every rank must make "
            "the same collective calls in the same order")


@contextlib.contextmanager
def _collective(comm, op, error=None, facts=()):
    """The frame of every collective operation: agree, then run the body.

    First `_agree`: if it finds a fault, every rank raises the same
    exception (chained to this rank's own `error`, if any) and the body does
    not run.  Then the body, whose messages every rank now expects: an
    exception in it on one rank (a bug, MemoryError, KeyboardInterrupt)
    would leave the others waiting for them, so the rank prints the
    traceback and aborts the job (``comm.Abort(1)``).  The body may set
    ``guard.armed = False`` once its last message is through, if what
    follows is the same on every rank (then an exception is raised on all).
    """
    guard = _Guard(comm, op)
    try:
        agreed = _agree(comm, op, error, facts)
    except BaseException:
        guard.abort()
    if agreed is not None:
        if error is not None:
            raise agreed from error
        raise agreed
    try:
        yield guard
    except BaseException:
        if guard.armed:
            guard.abort()
        raise


class _Guard:
    """What `_collective` does with an exception: abort while `armed`."""

    def __init__(self, comm, op):
        self.comm, self.op, self.armed = comm, op, True

    def abort(self):
        """Print the exception being handled and abort the job."""
        traceback.print_exc()
        print(f"fastopt.distributed: {self.op} failed on rank {self.comm.Get_rank()} amid its "
              "messages; the other ranks would wait for it forever in a collective: aborting "
              "the job (MPI_Abort)", file=sys.stderr, flush=True)
        self.comm.Abort(1)
        os._exit(1)     # MPICH's MPI_Abort may return before the launcher ends the job


def _disagreement(all_facts):
    """'ranks disagree on <label>: rank 0 has ..., rank r has ...' for the first difference."""
    ref = all_facts[0]
    for r, facts in enumerate(all_facts[1:], 1):
        for k in range(max(len(ref), len(facts))):
            a = ref[k] if k < len(ref) else ("(nothing)", None)
            b = facts[k] if k < len(facts) else ("(nothing)", None)
            if a != b:
                if a[0] != b[0]:
                    return (f"ranks disagree: rank 0 has {a[0]} = {a[1]!r} where rank {r} "
                            f"has {b[0]} = {b[1]!r}")
                return f"ranks disagree on {a[0]}: rank 0 has {a[1]!r}, rank {r} has {b[1]!r}"
    return "ranks disagree"       # only on a digest collision


def _hash(*arrays):
    """A short digest of the bytes of `arrays`, the same in every process."""
    h = hashlib.blake2b(digest_size=8)
    for a in arrays:
        h.update(np.ascontiguousarray(a).view(np.uint8).data)
    return h.hexdigest()


def _plain(v):
    """v with numbers as Python floats (and bools as bools), for comparing
    values across ranks: 1, 1.0 and np.float64(1.0) are the same setting."""
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, numbers.Real):
        return float(v)
    if isinstance(v, (tuple, list, np.ndarray)):
        return tuple(_plain(x) for x in v)
    return v


def _hyper_facts(groups):
    return [(f"param_groups[{gi}][{k!r}]", _plain(v))
            for gi, g in enumerate(groups) for k, v in sorted(g.items()) if k != "params"]


# ------------------------------------------------------------- layout ---

def _root(a):
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


def _span(arrays):
    """If `arrays` lie in order, without overlap, in one C-contiguous buffer:
    ``(span, offsets)``, span a 1-D view of that buffer from the first
    array's start to the last one's end and offsets the arrays' element
    offsets in it.  Else None."""
    first = arrays[0]
    dtype, item = first.dtype, first.dtype.itemsize
    first = next((a for a in arrays if a.size), first)
    root = _root(first)
    if not (root.flags.c_contiguous and first.flags.aligned):
        return None
    base = root.ctypes.data
    start = end = first.ctypes.data
    offsets = []
    for a in arrays:
        if a.dtype != dtype or not a.flags.c_contiguous:
            return None
        if a.size == 0:             # no elements: any place will do, and its address is no clue
            offsets.append((end - start) // item)
            continue
        if _root(a) is not root:
            return None
        addr = a.ctypes.data
        if addr < end or (addr - start) % item or addr + a.nbytes > base + root.nbytes:
            return None
        offsets.append((addr - start) // item)
        end = addr + a.nbytes
    raw = root.reshape(-1).view(np.uint8)
    return raw[start - base:end - base].view(dtype), offsets


def _bits(a):
    """`a` as MPI moves it: 16-bit floats as their bits (MPI has no bfloat16)."""
    return a.view(np.uint16) if a is not None and a.dtype.itemsize == 2 else a


class _Flat:
    """The parameters of one dtype as one flat space of `length` elements
    (parameter k of `index` at ``offsets[k]``), split by elements into one
    contiguous slice per rank: ``counts[r]`` elements from ``displs[r]``."""

    def __init__(self, dtype, index, params, offsets, pspan, rank, size):
        self.dtype = dtype
        self.index = index
        self.params = params
        self.offsets = offsets
        self.sizes = [p.size for p in params]
        self.length = max([o + n for o, n in zip(offsets, self.sizes)], default=0)
        share = -(-self.length // size)
        self.counts = [min(share, max(0, self.length - r * share)) for r in range(size)]
        self.displs = [min(r * share, self.length) for r in range(size)]
        self.rank = rank
        self.lo = self.displs[rank]
        self.hi = self.lo + self.counts[rank]
        # Parameter k's part of this rank's slice, in its own elements.
        self.pieces = [(min(max(self.lo - o, 0), n), min(max(self.hi - o, 0), n))
                       for o, n in zip(offsets, self.sizes)]
        self.pspan = pspan              # the parameters' own buffer, if laid out like this
        # float16/bfloat16 parameters: gradients summed in float32, their compute dtype.
        self.half = dtype.itemsize == 2
        self.gdtype = np.dtype(np.float32) if self.half else dtype
        self.slice = np.zeros(self.counts[rank], self.gdtype)   # mean gradient of this slice
        self.bufs = {}                  # whole-length buffers by dtype, made when needed
        self.grads = None               # the gradient arrays of the last span check
        self.gspan = None
        self.size = size
        # Alltoallv: rank q's contribution to this slice lands at q * count.
        c = self.counts[rank]
        self.rspec = ([c] * size, [q * c for q in range(size)])

    def whole(self, dtype=None):
        """A buffer of `length` elements of `dtype` (the parameters' by default),
        made once and reused: packing, and the replicated mean gradient."""
        dtype = self.dtype if dtype is None else np.dtype(dtype)
        if dtype not in self.bufs:
            self.bufs[dtype] = np.zeros(self.length, dtype)
        return self.bufs[dtype]

    def received(self, dtype):
        """The buffer every rank's part of this slice arrives in (P of them)."""
        key = ("received", np.dtype(dtype))
        if key not in self.bufs:
            self.bufs[key] = np.zeros(self.size * self.counts[self.rank], dtype)
        return self.bufs[key]

    def vspec(self, buf):
        """An mpi4py buffer spec of `buf` split into the ranks' slices."""
        return [buf, (self.counts, self.displs)]

    def slice_view(self, k):
        """Parameter k's piece of this rank's slice of the mean gradient (1-D)."""
        lo, hi = self.pieces[k]
        start = self.offsets[k] + lo - self.lo
        return self.slice[start:start + hi - lo]

    def send_buffer(self, grads, wire):
        """This rank's gradients of these parameters as one buffer of dtype
        `wire` in this layout: their own memory if they are laid out so (and
        of that dtype), else packed into `whole(wire)`."""
        mine = [grads[i] for i in self.index]
        if self.grads is None or any(a is not b for a, b in zip(mine, self.grads)):
            self.grads, self.gspan = mine, None
            if all(g is not None for g in mine) and mine:
                found = _span(mine)
                if found is not None and found[1] == self.offsets:
                    self.gspan = found[0]
        if self.gspan is not None and self.gspan.dtype == wire:
            return self.gspan
        buf = self.whole(wire)
        for g, o, n in zip(mine, self.offsets, self.sizes):
            if g is not None:
                np.copyto(buf[o:o + n].reshape(g.shape), g)
        return buf


# -------------------------------------------------------------- threads ---

def _cap_threads(comm):
    """Default each rank to max(1, cores // ranks on this node) threads.

    The cores are the union of the CPU sets of the node's ranks: if the MPI
    launcher binds each rank to its own cores, each keeps its own.
    """
    MPI = _mpi()
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        mine = (sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                else list(range(os.cpu_count() or 1)))
        sets = node.allgather(mine)
    finally:
        node.Free()
    ranks = len(sets)
    cores = len(set().union(*map(set, sets)))
    if ranks > 1:
        _config._set_default_cap(max(1, min(len(mine), cores // ranks)),
                                 f"{ranks} MPI ranks share this node's {cores} CPUs")
    else:
        _config._set_default_cap(0, None)


# ------------------------------------------------------------ optimizer ---

def _no_shard(opt):
    """Why `opt` (of a kind whose state is not shaped like its parameters,
    `fastopt._kinds.Kind.shaped`) cannot be sharded, and what to do."""
    kind = opt._kind
    factored = [s.name for s in kind.slots if s.shape in ("rows", "cols")]
    return (f"shard=True does not support {type(opt).__name__}: its second-moment "
            f"statistics ({', '.join(factored)}) are factored over whole rows and columns "
            "of each parameter, and its update needs the norms of whole parameters, so its "
            "state does not cut into the contiguous element slices that shard=True gives "
            "each rank; use shard=False (replicated mode: every rank keeps the whole, "
            "small, factored state and steps the whole model with the mean gradient)")


class DistributedOptimizer:
    """Data-parallel steps of a fastopt optimizer over MPI ranks.

    Parameters
    ----------
    optimizer : fastopt.optim.Optimizer
        Built the same way on every rank, with parameters holding the same
        values (all checked here: class, parameter shapes, dtypes and
        values, param groups, hyperparameters, state and low-precision
        options; broadcast the values first, ``comm.Bcast(p, root=0)``, if
        ranks initialized them differently).  Its ``param_groups`` stay the
        place to change hyperparameters between steps (LR schedulers may be
        given either it or this wrapper).  Training goes on from its state
        (step counts and float32 masters included).  With ``shard=True``
        each rank copies its slice of that state at construction, and the
        optimizer's own state arrays are not used afterwards (a fresh
        optimizer's are zero pages NumPy allocated and never wrote, so they
        take address space, not memory; the masters of 16-bit parameters
        were written when it was built): step, checkpoint and inspect
        through this wrapper.
    comm : mpi4py.MPI.Intracomm, optional
        The ranks that train together; ``MPI.COMM_WORLD`` by default.
    shard : bool
        False: every rank keeps the whole optimizer state and steps the
        whole model.  True: every rank keeps the state of its slice of the
        parameters only (1/P of it) and steps only that slice.  Both give
        the same parameters, bit for bit.  Only for optimizers whose state is
        elementwise: Adafactor's (factored over whole rows and columns) is
        not, and ``shard=True`` raises ValueError for it, with nothing
        changed; use ``shard=False``.

    Attributes
    ----------
    optimizer : the wrapped optimizer.
    local_optimizer : Optimizer
        The optimizer this rank steps: `optimizer` itself (replicated), or
        one of its class over 1-D views of this rank's slice of every
        parameter (shard; a parameter outside the slice gets an empty view).
        Its ``state`` is this rank's optimizer state.
    rank, size : int
    timings : dict
        Seconds spent in each phase of the last step: ``check``, ``pack``,
        ``reduce_scatter`` (the ``Alltoallv`` for 16-bit parameters),
        ``scale`` (the division by P, after the float32 sum for 16-bit
        parameters), ``allgather``, ``update``, ``unpack``.

    Notes
    -----
    Construction, `reduce`, `step`, `clip_grad_norm_`, `state_dict` and
    `load_state_dict` are collective: every rank makes the same calls in
    the same order.  Each starts with one small message that names it, so
    ranks that make different calls all raise the same RuntimeError naming
    them.  An exception on one rank after that message (once the others
    may be waiting in a collective for it) prints its traceback and aborts
    the job (``comm.Abort(1)``).
    """

    def __init__(self, optimizer, comm=None, shard=False):
        MPI = _mpi()
        comm = _world(comm)
        if not isinstance(comm, MPI.Intracomm):
            raise TypeError(f"comm must be an mpi4py intracommunicator, got {type(comm).__name__}")
        self.comm = comm
        self._MPI = MPI
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.timings = {}
        error, facts, candidates = None, [], []
        try:
            if not isinstance(optimizer, Optimizer):
                raise TypeError("optimizer must be a fastopt optimizer (fastopt.Adam, ...), "
                                f"got {type(optimizer).__name__}")
            if not isinstance(shard, (bool, np.bool_)):
                raise TypeError(f"shard must be True or False, got {shard!r}")
            if shard and optimizer._kind.shaped:
                raise ValueError(_no_shard(optimizer))
            params = [p for g in optimizer.param_groups for p in g["params"]]
            optimizer._bound()          # its state as its next step would use it (edits applied)
            facts = self._describe(optimizer, params, bool(shard))
            # Per dtype, the parameters' own layout if they lie in one buffer.
            for dt in dict.fromkeys(p.dtype for p in params):
                found = _span([p for p in params if p.dtype == dt])
                candidates.append(None if found is None else found[1])
        except Exception as e:          # every rank must hear of it
            error = e
        with _collective(comm, "DistributedOptimizer(...)", error, facts):
            self._setup(optimizer, params, bool(shard), candidates)

    def _setup(self, optimizer, params, shard, candidates):
        """The construction, once the ranks agreed (`candidates`: this rank's
        layout of each dtype's parameters in one buffer, or None)."""
        self.optimizer = optimizer
        self.shard = shard
        self._params = params
        # A dtype's parameters are communicated in their own buffer (no
        # copies) if every rank has them laid out the same way; else packed.
        use_own = [len(set(map(repr, c))) == 1 and c[0] is not None
                   for c in zip(*self.comm.allgather(candidates))]
        self._flats = []
        for k, dt in enumerate(dict.fromkeys(p.dtype for p in params)):
            index = [i for i, p in enumerate(params) if p.dtype == dt]
            mine = [params[i] for i in index]
            if use_own[k]:
                pspan, offsets = _span(mine)
            else:
                pspan, offsets = None, list(np.cumsum([0] + [p.size for p in mine[:-1]]).tolist())
            self._flats.append(_Flat(dt, index, mine, offsets, pspan, self.rank, self.size))
        self._where = {}                    # parameter -> (flat, position in it)
        for f in self._flats:
            for k, i in enumerate(f.index):
                self._where[i] = (f, k)
        # Named in every later agreement: ranks that step different
        # optimizers (of different models) are told so.
        n = sum(p.size for p in params)
        self._name = (f"{type(optimizer).__name__} over {len(params)} parameters "
                      f"({n} elements), {'shard' if self.shard else 'replicated'}")
        if self.shard:
            # Elementwise kinds only (a `shaped` one was refused): each rank's
            # optimizer steps 1-D views of its slices as the whole would.
            views, keys = [], []
            for i, p in enumerate(params):
                f, k = self._where[i]
                lo, hi = f.pieces[k]
                views.append(p.reshape(-1)[lo:hi])
                keys.append((i, lo))        # stochastic rounding: the bits of the whole model
            self.local_optimizer = local = optimizer.with_params(views, _sr_keys=keys)
            # Continue from the wrapped optimizer's state (master copies
            # included), as the replicated mode does: each rank its slice of
            # the arrays, and the whole of each per-parameter number.
            scalars = self._scalar_names
            for i, st in enumerate(optimizer.state):
                f, k = self._where[i]
                lo, hi = f.pieces[k]
                for name, arr in local.state[i].items():
                    arr[...] = st[name] if name in scalars else st[name].reshape(-1)[lo:hi]
            local._steps[...] = optimizer.steps
        else:
            self.local_optimizer = optimizer
            for f in self._flats:
                f.whole(f.gdtype)
        self._pending = None                # None mask of reduced, not yet applied grads
        _cap_threads(self.comm)

    @staticmethod
    def _describe(opt, params, shard):
        facts = [("mode", "shard" if shard else "replicated"),
                 ("optimizer class", type(opt).__name__),
                 ("number of param groups", len(opt.param_groups)),
                 ("parameters per group", [len(g["params"]) for g in opt.param_groups])]
        facts += [(f"params[{i}]", (p.dtype.str, p.shape)) for i, p in enumerate(params)]
        facts.append(("state_dtype", opt.state_dtype))
        if opt.state_dtype is not None:
            facts += [("state_rounding", opt.state_rounding), ("seed", opt.seed)]
        # The starting values too (one hash of each array): ranks that
        # initialized with different seeds would silently train apart.
        facts += [(f"the values of params[{i}] (blake2b)", _hash(p)) for i, p in enumerate(params)]
        facts += [(f"state[{i}]", tuple(st)) for i, st in enumerate(opt.state)]
        # ... and of the state (the float32 masters of 16-bit parameters included).
        steps = opt.steps
        facts += [(f"the state of params[{i}] (step count, blake2b of the arrays)",
                   (int(steps[i]), _hash(*st.values()))) for i, st in enumerate(opt.state)]
        return facts + _hyper_facts(opt.param_groups)

    # --------------------------------------------------------- properties

    @property
    def param_groups(self):
        """The wrapped optimizer's param groups (hyperparameters; an LR
        scheduler may be given this wrapper)."""
        return self.optimizer.param_groups

    @property
    def lr(self):
        return self.optimizer.lr

    @lr.setter
    def lr(self, value):
        self.optimizer.lr = value

    @property
    def steps(self):
        """Per-parameter step counts (the same on every rank)."""
        return self.local_optimizer.steps

    def __repr__(self):
        mode = "shard" if self.shard else "replicated"
        return (f"DistributedOptimizer({type(self.optimizer).__name__}, rank {self.rank} of "
                f"{self.size}, {mode})")

    # --------------------------------------------------------------- step

    def reduce(self, grads):
        """Average this rank's `grads` with every other rank's (collective).

        Afterwards `clip_grad_norm_` may clip the mean gradient; `step()`
        applies it.  `grads` is one array or None per parameter, in order,
        like the wrapped optimizer's ``step``; they are only read.  Every
        rank checks its call first and all ranks agree before any large
        message: a bad gradient, another set of None gradients or other
        hyperparameters on any rank raise the same TypeError/ValueError on
        every rank, and nothing changes.
        """
        t0 = time.perf_counter()
        grads, error, facts = self._reduce_checks(grads)
        with self._collective("DistributedOptimizer.reduce(grads)", error, facts):
            self._reduce(grads, t0)

    def _reduce_checks(self, grads):
        """(grads, error, facts) of a reduce on this rank, for the agreement."""
        error, facts = None, []
        try:
            grads = self._check(grads)
            facts = [("the gradients that are None",
                      tuple(i for i, g in enumerate(grads) if g is None))]
            if any(f.half for f in self._flats):     # the dtype on the wire
                facts.append(("the gradients given in float32", tuple(
                    i for i, g in enumerate(grads)
                    if g is not None and g.dtype != self._params[i].dtype)))
            facts += _hyper_facts(self.optimizer.param_groups)
        except Exception as e:
            error = e
        return grads, error, facts

    def _collective(self, op, error=None, facts=()):
        return _collective(self.comm, op, error,
                           [("which DistributedOptimizer", self._name), *facts])

    def _reduce(self, grads, t0):
        """Reduce_scatter of checked, agreed `grads`: this rank's slices of their mean."""
        t1 = time.perf_counter()
        pack = rs = scale = 0.0
        for f in self._flats:
            a = time.perf_counter()
            send = f.send_buffer(grads, self._wire(f, grads))
            b = time.perf_counter()
            if f.half:
                # MPI would sum 16-bit gradients in 16 bits: each rank receives
                # everyone's part of its slice instead (as many bytes as a
                # reduce-scatter sends) and sums them in float32, in rank order.
                got = f.received(send.dtype)
                self.comm.Alltoallv([_bits(send), (f.counts, f.displs)], [_bits(got), f.rspec])
                c = time.perf_counter()
                n = f.counts[self.rank]
                np.copyto(f.slice, got[:n])
                for q in range(1, self.size):
                    np.add(f.slice, got[q * n:(q + 1) * n], out=f.slice)
            else:
                self.comm.Reduce_scatter(send, f.slice, f.counts)
                c = time.perf_counter()
            if self.size > 1:                              # mean = sum / P, own slice only
                np.divide(f.slice, self.size, out=f.slice)
            pack, rs, scale = pack + b - a, rs + c - b, scale + time.perf_counter() - c
        self._pending = [g is None for g in grads]
        self.timings = {"check": t1 - t0, "pack": pack, "reduce_scatter": rs, "scale": scale}

    @staticmethod
    def _wire(f, grads):
        """The dtype of flat `f`'s gradients on the wire: the parameters' own,
        or float32 if a gradient of a 16-bit parameter is float32."""
        if f.half and any(grads[i] is not None and grads[i].dtype == np.float32
                          for i in f.index):
            return np.dtype(np.float32)
        return f.dtype

    def _check(self, grads):
        if not isinstance(grads, (list, tuple)):
            raise TypeError(f"grads must be a list or tuple of arrays, got {type(grads).__name__}")
        n = len(self._params)
        if len(grads) != n:
            raise ValueError(f"expected {n} grads (one per parameter, in order; None skips a "
                             f"parameter), got {len(grads)}")
        for i, (g, p) in enumerate(zip(grads, self._params)):
            if g is None:
                continue
            if not isinstance(g, np.ndarray):
                raise TypeError(f"grads[{i}] must be a numpy.ndarray or None, got {type(g).__name__}")
            if g.dtype != p.dtype and not (p.dtype.itemsize == 2 and g.dtype == np.float32):
                also = " (or float32)" if p.dtype.itemsize == 2 else ""
                raise TypeError(f"grads[{i}] has dtype {g.dtype} but params[{i}] has dtype "
                                f"{p.dtype}{also}")
            if g.shape != p.shape:
                raise ValueError(f"grads[{i}] has shape {g.shape} but params[{i}] has shape {p.shape}")
        # Hyperparameters are checked before any message, too.
        self.optimizer.check_param_groups()
        return list(grads)

    def clip_grad_norm_(self, max_norm, norm_type=2.0, error_if_nonfinite=False):
        """Clip the mean gradient by its global norm, between `reduce` and `step`.

        The norm is that of the mean gradient over all parameters (as
        `fastopt.clip_grad_norm_` of it in one process): each rank computes
        its slice's partial with the same kernel, one small allgather
        collects them and every rank adds them in rank order, so all get
        the same norm.  Returns it.  Every rank must pass the same
        arguments (checked).
        """
        error, facts = None, []
        try:
            if self._pending is None:
                raise RuntimeError("clip_grad_norm_() needs the reduced gradients: call "
                                   "reduce(grads) first")
            _kernels.clip_grad_norm_([], max_norm, norm_type)   # the kernel's own argument checks
            facts = [("clip_grad_norm_ arguments",
                      (float(max_norm), float(norm_type), bool(error_if_nonfinite)))]
        except Exception as e:
            error = e
        with self._collective("DistributedOptimizer.clip_grad_norm_(...)", error, facts) as guard:
            pieces = [self._grad_piece(i) for i, skip in enumerate(self._pending) if not skip]

            def allgather(partial):
                parts = self.comm.allgather(partial)
                # The last message: every rank now computes the same norm,
                # and raises (error_if_nonfinite) or not, together.
                guard.armed = False
                return parts

            return _kernels.clip_grad_norm_(pieces, max_norm, norm_type, error_if_nonfinite,
                                            allgather=allgather)

    def _grad_piece(self, i):
        f, k = self._where[i]
        return f.slice_view(k)

    def step(self, grads=None):
        """One optimizer step with the mean of every rank's gradients (collective).

        ``step(grads)`` is ``reduce(grads)`` then ``step()``; ``step()`` alone
        applies gradients already reduced (and perhaps clipped).
        """
        if grads is not None:
            t0 = time.perf_counter()
            grads, error, facts = self._reduce_checks(grads)
            with self._collective("DistributedOptimizer.step(grads)", error, facts):
                self._reduce(grads, t0)
                self._apply()
            return
        error, facts = None, []
        try:
            if self._pending is None:
                raise RuntimeError("step() without grads applies reduced gradients: call "
                                   "reduce(grads) first, or pass grads")
            # The hyperparameters may have changed since reduce().
            self.optimizer.check_param_groups()
            facts = _hyper_facts(self.optimizer.param_groups)
        except Exception as e:
            error = e
        with self._collective("DistributedOptimizer.step()", error, facts):
            self._apply()

    def _apply(self):
        skip, self._pending = self._pending, None
        if self.shard:
            self._step_shard(skip)
        else:
            self._step_replicated(skip)

    def _step_replicated(self, skip):
        t0 = time.perf_counter()
        for f in self._flats:
            self.comm.Allgatherv(f.slice, f.vspec(f.whole(f.gdtype)))
        t1 = time.perf_counter()
        grads = []
        for i, p in enumerate(self._params):
            f, k = self._where[i]
            o = f.offsets[k]
            mean = f.whole(f.gdtype)
            grads.append(None if skip[i] else mean[o:o + p.size].reshape(p.shape))
        self.optimizer.step(grads)
        self.timings.update(allgather=t1 - t0, update=time.perf_counter() - t1, unpack=0.0)

    def _step_shard(self, skip):
        t0 = time.perf_counter()
        local = self.local_optimizer
        for mine, theirs in zip(local.param_groups, self.optimizer.param_groups):
            mine.update({k: v for k, v in theirs.items() if k != "params"})
        local.step([None if skip[i] else self._grad_piece(i) for i in range(len(skip))])
        t1 = time.perf_counter()
        ag, unpack = self._allgather_params(self._flats)
        self.timings.update(update=t1 - t0, allgather=ag, unpack=unpack)

    def _allgather_params(self, flats):
        """Shard: every rank's slice of the parameters of `flats` to every rank,
        in their own dtype; returns the seconds of (allgather, unpacking)."""
        ag = unpack = 0.0
        for f in flats:
            a = time.perf_counter()
            if f.pspan is not None:         # the parameters' own buffer: in place
                self.comm.Allgatherv(self._MPI.IN_PLACE, f.vspec(_bits(f.pspan)))
                b = c = time.perf_counter()
            else:
                buf = f.whole()
                for p, (lo, hi), o in zip(f.params, f.pieces, f.offsets):
                    buf[o + lo:o + hi] = p.reshape(-1)[lo:hi]
                self.comm.Allgatherv(self._MPI.IN_PLACE, f.vspec(_bits(buf)))
                b = time.perf_counter()
                for p, o, n in zip(f.params, f.offsets, f.sizes):
                    np.copyto(p, buf[o:o + n].reshape(p.shape))
                c = time.perf_counter()
            ag, unpack = ag + b - a, unpack + c - b
        return ag, unpack

    # ----------------------------------------------------------- checkpoints

    def state_dict(self):
        """The whole optimizer state in the single-process format (collective).

        Replicated: every rank returns it (each holds it all).  Shard: the
        ranks send their slices to rank 0, which returns the assembled dict;
        the other ranks return None (so that no rank but 0 ever holds the
        whole state).  Save it from rank 0::

            sd = dopt.state_dict()
            if dopt.rank == 0:
                np.savez(path, **sd)
        """
        with self._collective("DistributedOptimizer.state_dict()"):
            return self._state_dict()

    def _state_dict(self):
        if not self.shard:
            return self.optimizer.state_dict()
        local = self.local_optimizer
        self._sync_groups()
        full = {}
        for f, name, dtype in self._slots():
            send = np.zeros(f.counts[self.rank], dtype)
            for k, i in enumerate(f.index):
                if name in local.state[i]:
                    lo, hi = f.pieces[k]
                    start = f.offsets[k] + lo - f.lo
                    send[start:start + hi - lo] = local.state[i][name]
            recv = np.empty(f.length, dtype) if self.rank == 0 else None
            self.comm.Gatherv(_bits(send), f.vspec(_bits(recv)) if self.rank == 0 else None,
                              root=0)
            full[f.dtype, name] = recv
        if self.rank != 0:
            return None
        sd = local.state_dict()         # the per-parameter numbers: rank 0's, everyone's
        for i, p in enumerate(self._params):
            f, k = self._where[i]
            o = f.offsets[k]
            for name in local.state[i]:
                if name not in self._scalar_names:
                    sd[f"state.{i}.{name}"] = full[f.dtype, name][o:o + p.size].reshape(p.shape)
        return sd

    def load_state_dict(self, state_dict):
        """Load a state dict in the single-process format (collective).

        Rank 0's `state_dict` is used (the other ranks may pass None): it is
        checked there against the wrapped optimizer, any error is raised on
        every rank with nothing changed, then each rank receives its part
        (its slice with ``shard=True``, everything otherwise).  A dict saved
        by any number of ranks, or by a single process, loads on any number
        of ranks.
        """
        error = groups = steps = arrays = rounding = None
        if self.rank == 0:
            try:
                sd = dict(state_dict)
                groups, steps, arrays, rounding = self.optimizer.check_state_dict(sd)
            except Exception as e:
                error = e
        with self._collective("DistributedOptimizer.load_state_dict(...)", error):
            self._load_state_dict(groups, steps, arrays, rounding)

    def _load_state_dict(self, groups, steps, arrays, rounding):
        """Send each rank its part of rank 0's checked `groups`, `steps`,
        `arrays` and `rounding`."""
        if self.rank == 0:
            hypers = [{k: v for k, v in g.items() if k != "params"} for g in groups]
            # The per-parameter numbers (NAdam's mu_product, ASGD's eta and
            # mu): every rank keeps the whole of each, in either mode.
            numbers = {key: arrays[key] for key in arrays
                       if key.rsplit(".", 1)[1] in self._scalar_names}
        else:
            hypers, steps, numbers = None, None, None
        hypers, steps, rounding, numbers = self.comm.bcast((hypers, steps, rounding, numbers),
                                                           root=0)
        for g, new in zip(self.optimizer.param_groups, hypers):
            params = g["params"]
            g.clear()
            g.update(new, params=params)
        local = self.local_optimizer
        self._sync_groups()
        mine = local.state_dict()
        for i in range(len(self._params)):
            mine[f"state.{i}.step"] = int(steps[i])
        mine.update(numbers)
        if "state_dtype" in mine:
            mine["state_rounding"], mine["seed"] = rounding
        for f, name, dtype in self._slots():
            length, offsets, sizes = self._state_layout(f, name)
            whole = np.zeros(length, dtype) if self.rank == 0 else None
            if self.rank == 0:
                for k, i in enumerate(f.index):
                    key = f"state.{i}.{name}"
                    if key in arrays:
                        whole[offsets[k]:offsets[k] + sizes[k]] = arrays[key].reshape(-1)
            if self.shard:
                part = np.empty(f.counts[self.rank], dtype)
                self.comm.Scatterv(f.vspec(_bits(whole)) if self.rank == 0 else None,
                                   _bits(part), root=0)
            else:
                part = whole if self.rank == 0 else np.empty(length, dtype)
                self.comm.Bcast(_bits(part), root=0)
            for k, i in enumerate(f.index):
                if name in local.state[i]:
                    lo, hi = f.pieces[k] if self.shard else (0, sizes[k])
                    start = offsets[k] + lo - (f.lo if self.shard else 0)
                    piece = part[start:start + hi - lo]
                    mine[f"state.{i}.{name}"] = piece.reshape(local.state[i][name].shape)
        local.load_state_dict(mine)     # writes 16-bit parameters from their masters
        if self.shard:
            self.optimizer._fused.set_rounding(*rounding)     # checked; cannot fail
            # Each rank wrote its slice of the 16-bit parameters: share them.
            self._allgather_params([f for f in self._flats if f.half])

    @property
    def _scalar_names(self):
        """The per-parameter numbers of the optimizer's state besides its
        arrays (NAdam's mu_product, ASGD's eta and mu): not sliced, each rank
        keeps the whole of each (they are the same on every rank)."""
        return self.optimizer._kind.scalar_names

    def _slots(self):
        """(flat, state name, dtype) for every kind of state array (float32
        masters included) that some parameter of the flat has, in an order
        every rank agrees on."""
        local = self.local_optimizer
        out = []
        for f in self._flats:
            for name in (*local._slot_names, "master_param"):
                have = [local.state[i][name] for i in f.index if name in local.state[i]]
                if have:
                    out.append((f, name, have[0].dtype))
        return out

    def _state_layout(self, f, name):
        """Where the state arrays `name` of the parameters of flat `f` lie in
        the one buffer that carries them: ``(length, offsets, sizes)``, by
        position in the flat.  Shard: as the parameters lie in the flat (the
        state of a kind that shards is shaped like its parameter, and the
        buffer is cut into the ranks' slices).  Replicated: one after the
        other, by the arrays' own sizes, which need not be their
        parameters' (Adafactor's row and column statistics)."""
        if self.shard:
            return f.length, f.offsets, f.sizes
        state = self.local_optimizer.state
        sizes = [state[i][name].size if name in state[i] else 0 for i in f.index]
        offsets = np.cumsum([0] + sizes[:-1]).tolist()
        return sum(sizes), offsets, sizes

    def _sync_groups(self):
        if self.shard:
            for mine, theirs in zip(self.local_optimizer.param_groups, self.optimizer.param_groups):
                mine.update({k: v for k, v in theirs.items() if k != "params"})


# -------------------------------------------------------------- sampler ---

class DistributedSampler:
    """Each rank's share of every epoch's shuffled example indices.

    The role of PyTorch's ``DistributedSampler``: every rank draws the same
    permutation of ``range(num_examples)`` for an epoch (from `seed` and the
    epoch number) and takes every P-th index from its rank on.  Batches of
    ``b`` rows from each of P ranks then make up exactly the single-process
    batches of ``P * b`` rows of that permutation::

        sampler = DistributedSampler(len(X), seed=0)
        for xb, yb in fastopt.minibatches(X, y, b, indices=sampler.indices(epoch),
                                          shuffle=False):
            ...

    Unless `drop_last`, the permutation is padded with its own first indices
    to a multiple of P so that every rank has the same number of examples
    (as PyTorch); with `drop_last` its tail is dropped instead.

    Parameters
    ----------
    num_examples : int
    comm : mpi4py.MPI.Intracomm, optional
        Gives the rank and the number of ranks (``MPI.COMM_WORLD`` by
        default); construction checks that every rank passed the same
        arguments (one small allgather).
    shuffle : bool
        False: the examples in order (still split across ranks).
    seed : int
    drop_last : bool
    rank, num_replicas : int, optional
        Instead of `comm` (no MPI needed).
    """

    def __init__(self, num_examples, comm=None, *, shuffle=True, seed=0, drop_last=False,
                 rank=None, num_replicas=None):
        if (rank is None) != (num_replicas is None):
            raise TypeError("pass both rank and num_replicas, or neither (to use comm)")
        error = None
        try:
            self.num_examples = _count(num_examples, "num_examples", 0)
            self.seed = _count(seed, "seed", 0)
            if rank is not None:
                self.num_replicas = _count(num_replicas, "num_replicas", 1)
                self.rank = _count(rank, "rank", 0)
                if self.rank >= self.num_replicas:
                    raise ValueError(f"rank must be < num_replicas = {self.num_replicas}, got {rank}")
        except Exception as e:
            if rank is not None:
                raise
            error = e
        if rank is None:
            comm = _world(comm)
            with _collective(comm, "DistributedSampler(...)", error,
                             [("DistributedSampler arguments",
                               _plain((num_examples, shuffle, seed, drop_last)))]):
                pass
            self.rank, self.num_replicas = comm.Get_rank(), comm.Get_size()
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        P = self.num_replicas
        per_rank = self.num_examples // P if self.drop_last else -(-self.num_examples // P)
        self.num_samples = per_rank
        self.total_size = per_rank * P

    def __len__(self):
        return self.num_samples

    def indices(self, epoch):
        """This rank's example indices for `epoch` (int64, `num_samples` of them)."""
        epoch = _count(epoch, "epoch", 0)
        n = self.num_examples
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(n)
        else:
            order = np.arange(n, dtype=np.int64)
        if self.total_size > n:            # pad with the first indices (n >= 1 here)
            order = np.resize(order, self.total_size)
        return np.ascontiguousarray(order[self.rank:self.total_size:self.num_replicas],
                                    dtype=np.int64)


def _count(value, name, low):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return int(value)
