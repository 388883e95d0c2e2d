"""Hostile input and faults: non-finite data, losses and steps, huge learning rates, zero gradients,
foreign or damaged checkpoints, a process killed while writing, and occupied output folders."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from harness_runs import quick_runs  # noqa: F401  (fixture)
from projunn.functional import unitarity_error, unitary_init
from projunn.harness import _folder
from projunn.harness._files import lock_folder, make_new_folder, unlock_folder
from projunn.harness.cli import main
from projunn.harness.tasks import TASKS
from projunn.harness.tasks._sequence import AddingTask, CopyTask
from projunn.harness.train import CHECKPOINT
from projunn.optim import ProjUNN

RUN = ["--hidden", "8", "--batch-size", "4", "--seq-len", "5", "--eval-every", "2", "--quiet"]


def _train(tmp_path, *argv, name="run", task="copy"):
    out = tmp_path / name
    assert main(["train", task, *RUN, *argv, "--out", str(out)]) == 0
    return out


class _LossReplaced(CopyTask):
    """The copy task with ``loss(model, x, y, call)`` in place of its loss; ``call`` counts from 1, one per step."""

    def __init__(self, loss):
        super().__init__()
        self.replacement, self.calls = loss, 0

    def loss(self, model, x, y):
        self.calls += 1
        return self.replacement(model, x, y, self.calls)


_copy_loss = CopyTask().loss  # the unchanged loss (the task holds no state)


def _summary(out):
    return json.loads((out / "summary.json").read_text())


class _NaNInputAtStep1(AddingTask):
    def prepare(self, config, device):
        data = super().prepare(config, device)
        batch = data.batch

        def poisoned(step):
            x, y = batch(step)
            return (x.clone().fill_(float("nan")) if step == 1 else x), y

        data.batch = poisoned
        return data


@pytest.mark.parametrize("poison", ["data", "loss"])
def test_nonfinite_data_or_loss_skips_the_step_and_the_run_finishes_finite(tmp_path, monkeypatch, poison):
    if poison == "data":  # NaN inputs at step 1 (the adding task's inputs are numbers)
        monkeypatch.setitem(TASKS, "adding", _NaNInputAtStep1())
        out = _train(tmp_path, "--steps", "4", task="adding")
    else:

        def inf_at_step_1(model, x, y, call):
            value = _copy_loss(model, x, y)
            return value + float("inf") if call == 2 else value

        monkeypatch.setitem(TASKS, "copy", _LossReplaced(inf_at_step_1))
        out = _train(tmp_path, "--steps", "4")
    summary = _summary(out)
    assert summary["nonfinite_losses"] == 1 and summary["steps"] == 4
    state = torch.load(out / CHECKPOINT, weights_only=True)["model"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert summary["max_unitarity_error"] < 1e-5


@pytest.mark.parametrize("method", ["t", "d"])
@pytest.mark.parametrize("lr", [1e3, 1e12])
def test_huge_learning_rates_keep_the_weight_unitary_and_finite(method, lr):
    weight = torch.nn.Parameter(unitary_init(16, "haar", dtype=torch.float64))
    optimizer = ProjUNN(torch.optim.SGD([{"params": [weight], "unitary": True, "method": method}], lr=lr), seed=0)
    for _ in range(5):
        weight.grad = torch.randn(16, 16, dtype=torch.float64)
        optimizer.step()
    assert torch.isfinite(weight).all() and unitarity_error(weight.detach()) < 1e-12 * max(1.0, lr) ** 0.5


@pytest.mark.parametrize("sketch", ["lsi", "column", "rsvd", "exact"])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_huge_steps_that_overflow_are_skipped_not_applied(sketch, sign):
    """One overflowing entry: LSI must see it through its factors, the others through a pass over D."""
    weight = torch.nn.Parameter(unitary_init(8, "haar"))
    before = weight.detach().clone()
    group = {"params": [weight], "unitary": True, "sketch": sketch}
    optimizer = ProjUNN(torch.optim.SGD([group], lr=1e38), seed=0)
    weight.grad = torch.randn(8, 8)
    weight.grad[2, 5] = sign * 1e10  # lr * grad overflows float32 in this one entry
    with pytest.warns(RuntimeWarning, match="proposed step .* is NaN or Inf"):
        optimizer.step()
    assert torch.equal(weight, before)


@pytest.mark.parametrize("method", ["t", "d"])
def test_zero_gradients_leave_the_weight_exactly_unchanged(method):
    weight = torch.nn.Parameter(unitary_init(12, "haar", dtype=torch.float64))
    before = weight.detach().clone()
    optimizer = ProjUNN(torch.optim.Adam([{"params": [weight], "unitary": True, "method": method}]), seed=0)
    for _ in range(3):
        weight.grad = torch.zeros_like(weight)
        optimizer.step()
    assert torch.equal(weight, before)


def test_a_checkpoint_of_another_model_is_refused_and_kept(tmp_path, capsys):
    out = _train(tmp_path, "--steps", "2")
    other = _train(tmp_path, "--steps", "2", "--hidden", "12", name="other")
    checkpoint = torch.load(out / CHECKPOINT, weights_only=True)
    checkpoint["model"] = torch.load(other / CHECKPOINT, weights_only=True)["model"]  # same settings, other weights
    torch.save(checkpoint, out / CHECKPOINT)
    before = (out / CHECKPOINT).read_bytes()
    assert main(["train", "copy", *RUN, "--steps", "4", "--resume", "--out", str(out)]) == 2
    assert "does not fit this model" in capsys.readouterr().err
    assert (out / CHECKPOINT).read_bytes() == before


@pytest.mark.parametrize("content", [b"garbage", b"\x80\x02}q\x00."])  # text; a pickle of an empty dict
def test_a_garbage_checkpoint_is_refused_without_torchs_advice(tmp_path, capsys, content):
    out = _train(tmp_path, "--steps", "2")
    (out / CHECKPOINT).write_bytes(content)
    capsys.readouterr()
    assert main(["train", "copy", *RUN, "--steps", "4", "--resume", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{out / CHECKPOINT} is not a readable projunn checkpoint" in err
    assert "weights_only" not in err and err.count("\n") == 1


@pytest.mark.parametrize("entry", ["step", "window", "failing"])
def test_a_checkpoint_without_an_entry_of_its_run_state_names_the_missing_entry(tmp_path, capsys, entry):
    out = _train(tmp_path, "--steps", "2")
    checkpoint = torch.load(out / CHECKPOINT, weights_only=True)
    del checkpoint[entry]
    torch.save(checkpoint, out / CHECKPOINT)
    capsys.readouterr()
    assert main(["train", "copy", *RUN, "--steps", "4", "--resume", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"is not a complete projunn checkpoint: it has no {entry!r} entry" in err and err.count("\n") == 1


def test_a_truncated_checkpoint_is_refused_and_kept(tmp_path, capsys):
    out = _train(tmp_path, "--steps", "2")
    data = (out / CHECKPOINT).read_bytes()
    (out / CHECKPOINT).write_bytes(data[: len(data) // 2])
    assert main(["train", "copy", *RUN, "--steps", "4", "--resume", "--out", str(out)]) == 2
    assert "is not a readable projunn checkpoint" in capsys.readouterr().err
    assert (out / CHECKPOINT).read_bytes() == data[: len(data) // 2]


def test_a_failed_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    out = _train(tmp_path, "--steps", "2")
    good = (out / CHECKPOINT).read_bytes()
    save = torch.save

    def dies_half_way(obj, f, *args, **kwargs):
        save(obj, f, *args, **kwargs)
        with open(f, "r+b") as partial:
            partial.truncate(100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", dies_half_way)
    capsys.readouterr()
    assert main(["train", "copy", *RUN, "--steps", "4", "--resume", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"cannot write {out / CHECKPOINT}: No space left on device (errno ENOSPC)" in err
    assert err.count("\n") == 1  # one line, no traceback
    assert (out / CHECKPOINT).read_bytes() == good
    assert not list(out.glob(".*.tmp-*"))


@pytest.mark.slow
def test_a_process_killed_at_any_moment_leaves_a_loadable_checkpoint(tmp_path):
    """SIGKILL a run that checkpoints every step; the checkpoint loads and the run resumes."""
    out = tmp_path / "killed"
    argv = [sys.executable, "-m", "projunn", "train", "copy", *RUN, "--eval-every", "1", "--steps", "100000"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [*argv, "--out", str(out)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 600  # generous: a loaded machine may take minutes to start the run
    while not (out / CHECKPOINT).exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    if not (out / CHECKPOINT).exists():
        process.kill()
        pytest.fail(f"the run wrote no checkpoint (exit status {process.wait(timeout=30)})")
    time.sleep(1.5)  # many checkpoint writes later, one is probably in flight
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    checkpoint = torch.load(out / CHECKPOINT, weights_only=True)
    assert checkpoint["step"] >= 1
    steps = checkpoint["step"] + 2
    assert main(["train", "copy", *RUN, "--eval-every", "1", "--steps", str(steps), "--resume", "--out", str(out)]) == 0
    assert _summary(out)["steps"] == steps and not list(out.glob(".*.tmp-*"))


def test_a_second_run_never_mixes_into_an_existing_folder(tmp_path, capsys):
    out = _train(tmp_path, "--steps", "2")
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(["train", "copy", *RUN, "--steps", "3", "--out", str(out)]) == 2
    assert "already holds a run; pass --resume to continue it or --overwrite" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files
    assert main(["train", "copy", *RUN, "--steps", "3", "--overwrite", "--out", str(out)]) == 0
    assert _summary(out)["steps"] == 3


def test_a_folder_in_use_by_another_process_is_refused_and_left_alone(tmp_path, capsys):
    out = _train(tmp_path, "--steps", "2")
    assert not list(out.glob(".*"))  # the run's lock file went with its lock
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    lock = lock_folder(out)  # what a run in another process holds (flock locks are per open file)
    try:
        for extra in (["--resume"], ["--overwrite"]):
            capsys.readouterr()
            assert main(["train", "copy", *RUN, "--steps", "4", *extra, "--out", str(out)]) == 2
            err = capsys.readouterr().err
            assert f"{out} is in use by another projunn process" in err and err.count("\n") == 1
            assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != ".lock"} == files
    finally:
        unlock_folder(out, lock)
    assert main(["train", "copy", *RUN, "--steps", "4", "--resume", "--out", str(out)]) == 0


def test_default_folder_names_never_collide(tmp_path, monkeypatch):
    """Two runs started in the same second (the default name has one-second resolution) get two folders."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(_folder.time, "strftime", lambda pattern: "20260101-000000")
    for seed in ("1", "2"):
        assert main(["train", "copy", *RUN, "--steps", "2", "--seed", seed]) == 0
    first, second = tmp_path / "runs" / "copy-t-20260101-000000", tmp_path / "runs" / "copy-t-20260101-000000-2"
    assert json.loads((first / "config.json").read_text())["seed"] == 1
    assert json.loads((second / "config.json").read_text())["seed"] == 2
    assert _summary(second)["steps"] == 2
    # A folder another process has just created (still empty) is taken, too.
    assert make_new_folder(tmp_path / "x") == tmp_path / "x" and make_new_folder(tmp_path / "x") == tmp_path / "x-2"


