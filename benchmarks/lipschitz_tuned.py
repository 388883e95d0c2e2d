"""The certified-robustness comparison again, each method at its own learning rate, chosen on validation.

`lipschitz_peers.py` trains every method with one shared recipe (Adam, lr 1e-3). A method whose
steps that lr suits poorly is then compared at a handicap, so here each method first gets one-epoch
probes: the first epoch of the same 10-epoch cosine schedule at each of ``--lrs``, scored on the
validation images (never the test images). The lr whose probe certifies the most validation images
at the largest radius (1.58; ties: clean validation accuracy) then trains the whole schedule into
``<out-root>/<method>/``, which `lipschitz_peers`'s summary and soundness checks finish as before. The
chosen probe is that run's first epoch (the same seed, batches and schedule), so the run continues
from it.

A finished probe keeps its ``metrics.csv`` and ``probe.json`` (its settings and validation row); its
checkpoint is removed once the choice is made. ``<out-root>/selection.json`` records every probe's
validation row and each method's choice;
``<out-root>/results.md`` is `lipschitz_peers`'s table of the tuned runs with the probes beneath.
Every probe and run resumes (Ctrl-C or SIGTERM ends a sitting after the current step).

Usage:
    python benchmarks/lipschitz_tuned.py --threads 1 --methods projunn-t cayley aoc
    python benchmarks/lipschitz_tuned.py --threads 1 --methods projunn-t cayley aoc --resume
    python benchmarks/lipschitz_tuned.py --table-only
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import shutil
import sys
from collections.abc import Callable
from typing import Any

import torch

import lipschitz_peers as peers

ROOT = pathlib.Path(__file__).resolve().parent / "results" / "lipschitz-tuned"
LEARNING_RATES = (1e-3, 3e-3, 1e-2, 3e-2)
#: What a probe is ranked by: certified validation accuracy at the largest radius, then clean accuracy.
RANKED_BY = (f"val_certified_{peers.RADII[-1]:g}", "val_accuracy")
#: A finished probe's settings and validation row, in its folder.
PROBE_RECORD = "probe.json"


def probe_folder(root: pathlib.Path, method: str, lr: float) -> pathlib.Path:
    return root / "probes" / f"{method}-lr{lr:g}"


def probe(
    method: str, lr: float, settings: peers.Settings, data: peers.Data, root: pathlib.Path, stop: Callable[[], bool]
) -> dict[str, float] | None:
    """The validation row after the first epoch of ``method``'s schedule at ``lr`` (None: the sitting stopped)."""
    folder, tried = probe_folder(root, method, lr), dataclasses.replace(settings, lr=lr)
    checkpoint, record = folder / "checkpoint.pt", folder / PROBE_RECORD
    if record.exists():
        saved = json.loads(record.read_text())
        peers.check_settings(saved, tried, folder)  # a probe of another schedule must not decide this one
        return saved["row"]
    position = None
    if checkpoint.exists():
        saved = torch.load(checkpoint, weights_only=True)
        peers.check_settings(saved, tried, folder)
        position = saved["position"]
    if position is None or not position["rows"]:
        per_epoch = math.ceil(len(data.train[0]) / settings.batch_size)
        done = 0 if position is None else position["step"]
        peers.train_method(
            method, tried, data, folder, resume=position is not None, max_steps=per_epoch - done, stop=stop
        )
        position = torch.load(checkpoint, weights_only=True)["position"]
    if not position["rows"]:
        return None
    record.write_text(json.dumps({"settings": dataclasses.asdict(tried), "row": position["rows"][0]}, indent=2) + "\n")
    return position["rows"][0]


def choose(rows: dict[float, dict[str, float]]) -> float:
    """The learning rate whose probe ranks first by :data:`RANKED_BY`."""
    return max(rows, key=lambda lr: tuple(rows[lr][key] for key in RANKED_BY))


