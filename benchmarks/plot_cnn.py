"""Compare the CNN runs of docs/results.md: one plot of validation accuracy per experiment, and a table.

The runs themselves are ordinary ``projunn train`` runs (commands in
docs/results.md) written to ``benchmarks/results/cnn/<experiment>-<method>/``.

Usage:
    python benchmarks/plot_cnn.py fmnist-resnet9 mnist-d100
"""

from __future__ import annotations

import argparse
import csv
import json
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent / "results" / "cnn"
METHODS = ("t", "d", "cayley", "expm", "none")


def _runs(experiment: str) -> dict[str, pathlib.Path]:
    return {m: ROOT / f"{experiment}-{m}" for m in METHODS if (ROOT / f"{experiment}-{m}" / "summary.json").exists()}


def plot(experiment: str) -> pathlib.Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for method, folder in _runs(experiment).items():
        with open(folder / "metrics.csv") as f:
            rows = list(csv.DictReader(f))
        ax.plot([int(r["step"]) for r in rows], [float(r["eval_accuracy"]) for r in rows], "o-", label=method)
    ax.set_xlabel("step")
    ax.set_ylabel("validation accuracy")
    ax.set_title(experiment, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = ROOT / f"{experiment}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def table(experiment: str) -> str:
    lines = [
        "| method | steps | training s | test accuracy | accuracy on training images | max unitarity error |",
        "|---|---|---|---|---|---|",
    ]
    for method, folder in _runs(experiment).items():
        s = json.loads((folder / "summary.json").read_text())
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
