"""Collectives written on mpi4py's buffer methods (the only package besides the strategies that imports MPI)."""

from hpcai.comm.ring import ring_allreduce

__all__ = ["ring_allreduce"]
