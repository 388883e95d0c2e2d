"""The "paper vs projunn" table and curves of the runs in benchmarks/results/paper/.

Every figure chosen by looking at held-out data (a best step) is chosen on the validation set
(the rows of metrics.csv); the test set's figures are those of the weights a run stopped with,
measured once (summary.json), never used to choose anything.

Each folder there is an ordinary ``projunn train ... --preset paper`` run
(see docs/results.md for the commands); a run longer than one sitting is
continued with ``--resume``. This script reads the folders as they are,
finished or not, prints the markdown table of docs/results.md (and, where
several methods ran one experiment, a table of them at the same steps) and draws
``benchmarks/results/paper/curves.png``: held-out loss over the baseline
measured on the same set, and the held-out accuracy, against the step.

Usage:
    python benchmarks/paper_table.py
    python benchmarks/paper_table.py --root benchmarks/results/paper-variants benchmarks/results/paper/pmnist-h170-t

``--root`` takes folders of run folders or run folders themselves; the curves go into the first.
benchmarks/results/paper-variants/ holds runs that change a preset's settings on purpose (each
folder's config.json says how), to test what would close a gap to the paper.
"""

from __future__ import annotations

import math
import pathlib

from runs import METHOD_ORDER, RunRecord, markdown_table, plot_runs, read_runs

ROOT = pathlib.Path(__file__).resolve().parent / "results" / "paper"

#: What the paper reports for projUNN-T, per task (Kiani et al., NeurIPS 2022).
PAPER = {
    "copy": "learned at T = 1000 and 2000: loss far below the memoryless baseline (figure)",
    "adding": "learned at T = 200 and 750 with k = 1 (figure)",
    "pmnist": "test accuracy 94.1-94.7% at hidden 170 after 200 epochs",
}
_ACCURACY_NAMES = {"copy": "recall", "adding": "within 0.04"}


def _schedule(config: dict) -> str:
    if config.get("epochs"):
        return f"{config['epochs']} epochs"
    return f"{config['steps']:,} steps"


def _percent(share: float) -> str:
    """A share as a percentage, with a second decimal above 99.9% (so that 99.96% is not "100.0%")."""
    return f"{100 * share:.1f}%" if share < 0.999 else f"{100 * share:.2f}%"


def _paper_column(run: RunRecord) -> str:
    """The paper's figure for a preset projUNN run; what the run is otherwise."""
    if run.config.get("preset") != "paper":
        if run.method not in ("t", "d"):
            return "(baseline, with the variant's settings)"
        return "(variant: settings changed from the preset, see its config.json)"
    return PAPER.get(run.config["task"], "") if run.method in ("t", "d") else "(baseline, same preset)"


def _score(run: RunRecord, loss: float, baseline: float | None, accuracy: float | None) -> str:
    """A loss (and its ratio to the baseline where there is one), then the accuracy under the task's name for it."""
    text = f"{loss:.4g}" + (f" ({loss / baseline:.3g}x)" if baseline else "")
    if accuracy is not None:
        text += f", {_ACCURACY_NAMES.get(run.config['task'], 'accuracy')} {_percent(accuracy)}"
    return text


def _validation(run: RunRecord) -> str:
    """The last validation row, and the best step chosen on the validation set (never on the test set)."""
    last = run.rows[-1]
    best = min((r for r in run.rows if r["eval_loss"] is not None), key=lambda r: r["eval_loss"])
    score = _score(run, last["eval_loss"], run.baseline(last), last["eval_accuracy"])
    return score + f"; best {best['eval_loss']:.4g} at {int(best['step']):,}"


def _test(run: RunRecord) -> str:
    """The test set's figures of the weights the run stopped with, once; or why there are none."""
    summary = run.summary
    if "test_loss" not in summary:  # stopped by a signal, the way a sitting of a long run ends
        return "- (in progress: scored once, at the end)" if not run.finished else "-"
    return _score(run, summary["test_loss"], summary.get("test_baseline"), summary.get("test_accuracy"))


def _steps(run: RunRecord) -> str:
    """Steps trained (schedule), and the step of the last evaluation where the checkpoint is later."""
    last_row = int(run.rows[-1]["step"])
    steps = max(last_row, int(run.summary.get("steps", 0)))  # a running run's summary is its last stop's
    text = f"{steps:,} ({_schedule(run.config)}{'' if run.finished else ', in progress'})"
    return text if steps == last_row else text + f"; last evaluation at {last_row:,}"


