"""The r x r problems of the projUNN updates, solved in double precision.

See Note [Exponential of the small block] and Note [Singular projUNN-D steps]
in ``_update.py``.
"""

from __future__ import annotations

import torch

__all__ = ["direct_block", "double", "tangent_block"]


def double(dtype: torch.dtype) -> torch.dtype:
    return torch.complex128 if dtype.is_complex else torch.float64


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
