"""Timing and peak memory of one benchmark case, the same way for every case and peer."""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

__all__ = ["Measurement", "measure", "running_peak"]

_MEASURED = "projunn.harness.bench: measured call"  # profiler label of the call whose allocations are read


@dataclass(frozen=True)
class Measurement:
    """Median wall-clock time of one call, how many timed calls it is the median of, and peak memory."""

    ms: float
    runs: int
    peak_mib: float | None  # extra memory at the peak of one call; None where it cannot be read


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def running_peak(changes: Iterable[int]) -> int:
    """Largest running total of a sequence of allocation (+bytes) and free (-bytes) events, at least 0."""
    total = peak = 0
    for change in changes:
        total += change
        peak = max(peak, total)
    return peak


@contextlib.contextmanager
def _stderr_silenced() -> Iterator[None]:
    """Point file descriptor 2 at /dev/null, for C++ messages that Python cannot filter."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_allocations(fn: Callable[[], object]) -> list[int] | None:
    """Every allocation (+bytes) and free (-bytes) of torch's CPU allocator during one call of ``fn``, in order.

    Read with torch's legacy CPU profiler and ``profile_memory``, which records
    the allocator's events without starting Kineto (that costs seconds and
    prints trace markers). ``fn`` is called twice under the profiler and the
    second call is read: the profiler knows the size only of blocks allocated
    while it runs, so a step that frees what the previous one allocated (a
    gradient, say) has those frees counted only thanks to the first call.
    Blocks older than that which are freed are not counted, and torch prints
    one line to stderr the first time that happens in a process, which is
    silenced: it would only confuse the benchmark's output. None where this
    torch has no such profiler or one is already running.
    """
    try:
        from torch.autograd import _disable_profiler_legacy, _enable_profiler_legacy
        from torch.autograd.profiler_legacy import profile

        config = profile(profile_memory=True).config()
    except (ImportError, AttributeError):
        return None
    with _stderr_silenced():
        try:
            _enable_profiler_legacy(config)
        except RuntimeError:  # a profiler is already running
            return None
        try:
            fn()
            with torch.autograd.profiler.record_function(_MEASURED):
                fn()
        finally:
            threads = _disable_profiler_legacy()
    events = [e for thread in threads for e in thread]
    start = min(e.start_us() for e in events if e.kind() == "push" and e.name() == _MEASURED)
    end = max(e.start_us() for e in events if e.kind() == "pop" and e.start_us() >= start)
    measured = [e for e in events if e.kind() == "memory_alloc" and start <= e.start_us() <= end]
    measured.sort(key=lambda e: e.start_us())  # stable: each thread's events keep their order
    return [e.cpu_memory_usage() for e in measured]


def _peak_mib(fn: Callable[[], object], device: torch.device) -> float | None:
    """Memory one call of ``fn`` allocates above what is already held, at its peak, in MiB.

    Both count every tensor torch allocates during the call (results,
    temporaries, workspaces inside torch's own kernels), freed ones included,
    at the moment the most are alive at once: CUDA from the caching
    allocator's peak statistics, CPU from the allocation events of torch's
    allocator (:func:`_cpu_allocations`). Not counted: buffers BLAS/LAPACK
    libraries allocate for themselves, and Python objects. (The resident set
    size cannot stand in on CPU: the C allocator keeps freed pages mapped, so a
    call whose temporaries fit in them reads 0.) None where it cannot be read.
    """
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    changes = _cpu_allocations(fn)
    return None if changes is None else running_peak(changes) / 2**20


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
    least 3 unless ``repeats`` is smaller (the first warm-up call sets the
    estimate), so a grid with O(N^3) peers at large N finishes in minutes.
    The peak memory is read on one more call after the timings
    (:func:`_peak_mib`).
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
    runs = min(repeats, max(3, int(budget_s / max(first, 1e-9))))
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return Measurement(ms=1e3 * statistics.median(times), runs=runs, peak_mib=_peak_mib(fn, device))
