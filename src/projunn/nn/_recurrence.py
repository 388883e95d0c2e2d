"""The whole-sequence recurrence ``h_t = sigma(xw_t + h_{t-1} U^T)`` with a hand-written backward.

Autograd through a per-step cell records a dozen nodes per time step, and at
T = 1000 their bookkeeping, not the arithmetic, dominates an iteration. Here
the forward pass is one loop of ``addmm`` and an in-place activation into
preallocated (T, B, H) buffers, and the backward pass is one loop of
``addmm`` and a multiplication by activation derivatives computed ahead, a
block of steps at a time (Note [Derivatives by blocks of steps]). The
gradients that do not lie on the recurrent chain (of U and of the inputs) are
computed for all steps at once after the loop, the modReLU bias's per block.

Note [Fused readout]
--------------------
A model that reads out every state (the copy task: T x B rows into a few
classes) would otherwise get back a (T, B, H) gradient of the states from
the readout's backward, a product with an inner dimension of a few
columns that is slow to write and is then read once more by the loop.
Given the readout's weight, the recurrence returns the read-out itself
and adds each step's share, ``grad_out_t W``, inside the backward loop,
where the (B, H) block it writes is already in cache. The readout reads
a complex state as its real and imaginary parts, [Re h, Im h]
(:class:`projunn.nn.ComplexToReal`); inside, the weight's two halves are
interleaved to match ``view_as_real``'s layout, so each step is one real
product on a view of the complex block.

Note [Gradients at zero modulus]
--------------------------------
The reference cell computes modReLU as ``z * relu(|z| + b) / where(|z| > 0, |z|, 1)``.
At z = 0 its autograd derivative is ``relu(b)`` (in z) and 0 (in b), and
``relu`` has derivative 0 at 0. The factors below reproduce these values
exactly, so both paths give the same gradients everywhere.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Literal, get_args

import torch
from torch.autograd.function import once_differentiable

__all__ = ["Nonlinearity", "flush_denormals", "unitary_recurrence"]

#: The nonlinearities of :class:`projunn.nn.UnitaryRNNCell`, all of which the fused recurrence implements.
Nonlinearity = Literal["modrelu", "relu", "tanh", "identity"]
ACTIVATIONS: tuple[str, ...] = get_args(Nonlinearity)  # the same names at run time, for validation


@contextlib.contextmanager
def flush_denormals(device: torch.device):
    """Treat subnormal floats as zero on the CPU inside the block, and restore the mode after.

    ReLU and tanh recurrences drive many hidden units towards zero, and
    arithmetic on subnormal numbers is up to 100x slower on x86. Flushing
    them changes values below ~1e-38 (float32) or ~1e-308 (float64) only.
    torch has no getter for the mode, so the previous one is read off a probe.
    """
    if device.type != "cpu":
        yield
        return
    probe = torch.tensor([1e-39], dtype=torch.float32)  # subnormal in float32
    was_flushing = bool((probe * 1.0).item() == 0.0)
    supported = torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if supported and not was_flushing:
            torch.set_flush_denormal(False)


def unitary_recurrence(
    xw: torch.Tensor,
    weight: torch.Tensor,
    h0: torch.Tensor,
    activation: Nonlinearity,
    modrelu_bias: torch.Tensor | None = None,
    *,
    with_last: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    r"""All hidden states of ``h_t = sigma(xw_t + h_{t-1} U^T)``, t = 1..T, with a fused backward.

    Args:
        xw: (T, B, H) time-major input contributions (input projection plus any
            additive bias), real or complex.
        weight: (H, H) recurrent matrix U, in the dtype of ``xw``.
        h0: (B, H) initial state.
        activation: ``"modrelu"``, ``"relu"`` (on real and imaginary parts
            separately when complex), ``"tanh"`` or ``"identity"``.
        modrelu_bias: (H,) real bias of modReLU (required for ``"modrelu"``).
        with_last: also return h_T as a separate tensor; a loss that reads only
            it then back-propagates without a (T, B, H) gradient of zeros.

    Returns:
        (T, B, H) hidden states h_1..h_T, and (B, H) h_T with ``with_last``.

    Gradients flow to ``xw``, ``weight``, ``h0`` and ``modrelu_bias`` and equal
    those of the step-by-step cell, at zero modulus too.
    The backward pass is not itself differentiable (no double backward).
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}; got {activation!r}")
    if xw.dim() != 3 or weight.shape != (xw.shape[-1], xw.shape[-1]) or h0.shape != xw.shape[1:]:
        raise ValueError(
            f"expected xw (T, B, H), weight (H, H), h0 (B, H); got {tuple(xw.shape)}, "
            f"{tuple(weight.shape)}, {tuple(h0.shape)}"
        )
    if (activation == "modrelu") != (modrelu_bias is not None):
        raise ValueError("modrelu_bias is required for, and only for, the modrelu activation")
    hs, last = _Recurrence.apply(xw, weight, h0, modrelu_bias, None, None, activation, False)
    return (hs, last) if with_last else hs


