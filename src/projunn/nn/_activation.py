"""Activations that keep norms, for networks whose every layer is 1-Lipschitz."""

from __future__ import annotations

import torch

from .._validation import check_int

__all__ = ["MaxMin"]


class MaxMin(torch.nn.Module):
    """Sort each pair of channels: (a, b) -> (max(a, b), min(a, b)), the channels split in halves.

    GroupSort with groups of 2 (Anil, Lucas & Grosse, "Sorting out Lipschitz
    function approximation", ICML 2019). On every input it permutes entries, so
    it preserves norms, and it is 1-Lipschitz in L2; ReLU is 1-Lipschitz too
    but discards half the signal, which a deep norm-preserving network cannot
    afford (its gradient norms shrink layer by layer).

    Args:
        dim: the channel dimension (default 1, as in (B, C, n, m)); its size must be even.

    Shape:
        any, unchanged.

    Example:
        >>> x = torch.tensor([[3.0, -1.0, 1.0, 2.0]])
        >>> MaxMin()(x)
        tensor([[ 3.,  2.,  1., -1.]])
    """

    def __init__(self, dim: int = 1) -> None:
        super().__init__()
        self.dim = check_int("dim", dim, minimum=-8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[self.dim] % 2:
            raise ValueError(f"MaxMin needs an even size along dim {self.dim}, got shape {tuple(x.shape)}")
        a, b = x.chunk(2, dim=self.dim)
        return torch.cat([torch.maximum(a, b), torch.minimum(a, b)], dim=self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"
