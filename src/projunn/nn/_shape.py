"""Shape changes that keep norms: the ways up in channels and down in resolution of an isometric network."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._validation import check_int

__all__ = ["ChannelPad", "SpaceToDepth"]


class ChannelPad(torch.nn.Module):
    """Append zero channels: C_in -> C_out >= C_in, an isometry (norms are unchanged).

    The way up in channels that keeps a network norm preserving; going down
    by dropping channels would be a contraction, so it is refused here.

    Shape:
        (B, C_in, ...) -> (B, C_out, ...).

    Example:
        >>> pad = ChannelPad(1, 4)
        >>> x = torch.randn(2, 1, 5, 5)
        >>> y = pad(x)
        >>> y.shape, torch.allclose(y.norm(), x.norm())
        (torch.Size([2, 4, 5, 5]), True)
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        check_int("in_channels", in_channels)
        check_int("out_channels", out_channels)
        if in_channels > out_channels:
            raise ValueError(
                f"ChannelPad needs 1 <= in_channels <= out_channels (dropping channels is not an isometry), "
                f"got {in_channels} -> {out_channels}"
            )
        self.in_channels, self.out_channels = in_channels, out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.in_channels:
            raise ValueError(f"expected {self.in_channels} channels, got shape {tuple(x.shape)}")
        pad = [0, 0] * (x.dim() - 2) + [0, self.out_channels - self.in_channels]
        return F.pad(x, pad)

    def extra_repr(self) -> str:
        return f"{self.in_channels} -> {self.out_channels}"


class SpaceToDepth(torch.nn.Module):
    """Invertible stride: move each factor x factor block of pixels into channels.

    (B, C, n, m) -> (B, C * factor^2, n / factor, m / factor). A permutation of
    the entries, so exactly norm preserving, unlike strided subsampling or
    pooling, which discard or average entries (not isometries).

    Example:
        >>> x = torch.randn(2, 3, 8, 6)
        >>> y = SpaceToDepth(2)(x)
        >>> y.shape, torch.allclose(y.norm(), x.norm())
        (torch.Size([2, 12, 4, 3]), True)
    """

    def __init__(self, factor: int) -> None:
        super().__init__()
        self.factor = check_int("factor", factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % self.factor or x.shape[-2] % self.factor:
            raise ValueError(f"spatial size {tuple(x.shape[-2:])} is not divisible by factor {self.factor}")
        return F.pixel_unshuffle(x, self.factor)

    def extra_repr(self) -> str:
        return f"factor={self.factor}"
