"""Run folders read back, compared in one figure and tabulated: what docs/results.md's scripts share.

A run folder is what ``projunn train`` writes (config.json, metrics.csv, summary.json once it
stops, checkpoint.pt). paper_table.py, run_results.py and plot_cnn.py, beside this module, import
it: they read the folders with :func:`read_runs` or :func:`experiment_runs`, draw them with
:func:`plot_runs` and print them with :func:`markdown_table` and :func:`summary_cells`, so every
comparison lists the methods in one order (:data:`METHOD_ORDER`) and scales losses the same way:
by the constant or memoryless predictor's loss on the same held-out set. A run still in progress
(no summary.json yet) is read as far as it got.
"""

from __future__ import annotations

import csv
import json
import pathlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from projunn.harness._plot import step_axis
from projunn.harness.tasks import TASKS
from projunn.harness.train import METHODS

#: The order in which comparisons list methods: projUNN's two, torch's parametrisations, unconstrained.
METHOD_ORDER = METHODS
#: What :func:`plot_runs` can draw, one panel each.
PANELS = ("loss", "accuracy", "unitarity")
_X_LABELS = {"step": "step", "seconds": "wall-clock seconds"}
_MARKED_POINTS = 30  # markers while a curve has few points: a one-point line is invisible without one


@dataclass(frozen=True)
class RunRecord:
    """One run folder as written so far. ``rows`` are metrics.csv's rows (numbers, None where empty)."""

    folder: pathlib.Path
    config: dict[str, Any]
    rows: list[dict[str, float | None]]
    summary: dict[str, Any]

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def method(self) -> str:
        return self.config["method"]

    @property
    def finished(self) -> bool:
        """The run reached the end of its schedule (not interrupted, diverged or stopped by a time budget)."""
        summary = self.summary
        return bool(summary) and not (
            summary.get("interrupted") or summary.get("diverged") or summary.get("stopped_by_time_budget")
        )

    def baseline(self, row: dict[str, float | None]) -> float | None:
        """The baseline of ``row``: measured on its held-out set, else (older runs) the summary's."""
        return row.get("eval_baseline") or self.summary.get("baseline_loss")


def read_runs(folders: Iterable[str | pathlib.Path]) -> list[RunRecord]:
    """The runs among ``folders`` that have metrics, in :data:`METHOD_ORDER` (then by name)."""
    runs = []
    for folder in map(pathlib.Path, folders):
        if not (folder / "metrics.csv").is_file():
            continue
        rows = [
            {key: float(value) if value not in ("", None) else None for key, value in row.items()}
            for row in csv.DictReader((folder / "metrics.csv").read_text().splitlines())
        ]
        summary = json.loads((folder / "summary.json").read_text()) if (folder / "summary.json").is_file() else {}
        runs.append(RunRecord(folder, json.loads((folder / "config.json").read_text()), rows, summary))
    order = {method: i for i, method in enumerate(METHOD_ORDER)}
    return sorted(runs, key=lambda run: (order.get(run.method, len(order)), run.name))


def experiment_runs(root: pathlib.Path, experiment: str) -> list[RunRecord]:
    """The finished or stopped runs of ``experiment``: the folders ``root/<experiment>-<method>``."""
    return [run for run in read_runs(root / f"{experiment}-{method}" for method in METHOD_ORDER) if run.summary]


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A markdown table of ``rows`` (cells already formatted) under the column names ``header``."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def summary_cells(run: RunRecord, columns: dict[str, tuple[str, str]]) -> list[str]:
    """The figures of ``run``'s summary.json that ``columns`` name (column -> (key, format)); "-" where none."""
    return ["-" if (value := run.summary.get(key)) is None else format(value, spec) for key, spec in columns.values()]


