"""``projunn bench``: projUNN against the floor, the dense exact steps and the real peers, in one run.

Two benchmarks, float32 on one device, every case timed the same way
(:func:`projunn.harness.bench._measure.measure_interleaved`):

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

Peers are optional (``pip install 'projunn[bench]'``); a missing one is listed
as skipped with the reason, as are O(N^3) cases above ``dense_max`` /
``peer_max``. The optimiser step of an FSDP2-sharded weight, with the bytes it
communicates, is timed by ``benchmarks/sharded_bytes.py``. :func:`add_parser` and :func:`main`
are the ``projunn bench`` command (:mod:`projunn.harness.cli` calls them).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import platform
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .._allocator import reuse_freed_memory
from .._build import pick_device
from .._config import DEVICES, flag, folder_name, option, positive_float, positive_int
from .._files import describe_os_error, list_names, make_new_folder, visible_entries
from .._folder import RUN_ENTRIES
from .._memory import available_bytes, format_bytes
from ._cases import BUILDERS, Case, peak_bytes
from ._measure import CollectiveBytes, measure, measure_interleaved
from ._report import RESULT_FILES, Row, with_ratios, write_reports

__all__ = ["BenchConfig", "CollectiveBytes", "add_parser", "main", "measure", "run_bench"]

BENCHES = tuple(BUILDERS)


@dataclass(frozen=True)
class BenchConfig:
    """Settings of ``projunn bench``; each field but ``benches`` (``--only``) declares its flag."""

    sizes: tuple[int, ...] = option((256, 512, 1024, 2048, 4096), "matrix sizes N", type=positive_int, nargs="+")
    ranks: tuple[int, ...] = option((1, 4, 16), "ranks k", type=positive_int, nargs="+")
    benches: tuple[str, ...] = BENCHES
    batch_size: int = option(256, "layer benchmark batch", type=positive_int)
    repeats: int = option(15, "timed calls per case at most", type=positive_int)
    budget_s: float = option(10.0, "seconds per case; slow cases get fewer calls, at least 3", type=positive_float)
    dense_max: int = option(4096, "largest N of the O(N^3) update steps", type=positive_int)
    # geotorch takes minutes per step at 4096
    peer_max: int = option(2048, "largest N of the O(N^3) layer peers", type=positive_int)
    device: str = option("auto", "auto: cuda if available", choices=DEVICES)


#: The fields of :class:`BenchConfig` that declare a flag.
_FLAGS = tuple(f.name for f in dataclasses.fields(BenchConfig) if "help" in f.metadata)
#: ``--quick``: a reduced grid that runs in a few minutes on a laptop CPU.
QUICK = dict(sizes=(256, 1024), ranks=(1, 4), repeats=7, budget_s=3.0)


def describe_machine(device: torch.device) -> str:
    """One line naming the hardware and software the numbers come from."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, float32"
    info = pathlib.Path("/proc/cpuinfo")
    names = re.findall(r"model name\s*: (.*)", info.read_text()) if info.exists() else []
    cpu = names[0] if names else platform.processor() or platform.machine()
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}, float32"


