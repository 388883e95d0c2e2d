"""Timing and peak memory of benchmark cases, the same way for every case and peer."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["CollectiveBytes", "Measurement", "measure", "measure_interleaved"]


@dataclass(frozen=True)
class Measurement:
    """Median wall-clock time of one call, how many timed calls it is the median of, and peak memory."""

    ms: float
    runs: int
    peak_mib: float | None  # extra memory at the peak of one call; CUDA only, None elsewhere


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mib(fn: Callable[[], object], device: torch.device) -> float | None:
    """Memory one call of ``fn`` allocates above what is already held, at its peak, in MiB; None off CUDA.

    Read from the caching allocator's peak statistics, so it counts every tensor torch allocates
    during the call (results, temporaries, workspaces inside torch's own kernels), freed ones
    included, at the moment the most are alive at once. Not on CPU: the resident set size cannot
    stand in (the C allocator keeps freed pages mapped, so a call whose temporaries fit in them
    reads 0), and torch's profiler, which records the CPU allocator's events, starts Kineto on
    every call (most of a second the first time) and prints trace markers to stderr.
    """
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    _sync(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def measure(fn: Callable[[], object], device: torch.device, **settings) -> Measurement:
    """:func:`measure_interleaved` of one call (``settings``: its ``repeats``, ``budget_s``, ``warmup``)."""
    return measure_interleaved([fn], device, **settings)[0]


def measure_interleaved(
    fns: Sequence[Callable[[], object]], device: torch.device, *, repeats: int, budget_s: float, warmup: int = 2
) -> list[Measurement]:
    """Median of up to ``repeats`` timed calls of each of ``fns``, in rounds that call each in turn, after warm-up.

    A shared machine changes speed while a benchmark runs (other processes,
    memory traffic, clocks): 10-30% within minutes on the 2-core VM the
    figures of docs/benchmarks.md come from. Cases timed one after the other
    see different machines, and a ratio between them measures the machine as
    much as the method; timed in the same rounds, every case sees the same
    changes, so their ratios hold. Every round times each call once, the
    order reversed every other round so that no call always follows the same
    one. ``warmup`` untimed rounds come first (only one where they would take
    more than the budget); the first sets the estimate. ``budget_s`` is per call: slow cases
    get fewer rounds, as many as fit in ``len(fns) * budget_s`` but at least 3
    unless ``repeats`` is smaller, so a grid with O(N^3) peers at large N
    finishes in minutes. The peak memory is read on one more call after the
    timings (:func:`_peak_mib`).

    Returns:
        one Measurement per call, in the order of ``fns``, with the same ``runs``.
    """

    def seconds(fn: Callable[[], object]) -> float:
        start = time.perf_counter()
        fn()
        _sync(device)
        return time.perf_counter() - start

    round_s = sum(map(seconds, fns))  # the first warm-up round
    if warmup * round_s <= budget_s * len(fns):  # the others, where they fit in the budget
        for _ in range(warmup - 1):
            for fn in fns:
                seconds(fn)
    runs = min(repeats, max(3, int(budget_s * len(fns) / max(round_s, 1e-9))))
    times: list[list[float]] = [[] for _ in fns]
    order = list(range(len(fns)))
    for _ in range(runs):
        for i in order:
            times[i].append(seconds(fns[i]))
        order.reverse()
    return [
        Measurement(ms=1e3 * statistics.median(timed), runs=runs, peak_mib=_peak_mib(fn, device))
        for fn, timed in zip(fns, times)
    ]


class CollectiveBytes(TorchDispatchMode):
    """Counts the collectives run under it and their bytes: the largest tensor each touches, what each rank receives."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace in ("c10d", "_c10d_functional"):
            leaves = torch.utils._pytree.tree_leaves((args, kwargs))
            self.total += max(t.numel() * t.element_size() for t in leaves if isinstance(t, torch.Tensor))
            self.calls += 1
        return func(*args, **(kwargs or {}))