def _recurrence_over(xw, weight, h0, activation, modrelu_bias=None, readout=None):
    """:func:`unitary_recurrence` (with the last state) that may write the states over ``xw``.

    For callers that made ``xw`` for this call alone: it saves a (T, B, H) copy
    per forward pass. ``xw`` must not be needed afterwards, nor saved by the
    operation that produced it (a lookup or a linear map: neither saves its output).

    With ``readout = (weight (O, F), bias (O,) or None)``, a linear map of every
    state's real features (F = H; for a complex state F = 2H, reading [Re h, Im h]),
    it returns the (T, B, O) read-out instead of the states (Note [Fused readout]).
    """
    if readout is None:
        return _Recurrence.apply(xw, weight, h0, modrelu_bias, None, None, activation, True)
    readout_weight, readout_bias = readout
    if xw.is_complex():
        readout_weight = _interleaved(readout_weight)
    read, last, _ = _Recurrence.apply(xw, weight, h0, modrelu_bias, readout_weight, readout_bias, activation, True)
    return read, last


def _interleaved(weight: torch.Tensor) -> torch.Tensor:
    """Readout columns [Re_1..Re_H | Im_1..Im_H] -> (Re_1, Im_1, Re_2, ...), as ``view_as_real`` lays out a state.

    (O, 2H) -> (O, 2H); differentiable, so the weight's gradient returns to the first layout.
    """
    real_part, imaginary_part = weight.chunk(2, dim=1)
    return torch.stack((real_part, imaginary_part), dim=-1).flatten(1)


def _real(x: torch.Tensor) -> torch.Tensor:
    """A real view of x: (…, 2) real/imaginary pairs when complex, x itself otherwise."""
    return torch.view_as_real(x) if x.is_complex() else x


def _rows(x: torch.Tensor) -> torch.Tensor:
    """Real features of (…, H) states as rows: a (prod(…), H) view, or (prod(…), 2H) interleaved when complex."""
    real = _real(x)  # view, not reshape: the backward writes into these rows
    return real.view(-1, real.shape[-2] * 2) if x.is_complex() else real.view(-1, real.shape[-1])


def _activate_(z: torch.Tensor, activation: str, bias: torch.Tensor | None, out: torch.Tensor, scratch) -> None:
    """Write sigma(z) into out (which is z itself, except for modReLU)."""
    if activation == "relu":
        _real(out).relu_()  # relu on real and imaginary parts
    elif activation == "tanh":
        out.tanh_()
    elif activation == "modrelu":
        # sgn(z) * relu(|z| + b): sgn(0) = 0 gives 0 at z = 0, as the reference does.
        modulus = torch.abs(z, out=scratch)
        modulus.add_(bias).relu_()
        torch.sgn(z, out=out)
        out.mul_(modulus)


