"""Kernels shared by the square and the rectangular projUNN updates.

The r x r problems, solved in double precision (see Note [Exponential of the
small block] and Note [Singular projUNN-D steps] in ``_update.py``), and the
rank-r update of the large matrix.
"""

from __future__ import annotations

import torch

__all__ = [
    "ADJOINT_ROW_BLOCK",
    "add_low_rank",
    "adjoint_times",
    "direct_block",
    "double",
    "inverse_sqrt_minus_identity",
    "tangent_block",
    "thin_qr",
]

#: Rows per block of :func:`adjoint_times` (Note [Adjoint products by row blocks]).
ADJOINT_ROW_BLOCK = 256


def double(dtype: torch.dtype) -> torch.dtype:
    """The double-precision dtype of the same kind: float64 or complex128.

    Values converted to it are called ``precise`` (``a_precise``); "tall" and
    "wide" always describe a matrix's shape (N > M and N < M).
    """
    return torch.complex128 if dtype.is_complex else torch.float64


def adjoint_times(D: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """D^H X for a large D and a thin X, without copying D (Note [Adjoint products by row blocks]).

    Args:
        D: (..., n, m). X: (..., n, k), the same leading dimensions as D.

    Returns:
        (..., m, k), dtype and device of D; a view (the adjoint of a (..., k, m) tensor).
    """
    # Note [Adjoint products by row blocks]
    # ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
    # D^H X is formed as (X^H D)^H: ``D.mH @ X`` resolves the conjugate view of
    # a complex D into a full copy, and for real D the transposed product ran
    # ~10x slower in MKL. But X^H D is a k x n by n x m product with a tiny
    # first dimension, a shape MKL handles poorly: at N = 4096, float32, it took
    # 1.7-4x the time of D @ X (k = 1 to 16, 2-core EPYC). Cut into blocks of
    # rows, D = [D_1; ...; D_p] and X^H D = sum_i X_i^H D_i, it becomes one
    # batched product of p k x 256 by 256 x m blocks (a view of D, no copy)
    # and a sum of p small k x m partial results: measured 1.6-2x faster for
    # N = 1024-4096 and k = 1-16 (float32, complex64, complex128; float64 no
    # slower), and no faster below N = 512, where one call is kept. The sums
    # are taken in another order, so results differ from one product by
    # rounding; the cut depends only on the shape, so it rounds the same way
    # on every machine.
    n, m = D.shape[-2:]
    k = X.shape[-1]
    blocks = n // ADJOINT_ROW_BLOCK
    if blocks < 2 or D.device.type != "cpu" or not D.is_contiguous() or D.shape[:-2] != X.shape[:-2]:
        return (X.mH @ D).mH
    rows = blocks * ADJOINT_ROW_BLOCK
    D3, X3 = D.view(-1, n, m), X.reshape(-1, n, k)
    if D3.shape[0] > 1 and rows < n:  # the blocks of several matrices are one view only without a tail
        return torch.stack([adjoint_times(d, x) for d, x in zip(D3, X3)]).reshape(*D.shape[:-2], m, k)
    shape = (D3.shape[0] * blocks, ADJOINT_ROW_BLOCK)
    partial = torch.bmm(X3[:, :rows].reshape(*shape, k).mH, D3[:, :rows].reshape(*shape, m))
    total = partial.view(D3.shape[0], blocks, k, m).sum(1)
    if rows < n:
        total += X3[:, rows:].mH @ D3[:, rows:]
    return total.view(*D.shape[:-2], k, m).mH


# Note [No solver calls for rank 1]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
# At rank k = 1 (the paper's setting and the default) the small problems are
# a QR of one or two columns and a 2 x 2 exponential or polar factor. A
# solver (Householder QR, eigh, SVD) runs on a GPU as one library call per
# matrix from a host loop, with an error check that waits for the device:
# ~780 calls per step for one 28 x 28 orthogonal convolution's frequency
# matrices. So these sizes are solved with tensor operations, batched over
# all matrices at once and with no host synchronisation:
#
# - QR of one column: x / ||x||; of two to four (rank 2 too): classical
#   Gram-Schmidt with one reorthogonalisation (CGS2), orthogonal to rounding
#   like Householder QR. A zero column gives a zero column of Q (Householder
#   would give any unit vector): it meets a zero row of R, so Q R is unchanged,
#   and in the updates it meets a zero row and column of the r x r block (a
#   zero step there).
# - exp(S) - I for a 2 x 2 skew-Hermitian S = i H, H = mu I + rho P with
#   P^2 = I: e^{i mu} (cos rho I + i sinc(rho) (H - mu I)) - I, its scalar
#   parts written without cancellation as in Note [Exponential of the small block].
# - polar(T) for a 2 x 2 T: (T + e^{i theta} adj(T)^H) / sqrt(||T||_F^2 + 2 |det T|),
#   det T = |det T| e^{i theta}. With T = X diag(s) Y^H, e^{i theta} adj(T)^H =
#   s_1 s_2 T^{-H} = X diag(s_2, s_1) Y^H, so the numerator is (s_1 + s_2) X Y^H.
#   A singular T (s_2 = 0, any phase) gives X Y^H with some unit vector pair
#   for the null direction: a closest unitary matrix, as the SVD's is.
# - (I + S)^{-1/2} for the 2 x 2 Hermitian I + S of the Stiefel projUNN-D step
#   (:func:`_inverse_sqrt_2x2`). That step still asks the host once per
#   rectangular weight whether a matrix needs the dense projection (Note
#   [Stiefel projUNN-D]); projUNN-T, the default, never does.
#
# At rank 2 the tall QR is CGS2 as above, and the 4 x 4 problems keep torch's
# solvers: for matrices up to 32 x 32 in a batch, torch calls cuSOLVER's batched
# Jacobi eigensolver and SVD (syevjBatched, gesvdjBatched), one call for every
# matrix of a weight, not one per matrix; each waits for its error check.
#
# Both are exact to rounding; tests/test_update.py compares them with the
# solver paths and dense references, degenerate cases included. On the CPU,
# LAPACK's batched solvers wait for nothing and beat a dozen small tensor
# operations (the closed forms measured 1.15-1.5x slower in a projUNN step of
# orthogonal convolutions), so the CPU keeps them and its results are those of
# earlier versions bit for bit; ``CLOSED_FORMS_ON_CPU`` makes the CPU take the
# GPU's path, so that tests can count that path's operations here.


#: Take the closed forms on the CPU too (tests set it to run the GPU's path on the CPU).
CLOSED_FORMS_ON_CPU = False


def _closed_form(x: torch.Tensor) -> bool:
    """Whether the small problems of ``x``'s device are solved in closed form (Note [No solver calls for rank 1])."""
    return x.device.type != "cpu" or CLOSED_FORMS_ON_CPU


def _column_norm(x: torch.Tensor) -> torch.Tensor:
    """||x|| of columns (..., n, 1) as (..., 1, 1), real; summed squares (real arithmetic for complex)."""
    parts = torch.view_as_real(x.resolve_conj()) if x.is_complex() else x.unsqueeze(-1)
    return parts.square().sum(dim=(-3, -1)).sqrt().unsqueeze(-2)


def _unit(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x / ||x|| and ||x|| for columns x (..., n, 1); a zero column gives a zero column (a NaN stays NaN).

    Unscaled: :func:`thin_qr` passes double precision, whose squares stay finite and nonzero for
    entries between ~1e-150 and ~1e150 (any float32 value, any step a float64 run takes).
    """
    norm = _column_norm(x)
    return torch.where(norm == 0, 0, x / norm), norm.to(x.dtype)


#: The most columns :func:`thin_qr` orthonormalises in closed form off the CPU: the 2k of rank k <= 2.
GRAM_SCHMIDT_COLUMNS = 4


def thin_qr(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q (..., n, r) with orthonormal (or zero) columns and upper-triangular R (..., r, r), X = Q R.

    Up to four columns off the CPU without a solver call, in double precision
    (Note [No solver calls for rank 1]); otherwise Householder QR.
    """
    n, r = X.shape[-2:]
    if r > GRAM_SCHMIDT_COLUMNS or n < r or not _closed_form(X):
        return torch.linalg.qr(X)
    Q, R = _gram_schmidt(X.to(double(X.dtype)))
    return Q.to(X.dtype), R.to(X.dtype)


def _gram_schmidt(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`thin_qr` of a few columns: each normalised after two classical Gram-Schmidt passes (CGS2)
    against those before it, with elementwise inner products, not batches of tiny matrix products."""
    columns: list[torch.Tensor] = []
    R = X.new_zeros((*X.shape[:-2], X.shape[-1], X.shape[-1]))
    for j in range(X.shape[-1]):
        x = X[..., j : j + 1]
        if columns:
            basis = torch.cat(columns, dim=-1)  # (..., n, j)
            coefficients = (basis.conj() * x).sum(dim=-2, keepdim=True)  # (..., 1, j)
            x = x - (basis * coefficients).sum(dim=-1, keepdim=True)
            again = (basis.conj() * x).sum(dim=-2, keepdim=True)  # orthogonal to the basis to rounding
            x = x - (basis * again).sum(dim=-1, keepdim=True)
            R[..., :j, j] = (coefficients + again)[..., 0, :]
        q, R[..., j : j + 1, j : j + 1] = _unit(x)
        columns.append(q)
    return torch.cat(columns, dim=-1), R


def tangent_block(R_b: torch.Tensor, R_c: torch.Tensor) -> torch.Tensor:
    """exp(S) - I for S = (R_c R_b^H - R_b R_c^H) / 2, shape (..., r, r).

    See Note [Exponential of the small block] in ``_update.py``, and Note [No solver calls for rank 1].
    """
    M = R_c @ R_b.mH
    M = M.to(torch.complex128) if not M.is_complex() else M
    H = (M - M.mH) / 2j  # S = i H with H Hermitian
    block = _exp_i_minus_identity_2x2(H) if H.shape[-1] == 2 and _closed_form(H) else _exp_i_minus_identity(H)
    return block if R_b.is_complex() else block.real


def _half_turn(angle: torch.Tensor) -> torch.Tensor:
    """e^{i angle} - 1 = -2 sin^2(angle / 2) + i sin(angle), exact for small angles and exactly 0 at 0."""
    half = torch.sin(angle / 2)
    return torch.complex(-2 * half * half, torch.sin(angle))


def _exp_i_minus_identity(H: torch.Tensor) -> torch.Tensor:
    lam, V = torch.linalg.eigh(H)
    return (V * _half_turn(lam).unsqueeze(-2)) @ V.mH


def _exp_i_minus_identity_2x2(H: torch.Tensor) -> torch.Tensor:
    """exp(i H) - I for Hermitian 2 x 2 H (complex), in closed form (Note [No solver calls for rank 1])."""
    alpha, delta, beta = H[..., 0, 0].real, H[..., 1, 1].real, H[..., 0, 1]
    mu, d = (alpha + delta) / 2, (alpha - delta) / 2
    rho = torch.hypot(d, beta.abs())
    turn = _half_turn(mu)  # e^{i mu} - 1
    diagonal = turn * torch.cos(rho) - 2 * torch.sin(rho / 2).square()  # e^{i mu} cos(rho) - 1
    scale = 1j * (1 + turn) * torch.sinc(rho / torch.pi)  # i e^{i mu} sin(rho) / rho
    eye = torch.eye(2, dtype=H.dtype, device=H.device)
    return diagonal[..., None, None] * eye + scale[..., None, None] * (H - mu[..., None, None] * eye)


def inverse_sqrt_minus_identity(A: torch.Tensor, dense_below: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A^{-1/2} - I for Hermitian positive semidefinite A (..., r, r), and which A are (nearly) singular:
    smallest eigenvalue below ``dense_below`` times the largest (at least 1). The result is finite for
    those but meaningless (Note [Stiefel projUNN-D] in ``_stiefel.py``). See Note [No solver calls for rank 1]."""
    if A.shape[-1] == 2 and _closed_form(A):
        return _inverse_sqrt_2x2(A, dense_below)
    lam, V = torch.linalg.eigh(A)
    degenerate = lam[..., 0] < dense_below * lam[..., -1].clamp_min(1.0)
    scale = lam.clamp_min(torch.finfo(lam.dtype).tiny).rsqrt() - 1
    return (V * scale.unsqueeze(-2).to(V.dtype)) @ V.mH, degenerate


def _inverse_sqrt_2x2(A: torch.Tensor, dense_below: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`inverse_sqrt_minus_identity` of 2 x 2 matrices in closed form.

    For A = [[p, q], [conj q, r]] with determinant d = s^2 and trace tau, A^{1/2} = (A + s I) / t with
    t = sqrt(tau + 2 s), and det(A + s I) = s t^2, so A^{-1/2} = adj(A + s I) / (s t) =
    [[r + s, -q], [-conj q, p + s]] / (s t). The eigenvalues are tau / 2 +- sqrt(((p - r) / 2)^2 + |q|^2),
    the smaller taken as d over the larger. A must be positive semidefinite (a Gram matrix, as I + S
    is); d = p r - |q|^2 loses relative accuracy only where A is nearly singular, far below the
    ``dense_below`` threshold that sends such matrices to the dense projection.
    """
    p, r, q = A[..., 0, 0].real, A[..., 1, 1].real, A[..., 0, 1]
    tiny = torch.finfo(p.dtype).tiny
    largest = (p + r) / 2 + torch.hypot((p - r) / 2, q.abs())
    det = p * r - q.abs().square()
    degenerate = det / largest.clamp_min(tiny) < dense_below * largest.clamp_min(1.0)
    s = det.clamp_min(tiny).sqrt()
    scale = 1 / (s * (p + r + 2 * s).sqrt())
    inverse_sqrt = torch.stack(
        [torch.stack([(r + s) * scale, -q * scale], -1), torch.stack([-q.conj() * scale, (p + s) * scale], -1)], -2
    )
    return inverse_sqrt.to(A.dtype) - torch.eye(2, dtype=A.dtype, device=A.device), degenerate


def direct_block(R_b: torch.Tensor, R_c: torch.Tensor) -> torch.Tensor:
    """polar(I + R_c R_b^H) - I, shape (..., r, r). See Note [Singular projUNN-D steps] in ``_update.py``,
    and Note [No solver calls for rank 1]."""
    eye = torch.eye(R_c.shape[-2], dtype=R_c.dtype, device=R_c.device)
    T = eye + R_c @ R_b.mH
    if T.shape[-1] == 2 and _closed_form(T):
        return _polar_2x2(T) - eye
    X, _, Yh = torch.linalg.svd(T)
    return X @ Yh - eye


def _polar_2x2(T: torch.Tensor) -> torch.Tensor:
    """The unitary polar factor of 2 x 2 matrices, in closed form (Note [No solver calls for rank 1])."""
    a, b, c, d = T[..., 0, 0], T[..., 0, 1], T[..., 1, 0], T[..., 1, 1]
    det = a * d - b * c
    size = det.abs()
    phase = torch.where(size == 0, 1, det / size)  # any unit phase for a singular T
    adjoint_h = torch.stack([torch.stack([d, -c], -1), torch.stack([-b, a], -1)], -2).conj()
    scale = torch.sqrt(torch.linalg.matrix_norm(T).square() + 2 * size)
    return (T + phase[..., None, None] * adjoint_h) / scale[..., None, None]


def add_low_rank(
    W: torch.Tensor, left: torch.Tensor, right: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Return W + left @ right, written into ``out`` (allocated if None; it may be W itself).

    The rank-r term is added in place with one batched GEMM into a contiguous
    (..., N, M) buffer, so no N x M temporary is created beyond the result
    when ``out`` is None or contiguous. ``left`` and ``right`` must be computed
    before the call when ``out`` is W.

    See Note [One GEMM for every out]: whatever ``out`` is, the arithmetic is the
    same call on the same layouts, so the result is bit-for-bit the same.

    Args:
        W: (..., N, M), any strides. left: (..., N, r). right: (..., r, M).
        out: (..., N, M), any strides, or None.

    Returns:
        ``out`` (or the new tensor), holding W + left @ right.
    """
    # Note [One GEMM for every out]
    # BLAS libraries choose their kernel (blocking, FMA order, vector width)
    # from the operands' layouts, and MKL rounds ``C += A B`` differently from
    # ``C + (A B)``. A non-contiguous ``out`` (a column-major weight, as QR
    # returns) therefore gets the sum in a contiguous buffer through the very
    # same baddbmm as a fresh result, then a copy, which is exact; the one
    # N x M buffer is the price of the strided layout.
    target = out if out is not None and out.is_contiguous() else None
    if target is None:
        target = torch.empty(W.shape, dtype=W.dtype, device=W.device)
    if target is not W:
        target.copy_(W)
    # The batch counted, not -1: a process may hold no rows of a split weight (Note [Row-sharded projUNN]).
    batch, n, m, r = W.shape[:-2].numel(), W.shape[-2], W.shape[-1], left.shape[-1]
    target.view(batch, n, m).baddbmm_(left.reshape(batch, n, r), right.reshape(batch, r, m))
    if out is None or out is target:
        return target
    return out.copy_(target)
