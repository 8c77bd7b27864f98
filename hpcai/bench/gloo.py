"""torch.distributed's gloo group over the ranks of an MPI communicator: the peer the benches measure.

Rank 0 starts the rendezvous store on a port the kernel picks (port 0) and only then tells the others,
through MPI, where it listens. The usual recipe (pick a free port, close it, let every rank race to it) has
two races: another process may take the port before the store binds it, and a client that connects to a local
port nobody listens on yet can be handed that very port as its source and end up connected to itself (TCP
simultaneous open). `hpcai bench ddp` timed out in that rendezvous here 3 times (a client "timed out while
trying to connect to (127.0.0.1, PORT)"); the bare rendezvous did not fail in 75 tries, so which race it was
is not known. Here neither can happen, and rank 0's host name replaces 127.0.0.1 when the ranks span nodes.
"""

from __future__ import annotations

import datetime
import socket
from typing import Any


def init_gloo(comm: Any, timeout_s: float = 120.0) -> None:
    """Collective over ``comm`` (mpi4py): ``torch.distributed.init_process_group("gloo")`` on its ranks.

    A bounded wait: a lost peer ends the bench after ``timeout_s`` (gloo's default: 30 minutes), never a hang.
    """
    import torch.distributed as dist

    rank, size = comm.Get_rank(), comm.Get_size()
    timeout = datetime.timedelta(seconds=timeout_s)
    host0 = comm.bcast(socket.gethostname() if rank == 0 else None, root=0)
    one_node = all(comm.allgather(socket.gethostname() == host0))
    addr = "127.0.0.1" if one_node else host0
    store = port = None
    if rank == 0:
        store = dist.TCPStore(addr, 0, size, is_master=True, timeout=timeout, wait_for_workers=False)
        port = store.port
    port = comm.bcast(port, root=0)
    if rank != 0:
        store = dist.TCPStore(addr, port, size, is_master=False, timeout=timeout)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=size, timeout=timeout)