class _Recurrence(torch.autograd.Function):
    """Outputs (hs, last): all states, and a copy of the last one so that a loss reading only
    the last state sends no (T, B, H) gradient of zeros through the backward pass.
    With a readout weight, (read, last, hs): the (T, B, O) read-out first (Note [Fused readout])."""

    @staticmethod
    def forward(ctx, xw, weight, h0, bias, readout_weight, readout_bias, activation, overwrite):
        # Each step accumulates h_{t-1} U^T in place into its own slot of xw (or a copy of it).
        # modReLU's derivative needs that pre-activation; the others are read off h, in place.
        # Not over a view: autograd cannot rebase a view that a multi-output Function writes
        # (a linear map of a contiguous 3-D input returns one, e.g. at T = 1 or B = 1).
        reuse = overwrite and activation != "modrelu" and xw.is_contiguous() and xw._base is None
        pre = xw if reuse else xw.clone(memory_format=torch.contiguous_format)  # one pass, any layout
        if reuse:
            ctx.mark_dirty(xw)
        hs = torch.empty_like(pre) if activation == "modrelu" else pre
        scratch = torch.empty(pre.shape[1:], dtype=pre.real.dtype, device=pre.device)
        transposed = weight.t()
        h = h0
        with flush_denormals(pre.device):
            for z, out in zip(pre.unbind(0), hs.unbind(0)):  # the steps' views, made in one call
                _activate_(z.addmm_(h, transposed), activation, bias, out, scratch)
                h = out
        ctx.activation = activation
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(weight, h0, bias, pre if activation == "modrelu" else None, hs, readout_weight)
        last = hs[-1].clone()
        if readout_weight is None:
            return hs, last
        # Written through a view into a tensor of its own: a view returned by a Function with
        # several outputs could not be modified in place by the caller (e.g. masked_fill_).
        read = hs.new_empty((*hs.shape[:2], readout_weight.shape[0]), dtype=readout_weight.dtype)
        rows = read.view(-1, read.shape[-1])
        if readout_bias is None:
            torch.mm(_rows(hs), readout_weight.t(), out=rows)
        else:
            torch.addmm(readout_bias, _rows(hs), readout_weight.t(), out=rows)
        return read, last, hs

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        weight, h0, bias, pre, hs, readout_weight = ctx.saved_tensors
        grad_hs, grad_last = (grads[2], grads[1]) if readout_weight is not None else grads
        grad_read = grads[0] if readout_weight is not None else None
        steps = hs.shape[0]
        # grad_h[t] is dL/dh_t from every source: the outputs' gradient grad_hs[t], the
        # read-out's grad_read[t] W_out, and dL/dz_{t+1} U-bar, summed into the block the
        # carrying product writes (grad_hs is read, never copied or modified); the step
        # then turns it into dL/dz_t in place.
        grad_h = torch.empty_like(hs)
        if grad_hs is None:
            grad_h[-1].zero_()
        else:
            grad_h[-1].copy_(grad_hs[-1])
        if grad_last is not None:
            grad_h[-1] += grad_last
        if grad_read is not None:
            _rows(grad_h[-1]).addmm_(grad_read[-1], readout_weight)
        # grad wrt h of F.linear(h, U) = h U^T is g U-bar (conjugate for complex).
        carry = weight.conj().resolve_conj() if weight.is_complex() else weight
        wants_bias_grad = bias is not None and ctx.needs_input_grad[3]
        backprop = _ActivationBackward(ctx.activation, hs, pre, bias, grad_h, bias_grad=wants_bias_grad)
        carry_back = _carry_back(grad_h, grad_hs, carry, grad_read, readout_weight)
        with flush_denormals(hs.device):
            for t in range(steps - 1, -1, -1):
                backprop(t)
                if t > 0:
                    carry_back(t)
        grad_pre = grad_h
        grad_xw = grad_pre if ctx.needs_input_grad[0] else None
        grad_h0 = grad_pre[0] @ carry if ctx.needs_input_grad[2] else None
        grad_weight = None
        if ctx.needs_input_grad[1]:
            size = hs.shape[-1]
            # grad U = sum_t grad_pre_t^T conj(h_{t-1}).
            grad_weight = grad_pre[0].mT @ h0.conj()
            if steps > 1:
                grad_weight = grad_weight + grad_pre[1:].reshape(-1, size).mT @ hs[:-1].reshape(-1, size).conj()
        grad_bias = backprop.grad_bias() if wants_bias_grad else None
        grad_readout_weight = grad_readout_bias = None
        if grad_read is not None:
            read_rows = grad_read.reshape(-1, grad_read.shape[-1])
            if ctx.needs_input_grad[4]:
                grad_readout_weight = read_rows.t() @ _rows(hs)
            if ctx.needs_input_grad[5]:
                grad_readout_bias = read_rows.sum(0)
        return grad_xw, grad_weight, grad_h0, grad_bias, grad_readout_weight, grad_readout_bias, None, None