@pytest.mark.parametrize("fresh", [True, False])
def test_a_failed_start_leaves_a_folder_both_a_rerun_and_resume_accept(tmp_path, monkeypatch, fresh):
    """A run that fails before its first checkpoint removes what it created."""
    out = tmp_path / "run"
    if not fresh:
        out.mkdir()
    original = TASKS["copy"]

    def fails(model, x, y, call):
        raise RuntimeError("an error in the first step")

    monkeypatch.setitem(TASKS, "copy", _LossReplaced(fails))
    with pytest.raises(RuntimeError, match="first step"):
        main(["train", "copy", *RUN, "--steps", "4", "--out", str(out)])
    assert not out.exists() if fresh else not list(out.iterdir())
    monkeypatch.setitem(TASKS, "copy", original)
    assert main(["train", "copy", *RUN, "--steps", "2", "--out", str(out)]) == 0
    assert main(["train", "copy", *RUN, "--steps", "4", "--resume", "--out", str(out)]) == 0


def test_a_start_killed_before_its_first_checkpoint_does_not_block_a_rerun(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("{}")  # all a start killed before its first evaluation leaves
    assert main(["train", "copy", *RUN, "--steps", "2", "--out", str(out)]) == 0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--lr", "1e39"], "--lr 1e+39 exceeds 3.403e+38, the largest torch.float32"),
        (["--lr", "1e308"], "--lr 1e+308 exceeds"),
        (["--unitary-lr", "1e300"], "--unitary-lr 1e+300 exceeds"),
        (["--seq-len", "1000000000"], "reduce --batch-size, --seq-len or --hidden"),
        (["--hidden", "1000000"], "TiB of memory"),
        (["--batch-size", "1000000000"], "available on cpu"),
    ],
)
def test_settings_the_machine_cannot_hold_are_refused_before_anything_is_allocated(tmp_path, capsys, argv, message):
    base = ["--seq-len", "5", "--hidden", "8", "--batch-size", "4"]
    argv_ = ["train", "copy", "--steps", "2", "--device", "cpu", *base, *argv, "--out", str(tmp_path / "r")]
    assert main(argv_) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "r").exists()