def _describe(run: RunRecord) -> dict[str, str]:
    rows = run.rows
    baseline = run.baseline(rows[-1])
    return {
        "experiment": run.name,
        "paper (projUNN)": _paper_column(run),
        "steps (schedule)": _steps(run),
        "validation: last (/ baseline), best step": _validation(run),
        "test, final weights (/ baseline)": _test(run),
        "baseline on validation": f"{baseline:.4g}" if baseline else "-",
        "hours": f"{rows[-1]['seconds'] / 3600:.2f}",
        "max unitarity error": f"{max(r['max_unitarity_error'] for r in rows):.1e}",
    }


def table(runs: list[RunRecord]) -> str:
    described = [_describe(run) for run in runs]
    return markdown_table(list(described[0]), [list(row.values()) for row in described])


def _experiment(run: RunRecord) -> str:
    """The experiment a run belongs to: its folder name without the method's part
    (copy-T1000-t -> copy-T1000, pmnist-h170-expm-cayley -> pmnist-h170-cayley)."""
    return "-".join(part for part in run.name.split("-") if part != run.method)


def equal_steps(runs: list[RunRecord], checkpoints: int = 4) -> str:
    """Methods of one experiment side by side at the steps every one of them reached.

    Up to ``checkpoints`` evaluation steps, evenly spread up to the last step they share: held-out
    loss over the baseline, and accuracy (recall for copy), per method.
    """
    groups: dict[str, list[RunRecord]] = {}
    for run in runs:
        groups.setdefault(_experiment(run), []).append(run)
    lines = []
    for experiment, members in groups.items():
        if len(members) < 2:
            continue
        members = [run for method in METHOD_ORDER for run in members if run.method == method]
        shared = sorted(set.intersection(*({row["step"] for row in run.rows} for run in members)))
        if not shared:
            continue
        chosen = sorted({shared[round(i * (len(shared) - 1) / max(checkpoints - 1, 1))] for i in range(checkpoints)})
        cells = [[f"{int(step):,}", *(_at(run, step) for run in members)] for step in chosen]
        lines += [f"\n{experiment}, every method at the same steps (loss / baseline, accuracy):\n"]
        lines.append(markdown_table(["step", *(run.method for run in members)], cells))
    return "\n".join(lines)


def _at(run: RunRecord, step: float) -> str:
    """Held-out loss over the baseline, and accuracy, at ``step``."""
    row = next(row for row in run.rows if row["step"] == step)
    ratio = row["eval_loss"] / run.baseline(row) if row["eval_loss"] is not None else math.nan
    return f"{ratio:.3g}x" + (f", {100 * row['eval_accuracy']:.1f}%" if row["eval_accuracy"] is not None else "")


def _run_folders(roots: list[pathlib.Path]) -> list[pathlib.Path]:
    """Each root that is a run folder (it has metrics.csv) itself, otherwise the folders in it; each once."""
    folders: dict[pathlib.Path, None] = {}
    for root in roots:
        if not root.is_dir():
            raise SystemExit(f"paper_table.py: error: no folder {root}")
        inside = [root] if (root / "metrics.csv").exists() else sorted(f for f in root.iterdir() if f.is_dir())
        folders.update((folder.resolve(), None) for folder in inside)
    return list(folders)


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--root",
        type=pathlib.Path,
        nargs="+",
        default=[ROOT],
        help="folders of run folders, or run folders (default: %(default)s); the curves go into the first",
    )
    roots = parser.parse_args(argv).root
    runs = sorted(read_runs(_run_folders(roots)), key=lambda run: run.name)
    root = roots[0].parent if (roots[0] / "metrics.csv").exists() else roots[0]
    if not runs:
        print(f"no runs with metrics in {', '.join(map(str, roots))}")
        return 1
    print(table(runs))
    print(equal_steps(runs))
    plot_runs(runs, root / "curves.png", label=lambda run: run.name, target=0.1)
    # The same against training time: the runs of one experiment ran side by side, one thread each.
    plot_runs(runs, root / "curves-time.png", label=lambda run: run.name, target=0.1, x="seconds")
    print(f"\nwrote {root / 'curves.png'} and {root / 'curves-time.png'}")
    return 0 if all(math.isfinite(run.rows[-1]["eval_loss"] or math.nan) for run in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
