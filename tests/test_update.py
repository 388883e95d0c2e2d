"""projunn_d / projunn_t against dense float64/complex128 references."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import ALL_DTYPES, REAL_AND_COMPLEX, eps, gram_defect, haar, polar_reference, randn, tangent_reference
from projunn.functional import _kernels as kernels
from projunn.functional import lowrank, projunn_d, projunn_t, unitary_init
from projunn.functional._kernels import (
    ADJOINT_ROW_BLOCK,
    _exp_i_minus_identity,
    _exp_i_minus_identity_2x2,
    _polar_2x2,
    adjoint_times,
    thin_qr,
)

SIZES = [2, 3, 8, 64]
RANKS = [1, 2, 5]  # with SIZES, 2k >= N included
UPDATES = {"d": projunn_d, "t": projunn_t}


def _reference(name, U, a, b):
    return polar_reference(U + a @ b.mH) if name == "d" else tangent_reference(U, a, b)


@pytest.mark.parametrize("dtype", REAL_AND_COMPLEX)
@pytest.mark.parametrize("n,k", list(itertools.product(SIZES, RANKS)))
@pytest.mark.parametrize("name", ["d", "t"])
def test_matches_dense_reference(name, n, k, dtype):
    """Every case batched; that a batch of matrices is each matrix alone is test_batched_equals_looped's."""
    batch = (3,)
    U = haar(n, batch=batch, dtype=dtype, seed=n + k)
    a = randn(*batch, n, k, dtype=dtype, seed=2, scale=0.3)
    b = randn(*batch, n, k, dtype=dtype, seed=3)
    result = UPDATES[name](U, a, b)
    assert result.shape == U.shape and result.dtype == dtype
    torch.testing.assert_close(result, _reference(name, U, a, b), atol=1e-10, rtol=0)
    assert gram_defect(result) < 1e-12


@pytest.mark.parametrize("name", ["d", "t"])
@pytest.mark.parametrize("dtype", REAL_AND_COMPLEX)
def test_batched_equals_looped(name, dtype):
    U = haar(6, batch=(4, 2), dtype=dtype)
    a = randn(4, 2, 6, 2, dtype=dtype, seed=5)
    b = randn(4, 2, 6, 2, dtype=dtype, seed=6)
    batched = UPDATES[name](U, a, b)
    for i, j in itertools.product(range(4), range(2)):
        torch.testing.assert_close(batched[i, j], UPDATES[name](U[i, j], a[i, j], b[i, j]), atol=1e-13, rtol=0)


BLOCK = ADJOINT_ROW_BLOCK


def _by_row_blocks(fn, *args) -> bool:
    """Whether ``fn(*args)`` takes a product by row blocks (a batched product; none of these takes another)."""
    return any(op == "aten.bmm.default" for op, _ in arithmetic_trace(fn, *args))


@pytest.mark.parametrize("dtype", REAL_AND_COMPLEX)
@pytest.mark.parametrize(
    "shape,k",
    [
        ((2 * BLOCK, 300), 1),  # two blocks exactly
        ((4 * BLOCK + 37, 2 * BLOCK), 3),  # a tail of 37 rows
        ((3, 2 * BLOCK, 64), 2),  # batched, no tail: one view of every block
        ((2, 2, 2 * BLOCK + 5, 40), 4),  # batched with a tail: matrix by matrix
    ],
)
def test_adjoint_products_by_row_blocks_match_dense(shape, k, dtype):
    """Note [Adjoint products by row blocks]: the blocked sum is D^H X to rounding, and is the path taken."""
    D = randn(*shape, dtype=dtype, seed=7)
    X = randn(*shape[:-1], k, dtype=dtype, seed=8)
    assert _by_row_blocks(adjoint_times, D, X)
    result = adjoint_times(D, X)
    assert result.shape == (*shape[:-2], shape[-1], k)
    torch.testing.assert_close(result, D.mH @ X, atol=1e-12 * shape[-2] ** 0.5, rtol=0)


