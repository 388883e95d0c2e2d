"""What a new user can do wrong at the command line: each gets one line and exit status 2, never a
traceback, and no folder is left unusable."""

from __future__ import annotations

import json
import re
import sys
from dataclasses import replace

import pytest

from harness_runs import quick_runs  # noqa: F401  (fixture)
from projunn.harness.cli import build_parser, main
from projunn.harness.tasks import TASKS
from projunn.harness.tasks._sequence import CopyTask
from projunn.harness.train import CHECKPOINT, RunError, TrainConfig, resolve, train

RUN = ["--hidden", "8", "--batch-size", "4", "--seq-len", "5", "--eval-every", "2", "--quiet"]
BENCH = ["bench", "--sizes", "8", "--ranks", "1", "--repeats", "3", "--budget-s", "0.01", "--only", "update", "--quiet"]


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


def _files(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


# -- tracebacks that were still reachable ----------------------------------------------------------


def test_tensorboard_without_its_package_is_one_line_naming_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # what an install without it gives
    out = tmp_path / "run"
    assert main(["train", "copy", *RUN, "--steps", "2", "--tensorboard", "--out", str(out)]) == 2
    assert "--tensorboard: TensorBoard logging needs the tensorboard package: pip install 'projunn[trainers]'" in (
        _one_line(capsys)
    )
    assert not out.exists()


def test_tensorboard_without_its_package_leaves_a_run_it_would_overwrite(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    assert main(["train", "copy", *RUN, "--steps", "2", "--out", str(out)]) == 0
    before = _files(out)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    capsys.readouterr()
    assert main(["train", "copy", *RUN, "--steps", "2", "--tensorboard", "--overwrite", "--out", str(out)]) == 2
    assert "pip install 'projunn[trainers]'" in _one_line(capsys)
    assert _files(out) == before


def test_a_failed_start_with_tensorboard_leaves_no_folder(tmp_path, monkeypatch):
    class _Failing(CopyTask):
        def loss(self, model, x, y):
            raise RuntimeError("an error in the first step")

    monkeypatch.setitem(TASKS, "copy", _Failing())
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="first step"):
        main(["train", "copy", *RUN, "--steps", "2", "--tensorboard", "--out", str(out)])
    assert not out.exists()


def test_bench_out_a_file_is_refused_before_measuring(tmp_path, capsys, monkeypatch):
    from projunn.harness import bench

    afile = tmp_path / "afile"
    afile.write_text("mine")
    monkeypatch.setattr(bench, "run_bench", lambda *a, **k: pytest.fail("measured before checking --out"))
    assert main([*BENCH, "--out", str(afile)]) == 2
    assert f"--out {afile} is a file, not a folder" in _one_line(capsys)
    assert afile.read_text() == "mine"
    assert main([*BENCH, "--out", str(afile / "sub")]) == 2
    assert f"cannot create --out {afile / 'sub'}: {afile} is a file, not a folder" in _one_line(capsys)


def test_bench_sizes_the_machine_cannot_hold_are_refused_before_anything_is_allocated(tmp_path, capsys):
    out = tmp_path / "b"
    assert main(["bench", "--sizes", "100000", "--only", "update", "--quiet", "--out", str(out)]) == 2
    err = _one_line(capsys)
    assert "projunn bench: error: the update benchmark at N = 100000 needs about" in err
    assert "available on cpu; choose smaller --sizes" in err
    assert not out.exists()


def test_bench_memory_estimate_refuses_none_of_the_default_grid():
    """The estimate is a floor (measured peaks rounded down): the default grid, even with N = 8192,
    asks for less than a 16 GiB machine holds."""
    from projunn.harness.bench import BenchConfig
    from projunn.harness.bench._cases import peak_bytes

    config = BenchConfig()
    for n in (*config.sizes, 8192):
        for bench in ("update", "layer"):
            assert peak_bytes(bench, n, config) < 16 * 2**30, (bench, n)
    assert peak_bytes("update", 100_000, config) > 100 * 2**30


def test_bench_refuses_earlier_results_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "b"
    out.mkdir()
    (out / "results.csv").write_text("earlier")
    assert main([*BENCH, "--out", str(out)]) == 2
    assert f"{out} already holds bench results; pass --overwrite to replace them" in _one_line(capsys)
    assert _files(out) == {"results.csv": b"earlier"}
    assert main([*BENCH, "--overwrite", "--out", str(out)]) == 0
    assert (out / "results.csv").read_text().startswith("bench,N,k,case")


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_bench_never_writes_into_a_training_run(tmp_path, capsys, overwrite):
    out = tmp_path / "run"
    assert main(["train", "copy", *RUN, "--steps", "2", "--out", str(out)]) == 0
    before = _files(out)
    capsys.readouterr()
    assert main([*BENCH, *overwrite, "--out", str(out)]) == 2
    assert f"{out} holds a training run; choose another --out" in _one_line(capsys)
    assert _files(out) == before


def test_bench_into_a_folder_of_other_files_says_what_is_there(tmp_path, capsys):
    out = tmp_path / "b"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main([*BENCH, "--out", str(out)]) == 2
    assert f"{out} holds files that are not bench results (notes.txt)" in _one_line(capsys)


def test_bench_default_folders_never_collide(tmp_path, monkeypatch):
    from projunn.harness import bench

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(bench.time, "strftime", lambda pattern: "bench-20260101-000000")
    for _ in range(2):
        assert main(BENCH) == 0
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["bench-20260101-000000", "bench-20260101-000000-2"]


# -- help that listed flags that did not exist --------------------------------------------------------


def _help_lines(task: str, capsys) -> tuple[str, str]:
    """The ``defaults of the TASK task:`` and ``--preset paper changes:`` lines of ``train TASK --help``."""
    with pytest.raises(SystemExit) as stop:
        main(["train", task, "--help"])
    assert stop.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # undo the wrapping
    defaults = text.split(f"defaults of the {task} task: ")[1].split(" --preset paper changes: ")[0]
    preset = text.split(" --preset paper changes: ")[1].split(" exit status:")[0]
    return defaults, preset


def _accepted(task: str, argv: list[str]) -> TrainConfig:
    """What ``projunn train TASK ARGV`` would run: parsed as main parses, then resolved."""
    args = build_parser().parse_args(["train", task, *argv])
    return resolve(TrainConfig(**{k: v for k, v in vars(args).items() if k != "command"}))


@pytest.mark.parametrize("task", list(TASKS))
def test_every_flag_the_task_help_prints_is_accepted_with_its_printed_value(task, capsys):
    defaults, preset = _help_lines(task, capsys)
    for line, extra in ((defaults, []), (preset, ["--preset", "paper"])):
        if line == "nothing":
            continue
        pairs = re.findall(r"(--[a-z][a-z0-9-]*) (\S+)", line)
        assert pairs and " ".join(f"{flag} {value}" for flag, value in pairs) == line  # nothing unparsed
        for flag, value in pairs:
            _accepted(task, [*extra, flag, value])
        _accepted(task, [*extra, *line.split()])  # and all of them at once
    # What the defaults line shows is what the task resolves to (a divider is shown as the unitary lr it gives).
    shown, resolved = _accepted(task, defaults.split()), _accepted(task, [])
    assert replace(shown, unitary_lr_divider=None) == resolved


def test_the_learning_rate_schedule_and_input_initialisation_are_flags(tmp_path):
    out = tmp_path / "run"
    argv = ["--lr-decay", "0.5", "--lr-decay-every", "1", "--input-init", "xavier"]
    assert main(["train", "copy", *RUN, "--steps", "2", *argv, "--out", str(out)]) == 0
    stored = json.loads((out / "config.json").read_text())
    assert (stored["lr_decay"], stored["lr_decay_every"], stored["input_init"]) == (0.5, 1, "xavier")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "adding", "--lr-decay", "1.5"], "projunn train: error: argument --lr-decay: expected a number in"),
        (["train", "adding", "--lr-decay", "0.5", "--bogus"], "projunn train: error: unrecognized arguments: --bogus"),
        (["bench", "--bogus"], "projunn bench: error: unrecognized arguments: --bogus"),
        (["certify", "run", "--bogus", "1"], "projunn certify: error: unrecognized arguments: --bogus 1"),
    ],
)
def test_a_commands_bad_arguments_are_reported_by_that_command(argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2 and _one_line(capsys).startswith(message)


def test_input_init_is_refused_where_there_is_no_rnn(tmp_path, capsys):
    assert main(["train", "unitary", "--input-init", "he", "--out", str(tmp_path / "r")]) == 2
    assert "--input-init does not apply to the unitary task" in _one_line(capsys)


# -- runs that trapped their own folder -----------------------------------------------------------


def test_a_run_that_diverges_before_its_first_checkpoint_leaves_its_folder_reusable(tmp_path, capsys):
    out = tmp_path / "X"
    tiny = ["--hidden", "8", "--batch-size", "4", "--seq-len", "5", "--quiet"]  # evaluates at step 200 only
    assert main(["train", "copy", *tiny, "--lr", "1e30", "--steps", "30", "--out", str(out)]) == 1
    err = _one_line(capsys)
    assert f"{out} has no checkpoint, so a rerun with the same --out starts afresh" in err
    assert not (out / CHECKPOINT).exists()
    assert main(["train", "copy", *tiny, "--steps", "2", "--resume", "--out", str(out)]) == 2
    assert "stopped before its first checkpoint: start it again without --resume" in _one_line(capsys)
    assert main(["train", "copy", *tiny, "--steps", "2", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and not summary["diverged"]


def test_a_folder_holding_a_users_file_is_refused_saying_what_is_there(tmp_path, capsys):
    out = tmp_path / "X"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["train", "copy", *RUN, "--steps", "2", "--out", str(out)]) == 2
    err = _one_line(capsys)
    assert f"{out} holds files that are not a projunn run (notes.txt)" in err and "already holds a run" not in err
    assert _files(out) == {"notes.txt": b"mine"}
    assert main(["train", "copy", *RUN, "--steps", "2", "--overwrite", "--out", str(out)]) == 0
    assert (out / "notes.txt").read_text() == "mine" and (out / CHECKPOINT).exists()


def test_an_empty_out_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for argv in (["train", "copy", *RUN, "--steps", "2"], BENCH):
        with pytest.raises(SystemExit) as stop:
            main([*argv, "--out", ""])
        assert stop.value.code == 2
        assert "argument --out: expected a folder name, got an empty one" in _one_line(capsys)
    with pytest.raises(RunError, match="--out is empty"):
        train(TrainConfig(task="copy", steps=2, out=""))
    assert not list(tmp_path.iterdir())


def test_a_finished_run_whose_checkpoint_was_deleted_keeps_its_results(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "copy", "--hidden", "8", "--seq-len", "5", "--batch-size", "4", "--steps", "2", "--quiet"]
    assert main([*argv, "--out", str(out)]) == 0
    (out / "checkpoint.pt").unlink()  # to save disk space, say
    before = (out / "summary.json").read_text()
    capsys.readouterr()
    assert main([*argv, "--out", str(out)]) == 2
    assert "holds a run's results (summary.json) without its checkpoint; pass --overwrite" in capsys.readouterr().err
    assert (out / "summary.json").read_text() == before
    assert main([*argv, "--out", str(out), "--overwrite"]) == 0
