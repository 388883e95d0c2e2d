"""benchmarks/lipschitz_tuned.py: probes scored on validation, the choice, and the tuned run at the chosen lr."""

from __future__ import annotations

import json

import torch

from test_reproduction import _benchmark_script

tuned = _benchmark_script("lipschitz_tuned")


def test_the_choice_ranks_certified_validation_accuracy_first_then_clean_accuracy():
    row = lambda clean, certified: {"val_accuracy": clean, "val_certified_1.58": certified}  # noqa: E731
    assert tuned.choose({1e-3: row(0.9, 0.3), 1e-2: row(0.8, 0.4)}) == 1e-2
    assert tuned.choose({1e-3: row(0.9, 0.4), 1e-2: row(0.8, 0.4)}) == 1e-3


def test_each_method_trains_at_the_lr_its_probes_chose_and_a_second_start_needs_resume(tmp_path, capsys):
    torch.set_num_threads(1)
    argv = ["--data", "synthetic", "--limit-train", "32", "--batch-size", "16", "--epochs", "2", "--channels", "4"]
    argv += ["--blocks", "1", "--lrs", "0.001", "0.03", "--methods", "projunn-t", "--out-root", str(tmp_path)]
    assert tuned.main(argv) == 0
    selection = json.loads((tmp_path / "selection.json").read_text())["projunn-t"]
    rows = {float(lr): row for lr, row in selection["probes"].items()}
    assert set(rows) == {0.001, 0.03} and selection["chosen_lr"] == tuned.choose(rows)
    for lr, row in rows.items():  # each probe stopped after the schedule's first epoch, scored on validation
        folder = tuned.probe_folder(tmp_path, "projunn-t", lr)
        record = json.loads((folder / tuned.PROBE_RECORD).read_text())
        assert record["row"] == row and record["settings"]["lr"] == lr
        assert len((folder / "metrics.csv").read_text().splitlines()) == 2  # the header and the first epoch
        assert not (folder / "checkpoint.pt").exists()  # once the choice is made, the record is what is kept
    run = torch.load(tmp_path / "projunn-t" / "checkpoint.pt", weights_only=True)
    assert run["settings"]["lr"] == selection["chosen_lr"] and len(run["position"]["rows"]) == 2
    assert run["position"]["rows"][0] == rows[selection["chosen_lr"]]  # the chosen probe was its first epoch
    assert json.loads((tmp_path / "projunn-t" / "summary.json").read_text())["epochs"] == 2
    table = (tmp_path / "results.md").read_text()
    assert "| projunn-t |" in table and "**" in table
    assert tuned.main(argv) == 2 and "pass --resume" in capsys.readouterr().err
    assert tuned.main([*argv, "--resume"]) == 0
    assert (tmp_path / "results.md").read_text() == table
    # Probes of another schedule must not decide this one: refused in a line, nothing changed.
    assert tuned.main([*argv, "--resume", "--epochs", "3"]) == 2
    assert "trained with other settings; epochs: 3 (the run has 2)" in capsys.readouterr().err
    assert json.loads((tmp_path / "selection.json").read_text())["projunn-t"] == selection


def test_a_probe_stopped_midway_resumes_to_the_row_of_an_uninterrupted_one(tmp_path):
    torch.set_num_threads(1)
    settings = tuned.peers.Settings(channels=4, blocks=1, batch_size=8, epochs=2, data="synthetic", limit_train=32)
    data = tuned.peers.load_data(settings)
    whole = tuned.probe("projunn-t", 0.01, settings, data, tmp_path / "whole", stop=lambda: False)
    assert tuned.probe("projunn-t", 0.01, settings, data, tmp_path / "parts", stop=lambda: True) is None
    resumed = tuned.probe("projunn-t", 0.01, settings, data, tmp_path / "parts", stop=lambda: False)
    without_seconds = lambda row: {k: v for k, v in row.items() if k != "seconds"}  # noqa: E731  (wall-clock seconds differ)
    assert without_seconds(resumed) == without_seconds(whole)
