"""Hostile input and faults: non-finite data, losses and steps, huge learning rates, zero gradients,
foreign or damaged checkpoints, a process killed while writing, and occupied output folders."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from projunn.cli import main
from projunn.functional import unitarity_error, unitary_init
from projunn.optim import ProjUNN
from projunn.tasks import _registry
from projunn.train import CHECKPOINT

RUN = ["--hidden", "8", "--batch-size", "4", "--seq-len", "5", "--eval-every", "2", "--quiet"]


def _train(tmp_path, *argv, name="run"):
    out = tmp_path / name
    assert main(["train", "copy", *RUN, *argv, "--out", str(out)]) == 0
    return out


def _summary(out):
    return json.loads((out / "summary.json").read_text())


@pytest.mark.parametrize("poison", ["data", "loss"])
def test_nonfinite_data_or_loss_skips_the_step_and_the_run_finishes_finite(tmp_path, monkeypatch, poison):
    batch, loss = _registry.CopyTask.batch, _registry.CopyTask.loss
    if poison == "data":  # a NaN input at step 1 (the copy task's inputs are tokens, so poison the readout)

        def poisoned_batch(self, config, step, device):
            x, y = batch(self, config, step, device)
            self._poison = step == 1
            return x, y

        def poisoned_loss(self, model, x, y):
            value, accuracy = loss(self, model, x, y)
            return (value * float("nan") if getattr(self, "_poison", False) else value), accuracy

        monkeypatch.setattr(_registry.CopyTask, "batch", poisoned_batch)
    else:
        calls = []

        def poisoned_loss(self, model, x, y):
            value, accuracy = loss(self, model, x, y)
            calls.append(1)
            return (value + float("inf") if len(calls) == 2 else value), accuracy

    monkeypatch.setattr(_registry.CopyTask, "loss", poisoned_loss)
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


def test_a_truncated_checkpoint_is_refused_and_kept(tmp_path, capsys):
    out = _train(tmp_path, "--steps", "2")
    data = (out / CHECKPOINT).read_bytes()
    (out / CHECKPOINT).write_bytes(data[: len(data) // 2])
    assert main(["train", "copy", *RUN, "--steps", "4", "--resume", "--out", str(out)]) == 2
    assert "is not a readable checkpoint" in capsys.readouterr().err
    assert (out / CHECKPOINT).read_bytes() == data[: len(data) // 2]


def test_a_failed_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    out = _train(tmp_path, "--steps", "2")
    good = (out / CHECKPOINT).read_bytes()
    save = torch.save

    def dies_half_way(obj, f, *args, **kwargs):
        save(obj, f, *args, **kwargs)
        with open(f, "r+b") as partial:
            partial.truncate(100)
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(OSError, match="disk full"):
        main(["train", "copy", *RUN, "--steps", "4", "--resume", "--out", str(out)])
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
    deadline = time.monotonic() + 120
    while not (out / CHECKPOINT).exists() and time.monotonic() < deadline:
        time.sleep(0.1)
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
