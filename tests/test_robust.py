"""Certified robustness: MaxMin, the Lipschitz classifier, radii, the composed bound, the plain-Conv2d export,
and the two soundness checks (the Jacobian from below, an attack inside certified radii) where they can fail."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from projunn.models import LipschitzCNN
from projunn.nn import MaxMin, UnitaryConv2d
from projunn.optim import ProjUNN
from projunn.robust import (
    certified_accuracy,
    certified_radius,
    conv_singular_values,
    jacobian_norm,
    lipschitz_bound,
    offset_cross_entropy,
    pgd_l2,
)

F64 = torch.float64


# -- the layers ----------------------------------------------------------------------------------


def test_maxmin_sorts_pairs_of_channel_halves_and_keeps_norms():
    x = torch.randn(5, 6, 3, 4, dtype=F64)
    y = MaxMin()(x)
    a, b = x[:, :3], x[:, 3:]
    assert torch.equal(y, torch.cat([torch.maximum(a, b), torch.minimum(a, b)], dim=1))
    assert torch.allclose(y.flatten(1).norm(dim=1), x.flatten(1).norm(dim=1), rtol=1e-15)


def test_maxmin_is_one_lipschitz():
    x, z = torch.randn(200, 8, dtype=F64), torch.randn(200, 8, dtype=F64)
    layer = MaxMin(dim=-1)
    assert ((layer(x) - layer(z)).norm(dim=1) <= (x - z).norm(dim=1) * (1 + 1e-15)).all()


def test_maxmin_refuses_an_odd_channel_count():
    with pytest.raises(ValueError, match="even size along dim 1"):
        MaxMin()(torch.randn(2, 3, 4))


@pytest.mark.parametrize("size", [(8, 6), (7, 5), (6, 9), (1, 4)])
@pytest.mark.parametrize("dtype", [F64, torch.complex128])
@pytest.mark.parametrize("bias", [False, True])
def test_orthogonal_conv_exports_as_a_plain_conv2d_with_the_same_outputs(size, dtype, bias):
    conv = UnitaryConv2d(3, size, init="haar", bias=bias, dtype=dtype, generator=torch.Generator().manual_seed(0))
    if bias:
        with torch.no_grad():
            conv.bias.copy_(torch.randn(3, dtype=dtype))
    plain = conv.to_conv2d()
    assert type(plain) is torch.nn.Conv2d and plain.padding_mode == "circular"
    x = torch.randn(2, 3, *size, dtype=dtype)
    assert (plain(x) - conv(x)).abs().max() < 1e-13


def test_exported_conv2d_in_float32_agrees_to_float32_rounding():
    conv = UnitaryConv2d(8, (14, 14), init="haar", bias=True, generator=torch.Generator().manual_seed(1))
    x = torch.randn(4, 8, 14, 14)
    # An FFT against a direct sum of 196 products per output: both round at ~1e-7 relative.
    assert (conv.to_conv2d()(x) - conv(x)).abs().max() < 1e-5 * x.abs().max()


# -- radii and the bound -------------------------------------------------------------------------


def _dense_operator(layer, shape, dtype=F64) -> torch.Tensor:
    """The layer's linear part as a dense (output size) x (input size) matrix, column by column."""
    size = math.prod(shape)
    basis = torch.eye(size, dtype=dtype).reshape(size, *shape)
    with torch.no_grad():
        return (layer(basis) - layer(torch.zeros(1, *shape, dtype=dtype))).reshape(size, -1).T


@pytest.mark.parametrize(("c_in", "c_out", "kernel", "size"), [(3, 2, 3, (5, 4)), (2, 4, 5, (6, 6)), (3, 3, 1, (3, 5))])
def test_conv_singular_values_are_those_of_the_dense_operator(c_in, c_out, kernel, size):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, padding_mode="circular", dtype=F64)
    dense = torch.linalg.svdvals(_dense_operator(conv, (c_in, *size)))
    ours = conv_singular_values(conv, (c_in, *size))
    assert ours.shape == (*size, min(c_in, c_out))
    # The dense (C_out n m) x (C_in n m) operator has n m min(C_in, C_out) singular values: all of them, each once.
    assert torch.allclose(ours.flatten().sort(descending=True).values, dense, atol=1e-12)


