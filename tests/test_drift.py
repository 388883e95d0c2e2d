"""Drift control (Note [Drift control]) and low-precision compute with float32 unitary weights."""

from __future__ import annotations

import pytest
import torch

from conftest import haar
from harness_runs import small_held_out_sets  # noqa: F401  (fixture)
from projunn.functional import unitarity_error, unitary_init
from projunn.nn import UnitaryLinear
from projunn.optim import ProjUNN, param_groups
from projunn.optim._drift import CHECK_EVERY, DriftControl, default_tolerance


def _drifted(n: int, m: int, size: float, *, batch=(), dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    """A (semi-)unitary matrix plus a random perturbation of Frobenius norm ``size``."""
    W = unitary_init(
        max(n, m), "haar", batch_shape=batch, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)
    )
    W = W[..., :n, :m]
    noise = torch.randn(W.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
    return (W + size * noise / torch.linalg.matrix_norm(noise, keepdim=True)).to(dtype).contiguous()


@pytest.mark.parametrize("shape", [(64, 64), (96, 32), (32, 96)])
def test_estimate_tracks_the_exact_error(shape):
    control = DriftControl()
    ratios = []
    for seed in range(20):
        W = _drifted(*shape, 1e-4, dtype=torch.float64, seed=seed)
        ratios.append((control.estimate(W) / unitarity_error(W)).item())
    mean = sum(ratios) / len(ratios)
    assert 0.7 < mean < 1.3 and min(ratios) > 0.3 and max(ratios) < 2.0


@pytest.mark.parametrize("shape", [(64, 64), (96, 32), (32, 96)])
@pytest.mark.parametrize("size", [1e-4, 0.3])  # Newton-Schulz, and the exact projection for a far-off weight
def test_correction_brings_a_drifted_weight_back_to_the_floor(shape, size):
    W = _drifted(*shape, size, batch=(3,))
    control = DriftControl()
    assert control(W) == 1 and control.corrections == 1
    assert unitarity_error(W).max() < default_tolerance(W)
    before = W.clone()
    assert control(W) == 0  # at the floor now: left bit-for-bit alone
    assert torch.equal(W, before)


def test_a_fresh_weight_is_never_touched():
    W = haar(128, dtype=torch.float32)
    before = W.clone()
    assert DriftControl()(W) == 0 and torch.equal(W, before)


def test_one_call_checks_many_weights_and_corrects_only_the_drifted():
    drifted, fresh = _drifted(40, 24, 1e-4), haar(32, dtype=torch.float32)
    before = fresh.clone()
    control = DriftControl()
    assert control(fresh, drifted) == 1 and control.corrections == 1
    assert torch.equal(fresh, before) and unitarity_error(drifted) < default_tolerance(drifted)
    assert control() == 0


def test_bad_tolerance_is_refused():
    with pytest.raises(ValueError, match="drift_tolerance must be 'auto', None or a positive number"):
        ProjUNN(torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1), drift_tolerance=-1.0)


@pytest.mark.parametrize("tolerance", ["auto", None])
def test_the_optimiser_checks_every_few_steps(tolerance):
    weight = torch.nn.Parameter(_drifted(48, 48, 1e-3))
    optimizer = ProjUNN(torch.optim.SGD([{"params": [weight], "unitary": True}], lr=1e-3), drift_tolerance=tolerance)
    for _ in range(CHECK_EVERY):
        weight.grad = torch.randn(48, 48)
        optimizer.step()
    error = unitarity_error(weight.detach()).item()
    if tolerance is None:
        assert error > 5e-4  # the drift is still there
    else:
        assert error < default_tolerance(weight) and optimizer.drift_control.corrections == 1


def test_bfloat16_autocast_keeps_float32_unitary_weights_at_their_floor():
    """Compute in bfloat16 under autocast; the unitary weight (the master copy) stays float32 and exact."""
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(UnitaryLinear(64, generator=g), torch.nn.Tanh(), torch.nn.Linear(64, 8))
    target = torch.randn(64, 8, generator=g)
    optimizer = ProjUNN(torch.optim.Adam(param_groups(model, unitary_lr=1e-2), lr=1e-2), seed=0)
    losses = []
    for _ in range(300):
        x = torch.randn(32, 64, generator=g)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            output = model(x)
            assert output.dtype == torch.bfloat16
        loss = (output.float() - torch.tanh(x @ target)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    weight = model[0].weight
    assert weight.dtype == torch.float32
    assert unitarity_error(weight.detach()) < 5 * default_tolerance(weight)  # float32's floor, not bfloat16's 1e-2
    assert sum(losses[-20:]) < 0.7 * sum(losses[:20])


def test_half_precision_unitary_weights_are_refused_with_the_way_out():
    weight = torch.nn.Parameter(torch.eye(4, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="use torch.autocast for half-precision compute"):
        ProjUNN(torch.optim.SGD([{"params": [weight], "unitary": True}], lr=0.1))


@pytest.mark.usefixtures("small_held_out_sets")
def test_cli_autocast_run_keeps_the_recurrent_matrix_at_float32_precision(tmp_path):
    import json

    from projunn.harness.cli import main

    out = tmp_path / "run"
    argv = ["train", "copy", "--steps", "20", "--eval-every", "10", "--hidden", "32", "--seq-len", "10"]
    assert main([*argv, "--autocast", "bfloat16", "--quiet", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert config["autocast"] == "bfloat16" and summary["max_unitarity_error"] < 1e-5


@pytest.mark.parametrize(("flag", "expected"), [("auto", "auto"), ("off", None), ("1e-4", 1e-4)])
def test_the_command_line_sets_the_runs_drift_tolerance(flag, expected):
    from projunn.harness._build import build_optimizer
    from projunn.harness.cli import build_parser
    from projunn.harness.train import TrainConfig, resolve

    options = vars(build_parser().parse_args(["train", "unitary", "--drift-tolerance", flag]))
    config = resolve(TrainConfig(**{k: v for k, v in options.items() if k != "command"}))
    assert config.drift_tolerance == expected
    control = build_optimizer(torch.nn.Sequential(UnitaryLinear(4)), config).drift_control
    assert (control is None) if expected is None else (control.tolerance == expected)


def test_a_bad_drift_tolerance_is_a_one_line_error(capsys):
    from projunn.harness._build import build_optimizer
    from projunn.harness.cli import main
    from projunn.harness.train import TrainConfig, resolve

    for bad in ("0", "-1", "nan", "never"):
        with pytest.raises(SystemExit) as stop:
            main(["train", "unitary", "--steps", "1", "--drift-tolerance", bad])
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert stop.value.code == 2 and "expected auto, off or a positive finite number" in err, err
    config = resolve(TrainConfig(task="unitary", drift_tolerance=0))  # from Python: ProjUNN's own check
    with pytest.raises(ValueError, match="drift_tolerance must be 'auto', None or a positive number, got 0"):
        build_optimizer(torch.nn.Sequential(UnitaryLinear(4)), config)


def test_a_bad_setting_from_python_is_one_run_error_named_once(tmp_path):
    """train() turns ProjUNN's ValueError into a RunError (itself a ValueError) without naming the type twice,
    and leaves no run folder behind."""
    from projunn.harness.train import RunError, TrainConfig, train

    out = tmp_path / "run"
    with pytest.raises(RunError) as raised:
        train(TrainConfig(task="unitary", steps=1, drift_tolerance=0, out=str(out)), log=lambda message: None)
    assert str(raised.value) == "drift_tolerance must be 'auto', None or a positive number, got 0"
    assert not out.exists()
