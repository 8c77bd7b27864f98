"""The rank layout: one immutable object, built once per run and passed explicitly.

Synchronous data parallelism: every rank is a data replica (``dp_rank == rank``), one pipeline stage.

Pipeline x data parallelism (``Topology.pipeline(stages, replicas)``): world rank ``r`` is stage
``r % stages`` of replica ``r // stages``, so one pipeline's ranks are neighbours (on one node where the
launcher fills nodes in order: activations travel further than gradients averaged once a step)::

    stages 2 x replicas 2:    replica 0: rank 0 (stage 0) -> rank 1 (stage 1)
                              replica 1: rank 2 (stage 0) -> rank 3 (stage 1)
    pp_comm (along a pipeline): {0, 1}, {2, 3}      dp_comm (a stage's replicas): {0, 2}, {1, 3}

A parameter-server job (``Topology.param_server(R)``, ``train.strategy = "ps"``) splits the world into
servers (ranks ``0..R-1``) and workers (``R..N-1``); rank 0 is server 0, which writes the run directory's
shared files::

    world   0 1 | 2 3 4 5        R = 2 servers, W = 4 workers
    role    s s | w w w w        ps_comm: a Dup of the world for the servers' point-to-point messages
                                 server_comm: the servers only (checkpoint gathers); workers get COMM_NULL
"""

from __future__ import annotations

from dataclasses import dataclass

from mpi4py import MPI

from hpcai.errors import SpecError, UserError


@dataclass(frozen=True)
class Topology:
    world: MPI.Comm
    rank: int
    world_size: int
    local_rank: int
    dp_comm: MPI.Comm  # this rank's data replicas (for a pipeline: the same stage in every replica)
    dp_rank: int
    dp_size: int
    # Pipeline axis; data parallelism alone is one stage on a communicator of its own.
    pp_comm: MPI.Comm | None = None  # the ranks of this rank's pipeline, ordered by stage
    pp_rank: int = 0  # this rank's stage
    pp_size: int = 1  # stages
    job_comm: MPI.Comm | None = None  # a duplicate of world: whole-job collectives (metrics, checkpoints)
    # Parameter-server layout (n_servers == 0: not a parameter-server job).
    n_servers: int = 0
    ps_comm: MPI.Comm | None = None
    server_comm: MPI.Comm | None = None

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    def describe(self) -> str:
        if self.n_servers:
            return f"{self.world_size} ranks ({self.n_servers} servers, {self.n_workers} workers)"
        if self.pp_size == 1:
            return f"{self.world_size} ranks"
        return f"{self.world_size} ranks ({self.pp_size} stages x {self.dp_size} data replicas)"

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
            world,
            world.Get_rank(),
            world.Get_size(),
            _local_rank(world),
            dp,
            dp.Get_rank(),
            dp.Get_size(),
            pp_comm=MPI.COMM_SELF.Dup(),
            job_comm=dp,
        )

    @classmethod
    def pipeline(cls, stages: int, replicas: int, world: MPI.Comm | None = None) -> Topology:
        """Stages x replicas over ``world`` (collective); a size mismatch names every factor."""
        world = world if world is not None else MPI.COMM_WORLD
        size, rank = world.Get_size(), world.Get_rank()
        if stages < 1 or replicas < 1 or size != stages * replicas:
            raise UserError(f"world size {size} != stages {stages} x data_replicas {replicas}")
        stage, replica = rank % stages, rank // stages
        pp = world.Split(color=replica, key=stage)
        dp = world.Split(color=stage, key=replica)
        return cls(
            world,
            rank,
            size,
            _local_rank(world),
            dp,
            dp.Get_rank(),
            dp.Get_size(),
            pp_comm=pp,
            pp_rank=pp.Get_rank(),
            pp_size=pp.Get_size(),
            job_comm=world.Dup(),
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
            n_servers=n_servers,
            ps_comm=ps,
            server_comm=server_comm,
        )


def _local_rank(world: MPI.Comm) -> int:
    """This rank's index among the ranks on its node, for picking a local device (cuda:<local_rank>)."""
    node = world.Split_type(MPI.COMM_TYPE_SHARED)
    local_rank = node.Get_rank()
    node.Free()
    return local_rank
