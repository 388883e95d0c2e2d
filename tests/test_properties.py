"""Property-based tests (hypothesis): over shapes, ranks, dtypes and step sizes, the updates and sketches
return (semi-)unitary matrices to the dtype's tolerance, never NaN, and never modify their inputs."""

from __future__ import annotations

import math
import os
from typing import get_args

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from projunn.functional import Sketch, lowrank, projunn_d, projunn_t, unitarity_error, unitary_init

SKETCHES = get_args(Sketch)
DTYPES = [torch.float32, torch.float64, torch.complex64, torch.complex128]
# Derandomised, so the default run is reproducible; PROJUNN_EXPLORE=1 searches 2,000 random examples per test.
_EXPLORE = bool(os.environ.get("PROJUNN_EXPLORE"))
PROFILE = settings(
    max_examples=2000 if _EXPLORE else 60,
    derandomize=not _EXPLORE,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@st.composite
def update_problems(draw, square: bool):
    """(U, a, b): U (batch..., N, M) semi-unitary, a (batch..., N, k), b (batch..., M, k), step scale 1e-12 .. 1e3."""
    dtype = draw(st.sampled_from(DTYPES))
    n = draw(st.integers(1, 12))
    m = n if square else draw(st.integers(1, 12))
    k = draw(st.integers(1, 8))
    batch = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
    scale = 10.0 ** draw(st.integers(-12, 3))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    U = unitary_init(max(n, m), "haar", batch_shape=batch, dtype=dtype, generator=g)[..., :n, :m].contiguous()
    a = scale * torch.randn((*batch, n, k), dtype=dtype, generator=g)
    b = torch.randn((*batch, m, k), dtype=dtype, generator=g)
    zero_out = draw(st.sampled_from(["none", "a", "b"]))  # degenerate steps too
    if zero_out == "a":
        a.zero_()
    elif zero_out == "b":
        b.zero_()
    return U, a, b


def _tolerance(dtype: torch.dtype, n: int, m: int, step: float = 0.0) -> float:
    """Rounding of one (semi-)unitary matrix in this dtype, with headroom for the update's own rounding.

    projUNN-D forms the polar factor of U + a b^H from quantities of that matrix's size, so its
    rounding grows with the step's norm ``step``; for unit-sized steps this is the dtype's floor.
    """
    return 50 * torch.finfo(dtype).eps * math.sqrt(n * m) * (1 + step)


@PROFILE
@given(problem=update_problems(square=False), method=st.sampled_from(["d", "t"]))
def test_updates_are_semi_unitary_finite_and_leave_inputs_alone(problem, method):
    U, a, b = problem
    copies = [t.clone() for t in problem]
    update = projunn_d if method == "d" else projunn_t
    result = update(U, a, b)
    for tensor, copy in zip(problem, copies):
        assert torch.equal(tensor, copy)
    assert result.shape == U.shape and result.dtype == U.dtype
    assert torch.isfinite(torch.view_as_real(result) if result.is_complex() else result).all()
    n, m = U.shape[-2:]
    step = (torch.linalg.vector_norm(a) * torch.linalg.vector_norm(b)).item() if method == "d" else 0.0
    assert unitarity_error(result).max().item() < _tolerance(U.dtype, n, m, step)


@PROFILE
@given(problem=update_problems(square=True))
def test_a_zero_step_returns_u(problem):
    U, a, b = problem
    for update in (projunn_d, projunn_t):
        torch.testing.assert_close(update(U, 0 * a, b), U, rtol=0, atol=_tolerance(U.dtype, *U.shape[-2:]))


@st.composite
def step_matrices(draw):
    dtype = draw(st.sampled_from(DTYPES))
    n, m = draw(st.integers(1, 10)), draw(st.integers(1, 10))
    batch = tuple(draw(st.lists(st.integers(1, 3), max_size=1)))
    rank = draw(st.integers(1, min(n, m)))
    scale = 10.0 ** draw(st.integers(-20, 5))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    D = scale * torch.randn((*batch, n, m), dtype=dtype, generator=g)
    if draw(st.booleans()):  # exactly low rank, possibly zero
        true_rank = draw(st.integers(0, rank))
        left = torch.randn((*batch, n, true_rank), dtype=dtype, generator=g)
        D = scale * left @ torch.randn((*batch, true_rank, m), dtype=dtype, generator=g)
    return D, rank


@PROFILE
@given(problem=step_matrices(), sketch=st.sampled_from(SKETCHES))
def test_sketches_are_finite_shaped_and_leave_d_alone(problem, sketch):
    D, rank = problem
    copy = D.clone()
    a, b = lowrank(D, rank, sketch, generator=torch.Generator().manual_seed(0))
    assert torch.equal(D, copy)
    n, m = D.shape[-2:]
    assert a.shape == (*D.shape[:-2], n, rank) and b.shape == (*D.shape[:-2], m, rank)
    for factor in (a, b):
        assert torch.isfinite(torch.view_as_real(factor) if factor.is_complex() else factor).all()
    # Never larger than the step it sketches (each sketch is a projection of D onto a subspace).
    size = torch.linalg.matrix_norm(D).max().item()
    assert torch.linalg.matrix_norm(a @ b.mH).max().item() <= 1.01 * size + 1e-30


@pytest.mark.parametrize("sketch", SKETCHES)
def test_sketch_rank_above_the_matrix_is_a_documented_error(sketch):
    with pytest.raises(ValueError, match="rank must be <= min"):
        lowrank(torch.zeros(3, 5), 4, sketch)