def test_the_memory_estimate_is_near_what_a_run_uses():
    """The refusal threshold must not refuse runs that fit: the estimate of the default copy run is
    within a small factor of the ~1.3 GiB one measured at T = 2000 (and scales with T)."""
    from projunn.harness._memory import estimate_bytes
    from projunn.harness.train import TrainConfig, resolve

    config = resolve(TrainConfig(task="copy", seq_len=2000))
    assert 0.5 * 2**30 < estimate_bytes(config) < 2.5 * 2**30
    assert estimate_bytes(config, processes=2) < estimate_bytes(config)


def test_a_run_whose_every_loss_is_nan_stops_with_exit_status_1(tmp_path, monkeypatch, capsys):
    """What ``--lr 1e30`` does to the default copy run, made certain."""
    nan = lambda model, x, y, call: _copy_loss(model, x, y) * float("nan")  # noqa: E731
    monkeypatch.setitem(TASKS, "copy", _LossReplaced(nan))
    out = tmp_path / "run"
    assert main(["train", "copy", *RUN, "--steps", "60", "--eval-every", "5", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "stopped at step 20: 20 steps in a row had a non-finite loss" in err and err.count("\n") == 1
    assert f"in {out} is kept" in err  # the weights never changed, so the last evaluation's state was good
    summary = _summary(out)
    assert summary["diverged"] and summary["steps"] == 20 and summary["nonfinite_losses"] == 20


def test_divergence_keeps_the_last_finite_checkpoint(tmp_path, monkeypatch, capsys):
    def nan_from_step_3(model, x, y, call):  # NaN weights: the loss and the evaluations after it are NaN
        if call >= 3:
            with torch.no_grad():
                for p in model.parameters():
                    p.fill_(float("nan"))
        return _copy_loss(model, x, y)

    monkeypatch.setitem(TASKS, "copy", _LossReplaced(nan_from_step_3))
    out = tmp_path / "run"
    argv = ["train", "copy", *RUN, "--steps", "50", "--max-nonfinite", "3", "--out", str(out)]
    assert main(argv) == 1
    assert "stopped at step 5: 3 steps in a row" in capsys.readouterr().err
    checkpoint = torch.load(out / CHECKPOINT, weights_only=True)
    assert checkpoint["step"] == 2  # the evaluation at step 4 was NaN and did not replace it
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values() if v.is_floating_point())
