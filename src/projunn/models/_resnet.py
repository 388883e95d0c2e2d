"""ResNet-9 built from full-width orthogonal convolutions (the paper's CIFAR-10 model).

The layout follows the common nine-layer residual network (a stem, three
stages with a residual pair in the first and last, a classifier): eight
convolutions and one linear layer. Every convolution is a
:class:`projunn.nn.UnitaryConv2d`, and the shape changes are isometries:

- channels grow by zero-padding (:class:`projunn.nn.ChannelPad`) in the stem;
- a stride of 2 is an invertible space-to-depth reshuffle
  (:class:`projunn.nn.SpaceToDepth`), which quadruples the channels instead of
  discarding three pixels in four. So widths grow 4x per stride (w, 4w,
  16w, 64w) where the usual ResNet-9 doubles them; ``width`` is kept small
  to compensate.

What is *not* an isometry, by design: BatchNorm and ReLU after each conv,
the residual sums ``x + f(x)``, and the final global max pooling. The
orthogonal convolutions keep each linear map norm preserving; the network
as a whole is not.
"""

from __future__ import annotations

import torch

from .._validation import REAL_DTYPES, check_int, layer_dtype
from ..nn import ChannelPad, SpaceToDepth
from ._cnn import _ConvBlock

__all__ = ["UnitaryResNet9"]


class _Residual(torch.nn.Module):
    """x + f(x), f two conv blocks."""

    def __init__(self, channels: int, size: tuple[int, int], init: str, **options) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(
            _ConvBlock(channels, size, init, **options), _ConvBlock(channels, size, init, **options)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class UnitaryResNet9(torch.nn.Module):
    """ResNet-9 with full-width orthogonal convolutions and isometric shape changes.

    ``stem -> stage1 (stride, conv, residual) -> stage2 (stride, conv) ->
    stage3 (stride, conv, residual) -> global max pool -> linear``.

    Each stage strides by 2 when its input size is even in both dimensions
    and keeps the size otherwise, so 32 x 32 inputs (CIFAR-10) go to 16, 8, 4
    and 28 x 28 inputs (MNIST, Fashion-MNIST) to 14, 7, 7.

    Args:
        width: channels of the stem, w (a stride multiplies channels by 4).
        size: (n, m) input size.
        in_channels, classes: input channels (<= width) and output classes.
        init: ``"identity"`` or ``"haar"`` for every conv.
        dtype: float32 or float64, the real dtype of the model (default:
            torch's default dtype).
        device: where to allocate the parameters.
        generator: randomness for ``"haar"``.

    Shape:
        (B, in_channels, n, m) -> (B, classes).

    Example:
        >>> model = UnitaryResNet9(width=4, size=(8, 8), dtype=torch.float64)  # 8 -> 4 -> 2 -> 1
        >>> model(torch.randn(2, 3, 8, 8, dtype=torch.float64)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        *,
        width: int = 8,
        size: tuple[int, int] = (32, 32),
        in_channels: int = 3,
        classes: int = 10,
        init: str = "identity",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        check_int("width", width)
        check_int("in_channels", in_channels)
        if in_channels > width:
            raise ValueError(f"in_channels ({in_channels}) must be <= width ({width}): channels grow by zero-padding")
        size = tuple(size)
        factory = {"dtype": layer_dtype(dtype, REAL_DTYPES), "device": device}
        block = lambda c, s: _ConvBlock(c, s, init, generator=generator, **factory)  # noqa: E731
        residual = lambda c, s: _Residual(c, s, init, generator=generator, **factory)  # noqa: E731

        self.stem = torch.nn.Sequential(ChannelPad(in_channels, width), block(width, size))
        channels = width
        stages = []
        for with_residual in (True, False, True):
            layers = []
            if size[0] % 2 == 0 and size[1] % 2 == 0:
                layers.append(SpaceToDepth(2))
                channels, size = 4 * channels, (size[0] // 2, size[1] // 2)
            layers.append(block(channels, size))
            if with_residual:
                layers.append(residual(channels, size))
            stages.append(torch.nn.Sequential(*layers))
        self.stages = torch.nn.Sequential(*stages)
        self.head = torch.nn.Linear(channels, classes, **factory)
        self.features = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stages(self.stem(x))
        return self.head(h.amax(dim=(-2, -1)))
