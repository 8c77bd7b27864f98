"""Claim a dataset's output path for one build, check the space it needs, and publish it all at once.

Two ``hpcai data build`` to one ``--out`` used to both report success while one dataset was silently
discarded (or, with ``--overwrite``, swapped under the other). Now a build holds an exclusive ``flock`` on
``.NAME.lock`` beside ``--out`` from its first check to its final rename: a second build is refused at once
(exit 2, one line naming the holder), or, for the training worker's automatic build, waits and then uses
the dataset the first one built. The kernel drops the lock when its holder dies, so ``kill -9`` leaves no
stale lock (only its small file, reused by the next build). The holder removes the lock file before it
lets go, and whoever locks checks that the file it locked is still the one at that name (else it tries
again), so two builds never hold locks on two different files of one name. While holding the lock, a
build removes the temporary directories that killed builds of the same ``--out`` left behind
(``.NAME.tmp-*``, see :mod:`hpcai.fsio`).

The finished dataset is built under a temporary name and renamed over ``--out``; an existing dataset is
swapped with it in one ``renameat2(RENAME_EXCHANGE)`` where the file system has it, so readers see the old
dataset or the new one, never neither.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

from hpcai.errors import DatasetError
from hpcai.fsio import TEMP_MARK, NoSpaceError, free_bytes, temp_name
from hpcai.rundir import describe_holder


def lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


class OutputLock:
    """The exclusive flock on ``.NAME.lock`` beside a dataset's path; :meth:`release` (or death) drops it."""

    def __init__(self, path: Path, fd: int, waited: bool = False):
        self.path, self._fd = path, fd
        self.waited = waited  # another build held it first: what it built may be there now

    def release(self) -> None:
        if self._fd >= 0:
            try:
                os.unlink(self.path)  # while still holding it: see the module docstring
            except OSError:
                pass
            os.close(self._fd)  # the last descriptor of the open file: the flock goes with it
            self._fd = -1


def lock_output(out: Path, wait: bool = False, say=lambda _m: None) -> OutputLock:
    """Lock ``out`` for this build. Busy: DatasetError at once, or (``wait``) wait for the holder to end.

    Where the file system has no working flock (Lustre without ``-o flock``) the build goes on unlocked
    after one warning, as runs do (see :mod:`hpcai.rundir`).
    """
    path = lock_path(out)
    waited = [False]
    while True:
        fd = _lock_file(out, path, wait, say, waited)
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path, follow_symlinks=False))
        except OSError:
            same = False  # removed by the holder we waited for: lock the next file of that name
        if same:
            break
        os.close(fd)
    try:
        since = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": since}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(info, ensure_ascii=False) + "\n").encode("utf-8"), 0)
        except OSError:
            pass  # a full disk: the lock holds all the same; only the holder's description is missing
    except BaseException:
        os.close(fd)
        raise
    return OutputLock(path, fd, waited[0])


def _lock_file(out: Path, path: Path, wait: bool, say, waited: list[bool]) -> int:
    """Open ``path`` and flock it; returns the descriptor."""
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise NoSpaceError(f"{path}: no space left on device") from None
        raise DatasetError(f"{path}: cannot open the dataset's lock: {e.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            sys.stderr.write(f"hpcai: warning: {path}: no file locking ({e.strerror}); unlocked\n")
        elif not wait:
            os.close(fd)
            raise DatasetError(
                f"{out}: another hpcai data build ({describe_holder(path)}) is writing this dataset; "
                "this build stopped and wrote nothing: wait for it, or choose another --out"
            ) from None
        else:
            say(f"{out}: another build ({describe_holder(path)}) is writing this dataset: waiting for it")
            waited[0] = True
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except BaseException:
                os.close(fd)
                raise
    return fd


def remove_stale_builds(out: Path) -> list[Path]:
    """Remove ``.NAME.tmp-*`` beside ``out``: what killed builds of ``out`` left. Call holding the lock."""
    prefix = f".{out.name}{TEMP_MARK}"
    removed = []
    try:
        entries = list(out.parent.iterdir())
    except OSError:
        return removed
    for p in entries:
        if p.name.startswith(prefix):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                try:
                    p.unlink()
                except OSError:
                    continue
            removed.append(p)
    return removed


def check_free_space(out: Path, need_bytes: int) -> None:
    """Refuse to start a build that cannot fit (``need_bytes``: an estimate of the uncompressed shards)."""
    free = free_bytes(out.parent)
    if free is not None and need_bytes > free:
        raise NoSpaceError(
            f"{out}: no space left on device: the dataset needs about {need_bytes / 1e6:,.1f} MB, "
            f"{free / 1e6:,.1f} MB free on {out.parent}"
        )


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where that is not available."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def publish(tmp: Path, out: Path) -> None:
    """Move the finished dataset ``tmp`` to ``out`` (replacing a dataset there). Call holding the lock.

    After an exchange the old dataset sits under ``tmp`` (a temporary name) and is removed; without one,
    the old dataset is moved aside under a temporary name first and moved back if the second rename fails.
    """
    if not out.exists():
        os.rename(tmp, out)  # out was checked under the lock: nobody else creates it meanwhile
        return
    if _exchange(tmp, out):
        shutil.rmtree(tmp, ignore_errors=True)
        return
    aside = temp_name(out)
    os.rename(out, aside)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(aside, out)
        raise
    shutil.rmtree(aside, ignore_errors=True)
