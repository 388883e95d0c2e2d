"""The long-memory benchmarks of unitary RNNs: the copy task and the adding task.

Both generators are pure functions of a ``torch.Generator``, so a seed fixes
every batch a run sees.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "COPY_ALPHABET",
    "COPY_BLANK",
    "COPY_MARKER",
    "COPY_SYMBOLS",
    "adding_baseline",
    "adding_batch",
    "copy_baseline",
    "copy_batch",
]

COPY_ALPHABET = 8  #: symbols to remember are 1..8
COPY_SYMBOLS = 10  #: how many symbols are shown and must be recalled
COPY_BLANK = 0  #: token of an empty step
COPY_MARKER = COPY_ALPHABET + 1  #: token telling the network to start recalling


def _check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def copy_batch(
    batch_size: int, delay: int, *, generator: torch.Generator | None = None, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of the copy-memory task (Hochreiter & Schmidhuber; Arjovsky et al. 2016).

    The input shows 10 symbols from {1..8}, then ``delay - 1`` blanks, a
    marker, and 10 more blanks; the target is blank everywhere except the last
    10 steps, where it repeats the 10 symbols. Sequence length ``delay + 20``.

    Args:
        batch_size: B.
        delay: T, the number of steps between the last symbol and the marker
            plus one (the paper: 1000 and 2000).
        generator: source of randomness.

    Returns:
        inputs: (B, T + 20) int64 tokens in 0..9 (0 blank, 9 marker).
        targets: (B, T + 20) int64 classes in 0..8 (0 blank).

    Example:
        >>> x, y = copy_batch(2, 5, generator=torch.Generator().manual_seed(0))
        >>> x.shape, y.shape
        (torch.Size([2, 25]), torch.Size([2, 25]))
        >>> torch.equal(y[:, -10:], x[:, :10])  # the last 10 steps recall the first 10 symbols
        True
    """
    _check_positive("batch_size", batch_size)
    _check_positive("delay", delay)
    k = COPY_SYMBOLS
    symbols = torch.randint(1, COPY_ALPHABET + 1, (batch_size, k), generator=generator, device=device)
    inputs = torch.zeros(batch_size, delay + 2 * k, dtype=torch.int64, device=device)
    targets = torch.zeros_like(inputs)
    inputs[:, :k] = symbols
    inputs[:, delay + k - 1] = COPY_MARKER
    targets[:, -k:] = symbols
    return inputs, targets


def copy_baseline(delay: int) -> float:
    """Cross-entropy of the memoryless strategy: blanks, then uniform guesses.

    10 ln 8 / (T + 20): 0.0204 for T = 1000, 0.0103 for T = 2000.

    Example:
        >>> round(copy_baseline(1000), 4)
        0.0204
    """
    _check_positive("delay", delay)
    return COPY_SYMBOLS * math.log(COPY_ALPHABET) / (delay + 2 * COPY_SYMBOLS)


def adding_batch(
    batch_size: int, length: int, *, generator: torch.Generator | None = None, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of the adding task (Hochreiter & Schmidhuber 1997; Arjovsky et al. 2016).

    Channel 0 holds values uniform in [0, 1]; channel 1 marks two positions,
    one in each half of the sequence. The target is the sum of the two
    marked values.

    Args:
        batch_size: B.
        length: T >= 2 (the paper: 200 and 750).

    Returns:
        inputs: (B, T, 2) float32; targets: (B,) float32.

    Example:
        >>> x, y = adding_batch(3, 10, generator=torch.Generator().manual_seed(0))
        >>> x.shape, y.shape
        (torch.Size([3, 10, 2]), torch.Size([3]))
        >>> torch.allclose((x[..., 0] * x[..., 1]).sum(1), y)  # the sum of the two marked values
        True
    """
    _check_positive("batch_size", batch_size)
    if isinstance(length, bool) or not isinstance(length, int) or length < 2:
        raise ValueError(f"length must be an int >= 2, got {length!r}")
    values = torch.rand(batch_size, length, generator=generator, device=device)
    half = length // 2
    first = torch.randint(0, half, (batch_size,), generator=generator, device=device)
    second = torch.randint(half, length, (batch_size,), generator=generator, device=device)
    marks = torch.zeros(batch_size, length, device=device)
    rows = torch.arange(batch_size, device=device)
    marks[rows, first] = 1.0
    marks[rows, second] = 1.0
    targets = values[rows, first] + values[rows, second]
    return torch.stack([values, marks], dim=-1), targets


def adding_baseline() -> float:
    """MSE of always predicting 1, the mean of the target: 2 Var(U[0,1]) = 1/6.

    Example:
        >>> round(adding_baseline(), 4)
        0.1667
    """
    return 1.0 / 6.0
