"""Initialisers, unitarity_error, closest_unitary, and the UnitaryLinear layer."""

from __future__ import annotations

import copy
import math
from typing import get_args

import pytest
import torch

from conftest import ALL_DTYPES, eps, gram_defect, haar, randn
from projunn.functional import Init, closest_unitary, unitarity_error, unitary_init
from projunn.nn import OrthogonalLinear, UnitaryLinear, unitary_init_

ACCEPTED_DTYPES = "float32, float64, complex64, complex128"


@pytest.mark.parametrize("init", get_args(Init))
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("n", [1, 2, 5, 16])
def test_initialisers_are_unitary(init, dtype, n):
    W = unitary_init(n, init, batch_shape=(3,), dtype=dtype, generator=torch.Generator().manual_seed(0))
    assert W.shape == (3, n, n) and W.dtype == dtype and W.is_contiguous()
    assert gram_defect(W) < 4 * n * eps(dtype)


def test_henaff_and_cayley_spectra():
    """Real: 2x2 rotation blocks with angles in the stated ranges; complex: phases."""
    g = torch.Generator().manual_seed(0)
    for init, low, high in [("henaff", -math.pi, math.pi), ("cayley", 0.0, math.pi / 2)]:
        W = unitary_init(200, init, dtype=torch.float64, generator=g)
        angles = torch.atan2(W[1::2, 0::2].diagonal(), W[0::2, 0::2].diagonal())
        assert angles.min() >= low - 1e-12 and angles.max() <= high + 1e-12
        assert angles.max() - angles.min() > 0.8 * (high - low)  # spread over the range
        off_block = W.clone()
        for i in range(0, 200, 2):
            off_block[i : i + 2, i : i + 2] = 0
        assert torch.count_nonzero(off_block) == 0
        Z = unitary_init(50, init, dtype=torch.complex128, generator=g)
        assert torch.count_nonzero(Z - torch.diag_embed(Z.diagonal())) == 0
        phases = Z.diagonal().angle()
        assert phases.min() >= low - 1e-12 and phases.max() <= high + 1e-12


