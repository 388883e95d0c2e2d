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
    "FolderBusyError",
    "atomic_write",
    "describe_os_error",
    "list_names",
    "lock_folder",
    "make_new_folder",
    "unlock_folder",
    "visible_entries",
]


class FolderBusyError(OSError):
    """Another process holds the folder's lock."""


def atomic_write(path: pathlib.Path, write: Callable[[pathlib.Path], object]) -> None:
    """Call ``write(tmp)`` on a temporary file in the same folder, fsync it, then rename it over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        descriptor = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(descriptor)  # the data is on disk before the rename makes it current
        finally:
            os.close(descriptor)
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


def lock_folder(folder: pathlib.Path) -> int | None:
    """Take the exclusive lock of ``folder`` and return its descriptor (:func:`unlock_folder` releases it).

    An advisory ``flock`` on the folder itself, not on a lock file inside it: nothing is left behind
    to clean up or to race on, and the kernel releases the lock when the process ends, however it
    ends. None where there are no advisory locks (Windows).

    Raises:
        FolderBusyError: another process holds the lock.
    """
    if fcntl is None:
        return None
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        raise FolderBusyError(errno.EBUSY, "in use by another projunn process", str(folder)) from None
    return descriptor


def unlock_folder(descriptor: int | None) -> None:
    """Release :func:`lock_folder`'s lock."""
    if descriptor is not None:
        os.close(descriptor)