def test_adjoint_products_fall_back_to_one_product_where_blocks_do_not_apply():
    D = randn(3 * BLOCK, 50, seed=9)
    X = randn(3 * BLOCK, 2, seed=10)
    small = randn(BLOCK, 50, seed=11)
    for label, (matrix, thin) in {
        "fewer than two blocks": (small, X[:BLOCK]),
        "not contiguous": (D.mT.contiguous().mT, X),
        "broadcast leading dimensions": (D, X.expand(2, -1, -1)),
    }.items():
        assert torch.equal(adjoint_times(matrix, thin), (thin.mH @ matrix).mH), label


@pytest.mark.parametrize("name", ["d", "t"])
@pytest.mark.parametrize("dtype", REAL_AND_COMPLEX)
def test_large_update_with_blocked_adjoint_products_matches_dense_reference(name, dtype):
    """N = 2 blocks + a tail: U^H a of the update and D^H R of the LSI sketch are taken by row blocks."""
    n = 2 * BLOCK + 3
    U = haar(n, dtype=dtype, seed=12).contiguous()  # a weight's layout (QR's column-major one takes one product)
    D = randn(n, 2, dtype=dtype, seed=13, scale=1e-2) @ randn(n, 2, dtype=dtype, seed=14).mH  # rank 2
    sketch = lambda: lowrank(D, 2, "lsi", generator=torch.Generator().manual_seed(0))  # noqa: E731
    assert _by_row_blocks(sketch)
    a, b = sketch()
    torch.testing.assert_close(a @ b.mH, D, atol=1e-13, rtol=0)
    assert _by_row_blocks(UPDATES[name], U, a, b)
    result = UPDATES[name](U, a, b)
    torch.testing.assert_close(result, _reference(name, U, a, b), atol=1e-10, rtol=0)
    assert gram_defect(result) < 1e-12


@pytest.mark.parametrize("name", ["d", "t"])
def test_real_input_gives_real_orthogonal_result(name):
    U, a, b = haar(7), randn(7, 2), randn(7, 2, seed=9)
    result = UPDATES[name](U, a, b)
    assert not result.is_complex()
    assert gram_defect(result) < 1e-13


# Allocations and copies: exact, so they may differ between two paths that must agree bit for bit.
_EXACT_OPS = {"aten.copy_.default", "aten.empty.memory_format", "aten.empty_like.default", "aten.clone.default"}


