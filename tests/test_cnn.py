"""Norm-preserving shape changes, the deep orthogonal CNN, and the image tasks."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

from harness_runs import quick_runs  # noqa: F401  (fixture)
from projunn.harness.cli import main
from projunn.harness.datasets import load_cifar10
from projunn.harness.tasks import DatasetMissingError
from projunn.models import DeepUnitaryCNN, UnitaryResNet9
from projunn.nn import ChannelPad, SpaceToDepth, UnitaryConv2d
from test_train import tiny_mnist  # noqa: F401  (fixture)

TINY = ["--batch-size", "4", "--steps", "2", "--eval-every", "1", "--quiet"]


def test_channel_pad_and_space_to_depth_preserve_norms():
    x = torch.randn(3, 2, 6, 4, dtype=torch.float64)
    padded = ChannelPad(2, 5)(x)
    assert padded.shape == (3, 5, 6, 4)
    torch.testing.assert_close(padded.norm(), x.norm())
    moved = SpaceToDepth(2)(x)
    assert moved.shape == (3, 8, 3, 2)
    torch.testing.assert_close(moved.norm(), x.norm())
    torch.testing.assert_close(torch.nn.functional.pixel_shuffle(moved, 2), x)  # invertible
    with pytest.raises(ValueError, match="not an isometry"):
        ChannelPad(5, 2)
    with pytest.raises(ValueError, match="not divisible by factor 4"):
        SpaceToDepth(4)(x)
    with pytest.raises(ValueError, match="expected 3 channels"):
        ChannelPad(3, 4)(x)


def test_deep_cnn_is_norm_preserving_before_batchnorm():
    model = DeepUnitaryCNN(3, channels=4, size=(8, 8), in_channels=2, init="haar", dtype=torch.float64)
    x = torch.randn(5, 2, 8, 8, dtype=torch.float64)
    conv, batchnorm, _ = model.blocks[0]
    assert isinstance(conv, UnitaryConv2d) and isinstance(batchnorm, torch.nn.BatchNorm2d)
    h = conv(model.stem(x))
    torch.testing.assert_close(h.flatten(1).norm(dim=1), x.flatten(1).norm(dim=1))
    assert model(x).shape == (5, 10)


def test_mnist_image_task_runs(tmp_path, tiny_mnist):  # noqa: F811
    out = tmp_path / "run"
    argv = ["train", "mnist", *TINY, "--depth", "2", "--channels", "4", "--data-dir", str(tiny_mnist)]
    argv += ["--eval-limit", "7"]
    assert main([*argv, "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["max_unitarity_error"] < 1e-5 and summary["accuracy"] == summary["test_accuracy"]
    # --eval-limit 7: a whole number of the first 7 test (and training) images right.
    for key in ("test_accuracy", "train_accuracy"):
        assert summary[key] * 7 == pytest.approx(round(summary[key] * 7)), key
    assert summary["depth"] == 2


@pytest.mark.parametrize(
    ("size", "sizes", "channels"),
    [
        ((8, 8), [8, 4, 4, 4, 2, 1, 1, 1], [2, 8, 8, 8, 32, 128, 128, 128]),
        ((6, 6), [6, 3, 3, 3, 3, 3, 3, 3], [2, 8, 8, 8, 8, 8, 8, 8]),  # 3 is odd: no further stride
    ],
)
def test_resnet9_strides_by_isometric_space_to_depth(size, sizes, channels):
    model = UnitaryResNet9(width=2, size=size, in_channels=1, init="haar", dtype=torch.float64)
    convs = [m for m in model.modules() if isinstance(m, UnitaryConv2d)]
    assert [c.size[0] for c in convs] == sizes and [c.channels for c in convs] == channels
    assert model.features == channels[-1]
    strides = sum(isinstance(m, SpaceToDepth) for m in model.modules())
    x = torch.randn(3, 1, *size, dtype=torch.float64)
    assert model(x).shape == (3, 10)
    # The path stem -> first stride -> first stage conv keeps every input's norm.
    h = model.stem[1][0](model.stem[0](x))
    h = model.stages[0][1][0](model.stages[0][0](h)) if strides else h
    torch.testing.assert_close(h.flatten(1).norm(dim=1), x.flatten(1).norm(dim=1))


def test_resnet9_rejects_inputs_wider_than_the_stem():
    with pytest.raises(ValueError, match="in_channels \\(3\\) must be <= width \\(2\\)"):
        UnitaryResNet9(width=2, in_channels=3)


def test_resnet9_image_task_runs_and_stays_orthogonal(tmp_path, tiny_mnist):  # noqa: F811
    out = tmp_path / "run"
    argv = ["train", "mnist", *TINY, "--model", "resnet9", "--channels", "2", "--data-dir", str(tiny_mnist)]
    assert main([*argv, "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert summary["model"] == "resnet9" and config["depth"] is None and config["channels"] == 2
    assert summary["max_unitarity_error"] < 1e-5


def test_cayley_in_fourier_baseline_keeps_the_convs_orthogonal(tmp_path, tiny_mnist):  # noqa: F811
    out = tmp_path / "run"
    argv = ["train", "mnist", *TINY, "--method", "cayley", "--depth", "2", "--channels", "3"]
    assert main([*argv, "--data-dir", str(tiny_mnist), "--out", str(out)]) == 0
    assert json.loads((out / "summary.json").read_text())["max_unitarity_error"] < 1e-5


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "resnet9", "--depth", "4"], "--depth does not apply to --model resnet9"),
        (["--model", "resnet9", "--channels", "4"], None),
    ],
)
def test_model_options(tmp_path, argv, message):
    from projunn.harness.train import RunError, TrainConfig, resolve

    config = TrainConfig(task="mnist", model=argv[1], depth=4 if "--depth" in argv else None, channels=4)
    if message is None:
        resolved = resolve(config)
        assert resolved.depth is None and resolved.channels == 4
        assert resolve(TrainConfig(task="mnist")).depth == 8
        assert resolve(TrainConfig(task="mnist", model="resnet9", preset="paper")).depth is None
    else:
        with pytest.raises(RunError, match=message):
            resolve(config)


def test_lipschitz_model_trains_on_the_image_task_and_reports_certified_accuracy(tmp_path, tiny_mnist):  # noqa: F811
    out = tmp_path / "run"
    argv = ["train", "mnist", *TINY, "--model", "lipschitz", "--channels", "2", "--depth", "1"]
    assert main([*argv, "--data-dir", str(tiny_mnist), "--eval-limit", "9", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    config = json.loads((out / "config.json").read_text())
    # The model's defaults: the lr for every weight, the offset aimed at MNIST's largest radius.
    assert config["unitary_lr"] == config["lr"] and config["margin"] == 1.58 and config["temperature"] == 0.25
    assert abs(summary["test_lipschitz_bound"] - 1) < 1e-5  # composed from the trained weights
    certified = summary["test_certified_accuracy"]
    assert list(certified) == ["0.5", "1", "1.58"]
    # Certified at a radius implies right, and certified at a larger radius implies certified at a smaller.
    assert summary["test_accuracy"] >= certified["0.5"] >= certified["1"] >= certified["1.58"] >= 0
    assert all(value * 9 == pytest.approx(round(value * 9)) for value in certified.values())  # of the 9 images
    # The run folder certified again: the same figures from the checkpoint, and no attack inside a radius.
    assert main(["certify", str(out), "--attack", "9", "--data-dir", str(tiny_mnist)]) in (0, 1)
    again = json.loads((out / "certify.json").read_text())
    assert again["test_certified_accuracy"] == certified and again["step"] == summary["steps"]
    # Attacked: the images with a positive radius (clear of rounding), i.e. those classified right.
    assert again["broken_inside_radius"] == 0 and again["attacked"] == round(9 * again["test_accuracy"])


def test_certify_refuses_what_has_no_radii(tmp_path, tiny_mnist, capsys):  # noqa: F811
    out = tmp_path / "cnn"
    argv = ["train", "mnist", *TINY, "--depth", "1", "--channels", "2", "--data-dir", str(tiny_mnist)]
    assert main([*argv, "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["certify", str(out)]) == 2
    assert "trains --model cnn; only --model lipschitz runs have radii" in capsys.readouterr().err
    assert main(["certify", str(tmp_path / "nothing")]) == 2
    assert "no checkpoint.pt in" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(margin=0.5), "--margin does not apply to --model cnn"),
        (dict(model="resnet9", temperature=0.1), "--temperature does not apply to --model resnet9"),
        (dict(model="lipschitz", preset="paper"), "--preset paper has no --model lipschitz"),
        (dict(task="pmnist", margin=0.5), "--margin does not apply to the pmnist task"),
    ],
)
def test_lipschitz_options_are_refused_where_they_mean_nothing(settings, message):
    from projunn.harness.train import RunError, TrainConfig, resolve

    with pytest.raises(RunError, match=message):
        resolve(TrainConfig(**{"task": "mnist", **settings}))
    assert resolve(TrainConfig(task="fashion-mnist", model="lipschitz", margin=0.5)).margin == 0.5


def _write_cifar(folder, rng):
    folder.mkdir()
    for name, count in [*((f"data_batch_{i}", 12) for i in range(1, 6)), ("test_batch", 10)]:
        batch = {
            b"data": rng.integers(0, 256, (count, 3072)).astype(np.uint8),
            b"labels": rng.integers(0, 10, count).tolist(),
        }
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))


def test_cifar10_from_python_batches(tmp_path):
    _write_cifar(tmp_path / "cifar-10-batches-py", np.random.default_rng(0))
    data = load_cifar10(tmp_path)  # the parent folder works too
    assert data.train_images.shape == (60, 3, 32, 32) and data.test_labels.shape == (10,)
    out = tmp_path / "run"
    argv = ["train", "cifar10", *TINY, "--depth", "1", "--channels", "4", "--data-dir", str(tmp_path)]
    assert main([*argv, "--out", str(out)]) == 0
    with pytest.raises(DatasetMissingError, match="CIFAR-10 is not bundled"):
        load_cifar10(None)
    with pytest.raises(DatasetMissingError, match="no CIFAR-10 batches"):
        load_cifar10(tmp_path / "run")


def test_missing_cifar_is_a_one_line_error(tmp_path, capsys):
    assert main(["train", "cifar10", *TINY, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "pass --data-dir" in err and err.count("\n") == 1


def test_a_lipschitz_run_reports_its_training_loss_on_held_out_data_and_names_it(tmp_path, tiny_mnist):  # noqa: F811
    """Train, held-out and baseline losses are one quantity (the offset cross-entropy), and the summary
    and curves.png say which; other models keep plain cross-entropy."""
    out = tmp_path / "run"
    argv = ["train", "mnist", *TINY, "--model", "lipschitz", "--channels", "2", "--depth", "1", "--margin", "0.5"]
    assert main([*argv, "--data-dir", str(tiny_mnist), "--eval-limit", "9", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["loss"] == "offset cross-entropy (margin 0.5)"
    cnn = tmp_path / "cnn"
    argv = ["train", "mnist", *TINY, "--depth", "1", "--channels", "2", "--data-dir", str(tiny_mnist)]
    assert main([*argv, "--eval-limit", "9", "--out", str(cnn)]) == 0
    plain = json.loads((cnn / "summary.json").read_text())
    assert plain["loss"] == "cross-entropy"
    # The class prior scored on the same 9 test images: under the offset loss, not plain cross-entropy.
    assert summary["test_baseline"] != pytest.approx(plain["test_baseline"], rel=1e-3)
