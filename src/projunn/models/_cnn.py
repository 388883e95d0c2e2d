"""The deep plain CNN of the paper's MNIST experiment, and the conv block it shares with ResNet-9."""

from __future__ import annotations

import torch

from .._validation import REAL_DTYPES, check_int, layer_dtype
from ..nn import ChannelPad, UnitaryConv2d

__all__ = ["DeepUnitaryCNN"]


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

    Every conv is a full-width :class:`projunn.nn.UnitaryConv2d` of
    ``channels`` channels on the full image; the input's channels are
    zero-padded up to ``channels`` (:class:`projunn.nn.ChannelPad`, an
    isometry). With projUNN the convs stay orthogonal; with ``method none``
    the same model trains unconstrained.

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

    Shape:
        (B, in_channels, n, m) -> (B, classes).

    Example:
        >>> model = DeepUnitaryCNN(3, channels=4, size=(8, 8), dtype=torch.float64)
        >>> model(torch.randn(2, 1, 8, 8, dtype=torch.float64)).shape
        torch.Size([2, 10])
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
