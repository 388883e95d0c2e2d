"""What a user sees: progress of the passes over held-out data, messages clear of the bars, and plots
that read without guessing (ticks, axis labels, legends, what accuracy means)."""

from __future__ import annotations

import itertools
import os
import re
import signal

import matplotlib
import matplotlib.pyplot
import pytest
import tqdm.auto
from tqdm.std import tqdm as std_tqdm

from projunn.harness import _plot
from projunn.harness import train as train_module
from projunn.harness.tasks import TASKS
from projunn.harness.tasks._sequence import EVAL_SIZE, CopyTask
from projunn.harness.train import TrainConfig, train
from test_reproduction import _benchmark_script

_runs = _benchmark_script("runs")  # benchmarks/runs.py, shared by the scripts that compare run folders
RunRecord, plot_runs = _runs.RunRecord, _runs.plot_runs

TINY_COPY = dict(task="copy", hidden=8, seq_len=5, batch_size=4)


@pytest.fixture
def bars(monkeypatch):
    """stderr taken for a terminal (so runs show bars, not lines), and every tqdm bar made, kept."""
    made = []

    class Kept(tqdm.auto.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.shown = not self.disable  # closing a bar disables it
            made.append(self)

    monkeypatch.setattr(train_module, "_is_terminal", lambda stream: True)
    monkeypatch.setattr(train_module, "tqdm", Kept)  # the training loop's bars and its scoring bars
    return made


def _open_bars() -> list:
    return [bar for bar in list(std_tqdm._instances) if not bar.disable]


def test_passes_over_held_out_data_show_progress_on_a_terminal(tmp_path, bars):
    train(TrainConfig(**TINY_COPY, steps=2, eval_every=1, out=str(tmp_path / "r")), log=lambda _: None)
    scoring = [bar for bar in bars if bar.desc.startswith(("validation set", "test set"))]
    # Two evaluations and the final test pass, each over a whole set, each bar removed when done.
    assert [bar.desc.split(":")[0] for bar in scoring] == ["validation set", "validation set", "test set"]
    assert all(bar.shown for bar in bars)
    assert [(bar.n, bar.total, bar.leave) for bar in scoring] == [(EVAL_SIZE, EVAL_SIZE, False)] * 3
    assert not _open_bars()


def test_without_a_terminal_no_bar_is_shown_for_scoring_either(tmp_path, bars, monkeypatch):
    monkeypatch.setattr(train_module, "_is_terminal", lambda stream: False)
    train(TrainConfig(**TINY_COPY, steps=2, eval_every=1, out=str(tmp_path / "r")), log=lambda _: None)
    assert bars and not any(bar.shown for bar in bars)


class _SignalledCopy(CopyTask):
    """Copy whose second training step receives Ctrl-C."""

    calls = 0

    def loss(self, model, x, y):
        self.calls += 1
        if self.calls == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return super().loss(model, x, y)


def test_the_last_message_of_an_interrupted_run_comes_after_its_bar(tmp_path, bars, monkeypatch):
    monkeypatch.setitem(TASKS, "copy", _SignalledCopy())
    said = []
    summary = train(
        TrainConfig(**TINY_COPY, steps=6, eval_every=3, out=str(tmp_path / "r")),
        log=lambda message: said.append((message, _open_bars())),
    )
    assert summary["interrupted"]
    message, open_then = said[-1]
    assert message.startswith("interrupted at step 2") and open_then == []  # no bar redrawn below it


def _history(last_step: int, points: int = 40) -> list[dict]:
    return [
        {
            "step": last_step * (i + 1) // points,
            "seconds": float(i),
            "train_loss": 1.0 / (i + 1),
            "eval_loss": 1.0 / (i + 1),
            "eval_accuracy": i / points,
            "eval_baseline": 0.5,
            "max_unitarity_error": 1e-6,
        }
        for i in range(points)
    ]


def _tick_labels_read_apart(ax, renderer) -> list[str]:
    """The x tick labels shown, after checking that none touches the next one."""
    low, high = ax.get_xlim()
    labels = [label for tick, label in zip(ax.get_xticks(), ax.get_xticklabels()) if low <= tick <= high]
    boxes = [label.get_window_extent(renderer) for label in labels]
    assert all(left.x1 < right.x0 for left, right in itertools.pairwise(boxes)), [t.get_text() for t in labels]
    return [label.get_text() for label in labels]


@pytest.mark.parametrize(
    "task, last_step, meaning",
    [
        ("copy", 2_000, "held-out recall of the copied symbols"),
        ("copy", 20_000, "held-out recall of the copied symbols"),
        ("adding", 100_000, "held-out share within 0.04 of the sum"),
        ("mnist", 15_000, "held-out accuracy"),
    ],
)
def test_curves_have_readable_steps_labelled_axes_and_a_legend_off_the_data(task, last_step, meaning):
    fig = _plot.figure(_history(last_step), {"task": task, "method": "t"})
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        loss, _, accuracy = fig.axes
        for ax in fig.axes:
            labels = _tick_labels_read_apart(ax, renderer)
            assert 3 <= len(labels) <= 6 and all(re.fullmatch(r"\d{1,3}(,\d{3})*", text) for text in labels)
        assert any("," in text for text in labels)  # 10,000 rather than 10000
        assert loss.get_ylabel() == TASKS[task].loss_label and loss.get_ylabel() != "loss"
        assert accuracy.get_title() == meaning
        # One legend, under every panel: it cannot cover a curve or the baseline.
        (legend,) = fig.legends
        texts = [text.get_text() for text in legend.get_texts()]
        assert "held out" in texts and any(text.startswith("baseline") for text in texts)
        below = legend.get_window_extent(renderer).y1
        assert all(below <= ax.get_tightbbox(renderer).y0 for ax in fig.axes)
    finally:
        matplotlib.pyplot.close(fig)


def test_compared_runs_say_what_accuracy_means_and_keep_the_legend_off_the_data(tmp_path, monkeypatch):
    figures, close = [], matplotlib.pyplot.close
    monkeypatch.setattr(matplotlib.pyplot, "close", figures.append)  # keep the figure to look at

    def record(task: str, name: str) -> RunRecord:
        return RunRecord(tmp_path / name, {"task": task, "method": "t"}, _history(100_000), {"baseline_loss": 0.5})

    plot_runs([record("copy", "a"), record("copy", "b")], tmp_path / "one.png", target=0.1)
    plot_runs([record("copy", "a"), record("adding", "b")], tmp_path / "two.png")
    try:
        for fig in figures:
            fig.canvas.draw()
            renderer = fig.canvas.get_renderer()
            for ax in fig.axes:
                assert ax.get_legend() is None
                assert any("," in text for text in _tick_labels_read_apart(ax, renderer))
            (legend,) = fig.legends
            assert all(legend.get_window_extent(renderer).y1 <= ax.get_tightbbox(renderer).y0 for ax in fig.axes)
        assert figures[0].axes[1].get_title() == "held-out recall of the copied symbols"
        assert "adding: share within 0.04 of the sum" in figures[1].axes[1].get_ylabel()
    finally:
        for fig in figures:
            close(fig)


def test_compared_runs_without_a_baseline_still_show_their_loss(tmp_path, monkeypatch):
    """Runs written before baselines were recorded: their losses as they are, not an empty panel."""
    figures, close = [], matplotlib.pyplot.close
    monkeypatch.setattr(matplotlib.pyplot, "close", figures.append)
    rows = [{key: value for key, value in row.items() if key != "eval_baseline"} for row in _history(400)]
    runs = [RunRecord(tmp_path / name, {"task": "pmnist", "method": name}, rows, {}) for name in ("t", "none")]
    plot_runs(runs, tmp_path / "old.png", panels=("loss", "unitarity"), x="seconds")
    try:
        loss = figures[0].axes[0]
        assert len(loss.lines) == 2 and "no baseline" in loss.get_title() and loss.get_ylabel() == "cross-entropy"
    finally:
        close(figures[0])
