"""Tests of fastopt.distributed that need several MPI ranks.

They run only under an MPI launcher, every rank running the same tests in
the same order (each test calls collectives)::

    python tools/run_mpi_tests.py            # mpiexec -n 2, then -n 3, with a timeout

or by hand, ``mpiexec -n 3 python -m pytest tests/mpi -q``.  A plain
``python -m pytest`` does not collect them (it runs
``tests/test_distributed.py``, and the launch test there runs this runner).
"""
import importlib.util
import os

# Set by MPICH's hydra, Open MPI and PMIx launchers in each rank's environment.
_LAUNCHED = any(k in os.environ for k in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK"))

if not _LAUNCHED or importlib.util.find_spec("mpi4py") is None:
    collect_ignore_glob = ["test_*.py"]
