"""Tests that need several MPI ranks (see conftest.py)."""
