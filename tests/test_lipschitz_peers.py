"""benchmarks/lipschitz_peers.py: one skeleton per method, its soundness figures, and resuming a sitting."""

from __future__ import annotations

import json

import pytest
import torch

from projunn.models import LipschitzCNN
from projunn.robust import certified_accuracy, lipschitz_bound
from test_reproduction import _benchmark_script

peers = _benchmark_script("lipschitz_peers")
SMALL = peers.Settings(channels=4, blocks=1, stages=2)
AVAILABLE = [m for m in peers.METHODS if peers.unavailable_reason(m) is None]
PROJUNN = ("projunn-t", "projunn-d", "projunn-t-k16", "cayley")


@pytest.mark.parametrize("method", AVAILABLE)
def test_every_skeleton_maps_images_to_ten_logits(method):
    torch.manual_seed(0)
    model = peers.build_model(method, SMALL)
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    assert len(peers.conv_layers(model)) == SMALL.blocks * SMALL.stages


def test_the_projunn_skeleton_is_the_library_model():
    ours = peers.build_model("projunn-t", SMALL).state_dict()
    library = LipschitzCNN(channels=4, blocks=1, stages=2, init="identity").state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in library.items()}


@pytest.mark.parametrize("method", PROJUNN)
def test_the_unitary_networks_are_one_lipschitz(method):
    torch.manual_seed(0)
    assert lipschitz_bound(peers.build_model(method, SMALL)) == pytest.approx(1.0, abs=1e-5)


def test_the_spectra_bound_the_network_exactly_and_see_a_conv_that_left_the_group():
    torch.manual_seed(0)
    model = peers.build_model("projunn-t", SMALL)
    image = torch.zeros(1, 1, 28, 28)
    values = peers.spectra(model, image)
    assert len(values) == len(peers.conv_layers(model)) + 1  # each conv, then the head
    assert max((v - 1).abs().max().item() for v in values) < 1e-5
    conv = peers.conv_layers(model)[1]
    with torch.no_grad():  # one frequency's matrix stretched by 3: invisible to most random inputs
        conv.weight_free[0, 0].mul_(3)
    stretched = peers.spectra(model, image)[1]
    assert stretched.max().item() == pytest.approx(3, rel=1e-5)
    assert (stretched - 1).abs().max().item() == pytest.approx(2, rel=1e-5)


def test_a_summary_certifies_with_the_network_bound_not_with_one(monkeypatch):
    settings = peers.Settings(channels=4, blocks=1, data="synthetic", limit_train=32)
    data = peers.load_data(settings)
    torch.manual_seed(0)
    model = peers.build_model("projunn-t", settings)
    conv = peers.conv_layers(model)[0]
    with torch.no_grad():
        conv.weight_free.mul_(2)
        conv.weight_self.mul_(2)
    constants, scores = [], peers._scores

    def recorded(logits, y, lipschitz):
        constants.append(lipschitz)
        return scores(logits, y, lipschitz)

    monkeypatch.setattr(peers, "_scores", recorded)
    summary = peers.summarise("projunn-t", settings, model, data, rows=[])
    assert summary["lipschitz_bound"] == pytest.approx(2, rel=1e-5)
    assert summary["bound"] == peers.BOUND and summary["norm_deviation_max"] == pytest.approx(1, rel=1e-5)
    assert constants == [summary["lipschitz_bound"], 1.0]  # the test figures, then those at the package's claim
    assert set(summary["attack_at_lipschitz_1"]) == {"images", "attacked", "broken_inside_radius"}  # bound > 1
    logits = peers._logits(model, data.test[0])
    certified = certified_accuracy(logits, data.test[1], peers.RADII, summary["lipschitz_bound"])
    assert summary["test_certified"] == {f"{r:g}": certified[r] for r in peers.RADII}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on one thread: torch's thread pool costs more than it gains at this size, and far
    more on a machine whose cores are busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _weights(folder):
    return torch.load(folder / "checkpoint.pt", weights_only=True)["model"]


def test_a_resumed_run_ends_on_the_weights_of_an_uninterrupted_one(tmp_path):
    """6 steps (2 epochs of 3 batches): uninterrupted, and in sittings of 2 steps (a stop inside an
    epoch), 1 step (a stop just after an epoch's end) and the rest; bit-equal for every method."""
    argv = ["--data", "synthetic", "--limit-train", "48", "--batch-size", "16", "--epochs", "2"]
    argv += ["--channels", "4", "--blocks", "1", "--methods", *AVAILABLE]
    assert peers.main([*argv, "--out-root", str(tmp_path / "whole")]) == 0
    parts = [*argv, "--out-root", str(tmp_path / "parts")]
    assert peers.main([*parts, "--max-steps", "2"]) == 0
    assert peers.main([*parts, "--max-steps", "1", "--resume"]) == 0
    assert not (tmp_path / "parts" / AVAILABLE[0] / "summary.json").exists()
    assert len((tmp_path / "parts" / AVAILABLE[0] / "metrics.csv").read_text().splitlines()) == 2
    assert peers.main([*parts, "--resume"]) == 0
    for method in AVAILABLE:
        whole, parts_ = _weights(tmp_path / "whole" / method), _weights(tmp_path / "parts" / method)
        for key, value in whole.items():
            assert torch.equal(value, parts_[key]), (method, key)
        summary = json.loads((tmp_path / "parts" / method / "summary.json").read_text())
        assert summary["epochs"] == 2 and set(summary["test_certified"]) == {"0.5", "1", "1.58"}
        assert summary["attack"]["broken_inside_radius"] == 0 and summary["attack"]["images"] == 12
        assert ("attack_at_lipschitz_1" in summary) == (summary["lipschitz_bound"] > 1 + peers.LOOSE_BOUND)
    table = (tmp_path / "parts" / "results.md").read_text()
    assert all(f"| {method} |" in table for method in AVAILABLE)
    assert peers.main(["--table-only", "--out-root", str(tmp_path / "parts")]) == 0
    assert (tmp_path / "parts" / "results.md").read_text() == table
    # A summary written before certificates used the exact bound is recomputed from the checkpoint.
    path = tmp_path / "parts" / AVAILABLE[0] / "summary.json"
    summary = json.loads(path.read_text())
    path.write_text(json.dumps({k: v for k, v in summary.items() if k != "bound"}))
    assert peers.main([*parts, "--resume", "--methods", AVAILABLE[0]]) == 0
    assert json.loads(path.read_text()) == summary


