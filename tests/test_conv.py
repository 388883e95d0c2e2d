"""Fourier-domain orthogonal/unitary convolutions against spatial references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from projunn.functional import lowrank, projunn_t
from projunn.models import DeepUnitaryCNN, UnitaryResNet9
from projunn.nn import UnitaryConv2d
from projunn.nn._conv import frequency_layout
from projunn.optim import ProjUNN, param_groups

SIZES = [(8, 6), (5, 7), (4, 4), (1, 3), (6, 1)]


def _roll_reference(kernel: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """y[o](p) = sum_i sum_q k[o, i](q) x[i](p - q), the definition of circular convolution."""
    _, _, n, m = kernel.shape
    y = torch.zeros(x.shape[0], kernel.shape[0], n, m, dtype=torch.promote_types(x.dtype, kernel.dtype))
    for q1 in range(n):
        for q2 in range(m):
            shifted = torch.roll(x, shifts=(q1, q2), dims=(-2, -1))
            y = y + torch.einsum("oi,biuv->bouv", kernel[:, :, q1, q2], shifted)
    return y


@pytest.mark.parametrize("size", SIZES)
def test_real_layer_is_the_circular_convolution_of_its_real_kernel(size):
    torch.manual_seed(0)
    n, m = size
    conv = UnitaryConv2d(3, size, init="haar", dtype=torch.float64)
    kernel = conv.spatial_kernel()
    assert not kernel.is_complex() and kernel.shape == (3, 3, n, m)
    x = torch.randn(2, 3, n, m, dtype=torch.float64)
    y = conv(x)
    assert not y.is_complex()
    # F.conv2d computes a cross-correlation: flip the kernel, pad circularly by (size - 1) before.
    padded = F.pad(x, (m - 1, 0, n - 1, 0), mode="circular")
    torch.testing.assert_close(y, F.conv2d(padded, kernel.flip(-2, -1)), atol=1e-12, rtol=0)
    torch.testing.assert_close(y, _roll_reference(kernel, x), atol=1e-12, rtol=0)


def test_complex_layer_is_the_circular_convolution_of_its_kernel():
    torch.manual_seed(0)
    conv = UnitaryConv2d(2, (4, 5), init="haar", dtype=torch.complex128)
    x = torch.randn(3, 2, 4, 5, dtype=torch.complex128)
    torch.testing.assert_close(conv(x), _roll_reference(conv.spatial_kernel(), x), atol=1e-12, rtol=0)


def _train(conv, steps, dtype, method="t"):
    torch.manual_seed(1)
    opt = ProjUNN(torch.optim.Adam(param_groups(conv), lr=0.05), method=method, rank=1, seed=0)
    n, m = conv.size
    target = torch.randn(4, conv.channels, n, m, dtype=dtype)
    for _ in range(steps):
        x = torch.randn(4, conv.channels, n, m, dtype=dtype)
        loss = (conv(x) - target).abs().square().mean() + (conv(x) * x).real.mean()
        loss.backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
@pytest.mark.parametrize("method", ["t", "d"])
def test_norm_preserved_to_1e_10_after_100_steps(dtype, method):
    conv = UnitaryConv2d(3, (6, 5), init="haar", dtype=dtype)
    before = conv.spatial_kernel().clone()
    _train(conv, 100, dtype, method)
    assert not torch.allclose(conv.spatial_kernel(), before)  # it trained
    x = torch.randn(50, 3, 6, 5, dtype=dtype)
    norms_in = torch.linalg.vector_norm(x.flatten(1), dim=1)
    norms_out = torch.linalg.vector_norm(conv(x).flatten(1), dim=1)
    torch.testing.assert_close(norms_out, norms_in, atol=1e-10, rtol=0)
    assert conv.spatial_kernel().is_complex() == dtype.is_complex


@pytest.mark.parametrize("size", SIZES)
def test_hermitian_pairing_invariant(size):
    """Note [Hermitian pairing]: W(-f) = conj W(f) over the full spectrum; self-mirrored W real orthogonal."""
    n, m = size
    conv = UnitaryConv2d(2, size, init="haar", dtype=torch.float64)
    _train(conv, 5, torch.float64)
    full = torch.fft.fft2(conv.spatial_kernel()).permute(2, 3, 0, 1)  # (n, m, C, C)
    mirrored = full[(-torch.arange(n)) % n][:, (-torch.arange(m)) % m]
    torch.testing.assert_close(mirrored, full.conj(), atol=1e-12, rtol=0)
    free, self_mirrored, mirror, _ = frequency_layout(n, m)
    assert len(free) + len(self_mirrored) + len(mirror) == n * (m // 2 + 1)
    assert 2 * len(free) + len(self_mirrored) == n * m  # every frequency counted once
    eye = torch.eye(2, dtype=torch.complex128)
    torch.testing.assert_close(full.mH @ full, eye.expand_as(full), atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_spatial_kernel_round_trip(dtype):
    conv = UnitaryConv2d(3, (6, 4), init="haar", dtype=dtype)
    copy = UnitaryConv2d.from_spatial_kernel(conv.spatial_kernel())  # the kernel's dtype is the layer's
    assert copy.complex == dtype.is_complex
    x = torch.randn(2, 3, 6, 4, dtype=dtype)
    torch.testing.assert_close(copy(x), conv(x), atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="not unitary"):
        UnitaryConv2d.from_spatial_kernel(torch.randn(3, 3, 6, 4, dtype=torch.float64))


def test_a_real_kernel_makes_a_complex_layer_with_a_complex_dtype():
    real = UnitaryConv2d(3, (6, 4), init="haar", dtype=torch.float64)
    layer = UnitaryConv2d.from_spatial_kernel(real.spatial_kernel(), dtype=torch.complex128)
    assert layer.complex and layer.weight_free.dtype == torch.complex128
    x = torch.randn(2, 3, 6, 4, dtype=torch.float64)
    torch.testing.assert_close(layer(x.to(torch.complex128)), real(x).to(torch.complex128), atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="a real layer .* needs a real kernel, got dtype torch.complex128"):
        UnitaryConv2d.from_spatial_kernel(layer.spatial_kernel(), dtype=torch.float64)


def test_a_complex_dtype_is_the_one_way_to_ask_for_a_unitary_layer():
    """The ``complex=`` flag of the unreleased 0.1.0 is gone: passing it is a TypeError naming it."""
    with pytest.raises(TypeError, match="'complex'"):
        UnitaryConv2d(2, (4, 3), complex=True)
    kernel = UnitaryConv2d(2, (4, 3), dtype=torch.float64).spatial_kernel()
    with pytest.raises(TypeError, match="'complex'"):
        UnitaryConv2d.from_spatial_kernel(kernel, complex=True)


@pytest.mark.parametrize(
    "build",
    [
        lambda **f: UnitaryConv2d(2, (4, 3), init="haar", **f),
        lambda **f: DeepUnitaryCNN(2, channels=2, size=(4, 4), init="haar", **f),
        lambda **f: UnitaryResNet9(width=2, size=(4, 4), in_channels=1, init="haar", **f),
    ],
    ids=["UnitaryConv2d", "DeepUnitaryCNN", "UnitaryResNet9"],
)
def test_convolutional_layers_and_models_take_device_and_dtype(build):
    model = build(dtype=torch.float64, device="meta")
    tensors = [*model.parameters(), *model.buffers()]
    assert tensors and all(t.device.type == "meta" for t in tensors)
    floating = [t for t in tensors if t.is_floating_point()]
    assert floating and all(t.dtype == torch.float64 for t in floating)
    assert all(t.dtype == torch.complex128 for t in tensors if t.is_complex())


def test_identity_init_is_the_identity_map():
    conv = UnitaryConv2d(4, (5, 6), dtype=torch.float64)
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64)
    torch.testing.assert_close(conv(x), x, atol=1e-14, rtol=0)


def test_batched_update_over_frequencies_equals_per_frequency_updates():
    torch.manual_seed(0)
    conv = UnitaryConv2d(3, (4, 4), init="haar", dtype=torch.float64)
    W = conv.weight_free.detach().clone()
    D = 0.01 * torch.randn_like(W)
    a, b = lowrank(D, 1, "exact")
    batched = projunn_t(W, a, b)
    for f in range(W.shape[0]):
        torch.testing.assert_close(batched[f], projunn_t(W[f], a[f], b[f]), atol=1e-14, rtol=0)


def test_wrong_inputs_are_refused():
    conv = UnitaryConv2d(3, (8, 8))
    with pytest.raises(ValueError, match=r"expected input of shape \(batch, 3, 8, 8\) fixed at construction"):
        conv(torch.randn(2, 3, 16, 16))
    with pytest.raises(ValueError, match="expected input of shape"):
        conv(torch.randn(2, 4, 8, 8))
    with pytest.raises(TypeError, match="real layer expects real input"):
        conv(torch.randn(2, 3, 8, 8, dtype=torch.complex64))
    with pytest.raises(TypeError, match="input has dtype torch.float64 but the layer holds torch.float32"):
        conv(torch.randn(2, 3, 8, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"size must be 2 ints >= 1, got 1 values \(8,\)"):
        UnitaryConv2d(3, (8,))
    with pytest.raises(TypeError, match="size must be a tuple of 2 ints >= 1, got int 8"):
        UnitaryConv2d(3, 8)
    with pytest.raises(TypeError, match=r"size\[1\] must be an int >= 1, got float 8.0"):
        UnitaryConv2d(3, (8, 8.0))
    with pytest.raises(ValueError, match=r"size\[0\] must be >= 1, got 0"):
        UnitaryConv2d(3, (0, 8))
    with pytest.raises(ValueError, match="channels must be >= 1, got 0"):
        UnitaryConv2d(0, (8, 8))
    with pytest.raises(ValueError, match="init must be one of 'identity', 'haar'; got 'henaff'"):
        UnitaryConv2d(3, (8, 8), init="henaff")
    with pytest.raises(TypeError, match="dtype must be one of float32, .*, complex128; got torch.float16"):
        UnitaryConv2d(3, (8, 8), dtype=torch.half)
    with pytest.raises(TypeError, match="dtype must be one of float32, float64; got torch.complex64"):
        DeepUnitaryCNN(2, channels=2, size=(4, 4), dtype=torch.complex64)
    assert "3, size=(8, 8), orthogonal" in repr(conv)


def test_tiny_images_with_no_free_frequency_train():
    """2 x 2 images: every frequency is self-mirrored, the complex batch is empty."""
    conv = UnitaryConv2d(2, (2, 2), init="haar", dtype=torch.float64)
    assert conv.weight_free.shape == (0, 2, 2) and conv.weight_self.shape == (4, 2, 2)
    _train(conv, 3, torch.float64)
    x = torch.randn(3, 2, 2, 2, dtype=torch.float64)
    torch.testing.assert_close(conv(x).norm(), x.norm())
