"""Shape changes that keep norms, and the deep plain CNN of the paper's MNIST experiment."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._validation import REAL_DTYPES, check_int
from ._conv import UnitaryConv2d
from ._dtype import layer_dtype

__all__ = ["ChannelPad", "DeepUnitaryCNN", "SpaceToDepth"]


class ChannelPad(torch.nn.Module):
    """Append zero channels: C_in -> C_out >= C_in, an isometry (norms are unchanged).

    The way up in channels that keeps a network norm preserving; going down
    by dropping channels would be a contraction, so it is refused here.

    Shape:
        (B, C_in, ...) -> (B, C_out, ...).
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


class _ConvBlock(torch.nn.Sequential):
    """Orthogonal conv, BatchNorm, ReLU; (B, C, n, m) -> (B, C, n, m)."""

    def __init__(self, channels: int, size: tuple[int, int], init: str, *, dtype, device, generator) -> None:
        super().__init__(
            UnitaryConv2d(channels, size, init=init, dtype=dtype, device=device, generator=generator),
            torch.nn.BatchNorm2d(channels, dtype=dtype, device=device),
            torch.nn.ReLU(),
        )


class DeepUnitaryCNN(torch.nn.Module):
    """The paper's deep plain CNN: (conv, BatchNorm, ReLU) x depth, then a linear classifier.

    Every conv is a full-width :class:`UnitaryConv2d` of ``channels``
    channels on the full image; the input's channels are zero-padded up to
    ``channels`` (an isometry). With projUNN the convs stay orthogonal; with
    ``method none`` the same model trains unconstrained.

    Args:
        depth: number of conv blocks (the paper: up to 100).
        channels: width (the paper: 32).
        size: (n, m) image size.
        in_channels, classes: input channels and output classes.
        init: ``"identity"`` or ``"haar"`` for every conv.
        dtype: float32 or float64, the real dtype of the model (default:
            torch's default dtype). Use this rather than ``.double()``, which
            leaves the convolutions' complex parameters unchanged.
        device: where to allocate the parameters.
        generator: randomness for ``"haar"``.
    """

    def __init__(
        self,
        depth: int,
        *,
        channels: int = 32,
        size: tuple[int, int] = (28, 28),
        in_channels: int = 1,
        classes: int = 10,
        init: str = "identity",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        check_int("depth", depth)
        factory = {"dtype": layer_dtype(dtype, REAL_DTYPES), "device": device}
        self.stem = ChannelPad(in_channels, channels)
        self.blocks = torch.nn.Sequential(
            *(_ConvBlock(channels, size, init, generator=generator, **factory) for _ in range(depth))
        )
        # A linear classifier on the whole feature map: global average pooling
        # would leave it about one informative number per channel, and with
        # zero-padded input channels and identity-initialised convs nearly
        # nothing to learn from at the start.
        self.head = torch.nn.Linear(channels * size[0] * size[1], classes, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).flatten(1))
