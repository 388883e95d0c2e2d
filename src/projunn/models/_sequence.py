"""The model of the sequence tasks: a unitary RNN with a real readout."""

from __future__ import annotations

import torch

from .._validation import check_int, layer_dtype
from ..nn import ComplexToReal, UnitaryRNN

__all__ = ["SequenceModel"]


class SequenceModel(torch.nn.Module):
    """Unitary RNN followed by a linear readout of every step or of the last one.

    Args:
        input_size: features per step, or the vocabulary size when ``tokens``.
        hidden_size: N, the size of the unitary recurrent matrix.
        output_size: readout features (classes, or 1 for regression).
        tokens: inputs are int64 token ids (B, T), one-hot encoded here.
        every_step: read out every step (B, T, out) instead of the last (B, out).
        dtype: the RNN's dtype: real (orthogonal) or complex (unitary, with a
            complex state whose real and imaginary parts the readout reads).
            The readout takes the matching real dtype (Note [Complex layers]).
        device: where to allocate every parameter, the readout's included.
        cell_options: passed to :class:`projunn.nn.UnitaryRNNCell`
            (``nonlinearity``, ``init``, ``input_init``, ``generator``).

    Shape:
        x (B, T, input_size) real, or (B, T) int64 token ids when ``tokens``
        -> (B, T, output_size) if ``every_step`` else (B, output_size), real.

    Example:
        >>> model = SequenceModel(10, 16, 9, tokens=True, every_step=True)  # the copy task's shape
        >>> model(torch.randint(0, 10, (2, 30))).shape
        torch.Size([2, 30, 9])
        >>> SequenceModel(2, 16, 1, dtype=torch.complex64)(torch.randn(4, 30, 2)).shape  # the adding task's
        torch.Size([4, 1])
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        output_size: int,
        *,
        tokens: bool = False,
        every_step: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        **cell_options,
    ) -> None:
        super().__init__()
        dtype = layer_dtype(dtype)
        self.input_size = input_size
        self.tokens = tokens
        self.every_step = every_step
        self.rnn = UnitaryRNN(input_size, hidden_size, dtype=dtype, device=device, **cell_options)
        features = 2 * hidden_size if dtype.is_complex else hidden_size
        self.to_real = ComplexToReal()
        output_size = check_int("output_size", output_size)
        self.readout = torch.nn.Linear(features, output_size, dtype=dtype.to_real(), device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tokens and x.is_floating_point():
            raise ValueError(f"expected int64 token ids of shape (batch, time), got {x.dtype}")
        if not self.every_step:
            _, last = self.rnn(x)  # token ids are one-hot encoded by the RNN (as a lookup)
            return self.readout(self.to_real(last))
        if self._fusable_readout():  # the RNN reads every step out inside its loops
            outputs, _ = self.rnn(x, readout=(self.readout.weight, self.readout.bias))
            return outputs
        outputs, _ = self.rnn(x)
        # Read out in the RNN's time-major layout (contiguous), then view as batch first.
        return self.readout(self.to_real(outputs.transpose(0, 1))).transpose(0, 1)

    def _fusable_readout(self) -> bool:
        """Whether the RNN may apply the readout itself: ``to_real`` and ``readout`` are a plain
        :class:`ComplexToReal` and ``torch.nn.Linear`` without hooks of their own. Replaced or
        hooked modules are called as modules. (Hooks registered for every module, such as
        ``register_module_forward_hook``'s, see no call of these two on the fused path.)"""
        plain = type(self.to_real) is ComplexToReal and type(self.readout) is torch.nn.Linear
        return plain and not any(_has_hooks(module) for module in (self.to_real, self.readout))


def _has_hooks(module: torch.nn.Module) -> bool:
    """Whether ``module`` has forward or backward hooks of its own."""
    hooks = (module._forward_pre_hooks, module._forward_hooks, module._backward_pre_hooks, module._backward_hooks)
    return any(hooks)
