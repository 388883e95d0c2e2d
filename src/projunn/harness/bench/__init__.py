"""``projunn bench``: projUNN against the floor, the dense exact steps and the real peers, in one run.

Two benchmarks, float32 on one device, each case timed the same way
(:func:`projunn.harness.bench._measure.measure`):

- ``update``: one update of an N x N orthogonal matrix at rank k. The floor
  (one N x N by N x 2k product and one rank-2k in-place update, the least work
  any rank-k method must do), projunn-t/-d with each sketch, the whole
  ``ProjUNN(SGD)`` optimiser step (from zero, and by the generic
  copy-and-subtract path), plain SGD, the dense exact steps
  (matrix exponential, Cayley, SVD polar) and geoopt's Riemannian SGD/Adam on
  the Stiefel manifold.
- ``layer``: forward + backward + update of a square linear layer on a batch:
  unconstrained Adam, projunn-t/-d + Adam (projunn-t also by the generic
  step, the before/after of the memory-floor step), torch's
  ``parametrizations.orthogonal`` (matrix_exp, cayley) and geotorch's
  ``orthogonal`` (expm, cayley).
- ``sharded`` (only when asked for: ``--only sharded``): the optimiser step of
  an FSDP2-sharded N x N weight on 2 CPU processes, plain Adam and
  projunn-t/-d + Adam, with the bytes every collective of the step moves
  (:mod:`projunn.harness.bench._sharded`).

Peers are optional (``pip install 'projunn[bench]'``); a missing one is listed
as skipped with the reason, as are O(N^3) cases above ``dense_max`` /
``peer_max``.
"""

from __future__ import annotations

import os
import pathlib
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .._allocator import reuse_freed_memory
from .._build import pick_device
from .._config import DEVICES, option, positive_float, positive_int
from .._files import list_names, visible_entries
from .._folder import RUN_ENTRIES
from .._memory import available_bytes, format_bytes
from ._cases import (
    CASE_NAMES,
    HEADLINE_CASES,
    Case,
    Skip,
    layer_cases,
    layer_cases_full_rank,
    peak_bytes,
    update_cases,
    update_cases_full_rank,
)
from ._measure import Measurement, measure, measure_interleaved
from ._report import Row, with_ratios, write_reports
from ._sharded import CollectiveBytes, sharded_measurements

__all__ = [
    "BENCHES",
    "CASE_NAMES",
    "HEADLINE_CASES",
    "QUICK",
    "RESULT_FILES",
    "BenchConfig",
    "CollectiveBytes",
    "Measurement",
    "check_out",
    "describe_machine",
    "measure",
    "run_bench",
    "write_reports",
]

BENCHES = ("update", "layer", "sharded")
#: What a bench writes into its folder (:func:`write_reports`).
RESULT_FILES = ("results.csv", "results.md", "results.png")
#: What a run measures unless told otherwise: the sharded benchmark starts processes, so it is asked for.
DEFAULT_BENCHES = ("update", "layer")


@dataclass(frozen=True)
class BenchConfig:
    """Settings of ``projunn bench``; each field but ``benches`` (``--only``) declares its flag."""

    sizes: tuple[int, ...] = option((256, 512, 1024, 2048, 4096), "matrix sizes N", type=positive_int, nargs="+")
    ranks: tuple[int, ...] = option((1, 4, 16), "ranks k", type=positive_int, nargs="+")
    benches: tuple[str, ...] = DEFAULT_BENCHES
    batch_size: int = option(256, "layer benchmark batch", type=positive_int)
    repeats: int = option(15, "timed calls per case at most", type=positive_int)
    budget_s: float = option(10.0, "seconds per case; slow cases get fewer calls, at least 3", type=positive_float)
    dense_max: int = option(4096, "largest N of the O(N^3) update steps", type=positive_int)
    # geotorch takes minutes per step at 4096
    peer_max: int = option(2048, "largest N of the O(N^3) layer peers", type=positive_int)
    device: str = option("auto", "auto: cuda if available", choices=DEVICES)


