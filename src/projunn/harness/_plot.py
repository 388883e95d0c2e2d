"""curves.png: a run's loss (beside its baseline), unitarity error and, where there is one, accuracy."""

from __future__ import annotations

import pathlib
from typing import Any

import torch

from ._folder import write_file
from .tasks import TASKS

__all__ = ["figure", "plot_curves", "step_axis"]

_MARKED_POINTS = 30
_UNITARITY_RANGE = (1e-8, 1e-2)  # the y range of the unitarity panel unless values fall outside it
_TICKS = 5  # at most this many labelled steps per axis: "100,000" six times fits a third of the figure


def plot_curves(path: pathlib.Path, history: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    """Write curves.png: loss (with the baseline), unitarity error and, where there is one, accuracy."""
    fig = figure(history, summary)
    write_file(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))


def step_axis(axis) -> None:
    """Few whole-number ticks with thousands separators (``20,000``), so labels never run together."""
    from matplotlib.ticker import MaxNLocator, StrMethodFormatter

    axis.set_major_locator(MaxNLocator(nbins=_TICKS, integer=True))  # steps, not 0.96 ... 1.04 around one point
    axis.set_major_formatter(StrMethodFormatter("{x:,.0f}"))


def figure(history: list[dict[str, Any]], summary: dict[str, Any]):
    """The figure of :func:`plot_curves`, drawn on its own Agg canvas.

    Built without pyplot, so training neither switches the caller's backend nor leaves a figure
    open in pyplot's registry.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    task = TASKS[summary["task"]]
    steps = [row["step"] for row in history]
    # Markers while there are few points: a one-point line is invisible without one.
    points = {"marker": "o", "markersize": 3} if len(history) <= _MARKED_POINTS else {}
    has_accuracy = any(row.get("eval_accuracy") is not None for row in history)
    fig = Figure(figsize=(13 if has_accuracy else 9, 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3 if has_accuracy else 2)
    ax = axes[0]
    ax.plot(steps, [row["train_loss"] for row in history], label="train (mean since the last point)", **points)
    ax.plot(steps, [row["eval_loss"] for row in history], label="held out", **points)
    # The constant / memoryless predictor on the held-out set these curves are measured on.
    measured = [row.get("eval_baseline") for row in history if row.get("eval_baseline") is not None]
    baseline = measured[-1] if measured else summary.get("baseline_loss")
    if baseline is not None:
        ax.axhline(baseline, color="k", linestyle="--", linewidth=1, label="baseline predictor (same set)")
    # The y label is what the run's loss was (older summaries: the task's).
    ax.set(yscale="log", ylabel=summary.get("loss") or task.loss_label, title="loss")
    ax = axes[1]
    errors = [max(row["max_unitarity_error"], 1e-16) for row in history]
    ax.plot(steps, errors, color="tab:red", **points)
    # A fixed decade range, so rounding-level noise (1e-7..1e-6) stays a flat line near the floor
    # instead of being stretched into spikes; it widens only for values outside it.
    dtype = torch.get_default_dtype()
    ax.axhline(
        torch.finfo(dtype).eps, color="gray", linestyle="--", linewidth=1, label=f"{dtype} eps".replace("torch.", "")
    )
    ax.set_yscale("log")
    ax.set_ylim(min(_UNITARITY_RANGE[0], min(errors) / 3), max(_UNITARITY_RANGE[1], max(errors) * 3))
    ax.set_title(r"largest unitarity error $\|U^H U - I\|_F$")
    if has_accuracy:
        ax = axes[2]
        ax.plot(steps, [row.get("eval_accuracy") for row in history], color="tab:green", **points)
        # A curve at 0 or 1 stays visible inside the frame.
        ax.set(ylim=(-0.02, 1.04), title=f"held-out {task.accuracy_label}")
    shown = [("T", "seq_len"), ("hidden", "hidden"), ("model", "model"), ("depth", "depth"), ("channels", "channels")]
    details = "".join(f", {label} {summary[key]}" for label, key in shown if summary.get(key) is not None)
    fig.suptitle(f"{summary['task']}{details}, method {summary['method']}", fontsize=10)
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        step_axis(ax.xaxis)
    # One legend row under the panels: inside a panel it would cover the curves or the baseline.
    handles = [line for ax in axes for line in ax.lines if not line.get_label().startswith("_")]
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=8, frameon=False)
    return fig
