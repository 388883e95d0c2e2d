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

from projunn.harness.runs import METHOD_ORDER, RunRecord, plot_runs, read_runs
from projunn.harness.train import TrainConfig, train

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


def _runs(name: str) -> list[RunRecord]:
    """The finished or stopped runs of experiment ``name``, in the harness's method order."""
    return [run for run in read_runs(ROOT / f"{name}-{method}" for method in METHOD_ORDER) if run.summary]


def plot(name: str) -> pathlib.Path | None:
    """Held-out loss over the baseline and unitarity error against wall-clock seconds, every method."""
    runs = _runs(name)
    if not runs:
        return None
    return plot_runs(runs, ROOT / f"{name}.png", panels=("loss", "unitarity"), x="seconds", title=name)


def table() -> str:
    lines = [
        "| experiment | budget / method | method | steps | held-out loss (final) | best | baseline | accuracy "
        "| max unitarity error | paper (projUNN) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, (_, _minutes, paper) in EXPERIMENTS.items():
        for run in _runs(name):
            summary, method = run.summary, run.method

            def fmt(key, spec=".4g", summary=summary):
                value = summary.get(key)
                return "-" if value is None else format(value, spec)

            accuracy = "-" if summary.get("accuracy") is None else f"{100 * summary['accuracy']:.1f}%"
            lines.append(
                f"| {name} | {summary['seconds'] / 60:.1f} min | {method} | {summary['steps']} | {fmt('final_loss')} "
                f"| {fmt('best_loss')} | {fmt('baseline_loss')} | {accuracy} | {fmt('max_unitarity_error', '.1e')} "
                f"| {paper if method == 't' and paper else ''} |"
            )
    return "\n".join(lines)


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