@pytest.mark.parametrize("complex_", [False, True])
def test_an_orthogonal_conv_with_a_bias_has_every_singular_value_one(complex_):
    torch.manual_seed(0)
    dtype = torch.complex128 if complex_ else F64
    conv = UnitaryConv2d(4, (6, 6), init="haar", bias=True, dtype=dtype)
    with torch.no_grad():
        conv.bias.normal_()  # taken out as layer(x) - layer(0)
    assert (conv_singular_values(conv, (4, 6, 6), dtype=dtype) - 1).abs().max() < 1e-13


def test_conv_singular_values_of_a_float32_conv_at_a_real_size_match_float64():
    """64 channels at 14 x 14, as in the Lipschitz benchmark: accepted, and to float32 rounding."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(64, 64, 3, padding=1, padding_mode="circular")
    wide = torch.nn.Conv2d(64, 64, 3, padding=1, padding_mode="circular", dtype=F64)
    wide.load_state_dict(conv.state_dict())
    ours, exact = conv_singular_values(conv, (64, 14, 14)), conv_singular_values(wide, (64, 14, 14))
    assert torch.allclose(ours, exact, rtol=1e-5, atol=1e-5 * exact.max().item())


def _near_identity(padding_mode: str) -> torch.nn.Conv2d:
    """An identity-initialised 3 x 3 conv after a little training: off-centre taps of 3e-4."""
    conv = torch.nn.Conv2d(16, 16, 3, padding=1, padding_mode=padding_mode, bias=False)
    with torch.no_grad():
        conv.weight.copy_(3e-4 * torch.randn(16, 16, 3, 3, generator=torch.Generator().manual_seed(0)))
        conv.weight[range(16), range(16), 1, 1] = 1
    return conv


class _Masked(torch.nn.Module):
    """A circular conv, then a fixed mask over the pixels: linear, but no convolution."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1, padding_mode="circular", dtype=F64)

    def forward(self, x):
        return self.conv(x) * torch.linspace(0.5, 1.0, x.shape[-1], dtype=F64)


@pytest.mark.parametrize(
    ("layer", "shape", "message"),
    [
        (_near_identity("zeros"), (16, 14, 14), "does not commute with circular shifts"),
        (torch.nn.Conv2d(3, 3, 3, padding=1, dtype=F64), (3, 6, 6), "does not commute with circular shifts"),
        (_Masked(), (3, 6, 6), "does not commute with circular shifts"),
        (
            torch.nn.Sequential(
                torch.nn.Conv2d(3, 3, 3, padding=1, padding_mode="circular", dtype=F64), torch.nn.Tanh()
            ),
            (3, 6, 6),
            "is not a linear map",
        ),
        (
            torch.nn.Conv2d(3, 3, 3, stride=2, padding=1, padding_mode="circular", dtype=F64),
            (3, 6, 6),
            r"maps 6 x 6 images to \(3, 3\)",
        ),
    ],
)
def test_conv_singular_values_refuse_a_layer_that_is_no_circular_convolution(layer, shape, message):
    with pytest.raises(ValueError, match=message):
        conv_singular_values(layer, shape)
    assert layer.training  # measured in evaluation mode, and left as it was


def test_the_near_identity_conv_is_accepted_with_circular_padding():
    values = conv_singular_values(_near_identity("circular"), (16, 14, 14))
    assert abs(values.max().item() - 1) < 0.05


