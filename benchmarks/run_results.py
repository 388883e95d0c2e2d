"""Train every task x method of docs/results.md under a fixed wall-clock budget, one run at a time.

Each run is an ordinary ``projunn train`` run (same code path as the CLI)
written to ``benchmarks/results/rnn/<experiment>-<method>/``; afterwards this
script draws one comparison plot per experiment (held-out loss over the
baseline, and unitarity error, against wall-clock seconds, all methods) and prints the markdown
table used in docs/results.md.

Usage:
    python benchmarks/run_results.py                 # the whole grid (about an hour on 2 cores)
    python benchmarks/run_results.py --only copy-T200 --minutes-scale 0.5
    python benchmarks/run_results.py --table-only    # redraw plots and table from saved runs
"""

from __future__ import annotations

import argparse
import pathlib
import platform
import traceback

import torch

from projunn.harness.train import TrainConfig, train
from runs import METHOD_ORDER, experiment_runs, markdown_table, plot_runs, summary_cells

ROOT = pathlib.Path(__file__).resolve().parent / "results" / "rnn"

# name -> (train settings, minutes per method, the paper's number for projUNN where one exists)
EXPERIMENTS = {
    "copy-T200": (dict(task="copy", seq_len=200, hidden=128, eval_every=50), 2.0, None),
    "copy-T1000": (
        dict(task="copy", seq_len=1000, hidden=190, eval_every=25),
        2.5,
        "learned (loss far below the 0.0204 baseline)",
    ),
    "adding-T200": (dict(task="adding", seq_len=200, hidden=170, eval_every=50), 1.5, "learned with k = 1"),
    "adding-T750": (dict(task="adding", seq_len=750, hidden=170, eval_every=25), 2.5, "learned with k = 1"),
    "pmnist-h170": (
        dict(task="pmnist", hidden=170, epochs=200, eval_every=100),
        4.0,
        "94.1-94.7% test accuracy after 200 epochs",
    ),
}


#: The table's columns after the method: name -> (summary.json's key, format).
COLUMNS = {
    "steps": ("steps", "d"),
    "held-out loss (final)": ("final_loss", ".4g"),
    "best": ("best_loss", ".4g"),
    "baseline": ("baseline_loss", ".4g"),
    "accuracy": ("accuracy", ".1%"),
    "max unitarity error": ("max_unitarity_error", ".1e"),
}


def run(names: list[str], minutes_scale: float) -> None:
    for name in names:
        settings, minutes, _ = EXPERIMENTS[name]
        for method in METHOD_ORDER:
            out = ROOT / f"{name}-{method}"
            print(f"== {name} {method} ({minutes * minutes_scale:.1f} min)", flush=True)
            config = TrainConfig(
                **settings,
                method=method,
                max_minutes=minutes * minutes_scale,
                quiet=True,
                out=str(out),
                overwrite=True,
            )
            try:
                summary = train(config, log=lambda line: print("   ", line, flush=True))
                print("   ", {k: summary[k] for k in ("steps", "final_loss", "accuracy", "max_unitarity_error")})
            except Exception:  # keep going: one failed run must not cost the rest of the grid
                traceback.print_exc()


def plot(name: str) -> pathlib.Path | None:
    """Held-out loss over the baseline and unitarity error against wall-clock seconds, every method."""
    runs = experiment_runs(ROOT, name)
    if not runs:
        return None
    return plot_runs(runs, ROOT / f"{name}.png", panels=("loss", "unitarity"), x="seconds", title=name)


def table() -> str:
    rows = []
    for name, (_, _minutes, paper) in EXPERIMENTS.items():
        for run in experiment_runs(ROOT, name):
            cells = [name, f"{run.summary['seconds'] / 60:.1f} min", run.method, *summary_cells(run, COLUMNS)]
            rows.append([*cells, paper if run.method == "t" and paper else ""])
    return markdown_table(["experiment", "budget / method", "method", *COLUMNS, "paper (projUNN)"], rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=tuple(EXPERIMENTS), help="run only these experiments")
    parser.add_argument("--minutes-scale", type=float, default=1.0, help="multiply every time budget")
    parser.add_argument("--table-only", action="store_true", help="do not train; redraw plots and table")
    args = parser.parse_args(argv)
    cpu = platform.processor() or platform.machine()
    print(f"# {cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    names = args.only or list(EXPERIMENTS)
    if not args.table_only:
        run(names, args.minutes_scale)
    for name in EXPERIMENTS:
        plot(name)
    print(table())


if __name__ == "__main__":
    main()