def _carry_back(grad_h, grad_hs, carry, grad_read=None, readout_weight=None):
    """The step t -> t - 1 of the backward pass: grad_h[t-1] = grad_hs[t-1] + grad_h[t] carry
    (+ grad_read[t-1] W_out), chosen once for the whole loop: one product that writes the slot
    (no outputs' gradient: the product alone), and with a readout one more product into it.
    The steps' views are made once (``unbind``), not one indexing call per step."""
    steps = grad_h.unbind(0)
    if grad_hs is None:
        carried = functools.partial(_carried, steps, carry)
    else:
        carried = functools.partial(_carried_with_outputs, steps, grad_hs.unbind(0), carry)
    if grad_read is None:
        return carried
    rows = [_rows(step) for step in steps]
    return functools.partial(_carried_and_read, carried, rows, grad_read.unbind(0), readout_weight)


def _carried(grad_h, carry, t: int) -> None:
    torch.mm(grad_h[t], carry, out=grad_h[t - 1])


def _carried_with_outputs(grad_h, grad_hs, carry, t: int) -> None:
    torch.addmm(grad_hs[t - 1], grad_h[t], carry, out=grad_h[t - 1])


def _carried_and_read(carried, grad_h_rows, grad_read, readout_weight, t: int) -> None:
    carried(t)
    grad_h_rows[t - 1].addmm_(grad_read[t - 1], readout_weight)


#: Time steps whose activation derivatives are computed together, by device type (Note [Derivatives
#: by blocks of steps]); other devices take the CUDA value.
DERIVATIVE_BLOCK = {"cpu": 4, "cuda": 64}