def plot_runs(
    runs: Sequence[RunRecord],
    path: str | pathlib.Path,
    *,
    panels: Sequence[str] = ("loss", "accuracy"),
    x: str = "step",
    label: Callable[[RunRecord], str] = lambda run: run.method,
    title: str = "",
    target: float | None = None,
) -> pathlib.Path:
    """Draw ``runs`` side by side into ``path`` (PNG); return the path.

    Panels: ``loss`` is the held-out loss over the baseline measured on the same set (log scale,
    the baseline at 1 and ``target`` dashed where given), ``accuracy`` the held-out accuracy (recall
    for copy, the share within 0.04 for adding), ``unitarity`` the largest ``||U^H U - I||_F``.
    ``x`` is ``step`` or ``seconds``.
    """
    for panel in panels:
        if panel not in PANELS:
            raise ValueError(f"panel must be one of {', '.join(PANELS)}; got {panel!r}")
    if x not in _X_LABELS:
        raise ValueError(f"x must be one of {', '.join(_X_LABELS)}; got {x!r}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels) + 1, 4.4), layout="constrained", squeeze=False)
    legend: dict[str, Any] = {}  # label -> line, each label once
    # Losses over the baseline where every run recorded one; older runs without one are drawn as they are.
    scaled = all(run.baseline(row) for run in runs for row in run.rows if row.get("eval_loss") is not None)
    for ax, panel in zip(axes[0], panels, strict=True):
        for i, run in enumerate(runs):
            points = _points(run, panel, x, scaled)
            if points:
                style = {"marker": "o", "markersize": 3} if len(points) <= _MARKED_POINTS else {}
                # The colour of a run's place in ``runs``, the same in every panel even where it has no points.
                ax.plot(*zip(*points), label=label(run), color=f"C{i % 10}", **style)
        _decorate(ax, panel, target, runs, scaled)
        ax.set_xlabel(_X_LABELS[x])
        step_axis(ax.xaxis)
        legend |= {line.get_label(): line for line in ax.lines if not line.get_label().startswith("_")}
    # One legend under the panels: inside one it covers curves (many runs leave no empty corner).
    fig.legend(handles=list(legend.values()), loc="outside lower center", ncol=min(len(legend), 6), fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    path = pathlib.Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _points(run: RunRecord, panel: str, x: str, scaled: bool) -> list[tuple[float, float]]:
    points = []
    for row in run.rows:
        if panel == "loss":
            loss, baseline = row.get("eval_loss"), run.baseline(row) if scaled else 1.0
            value = loss / baseline if loss is not None and baseline else None
        elif panel == "accuracy":
            value = row.get("eval_accuracy")
        else:
            value = max(row["max_unitarity_error"], 1e-16) if row.get("max_unitarity_error") is not None else None
        if value is not None:
            points.append((row[x], value))
    return points


def _decorate(ax, panel: str, target: float | None, runs: Sequence[RunRecord], scaled: bool) -> None:
    tasks = [TASKS[name] for name in dict.fromkeys(run.config["task"] for run in runs)]
    if panel == "loss" and not scaled:
        ax.set_yscale("log")
        ax.set_title("held-out loss (a run recorded no baseline)")
        if len(tasks) == 1:
            ax.set_ylabel(tasks[0].loss_label)
    elif panel == "loss":
        ax.axhline(1.0, color="k", linestyle="--", linewidth=1, label="constant / memoryless predictor")
        if target is not None:
            ax.axhline(target, color="grey", linestyle=":", linewidth=1, label=f"target: {target:g}x")
        ax.set_yscale("log")
        ax.set_title("held-out loss / baseline on the same set")
    elif panel == "accuracy":
        ax.set_ylim(-0.02, 1.04)
        # What accuracy means differs by task: recall of the copied symbols, a share within 0.04, ...
        if len(tasks) == 1:
            ax.set_title(f"held-out {tasks[0].accuracy_label}")
        else:
            ax.set_title("held-out accuracy")
            ax.set_ylabel("\n".join(f"{task.name}: {task.accuracy_label}" for task in tasks), fontsize=8)
    else:
        ax.set_yscale("log")
        ax.set_title(r"largest unitarity error $\|U^H U - I\|_F$")
    ax.grid(True, alpha=0.3)
