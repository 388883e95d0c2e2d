"""Keep freed large blocks in the process heap, for training loops that reallocate them every step.

glibc serves each allocation above its mmap threshold (at most 32 MiB) with
fresh pages and unmaps it on free, so a loop that allocates the same
(T, B, H) activation buffers every iteration page-faults them anew each
time: at T = 1000, B = 128, H = 190 that was ~125,000 faults and a quarter
of an iteration's CPU time. Serving large blocks from the heap and not
trimming it lets the next iteration reuse the same pages.
"""

from __future__ import annotations

import ctypes
import ctypes.util

__all__ = ["reuse_freed_memory"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def reuse_freed_memory() -> bool:
    """Tune glibc's malloc for steady-state loops; return whether it applied (False off glibc).

    Process-wide and not undone: the command line calls it once at start-up.
    Peak memory is unchanged; memory freed at the peak is kept for reuse
    instead of being returned to the system.
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30))
