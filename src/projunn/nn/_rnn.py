"""Recurrent layers with an orthogonal (real) or unitary (complex) recurrent matrix."""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
import torch.nn.functional as F

from .._constraints import declare_unitary
from .._validation import REAL_DTYPES, check_choice, check_int, layer_dtype
from ..functional import Init, unitary_init
from ._recurrence import ACTIVATIONS, Nonlinearity, _recurrence_over

__all__ = ["ComplexToReal", "InputInit", "ModReLU", "UnitaryRNN", "UnitaryRNNCell"]

#: The initialisations of the input weight of :class:`UnitaryRNNCell`.
InputInit = Literal["he", "xavier"]


def _input_weight(hidden: int, inputs: int, init: str, *, dtype, device, generator) -> torch.Tensor:
    """W_in (hidden, inputs) with E|w|^2 = 2 / inputs (He) or 2 / (inputs + hidden) (Xavier).

    Complex weights split the variance evenly between real and imaginary parts.
    """
    if init == "he":  # torch's complex randn has E|z|^2 = 1 too
        return torch.randn(hidden, inputs, dtype=dtype, device=device, generator=generator) * math.sqrt(2.0 / inputs)
    bound = math.sqrt(6.0 / (inputs + hidden))  # U(-a, a) has variance a^2 / 3
    real = dtype.to_real() if dtype.is_complex else dtype
    parts = 2 if dtype.is_complex else 1
    draws = torch.empty(parts, hidden, inputs, dtype=real, device=device).uniform_(-bound, bound, generator=generator)
    if dtype.is_complex:
        return torch.complex(draws[0], draws[1]) / math.sqrt(2.0)
    return draws[0]


