"""Stall detection for collectives: which collective is stuck, and which ranks have not arrived.

Every rank numbers the collectives it enters (1, 2, 3, ...) and stores the number in its own slot: a plain
store into memory, no message. Publishing must cost nothing because the comm thread does it for every
gradient bucket while backward runs: the first version Put the number into a window on rank 0 under a
passive-target lock, and on this 2-core box that lock waited for rank 0's progress engine, stretching a
90 KB bucket's all-reduce from ~1 ms to 12-25 ms and exposed communication from ~11% to ~21% of a step.

The slots live in an MPI shared-memory window per node (MPI_Win_allocate_shared), so a rank reads its node's
slots with plain loads: never blocked by a peer that is computing outside MPI, which is exactly the rank a
stall report must name (an RMA Get from such a peer waits, with MPICH, until it calls MPI again). A second
window over the same slot (MPI_Win_create on COMM_WORLD's duplicate) serves ranks on other nodes with a Get,
which RDMA networks answer without the target's help.

A watchdog thread on each rank notices when the collective it is in has lasted longer than ``timeout_s`` and
reads every rank's number (only then): ranks whose number is lower have not arrived. It prints, once per
stalled collective::

    hpcai: rank 0: stalled 60.0 s in collective #1234 (all-reduce bucket 2, 25.0 MB): ranks 3, 5 have not
    arrived (rank 3 at #1233, rank 5 at #1230)

and, with ``abort=True``, ends the whole job (MPI_Abort) so a 48-hour allocation is not burnt waiting.
The labels of other ranks' collectives are not shared (that would cost a message per collective): the report
names their numbers, and this rank's log names its own sequence.

Needs MPI_THREAD_MULTIPLE (mpi4py asks for it by default): the watchdog reads the window from its own thread.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import numpy as np
from mpi4py import MPI

from hpcai.comm.abort import abort_job


class WaitWatch:
    """A watchdog thread that reports a wait lasting longer than ``timeout_s``, once per wait.

    It needs no communicator (it reads this rank's own state; MPI only to abort): the pipeline's
    point-to-point waits use it as is, collectives through :class:`StallWatch`.

    The waiting thread marks the wait (``begin``/``end``, two stores: cheap enough for every pipeline
    receive); the watchdog wakes every ``poll_s`` and, past the timeout, prints ``hpcai: rank R: stalled
    T s <what>`` and with ``abort=True`` ends the whole job (MPI_Abort, exit 3). ``what`` is formatted only
    then: a format string and its arguments, so a wait that ends in time costs no string building.
    """

    def __init__(self, rank: int, timeout_s: float, abort: bool = False, poll_s: float = 1.0):
        self.rank, self.timeout_s, self.abort, self.poll_s = rank, timeout_s, abort, poll_s
        self.seq = 0
        self._current: tuple[int, str, tuple, float] | None = None  # (seq, format, args, start) while waiting
        self._reported = 0
        self.stalls: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="hpcai-stall-watch", daemon=True)
        self._thread.start()

    def begin(self, what: str, *args: object) -> None:
        """Entering a wait: ``begin("waiting for {} from rank {}", "the gradient", 1)``; ``end()`` after."""
        self.seq += 1
        self._current = (self.seq, what, args, time.monotonic())

    def end(self) -> None:
        self._current = None

    def _message(self, seq: int, what: str, waited: float) -> tuple[str, bool]:
        """The report of a stalled wait, and whether ``abort`` may end the job for it."""
        return f"hpcai: rank {self.rank}: stalled {waited:.1f} s {what}", True

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            current = self._current
            if current is None:
                continue
            seq, what, args, start = current
            waited = time.monotonic() - start
            if waited < self.timeout_s or seq <= self._reported:
                continue
            self._reported = seq
            msg, may_abort = self._message(seq, what.format(*args), waited)
            self.stalls.append(msg)
            if self.abort and may_abort:
                abort_job(f"{msg}\nhpcai: rank {self.rank}: aborting the job (stall_abort)", 3)
            sys.stderr.write(msg + "\n")
            sys.stderr.flush()

    def close(self) -> None:
        """Stop the watchdog (this rank only)."""
        self._stop.set()
        self._thread.join(timeout=5)


class StallWatch(WaitWatch):
    """Publish collective numbers and watch for stalls. Create it collectively (it allocates windows)."""

    def __init__(self, comm: MPI.Comm, timeout_s: float = 60.0, abort: bool = False, poll_s: float = 1.0):
        self.comm = comm.Dup()  # window traffic apart from the collectives it watches
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.node = self.comm.Split_type(MPI.COMM_TYPE_SHARED)
        self.shm = MPI.Win.Allocate_shared(8, 8, comm=self.node)  # one int64 per rank of this node
        node_size = self.node.Get_size()
        node_slots = [np.frombuffer(self.shm.Shared_query(i)[0], np.int64) for i in range(node_size)]
        self._slot = node_slots[self.node.Get_rank()]
        on_node = MPI.Group.Translate_ranks(
            self.node.Get_group(), list(range(node_size)), self.comm.Get_group()
        )
        self._local = dict(zip(on_node, node_slots, strict=True))  # rank in comm -> its slot, loadable here
        self.win = MPI.Win.Create(self._slot, 8, comm=self.comm)  # the same slot, for other nodes' Gets
        # Unified memory model (MPICH, Open MPI on common networks): a local store is what remote Gets see.
        # Separate model: the store must happen inside an epoch on our own window (local, still no message).
        self._unified = self.win.Get_attr(MPI.WIN_MODEL) == MPI.WIN_UNIFIED
        self._publish(0)
        self.comm.Barrier()  # every slot is zeroed before anyone reads one
        super().__init__(self.rank, timeout_s, abort, poll_s)

    @contextmanager
    def collective(self, label: str) -> Iterator[None]:
        """Wrap one collective call: ``with watch.collective("all-reduce bucket 2, 25.0 MB"): ...``."""
        self._publish(self.seq + 1)
        self.begin("{}", label)
        try:
            yield
        finally:
            self.end()

    def _publish(self, seq: int) -> None:
        if self._unified:
            self._slot[0] = seq
        else:
            self.win.Lock(self.rank, MPI.LOCK_EXCLUSIVE)
            self._slot[0] = seq
            self.win.Unlock(self.rank)

    def arrived(self) -> np.ndarray:
        """Every rank's latest collective number: a load from each slot on this node, a Get from other
        nodes' (only called on a stall)."""
        out = np.zeros(self.size, dtype=np.int64)
        for r in range(self.size):
            if r in self._local:
                out[r] = self._local[r][0]
                continue
            self.win.Lock(r, MPI.LOCK_SHARED)
            self.win.Get([out[r : r + 1], MPI.INT64_T], r)
            self.win.Unlock(r)
        return out

    def _message(self, seq: int, what: str, waited: float) -> tuple[str, bool]:
        counts = self.arrived()
        late = [r for r in range(self.size) if counts[r] < seq]
        where = ", ".join(f"rank {r} at #{counts[r]}" for r in late[:16])
        msg = f"hpcai: rank {self.rank}: stalled {waited:.1f} s in collective #{seq} ({what}): " + (
            f"ranks {', '.join(map(str, late))} have not arrived ({where})" if late else "all ranks arrived"
        )
        return msg, bool(late)

    def close(self) -> None:
        """Collective: stop the watchdog and free the window."""
        super().close()
        self.comm.Barrier()
        self.win.Free()
        self._local.clear()
        self._slot = None
        self.shm.Free()
        self.node.Free()
        self.comm.Free()


def watched(watch: StallWatch | None, label: str) -> AbstractContextManager[None]:
    """``watch.collective(label)``, or nothing when stall detection is off (``watch`` is None)."""
    return watch.collective(label) if watch is not None else nullcontext()
