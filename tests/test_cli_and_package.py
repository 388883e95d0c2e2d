"""The command line, the public surface, and repository hygiene."""

from __future__ import annotations

import ast
import importlib
import json
import pathlib

import pytest

import projunn
from projunn.harness.cli import main

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_the_quick_check_in_the_guide_learns_a_rotation(tmp_path, capsys):
    """The unitary task with a high lr (the guide's one-line check) learns its rotation in seconds."""
    argv = ["train", "unitary", "--hidden", "16", "--steps", "200", "--lr", "0.1", "--unitary-lr", "0.1"]
    assert main([*argv, "--quiet", "--seed", "4", "--out", str(tmp_path / "run")]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    # A real orthogonal layer stays in the component of O(N) it starts in: seed 4 draws the layer and
    # the target in the same one, where an unrelated rotation's loss is about 2.
    assert summary["final_loss"] < 1e-3 and summary["max_unitarity_error"] < 1e-5


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "unitary", "--rank", "0"], "argument --rank: expected a positive integer, got '0'"),
        (["train", "unitary", "--lr", "-1"], "argument --lr: expected a positive finite number"),
        (["train", "unitary", "--method", "eunn2"], "argument --method: invalid choice"),
        (["certify"], "the following arguments are required: RUN"),
        (["certify", "run", "--attack", "-1"], "argument --attack: expected a non-negative integer"),
        (["demo"], "invalid choice: 'demo'"),
        (["nonsense"], "invalid choice"),
    ],
)
def test_bad_arguments_exit_2_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    assert message in capsys.readouterr().err


def test_no_command_is_a_one_line_error_with_exit_status_2(capsys):
    """As argparse-based tools do: usage errors go to stderr with status 2; ``projunn --help`` helps."""
    with pytest.raises(SystemExit) as stop:
        main([])
    assert stop.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "a command is required: train, bench or certify" in captured.err and captured.err.count("\n") == 1


@pytest.mark.parametrize("task", ["copy", "pmnist", "mnist"])
def test_train_task_help_shows_the_tasks_resolved_defaults(capsys, task):
    from projunn.harness.train import TrainConfig, resolve

    with pytest.raises(SystemExit) as stop:
        main(["train", task, "--help"])
    assert stop.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # undo the wrapping
    resolved = resolve(TrainConfig(task=task))
    assert f"defaults of the {task} task:" in text
    for option in ("hidden", "depth", "batch_size", "lr", "optimizer"):
        value = getattr(resolved, option)
        if value is not None:
            shown = f"{value:g}" if isinstance(value, float) else str(value)
            assert f"--{option.replace('_', '-')} {shown} " in text + " ", option
    assert "--preset paper changes:" in text and "exit status: 0 done; 1 stopped" in text


def test_version_flag(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.strip() == f"projunn {projunn.__version__}"


def test_public_names_import():
    assert projunn.__version__
    for module in ("projunn.functional", "projunn.optim", "projunn.nn", "projunn.models", "projunn.harness.tasks"):
        mod = importlib.import_module(module)
        missing = [name for name in mod.__all__ if not hasattr(mod, name)]
        assert not missing and len(set(mod.__all__)) == len(mod.__all__), (module, missing)
    assert {"projunn_d", "projunn_t", "lowrank", "unitarity_error"} <= set(projunn.functional.__all__)
    train = importlib.import_module("projunn.harness.train")  # what run scripts import
    names = {"TrainConfig", "resolve", "train", "RunError", "RunDivergedError", "CHECKPOINT", "METHODS", "OPTIMIZERS"}
    assert names <= set(train.__all__) and all(hasattr(train, name) for name in names)


def _project_files():
    for folder in ("src", "tests", "benchmarks", ".ci"):
        yield from (p for p in (ROOT / folder).rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    yield from (p for p in ROOT.glob("*") if p.is_file())


def test_no_merge_conflict_markers_and_every_python_file_parses():
    markers = ("<" * 7 + " ", "=" * 7 + "\n", ">" * 7 + " ")
    for path in _project_files():
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        for marker in markers:
            assert marker not in text, f"merge-conflict marker in {path}"
        if path.suffix == ".py":
            ast.parse(text, filename=str(path))
