"""How the all-reduces wait for their peers' messages.

By default a wait blocks inside MPI, which busy-polls: the fastest way to wait when the core is
ours. A caller that shares its core with compute (the gradient thread during backward, one core per rank)
passes `idle`: then waits poll with Test and call idle() between polls, which can sleep and give the core
back to the computation.
"""

from __future__ import annotations

from collections.abc import Callable

from mpi4py import MPI

Idle = Callable[[], None]


def wait_request(req: MPI.Request, idle: Idle | None) -> None:
    """MPI_Wait, or MPI_Test + idle() until the request completes."""
    if idle is None:
        req.Wait()
        return
    while not req.Test():
        idle()


def wait_all(reqs: list[MPI.Request], idle: Idle | None) -> None:
    """MPI_Waitall, or MPI_Testall + idle() until every request completes."""
    if idle is None:
        MPI.Request.Waitall(reqs)
        return
    while not MPI.Request.Testall(reqs):
        idle()
