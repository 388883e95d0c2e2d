"""EUNN's mesh of rotations: the matrix against a dense product of 2 x 2 blocks, unitarity, the decomposition,
the rank of full and reduced meshes, gradients, and the parametrisation on nn.Linear and UnitaryRNNCell."""

from __future__ import annotations

import io

import pytest
import torch
from torch.nn.utils import parametrize

from conftest import REAL_AND_COMPLEX, eps, gram_defect, haar, randn
from projunn.functional import closest_unitary, unitarity_error, unitary_init
from projunn.nn import EUNN, UnitaryRNNCell, eunn, eunn_matrix
from projunn.optim import ProjUNN, param_groups

SIZES = [1, 2, 5, 6]  # odd and even N, and the degenerate ones


def random_params(n: int, capacity: int, dtype: torch.dtype, *, batch=(), seed: int = 1) -> torch.Tensor:
    shape = EUNN(n, capacity=capacity, dtype=dtype).parameter_shape
    return randn(*batch, *shape, dtype=dtype, seed=seed, scale=3.0)


def dense_reference(params: torch.Tensor, n: int) -> torch.Tensor:
    """One matrix, as the product of N x N matrices each holding one 2 x 2 element (Note [EUNN construction])."""
    complex_ = params.is_complex()
    capacity = params.shape[-2] - (1 if complex_ else 0)
    W = torch.eye(n, dtype=params.dtype)
    for layer in range(capacity):
        for k, a in enumerate(range(layer % 2, n - 1, 2)):
            theta = params[layer, k].real if complex_ else params[layer, k]
            phase = torch.exp(1j * params[layer, k].imag) if complex_ else 1.0
            c, s = torch.cos(theta), torch.sin(theta)
            E = torch.eye(n, dtype=params.dtype)
            E[a, a], E[a, a + 1], E[a + 1, a], E[a + 1, a + 1] = phase * c, -s, phase * s, c
            W = E @ W
    if complex_:
        omega = torch.view_as_real(params[capacity]).flatten()[:n]
        W = torch.diag(torch.exp(1j * omega)) @ W
    return W


@pytest.mark.parametrize("dtype", REAL_AND_COMPLEX)
@pytest.mark.parametrize("n", SIZES)
def test_matrix_is_the_dense_product_and_unitary(n, dtype):
    for capacity in sorted({1, min(3, n), n}):
        params = random_params(n, capacity, dtype, batch=(2,))
        W = eunn_matrix(params, n)
        assert W.shape == (2, n, n) and W.dtype == dtype
        for i in range(2):
            torch.testing.assert_close(W[i], dense_reference(params[i], n), atol=20 * eps(dtype), rtol=0)
        assert gram_defect(W) < 4 * n * eps(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.complex64])
def test_single_precision_stays_in_its_dtype(dtype):
    params = random_params(7, 7, dtype)
    signs = torch.tensor([1.0, -1, 1, 1, -1, 1, -1], dtype=dtype.to_real()) if not dtype.is_complex else None
    W = eunn_matrix(params, 7, signs=signs)
    assert W.dtype == dtype and gram_defect(W) < 4 * 7 * eps(dtype)


def test_unused_entries_do_not_matter():
    """Odd layers of an even N have one rotation less; the last phase pair of an odd N has one phase."""
    real = random_params(6, 3, torch.float64)
    changed = real.clone()
    changed[1, 2] += 1.0
    assert torch.equal(eunn_matrix(real, 6), eunn_matrix(changed, 6))
    cplx = random_params(5, 2, torch.complex128)
    changed = cplx.clone()
    changed[2, 2] += 1j
    assert torch.equal(eunn_matrix(cplx, 5), eunn_matrix(changed, 5))


@pytest.mark.parametrize("dtype", REAL_AND_COMPLEX)
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6, 7, 8])
def test_full_capacity_decomposition_round_trip(n, dtype):
    """Any Haar-random orthogonal (both signs of det) or unitary target is the matrix of its decomposition."""
    U = haar(n, batch=(3,), dtype=dtype, seed=n)
    if not dtype.is_complex:  # one of each determinant
        det = torch.linalg.det(U)
        U[0, 0] *= -det[0].sign()
        U[1, 0] *= det[1].sign()
    mesh = EUNN(n, capacity=None, dtype=dtype)
    params = mesh.right_inverse(U)
    assert params.shape == (3, *mesh.parameter_shape) and params.dtype == dtype
    assert (mesh(params) - U).abs().max() < 1e-12
    if not dtype.is_complex:
        assert torch.equal(mesh.signs.prod(-1), torch.linalg.det(U).round())


