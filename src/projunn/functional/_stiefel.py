"""projUNN-D and projUNN-T for rectangular (semi-unitary, Stiefel) matrices in O(k N M).

A tall N x M matrix W (N > M) is semi-unitary when W^H W = I_M (orthonormal
columns); a wide one (N < M) when W W^H = I_N (orthonormal rows). Wide
matrices are handled as the conjugate transpose of a tall one: the step
a b^H of W is the step b a^H of W^H, and both updates commute with ^H.

Note [Stiefel projUNN-D]
------------------------
For Y = W + a b^H (tall, N x M) the closest semi-unitary matrix is the polar
factor Y (Y^H Y)^{-1/2}. With c = W^H a,

    Y^H Y = I + c b^H + b c^H + b (a^H a) b^H,

the identity plus a Hermitian matrix supported on span[b, c]. With the QR
[b, c] = Q R (b = Q R_b, c = Q R_c) this is I + Q S Q^H,
S = R_c R_b^H + R_b R_c^H + R_b (a^H a) R_b^H (r x r, r = min(M, 2k)), so

    (Y^H Y)^{-1/2} = I + Q C Q^H,  C = (I + S)^{-1/2} - I,

and since Y Q = W Q + a R_b^H,

    polar(Y) = W + ((W Q) C + a R_b^H (I + C)) Q^H,

one rank-r update of W after the products W^H a and W Q: O(k N M). For a
square W this is the same matrix as :func:`projunn_d`.

When Y is (nearly) rank deficient, I + S has a (nearly) zero eigenvalue and
the inverse square root loses accuracy; the polar factor is then not unique
anyway. Those matrices of the batch (smallest eigenvalue below 1e-4 times the
largest, i.e. the step shrinks some direction of W a hundredfold, a step no
training run takes) are projected exactly by a dense SVD instead, so the
result is semi-unitary, never NaN.

Note [Stiefel projUNN-T]
------------------------
W moves along t -> exp(t A) W with the skew-Hermitian N x N matrix

    A = (a (W b)^H - (W b) a^H) / 2,

whose velocity A W = (D - W D^H W) / 2 at t = 0 (D = a b^H, W^H W = I) is the
step's component in the tangent space under the canonical metric of the
Stiefel manifold (the Riemannian gradient direction when D is minus a
gradient). exp(A) is unitary, so exp(A) W is exactly semi-unitary for any
step. For a square W, exp(A) W = W exp(W^H A W) = projunn_t(W, a, b).
A has rank <= 2k: with the QR [W b, a] = L R (W b = L R_1, a = L R_2),
A = L S L^H, S = (R_2 R_1^H - R_1 R_2^H) / 2, and

    exp(A) W = W + L (exp(S) - I) (L^H W),

again O(k N M). The small problems run in double precision as for square
matrices (Note [Double-precision small problem] in ``_update.py``).
"""

from __future__ import annotations

import torch

from .._rows import ALL_ROWS, Rows
from ._kernels import add_low_rank, adjoint_times, double, inverse_sqrt_minus_identity, tangent_block, thin_qr
from ._unitary import closest_unitary

__all__ = ["stiefel_d", "stiefel_t"]

# Smallest eigenvalue of (Y^H Y) restricted to the subspace, relative to the
# largest, below which the dense SVD polar factor is used (Note [Stiefel projUNN-D]).
_DENSE_BELOW = 1e-4


def _as_tall(fn):
    """Run a tall-matrix update as is, and on the conjugate transpose of a wide W.

    The tall update takes how W's rows and how its columns (the rows of W^H)
    are split; a wide W's split rows are the split columns of W^H
    (Note [Row-sharded projUNN]).
    """

    def update(
        W: torch.Tensor, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None, rows: Rows = ALL_ROWS
    ) -> torch.Tensor:
        if rows.count(W.shape[-2]) >= W.shape[-1]:
            return fn(W, a, b, out, rows, ALL_ROWS)
        if out is None:  # a plain tensor: .mH of the result is a lazily conjugated view
            out = torch.empty(W.shape, dtype=W.dtype, device=W.device)
        return out.copy_(fn(W.mH, b, a, None, ALL_ROWS, rows).mH)

    update.__doc__ = fn.__doc__
    return update


def _tall_qr(X: torch.Tensor, rows: Rows) -> tuple[torch.Tensor, torch.Tensor]:
    """The QR of a tall block whose rows are split as ``rows`` says: on one process :func:`thin_qr`
    (a few columns off the CPU without a solver call, Note [No solver calls for rank 1])."""
    return thin_qr(X) if rows is ALL_ROWS else rows.qr(X)


@_as_tall
def stiefel_d(
    W: torch.Tensor, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None, rows: Rows, cols: Rows
) -> torch.Tensor:
    """polar(W + a b^H) for tall W (..., N, M), a (..., N, k), b (..., M, k). Note [Stiefel projUNN-D].

    ``rows`` and ``cols`` say how W's rows and columns are split over processes (a and b split alike).
    """
    k = a.shape[-1]
    precise = double(W.dtype)
    c = rows.sum(adjoint_times(W, a))  # (..., M, k)
    Q, R = _tall_qr(torch.cat([b.to(precise), c.to(precise)], dim=-1), cols)
    R_b, R_c = R[..., :k], R[..., k:]
    a_precise = a.to(precise)
    S = R_c @ R_b.mH + R_b @ R_c.mH + R_b @ rows.sum(a_precise.mH @ a_precise) @ R_b.mH
    eye = torch.eye(S.shape[-1], dtype=precise, device=W.device)
    C, degenerate = inverse_sqrt_minus_identity(eye + (S + S.mH) / 2, _DENSE_BELOW)
    # Dense fallback for the degenerate matrices, formed before ``out`` (which may be W) is written.
    fallback = _polar((W + a @ b.mH)[degenerate], rows, cols) if bool(degenerate.any()) else None
    left = cols.sum(W @ Q.to(W.dtype)) @ C.to(W.dtype) + a @ (R_b.mH @ (eye + C)).to(W.dtype)
    result = add_low_rank(W, left, Q.mH.to(W.dtype), out)
    if fallback is not None:
        result[degenerate] = fallback
    return result


def _polar(Y: torch.Tensor, rows: Rows, cols: Rows) -> torch.Tensor:
    """This process's block of closest_unitary of the matrix whose rows and columns are split as said.

    The matrix is gathered whole (a dense SVD of a step no training run takes, Note [Stiefel projUNN-D]).
    """
    whole = cols.gather(rows.gather(Y).mH).mH
    return cols.take(rows.take(closest_unitary(whole)).mH).mH


@_as_tall
def stiefel_t(
    W: torch.Tensor, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None, rows: Rows, cols: Rows
) -> torch.Tensor:
    """exp(A) W, A = (a (W b)^H - (W b) a^H) / 2, for tall W (..., N, M). Note [Stiefel projUNN-T].

    ``rows`` and ``cols`` say how W's rows and columns are split over processes (a and b split alike).
    """
    k = a.shape[-1]
    precise = double(W.dtype)
    L, R = _tall_qr(torch.cat([cols.sum(W @ b).to(precise), a.to(precise)], dim=-1), rows)
    block = tangent_block(R[..., :k], R[..., k:])  # exp(S) - I, S = (R_2 R_1^H - R_1 R_2^H) / 2
    L = L.to(W.dtype)
    return add_low_rank(W, L, block.to(W.dtype) @ rows.sum(adjoint_times(W, L)).mH, out)
