"""Train every task x method of docs/results.md under a fixed wall-clock budget, one run at a time.

Each run is an ordinary ``projunn train`` run (same code path as the CLI)
written to ``benchmarks/results/rnn/<experiment>-<method>/``; afterwards this
script draws one comparison plot per experiment (held-out loss against
wall-clock seconds, all methods, baseline dashed) and prints the markdown
table used in docs/results.md.

Usage:
    python benchmarks/run_results.py                 # the whole grid (about an hour on 2 cores)
    python benchmarks/run_results.py --only copy-T200 --minutes-scale 0.5
    python benchmarks/run_results.py --table-only    # redraw plots and table from saved runs
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import traceback

import torch

from projunn.harness.train import TrainConfig, train

ROOT = pathlib.Path(__file__).resolve().parent / "results" / "rnn"
METHODS = ("t", "d", "expm", "cayley", "none")

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
        for method in METHODS:
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


def _load(name: str, method: str):
    folder = ROOT / f"{name}-{method}"
    if not (folder / "summary.json").is_file():
        return None, None
    summary = json.loads((folder / "summary.json").read_text())
    rows = (folder / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    history = [dict(zip(header, line.split(","))) for line in rows[1:]]
    return summary, history


def plot(name: str) -> pathlib.Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    baseline = None
    for method in METHODS:
        summary, history = _load(name, method)
        if summary is None:
            continue
        baseline = summary.get("baseline_loss")
        seconds = [float(r["seconds"]) for r in history]
        left.plot(seconds, [float(r["eval_loss"]) for r in history], label=method)
        right.plot(seconds, [max(float(r["max_unitarity_error"]), 1e-16) for r in history], label=method)
    if baseline is not None:
        left.axhline(baseline, color="k", linestyle="--", linewidth=1, label="baseline")
    left.set(yscale="log", xlabel="wall-clock seconds (2-core CPU)", title=f"{name}: held-out loss")
    right.set(yscale="log", xlabel="wall-clock seconds", title=r"max $\|U^H U - I\|_F$")
    left.legend(fontsize=8)
    right.legend(fontsize=8)
    fig.tight_layout()
    path = ROOT / f"{name}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def table() -> str:
    lines = [
        "| experiment | budget / method | method | steps | held-out loss (final) | best | baseline | accuracy "
        "| max unitarity error | paper (projUNN) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, (_, _minutes, paper) in EXPERIMENTS.items():
        for method in METHODS:
            summary, _ = _load(name, method)
            if summary is None:
                continue

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