class ModReLU(torch.nn.Module):
    r"""modReLU (Arjovsky, Shah & Bengio 2016): shrink the modulus, keep the phase.

    .. math::
        \operatorname{modReLU}(z) = \operatorname{ReLU}(|z| + b)\, \frac{z}{|z|}
        \quad (0 \text{ where } z = 0),

    with one learned real bias per feature. For real z the phase is the sign.
    It never increases a modulus when b <= 0, so it keeps a unitary recurrence
    from exploding.

    Args:
        features: size of the last dimension.
        bias_range: the bias starts uniform in [-bias_range, bias_range].
        dtype: real dtype of the bias, float32 or float64 (default: torch's default dtype).
        device: where to allocate the bias.

    Shape:
        input (..., features), real or complex; output the same.
    """

    def __init__(self, features: int, *, bias_range: float = 0.01, dtype: torch.dtype | None = None, device=None):
        super().__init__()
        self.features = check_int("features", features)
        dtype = layer_dtype(dtype, REAL_DTYPES)
        self.bias = torch.nn.Parameter(
            torch.empty(features, dtype=dtype, device=device).uniform_(-bias_range, bias_range)
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        modulus = z.abs()
        # Safe division: where |z| = 0 the output is 0 and so is the gradient.
        scale = F.relu(modulus + self.bias) / torch.where(modulus > 0, modulus, torch.ones_like(modulus))
        return z * scale.to(z.dtype)

    def extra_repr(self) -> str:
        return f"{self.features}"


class ComplexToReal(torch.nn.Module):
    """Real features of a complex state: ``cat([z.real, z.imag], -1)``; real input passes through.

    Shape:
        input (..., H) complex -> (..., 2H) real; real input (..., H) unchanged.
    """

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.cat([z.real, z.imag], dim=-1) if z.is_complex() else z


class UnitaryRNNCell(torch.nn.Module):
    r"""One step h' = sigma(W_in x + U h + b) with U orthogonal (real) or unitary (complex).

    The recurrent matrix U (``recurrent_weight``, recorded as unitary as
    :func:`projunn.nn.unitary_` records a weight) is a plain parameter that
    :class:`projunn.optim.ProjUNN` keeps on the group; the input weight and
    bias are ordinary parameters. With a complex ``dtype`` the hidden state is
    complex and U unitary; real inputs are mapped in by a complex W_in
    (Note [Complex layers]).

    Args:
        input_size: features of x.
        hidden_size: N, the size of U.
        nonlinearity: ``"modrelu"`` (its bias is b), ``"relu"``, ``"tanh"`` or
            ``"identity"`` (a linear recurrence: norm preserving for zero input).
        init: initialisation of U, one of :data:`projunn.functional.Init`
            (the paper: ``"henaff"`` for the copy task, ``"cayley"`` for MNIST).
        input_init: initialisation of W_in: ``"he"`` (normal, variance 2 / input_size)
            or ``"xavier"`` (uniform, variance 2 / (input_size + hidden_size), as the
            authors' copy and adding scripts).
        dtype: float32 or float64 for a real cell (orthogonal U), complex64 or
            complex128 for a complex one (unitary U, complex state); the
            modReLU bias takes the matching real dtype. Default: torch's
            default dtype.
        device: where to allocate the parameters.
        generator: source of randomness for initialisation.

    Shape:
        x (B, input_size) real or complex; h (B, hidden_size) -> (B, hidden_size).

    Example:
        >>> cell = UnitaryRNNCell(3, 8, nonlinearity="identity", dtype=torch.float64)
        >>> h = torch.randn(2, 8, dtype=torch.float64)
        >>> h_next = cell(torch.zeros(2, 3, dtype=torch.float64), h)  # U h: the same norm
        >>> torch.allclose(h_next.norm(dim=-1), h.norm(dim=-1))
        True
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        *,
        nonlinearity: Nonlinearity = "modrelu",
        init: Init = "henaff",
        input_init: InputInit = "he",
        dtype: torch.dtype | None = None,
        device=None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.input_size = check_int("input_size", input_size)
        self.hidden_size = check_int("hidden_size", hidden_size)
        self.nonlinearity = check_choice("nonlinearity", nonlinearity, ACTIVATIONS)
        self.init = check_choice("init", init, get_args(Init))
        state = layer_dtype(dtype)
        real = state.to_real()
        self.recurrent_weight = torch.nn.Parameter(
            unitary_init(hidden_size, init, dtype=state, device=device, generator=generator)
        )
        self.input_init = check_choice("input_init", input_init, get_args(InputInit))
        self.input_weight = torch.nn.Parameter(
            _input_weight(hidden_size, input_size, input_init, dtype=state, device=device, generator=generator)
        )
        declare_unitary(self, "recurrent_weight")
        if self.nonlinearity == "modrelu":
            self.activation = ModReLU(hidden_size, dtype=real, device=device)
            self.bias = None
        else:
            self.activation = None
            self.bias = torch.nn.Parameter(torch.zeros(hidden_size, dtype=state, device=device))

    @property
    def state_dtype(self) -> torch.dtype:
        """The dtype of the hidden state and of U: complex for a unitary cell."""
        return self.recurrent_weight.dtype

    @property
    def complex(self) -> bool:
        """Whether the state is complex and U unitary (a complex ``dtype``)."""
        return self.recurrent_weight.is_complex()

    def initial_state(self, batch_size: int) -> torch.Tensor:
        """Zeros of shape (batch_size, hidden_size) in the state dtype."""
        return torch.zeros(batch_size, self.hidden_size, dtype=self.state_dtype, device=self.recurrent_weight.device)

    def forward(self, x: torch.Tensor, h: torch.Tensor | None = None) -> torch.Tensor:
        if x.shape[-1] != self.input_size:
            raise ValueError(f"expected input of shape (batch, {self.input_size}), got {tuple(x.shape)}")
        if h is None:
            h = self.initial_state(x.shape[0])
        elif h.shape[-1] != self.hidden_size:
            raise ValueError(f"expected hidden state of shape (batch, {self.hidden_size}), got {tuple(h.shape)}")
        pre = F.linear(x.to(self.state_dtype), self.input_weight) + F.linear(h, self.recurrent_weight)
        if self.activation is not None:
            return self.activation(pre)
        pre = pre + self.bias
        if self.nonlinearity == "relu":
            return torch.complex(F.relu(pre.real), F.relu(pre.imag)) if pre.is_complex() else F.relu(pre)
        if self.nonlinearity == "tanh":
            return torch.tanh(pre)
        return pre

    def extra_repr(self) -> str:
        kind = "unitary" if self.complex else "orthogonal"
        return f"{self.input_size}, {self.hidden_size}, {kind}, nonlinearity={self.nonlinearity!r}, init={self.init!r}"


def _check_token_ids(x: torch.Tensor, vocabulary: int) -> None:
    """Token ids must be (batch, time) int32/int64 in [0, vocabulary): an index outside would
    select another column silently (negative ids wrap around), a uint8 tensor would act as a mask."""
    if x.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"token ids must be int32 or int64, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"expected token ids of shape (batch, time), got {tuple(x.shape)}")
    if not x.numel():
        return
    low, high = torch.aminmax(x)
    if x.device.type != "cpu":
        # Checked on the device: reading the range back would make every forward pass wait for the
        # device (and could not be captured in a CUDA graph). A bad id fails the next synchronising call.
        torch._assert_async((low >= 0) & (high < vocabulary), f"token ids must lie in [0, {vocabulary})")
    elif low < 0 or high >= vocabulary:
        raise ValueError(f"token ids must lie in [0, {vocabulary}); got ids from {int(low)} to {int(high)}")


def _check_readout(readout: tuple[torch.Tensor, torch.Tensor | None], features: int) -> None:
    """A readout (weight (O, features), bias (O,) or None) of the states' real features."""
    weight, bias = readout
    if weight.dim() != 2 or weight.shape[1] != features:
        raise ValueError(f"expected a readout weight of shape (outputs, {features}), got {tuple(weight.shape)}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"expected a readout bias of shape ({weight.shape[0]},), got {tuple(bias.shape)}")


class UnitaryRNN(torch.nn.Module):
    """Run a :class:`UnitaryRNNCell` over a sequence (batch first).

    By default the whole sequence runs through :func:`unitary_recurrence`:
    the input projections of all steps in one product, the recurrence in one
    loop, and a hand-written backward over the whole sequence, with the same
    values and gradients as stepping the cell (to rounding). Under autocast
    it runs in the cell's own precision (float32 or float64), autocast off:
    the state passes through T products with the unitary matrix, and a
    bfloat16 product's ~4e-3 relative error would compound over T = 784-1000
    steps where float32 keeps the state's norm to ~1e-5. The layers around it
    keep autocast's precision; a readout passed to ``forward`` is part of the
    recurrence and runs in its precision.

    Args:
        input_size, hidden_size, and keyword arguments: as for :class:`UnitaryRNNCell`.
        fused: use the fused whole-sequence recurrence (``False``: step the cell
            under autograd, e.g. for double backward).

    ``forward(x, h=None, *, readout=None)``: with ``readout = (weight, bias)``, a
    linear map (weight (O, F), bias (O,) or None) of every state's real features
    (the state, F = H; a complex state's [Re h, Im h], F = 2H, as
    :class:`ComplexToReal` gives them), the outputs are the read-out of every
    step instead of the states. The fused path then adds the read-out's gradient
    inside its backward loop (Note [Fused readout] in ``projunn.nn._recurrence``):
    the same values and gradients as applying ``F.linear`` to the states, without
    a (B, T, H) gradient of them.

    Shape:
        x (B, T, input_size), or (B, T) int64 token ids in [0, input_size) for
        one-hot inputs; h (B, hidden_size) or None
        -> outputs (B, T, hidden_size), or (B, T, O) with a readout (a view of
        time-major storage: ``outputs.transpose(0, 1)`` is contiguous), last
        state (B, hidden_size).

    Example:
        >>> rnn = UnitaryRNN(3, 8, dtype=torch.complex64)  # unitary U, complex states
        >>> outputs, last = rnn(torch.randn(2, 5, 3))
        >>> outputs.shape, outputs.dtype, last.shape
        (torch.Size([2, 5, 8]), torch.complex64, torch.Size([2, 8]))
        >>> torch.equal(outputs[:, -1], last)
        True
    """

    def __init__(self, input_size: int, hidden_size: int, *, fused: bool = True, **cell_options) -> None:
        super().__init__()
        self.cell = UnitaryRNNCell(input_size, hidden_size, **cell_options)
        self.fused = bool(fused)

    def forward(
        self,
        x: torch.Tensor,
        h: torch.Tensor | None = None,
        *,
        readout: tuple[torch.Tensor, torch.Tensor | None] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cell = self.cell
        tokens = not x.is_floating_point() and not x.is_complex()
        if tokens:
            _check_token_ids(x, cell.input_size)
        elif x.dim() != 3 or x.shape[-1] != cell.input_size:
            raise ValueError(f"expected input of shape (batch, time, {cell.input_size}), got {tuple(x.shape)}")
        if h is None:
            h = cell.initial_state(x.shape[0])
        elif h.shape != (x.shape[0], cell.hidden_size):
            raise ValueError(f"expected hidden state of shape ({x.shape[0]}, {cell.hidden_size}), got {tuple(h.shape)}")
        if x.shape[1] == 0:
            raise ValueError("expected a sequence of at least one step")
        if readout is not None:
            _check_readout(readout, 2 * cell.hidden_size if cell.complex else cell.hidden_size)
        if not self.fused:
            if tokens:
                x = F.one_hot(x, cell.input_size).to(cell.input_weight.real.dtype)
            outputs, last = self._step_by_step(x, h)
            if readout is not None:  # on the time-major states, so that the layout is the fused path's
                outputs = F.linear(ComplexToReal()(outputs.transpose(0, 1)), *readout).transpose(0, 1)
            return outputs, last
        with torch.autocast(x.device.type, enabled=False):  # the cell's precision: see the class docstring
            outputs, last = _recurrence_over(  # xw is made here for this call: the states may overwrite it
                self._input_terms(x.transpose(0, 1)),
                cell.recurrent_weight,
                h.to(cell.state_dtype),
                cell.nonlinearity,
                cell.activation.bias if cell.activation is not None else None,
                readout,
            )
        return outputs.transpose(0, 1), last

    def _input_terms(self, x: torch.Tensor) -> torch.Tensor:
        """W_in x_t (+ b) for all steps at once: (T, B, I) features or (T, B) token ids -> (T, B, H)."""
        cell = self.cell
        if x.is_floating_point() or x.is_complex():
            return F.linear(x.to(cell.state_dtype), cell.input_weight, cell.bias)
        # One-hot inputs select columns of W_in: a lookup, not a product with K = vocabulary.
        table = cell.input_weight.mT if cell.bias is None else cell.input_weight.mT + cell.bias
        # Contiguous ids give contiguous (T, B, H) rows (transposed ids would give transposed rows,
        # which the recurrence would copy). F.embedding has the faster backward but no complex autograd.
        ids = x.contiguous()
        return table[ids] if table.is_complex() else F.embedding(ids, table)

    def _step_by_step(self, x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outputs = []
        for x_t in x.unbind(1):  # unbind: no full-size zero tensor per step in backward, unlike x[:, t]
            h = self.cell(x_t, h)
            outputs.append(h)
        # Time-major storage, as the fused path returns, so readouts see one layout.
        return torch.stack(outputs, dim=0).transpose(0, 1), h

    def extra_repr(self) -> str:
        return "" if self.fused else "fused=False"
