"""Kernels shared by the square and the rectangular projUNN updates.

The r x r problems, solved in double precision (see Note [Exponential of the
small block] and Note [Singular projUNN-D steps] in ``_update.py``), and the
rank-r update of the large matrix.
"""

from __future__ import annotations

import torch

__all__ = ["ADJOINT_ROW_BLOCK", "add_low_rank", "adjoint_times", "direct_block", "double", "tangent_block"]

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


def tangent_block(R_b: torch.Tensor, R_c: torch.Tensor) -> torch.Tensor:
    """exp(S) - I for S = (R_c R_b^H - R_b R_c^H) / 2, shape (..., r, r).

    See Note [Exponential of the small block] in ``_update.py``.
    """
    M = R_c @ R_b.mH
    M = M.to(torch.complex128) if not M.is_complex() else M
    H = (M - M.mH) / 2j  # S = i H with H Hermitian
    lam, V = torch.linalg.eigh(H)
    # e^{i lam} - 1 written without cancellation, and exactly 0 for lam = 0.
    half = torch.sin(lam / 2)
    shift = torch.complex(-2 * half * half, torch.sin(lam))
    block = (V * shift.unsqueeze(-2)) @ V.mH
    return block if R_b.is_complex() else block.real


def direct_block(R_b: torch.Tensor, R_c: torch.Tensor) -> torch.Tensor:
    """polar(I + R_c R_b^H) - I, shape (..., r, r). See Note [Singular projUNN-D steps] in ``_update.py``."""
    eye = torch.eye(R_c.shape[-2], dtype=R_c.dtype, device=R_c.device)
    X, _, Yh = torch.linalg.svd(eye + R_c @ R_b.mH)
    return X @ Yh - eye


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
