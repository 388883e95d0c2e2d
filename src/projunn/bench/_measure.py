"""Timing and peak memory of one benchmark case, the same way for every case and peer."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["Measurement", "measure"]


@dataclass(frozen=True)
class Measurement:
    """Median wall-clock time of one call, how many timed calls it is the median of, and peak memory."""

    ms: float
    runs: int
    peak_mib: float | None  # extra memory at the peak of one call; None where it cannot be read


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _peak_mib(fn: Callable[[], object], device: torch.device) -> float | None:
    """Memory one call of ``fn`` needs above what is already held, in MiB.

    CUDA: from the caching allocator's peak statistics (exact). CPU on Linux:
    the rise of the process's peak resident set (VmHWM) over its resident set
    before the call, after resetting the peak through /proc/self/clear_refs;
    approximate (allocator caching can hide or add pages), and None elsewhere.
    """
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # resets VmHWM to the current resident set
    except OSError:
        return None
    before = _rss_kib("VmRSS")
    fn()
    peak = _rss_kib("VmHWM")
    if before is None or peak is None:
        return None
    return max(peak - before, 0) / 2**10


def measure(
    fn: Callable[[], object],
    device: torch.device,
    *,
    repeats: int,
    budget_s: float,
    warmup: int = 2,
) -> Measurement:
    """Median of up to ``repeats`` timed calls after ``warmup`` untimed ones.

    Slow cases get fewer timed calls, as many as fit in ``budget_s`` but at
    least 3 (the first warm-up call sets the estimate), so a grid with O(N^3)
    peers at large N finishes in minutes. The peak memory is read on one more
    call after the timings.
    """
    start = time.perf_counter()
    fn()
    _sync(device)
    first = time.perf_counter() - start
    for _ in range(warmup - 1):
        if first * warmup > budget_s:
            break
        fn()
    _sync(device)
    runs = max(3, min(repeats, int(budget_s / max(first, 1e-9))))
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return Measurement(ms=1e3 * statistics.median(times), runs=runs, peak_mib=_peak_mib(fn, device))
