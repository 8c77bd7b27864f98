"""Create an HDF5 file that fails cleanly: a full disk or a signal is one Python exception, never a crash.

HDF5 does not survive a failed write: after ``No space left on device`` its file object stays half-open
and the library crashes when it is torn down at exit (seen: ``hpcai data build`` on a full file system ended
in a segmentation fault, exit 139, its temporary directory left behind). And an exception raised inside
h5py's I/O callbacks (a signal handler raising ``SystemExit`` or ``KeyboardInterrupt``) is such a failure
too.

So :func:`h5_create` hands HDF5 a file object of ours (h5py's ``fileobj`` driver) that never fails: the
first write error, or an exception raised while HDF5 is calling us, is recorded and every later write is
skipped (the file is discarded anyway). HDF5 then finishes and closes normally, and the recorded failure
is raised here, outside HDF5: ``PATH: no space left on device`` (:class:`hpcai.fsio.NoSpaceError`, exit
status 2), another write error as a :class:`DatasetError` naming the file, or the interrupt itself. The
file is removed on any failure.

A signal handler that raises cannot be stopped at our callbacks' edges: Python may run it as a callback
returns into HDF5 (seen: ``SystemError: seek returned a result with an exception set``, 3 in 25 SIGINTs).
So while the file is open, in the main thread, every Python-level handler of SIGINT, SIGTERM, SIGHUP,
SIGUSR1 and SIGUSR2 (the caller's, or Python's default ``KeyboardInterrupt``) is wrapped: it runs as
always, but what it raises is recorded and raised by the next ``check()``, between HDF5 calls. Code that
would raise into the main thread by other means (``PyThreadState_SetAsyncExc``) should wait while
:func:`in_hdf5_write` is true: such a raise is deferred the same way, to the next ``check()``.

    with h5_create(path) as (f, check):
        f.create_dataset(...)[...] = block
        check()      # between blocks: raise a recorded failure now rather than at the end
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import h5py

from hpcai.errors import DatasetError
from hpcai.fsio import is_no_space, no_space


class _NeverFailingFile:
    """What h5py's ``fileobj`` driver reads and writes: a raw descriptor whose methods never raise.

    Once a write fails (or HDF5's call into us is interrupted), later writes only move the logical end of
    file, so HDF5's view stays consistent; reads beyond what reached the disk return zeros.
    """

    def __init__(self, path: Path):
        self.path = path
        # Read-write (HDF5 reads back what it wrote), O_EXCL | O_NOFOLLOW: never a planted file or symlink.
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        self.fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0), 0o644)
        self.pos = self.eof = 0
        self.failure: BaseException | None = None  # first OSError or interrupt, raised by check()

    def _fail(self, e: BaseException) -> None:
        # Kept without its traceback: the frames it holds (h5py's, with a file access property list that
        # points back at this object through HDF5) would never be freed, and HDF5 frees what is left at
        # exit, after Python is gone: it crashed there (PyGILState_Ensure in h5py's fapl_free).
        e = e.with_traceback(None)
        if self.failure is None or (isinstance(self.failure, OSError) and not isinstance(e, OSError)):
            self.failure = e  # an interrupt outranks a write error: the user asked to stop

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = pos if whence == 0 else self.pos + pos if whence == 1 else self.eof + pos
        return self.pos

    def tell(self) -> int:
        return self.pos

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        n = len(view)
        try:
            if self.failure is None:
                done = 0
                while done < n:
                    done += os.pwrite(self.fd, view[done:], self.pos + done)
        except BaseException as e:  # noqa: BLE001 - nothing may escape into HDF5 (see the module docstring)
            self._fail(e)
        self.pos += n
        self.eof = max(self.eof, self.pos)
        return n

    def readinto(self, buf) -> int:
        view = memoryview(buf).cast("B")
        got = 0
        try:
            while got < len(view):
                k = os.preadv(self.fd, [view[got:]], self.pos + got)
                if k <= 0:
                    break
                got += k
        except BaseException as e:  # noqa: BLE001
            self._fail(e)
        view[got:] = b"\0" * (len(view) - got)  # past the end (or past a failed write): zeros, as sec2 gives
        self.pos += len(view)
        return len(view)

    def read(self, size: int = -1) -> bytes:
        buf = bytearray(max(0, self.eof - self.pos) if size < 0 else size)
        self.readinto(buf)
        return bytes(buf)

    def truncate(self, size: int | None = None) -> int:
        size = self.pos if size is None else size
        try:
            if self.failure is None:
                os.ftruncate(self.fd, size)
        except BaseException as e:  # noqa: BLE001
            self._fail(e)
        self.eof = size
        return size

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def check(self) -> None:
        """Raise the recorded failure, as the one-line error a user sees (an interrupt as itself)."""
        e = self.failure
        if e is None:
            return
        if not isinstance(e, OSError):
            raise e
        if is_no_space(e):
            raise no_space(self.path, e) from None
        raise DatasetError(f"{self.path}: write failed: {e.strerror or e}") from None


_DEFERRED_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP", "SIGUSR1", "SIGUSR2")
_open_in_main = [0]  # files h5_create holds open in the main thread


def in_hdf5_write() -> bool:
    """Whether the main thread has a file of :func:`h5_create` open (signal raises are deferred then)."""
    return _open_in_main[0] > 0


@contextmanager
def _handlers_deferred(raw: _NeverFailingFile) -> Iterator[None]:
    """Signal handlers that raise into ``raw``'s record instead of wherever Python runs them."""
    if threading.current_thread() is not threading.main_thread():
        yield  # handlers run in the main thread only: this thread's HDF5 calls never see them
        return
    _open_in_main[0] += 1
    previous = {}
    for name in _DEFERRED_SIGNALS:
        sig = getattr(signal, name, None)
        handler = signal.getsignal(sig) if sig is not None else None
        if callable(handler):

            def deferred(signum: int, frame, handler=handler) -> None:
                try:
                    handler(signum, frame)
                except BaseException as e:  # noqa: BLE001 - raised by check(), outside HDF5
                    raw._fail(e)

            previous[sig] = signal.signal(sig, deferred)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _open_in_main[0] -= 1


@contextmanager
def h5_create(path: str | os.PathLike) -> Iterator[tuple[h5py.File, Callable[[], None]]]:
    """A new HDF5 file at ``path`` (which must not exist) and a ``check()`` that raises a recorded failure.

    On any failure (a write error, an interrupt, an exception in the block) the file is removed and the
    failure raised after HDF5 has closed the file cleanly.
    """
    path = Path(path)
    raw = _NeverFailingFile(path)
    with _handlers_deferred(raw):
        try:
            with h5py.File(raw, "w") as f:  # h5py's fileobj driver: all I/O goes through raw
                yield f, raw.check
            raw.check()  # closing wrote the metadata: a failure there is raised now
        except BaseException:
            raw.close()
            try:
                os.unlink(path)
            except OSError:
                pass
            failure, raw.failure = raw.failure, None  # nothing of this build stays referenced from raw
            if failure is not None:
                raw.failure = failure
                try:
                    raw.check()  # the recorded interrupt or write error explains the failure best
                finally:
                    raw.failure = None
            raise
        raw.close()
