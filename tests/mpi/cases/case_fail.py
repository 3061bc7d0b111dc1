"""For the runner's own test: passes on every rank but the last."""
from mpi4py import MPI


def test_fails_on_the_last_rank():
    comm = MPI.COMM_WORLD
    comm.Barrier()
    assert comm.rank != comm.size - 1, "deliberate failure on the last rank"