def _check(config: BenchConfig, device: torch.device) -> None:
    """Refuse, before anything is allocated, a grid out of range or sizes the device plainly cannot hold.

    Each size's cases are freed before the next size's are built, so the largest size decides (as
    ``projunn train`` checks its run's memory).
    """
    if not config.sizes or any(n < 2 for n in config.sizes):
        raise ValueError(f"sizes must be integers >= 2, got {config.sizes}")
    if not config.ranks or any(k < 1 for k in config.ranks):
        raise ValueError(f"ranks must be integers >= 1, got {config.ranks}")
    if not config.benches or set(config.benches) - set(BENCHES):
        raise ValueError(f"benches must be among {', '.join(BENCHES)}, got {config.benches}")
    n = max(config.sizes)
    for bench in config.benches:
        needed, available = peak_bytes(bench, n, config), available_bytes(device)
        if available is not None and needed > available:
            raise ValueError(
                f"the {bench} benchmark at N = {n} needs about {format_bytes(needed)} of memory, more than the "
                f"{format_bytes(available)} available on {device.type}; choose smaller --sizes"
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


def _rows(bench: str, n: int, k: int, cases: list[Case], config: BenchConfig, device: torch.device) -> list[Row]:
    """A row per case at (N, k), the cases that can run timed in the same rounds."""
    timed = [case.fn for case in cases if case.fn is not None]
    found = iter(measure_interleaved(timed, device, repeats=config.repeats, budget_s=config.budget_s))
    rows = []
    for case in cases:
        if case.fn is None:
            rows.append(Row(bench, n, k, case.name, None, 0, None, note=case.reason))
        else:
            m = next(found)
            rows.append(Row(bench, n, k, case.name, m.ms, m.runs, m.peak_mib))
    return rows


def run_bench(config: BenchConfig, *, log: Callable[[str], None] | None = print) -> tuple[list[Row], str]:
    """Measure every case of the grid; returns the rows (with ratios) and the machine line.

    The cases of one (N, k) are timed together; those that do not depend on k are timed once per
    N, each alone, and their row repeated for every k (``shared_across_k``). Like ``projunn
    train``, it first lets the process keep freed memory for reuse
    (:func:`projunn.harness._allocator.reuse_freed_memory`, process-wide): otherwise glibc hands
    every N x N temporary (Adam's ``sqrt`` and ``div``, 4 MiB each at N = 1024) fresh pages, and a
    step pays ~1,700 page faults that a training loop does not, inflating the unconstrained
    baseline most.
    """
    device = pick_device(config.device)
    _check(config, device)
    machine = describe_machine(device) + (", freed memory kept for reuse" if reuse_freed_memory() else "")
    if log:
        log(f"# projunn bench: {machine}")
    rows: list[Row] = []
    for n, bench in ((n, bench) for n in config.sizes for bench in config.benches):
        per_rank, rank_free = BUILDERS[bench]
        # Timed once per N, each alone: an O(N^3) case in a round would leave its others few calls.
        shared = [_rows(bench, n, 0, [case], config, device)[0] for case in rank_free(n, config, device)]
        for k in config.ranks:
            measured = _rows(bench, n, k, list(per_rank(n, min(k, n), config, device)), config, device)
            for row in measured + [dataclasses.replace(row, k=k, shared_across_k=True) for row in shared]:
                rows.append(row)
                if log and (k == config.ranks[0] or not row.shared_across_k):
                    shown = f"{row.ms:10.3f} ms" if row.ms is not None else f"   skipped: {row.note}"
                    log(f"{bench:6s} N={n:5d} k={k:2d} {row.case:26s} {shown}")
    return with_ratios(rows), machine


def default_out() -> pathlib.Path:
    """runs/bench-TIME, beside the training runs."""
    return pathlib.Path("runs") / time.strftime("bench-%Y%m%d-%H%M%S")


def add_parser(commands, shown: Callable[[object], str]) -> None:
    """``projunn bench``'s parser among the ``projunn`` subcommands; ``shown`` writes a default as a flag's value."""
    bench = commands.add_parser(
        "bench",
        help="time projUNN against the floor, dense exact steps, torch, geotorch and geoopt",
        description=(
            "Time, in one run on one device, the projUNN update step against the floor (the least work of\n"
            "any rank-k method), the dense exact steps and geoopt; and a whole training step of an orthogonal\n"
            "linear layer against unconstrained Adam, torch's parametrizations.orthogonal and geotorch.\n"
            "Writes results.csv, results.md and results.png into --out. Peers are optional:\n"
            "pip install 'projunn[bench]'."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = bench.add_argument
    quick = ", ".join(f"{flag(key)} {shown(value)}" for key, value in QUICK.items())
    add("--quick", action="store_true", help=f"reduced grid, a few minutes on a laptop CPU: {quick}")
    for f in dataclasses.fields(BenchConfig):  # only the flags given are set, so that they override --quick's
        if f.name in _FLAGS:
            described = f"{f.metadata['help']} (default {shown(f.default)})"
            add(flag(f.name), **{**f.metadata, "help": described}, default=argparse.SUPPRESS)
    add("--with-8192", action="store_true", help="also N = 8192 (O(N^3) cases above --dense-max / --peer-max skipped)")
    add("--only", choices=BENCHES, help="run one benchmark (the sharded step: benchmarks/sharded_bytes.py)")
    add("--threads", type=positive_int, help="torch.set_num_threads (default: torch's choice)")
    add("--out", type=folder_name, help="output folder (default runs/bench-TIME, made unique with -2, -3, ...)")
    add(
        "--overwrite",
        action="store_true",
        help="replace an earlier bench's results in --out, or write beside other files (never into a training run)",
    )
    add("--quiet", action="store_true", help="no per-case lines")


def main(args: argparse.Namespace) -> int:
    """Run ``projunn bench`` as parsed by :func:`add_parser`; returns the exit status (2: a one-line error)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    given = {k: tuple(v) if isinstance(v, list) else v for k, v in vars(args).items() if k in _FLAGS}  # see add_parser
    settings = {**(QUICK if args.quick else {}), **given}
    if args.with_8192:
        settings["sizes"] = (*settings.get("sizes", BenchConfig.sizes), 8192)
    if args.only:
        settings["benches"] = (args.only,)
    out = pathlib.Path(args.out) if args.out else None
    try:
        if out:  # checked before the minutes of measuring, not when the results are ready
            check_out(out, overwrite=args.overwrite)
        rows, machine = run_bench(BenchConfig(**settings), log=None if args.quiet else print)
    except ValueError as error:
        print(f"projunn bench: error: {error}", file=sys.stderr)
        return 2
    target = out or default_out()
    try:  # a default name is made unique as train's are: two benches started in one second
        paths = write_reports(target if out else make_new_folder(target), rows, machine)
    except OSError as error:
        where = error.filename or target
        print(f"projunn bench: error: cannot write {where}: {describe_os_error(error)}", file=sys.stderr)
        return 2
    for path in paths:
        print(f"wrote {path}")
    return 0
