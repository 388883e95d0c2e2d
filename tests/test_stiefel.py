"""Rectangular (semi-unitary, Stiefel) projUNN updates against dense float64 references."""

from __future__ import annotations

import pytest
import torch

from conftest import REAL_AND_COMPLEX, eps, haar, polar_reference, randn
from projunn.functional import _kernels as kernels
from projunn.functional import projunn_d, projunn_t, unitarity_error, unitary_init
from projunn.nn import StiefelLinear
from projunn.optim import ProjUNN, param_groups
from test_update import arithmetic_trace

SHAPES = [(7, 3), (3, 7), (9, 4), (4, 9), (6, 5)]


@pytest.fixture(params=["solvers", "closed forms"])
def small_problems(request, monkeypatch):
    """Both paths of the small problems: LAPACK's solvers (the CPU's) and the closed forms of one or two
    columns (a GPU's, Note [No solver calls for rank 1])."""
    monkeypatch.setattr(kernels, "CLOSED_FORMS_ON_CPU", request.param == "closed forms")


def semi_unitary(n: int, m: int, *, batch=(), dtype=torch.float64, seed: int = 0) -> torch.Tensor:
    """The first min(n, m) columns (tall) or rows (wide) of a Haar unitary: a Haar point of the Stiefel manifold."""
    U = haar(max(n, m), batch=batch, dtype=dtype, seed=seed)
    return U[..., :n, :m].clone()