def test_certified_radius_is_the_margin_over_sqrt2_l():
    logits = torch.tensor([[3.0, 1.0, 2.5], [0.0, 4.0, 1.0], [1.0, 1.0, 0.0]], dtype=F64)
    labels = torch.tensor([0, 0, 1])
    radius = certified_radius(logits, labels, lipschitz=2.0)
    assert torch.allclose(radius, torch.tensor([0.5, -4.0, 0.0], dtype=F64) / (2 * math.sqrt(2)))
    accuracy = certified_accuracy(logits, labels, [0.0, 0.1, 1.0], lipschitz=2.0)
    assert accuracy == {0.0: pytest.approx(1 / 3), 0.1: pytest.approx(1 / 3), 1.0: 0.0}  # a tie is not certified


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: certified_radius(torch.zeros(3), torch.zeros(3, dtype=torch.int64)), "logits must have shape"),
        (lambda: certified_radius(torch.zeros(3, 2), torch.zeros(2, dtype=torch.int64)), "labels must be int64"),
        (lambda: certified_radius(torch.zeros(3, 2), torch.zeros(3, dtype=torch.int64), 0.0), "lipschitz must be"),
        (lambda: offset_cross_entropy(torch.zeros(3, 2), torch.zeros(3, dtype=torch.int64), offset=-1), "offset"),
    ],
)
def test_bad_inputs_are_refused_with_a_message_naming_them(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_offset_cross_entropy_is_cross_entropy_of_the_lowered_true_logit():
    logits, labels = torch.randn(6, 4, dtype=F64), torch.randint(0, 4, (6,))
    assert offset_cross_entropy(logits, labels, offset=0.0) == pytest.approx(F.cross_entropy(logits, labels).item())
    lowered = logits - 0.7 * F.one_hot(labels, 4)
    expected = 0.25 * F.cross_entropy(lowered / 0.25, labels)
    assert offset_cross_entropy(logits, labels, offset=0.7, temperature=0.25).item() == pytest.approx(expected.item())


def test_lipschitz_bound_of_the_classifier_is_one_to_rounding_and_names_a_layer_it_cannot_bound():
    model = LipschitzCNN(channels=4, size=(8, 8), blocks=2, dtype=F64, generator=torch.Generator().manual_seed(0))
    assert abs(lipschitz_bound(model) - 1) < 1e-13
    with pytest.raises(TypeError, match="BatchNorm2d"):
        lipschitz_bound(torch.nn.Sequential(*list(model)[:2], torch.nn.BatchNorm2d(4)))


def test_lipschitz_classifier_refuses_shapes_it_cannot_build():
    with pytest.raises(ValueError, match="even"):
        LipschitzCNN(channels=3, size=(8, 8))
    with pytest.raises(ValueError, match="divisible"):
        LipschitzCNN(channels=4, size=(6, 6), stages=3)


def test_jacobian_norm_matches_the_dense_jacobian():
    torch.manual_seed(0)
    model = LipschitzCNN(channels=2, size=(4, 4), blocks=1, classes=3, dtype=F64)
    x = torch.randn(3, 1, 4, 4, dtype=F64)
    estimate = jacobian_norm(model, x)
    for b in range(3):
        dense = torch.autograd.functional.jacobian(lambda v: model(v[None])[0], x[b]).reshape(3, -1)
        assert estimate[b] == pytest.approx(torch.linalg.matrix_norm(dense, ord=2).item(), rel=1e-12)


# -- soundness on a trained model ----------------------------------------------------------------


def _two_class_images(count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """8 x 8 images: a class's template plus noise; separable with margin, so many get certified."""
    templates = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(7), dtype=F64)
    labels = torch.randint(0, 2, (count,), generator=generator)
    return templates[labels] + 0.3 * torch.randn(count, 1, 8, 8, generator=generator, dtype=F64), labels


@pytest.fixture(scope="module")
def trained():
    """A small Lipschitz classifier trained with projUNN-T + Adam on the offset loss (float64)."""
    torch.manual_seed(0)
    model = LipschitzCNN(channels=4, size=(8, 8), blocks=1, classes=2, dtype=F64)
    optimizer = ProjUNN(torch.optim.Adam(model.parameters(), lr=0.01), method="t", rank=2)
    data = torch.Generator().manual_seed(1)
    for _ in range(60):
        x, y = _two_class_images(64, data)
        offset_cross_entropy(model(x), y, offset=1.0, temperature=0.25).backward()
        optimizer.step()
        optimizer.zero_grad()
    x, y = _two_class_images(120, torch.Generator().manual_seed(2))
    return model, x, y


def test_trained_classifier_stays_one_lipschitz_from_above_and_below(trained):
    model, x, _ = trained
    bound = lipschitz_bound(model)
    assert abs(bound - 1) < 1e-12  # the weights stayed on the group through training
    assert (jacobian_norm(model, x[:20]) <= bound * (1 + 1e-12)).all()


def test_no_attack_succeeds_inside_a_certified_radius(trained):
    model, x, y = trained
    with torch.no_grad():
        radius = certified_radius(model(x), y, lipschitz_bound(model))
    certified = radius > 0.05
    assert certified.sum() >= 30  # the check means something only where there are certificates
    attack = dict(steps=20, restarts=1, generator=torch.Generator().manual_seed(3))
    _, fooled = pgd_l2(model, x[certified], y[certified], 0.999 * radius[certified], **attack)
    assert not fooled.any()
    # The attack is strong enough to matter: at 1.5 times the radius it breaks most of the same points
    # (so the certificates are also nearly tight).
    _, beyond = pgd_l2(model, x[certified], y[certified], 1.5 * radius[certified], **attack)
    assert beyond.double().mean() > 0.5


def test_the_checks_catch_a_model_whose_conv_left_the_group(trained):
    """A conv stretched by 4 (what an unconstrained conv may become) voids radii computed with L = 1:
    the bound shows it, the Jacobian exceeds 1, and the attack finds examples inside those radii."""
    model, x, y = trained
    broken = LipschitzCNN(channels=4, size=(8, 8), blocks=1, classes=2, dtype=F64)
    broken.load_state_dict(model.state_dict())
    conv = next(m for m in broken if isinstance(m, UnitaryConv2d))
    with torch.no_grad():
        conv.weight_free.mul_(4)
        conv.weight_self.mul_(4)
    assert lipschitz_bound(broken) == pytest.approx(4.0, rel=1e-12)
    assert jacobian_norm(broken, x[:20]).max() > 1.5
    with torch.no_grad():
        claimed = certified_radius(broken(x), y, lipschitz=1.0)
    inside = claimed > 0.05
    attack = dict(steps=20, restarts=1, generator=torch.Generator().manual_seed(3))
    _, fooled = pgd_l2(broken, x[inside], y[inside], 0.999 * claimed[inside], **attack)
    assert fooled.any()


def test_the_attack_keeps_to_the_ball_and_the_box_and_refuses_what_it_cannot_attack():
    torch.manual_seed(0)
    model = LipschitzCNN(channels=2, size=(4, 4), blocks=1, classes=3, dtype=F64)
    x, y = torch.rand(6, 1, 4, 4, dtype=F64), torch.randint(0, 3, (6,))
    adversarial, _ = pgd_l2(model, x, y, 0.3, steps=5, restarts=1, bounds=(0.0, 1.0), step_size=0.2)
    assert ((adversarial - x).flatten(1).norm(dim=1) <= 0.3 + 1e-12).all()
    assert adversarial.min() >= 0 and adversarial.max() <= 1
    empty, fooled = pgd_l2(model, x[:0], y[:0], 0.3)
    assert empty.shape == (0, 1, 4, 4) and fooled.shape == (0,)
    for call, message in [
        (lambda: pgd_l2(model, x, y, -0.5), "radius must be finite and >= 0"),
        (lambda: pgd_l2(model, x, y, 0.3, steps=0), "steps >= 1"),
        (lambda: pgd_l2(model, 2 + x, y, 0.3, bounds=(0.0, 1.0)), "outside bounds"),
        (lambda: certified_accuracy(torch.zeros(0, 3), torch.zeros(0, dtype=torch.int64), [0.5]), "empty batch"),
        (lambda: offset_cross_entropy(torch.zeros(2, 3), torch.zeros(2, dtype=torch.int64), offset=math.inf), "finite"),
    ]:
        with pytest.raises(ValueError, match=message):
            call()
    with pytest.raises(TypeError, match="lipschitz must be a number"):
        certified_radius(torch.zeros(2, 3), torch.zeros(2, dtype=torch.int64), True)


def test_a_sequential_subclass_with_its_own_forward_is_not_taken_for_a_chain():
    class Residual(torch.nn.Sequential):
        def forward(self, x):
            return x + super().forward(x)  # 1 + L, not L

    with pytest.raises(TypeError, match="Residual"):
        lipschitz_bound(Residual(UnitaryConv2d(2, (4, 4), dtype=F64)))