def test_a_signal_ends_the_sitting_after_the_current_step(tmp_path):
    settings = peers.Settings(channels=4, blocks=1, batch_size=8, data="synthetic", limit_train=32)
    data = peers.load_data(settings)
    assert peers.train_method("projunn-t", settings, data, tmp_path, stop=lambda: True, log=lambda line: None) is None
    position = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["position"]
    assert (position["epoch"], position["step"]) == (0, 1)


def test_a_run_refuses_to_resume_with_other_settings(tmp_path, capsys):
    argv = ["--data", "synthetic", "--limit-train", "16", "--batch-size", "8", "--channels", "4", "--blocks", "1"]
    argv += ["--methods", "projunn-t", "--out-root", str(tmp_path), "--max-steps", "1"]
    assert peers.main(argv) == 0
    assert peers.main([*argv, "--resume", "--lr", "0.5"]) == 2
    assert "lr: 0.5 (the run has 0.001)" in capsys.readouterr().err


def test_the_side_by_side_step_times_join_the_table(tmp_path):
    argv = ["--data", "synthetic", "--limit-train", "32", "--batch-size", "16", "--epochs", "1"]
    argv += ["--channels", "4", "--blocks", "1", "--methods", "projunn-t", "cayley", "--out-root", str(tmp_path)]
    assert peers.main([*argv, "--time-steps", "1"]) == 0
    path = tmp_path / "step-times.json"
    timing = json.loads(path.read_text())
    assert set(timing["seconds_per_step"]) == {"projunn-t", "cayley"} and timing["steps_per_epoch"] == 2
    assert all(seconds > 0 for seconds in timing["seconds_per_step"].values())
    assert not (tmp_path / "projunn-t").exists()  # timing trains no run
    assert peers.main(argv) == 0

    def cells(method: str) -> list[str]:
        row = next(
            line for line in (tmp_path / "results.md").read_text().splitlines() if line.startswith(f"| {method} |")
        )
        return [cell.strip() for cell in row.strip("|").split("|")]

    timing["seconds_per_step"] = {"projunn-t": 1.25, "cayley": 3.5}  # distinctive: 2.5 and 7.0 s per epoch
    path.write_text(json.dumps(timing))
    assert peers.main(["--table-only", "--out-root", str(tmp_path)]) == 0
    assert cells("projunn-t")[4] == "2.5" and cells("cayley")[4] == "7.0"
    timing["settings"]["channels"] = 8  # timed with other settings than the runs': not joined
    path.write_text(json.dumps(timing))
    assert peers.main(["--table-only", "--out-root", str(tmp_path)]) == 0
    assert cells("projunn-t")[4] == "-"


def test_time_steps_takes_a_positive_count(capsys):
    with pytest.raises(SystemExit):
        peers.main(["--time-steps", "0"])
    assert "expected a positive integer" in capsys.readouterr().err


def test_a_summary_written_before_the_exact_bound_and_the_attack_gets_them_on_resume(tmp_path):
    argv = ["--data", "synthetic", "--limit-train", "32", "--batch-size", "16", "--epochs", "1", "--channels", "4"]
    argv += ["--blocks", "1", "--methods", "projunn-t", "--out-root", str(tmp_path)]
    assert peers.main(argv) == 0
    path = tmp_path / "projunn-t" / "summary.json"
    summary = json.loads(path.read_text())
    old = {k: v for k, v in summary.items() if k not in ("attack", "bound", "test_certified_at_lipschitz_1")}
    path.write_text(json.dumps(old | {"lipschitz_bound": None}))  # as such summaries were written
    assert peers.main(["--table-only", "--out-root", str(tmp_path)]) == 0
    table = (tmp_path / "results.md").read_text()
    assert "| - | 0." in table and "not yet its exact bound" in table  # no bound, no check yet
    assert peers.main([*argv, "--resume"]) == 0
    assert json.loads(path.read_text()) == summary  # the same final weights, the same seeded attack
    assert f"| 0 / {summary['attack']['attacked']} |" in (tmp_path / "results.md").read_text()


def test_the_rank_16_method_steps_each_convolution_at_rank_16_capped_by_its_channels():
    model = peers.build_model("projunn-t-k16", SMALL)  # 4 channels, then 16
    optimizer = peers.build_optimizer("projunn-t-k16", model, SMALL)
    ranks = [group.get("rank") for group in optimizer.param_groups if group.get("unitary")]
    assert ranks == [4, 16, None]  # the two stages' convolutions, then the head at --rank
