"""What the reproduction of the paper's sequence experiments rests on: held-out sets, baselines
measured on them, the authors' settings as presets, and the learning-rate schedule."""

from __future__ import annotations

import importlib
import json
import pathlib
import sys

import pytest
import torch

from harness_runs import small_held_out_sets  # noqa: F401  (fixture)
from projunn.harness._config import learning_rate_factor, resumed_config, stored_settings
from projunn.harness.cli import main
from projunn.harness.tasks import get_task
from projunn.harness.tasks._sequence import ADDING_TOLERANCE, EVAL_SIZE
from projunn.harness.train import TrainConfig, resolve
from test_tasks import memoryless_cross_entropy

CPU = torch.device("cpu")


QUICK = ["--hidden", "8", "--batch-size", "4", "--quiet"]


def test_held_out_sets_depend_on_the_task_and_length_only():
    copy = get_task("copy")
    x, y = copy.held_out(30)
    assert x.shape == (EVAL_SIZE, 50) and y.shape == (EVAL_SIZE, 50)
    again = copy.held_out(30)
    assert torch.equal(x, again[0]) and torch.equal(y, again[1])
    other = copy.held_out(31)[0]
    assert other.shape == (EVAL_SIZE, 51)
    # Not the training stream of any seed: the first training batch differs from the set's start.
    train_x, _ = copy.prepare(resolve(TrainConfig(task="copy", seq_len=30, batch_size=8)), CPU).batch(0)
    assert not torch.equal(train_x, x[:8])


def test_training_streams_of_different_seeds_and_steps_do_not_collide():
    adding = get_task("adding")
    seen = set()
    for seed in range(3):
        data = adding.prepare(resolve(TrainConfig(task="adding", seq_len=10, batch_size=2, seed=seed)), CPU)
        for step in (0, 1, 1_000_003):
            seen.add(repr(data.batch(step)[1].tolist()))
    assert len(seen) == 9


def test_adding_evaluation_scores_the_whole_set_with_the_best_constant_beside_it():
    adding = get_task("adding")
    config = resolve(TrainConfig(task="adding", seq_len=12, hidden=4))

    class Constant(torch.nn.Module):  # always predicts c: its MSE and hit rate are known exactly
        def __init__(self, c):
            super().__init__()
            self.c = c

        def forward(self, x):
            return torch.full((x.shape[0], 1), self.c)

    data = adding.prepare(config, CPU)
    _, y = adding.held_out(12)
    assert torch.equal(data.validation[1], y)  # a run holds the task's set
    mean = y.mean().item()
    scores = data.evaluate(Constant(mean))
    assert scores["eval_loss"] == pytest.approx(scores["eval_baseline"], rel=1e-6)
    assert scores["eval_baseline"] == pytest.approx((y - mean).square().mean().item(), rel=1e-6)
    assert scores["eval_baseline"] == pytest.approx(1 / 6, abs=0.01)  # the population value
    assert scores["eval_accuracy"] == pytest.approx(((y - mean).abs() < ADDING_TOLERANCE).float().mean().item())
    perfect = data.evaluate(Constant(1.0))["eval_loss"]
    assert perfect == pytest.approx((y - 1).square().mean().item(), rel=1e-6)


def test_copy_evaluation_in_chunks_equals_one_pass():
    copy = get_task("copy")
    config = resolve(TrainConfig(task="copy", seq_len=5, hidden=6))
    torch.manual_seed(0)
    data = copy.prepare(config, CPU)
    model = data.build_model().double()
    x, y = copy.held_out(5)
    scores = data.evaluate(model)
    with torch.no_grad():
        logits = model(x)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 9), y.reshape(-1)).item()
    recall = (logits[:, -10:].argmax(-1) == y[:, -10:]).double().mean().item()
    assert scores["eval_loss"] == pytest.approx(loss, rel=1e-9)
    assert scores["eval_accuracy"] == pytest.approx(recall, rel=1e-12)
    # The best input-free predictor fitted on the held-out set itself, scored on it: the baseline to sampling error.
    assert scores["eval_baseline"] == pytest.approx(memoryless_cross_entropy(y, 9), rel=1e-3)


@pytest.mark.parametrize(
    "task, expected",
    [
        ("copy", dict(hidden=190, seq_len=1000, steps=20_000, lr=7e-4, nonlinearity="relu", sketch="column")),
        ("adding", dict(hidden=170, seq_len=750, steps=100_000, batch_size=50, init="identity", lr_decay=0.94)),
        ("pmnist", dict(hidden=170, epochs=200, nonlinearity="modrelu", init="identity", lr_decay=0.2)),
    ],
)
def test_paper_presets_hold_the_authors_settings(task, expected):
    config = resolve(TrainConfig(task=task, preset="paper"))
    for key, value in expected.items():
        assert getattr(config, key) == value, key
    divider = {"copy": 32, "adding": 32, "pmnist": 1}[task]
    assert config.unitary_lr == pytest.approx(config.lr / divider)
    default = resolve(TrainConfig(task=task))
    assert default.hidden != config.hidden or default.lr_decay != config.lr_decay  # quick defaults stay quick