def test_haar_is_reproducible_and_unbiased():
    a = unitary_init(8, generator=torch.Generator().manual_seed(1))
    b = unitary_init(8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    # Haar: E[W] = 0 and E[|W_ij|^2] = 1/n; check on 2,000 samples.
    W = unitary_init(4, batch_shape=(2000,), dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    assert W.mean(0).abs().max() < 0.05
    torch.testing.assert_close(W.square().mean(0), torch.full((4, 4), 0.25, dtype=torch.float64), atol=0.03, rtol=0)


def test_identity_init():
    assert torch.equal(unitary_init(3, "identity", dtype=torch.float64), torch.eye(3, dtype=torch.float64))


def test_init_bad_arguments():
    """A wrong type is a TypeError, a wrong value a ValueError; both name the argument and what it accepts."""
    with pytest.raises(ValueError, match="init must be one of 'identity', 'haar', 'henaff', 'cayley'; got 'orth'"):
        unitary_init(4, "orth")
    with pytest.raises(TypeError, match="init must be a str, one of 'identity', 'haar'"):
        unitary_init(4, None)
    with pytest.raises(ValueError, match="n must be >= 1, got 0"):
        unitary_init(0)
    with pytest.raises(TypeError, match="n must be an int >= 1, got float 2.5"):
        unitary_init(2.5)
    with pytest.raises(TypeError, match="m must be an int >= 1, got bool True"):
        unitary_init(2, m=True)
    with pytest.raises(TypeError, match=f"dtype must be one of {ACCEPTED_DTYPES}; got torch.int32"):
        unitary_init(4, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"init of a rectangular \(3 x 5\) matrix must be one of 'identity', 'haar'"):
        unitary_init(3, "cayley", m=5)


def test_init_is_the_one_name_of_the_initialisation():
    """``kind=``, the pre-release name of ``init``, is gone: passing it is a TypeError naming it."""
    with pytest.raises(TypeError, match="'kind'"):
        unitary_init(4, kind="henaff")
    with pytest.raises(TypeError, match="'kind'"):
        unitary_init_(torch.zeros(4, 4), kind="henaff")


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_unitarity_error(dtype):
    U = haar(6, batch=(2,), dtype=dtype)
    error = unitarity_error(U)
    assert error.shape == (2,) and not error.is_complex()
    assert (error < 10 * eps(dtype)).all()
    scaled = unitarity_error(1.1 * haar(6, dtype=torch.float64))
    torch.testing.assert_close(scaled, torch.tensor(0.21 * math.sqrt(6), dtype=torch.float64))
    tall = haar(6, dtype=dtype)[:, :3]
    assert unitarity_error(tall) < 10 * eps(dtype) and unitarity_error(tall.mT) < 10 * eps(dtype)


def test_closest_unitary_is_the_polar_factor():
    A = randn(3, 7, 7)
    P = closest_unitary(A)
    assert gram_defect(P) < 1e-14
    H = P.mH @ A  # A = P H with H symmetric positive semi-definite
    torch.testing.assert_close(H, H.mH, atol=1e-12, rtol=0)
    assert torch.linalg.eigvalsh(H).min() > -1e-12
    assert closest_unitary(A.float()).dtype == torch.float32


# -- the layer --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_layer_preserves_norms(dtype):
    layer = UnitaryLinear(12, dtype=dtype)
    x = torch.randn(5, 3, 12, dtype=dtype)
    torch.testing.assert_close(
        torch.linalg.vector_norm(layer(x), dim=-1), torch.linalg.vector_norm(x, dim=-1), atol=0, rtol=20 * eps(dtype)
    )


def test_layer_surface():
    layer = UnitaryLinear(4, bias=True, init="henaff", dtype=torch.float64)
    assert OrthogonalLinear is UnitaryLinear
    assert "4, orthogonal, bias=True, init='henaff'" in repr(layer)
    assert "unitary" in repr(UnitaryLinear(2, dtype=torch.complex64))
    assert layer(torch.zeros(4, dtype=torch.float64)).shape == (4,)
    clone = copy.deepcopy(layer)
    assert torch.equal(clone.weight, layer.weight)
    with pytest.raises(ValueError, match=r"expected input of shape \(..., 4\), got \(2, 3\)"):
        layer(torch.zeros(2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="features must be >= 1, got 0"):
        UnitaryLinear(0)
    with pytest.raises(TypeError, match="features must be an int >= 1, got float 2.5"):
        UnitaryLinear(2.5)
    with pytest.raises(TypeError, match=f"dtype must be one of {ACCEPTED_DTYPES}; got torch.float16"):
        UnitaryLinear(3, dtype=torch.float16)
    with pytest.raises(ValueError, match="init must be one of"):
        UnitaryLinear(3, init="random")


def test_in_place_unitary_init_fills_the_tensor_it_returns():
    weight = torch.nn.Parameter(torch.zeros(2, 5, 5, dtype=torch.float64))
    assert unitary_init_(weight, "haar", generator=torch.Generator().manual_seed(0)) is weight
    assert gram_defect(weight.detach()) < 1e-14 and weight.requires_grad
    generator = torch.Generator().manual_seed(0)
    expected = unitary_init(5, "haar", batch_shape=(2,), dtype=torch.float64, generator=generator)
    assert torch.equal(weight.detach(), expected)


@pytest.mark.parametrize("shape", [(2, 7, 3), (3, 7)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_in_place_unitary_init_fills_rectangular_tensors_with_semi_unitary_matrices(shape, dtype):
    tall = unitary_init_(torch.zeros(shape, dtype=dtype), generator=torch.Generator().manual_seed(0))
    assert unitarity_error(tall).max() < 1e-14  # orthonormal columns (7 x 3) or rows (3 x 7)
    identity = unitary_init_(torch.zeros(shape, dtype=dtype), "identity")
    assert torch.equal(identity, torch.eye(*shape[-2:], dtype=dtype).expand(shape))


def test_in_place_unitary_init_bad_arguments():
    with pytest.raises(ValueError, match=r"init of a rectangular \(3 x 4\) matrix must be one of 'identity', 'haar'"):
        unitary_init_(torch.zeros(3, 4), "henaff")
    with pytest.raises(ValueError, match=r"tensor must have at least 2 dimensions .* got shape \(4,\)"):
        unitary_init_(torch.zeros(4))
    with pytest.raises(ValueError, match=r"tensor must hold non-empty .* got shape \(0, 3\)"):
        unitary_init_(torch.zeros(0, 3))
    with pytest.raises(TypeError, match="tensor has dtype torch.int64"):
        unitary_init_(torch.zeros(3, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match="tensor must be a torch.Tensor, got list"):
        unitary_init_([[1.0]])
