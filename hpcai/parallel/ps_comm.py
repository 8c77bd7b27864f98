"""The raw MPI calls of the parameter server: typed messages on preallocated buffers, polled with deadlines.

Every message is one buffer-method send of a preallocated ``uint8`` buffer viewed as an ``int64`` header
followed by a ``float32`` body, so a push (header + gradient) or a reply (header + parameters) is a single
message matched by a single pre-posted receive: no ordering question between a header and its data, no
pickling. Nothing here blocks without a deadline: receives are polled (``Test``/``Testsome``) with a short
sleep between polls, which also keeps idle ranks off the cores they share with busy ones (MPICH's blocking
waits spin).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
from mpi4py import MPI

TAG_PUSH = 71  # worker -> server: header [op, clock, base_version, loss bits] + gradient of the shard
TAG_REPLY = 72  # server -> worker: header [version, stop, clock, min_clock] + parameters of the shard
TAG_BEAT = 73  # server -> worker: "still here, holding your reply" (int64[1])

HEADER = 4  # int64 words in front of every push and reply
POLL_S = 2e-4  # sleep between polls: far below a step, far above a spin


class Message:
    """One preallocated message buffer: ``header`` (int64[4]) and ``body`` (float32[n]) are views into it."""

    def __init__(self, n: int):
        self.buf = np.zeros(HEADER * 8 + n * 4, dtype=np.uint8)
        self.header = self.buf[: HEADER * 8].view(np.int64)
        self.body = self.buf[HEADER * 8 :].view(np.float32)

    def spec(self, header_only: bool = False) -> list:
        return [self.buf[: HEADER * 8] if header_only else self.buf, MPI.BYTE]


def post_recv(msg: Message, comm: MPI.Comm, source: int, tag: int) -> MPI.Request:
    return comm.Irecv(msg.spec(), source=source, tag=tag)


def isend(msg: Message, comm: MPI.Comm, dest: int, tag: int, header_only: bool = False) -> MPI.Request:
    return comm.Isend(msg.spec(header_only), dest=dest, tag=tag)


def completed(requests: list[MPI.Request]) -> list[int]:
    """Indices of the requests that completed now (each is then inactive)."""
    return MPI.Request.Testsome(requests) or []


def done(request: MPI.Request) -> bool:
    return bool(request.Test())


def cancel(request: MPI.Request) -> None:
    """Withdraw a receive that will never match (a failed worker's, the last one posted at the end)."""
    if request != MPI.REQUEST_NULL:
        request.Cancel()
        request.Wait()


def wait_all(
    requests: list[MPI.Request], deadline: Callable[[], float], on_poll: Callable[[], None] | None = None
) -> None:
    """Wait for every request, polling; ``deadline()`` (re-read each poll: heartbeats extend it) past ->
    TimeoutError listing the indices still pending."""
    pending = dict(enumerate(requests))
    while pending:
        for i in [i for i, r in pending.items() if r.Test()]:
            del pending[i]
        if not pending:
            return
        if on_poll is not None:
            on_poll()
        if time.monotonic() > deadline():
            raise TimeoutError(sorted(pending))
        time.sleep(POLL_S)


_BEAT = np.zeros(1, dtype=np.int64)
_BEAT_IN = np.zeros(1, dtype=np.int64)


def send_beat(comm: MPI.Comm, dest: int) -> None:
    """A heartbeat; the request is freed at once (8 bytes go eagerly; a dead peer must not hold us)."""
    comm.Isend([_BEAT, MPI.INT64_T], dest=dest, tag=TAG_BEAT).Free()


def drain_beats(comm: MPI.Comm) -> set[int]:
    """Consume every heartbeat that has arrived; the ranks that sent them."""
    status = MPI.Status()
    seen = set()
    while comm.Iprobe(MPI.ANY_SOURCE, TAG_BEAT, status):
        comm.Recv([_BEAT_IN, MPI.INT64_T], source=status.Get_source(), tag=TAG_BEAT)
        seen.add(status.Get_source())
    return seen


def barrier(comm: MPI.Comm) -> None:
    """Every rank ready (startup only, all alive): polled, so ranks that wait leave the cores to ranks still
    importing and building (an idle MPICH barrier spins)."""
    req = comm.Ibarrier()
    while not req.Test():
        time.sleep(1e-3)


def bcast_(a: np.ndarray, comm: MPI.Comm, root: int = 0) -> None:
    """Overwrite ``a`` (float32) with root's values on every rank of ``comm`` (startup: every rank alive)."""
    comm.Bcast([a, MPI.FLOAT], root=root)


def gatherv_(
    send: np.ndarray, recv: np.ndarray | None, counts: list[int], comm: MPI.Comm, timeout_s: float, what: str
) -> None:
    """Servers' shards (float32) into ``recv`` on server 0, in server order; a server that does not join
    within ``timeout_s`` raises TimeoutError naming ``what`` instead of hanging."""
    displs = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64).tolist()
    rbuf = [recv, (counts, displs), MPI.FLOAT] if comm.Get_rank() == 0 else None
    req = comm.Igatherv([send, MPI.FLOAT], rbuf, root=0)
    end = time.monotonic() + timeout_s
    while not req.Test():
        if time.monotonic() > end:
            raise TimeoutError(f"{what}: a server did not join within {timeout_s:g} s")
        time.sleep(POLL_S)


def allreduce_max_(a: np.ndarray, comm: MPI.Comm) -> np.ndarray:
    """Element-wise max of a small int64 array over the servers (their agreement on counters)."""
    comm.Allreduce(MPI.IN_PLACE, [a, MPI.INT64_T], op=MPI.MAX)
    return a
