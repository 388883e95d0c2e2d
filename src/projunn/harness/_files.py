"""Files that are either complete or absent, and run folders that one process at a time writes into."""

from __future__ import annotations

import errno
import os
import pathlib
from collections.abc import Callable

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; folders are still created atomically
    fcntl = None

__all__ = [
    "LOCK",
    "FolderBusyError",
    "atomic_write",
    "describe_os_error",
    "list_names",
    "lock_folder",
    "make_new_folder",
    "unlock_folder",
    "visible_entries",
]

#: The lock file inside a run folder; the process holding its lock owns the folder.
LOCK = ".lock"


class FolderBusyError(OSError):
    """Another process holds the folder's lock."""


def atomic_write(path: pathlib.Path, write: Callable[[pathlib.Path], object]) -> None:
    """Call ``write(tmp)`` on a temporary file in the same folder, fsync it, then rename it over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as written:
            os.fsync(written.fileno())  # the data is on disk before the rename makes it current
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def describe_os_error(error: OSError) -> str:
    """``strerror (errno NAME)`` where the error has an errno, else its message: one line for a user."""
    if error.errno in errno.errorcode:
        return f"{error.strerror or os.strerror(error.errno)} (errno {errno.errorcode[error.errno]})"
    return str(error)


def visible_entries(folder: pathlib.Path) -> list[str]:
    """The names in ``folder``, sorted, without hidden ones (a lock, a temporary file being written)."""
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def list_names(names: list[str], shown: int = 3) -> str:
    """``a, b, c and 4 more``: a few names for a one-line message."""
    rest = len(names) - shown
    return ", ".join(names[:shown]) + (f" and {rest} more" if rest > 0 else "")


def make_new_folder(base: pathlib.Path) -> pathlib.Path:
    """Create ``base``, or ``base-2``, ``base-3``, ... if taken, and return it.

    ``mkdir`` without ``exist_ok`` either creates the folder or fails, so two
    processes asking for the same name at the same moment get different folders.
    """
    base.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, 10_000):
        folder = base if attempt == 1 else base.with_name(f"{base.name}-{attempt}")
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        return folder
    raise FileExistsError(errno.EEXIST, "no free folder name", str(base))


def lock_folder(folder: pathlib.Path) -> int:
    """Take the exclusive lock of ``folder`` and return its file descriptor (:func:`unlock_folder` releases it).

    An advisory ``flock`` on a lock file inside the folder: the kernel releases it when the process
    ends, however it ends, so a killed run never leaves a folder locked (only, then, the empty lock
    file, which the next run reuses). A file, not the folder itself: Linux's NFS client forwards
    ``flock`` on files to the server, so that runs on two machines sharing the storage exclude each
    other, but keeps a lock on a directory to the machine that took it.

    Raises:
        FolderBusyError: another process holds the lock.
    """
    path = folder / LOCK
    while True:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is None:
            return descriptor
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            raise FolderBusyError(errno.EBUSY, "in use by another projunn process", str(folder)) from None
        except BaseException:
            os.close(descriptor)
            raise
        # The holder before us may have removed the file between our open and our lock (see
        # unlock_folder): then we hold the lock of a file nobody else can see, so try again.
        try:
            if os.stat(path).st_ino == os.fstat(descriptor).st_ino:
                return descriptor
        except FileNotFoundError:
            pass
        os.close(descriptor)


def unlock_folder(folder: pathlib.Path, descriptor: int) -> None:
    """Release :func:`lock_folder`'s lock and remove the lock file (while still holding it)."""
    try:
        (folder / LOCK).unlink(missing_ok=True)
    finally:
        os.close(descriptor)
