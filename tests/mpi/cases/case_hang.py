"""For the runner's own test: the last rank skips a collective, the others wait in it."""
from mpi4py import MPI


def test_last_rank_skips_a_barrier():
    comm = MPI.COMM_WORLD
    if comm.rank != comm.size - 1:
        comm.Barrier()
