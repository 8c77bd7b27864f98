"""The rank layout: one immutable object, built once per run and passed explicitly.

For synchronous data parallelism every rank is a data replica (``dp_rank == rank``). Later strategies
(pipeline stages x replicas, servers vs workers) add their axes and sub-communicators here.
"""

from __future__ import annotations

from dataclasses import dataclass

from mpi4py import MPI


@dataclass(frozen=True)
class Topology:
    world: MPI.Comm
    rank: int
    world_size: int
    local_rank: int
    dp_comm: MPI.Comm
    dp_rank: int
    dp_size: int

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    @classmethod
    def data_parallel(cls, world: MPI.Comm | None = None) -> Topology:
        world = world if world is not None else MPI.COMM_WORLD
        # Ranks on the same node, for picking a local device later (cuda:<local_rank>).
        node = world.Split_type(MPI.COMM_TYPE_SHARED)
        local_rank = node.Get_rank()
        node.Free()
        # A duplicate keeps our collectives' messages apart from anything the user's code sends on COMM_WORLD.
        dp = world.Dup()
        return cls(world, world.Get_rank(), world.Get_size(), local_rank, dp, dp.Get_rank(), dp.Get_size())