def tune(
    method: str, lrs: tuple[float, ...], settings: peers.Settings, data: peers.Data, root: pathlib.Path, stop
) -> dict[str, Any] | None:
    """Probe, choose, train the whole schedule at the chosen lr; the selection, or None if the sitting stopped."""
    rows = {}
    for lr in lrs:
        row = probe(method, lr, settings, data, root, stop)
        if row is None or stop():
            return None
        rows[lr] = row
    chosen = choose(rows)
    selection = {"probes": {f"{lr:g}": row for lr, row in rows.items()}, "chosen_lr": chosen, "ranked_by": RANKED_BY}
    _record(root, method, selection)
    if not (root / method).exists():  # the chosen probe is the run's first epoch: same seed, batches and schedule
        shutil.copytree(probe_folder(root, method, chosen), root / method, ignore=shutil.ignore_patterns(PROBE_RECORD))
    for lr in lrs:  # each probe's record is all that is kept of it (a checkpoint is 25 MB at the defaults)
        (probe_folder(root, method, lr) / "checkpoint.pt").unlink(missing_ok=True)
    summary = peers.train_method(
        method,
        dataclasses.replace(settings, lr=chosen),
        data,
        root / method,
        resume=(root / method).exists(),
        stop=stop,
    )
    return selection if summary is not None else None


def _record(root: pathlib.Path, method: str, selection: dict[str, Any]) -> None:
    path = root / "selection.json"
    recorded = json.loads(path.read_text()) if path.exists() else {}
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps({**recorded, method: selection}, indent=2) + "\n")
    os.replace(partial, path)


def selection_table(root: pathlib.Path) -> str:
    """Markdown: each tuned method's probes (validation, first epoch) and the lr chosen."""
    path = root / "selection.json"
    if not path.exists():
        return ""
    recorded = json.loads(path.read_text())
    lrs = sorted({lr for selection in recorded.values() for lr in selection["probes"]}, key=float)
    lines = [
        "Probes: the first epoch of the schedule at each lr, validation images; clean / certified at "
        f"{peers.RADII[-1]:g}; the chosen lr in bold.",
        "",
        "| method | " + " | ".join(f"lr {lr}" for lr in lrs) + " |",
        "|---|" + "---|" * len(lrs),
    ]
    for method, selection in recorded.items():
        cells = []
        for lr in lrs:
            row = selection["probes"].get(lr)
            cell = "-" if row is None else f"{row['val_accuracy']:.1%} / {row[RANKED_BY[0]]:.1%}"
            cells.append(f"**{cell}**" if lr == f"{selection['chosen_lr']:g}" else cell)
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", choices=peers.METHODS, default=["projunn-t", "cayley", "aoc"])
    parser.add_argument("--lrs", nargs="+", type=float, default=list(LEARNING_RATES))
    parser.add_argument("--epochs", type=int, default=peers.Settings().epochs)
    parser.add_argument("--limit-train", type=int, default=None, help="train on N images (smoke tests)")
    parser.add_argument("--data", choices=("mnist", "synthetic"), default="mnist")
    parser.add_argument("--batch-size", type=int, default=peers.Settings().batch_size)
    parser.add_argument("--channels", type=int, default=peers.Settings().channels)
    parser.add_argument("--blocks", type=int, default=peers.Settings().blocks)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out-root", type=pathlib.Path, default=ROOT)
    parser.add_argument("--resume", action="store_true", help="continue the probes and runs in --out-root")
    parser.add_argument("--table-only", action="store_true", help="rebuild <out-root>/results.md and print it")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if not args.table_only:
        if args.out_root.exists() and any(args.out_root.iterdir()) and not args.resume:
            print(f"lipschitz_tuned: {args.out_root} holds runs: pass --resume", file=sys.stderr)
            return 2
        chosen = {k: getattr(args, k) for k in ("epochs", "limit_train", "data", "batch_size", "channels", "blocks")}
        settings = peers.Settings(**chosen)
        lrs = tuple(dict.fromkeys(args.lrs))
        with peers.stop_requests() as stop:
            data = peers.load_data(settings)
            for method in args.methods:
                try:
                    if tune(method, lrs, settings, data, args.out_root, stop) is None:
                        return 1
                except ValueError as error:
                    print(f"lipschitz_tuned: {error}", file=sys.stderr)
                    return 2
    args.out_root.mkdir(parents=True, exist_ok=True)
    table = peers.results_table(args.out_root) + "\n" + selection_table(args.out_root)
    (args.out_root / "results.md").write_text(table)
    print(table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
