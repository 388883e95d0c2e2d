"""Compare the CNN runs of docs/results.md: one plot of validation accuracy per experiment, and a table.

The runs themselves are ordinary ``projunn train`` runs (commands in
docs/results.md) written to ``benchmarks/results/cnn/<experiment>-<method>/``.

Usage:
    python benchmarks/plot_cnn.py fmnist-resnet9 mnist-d100
"""

from __future__ import annotations

import argparse
import pathlib

from projunn.harness.runs import METHOD_ORDER, RunRecord, plot_runs, read_runs

ROOT = pathlib.Path(__file__).resolve().parent / "results" / "cnn"


def _runs(experiment: str) -> list[RunRecord]:
    """The finished or stopped runs of ``experiment``, in the harness's method order."""
    return [run for run in read_runs(ROOT / f"{experiment}-{m}" for m in METHOD_ORDER) if run.summary]


def plot(experiment: str) -> pathlib.Path:
    return plot_runs(_runs(experiment), ROOT / f"{experiment}.png", panels=("accuracy",), title=experiment)


def table(experiment: str) -> str:
    lines = [
        "| method | steps | training s | test accuracy | accuracy on training images | max unitarity error |",
        "|---|---|---|---|---|---|",
    ]
    for run in _runs(experiment):
        method, s = run.method, run.summary
        train = f"{s['train_accuracy']:.1%}" if s.get("train_accuracy") is not None else "-"
        lines.append(
            f"| {method} | {s['steps']} | {s['seconds']:.0f} | {s['accuracy']:.1%} | {train} | "
            f"{s['max_unitarity_error']:.1e} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiments", nargs="+")
    args = parser.parse_args(argv)
    for experiment in args.experiments:
        print(f"{experiment}: {plot(experiment)}\n\n{table(experiment)}\n")


if __name__ == "__main__":
    main()
