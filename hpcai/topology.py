"""The rank layout: one immutable object, built once per run and passed explicitly.

For synchronous data parallelism every rank is a data replica (``dp_rank == rank``). A parameter-server job
(``train.strategy = "ps"``) splits the world into servers (ranks ``0..R-1``) and workers (``R..N-1``):
rank 0 is server 0, which writes the run directory's shared files::

    world   0 1 | 2 3 4 5        R = 2 servers, W = 4 workers
    role    s s | w w w w        ps_comm: a Dup of the world for the servers' point-to-point messages
                                 server_comm: the servers only (checkpoint gathers); workers get COMM_NULL
"""

from __future__ import annotations

from dataclasses import dataclass

from mpi4py import MPI

from hpcai.errors import SpecError


@dataclass(frozen=True)
class Topology:
    world: MPI.Comm
    rank: int
    world_size: int
    local_rank: int
    dp_comm: MPI.Comm
    dp_rank: int
    dp_size: int
    # Parameter-server layout (n_servers == 0: not a parameter-server job).
    n_servers: int = 0
    ps_comm: MPI.Comm | None = None
    server_comm: MPI.Comm | None = None

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    @property
    def is_server(self) -> bool:
        return self.rank < self.n_servers

    @property
    def n_workers(self) -> int:
        return self.world_size - self.n_servers

    @property
    def server_ranks(self) -> range:
        return range(self.n_servers)

    @property
    def worker_ranks(self) -> range:
        return range(self.n_servers, self.world_size)

    @property
    def worker_index(self) -> int:
        """This worker's place among the workers (its share of every global batch); -1 on a server."""
        return self.rank - self.n_servers if not self.is_server else -1

    @classmethod
    def data_parallel(cls, world: MPI.Comm | None = None) -> Topology:
        world = world if world is not None else MPI.COMM_WORLD
        # A duplicate keeps our collectives' messages apart from anything the user's code sends on COMM_WORLD.
        dp = world.Dup()
        return cls(
            world, world.Get_rank(), world.Get_size(), _local_rank(world), dp, dp.Get_rank(), dp.Get_size()
        )

    @classmethod
    def param_server(cls, n_servers: int, world: MPI.Comm | None = None) -> Topology:
        """Servers ``0..n_servers-1``, the rest workers; ``dp_*`` describe the workers (data replicas)."""
        world = world if world is not None else MPI.COMM_WORLD
        size, rank = world.Get_size(), world.Get_rank()
        if not 1 <= n_servers < size:
            raise SpecError(
                f"ps.servers = {n_servers} needs at least {n_servers + 1} ranks, the world has {size}"
            )
        ps = world.Dup()
        is_server = rank < n_servers
        # Collective over the world: every rank calls Split; each side gets its own communicator.
        side = world.Split(0 if is_server else 1, rank)
        server_comm = side if is_server else MPI.COMM_NULL
        dp_comm = side if not is_server else MPI.COMM_NULL
        dp_rank = rank - n_servers if not is_server else -1
        return cls(
            world,
            rank,
            size,
            _local_rank(world),
            dp_comm,
            dp_rank,
            size - n_servers,
            n_servers,
            ps,
            server_comm,
        )


def _local_rank(world: MPI.Comm) -> int:
    # Ranks on the same node, for picking a local device later (cuda:<local_rank>).
    node = world.Split_type(MPI.COMM_TYPE_SHARED)
    local_rank = node.Get_rank()
    node.Free()
    return local_rank
