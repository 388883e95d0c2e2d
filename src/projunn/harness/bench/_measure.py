"""Timing and peak memory of one benchmark case, the same way for every case and peer."""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

__all__ = ["Measurement", "measure", "measure_interleaved", "running_peak"]

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
    return measure_interleaved([fn], device, repeats=repeats, budget_s=budget_s, warmup=warmup)[0]


def measure_interleaved(
    fns: Sequence[Callable[[], object]],
    device: torch.device,
    *,
    repeats: int,
    budget_s: float,
    warmup: int = 2,
) -> list[Measurement]:
    """:func:`measure` for several calls at once, timed in rounds that call each in turn.

    A shared machine changes speed while a benchmark runs (other processes,
    memory traffic, clocks): 10-30% within minutes on the 2-core VM the
    figures of docs/benchmarks.md come from. Cases timed one after the other
    see different machines, and a ratio between them measures the machine as
    much as the method; timed in the same rounds, every case sees the same
    changes, so their ratios hold. Every round times each call once, the
    order reversed every other round so that no call always follows the same
    one. ``budget_s`` is per call: the rounds stop at ``repeats`` or when
    ``len(fns) * budget_s`` is spent (but at least 3, unless ``repeats`` is smaller).

    Returns:
        one Measurement per call, in the order of ``fns``, with the same ``runs``.
    """
    firsts = []
    for fn in fns:
        start = time.perf_counter()
        fn()
        _sync(device)
        firsts.append(time.perf_counter() - start)
    round_s = sum(firsts)
    for _ in range(warmup - 1):
        if round_s * warmup > budget_s * len(fns):
            break
        for fn in fns:
            fn()
    _sync(device)
    runs = min(repeats, max(3, int(budget_s * len(fns) / max(round_s, 1e-9))))
    times: list[list[float]] = [[] for _ in fns]
    order = list(range(len(fns)))
    for _ in range(runs):
        for i in order:
            start = time.perf_counter()
            fns[i]()
            _sync(device)
            times[i].append(time.perf_counter() - start)
        order.reverse()
    return [
        Measurement(ms=1e3 * statistics.median(timed), runs=runs, peak_mib=_peak_mib(fn, device))
        for fn, timed in zip(fns, times)
    ]