#: ``--quick``: a reduced grid that runs in a few minutes on a laptop CPU.
QUICK = dict(sizes=(256, 1024), ranks=(1, 4), repeats=7, budget_s=3.0)


def describe_machine(device: torch.device) -> str:
    """One line naming the hardware and software the numbers come from."""
    if device.type == "cuda":
        hardware = torch.cuda.get_device_name(device)
    else:
        hardware = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as info:
                hardware = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
        hardware += f", {torch.get_num_threads()} threads"
    return f"{hardware}, torch {torch.__version__}, float32"


def _grid_cases(bench: str, n: int, k: int | None, config: BenchConfig, device: torch.device) -> Iterator[Case | Skip]:
    """The cases of one benchmark at (N, k); ``k=None`` gives those that do not depend on k."""
    if bench == "update":
        if k is None:
            return update_cases_full_rank(n, device, dense_max=config.dense_max)
        return update_cases(n, k, device, dense_max=config.dense_max)
    if k is None:
        return layer_cases_full_rank(n, config.batch_size, device, peer_max=config.peer_max)
    return layer_cases(n, k, config.batch_size, device)


def _validate(config: BenchConfig) -> None:
    if not config.sizes or any(n < 2 for n in config.sizes):
        raise ValueError(f"sizes must be integers >= 2, got {config.sizes}")
    if not config.ranks or any(k < 1 for k in config.ranks):
        raise ValueError(f"ranks must be integers >= 1, got {config.ranks}")
    unknown = set(config.benches) - set(BENCHES)
    if not config.benches or unknown:
        raise ValueError(f"benches must be among {', '.join(BENCHES)}, got {config.benches}")


def _check_memory(config: BenchConfig, device: torch.device) -> None:
    """Refuse, before anything is allocated, sizes the device plainly cannot hold (as ``projunn train`` does).

    Each size's cases are freed before the next size's are built, so the largest size decides.
    """
    n = max(config.sizes)
    for bench in config.benches:
        # The sharded benchmark runs on CPU processes whatever the device (see _sharded).
        where = torch.device("cpu") if bench == "sharded" else device
        needed, available = peak_bytes(bench, n, config), available_bytes(where)
        if available is not None and needed > available:
            raise ValueError(
                f"the {bench} benchmark at N = {n} needs about {format_bytes(needed)} of memory, more than the "
                f"{format_bytes(available)} available on {where.type}; choose smaller --sizes"
            )


def check_out(out: pathlib.Path, *, overwrite: bool) -> None:
    """Refuse, before anything is measured, a folder the results cannot go into or would silently replace.

    As ``projunn train`` treats its folder: earlier results are replaced, and other files written
    beside, only with ``overwrite``. A training run's folder is refused even then: results
    dropped among a run's files would read as that run's.

    Raises:
        ValueError: one line saying what is in the way.
    """
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    if not out.exists():
        ancestor = next(p for p in out.absolute().parents if p.exists())
        if not ancestor.is_dir():
            raise ValueError(f"cannot create --out {out}: {ancestor} is a file, not a folder")
        if not os.access(ancestor, os.W_OK | os.X_OK):
            raise ValueError(f"cannot create --out {out}: {ancestor} is not writable")
        return
    names = visible_entries(out)
    if RUN_ENTRIES.intersection(names):
        raise ValueError(f"{out} holds a training run; choose another --out for the bench results")
    if overwrite or not names:
        return
    if set(RESULT_FILES).intersection(names):
        raise ValueError(f"{out} already holds bench results; pass --overwrite to replace them")
    raise ValueError(
        f"{out} holds files that are not bench results ({list_names(names)}); choose an empty or new folder, "
        "or pass --overwrite to write the results beside them"
    )


