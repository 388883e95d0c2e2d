"""A 1-Lipschitz image classifier for certified robustness, built only from isometries.

Every layer is an orthogonal map, an isometric reshape or a norm-preserving
activation, so the network is 1-Lipschitz in L2 (to rounding) and its
predictions carry certified radii (:mod:`projunn.robust`):

- channels grow by zero-padding (:class:`projunn.nn.ChannelPad`);
- each stage is ``blocks`` x (full-width orthogonal convolution with a bias,
  :class:`projunn.nn.MaxMin`); biases shift, they do not stretch;
- resolution halves by the invertible space-to-depth reshuffle
  (:class:`projunn.nn.SpaceToDepth`), which quadruples the channels; strided
  subsampling and pooling would not be isometries;
- the head is a :class:`projunn.nn.StiefelLinear` with orthonormal rows, a
  1-Lipschitz projection of the flattened features onto the classes.

No BatchNorm (it rescales by batch statistics, with no useful bound) and no
pooling. The model is one ``torch.nn.Sequential``, so
:func:`projunn.robust.lipschitz_bound` composes its layers' bounds.
"""

from __future__ import annotations

import torch

from .._validation import REAL_DTYPES, check_int, check_ints, layer_dtype
from ..nn import ChannelPad, MaxMin, SpaceToDepth, StiefelLinear, UnitaryConv2d

__all__ = ["LipschitzCNN"]


class LipschitzCNN(torch.nn.Sequential):
    """Stages of (orthogonal conv + bias, MaxMin) x ``blocks``, joined by space-to-depth, then an orthonormal head.

    With ``channels`` C at full resolution, stage s has C * 4^s channels on an
    image (n / 2^s, m / 2^s). The convolutions are :class:`projunn.nn.UnitaryConv2d`,
    constrained like any projunn layer (``ProjUNN`` keeps them orthogonal).

    Args:
        channels: C, even (MaxMin sorts pairs of channels); >= ``in_channels``.
        size: (n, m) image size, divisible by 2^(stages - 1).
        blocks: convolutions per stage.
        stages: number of resolutions (2 for MNIST: 28 x 28, then 14 x 14).
        in_channels, classes: input channels and output classes.
        init: ``"haar"`` or ``"identity"`` for the convolutions (the head is Haar-random).
        dtype: float32 or float64. device, generator: as for the layers.

    Shape:
        (B, in_channels, n, m) -> (B, classes).

    Example:
        >>> from projunn.robust import lipschitz_bound
        >>> model = LipschitzCNN(channels=4, size=(8, 8), blocks=1, dtype=torch.float64)
        >>> model(torch.randn(2, 1, 8, 8, dtype=torch.float64)).shape
        torch.Size([2, 10])
        >>> abs(lipschitz_bound(model) - 1) < 1e-12
        True
    """

    def __init__(
        self,
        *,
        channels: int = 16,
        size: tuple[int, int] = (28, 28),
        blocks: int = 2,
        stages: int = 2,
        in_channels: int = 1,
        classes: int = 10,
        init: str = "haar",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        check_int("channels", channels)
        check_int("blocks", blocks)
        check_int("stages", stages)
        n, m = check_ints("size", size, 2)
        if channels % 2 or channels < in_channels:
            raise ValueError(f"channels must be even and >= in_channels ({in_channels}), got {channels}")
        if n % 2 ** (stages - 1) or m % 2 ** (stages - 1):
            raise ValueError(f"size {size} must be divisible by 2^(stages - 1) = {2 ** (stages - 1)}")
        options = {"init": init, "bias": True, "dtype": layer_dtype(dtype, REAL_DTYPES), "device": device}
        layers: list[torch.nn.Module] = [ChannelPad(in_channels, channels)]
        for stage in range(stages):
            if stage:
                layers.append(SpaceToDepth(2))
                channels, n, m = 4 * channels, n // 2, m // 2
            for _ in range(blocks):
                layers += [UnitaryConv2d(channels, (n, m), generator=generator, **options), MaxMin()]
        head = StiefelLinear(channels * n * m, classes, dtype=options["dtype"], device=device, generator=generator)
        super().__init__(*layers, torch.nn.Flatten(), head)