class _ArithmeticTrace(TorchDispatchMode):
    """Record every aten call that rounds, with the shapes, strides and dtypes of its tensor arguments."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if str(func) not in _EXACT_OPS:
            leaves = torch.utils._pytree.tree_leaves((args, kwargs))
            layouts = tuple((t.shape, t.stride(), t.dtype) for t in leaves if isinstance(t, torch.Tensor))
            self.calls.append((str(func), layouts))
        return func(*args, **kwargs)


def arithmetic_trace(fn, *args, **kwargs):
    """The rounding aten calls ``fn(*args, **kwargs)`` makes, as (op, tensor layouts) pairs.

    BLAS libraries pick their kernel from the operands' layouts (MKL rounds
    ``C += A B`` and ``C + A B`` differently), so two calls may be compared bit
    for bit only when these traces are equal: same operations, same order,
    same memory layouts.
    """
    with _ArithmeticTrace() as trace:
        fn(*args, **kwargs)
    return trace.calls


@pytest.mark.parametrize("name", ["d", "t"])
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_out_and_in_place(name, dtype):
    """``out=`` (strided or contiguous, or U itself) runs the very arithmetic of a fresh result, so it is bit-equal."""
    U, a, b = haar(10, dtype=dtype), randn(10, 1, dtype=dtype, scale=0.1), randn(10, 1, dtype=dtype, seed=7)
    assert not U.is_contiguous()  # QR's column-major layout: the case that used to take a separate GEMM
    update = UPDATES[name]
    expected = update(U, a, b)
    fresh = arithmetic_trace(update, U, a, b)
    calls = {  # label -> (weight, out), made afresh for each call
        "strided like U": lambda: (U, torch.full_like(U, float("nan"))),
        "contiguous": lambda: (U, torch.full_like(U, float("nan"), memory_format=torch.contiguous_format)),
        "U itself": lambda: (lambda W: (W, W))(U.clone()),
    }
    for label, make in calls.items():
        W, out = make()
        assert arithmetic_trace(update, W, a, b, out=out) == fresh, label
        W, out = make()
        assert update(W, a, b, out=out) is out
        torch.testing.assert_close(out, expected, atol=0, rtol=0, msg=label)


@pytest.mark.parametrize("name", ["d", "t"])
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_stays_unitary_over_many_steps(name, dtype):
    """Invariant after 300 random steps, with tolerance scaled to the dtype and N."""
    n = 32
    U = haar(n, dtype=dtype)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        a = 0.05 * torch.randn(n, 2, dtype=dtype, generator=g)
        b = torch.randn(n, 2, dtype=dtype, generator=g)
        U = UPDATES[name](U, a, b)
    # One rounding per step random-walks: sqrt(steps) * sqrt(n) * eps, with margin.
    assert gram_defect(U) < 20 * (300**0.5) * eps(dtype)


def _largest_allocation(fn) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max((e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0), default=0)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_no_n_by_n_temporary(dtype):
    """Given ``out``, the update and the LSI sketch allocate only thin blocks, real or complex.

    (The largest allocation seen is an N x 64-element GEMM workspace.)
    """
    n = 512
    U = unitary_init(n, dtype=dtype)
    D = 1e-3 * torch.randn(n, n, dtype=dtype)
    out = torch.empty_like(U)
    generator = torch.Generator().manual_seed(0)
    a, b = lowrank(D, 1, "lsi", generator=generator)
    matrix_bytes = n * n * U.element_size()
    for fn in (
        lambda: projunn_t(U, a, b, out=out),
        lambda: projunn_d(U, a, b, out=out),
        lambda: lowrank(D, 1, "lsi", generator=generator),
    ):
        assert _largest_allocation(fn) < matrix_bytes / 4


# -- degenerate input never yields NaN ---------------------------------------------------


def _degenerate_cases(dtype):
    n = 6
    U = haar(n, dtype=dtype)
    v = randn(n, 1, dtype=dtype, seed=11)
    zero = torch.zeros(n, 2, dtype=dtype)
    return U, {
        "zero update": (zero, zero),
        "a zero": (zero, randn(n, 2, dtype=dtype)),
        "b zero": (randn(n, 2, dtype=dtype), zero),
        "b parallel to U^H a": (U @ v, 3 * v),  # [b, U^H a] has rank 1
        "repeated columns": (torch.cat([v, v], -1), torch.cat([v, v], -1)),
        "tiny update": (1e-30 * randn(n, 1, dtype=dtype), randn(n, 1, dtype=dtype)),
    }


@pytest.mark.parametrize("name", ["d", "t"])
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_degenerate_inputs(name, dtype):
    U, cases = _degenerate_cases(dtype)
    for label, (a, b) in cases.items():
        result = UPDATES[name](U, a, b)
        assert torch.isfinite(result).all(), label
        assert gram_defect(result) < 100 * eps(dtype), label
        if dtype in REAL_AND_COMPLEX:
            torch.testing.assert_close(result, _reference(name, U, a, b), atol=1e-10, rtol=0, msg=label)


@pytest.mark.parametrize("name", ["d", "t"])
def test_zero_update_is_identity(name):
    U = haar(5)
    zero = torch.zeros(5, 1, dtype=torch.float64)
    # Exact on any BLAS: the r x r block is exactly 0 (Note [Exponential of the small block]; the SVD of I),
    # so the rank-r term is a sum of zeros and U + 0 = U.
    assert torch.equal(UPDATES[name](U, zero, zero), U)


def test_tangent_of_antisymmetric_step_is_exact_rotation():
    """Repeated eigenvalues in the small exponential (a plane rotation by pi/2)."""
    U = torch.eye(4, dtype=torch.float64)
    e0, e1 = torch.eye(4, dtype=torch.float64)[:, :1], torch.eye(4, dtype=torch.float64)[:, 1:2]
    a = torch.cat([e0, -e1], -1) * torch.pi / 2
    b = torch.cat([e1, e0], -1)
    torch.testing.assert_close(projunn_t(U, a, b), tangent_reference(U, a, b), atol=1e-14, rtol=0)


@pytest.mark.parametrize("dtype", REAL_AND_COMPLEX)
def test_singular_direct_step_returns_a_closest_unitary(dtype):
    """U + a b^H singular: the closest unitary is not unique; one of them comes back, never NaN."""
    n = 5
    U = haar(n, dtype=dtype)
    x = randn(n, 1, dtype=dtype, seed=21)
    x = x / torch.linalg.vector_norm(x)
    a, b = -(U @ x), x  # (U - U x x^H) x = 0
    A = U + a @ b.mH
    assert torch.linalg.svdvals(A).min() < 1e-12
    result = projunn_d(U, a, b)
    assert torch.isfinite(result).all()
    assert gram_defect(result) < 1e-13
    singular_values = torch.linalg.svdvals(A)
    minimum = torch.linalg.vector_norm(singular_values - 1)  # distance from A to any polar factor
    torch.testing.assert_close(torch.linalg.matrix_norm(A - result), minimum, atol=1e-12, rtol=0)


# -- bad arguments --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["d", "t"])
def test_bad_arguments_name_the_problem(name):
    f = UPDATES[name]
    U, a = haar(4), randn(4, 1)
    with pytest.raises(ValueError, match=r"for U of shape \(4, 3\), a must have shape \(4, k\) and b \(3, k\)"):
        f(torch.zeros(4, 3, dtype=torch.float64), randn(4, 1), randn(4, 1))
    with pytest.raises(ValueError, match="with the same k"):
        f(U, a, randn(4, 2))
    with pytest.raises(ValueError, match=r"a must have shape \(4, k\)"):
        f(U, randn(5, 1), randn(5, 1))
    with pytest.raises(ValueError, match="rank k"):
        f(U, randn(4, 0), randn(4, 0))
    with pytest.raises(TypeError, match="b has dtype torch.float32 but U has dtype torch.float64"):
        f(U, a, randn(4, 1, dtype=torch.float32))
    with pytest.raises(TypeError, match="supported dtypes"):
        f(U.to(torch.float16), a.to(torch.float16), a.to(torch.float16))
    with pytest.raises(TypeError, match="supported dtypes"):
        f(torch.eye(4, dtype=torch.int64), a.long(), a.long())
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        f(U.tolist(), a, a)
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        f(U, a[:, 0], a[:, 0])
    with pytest.raises(ValueError, match="out has shape"):
        f(U, a, a, out=torch.empty(3, 3, dtype=torch.float64))
    with pytest.raises(TypeError, match="out has dtype"):
        f(U, a, a, out=torch.empty(4, 4))
    if torch.device("meta") != U.device:
        with pytest.raises(ValueError, match="device"):
            f(U, a, a.to("meta"))


# -- Note [No solver calls for rank 1]: the closed forms against the solver paths ----------------


@pytest.fixture
def closed_forms(monkeypatch):
    """The GPU's path (closed forms for rank 1) taken on the CPU."""
    monkeypatch.setattr(kernels, "CLOSED_FORMS_ON_CPU", True)