class _ActivationBackward:
    """Turns dL/dh_t into dL/dz_t in place in ``grad_h[t]``, one step at a time; for modReLU it also
    sums the bias gradient.

    Note [Derivatives by blocks of steps]
    -------------------------------------
    The derivative of sigma at step t depends on the forward pass only (h_t, and z_t for modReLU),
    not on the gradient flowing back, so it is computed ahead of the loop that needs it, for
    DERIVATIVE_BLOCK steps at a time: per step the loop then applies one product for tanh and real
    modReLU (``g * sigma'``), and for complex modReLU, whose derivative is R-linear but not
    C-linear, the three operations of ``alpha g + beta conj(g)``, where it took 4 to 16 kernels
    before. Launches cost a GPU several microseconds each, so there the blocks are long; a CPU pays
    little per call but much for memory traffic, and its blocks are a few steps, whose (B, H) slices
    stay in cache between the block's computation and the steps that read it (at B = 128, H = 170,
    one thread: blocks of 2-4 steps as fast as the per-step derivatives or slightly faster, blocks of
    32 steps 5-10% slower). Either way the derivatives take the memory of a block, not of the sequence.

    Complex modReLU, where active (h = c z, c = (|z| + b) / |z|, u = sgn(z), k = b / |z|):
    dL/dz = c g - k Re(conj(g) u) u = (c - k/2) g - (k/2) u^2 conj(g), using Re(conj(g) u) u =
    (conj(g) u^2 + g) / 2; so alpha = (|h| - b/2) / |z| and beta = -(k/2) u^2. Inactive (h = 0, z != 0)
    both are 0; at z = 0, alpha = relu(b), beta = 0 (Note [Gradients at zero modulus]). The bias
    gradient, sum_t Re(conj(dL/dh_t) sgn h_t), equals sum_t Re(conj(dL/dz_t) sgn h_t): where active,
    Re(conj(alpha g + beta conj g) u) = (alpha - k/2) Re(conj(g) u) and alpha - k/2 = c - k = 1;
    elsewhere sgn h_t = 0. The real case's sum is taken from the converted gradients (there dL/dz = g
    wherever sgn h != 0); the complex case's from conj(g), kept for the block anyway: from dL/dz it
    would be a difference of terms of size b / |z|, which loses accuracy as |z| -> 0.
    """

    def __init__(
        self,
        activation: str,
        hs: torch.Tensor,
        pre: torch.Tensor | None,
        bias: torch.Tensor | None,
        grad_h: torch.Tensor,
        *,
        bias_grad: bool = False,
    ):
        self.activation, self.hs, self.pre, self.bias, self.grad_h = activation, hs, pre, bias, grad_h
        self.grad_steps = grad_h.unbind(0)
        self.hs_steps = hs.unbind(0)
        self.start = self.end = hs.shape[0]  # the block [start, end) whose derivatives are held
        self.block = DERIVATIVE_BLOCK.get(hs.device.type, DERIVATIVE_BLOCK["cuda"])
        self.bias_grad = torch.zeros_like(bias) if bias_grad else None
        if activation == "modrelu":
            self.at_zero = torch.relu(bias)  # Note [Gradients at zero modulus]
            if hs.is_complex():  # conj(dL/dh) of the block's steps, kept for the bias gradient
                self.conj_g = torch.empty(
                    (min(self.block, hs.shape[0]), *hs.shape[1:]), dtype=hs.dtype, device=hs.device
                )

    def __call__(self, t: int) -> None:
        g = self.grad_steps[t]
        if self.activation == "relu":
            # dL/dz = g where z > 0 (h > 0), on real and imaginary parts separately.
            torch.ops.aten.threshold_backward.grad_input(_real(g), _real(self.hs_steps[t]), 0, grad_input=_real(g))
            return
        if self.activation == "identity":
            return
        if t < self.start:
            self._next_block(t)
        i = t - self.start
        if self.beta is None:
            g.mul_(self.alpha[i])
            return
        conj_g = torch.conj_physical(g, out=self.conj_g[i])
        g.mul_(self.alpha[i]).addcmul_(self.beta[i], conj_g)

    def _next_block(self, t: int) -> None:
        """Sum the finished block's bias gradient, then hold the derivatives of the block ending at t."""
        self._sum_bias_grad()
        self.start, self.end = max(0, t + 1 - self.block), t + 1
        h = self.hs[self.start : self.end]
        self.beta = None
        if self.activation == "tanh":
            factor = 1 - h * h
            self.alpha = factor.conj().resolve_conj() if factor.is_complex() else factor
            return
        z = self.pre[self.start : self.end]
        zero, self.sign = z == 0, torch.sgn(h)  # sgn h = sgn z where active, 0 elsewhere
        if not z.is_complex():
            self.alpha = torch.where(zero, self.at_zero, self.sign.abs())
            return
        active = h != 0
        modulus = torch.where(zero, 1.0, z.abs())
        half_k = (self.bias / 2) / modulus
        alpha = torch.where(active, h.abs() / modulus - half_k, 0.0)
        self.alpha = torch.where(zero, self.at_zero, alpha)
        self.beta = torch.where(active, -half_k * self.sign.square(), 0.0)

    def _sum_bias_grad(self) -> None:
        """Add the bias gradient of the finished steps [start, end): sum Re(conj(dL/dh) sgn h)."""
        if self.bias_grad is None or self.start == self.end:
            return
        if self.hs.is_complex():
            terms = (self.conj_g[: self.end - self.start] * self.sign).real
        else:
            terms = self.grad_h[self.start : self.end] * self.sign  # dL/dz, equal to dL/dh where sgn h != 0
        self.bias_grad += terms.sum((0, 1))

    def grad_bias(self) -> torch.Tensor:
        self._sum_bias_grad()
        self.start = self.end
        return self.bias_grad
