"""The library on every available device (``device`` fixture: the CPU, and CUDA when torch sees a GPU).

Each test computes on the device and compares with a float64/complex128 reference on the CPU, or
with the same computation on the CPU, to a stated tolerance (kernels differ between devices, so
never bit for bit). ``pytest -m device`` runs just these; on a machine with a GPU they are the
GPU check (see benchmarks/gpu_check.sh).
"""

from __future__ import annotations

import pytest
import torch

from conftest import haar, polar_reference, randn, tangent_reference
from projunn.functional import lowrank, projunn_d, projunn_t, unitarity_error
from projunn.harness.cli import main
from projunn.models import LipschitzCNN, SequenceModel
from projunn.nn import UnitaryConv2d, UnitaryLinear, eunn
from projunn.optim import ProjUNN, param_groups
from projunn.robust import lipschitz_bound

PRECISE = [torch.float64, torch.complex128]


@pytest.mark.parametrize("dtype", PRECISE)
def test_updates_match_dense_references(device, dtype):
    U, a, b = haar(32, batch=(3,), dtype=dtype), randn(3, 32, 2, dtype=dtype, scale=0.1), randn(3, 32, 2, dtype=dtype)
    on = lambda *xs: [x.to(device) for x in xs]  # noqa: E731
    torch.testing.assert_close(projunn_t(*on(U, a, b)).cpu(), tangent_reference(U, a, b), atol=1e-10, rtol=0)
    torch.testing.assert_close(projunn_d(*on(U, a, b)).cpu(), polar_reference(U + a @ b.mH), atol=1e-10, rtol=0)


@pytest.mark.parametrize("sketch", ["lsi", "column", "rsvd", "exact"])
def test_sketches_give_rank_k_factors_on_the_device(device, sketch):
    D = randn(40, 24, dtype=torch.float64).to(device)
    generator = torch.Generator(device=device).manual_seed(0)
    a, b = lowrank(D, 3, sketch, generator=generator)
    assert a.device.type == device.type and a.shape == (40, 3) and b.shape == (24, 3)
    if sketch == "exact":  # the best rank-3 approximation: the truncated SVD
        X, s, Yh = torch.linalg.svd(D.cpu(), full_matrices=False)
        torch.testing.assert_close((a @ b.mH).cpu(), X[:, :3] * s[:3] @ Yh[:3], atol=1e-10, rtol=0)


@pytest.mark.parametrize("method", ["t", "d"])
def test_a_layer_trained_on_the_device_stays_orthogonal_and_follows_the_cpu(device, method):
    """50 Adam + projUNN steps in float64 on the device and on the CPU: the same weights to 1e-8."""

    def trained(where: torch.device) -> torch.Tensor:
        torch.manual_seed(0)
        layer = UnitaryLinear(16, dtype=torch.float64).to(where)
        optimizer = ProjUNN(torch.optim.Adam(param_groups(layer, unitary_lr=1e-2), lr=1e-2), method=method, rank=2)
        target = haar(16, seed=3).to(where)
        for step in range(50):
            x = randn(8, 16, dtype=torch.float64, seed=step).to(where)
            ((layer(x) - x @ target.T) ** 2).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
        return layer.weight.detach().cpu()

    weight = trained(device)
    assert unitarity_error(weight) < 1e-12
    torch.testing.assert_close(weight, trained(torch.device("cpu")), atol=1e-8, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_orthogonal_convolution_keeps_norms_and_exports_on_the_device(device, dtype):
    conv = UnitaryConv2d(4, (6, 5), init="haar", bias=False, dtype=dtype).to(device)
    x = torch.randn(2, 4, 6, 5, dtype=dtype, device=device)
    y = conv(x)
    torch.testing.assert_close(y.flatten(1).norm(dim=1), x.flatten(1).norm(dim=1), atol=1e-12, rtol=0)
    torch.testing.assert_close(conv.to_conv2d()(x), y, atol=1e-12, rtol=0)


@pytest.mark.parametrize("complex_state", [False, True])
def test_unitary_rnn_on_the_device_equals_the_cpu(device, complex_state):
    """The fused recurrence forward and backward, float64, against the same model on the CPU."""
    torch.manual_seed(0)
    model = SequenceModel(3, 12, 5, dtype=torch.complex128 if complex_state else torch.float64)
    x = torch.randn(4, 20, 3, dtype=torch.float64)

    def run(where: torch.device):
        moved = model.to(where)
        out = moved(x.to(where))
        out.square().sum().backward()
        grads = [p.grad.detach().cpu().clone() for p in moved.parameters()]
        moved.zero_grad()
        return out.detach().cpu(), grads

    (out, grads), (out_cpu, grads_cpu) = run(device), run(torch.device("cpu"))
    torch.testing.assert_close(out, out_cpu, atol=1e-10, rtol=0)
    for g, g_cpu in zip(grads, grads_cpu):
        torch.testing.assert_close(g, g_cpu, atol=1e-9, rtol=0)


def test_eunn_and_the_lipschitz_classifier_on_the_device(device):
    layer = eunn(UnitaryLinear(10, dtype=torch.float64), capacity=None).to(device)
    with torch.no_grad():
        layer.parametrizations.weight.original.add_(0.3)  # any angles: still orthogonal
    assert layer.weight.device.type == device.type and unitarity_error(layer.weight.detach().cpu()) < 1e-12
    model = LipschitzCNN(channels=2, size=(8, 8), blocks=1, dtype=torch.float64).to(device)
    assert model(torch.randn(3, 1, 8, 8, dtype=torch.float64, device=device)).shape == (3, 10)
    assert abs(lipschitz_bound(model) - 1) < 1e-12


def test_autocast_on_the_device_leaves_the_unitary_step_in_full_precision(device):
    """The step under autocast (bfloat16 on the CPU, float16 on CUDA) equals the one outside, bit for bit
    (the same operations on the same device, in the same order)."""
    low = torch.float16 if device.type == "cuda" else torch.bfloat16

    def stepped(autocast: bool) -> torch.Tensor:
        torch.manual_seed(0)
        layer = UnitaryLinear(8).to(device)
        optimizer = ProjUNN(torch.optim.SGD(param_groups(layer, unitary_lr=0.1), lr=0.1), method="t")
        layer(torch.randn(4, 8, device=device)).sum().backward()
        with torch.autocast(device.type, dtype=low, enabled=autocast):
            optimizer.step()
        return layer.weight.detach().cpu()

    assert torch.equal(stepped(True), stepped(False))


def test_a_training_run_on_the_device(device, tmp_path):
    argv = ["train", "copy", "--seq-len", "5", "--hidden", "8", "--batch-size", "4", "--steps", "3"]
    argv += ["--eval-every", "3", "--quiet", "--device", device.type, "--out", str(tmp_path / "run")]
    assert main(argv) == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the audit runs for real")
def test_the_gpu_audit_says_in_one_line_that_it_needs_a_gpu(capsys):
    from test_reproduction import _benchmark_script

    assert _benchmark_script("gpu_audit").main([]) == 1
    assert capsys.readouterr().err == "gpu_audit: no CUDA device: this audit needs a GPU\n"
