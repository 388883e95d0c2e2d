"""Compare the CNN runs of docs/results.md: one plot of validation accuracy per experiment, and a table.

The runs themselves are ordinary ``projunn train`` runs (commands in
docs/results.md) written to ``benchmarks/results/cnn/<experiment>-<method>/``.

Usage:
    python benchmarks/plot_cnn.py fmnist-resnet9 mnist-d100
"""

from __future__ import annotations

import argparse
import pathlib

from runs import experiment_runs, markdown_table, plot_runs, summary_cells

ROOT = pathlib.Path(__file__).resolve().parent / "results" / "cnn"


#: The table's columns after the method: name -> (summary.json's key, format).
COLUMNS = {
    "steps": ("steps", "d"),
    "training s": ("seconds", ".0f"),
    "test accuracy": ("accuracy", ".1%"),
    "accuracy on training images": ("train_accuracy", ".1%"),
    "max unitarity error": ("max_unitarity_error", ".1e"),
}


def plot(experiment: str) -> pathlib.Path:
    runs = experiment_runs(ROOT, experiment)
    return plot_runs(runs, ROOT / f"{experiment}.png", panels=("accuracy",), title=experiment)


def table(experiment: str) -> str:
    rows = [[run.method, *summary_cells(run, COLUMNS)] for run in experiment_runs(ROOT, experiment)]
    return markdown_table(["method", *COLUMNS], rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiments", nargs="+")
    args = parser.parse_args(argv)
    for experiment in args.experiments:
        print(f"{experiment}: {plot(experiment)}\n\n{table(experiment)}\n")


if __name__ == "__main__":
    main()
