"""A run directory belongs to one run at a time: an flock held for the life of the run.

Two ``hpcai run`` into one directory used to swap specs silently (the ranks re-read ``job.toml`` after the
second launcher rewrote it) and interleave ``metrics.jsonl``. Now whoever starts a run — the ``hpcai run``
launcher, or rank 0 when srun/mpiexec started the ranks directly, or a sweep trial's first rank — takes an
exclusive ``flock`` on ``RUN_DIR/.hpcai.lock`` before writing anything there, and keeps it until the run
ends. The kernel drops the lock when the holder dies, so ``kill -9`` never leaves a stale lock. A second run
is refused at once, in one line naming the directory and the holder's pid and host (exit status 2).

The lock file doubles as the mark of an hpcai run directory: a non-empty directory without it (and without
the logs of an earlier hpcai) is refused rather than written into, so a user's own ``job.toml`` or
``metrics.jsonl`` is never overwritten. While holding the lock, what killed writers left behind (temporary
files, see :mod:`hpcai.fsio`) is removed.

    with claim_run_dir(Path("runs/digits")):
        ...   # write job.toml, launch the ranks
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hpcai.errors import UserError
from hpcai.fsio import remove_stale_temporaries

LOCK_NAME = ".hpcai.lock"
# Earlier hpcai versions left no lock file; their run directories still count as run directories.
_LEGACY_MARKS = ("logs/rank-0.log", "checkpoints", "summary.json", "submit.json")
_SYSTEM_ROOTS = ("/proc", "/sys", "/dev")
# A requeued Slurm job may start on another node before the file system has noticed that the dead holder's
# lock is gone (NFS leases): it waits this long before calling the directory busy.
REQUEUE_WAIT_S = 120.0


class RunDirError(UserError):
    """A run directory that cannot be used: busy, not a directory, or someone else's files."""


def check_run_dir(run_dir: Path) -> None:
    """Refuse a path that must not become a run directory (before anything is created or written)."""
    p = Path(run_dir)
    resolved = p.resolve()
    for root in _SYSTEM_ROOTS:
        if str(resolved) == root or str(resolved).startswith(root + "/"):
            raise RunDirError(f"{p}: refused as a run directory: it lies under {root} ({resolved})")
    if p.exists() and not p.is_dir():
        raise RunDirError(f"{p}: run directory exists and is not a directory")
    if p.is_dir() and not is_run_dir(p) and any(p.iterdir()):
        raise RunDirError(
            f"{p}: not empty and not an hpcai run directory (no {LOCK_NAME}): "
            "choose a new or empty --run-dir (job.run_dir)"
        )


def is_run_dir(p: Path) -> bool:
    """Whether ``p`` was made by hpcai (it holds the lock file, or an earlier version's logs/checkpoints)."""
    return (p / LOCK_NAME).exists() or any((p / mark).exists() for mark in _LEGACY_MARKS)


class RunDirLock:
    """The exclusive flock on ``RUN_DIR/.hpcai.lock``; :meth:`release` (or process death) drops it."""

    def __init__(self, run_dir: Path, fd: int):
        self.run_dir, self._fd = Path(run_dir), fd

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing the last descriptor of the open file drops the flock
            self._fd = -1

    def __enter__(self) -> RunDirLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def describe_holder(lock_file: Path) -> str:
    """Who holds a lock file, as its holder wrote it (pid, host, since): for a refusal's one line."""
    try:
        info = json.loads(lock_file.read_text(encoding="utf-8"))
        return f"pid {int(info['pid'])} on host {info['host']}, since {info['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not said who it is yet"


def acquire(run_dir: Path, what: str = "hpcai run") -> RunDirLock:
    """Check, create and lock ``run_dir``; remove stale temporaries in it. Raises RunDirError if busy.

    Where the file system has no working flock (a Lustre mount without ``-o flock``), the run goes on
    unlocked after one warning: refusing to run there would be worse than the race it guards against.
    """
    run_dir = Path(run_dir)
    check_run_dir(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunDirError(f"{run_dir}: cannot create the run directory: {e.strerror}") from None
    lock_file = run_dir / LOCK_NAME
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(lock_file, flags, 0o644)
    except OSError as e:
        raise RunDirError(f"{lock_file}: cannot open the run directory's lock: {e.strerror}") from None
    deadline = time.monotonic() + (REQUEUE_WAIT_S if int(os.environ.get("SLURM_RESTART_COUNT") or 0) else 0)
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                sys.stderr.write(f"hpcai: warning: {lock_file}: no file locking ({e.strerror}); unlocked\n")
                break
            if time.monotonic() >= deadline:
                os.close(fd)
                raise RunDirError(
                    f"{run_dir}: in use by another {what} ({describe_holder(lock_file)}); "
                    "wait for it to end or choose another --run-dir"
                ) from None
            time.sleep(1.0)
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "what": what,
    }
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info, ensure_ascii=False) + "\n").encode("utf-8"), 0)
    except OSError:
        pass  # a full disk: the lock holds all the same; only the holder's description is missing
    remove_stale_temporaries(run_dir)
    remove_stale_temporaries(run_dir / "checkpoints")
    for old in (run_dir / "checkpoints").glob(".step-*.h5.tmp"):  # written before temporary names were unique
        if old.is_symlink() or old.is_file():
            old.unlink(missing_ok=True)
    return RunDirLock(run_dir, fd)


@contextmanager
def claim_run_dir(run_dir: Path, what: str = "hpcai run") -> Iterator[RunDirLock]:
    """``with claim_run_dir(d):`` — :func:`acquire` for the block's duration."""
    lock = acquire(run_dir, what)
    try:
        yield lock
    finally:
        lock.release()
