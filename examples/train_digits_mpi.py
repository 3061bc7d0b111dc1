#!/usr/bin/env python
"""Train the digits MLP data-parallel over MPI, one process per rank.

    mpiexec -n 2 python -m mpi4py examples/train_digits_mpi.py        # Adam, both modes
    mpiexec -n 2 python -m mpi4py examples/train_digits_mpi.py --mode shard --optimizer momentum
    python examples/train_digits_mpi.py                               # one process

``python -m mpi4py`` runs the script so that an uncaught exception or
Ctrl-C on any rank ends the whole job (MPI_Abort) in about a second;
with plain ``python``, that rank would exit and the others would wait
for it forever in their next collective.

The model, data and optimizers are those of ``examples/train_digits.py``
(``fastopt/demo.py``).  Every step, each rank takes its share of the batch
(``--batch-size`` rows split across the ranks, from `DistributedSampler`),
computes the gradients of it, and `DistributedOptimizer` averages them over
the ranks and updates the parameters, which stay bit-identical on every
rank.  BatchNorm normalizes each rank's share with that share's statistics
(as PyTorch's DistributedDataParallel without SyncBatchNorm); the running
statistics used for testing are averaged over the ranks after every epoch.

Needs ``pip install "fastopt[mpi,examples]"`` (mpi4py and MPICH,
scikit-learn).
"""
import argparse
import sys
import time

import numpy as np
from mpi4py import MPI

import fastopt
from fastopt.demo import DEFAULT_LR, MLP, OPTIMIZERS, load_data, make_optimizer
from fastopt.distributed import DistributedOptimizer, DistributedSampler


def train(name, data, comm, shard, *, epochs=15, batch_size=64, lr=None, decay=0.95,
          hidden=(128, 64), seed=0, verbose=True):
    """Train a fresh MLP on `data` over the ranks of `comm`; returns the final
    test accuracy and the seconds taken (the same on every rank)."""
    X_train, y_train, X_test, y_test = data
    P = comm.Get_size()
    local = batch_size // P                       # each rank's share of a batch
    if local < 2:
        raise ValueError(f"--batch-size {batch_size} leaves fewer than 2 rows per rank "
                         f"(BatchNorm needs 2) on {P} ranks")
    rng = np.random.default_rng(seed)             # the same initial weights on every rank
    model = MLP((X_train.shape[1], *hidden, int(y_train.max()) + 1), rng, dtype=X_train.dtype)
    opt = make_optimizer(name, model.params, DEFAULT_LR[name] if lr is None else lr)
    dopt = DistributedOptimizer(opt, comm, shard=shard)
    sched = fastopt.lr_scheduler.ExponentialLR(dopt, gamma=decay)
    sampler = DistributedSampler(len(X_train), comm, seed=seed)
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        losses = []
        # Every rank has as many indices (the sampler pads), so every rank
        # makes the same number of steps; drop_last skips a short last
        # batch (BatchNorm statistics of a few rows are noisy).
        for xb, yb in fastopt.minibatches(X_train, y_train, local, indices=sampler.indices(epoch),
                                          shuffle=False, drop_last=True):
            loss, grads = model.loss_and_grads(xb, yb)
            dopt.step(grads)
            losses.append(loss)
        sched.step()
        for stats in model.running:               # BatchNorm running mean and variance
            for a in stats:
                comm.Allreduce(MPI.IN_PLACE, a)
                a /= P
        loss = comm.allreduce(float(np.mean(losses))) / P
        acc = model.accuracy(X_test, y_test)
        if verbose and comm.Get_rank() == 0:
            print(f"{name:>8} {'shard' if shard else 'replicated':>10}  epoch {epoch:3d}  "
                  f"loss {loss:.4f}  test accuracy {acc:6.2%}", flush=True)
    return acc, comm.bcast(time.perf_counter() - start)


def main(argv=None):
    p = argparse.ArgumentParser(prog="train_digits_mpi.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adam")
    p.add_argument("--mode", choices=("replicated", "shard", "both"), default="both")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=64, help="rows per step over all ranks")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--decay", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-accuracy", type=float, default=None,
                   help="exit with status 1 if a final test accuracy is below this")
    args = p.parse_args(argv)
    comm = MPI.COMM_WORLD
    root = comm.Get_rank() == 0
    data = load_data(args.seed)                   # the same split on every rank
    modes = ["replicated", "shard"] if args.mode == "both" else [args.mode]
    results = {}
    for mode in modes:
        results[mode] = train(args.optimizer, data, comm, mode == "shard", epochs=args.epochs,
                              batch_size=args.batch_size, lr=args.lr, decay=args.decay,
                              seed=args.seed)
    if root:
        print(f"\n{comm.Get_size()} rank(s), {fastopt.get_num_threads()} thread(s) each, "
              f"batches of {args.batch_size // comm.Get_size() * comm.Get_size()} rows")
        for mode, (acc, seconds) in results.items():
            print(f"{args.optimizer} {mode:>10}: test accuracy {acc:.2%} ({seconds:.1f} s)")
    low = args.min_accuracy is not None and min(a for a, _ in results.values()) < args.min_accuracy
    return 1 if low else 0


if __name__ == "__main__":
    sys.exit(main())