def test_a_preset_may_vary_what_the_paper_varies():
    assert resolve(TrainConfig(task="copy", preset="paper", seq_len=2000)).seq_len == 2000
    assert resolve(TrainConfig(task="pmnist", preset="paper", hidden=116)).hidden == 116
    assert resolve(TrainConfig(task="copy", preset="paper", lr=7e-4)).lr == 7e-4  # repeating a value is fine


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["copy", "--preset", "paper", "--lr", "0.001"],
            "--preset paper sets --lr 0.0007 for the copy task; --lr 0.001",
        ),
        (["copy", "--preset", "paper", "--hidden", "64"], "--hidden 64 contradicts it"),
        (["adding", "--preset", "paper", "--sketch", "column"], "--sketch column contradicts it"),
        (["copy", "--preset", "paper", "--unitary-lr", "1e-4"], "--unitary-lr 0.0001 contradicts it"),
    ],
)
def test_a_preset_with_contradicting_options_is_a_one_line_error(tmp_path, capsys, argv, message):
    assert main(["train", *argv, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.usefixtures("small_held_out_sets")
def test_resuming_under_a_different_preset_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "copy", "--seq-len", "5", "--steps", "2", *QUICK, "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["train", "copy", "--preset", "paper", "--seq-len", "5", "--resume", "--out", str(out)]) == 2
    assert "preset" in capsys.readouterr().err


@pytest.mark.usefixtures("small_held_out_sets")
def test_learning_rate_decays_in_steps_and_the_run_records_it(tmp_path):
    config = TrainConfig(task="copy", lr_decay=0.5, lr_decay_every=3)
    assert [learning_rate_factor(config, step) for step in range(7)] == [1, 1, 1, 0.5, 0.5, 0.5, 0.25]
    assert learning_rate_factor(TrainConfig(task="copy"), 10**6) == 1.0
    out = tmp_path / "run"
    argv = ["train", "copy", "--preset", "paper", "--seq-len", "3", "--out", str(out), "--max-minutes", "0.02"]
    assert main([*argv, "--quiet"]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["lr_decay"] == 0.9 and saved["lr_decay_every"] == 4000 and saved["input_init"] == "xavier"
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    groups = checkpoint["optimizer"]["param_groups"]
    assert {g["initial_lr"] for g in groups} == {7e-4, 7e-4 / 32}


def _benchmark_script(name: str):
    """benchmarks/NAME.py imported as a module (the scripts are not a package: they import the
    runs.py beside them by name, as running one from its folder lets them)."""
    folder = str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks")
    if folder not in sys.path:
        sys.path.append(folder)
    return importlib.import_module(name)


def test_a_paper_variant_resumes_from_its_folder_with_its_settings(tmp_path):
    """The variant's settings as the folder stores them (the divider resolved into a unitary lr) resume."""
    variants = _benchmark_script("paper_variants")
    for name in variants.VARIANTS:
        started = resolve(variants.variant_config(name, resume=False, max_minutes=1, quiet=True, root=tmp_path))
        stored = stored_settings(started)
        again = variants.variant_config(name, resume=True, max_minutes=5, quiet=True, root=tmp_path)
        resumed = resumed_config(again, stored, tmp_path / name)
        changed = variants.VARIANTS[name][2]
        assert resumed.unitary_lr == started.unitary_lr and resumed.max_minutes == 5
        assert all(getattr(resumed, key) == getattr(started, key) for key in changed if key != "unitary_lr_divider")


def _record(name, method, losses, summary):
    RunRecord = _benchmark_script("runs").RunRecord
    rows = [
        {
            "step": 100.0 * (i + 1),
            "seconds": 60.0 * (i + 1),
            "train_loss": loss,
            "eval_loss": loss,
            "eval_accuracy": 1 - loss,
            "eval_baseline": 2.0,
            "max_unitarity_error": 1e-6,
        }
        for i, loss in enumerate(losses)
    ]
    config = {"task": "pmnist", "method": method, "epochs": 200, "steps": None, "preset": None}
    return RunRecord(pathlib.Path(name), config, rows, summary)


def test_the_paper_table_chooses_on_validation_and_reports_the_test_set_apart():
    table = _benchmark_script("paper_table")
    finished = _record(
        "pmnist-h170-t-cayley",
        "t",
        [0.5, 0.2, 0.3],
        {"steps": 300, "test_loss": 0.4, "test_accuracy": 0.6, "test_baseline": 2.0},
    )
    running = _record("pmnist-h170-expm-cayley", "expm", [0.6, 0.4], {"steps": 150, "interrupted": True})
    row = table._describe(finished)
    assert row["validation: last (/ baseline), best step"].endswith("best 0.2 at 200")  # chosen on validation
    assert row["test, final weights (/ baseline)"] == "0.4 (0.2x), accuracy 60.0%"  # the summary's, apart
    described = table._describe(running)
    assert described["test, final weights (/ baseline)"] == "- (in progress: scored once, at the end)"
    assert described["steps (schedule)"].startswith("200 (200 epochs, in progress)")  # metrics are newer
    shared = table.equal_steps([finished, running])
    assert "pmnist-h170-cayley, every method" in shared and "| 200 | 0.1x, 80.0% | 0.2x, 60.0% |" in shared
