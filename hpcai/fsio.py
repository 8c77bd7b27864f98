"""Writing shared files safely: temporary names unique to the writer, created ``O_EXCL | O_NOFOLLOW``.

Run directories, sweep directories and dataset folders are shared: two array tasks, two runs, or a user's
planted symlink may sit where a fixed temporary name would be. So every write-by-rename here

- creates its temporary file under a name no other writer uses (host, pid, a random token), with
  ``O_CREAT | O_EXCL | O_NOFOLLOW``: an existing file or symlink of that name is an error, never followed;
- fsyncs it, then renames it over the final name (atomic on POSIX file systems), then fsyncs the directory;
- removes its temporary file on any failure, and turns "no space left" into one line naming the file
  (:class:`NoSpaceError`, exit status 2).

Temporary names all match :data:`TEMP_GLOB` (``.NAME.tmp-HOST-PID-TOKEN``) so that a run can clean up what a
killed writer left (:func:`remove_stale_temporaries`, under the run directory's lock).
"""

from __future__ import annotations

import errno
import os
import secrets
import socket
from pathlib import Path

from hpcai.errors import UserError

TEMP_MARK = ".tmp-"  # every temporary name holds it: ``.NAME.tmp-HOST-PID-TOKEN``


class NoSpaceError(UserError):
    """The file system is full (or over quota) while writing a file hpcai owns."""


def is_no_space(e: BaseException) -> bool:
    """Whether ``e`` is "no space left on device" or "disk quota exceeded" (possibly wrapped by HDF5)."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e)
    return "No space left on device" in text or "Disk quota exceeded" in text or "errno = 28" in text


def no_space(path: str | os.PathLike, e: BaseException | None = None) -> NoSpaceError:
    """The one-line error for a full file system while writing ``path``."""
    return NoSpaceError(f"{path}: no space left on device")


def temp_name(final: str | os.PathLike) -> Path:
    """A temporary name beside ``final`` that no other writer (process, host) will choose."""
    final = Path(final)
    host = socket.gethostname().split(".")[0] or "host"
    return final.with_name(f".{final.name}{TEMP_MARK}{host}-{os.getpid()}-{secrets.token_hex(4)}")


def is_temp_name(name: str) -> bool:
    return name.startswith(".") and TEMP_MARK in name


def free_bytes(directory: str | os.PathLike) -> int | None:
    """Bytes an unprivileged writer may still use in ``directory``'s file system; None where it cannot say
    (statvfs refused, or a file system that reports no size at all)."""
    try:
        st = os.statvfs(directory)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize if st.f_blocks else None


def create_exclusive(path: str | os.PathLike, mode: int = 0o644) -> int:
    """Open a new file for writing; fails if anything (a file, a symlink) already has that name."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    return os.open(path, flags, mode)


def fsync_dir(d: str | os.PathLike) -> None:
    """Make a rename in ``d`` durable (best effort: some file systems refuse fsync on a directory)."""
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, fsync: bool = True) -> None:
    """Replace ``path`` with ``data`` all at once: readers see the old file or the new one, never a part.

    A full disk raises :class:`NoSpaceError` naming ``path``; the old file is left as it was.
    """
    path = Path(path)
    tmp = temp_name(path)
    try:
        fd = create_exclusive(tmp)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if is_no_space(e):
            raise no_space(path, e) from None
        raise
    if fsync:
        fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str, *, fsync: bool = True) -> None:
    """:func:`atomic_write_bytes` of ``text`` in UTF-8 (any Unicode round-trips)."""
    atomic_write_bytes(path, text.encode("utf-8"), fsync=fsync)


def remove_stale_temporaries(directory: str | os.PathLike, recursive: bool = False) -> list[Path]:
    """Delete the temporary files (and directories) that killed writers left in ``directory``.

    Call it only while holding the lock that keeps every other writer of ``directory`` out (the run
    directory's): a temporary name that belongs to a live writer would otherwise be pulled from under it.
    Returns what was removed.
    """
    import shutil

    d = Path(directory)
    removed: list[Path] = []
    if not d.is_dir():
        return removed
    for entry in d.iterdir():
        if is_temp_name(entry.name):
            try:
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
                removed.append(entry)
            except OSError:
                pass
        elif recursive and entry.is_dir() and not entry.is_symlink():
            removed += remove_stale_temporaries(entry, recursive=True)
    return removed
