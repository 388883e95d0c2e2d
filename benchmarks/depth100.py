"""The paper's depth-100 finding at a width a CPU affords, epoch by epoch.

The paper trains a plain CNN of 100 convolutions (32 channels) on MNIST: unconstrained it reaches
92.7% training but 23.5% test accuracy, with orthogonal convolutions 95.7% and 94.6%. Here the same
network at ``--channels`` C (a width-reduced replication; default 8), projUNN-T beside the same
network trained unconstrained (``--method none``: the same full-width circular convolutions from the
same orthogonal initialisation, on the same batches).

Each method's run is an ordinary ``projunn train mnist --depth 100 --channels C`` run, continued one
epoch at a time (``--epochs E --resume``). Every continuation ends with the run's test pass, which
scores the 10,000 test images and 10,000 training images in evaluation mode (BatchNorm's running
statistics); those two figures are read from summary.json after every epoch into the run folder's
``epochs.csv``. Nothing is chosen on them. Ctrl-C (or SIGTERM) ends a sitting at a step boundary
with a checkpoint; the same command continues it. ``epochs.png`` in --out-root shows both methods.

Usage:
    OMP_NUM_THREADS=1 python benchmarks/depth100.py --methods t      # one thread per method,
    OMP_NUM_THREADS=1 python benchmarks/depth100.py --methods none   # the two side by side
    python benchmarks/depth100.py --plot-only
"""

from __future__ import annotations

import argparse
import csv
import pathlib

import torch

from projunn.harness.train import RunError, TrainConfig, train

ROOT = pathlib.Path(__file__).resolve().parent / "results" / "cnn"
#: epochs.csv's columns: the epoch, the run's steps and training seconds so far, the figures of the test pass
#: that ended the epoch and of its last validation row, and the largest unitarity error of the run so far.
COLUMNS = ("epoch", "steps", "seconds", "test_accuracy", "train_accuracy", "validation_accuracy", "max_unitarity_error")
#: Steps per epoch: the 54,000 training images (the last tenth held out) at the task's batch of 64.
STEPS_PER_EPOCH = 54_000 // 64


def run_folder(root: pathlib.Path, depth: int, channels: int, method: str) -> pathlib.Path:
    return root / f"mnist-d{depth}-c{channels}-{method}"


def read_epochs(folder: pathlib.Path) -> list[dict[str, str]]:
    path = folder / "epochs.csv"
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_epochs(folder: pathlib.Path, rows: list[dict]) -> None:
    tmp = folder / ".epochs.csv.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(folder / "epochs.csv")


def epoch_row(epoch: int, summary: dict, folder: pathlib.Path) -> dict:
    """The figures of the test pass that ended ``epoch``, and the last validation row's accuracy."""
    with open(folder / "metrics.csv", newline="") as f:
        validation = list(csv.DictReader(f))[-1]["eval_accuracy"]
    return {
        "epoch": epoch,
        "steps": summary["steps"],
        "seconds": summary["seconds"],
        "test_accuracy": summary["test_accuracy"],
        "train_accuracy": summary["train_accuracy"],
        "validation_accuracy": validation,
        "max_unitarity_error": summary["max_unitarity_error"],
    }


def train_epochs(method: str, args: argparse.Namespace) -> bool:
    """Continue ``method``'s run to ``args.epochs`` epochs; False if a stop signal ended the sitting."""
    folder = run_folder(args.out_root, args.depth, args.channels, method)
    rows = read_epochs(folder)
    checkpoint = folder / "checkpoint.pt"
    if checkpoint.exists() and torch.load(checkpoint, weights_only=True)["step"] > (len(rows) + 1) * STEPS_PER_EPOCH:
        raise SystemExit(
            f"{folder}: the checkpoint is past the epochs epochs.csv records; remove the folder to start over"
        )
    for epoch in range(len(rows) + 1, args.epochs + 1):
        config = TrainConfig(
            task="mnist",
            method=method,
            depth=args.depth,
            channels=args.channels,
            epochs=epoch,
            eval_every=args.eval_every,
            seed=args.seed,
            out=str(folder),
            resume=(folder / "checkpoint.pt").exists(),
            quiet=True,
        )
        try:
            summary = train(config)
        except RunError as error:  # a diverged run too: its last finite checkpoint is kept
            raise SystemExit(f"{method}: {error}") from None
        if summary["interrupted"]:
            return False
        rows.append(epoch_row(epoch, summary, folder))
        write_epochs(folder, rows)
        print(f"{method} epoch {epoch}: test {summary['test_accuracy']:.4f}, train {summary['train_accuracy']:.4f}")
    return True


def plot(root: pathlib.Path, depth: int, channels: int, methods: tuple[str, ...]) -> pathlib.Path:
    """Training and test accuracy (evaluation mode) against the epoch, one colour per method."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(7, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for colour, method in zip(("tab:blue", "tab:red"), methods):
        rows = read_epochs(run_folder(root, depth, channels, method))
        epochs = [int(row["epoch"]) for row in rows]
        for key, style in (("train_accuracy", "--"), ("test_accuracy", "-")):
            label = f"{method}: {key.split('_')[0]}"
            ax.plot(epochs, [float(row[key]) for row in rows], style, color=colour, marker="o", label=label)
    ax.set(xlabel="epoch", ylabel="accuracy (evaluation mode)", ylim=(0, 1.02))
    ax.set_title(f"MNIST, plain CNN of {depth} orthogonal convolutions, {channels} channels", fontsize=10)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    path = root / f"mnist-d{depth}-c{channels}-epochs.png"
    fig.savefig(path, dpi=110)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", choices=("t", "none"), default=["t", "none"])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--depth", type=int, default=100)
    parser.add_argument("--channels", type=int, default=8)
    parser.add_argument("--eval-every", type=int, default=843, help="steps between validation rows (an epoch)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-root", type=pathlib.Path, default=ROOT)
    parser.add_argument("--plot-only", action="store_true")
    args = parser.parse_args(argv)
    if not args.plot_only:
        for method in args.methods:
            if not train_epochs(method, args):
                return 130
    print(f"wrote {plot(args.out_root, args.depth, args.channels, ('t', 'none'))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