def jacobian_rank(n: int, capacity: int, dtype: torch.dtype) -> int:
    params = random_params(n, capacity, dtype)
    real = torch.view_as_real(params) if dtype.is_complex else params

    def matrix(x):
        W = eunn_matrix(torch.view_as_complex(x) if dtype.is_complex else x, n)
        return torch.view_as_real(W).flatten() if dtype.is_complex else W.flatten()

    return int(torch.linalg.matrix_rank(torch.autograd.functional.jacobian(matrix, real).flatten(1)))


@pytest.mark.parametrize("n", [4, 5])
def test_full_capacity_has_the_dimension_of_the_group_and_fewer_layers_less(n):
    """N layers: rank N^2 (U(N)), N (N - 1) / 2 (SO(N)), so the mesh is locally onto the group; fewer: less."""
    assert jacobian_rank(n, n, torch.complex128) == n * n
    assert jacobian_rank(n, n, torch.float64) == n * (n - 1) // 2
    assert jacobian_rank(n, 2, torch.complex128) < n * n
    assert jacobian_rank(n, 2, torch.float64) < n * (n - 1) // 2


@pytest.mark.parametrize("dtype", REAL_AND_COMPLEX)
def test_one_layer_cannot_reach_a_generic_target(dtype):
    """L = 1 builds block-diagonal matrices only: every one is further from a Haar target than its
    off-block part; and the decomposition refuses such a target rather than start elsewhere."""
    n = 6
    W = eunn_matrix(random_params(n, 1, dtype, batch=(4,)), n)
    block = torch.arange(n) // 2
    outside = block[:, None] != block[None, :]
    assert W[..., outside].abs().max() == 0
    target = haar(n, dtype=dtype, seed=3)
    assert torch.linalg.matrix_norm(target * outside) > 0.5
    with pytest.raises(ValueError, match=r"capacity 1 < N = 6 .* use capacity=None"):
        EUNN(n, capacity=1, dtype=dtype).right_inverse(target)


def test_full_capacity_fits_a_random_target_by_optimisation():
    """From the identity, a few hundred Adam steps on the angles fit a random rotation of SO(4)."""
    n = 4
    target = haar(n, seed=5)
    if torch.linalg.det(target) < 0:
        target[0] = -target[0]
    params = torch.zeros(EUNN(n, capacity=None, dtype=torch.float64).parameter_shape, dtype=torch.float64)
    params.requires_grad_(True)
    optimizer = torch.optim.Adam([params], lr=0.05)
    for _ in range(400):
        optimizer.zero_grad()
        loss = (eunn_matrix(params, n) - target).square().sum()
        loss.backward()
        optimizer.step()
    assert loss.item() < 1e-8


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.complex64, torch.complex128])
@pytest.mark.parametrize("init", ["identity", "henaff", "cayley"])
@pytest.mark.parametrize("n", [1, 5, 6])
def test_fewer_layers_start_from_the_block_diagonal_initialisations(n, init, dtype):
    U = unitary_init(n, init, batch_shape=(2,), dtype=dtype, generator=torch.Generator().manual_seed(n))
    mesh = EUNN(n, capacity=1, dtype=dtype)
    assert (mesh(mesh.right_inverse(U)) - U).abs().max() < 8 * eps(dtype)


@pytest.mark.parametrize("dtype", REAL_AND_COMPLEX)
def test_gradients_match_finite_differences(dtype):
    for n, capacity in [(5, 3), (4, 4)]:
        params = random_params(n, capacity, dtype, batch=(2,)).requires_grad_(True)
        signs = None if dtype.is_complex else torch.tensor([1.0, -1, 1, -1, 1][:n], dtype=torch.float64)
        assert torch.autograd.gradcheck(lambda p, s=signs, n=n: eunn_matrix(p, n, signs=s), (params,))


def test_registered_on_a_linear_weight_starts_from_it_and_stays_orthogonal():
    torch.manual_seed(0)
    layer = torch.nn.Linear(6, 6, bias=False, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(haar(6, seed=7))
        layer.weight[0] = -layer.weight[0]  # determinant -1: the signs keep it
    start = layer.weight.detach().clone()
    det = torch.linalg.det(start)
    eunn(layer, capacity=None)
    assert parametrize.is_parametrized(layer, "weight")
    assert (layer.weight - start).abs().max() < 1e-12
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.05)
    x = torch.randn(16, 6, dtype=torch.float64)
    for _ in range(20):
        optimizer.zero_grad()
        layer(x).sum().backward()
        optimizer.step()
    W = layer.weight.detach()
    assert (W - start).abs().max() > 0.1
    assert unitarity_error(W) < 10 * 6 * eps(torch.float64)
    torch.testing.assert_close(torch.linalg.det(W), det)


def test_a_weight_that_is_not_orthogonal_is_replaced_by_its_polar_factor():
    layer = torch.nn.Linear(5, 5, dtype=torch.float64)
    start = layer.weight.detach().clone()
    eunn(layer, capacity=None)
    assert (layer.weight - closest_unitary(start)).abs().max() < 1e-12


