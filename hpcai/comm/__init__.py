"""Collectives on mpi4py's buffer methods (besides the strategies' *_comm modules, the only MPI users)."""

from hpcai.comm.ring import ring_allreduce

__all__ = ["ring_allreduce"]