@pytest.mark.parametrize("columns", [2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.complex64, torch.complex128])
@pytest.mark.parametrize(
    "case", ["random", "first zero", "second zero", "parallel", "dependent", "tiny", "huge", "one column"]
)
def test_thin_qr_of_up_to_four_columns_is_a_qr(dtype, case, columns, closed_forms):
    """The 2k columns of ranks 1 and 2."""
    X = randn(4, 9, columns, dtype=dtype)
    # Far beyond what a float32 product can reach, then near the end of double precision's squares.
    single = dtype in (torch.float32, torch.complex64)
    X = X * {"tiny": 1e-30 if single else 1e-140, "huge": 1e30 if single else 1e140}.get(case, 1.0)
    if case == "first zero":
        X[..., 0] = 0
    if case == "second zero":
        X[..., 1] = 0
    if case == "parallel":
        X[..., 1] = X[..., 0] * 3
    if case == "dependent":  # the last column in the span of the others (two columns: parallel, negated)
        X[..., -1] = X[..., 0] - 2 * X[..., -2]
    if case == "one column":
        X = X[..., :1]
    Q, R = thin_qr(X)
    tol = 20 * eps(dtype)
    assert ((Q @ R - X).abs().amax() <= tol * X.abs().amax()).item()
    assert torch.equal(R, R.triu())
    # Orthonormal columns, except a zero column where X's column adds nothing new (it meets a zero row of R).
    kept = Q.abs().sum(-2) > 0
    gram = (Q.mH @ Q).to(torch.complex128)
    assert (gram - torch.diag_embed(kept.to(gram.dtype))).abs().amax() <= tol
    if case in ("random", "tiny", "huge", "one column"):
        assert kept.all()  # nothing lost to underflow or overflow


