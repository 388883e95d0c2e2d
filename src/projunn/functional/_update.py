"""projUNN-D and projUNN-T: exact unitary updates by a low-rank step in O(k N^2).

Note [The 2k-dimensional subspace]
----------------------------------
Both updates reduce to a problem of size r = min(N, 2k). Let c = U^H a and take
a thin QR of the N x 2k block [b, c] = Q R, so that b = Q R_b and c = Q R_c
with R_b, R_c the first and last k columns of R (r x k each). Householder QR
(k > 1) returns an orthonormal Q even when [b, c] is rank deficient (zero
update, b parallel to c, ...); the two-column QR of k = 1 off the CPU (the
closed forms of ``functional/_kernels.py``) returns a zero column there instead,
which meets a zero row of R and so a zero row and column of the blocks below. Either way span(Q)
contains b and c and nothing below divides by anything that can vanish.

Because U is unitary, a = U c, hence

    U + a b^H = U (I + c b^H) = U (P + Q T0 Q^H),   T0 = I + R_c R_b^H,

with P = I - Q Q^H the projector onto span(Q)^perp. The matrix in brackets is
block diagonal in the basis [Q, Q_perp], so any matrix function that respects
that split acts only on the r x r block:

    projUNN-D:  polar(U + a b^H) = U + (U Q)(polar(T0) - I) Q^H
    projUNN-T:  U exp(K)         = U + (U Q)(exp(S)  - I) Q^H,
                K = (c b^H - b c^H) / 2 = Q S Q^H,  S = (R_c R_b^H - R_b R_c^H) / 2.

The N-sized work is one product U^H a (N x N by N x k), one product U Q
(N x N by N x r) and one rank-r update of an N x N matrix. Real inputs stay
real throughout: Q, R, S and T0 are real when U, a, b are.

Note [Singular projUNN-D steps]
-------------------------------
U + a b^H is singular exactly when T0 is. The closest unitary matrix in
Frobenius norm is then not unique (every unitary polar factor attains the
minimum). polar(T0) is taken from the SVD T0 = X diag(s) Y^H as X Y^H, which
is always unitary and always one of the minimisers, so projunn_d returns a
closest unitary matrix, never NaN, with no special case.

Note [Double-precision small problem]
-------------------------------------
The thin QR of [b, c] and the r x r exponential / SVD cost O(N k^2) and
O(k^3), so they are always solved in float64 (complex128), whatever the
dtype of U, and only the N x N products run in U's dtype. In float32 this is
what keeps the update at the rounding floor: with a float32 QR the basis Q is
orthonormal only to ~N * eps and every step adds that defect to U, which
measured ~100x more drift from unitarity over 2,000 large steps at N = 128
than rounding U + (U Q) B Q^H once per step (the unavoidable floor of any
method that stores U in float32).

Note [Exponential of the small block]
-------------------------------------
exp(S) - I is formed from the Hermitian eigendecomposition -i S = V diag(lam) V^H
as V diag(e^{i lam} - 1) V^H, not with torch.linalg.matrix_exp: the latter's
Taylor/Pade truncation left exp(S) unitary only to ~2e-12 in float64 for a
4 x 4 S of norm 0.085 (and worse as the norm grows), while V is unitary to
rounding and e^{i lam} has modulus one for any lam, so the block is unitary
to rounding for any step size. Writing e^{i lam} - 1 = -2 sin^2(lam / 2) +
i sin(lam) keeps small steps exact and makes a zero step give exactly U.
For real input the block is real up to rounding and its real part is used.
"""

from __future__ import annotations

import torch

from .._rows import ALL_ROWS, Rows
from .._validation import check_out, check_update_args
from ._kernels import add_low_rank, adjoint_times, direct_block, double, tangent_block, thin_qr
from ._stiefel import stiefel_d, stiefel_t

__all__ = ["projunn_d", "projunn_t"]