def run_bench(config: BenchConfig, *, log: Callable[[str], None] | None = print) -> tuple[list[Row], str]:
    """Measure every case of the grid; returns the rows (with ratios) and the machine line.

    Like ``projunn train``, it first lets the process keep freed memory for
    reuse (:func:`projunn.harness._allocator.reuse_freed_memory`, process-wide):
    otherwise glibc hands every N x N temporary (Adam's ``sqrt`` and ``div``,
    4 MiB each at N = 1024) fresh pages, and a step pays ~1,700 page faults
    that a training loop does not, inflating the unconstrained baseline most.
    """
    _validate(config)
    device = pick_device(config.device)
    _check_memory(config, device)
    machine = describe_machine(device)
    if reuse_freed_memory():
        machine += ", freed memory kept for reuse"
    if log:
        log(f"# projunn bench: {machine}")
    plan = [(bench, n) for n in config.sizes for bench in config.benches]
    rows: list[Row] = []
    progress = tqdm(plan, desc="bench", unit="size", disable=log is None, leave=False)
    for bench, n in progress:
        progress.set_postfix(bench=bench, N=n)
        if bench == "sharded":
            rows += _sharded_rows(n, config, log)
            continue
        shared = [(case, _run(case, device, config)) for case in _grid_cases(bench, n, None, config, device)]
        for k in config.ranks:
            measured = _run_together(list(_grid_cases(bench, n, min(k, n), config, device)), device, config)
            for case, (ms, runs, peak_mib, note) in measured + shared:
                shared_across_k = any(case is c for c, _ in shared)
                row = Row(bench, n, k, case.name, ms, runs, peak_mib, shared_across_k=shared_across_k, note=note)
                rows.append(row)
                if log and (k == config.ranks[0] or not row.shared_across_k):
                    time = f"{row.ms:10.3f} ms" if row.ms is not None else f"   skipped: {row.note}"
                    log(f"{bench:6s} N={n:5d} k={k:2d} {case.name:26s} {time}")
    return with_ratios(rows), machine


def _sharded_rows(n: int, config: BenchConfig, log: Callable[[str], None] | None) -> list[Row]:
    """Rows of the sharded benchmark at N: time per step, and the bytes per step in the note."""
    rows = []
    for k in config.ranks:
        for case, ms, sent, calls in sharded_measurements(n, min(k, n), world=2, repeats=config.repeats):
            gather = n * n * 4  # one all-gather of the float32 weight, what a whole-matrix method moves
            note = f"{sent:,} bytes in {calls} collectives per step (all-gather of the weight: {gather:,})"
            rows.append(Row("sharded", n, k, case, ms, config.repeats, None, note=note))
            if log:
                log(f"sharded N={n:5d} k={k:2d} {case:26s} {ms:10.3f} ms  {sent:,} bytes")
    return rows


def _run(case: Case | Skip, device: torch.device, config: BenchConfig) -> tuple:
    """(ms, runs, peak_mib, note) of one case, timed alone."""
    return _run_together([case], device, config)[0][1]


def _run_together(cases: list[Case | Skip], device: torch.device, config: BenchConfig) -> list[tuple]:
    """(case, (ms, runs, peak_mib, note)) of each case, the measured ones timed in the same rounds."""
    timed = [case for case in cases if isinstance(case, Case)]
    found = measure_interleaved([case.fn for case in timed], device, repeats=config.repeats, budget_s=config.budget_s)
    results = {id(case): (m.ms, m.runs, m.peak_mib, "") for case, m in zip(timed, found)}
    skipped = {id(case): (None, 0, None, case.reason) for case in cases if isinstance(case, Skip)}
    return [(case, results.get(id(case)) or skipped[id(case)]) for case in cases]


def default_out() -> pathlib.Path:
    """runs/bench-TIME, beside the training runs."""
    return pathlib.Path("runs") / time.strftime("bench-%Y%m%d-%H%M%S")
