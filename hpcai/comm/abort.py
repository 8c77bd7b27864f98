"""Ending the whole job from one rank (MPI_Abort) without losing that rank's last words.

MPI_Abort makes the launcher kill every process at once. MPICH's mpiexec (hydra) forwards each rank's
stderr through a proxy, and the kill races that forwarding: measured here, a line written and flushed just
before MPI_Abort was missing from mpiexec's output in 7 of 20 runs. A job that dies without saying why is
the worst outcome on a 48-hour allocation, so the last words travel two ways:

- written to stderr, then a short pause (0.25 s) before the abort lets the launcher forward them (0 lost in
  40 runs with 0.05-0.2 s); this is the path under srun and any foreign launcher;
- when ``hpcai`` started mpiexec itself (:func:`hpcai.launch.run_ranks`), also written to a file in
  ``$HPCAI_FATAL_DIR``; the launching process prints any such message that did not come through.

:class:`JobSignals` decides when a signal (SIGTERM, SIGINT, SIGUSR1) ends the job this way.
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import NoReturn

from mpi4py import MPI

from hpcai.launch import FATAL_DIR_ENV

FORWARD_PAUSE_S = 0.25


def abort_job(message: str, code: int, comm: MPI.Comm | None = None) -> NoReturn:
    """Say ``message`` (one or more lines, no trailing newline needed) and end every rank with ``code``."""
    comm = comm or MPI.COMM_WORLD
    text = message.rstrip("\n") + "\n"
    try:
        sys.stderr.write(text)
        sys.stderr.flush()
    except (OSError, ValueError):  # a closed stderr must not stop the abort
        pass
    fatal_dir = os.environ.get(FATAL_DIR_ENV)
    if fatal_dir:
        try:
            # Written under a temporary name and renamed: the launcher never reads half a message.
            rank = MPI.COMM_WORLD.Get_rank()
            tmp = os.path.join(fatal_dir, f".rank-{rank}.{os.getpid()}.tmp")
            with open(tmp, "w") as f:
                f.write(text)
            os.replace(tmp, os.path.join(fatal_dir, f"rank-{rank}-{time.monotonic_ns()}.txt"))
        except OSError:  # another node's /tmp, or gone: stderr is still there
            pass
    if FORWARD_PAUSE_S > 0:
        time.sleep(FORWARD_PAUSE_S)
    comm.Abort(code)
    raise SystemExit(code)  # not reached: MPI_Abort does not return


class Interrupted(BaseException):
    """Raised in the main thread by a signal that ends the job now. A BaseException, like
    KeyboardInterrupt: ``except Exception`` in user or library code must not swallow it, while ``finally``
    and ``except BaseException`` cleanups (a dataset build's temporary files) still run."""

    def __init__(self, signum: int = 0):
        super().__init__(signal.Signals(signum).name if signum else "a signal")
        self.signum = signum


class JobSignals:
    """How a rank answers SIGTERM, SIGINT and SIGUSR1 (Slurm's warning and kill, scancel, Ctrl-C).

    - SIGUSR1, and the first SIGTERM/SIGINT while the training loop runs (``in_loop()``), ask for a stop:
      ``stop`` is set, the loop checkpoints at its next step and the job exits 75. A SIGUSR1 before the
      loop is remembered for its first step; after the loop there is nothing left to save.
    - A second SIGTERM/SIGINT, or one outside the loop (startup, the dataset build, the final evaluation),
      ends the job now: :class:`Interrupted` is raised in the main thread, cleanups run on the way out, and
      :meth:`end_job` ends every rank with one line: exit 75 where this run wrote a checkpoint
      (``checkpoint()`` names it), else 128 + the signal (130, 143).
    - Python runs signal handlers in the main thread only, between bytecodes: a main thread blocked inside
      MPI (waiting for a rank that will never come) runs none. Every signal also wakes a thread
      (``signal.set_wakeup_fd``) that decides at once and, if the main thread has not ended the job
      ``fallback_s`` later, ends it itself: 4 s on rank 0, 10 s elsewhere, so that a rank 0 building the
      dataset removes its temporary files before it ends the job, and the others wait for it.

    Create it in the main thread, first thing; ``close()`` puts the previous handlers back.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
    # How long a rank that is not 0 waits before ending the job itself: rank 0 usually ends it first, so the
    # job says why once, and rank 0's cleanups run.
    PEER_GRACE_S = 2.0
    RETRY_S = 1.0  # when a swallowed raise is raised again

    def __init__(self, rank: int, size: int, fallback_s: float | None = None):
        self.rank, self.size = rank, size
        self.fallback_s = fallback_s if fallback_s is not None else (4.0 if rank == 0 else 10.0)
        self.stop = threading.Event()
        self.in_loop: Callable[[], bool] = lambda: False
        self.where: Callable[[], str] = lambda: "during startup"
        self.checkpoint: Callable[[], str | None] = lambda: None
        self._lock = threading.RLock()  # reentrant: a handler may run inside the main thread's handler
        self._terms = 0  # SIGTERM/SIGINT received
        # (signal, "second SIGTERM during training"): the job is ending; where it was when the signal came
        self._ending: tuple[int, str] | None = None
        self._raised = False
        self._ended = threading.Event()  # end_job has begun (on either thread)
        self._read_fd, write_fd = os.pipe()
        os.set_blocking(self._read_fd, False)
        os.set_blocking(write_fd, False)
        self._write_fd = write_fd
        self._previous = {sig: signal.signal(sig, self._on_signal) for sig in self.SIGNALS}
        self._previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        self._thread = threading.Thread(target=self._wake, name="hpcai-signals", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ the decision
    # Each signal leaves one byte in the pipe (written by Python's C-level handler, before any Python code
    # runs). Whoever reads a byte, under the lock, decides for it: the thread, woken at once, or the main
    # thread's handler, which first takes what the thread has not. No signal is decided twice or missed.

    def _wake(self) -> None:
        poller = select.poll()
        poller.register(self._read_fd, select.POLLIN)
        while True:
            poller.poll()
            with self._lock:
                if not self._take():
                    return  # end of file: close() closed the pipe

    def _take(self) -> bool:
        """Decide for the bytes in the pipe (lock held); False at end of file."""
        try:
            data = os.read(self._read_fd, 64)
        except BlockingIOError:
            return True  # the other reader took them
        except OSError:
            return False
        for signum in data:
            self._decide(signum)
        return bool(data)

    def _decide(self, signum: int) -> None:
        if signum == signal.SIGUSR1:
            self.stop.set()  # the loop checkpoints at its next step (now, or its first)
            return
        if signum not in self.SIGNALS:
            return
        self._terms += 1
        if self._ending is not None:
            return
        if self._terms == 1 and self.in_loop():
            self.stop.set()
            return
        name = signal.Signals(signum).name
        self._ending = (signum, f"{'second ' if self._terms > 1 else ''}{name} {self.where()}")
        threading.Thread(target=self._fallback, name="hpcai-signal-fallback", daemon=True).start()

    def _fallback(self) -> None:
        """Make sure the job ends: the main thread has ``fallback_s`` to end it, or this thread does.

        A raise can be swallowed: an exception from a handler that runs inside an extension module's import
        or a ``__del__`` is lost (seen here with numpy.random's first import). Where the main thread is not
        unwinding an :class:`Interrupted` a moment later, it gets one more, asynchronously.
        """
        retry = min(self.RETRY_S, self.fallback_s)
        if self._ended.wait(retry):
            return
        h5write = sys.modules.get("hpcai.data.h5write")  # a raise thrown into HDF5's callbacks can crash
        in_hdf5 = h5write is not None and h5write.in_hdf5_write()  # there: its own check raises it soon
        if self._raised and not self._main_unwinding() and not in_hdf5:
            main = threading.main_thread().ident
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(main), ctypes.py_object(Interrupted))
        if self._ended.wait(self.fallback_s - retry):
            return
        signum, said = self._ending
        self.end_job(signum, said, from_thread=True)

    @staticmethod
    def _main_unwinding() -> bool:
        """Whether the main thread is in an ``except``/``finally``/``__exit__`` for an Interrupted."""
        exc = sys._current_exceptions().get(threading.main_thread().ident)
        value = exc[1] if isinstance(exc, tuple) else exc  # (type, value, tb) before Python 3.12
        return isinstance(value, Interrupted)

    def _on_signal(self, signum: int, _frame) -> None:
        """The main thread's handler: raise :class:`Interrupted` once the job is to end."""
        with self._lock:
            self._take()
            if self._ending is None or self._raised:
                return
            self._raised = True
        raise Interrupted(self._ending[0])

    def ending(self) -> tuple[int, str] | None:
        """(signal, how it is named in the message) once a signal ends the job, else None."""
        return self._ending

    def exit_code(self, signum: int) -> int:
        """75 where this run wrote a checkpoint (running the same command again continues), else 128 + N."""
        try:
            written = self.checkpoint()
        except OSError:
            written = None
        return 75 if written else 128 + signum

    def message(self, signum: int, said: str | None = None) -> str:
        """The job's one line: ``said`` (the signal, and where this rank was) and what was saved."""
        said = said or f"{signal.Signals(signum).name} {self.where()}"
        try:
            written = self.checkpoint()
        except OSError:
            written = None
        tail = (
            f"checkpoint {written} written: run the same command again to continue"
            if written
            else "no checkpoint written"
        )
        return f"hpcai: rank {self.rank}: {said}: job stopped, {tail}"

    def end_job(self, signum: int = 0, said: str | None = None, from_thread: bool = False) -> int:
        """End the job for ``signum`` (0: the signal that is ending it) with one line; returns the exit
        status where this is the only rank (on the main thread), otherwise never returns."""
        signum = signum or (self._ending[0] if self._ending is not None else signal.SIGTERM)
        with self._lock:
            first = not self._ended.is_set()
            self._ended.set()
        if not first:  # the other thread is ending the job already: let it
            while True:
                time.sleep(60)
        if self._ending is not None and said is None:
            said = self._ending[1]
        code = self.exit_code(signum)
        line = self.message(signum, said)
        if self.size > 1 and self.rank != 0:
            time.sleep(self.PEER_GRACE_S)  # rank 0 usually ends the job meanwhile: one line, not one a rank
        if self.size > 1 or from_thread:
            abort_job(line, code)
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
        return code

    def hold(self) -> None:
        """Another failure is ending the job (its own line, its own status): from now on a signal neither
        raises in the main thread nor ends the job from the thread."""
        with self._lock:
            self._raised = True
            self._ended.set()

    def close(self) -> None:
        """Put the previous handlers back (main thread)."""
        signal.set_wakeup_fd(self._previous_fd)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        os.close(self._write_fd)  # the thread reads end-of-file and stops
        self._thread.join(timeout=1)
        if not self._thread.is_alive():
            os.close(self._read_fd)
