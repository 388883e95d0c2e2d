"""The memory a ``projunn train`` run needs, estimated from its settings before anything is allocated.

A run whose settings ask for terabytes (``--seq-len 1000000000``) should be
refused with a sentence, not end in an allocator traceback minutes later. Each
task estimates the values it holds (:meth:`projunn.harness.tasks.Task.footprint`).
"""

from __future__ import annotations

import os
import pathlib

import torch

from .tasks import get_task

__all__ = ["available_bytes", "estimate_bytes", "format_bytes", "size_options"]


def estimate_bytes(config, processes: int = 1) -> int:
    """Rough peak memory of one process of a run with these (resolved) settings, in bytes.

    Args:
        config: resolved :class:`projunn.harness.train.TrainConfig`.
        processes: data-parallel replicas sharing each global batch.
    """
    values, _ = get_task(config.task).footprint(config, config.batch_size // max(processes, 1))
    return values * torch.get_default_dtype().itemsize * (2 if config.complex else 1)


def size_options(config) -> str:
    """The flags that set a run's size, for the message that refuses it."""
    return get_task(config.task).footprint(config, config.batch_size)[1]


def available_bytes(device: torch.device) -> int | None:
    """Memory a new allocation can use on ``device`` now (None: unknown)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    meminfo = pathlib.Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def format_bytes(count: float) -> str:
    """``1.5 GiB``-style sizes."""
    *units, largest = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
    for unit in units:
        if count < 1024:
            return f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} {largest}"