def test_thin_qr_lets_nan_through(closed_forms):
    X = randn(3, 5, 2)
    X[1, 2, 0] = float("nan")
    Q, _ = thin_qr(X)
    assert Q[1].isnan().any() and not Q[[0, 2]].isnan().any()


def _hermitian_2x2(case: str) -> torch.Tensor:
    M = randn(6, 2, 2, dtype=torch.complex128)
    H = (M + M.mH) / 2
    if case == "zero":
        H = torch.zeros_like(H)
    if case == "repeated":  # a multiple of I: rho = 0 with mu != 0
        H = 0.7 * torch.eye(2, dtype=H.dtype).expand(6, 2, 2)
    if case == "large":
        H = 40 * H
    if case == "real skew":  # what a real orthogonal update gives: i H real skew-symmetric
        H = 1j * torch.tensor([[0.0, 0.3], [-0.3, 0.0]], dtype=H.dtype).expand(6, 2, 2)
    return H


@pytest.mark.parametrize("case", ["random", "zero", "repeated", "large", "real skew"])
def test_exponential_of_a_2x2_block_matches_the_eigendecomposition(case):
    H = _hermitian_2x2(case)
    closed = _exp_i_minus_identity_2x2(H)
    torch.testing.assert_close(closed, _exp_i_minus_identity(H), atol=1e-14 * max(1.0, H.abs().max().item()), rtol=0)
    if case == "zero":
        assert torch.equal(closed, torch.zeros_like(closed))  # a zero step gives exactly U
    eye = torch.eye(2, dtype=H.dtype)
    assert ((closed + eye).mH @ (closed + eye) - eye).abs().max() < 1e-14


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
@pytest.mark.parametrize("case", ["random", "singular", "identity", "nearly singular"])
def test_polar_factor_of_a_2x2_block_is_a_closest_unitary_matrix(dtype, case):
    T = randn(6, 2, 2, dtype=dtype)
    if case == "singular":
        T[..., 1, :] = 3 * T[..., 0, :]
    if case == "identity":
        T = torch.eye(2, dtype=dtype).expand(6, 2, 2).clone()
    if case == "nearly singular":
        T[..., 1, :] = 3 * T[..., 0, :] + 1e-9 * randn(6, 2, dtype=dtype, seed=2)
    P = _polar_2x2(T)
    X, _, Yh = torch.linalg.svd(T)
    eye = torch.eye(2, dtype=dtype)
    assert (P.mH @ P - eye).abs().max() < 1e-15 * 4
    # As close to T as the SVD's factor (the same matrix unless T is singular, where every unitary
    # polar factor is a minimiser, Note [Singular projUNN-D steps]).
    distance = torch.linalg.matrix_norm(P - T) - torch.linalg.matrix_norm(X @ Yh - T)
    assert distance.abs().max() < 1e-14
    if case in ("random", "identity"):
        torch.testing.assert_close(P, X @ Yh, atol=1e-14, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
@pytest.mark.parametrize("case", ["random", "identity", "nearly singular", "singular", "zero"])
def test_inverse_square_root_of_a_2x2_block_matches_the_eigendecomposition(dtype, case):
    """What the Stiefel projUNN-D step needs of I + S (Note [Stiefel projUNN-D]): (I + S)^{-1/2} - I and
    which blocks are (nearly) singular, the closed form against eigh."""
    M = randn(6, 2, 2, dtype=dtype, scale=0.4)
    A = torch.eye(2, dtype=dtype) + (M + M.mH) / 2
    if case == "identity":
        A = torch.eye(2, dtype=dtype).expand(6, 2, 2).clone()
    if case in ("nearly singular", "singular"):
        v = randn(6, 2, 1, dtype=dtype, seed=3)
        A = v @ v.mH + (1e-6 if case == "nearly singular" else 0.0) * torch.eye(2, dtype=dtype)
    if case == "zero":
        A = torch.zeros(6, 2, 2, dtype=dtype)
    closed, degenerate = kernels._inverse_sqrt_2x2(A, 1e-4)
    with torch.no_grad():
        lam, V = torch.linalg.eigh(A)
    expected_degenerate = lam[..., 0] < 1e-4 * lam[..., -1].clamp_min(1.0)
    assert torch.equal(degenerate, expected_degenerate)
    assert degenerate.all() == (case in ("nearly singular", "singular", "zero"))
    assert torch.isfinite(closed).all()
    if not degenerate.any():
        reference = (V * (lam.rsqrt() - 1).unsqueeze(-2).to(dtype)) @ V.mH
        torch.testing.assert_close(closed, reference, atol=1e-14, rtol=0)


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("dtype", REAL_AND_COMPLEX)
@pytest.mark.parametrize("case", ["random", "zero step", "b along U^H a", "large"])
@pytest.mark.parametrize("method", ["t", "d"])
def test_rank_1_and_2_updates_on_the_gpus_path_match_the_dense_references(dtype, case, method, k, closed_forms):
    U, a, b = haar(12, batch=(3,), dtype=dtype), randn(3, 12, k, dtype=dtype, scale=0.3), randn(3, 12, k, dtype=dtype)
    if case == "zero step":
        a = torch.zeros_like(a)
    if case == "b along U^H a":  # a rank-deficient [b, U^H a]: the second column of Q is zero
        b = 2 * (U.mH @ a)
    if case == "large":
        a = 30 * a
    if method == "t":
        result, reference = projunn_t(U, a, b), tangent_reference(U, a, b)
    else:
        result, reference = projunn_d(U, a, b), polar_reference(U + a @ b.mH)
    torch.testing.assert_close(result, reference, atol=1e-12, rtol=0)
    assert gram_defect(result) < 1e-13
    if case == "zero step":
        assert torch.equal(result, U)


def test_the_lsi_sketch_in_closed_form_spans_what_householder_spans(closed_forms):
    D = randn(5, 20, 16, dtype=torch.float64)
    generator = torch.Generator().manual_seed(0)
    a, b = lowrank(D, 1, "lsi", generator=generator)
    kernels.CLOSED_FORMS_ON_CPU = False  # the solver path, the same random numbers
    a_ref, b_ref = lowrank(D, 1, "lsi", generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a @ b.mH, a_ref @ b_ref.mH, atol=1e-12, rtol=0)
