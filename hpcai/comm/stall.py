"""Stall detection for collectives: which collective is stuck, and which ranks have not arrived.

Every rank numbers the collectives it enters (1, 2, 3, ...) and publishes the number into a small MPI window
hosted by rank 0 (one int64 per rank, a passive-target Put: a few microseconds). A watchdog thread on each
rank notices when the collective it is in has lasted longer than ``timeout_s`` and reads every rank's number
from the window: ranks whose number is lower have not arrived. It prints, once per stalled collective::

    hpcai: rank 0: stalled 60.0 s in collective #1234 (all-reduce bucket 2, 25.0 MB): ranks 3, 5 have not
    arrived (rank 3 is at #1233 'all-reduce bucket 1, 25.0 MB', rank 5 at #1230 ...)

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
from contextlib import contextmanager

import numpy as np
from mpi4py import MPI

from hpcai.comm.abort import abort_job


class StallWatch:
    """Publish collective numbers and watch for stalls. Create it collectively (it allocates a window)."""

    def __init__(self, comm: MPI.Comm, timeout_s: float = 60.0, abort: bool = False, poll_s: float = 1.0):
        self.comm = comm.Dup()  # window traffic apart from the collectives it watches
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.timeout_s, self.abort, self.poll_s = timeout_s, abort, poll_s
        nbytes = self.size * 8 if self.rank == 0 else 0
        self.win = MPI.Win.Allocate(nbytes, 8, comm=self.comm)
        if self.rank == 0:
            np.frombuffer(self.win.tomemory(), dtype=np.int64)[:] = 0
        self.comm.Barrier()  # the window is zeroed before anyone publishes
        self.seq = 0
        self._one = np.zeros(1, dtype=np.int64)
        self._current: tuple[int, str, float] | None = None  # (seq, label, start) while inside a collective
        self._reported = 0
        self.stalls: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="hpcai-stall-watch", daemon=True)
        self._thread.start()

    @contextmanager
    def collective(self, label: str) -> Iterator[None]:
        """Wrap one collective call: ``with watch.collective("all-reduce bucket 2, 25.0 MB"): ...``."""
        self.seq += 1
        self._one[0] = self.seq
        self.win.Lock(0, MPI.LOCK_SHARED)
        self.win.Put([self._one, MPI.INT64_T], 0, target=[self.rank, 1, MPI.INT64_T])
        self.win.Unlock(0)
        self._current = (self.seq, label, time.monotonic())
        try:
            yield
        finally:
            self._current = None

    def arrived(self) -> np.ndarray:
        """Every rank's latest collective number (read from rank 0's window)."""
        out = np.zeros(self.size, dtype=np.int64)
        self.win.Lock(0, MPI.LOCK_SHARED)
        self.win.Get([out, MPI.INT64_T], 0)
        self.win.Unlock(0)
        return out

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            current = self._current
            if current is None:
                continue
            seq, label, start = current
            waited = time.monotonic() - start
            if waited < self.timeout_s or seq <= self._reported:
                continue
            self._reported = seq
            counts = self.arrived()
            late = [r for r in range(self.size) if counts[r] < seq]
            where = ", ".join(f"rank {r} at #{counts[r]}" for r in late[:16])
            msg = f"hpcai: rank {self.rank}: stalled {waited:.1f} s in collective #{seq} ({label}): " + (
                f"ranks {', '.join(map(str, late))} have not arrived ({where})"
                if late
                else "all ranks arrived"
            )
            self.stalls.append(msg)
            if self.abort and late:
                abort_job(f"{msg}\nhpcai: rank {self.rank}: aborting the job (stall_abort)", 3)
            sys.stderr.write(msg + "\n")
            sys.stderr.flush()

    def close(self) -> None:
        """Collective: stop the watchdog and free the window."""
        self._stop.set()
        self._thread.join(timeout=5)
        self.comm.Barrier()
        self.win.Free()
        self.comm.Free()
