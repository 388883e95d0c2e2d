"""Models used by the sequence tasks: a unitary RNN with a real readout."""

from __future__ import annotations

import torch

from ._rnn import ComplexToReal, UnitaryRNN

__all__ = ["SequenceModel"]


class SequenceModel(torch.nn.Module):
    """Unitary RNN followed by a linear readout of every step or of the last one.

    Args:
        input_size: features per step, or the vocabulary size when ``tokens``.
        hidden_size: N, the size of the unitary recurrent matrix.
        output_size: readout features (classes, or 1 for regression).
        tokens: inputs are int64 token ids (B, T), one-hot encoded here.
        every_step: read out every step (B, T, out) instead of the last (B, out).
        cell_options: passed to :class:`projunn.nn.UnitaryRNNCell`
            (``nonlinearity``, ``complex``, ``init``, ``dtype``, ``generator``).
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        output_size: int,
        *,
        tokens: bool = False,
        every_step: bool = False,
        **cell_options,
    ) -> None:
        super().__init__()
        self.input_size = input_size
        self.tokens = tokens
        self.every_step = every_step
        self.rnn = UnitaryRNN(input_size, hidden_size, **cell_options)
        features = 2 * hidden_size if self.rnn.cell.complex else hidden_size
        dtype = cell_options.get("dtype")
        self.to_real = ComplexToReal()
        self.readout = torch.nn.Linear(features, output_size, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tokens and x.is_floating_point():
            raise ValueError(f"expected int64 token ids of shape (batch, time), got {x.dtype}")
        outputs, last = self.rnn(x)  # token ids are one-hot encoded by the RNN (as a lookup)
        if not self.every_step:
            return self.readout(self.to_real(last))
        # Read out in the RNN's time-major layout (contiguous), then view as batch first.
        return self.readout(self.to_real(outputs.transpose(0, 1))).transpose(0, 1)