def tangent_reference(W: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """exp(A) W for tall W with A = (a (W b)^H - (W b) a^H) / 2; for wide W, W exp(K), K = skew(W^H a b^H)."""
    n, m = W.shape[-2:]
    if n >= m:
        Wb = W @ b
        return torch.linalg.matrix_exp((a @ Wb.mH - Wb @ a.mH) / 2) @ W
    c = W.mH @ a  # the wide case is the tall case of W^H with the step b a^H, conjugate-transposed
    return W @ torch.linalg.matrix_exp((c @ b.mH - b @ c.mH) / 2)


def semi_unitarity_defect(W: torch.Tensor) -> float:
    return unitarity_error(W).max().item()


@pytest.mark.parametrize("dtype", REAL_AND_COMPLEX)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("batch", [(), (3,)])
def test_d_is_the_svd_polar_factor(dtype, shape, k, batch, small_problems):
    n, m = shape
    W = semi_unitary(n, m, batch=batch, dtype=dtype)
    a, b = randn(*batch, n, k, dtype=dtype, seed=2, scale=0.3), randn(*batch, m, k, dtype=dtype, seed=3)
    expected = polar_reference(W + a @ b.mH)
    torch.testing.assert_close(projunn_d(W, a, b), expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("dtype", REAL_AND_COMPLEX)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("batch", [(), (2,)])
def test_t_is_the_rotation_along_the_canonical_tangent_direction(dtype, shape, k, batch, small_problems):
    n, m = shape
    W = semi_unitary(n, m, batch=batch, dtype=dtype)
    a, b = randn(*batch, n, k, dtype=dtype, seed=4, scale=0.5), randn(*batch, m, k, dtype=dtype, seed=5)
    result = projunn_t(W, a, b)
    torch.testing.assert_close(result, tangent_reference(W, a, b), rtol=0, atol=1e-10)
    assert semi_unitarity_defect(result) < 1e-12


def test_t_moves_in_the_canonical_riemannian_direction():
    """d/dt T(W, t a, b) at t = 0 is (D - W D^H W) / 2, D = a b^H: the canonical-metric tangent part of D."""
    W = semi_unitary(8, 3)
    a, b = randn(8, 2, seed=6), randn(3, 2, seed=7)
    t = 1e-6
    velocity = (projunn_t(W, t * a, b) - projunn_t(W, -t * a, b)) / (2 * t)
    D = a @ b.mT
    torch.testing.assert_close(velocity, (D - W @ D.mT @ W) / 2, rtol=0, atol=1e-7)


@pytest.mark.parametrize("update", [projunn_d, projunn_t])
def test_square_matrices_agree_with_the_rectangular_formulas(update):
    """The square path and the Stiefel path compute the same matrix (checked through a 1-row-padded embedding)."""
    U = haar(5)
    a, b = randn(5, 2, seed=8, scale=0.3), randn(5, 2, seed=9)
    tall = torch.cat([U, torch.zeros(1, 5, dtype=U.dtype)])  # 6 x 5 with orthonormal columns
    a_tall = torch.cat([a, torch.zeros(1, 2, dtype=a.dtype)])
    torch.testing.assert_close(update(tall, a_tall, b)[:5], update(U, a, b), rtol=0, atol=1e-12)


@pytest.mark.parametrize("update", [projunn_d, projunn_t])
@pytest.mark.parametrize("shape", [(4, 9), (9, 4)])
def test_inputs_are_not_modified_and_out_may_be_the_weight(update, shape):
    n, m = shape
    W = semi_unitary(n, m, dtype=torch.complex128)
    a, b = randn(n, 2, dtype=torch.complex128, seed=1), randn(m, 2, dtype=torch.complex128, seed=2)
    copies = [t.clone() for t in (W, a, b)]
    expected = update(W, a, b)
    for t, c in zip((W, a, b), copies):
        assert torch.equal(t, c)
    assert expected.is_contiguous() and expected.shape == W.shape
    # A strided W (QR's column-major layout) gets the same arithmetic as a fresh result: bit-equality is fair.
    fresh = arithmetic_trace(update, W, a, b)
    W_copy = W.clone()
    assert arithmetic_trace(update, W_copy, a, b, out=W_copy) == fresh
    result = update(W, a, b, out=W)
    assert result is W
    torch.testing.assert_close(W, expected, rtol=0, atol=0)


def test_rank_deficient_step_falls_back_to_the_dense_projection(small_problems):
    """W + a b^H with a zero column: the polar factor is not unique; the result is still semi-unitary and closest."""
    W = semi_unitary(7, 3)
    a, b = -W[:, :1].clone(), torch.eye(3, 1, dtype=torch.float64)  # removes W's first column
    Y = W + a @ b.mT
    result = projunn_d(W, a, b)
    assert semi_unitarity_defect(result) < 1e-12 and torch.isfinite(result).all()
    best = (polar_reference(Y) - Y).norm()
    torch.testing.assert_close((result - Y).norm(), best, rtol=1e-10, atol=1e-12)
    # In place, the fallback is formed from W before W is overwritten.
    assert projunn_d(W, a, b, out=W) is W
    torch.testing.assert_close(W, result, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("dtype", "shape", "method"),
    [
        (torch.float32, (16, 48), "t"),
        (torch.float32, (48, 16), "d"),
        (torch.complex64, (48, 16), "t"),
        (torch.complex64, (16, 48), "d"),
    ],
)
def test_stiefel_layer_keeps_its_constraint_over_400_adam_steps(dtype, shape, method):
    """Fit a random semi-unitary map with StiefelLinear + ProjUNN(Adam): the constraint holds to rounding at every step.

    The float32 rounding walk reaches the drift tolerance (1.9e-6 for these shapes) in 150 to 200 steps,
    so 400 steps see the default drift control correct it; the learning rate is large enough for the
    target to be learned by then (the loss falls below 3e-5 of its start in every case here).
    """
    in_features, out_features = shape
    g = torch.Generator().manual_seed(0)
    layer = StiefelLinear(in_features, out_features, dtype=dtype, generator=g)
    target = unitary_init(out_features, "haar", m=in_features, dtype=dtype, generator=g)
    groups = param_groups(layer, unitary_lr=4e-2, method=method, rank=2)
    optimizer = ProjUNN(torch.optim.Adam(groups), seed=0)
    losses, defects = [], []
    for _ in range(400):
        x = torch.randn(32, in_features, dtype=dtype, generator=g)
        loss = (layer(x) - x @ target.mT).abs().square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        defects.append(semi_unitarity_defect(layer.weight.detach()))
    # Measured at most 2.3e-6 here with the default drift control.
    assert max(defects) < 5 * (in_features * out_features) ** 0.5 * eps(dtype)
    assert sum(losses[-50:]) < 1e-3 * sum(losses[:50])  # and the target is learned


def test_stiefel_layer_is_an_isometry_or_a_projection():
    tall = StiefelLinear(3, 5, init="haar", dtype=torch.float64)
    x = torch.randn(4, 3, dtype=torch.float64)
    torch.testing.assert_close(tall(x).norm(dim=-1), x.norm(dim=-1))
    wide = StiefelLinear(5, 3, init="identity", dtype=torch.complex128)
    assert semi_unitarity_defect(wide.weight.detach()) == 0 and wide.weight.shape == (3, 5)
    with pytest.raises(ValueError, match="in_features must be >= 1, got 0"):
        StiefelLinear(0, 3)
    with pytest.raises(TypeError, match="out_features must be an int >= 1, got str '3'"):
        StiefelLinear(3, "3")
    with pytest.raises(ValueError, match="init must be one of 'haar', 'identity'"):
        StiefelLinear(3, 5, init="henaff")
    with pytest.raises(ValueError, match=r"expected input of shape \(..., 3\)"):
        tall(torch.zeros(2, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"init of a rectangular \(3 x 5\) matrix"):
        unitary_init(3, "cayley", m=5)