@pytest.mark.parametrize(("dtype", "init"), [(torch.complex64, "henaff"), (torch.float32, "cayley")])
def test_rnn_cell_with_default_capacity_trains_under_projunn_and_stays_unitary(dtype, init):
    """The harness's way: the free tensor in param_groups' parametrised group under ProjUNN(Adam)."""
    torch.manual_seed(0)
    cell = UnitaryRNNCell(3, 8, init=init, dtype=dtype)
    start = cell.recurrent_weight.detach().clone()
    eunn(cell, "recurrent_weight")
    assert cell.parametrizations.recurrent_weight.original.shape == (3 if dtype.is_complex else 2, 4)
    assert (cell.recurrent_weight - start).abs().max() < 8 * eps(dtype)
    groups = param_groups(cell, unitary_lr=0.02, include_parametrized=True)
    assert groups[-1]["params"] == [cell.parametrizations.recurrent_weight.original]
    optimizer = ProjUNN(torch.optim.Adam(groups, lr=0.01))
    x = torch.randn(5, 4, 3)
    for _ in range(10):
        optimizer.zero_grad()
        with parametrize.cached():
            h = None
            for t in range(5):
                h = cell(x[t], h)
            h.abs().square().sum().backward()
        optimizer.step()
    W = cell.recurrent_weight.detach()
    assert (W - start).abs().max() > 1e-3
    assert unitarity_error(W) < 10 * 8 * eps(dtype)


def test_state_dict_round_trip_keeps_the_weight_and_the_signs():
    source = torch.nn.Linear(5, 5, bias=False, dtype=torch.float64)
    with torch.no_grad():
        source.weight.copy_(haar(5, seed=9))
        source.weight[2] = -source.weight[2]
    eunn(source, capacity=None)
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    target = eunn(torch.nn.Linear(5, 5, bias=False, dtype=torch.float64), capacity=None)
    target.load_state_dict(torch.load(io.BytesIO(buffer.getvalue())))
    assert torch.equal(target.weight, source.weight)
    assert "parametrizations.weight.0.signs" in source.state_dict()


def test_bad_arguments():
    with pytest.raises(ValueError, match="capacity must be <= n = 4"):
        EUNN(4, capacity=5)
    with pytest.raises(ValueError, match="capacity must be >= 1"):
        EUNN(4, capacity=0)
    with pytest.raises(TypeError, match="n must be an int"):
        EUNN(4.0)
    with pytest.raises(TypeError, match="dtype must be one of"):
        EUNN(4, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"must have shape \(\.\.\., L, 2\)"):
        eunn_matrix(torch.zeros(3, 3, dtype=torch.float64), 5)
    with pytest.raises(ValueError, match=r"must have shape \(\.\.\., L \+ 1, 3\)"):
        eunn_matrix(torch.zeros(3, 2, dtype=torch.complex128), 5)
    with pytest.raises(TypeError, match="params.dtype must be one of"):
        eunn_matrix(torch.zeros(3, 2, dtype=torch.int64), 5)
    with pytest.raises(ValueError, match=r"signs must be a \(\.\.\., 5\) tensor"):
        eunn_matrix(torch.zeros(3, 2, dtype=torch.float64), 5, signs=torch.ones(4))
    mesh = EUNN(4, dtype=torch.float64)
    with pytest.raises(TypeError, match="builds torch.float64 matrices; got a weight of torch.float32"):
        mesh.right_inverse(torch.eye(4))
    with pytest.raises(ValueError, match=r"builds \(4, 4\) matrices; got a weight of shape \(4, 3\)"):
        mesh.right_inverse(torch.zeros(4, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"takes torch.float64 params of shape \(\.\.\., 2, 2\)"):
        mesh(torch.zeros(3, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"square \(\.\.\., N, N\) matrices; 'weight' has shape \(3, 4\)"):
        eunn(torch.nn.Linear(4, 3))
    with pytest.raises(ValueError, match="has no tensor 'kernel'"):
        eunn(torch.nn.Linear(4, 4), "kernel")
    layer = torch.nn.Linear(4, 4)  # a generic weight: out of reach of 2 layers, refused, nothing registered
    with pytest.raises(ValueError, match="capacity 2 < N = 4"):
        eunn(layer)
    assert not parametrize.is_parametrized(layer)
    assert repr(mesh) == "EUNN(4, capacity=2, orthogonal, dtype=torch.float64)"


def test_an_empty_batch_of_matrices_takes_a_mesh_of_any_capacity():
    class Empty(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(0, 4, 4, dtype=torch.float64))

    module = eunn(Empty(), "weight")
    assert module.weight.shape == (0, 4, 4)
