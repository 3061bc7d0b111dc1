"""A data-parallel job with a fault, for the tests of how such a job ends.

    mpiexec -n 2 python -m mpi4py tests/mpi/cases/faults.py SCENARIO

(tests/test_distributed.py runs it through tools/run_mpi_tests.py --script.)
The last rank is the faulty one.  Scenarios that end the job:

- ``raise-between``: it raises between ``reduce(grads)`` and ``step()``
  (an uncaught exception in the training script, while the other ranks
  wait in ``step()``);
- ``raise-in-step``: its update raises inside ``step(grads)``, and the
  script, catching the errors of ``step``, would go on to the next step;
- ``sigint-between``: it gets SIGINT between ``reduce`` and ``step``;
- ``sigint-in-step``: it gets SIGINT inside ``step(grads)``'s update.

and ``mismatches``, in which ranks call different collective operations
(rank 0 one, the others another) and every rank prints the error it got
as ``error: <type>: <message>``, then checks that the ranks are still in
step.  The faulty rank prints ``fault at <time.time()>`` just before a
fault, so that the test can tell how long the job took to end after it.
"""
import os
import signal
import sys
import time

import numpy as np
from mpi4py import MPI

import fastopt
from fastopt.distributed import DistributedOptimizer, DistributedSampler

WORLD = MPI.COMM_WORLD
RANK, LAST = WORLD.rank, WORLD.size - 1


def fault():
    print(f"fault at {time.time():.3f}", flush=True)


def model(shard):
    rng = np.random.default_rng(0)
    params = [rng.standard_normal(s) for s in [(30, 20), (20,), (20, 5), (5,)]]
    return params, DistributedOptimizer(fastopt.Adam(params, lr=1e-2), shard=shard)


def grads_of(params, t):
    rng = np.random.default_rng([t, RANK])
    return [rng.standard_normal(p.shape) for p in params]


def faulty_update(dopt, what):
    """Make the last rank's update raise `what` (inside step, after the agreement)."""
    if RANK != LAST:
        return

    def update(grads):
        fault()
        if what == "sigint":
            os.kill(os.getpid(), signal.SIGINT)     # KeyboardInterrupt at the next bytecode
            time.sleep(5)
        raise RuntimeError(f"deliberate failure in the update on rank {RANK}")

    dopt.local_optimizer.step = update


def ends_the_job(scenario):
    shard = scenario.endswith("in-step")             # both modes between the scenarios
    params, dopt = model(shard)
    dopt.step(grads_of(params, 0))
    if scenario.endswith("in-step"):
        faulty_update(dopt, scenario.split("-")[0])
        for t in range(1, 5):
            try:
                dopt.step(grads_of(params, t))
            except Exception as e:                   # a forgiving loop: it would go on
                print(f"step {t} failed, going on: {e}", flush=True)
    else:
        dopt.reduce(grads_of(params, 1))
        if RANK == LAST:
            fault()
            if scenario == "sigint-between":
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(5)
            raise RuntimeError(f"deliberate failure between reduce and step on rank {RANK}")
        dopt.step()
    print("the job went on after the fault", flush=True)


def mismatches():
    """Each case: rank 0 calls one operation, the others another."""
    def case(name, first, others):
        if RANK == LAST:
            fault()
        try:
            (first if RANK == 0 else others)()
        except Exception as e:
            print(f"error: {type(e).__name__}: {e}", flush=True)
        else:
            print(f"error: none in {name}", flush=True)

    for shard in (False, True):
        params, dopt = model(shard)
        dopt.step(grads_of(params, 0))
        case(f"state_dict vs step, shard={shard}", dopt.state_dict,
             lambda: dopt.step(grads_of(params, 1)))
        dopt.reduce(grads_of(params, 1))
        case(f"clip vs step, shard={shard}", lambda: dopt.clip_grad_norm_(1.0), dopt.step)
        dopt.step()                                  # the reduced gradients are still there
        case(f"sampler vs step, shard={shard}", lambda: DistributedSampler(10),
             lambda: dopt.step(grads_of(params, 2)))
        case(f"reduce vs step, shard={shard}", lambda: dopt.reduce(grads_of(params, 2)),
             lambda: dopt.step(grads_of(params, 2)))
        sd = dopt.state_dict()
        case(f"load_state_dict vs state_dict, shard={shard}",
             lambda: dopt.load_state_dict(sd), dopt.state_dict)
        dopt.step(grads_of(params, 3))
        digests = WORLD.allgather(b"".join(p.tobytes() for p in params))
        print(f"still in step: {len(set(digests)) == 1}", flush=True)


def main(argv):
    scenario = argv[0] if argv else ""
    if scenario == "mismatches":
        mismatches()
    elif scenario in ("raise-between", "raise-in-step", "sigint-between", "sigint-in-step"):
        ends_the_job(scenario)
    else:
        print(f"unknown scenario {scenario!r}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
