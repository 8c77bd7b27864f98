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

Before the first collective, a job goes through startup phases (dataset, model build, parameter broadcast,
...) in which a rank can be stuck in plain Python, outside MPI, while the others wait. :class:`StartupPhases`
numbers them alike on every rank and publishes the number the same way, so that a peer's number names its
phase::

    hpcai: rank 0: stalled 5.0 s in startup phase 'parameter broadcast' (#7): rank 1 has not arrived
    (rank 1 at #4 'model build')

Its windows are created first thing, when every rank gets there at once (creating them is collective).

Needs MPI_THREAD_MULTIPLE (mpi4py asks for it by default): the watchdog reads the window from its own thread.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Collection, Iterator, Sequence
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

    def _message(self, seq: int, what: str, waited: float) -> tuple[str | None, bool]:
        """The report of a stalled wait (None: nothing to report now), and whether ``abort`` may end the
        job for it."""
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
            msg, may_abort = self._message(seq, what.format(*args), waited)
            if msg is None:  # nobody is late for this wait (yet): look again at the next poll
                continue
            self._reported = seq
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

    def __init__(
        self,
        comm: MPI.Comm,
        timeout_s: float = 60.0,
        abort: bool = False,
        poll_s: float = 1.0,
        phases: Sequence[str] = (),
        patient: Collection[int] = (),
    ):
        # Startup phases (see StartupPhases): names by number, and the numbers whose length is the data's.
        self.phases, self.patient, self._in_phase = tuple(phases), frozenset(patient), False
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

    def phase(self, number: int) -> None:
        """Enter startup phase ``number`` (1-based in ``phases``, the same on every rank): published like a
        collective's number, and watched until the next phase or the end of :meth:`close`'s barrier."""
        self.seq = number
        self._publish(number)
        self._in_phase = True
        self._current = (
            number,
            "in startup phase {!r} (#{})",
            (self.phases[number - 1], number),
            time.monotonic(),
        )

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

    def _message(self, seq: int, what: str, waited: float) -> tuple[str | None, bool]:
        counts = self.arrived()
        late = [r for r in range(self.size) if counts[r] < seq]
        if self._in_phase:
            return self._phase_message(what, waited, counts, late)
        where = ", ".join(f"rank {r} at #{counts[r]}" for r in late[:16])
        msg = f"hpcai: rank {self.rank}: stalled {waited:.1f} s in collective #{seq} ({what}): " + (
            f"ranks {', '.join(map(str, late))} have not arrived ({where})" if late else "all ranks arrived"
        )
        return msg, bool(late)

    def _phase_message(
        self, what: str, waited: float, counts: np.ndarray, late: list[int]
    ) -> tuple[str | None, bool]:
        """A startup phase's report: the ranks still in earlier phases, each with its phase's name. Nothing
        while no rank is behind this one (it is the one the others wait for, or all are in it together)."""
        if not late:
            return None, False
        where = ", ".join(f"rank {r} at {self._phase_name(int(counts[r]))}" for r in late[:16])
        who = f"rank {late[0]} has" if len(late) == 1 else f"ranks {', '.join(map(str, late))} have"
        msg = f"hpcai: rank {self.rank}: stalled {waited:.1f} s {what}: {who} not arrived ({where})"
        # Building a dataset or verifying a checkpoint takes as long as the data needs: said, never aborted.
        slow = sorted({self.phases[counts[r] - 1] for r in late if int(counts[r]) in self.patient})
        if slow and self.abort:
            msg += f"; not aborting: {', '.join(map(repr, slow))} takes as long as its data needs"
        return msg, not slow

    def _phase_name(self, number: int) -> str:
        if 1 <= number <= len(self.phases):
            return f"#{number} {self.phases[number - 1]!r}"
        return f"#{number}"

    def close(self) -> None:
        """Collective: stop the watchdog and free the window. The barrier comes first, while the watchdog
        still runs: in a startup phase it is the last wait for the slowest rank, and is watched."""
        self.comm.Barrier()
        super().close()
        self.win.Free()
        self._local.clear()
        self._slot = None
        self.shm.Free()
        self.node.Free()
        self.comm.Free()


def watched(watch: StallWatch | None, label: str) -> AbstractContextManager[None]:
    """``watch.collective(label)``, or nothing when stall detection is off (``watch`` is None)."""
    return watch.collective(label) if watch is not None else nullcontext()


class StartupPhases:
    """The phases of a job before its first step, numbered alike on every rank (``names``, in order).

    Every rank calls ``enter(name)`` for each phase in order, passing through the ones where it has nothing
    to do. With ``timeout_s > 0`` and several ranks, a :class:`StallWatch` reports a rank that has waited
    in a phase longer than that for ranks still in earlier phases, naming them and their phases; with
    ``abort`` it ends the job (exit 3). A rank stuck in plain Python (a user's model factory that never
    returns) is named so, where it used to hang the job without a word. ``patient`` phases (rank 0 building
    a dataset, verifying a checkpoint: as long as the data needs) are reported but never aborted.

    Create it collectively, first thing, when every rank gets there at once; ``close()`` is collective
    too, and its barrier (the last wait of startup) is still watched.
    """

    def __init__(
        self,
        comm: MPI.Comm,
        names: Sequence[str],
        timeout_s: float,
        abort: bool = False,
        patient: Collection[str] = (),
        poll_s: float = 1.0,
    ):
        self.names = tuple(names)
        self.current: str | None = None
        self.watch: StallWatch | None = None
        if timeout_s > 0 and comm.Get_size() > 1:
            numbers = [self.names.index(name) + 1 for name in patient]
            self.watch = StallWatch(comm, timeout_s, abort, poll_s, phases=self.names, patient=numbers)

    def enter(self, name: str) -> None:
        """This rank begins phase ``name`` (one of ``names``)."""
        number = self.names.index(name) + 1
        self.current = name
        if self.watch is not None:
            self.watch.phase(number)

    def describe(self) -> str:
        """Where this rank is, for a message: ``in startup phase 'model build'``."""
        return f"in startup phase {self.current!r}" if self.current else "during startup"

    def close(self) -> None:
        """Collective: startup is over on every rank."""
        if self.watch is not None:
            self.watch.close()
            self.watch = None
        self.current = None

    def abandon(self) -> None:
        """This rank only, on its way out (an error): stop watching; the windows go with the job."""
        if self.watch is not None:
            WaitWatch.close(self.watch)
            self.watch = None
        self.current = None
