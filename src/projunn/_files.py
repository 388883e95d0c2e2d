"""Files that are either complete or absent: nothing half-written survives a crash or a kill."""

from __future__ import annotations

import os
import pathlib
from collections.abc import Callable

__all__ = ["atomic_write"]


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