def _subspace(
    U: torch.Tensor, a: torch.Tensor, b: torch.Tensor, rows: Rows
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Orthonormal basis of span[b, U^H a] and the coordinates of b and U^H a in it.

    See Note [The 2k-dimensional subspace]. The thin QR is taken in double
    precision (Note [Double-precision small problem]).

    Args:
        U: (..., N, N) unitary, or this process's rows of it (``rows``).
        a, b: (..., N, k), a by rows as U.

    Returns:
        Q: (..., N, r) orthonormal columns, r = min(N, 2k), in double precision.
        R_b, R_c: (..., r, k) with b = Q R_b and U^H a = Q R_c, in double precision.
    """
    k = a.shape[-1]
    precise = double(U.dtype)
    c = rows.sum(adjoint_times(U, a))
    Q, R = thin_qr(torch.cat([b.to(precise), c.to(precise)], dim=-1))
    return Q, R[..., :k], R[..., k:]


_RULES = {"t": (tangent_block, stiefel_t), "d": (direct_block, stiefel_d)}


def update(
    method: str,
    U: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    rows: Rows = ALL_ROWS,
) -> torch.Tensor:
    """:func:`projunn_t` (``method="t"``) or :func:`projunn_d` (``"d"``), the arguments unchecked.

    U, a and ``out`` may be this process's rows of matrices whose rows ``rows``
    splits over processes (b is whole); the result is then this process's rows
    of the update (Note [Row-sharded projUNN]).
    """
    block_fn, stiefel_fn = _RULES[method]
    if rows.count(U.shape[-2]) != U.shape[-1]:
        return stiefel_fn(U, a, b, out, rows)
    Q, R_b, R_c = _subspace(U, a, b, rows)
    Q = Q.to(U.dtype)
    # U + (U Q) block Q^H, the left factor formed before ``out`` (which may be U) is written.
    return add_low_rank(U, (U @ Q) @ block_fn(R_b, R_c).to(U.dtype), Q.mH, out)


def _checked(U: torch.Tensor, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None) -> None:
    check_update_args(U, a, b)
    if out is not None:
        check_out(out, U)


def projunn_d(U: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    r"""projUNN-D: the unitary matrix closest to the stepped matrix ``U + a b^H``.

    .. math::
        U_{new} = \operatorname{polar}(U + a b^H) = A (A^H A)^{-1/2},\quad A = U + a b^H,

    computed in O(k N^2) through the 2k-dimensional subspace spanned by b and
    U^H a (Note [The 2k-dimensional subspace]). Real inputs give a real
    orthogonal result.

    When ``U + a b^H`` is singular the closest unitary matrix is not unique;
    the function then returns one of them (a unitary matrix at the minimal
    Frobenius distance), never NaN. See Note [Singular projUNN-D steps].

    A rectangular U (..., N, M) is semi-unitary (orthonormal columns if
    N > M, rows if N < M) and the result is the closest semi-unitary matrix,
    in O(k N M) (Note [Stiefel projUNN-D] in ``_stiefel.py``).

    Args:
        U: (..., N, N) unitary (orthogonal if real) matrix, or (..., N, M)
            semi-unitary; float32, float64, complex64 or complex128. The
            result assumes U is (semi-)unitary: the update uses U^H as its inverse.
        a, b: (..., N, k) and (..., M, k) factors of the step ``D = a @ b.mH``,
            any k >= 1 (2k >= N is allowed), same dtype and device as U.
        out: optional tensor shaped like U for the result; may be U
            itself to update in place. U, a and b are otherwise never modified.

    Returns:
        tensor shaped like U, (semi-)unitary, dtype and device of U.

    An update rule, not a layer: call it outside autograd (as optimisers do).
    Its gradient is not finite at degenerate inputs such as a zero step.

    Raises:
        TypeError: a non-tensor argument, unsupported dtype, or mismatched dtypes.
        ValueError: a/b shapes that do not match U, k < 1,
            mismatched devices, or a badly shaped ``out``.

    Example:
        >>> U = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64))[0]
        >>> a, b = torch.randn(5, 1, dtype=torch.float64), torch.randn(5, 1, dtype=torch.float64)
        >>> V = projunn_d(U, 0.1 * a, b)
        >>> torch.allclose(V.mT @ V, torch.eye(5, dtype=torch.float64))
        True
    """
    _checked(U, a, b, out)
    return update("d", U, a, b, out=out)


def projunn_t(U: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    r"""projUNN-T: follow the geodesic of U in the tangent direction of the step ``a b^H``.

    .. math::
        U_{new} = U \exp(K),\qquad K = \tfrac12\,(U^H a b^H - b a^H U),

    K being the skew-Hermitian part of ``U^H D`` for the step ``D = a b^H``.
    K has rank <= 2k, so the exponential is taken of a min(N, 2k)-square
    skew-Hermitian matrix and applied in O(k N^2)
    (Note [The 2k-dimensional subspace]). No inversion is involved: the
    result is unitary for any step size, and a zero step returns U.

    A tall semi-unitary U (..., N, M), N > M, moves to exp(A) U with
    A = (a (U b)^H - (U b) a^H) / 2, in the tangent direction of the step
    under the canonical metric, in O(k N M); a wide one is handled through
    its conjugate transpose (Note [Stiefel projUNN-T] in ``_stiefel.py``).
    For square U this is the same matrix as U exp(K).

    Args:
        U: (..., N, N) unitary (orthogonal if real), or (..., N, M)
            semi-unitary; float32, float64, complex64 or complex128.
        a, b: (..., N, k) and (..., M, k), any k >= 1, same dtype and device as U.
        out: optional tensor shaped like U for the result; may be U
            itself to update in place. U, a and b are otherwise never modified.

    Returns:
        tensor shaped like U, (semi-)unitary, dtype and device of U.

    Raises:
        TypeError, ValueError: as for :func:`projunn_d`.

    Example:
        >>> U = torch.eye(4, dtype=torch.float64)
        >>> a, b = torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
        >>> K = (a @ b.mT - b @ a.mT) / 2
        >>> torch.allclose(projunn_t(U, a, b), torch.linalg.matrix_exp(K))
        True
    """
    _checked(U, a, b, out)
    return update("t", U, a, b, out=out)
