"""The fused whole-sequence recurrence against the step-by-step cell under autograd (float64, complex128)."""

from __future__ import annotations

import copy
import platform
from typing import get_args

import pytest
import torch

from projunn.models import SequenceModel
from projunn.nn import Nonlinearity, UnitaryRNN, _recurrence, unitary_recurrence
from projunn.nn._recurrence import flush_denormals

NONLINEARITIES = get_args(Nonlinearity)


def _pair(nonlinearity: str, complex_state: bool, seed: int = 0) -> tuple[UnitaryRNN, UnitaryRNN]:
    """A fused RNN and a step-by-step copy with identical parameters (float64 / complex128)."""
    generator = torch.Generator().manual_seed(seed)
    dtype = torch.complex128 if complex_state else torch.float64
    fused = UnitaryRNN(3, 6, nonlinearity=nonlinearity, init="haar", dtype=dtype, generator=generator)
    with torch.no_grad():  # non-zero biases of both signs, so every branch of modReLU is taken
        for name, p in fused.named_parameters():
            if "bias" in name:
                p.copy_(torch.randn(p.shape, dtype=p.dtype, generator=generator) * 0.5)
    reference = copy.deepcopy(fused)
    reference.fused = False
    return fused, reference


def _inputs_with_zero_modulus(complex_state: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B=4, T=9, 3) and h0 (4, 6): rows 0 of x (first steps) and h0 are zero, so z = 0 exactly there."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(4, 9, 3, dtype=torch.float64, generator=generator)
    x[0, :3] = 0.0
    dtype = torch.complex128 if complex_state else torch.float64
    h0 = torch.randn(4, 6, dtype=dtype, generator=generator)
    h0[0] = 0.0
    return x, h0


def _loss(kind: str, outputs: torch.Tensor, last: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    if kind == "every step and last":  # as the copy task reads its outputs, plus the last state
        return (weights.conj() * outputs).real.sum() + last.abs().square().sum()
    if kind == "last only":  # as the adding task: no gradient reaches the (T, B, H) outputs
        return (weights[:, 0].conj() * last).real.sum()
    if kind == "plain sum":  # the outputs' gradient arrives expanded, with zero strides
        return outputs.real.sum()
    return (weights[:, ::2].conj() * outputs[:, ::2]).real.sum()  # every other step: a strided gradient


@pytest.mark.parametrize("loss_kind", ["every step and last", "last only", "plain sum", "every other step"])
@pytest.mark.parametrize("complex_state", [False, True])
@pytest.mark.parametrize("nonlinearity", NONLINEARITIES)
def test_fused_values_and_gradients_equal_autograd_on_the_cell(nonlinearity, complex_state, loss_kind):
    """Nine steps: on the CPU, blocks of derivatives of 4, 4 and 1 steps (Note [Derivatives by blocks of steps])."""
    _check_against_the_cell(nonlinearity, complex_state, loss_kind)


@pytest.mark.parametrize("block", [1, 2, 64])
@pytest.mark.parametrize("complex_state", [False, True])
@pytest.mark.parametrize("nonlinearity", ["modrelu", "tanh"])
def test_every_block_length_of_derivatives_gives_the_cells_gradients(nonlinearity, complex_state, block, monkeypatch):
    """Blocks of one step, of two (nine steps end on a partial block), and one block longer than the sequence."""
    monkeypatch.setitem(_recurrence.DERIVATIVE_BLOCK, "cpu", block)
    _check_against_the_cell(nonlinearity, complex_state, "every step and last")


def _check_against_the_cell(nonlinearity: str, complex_state: bool, loss_kind: str) -> None:
    fused, reference = _pair(nonlinearity, complex_state)
    x, h0 = _inputs_with_zero_modulus(complex_state)
    weights = torch.randn(4, 9, 6, dtype=h0.dtype, generator=torch.Generator().manual_seed(2))
    results = []
    for model in (fused, reference):
        xi, hi = x.clone().requires_grad_(), h0.clone().requires_grad_()
        outputs, last = model(xi, hi)
        loss = _loss(loss_kind, outputs, last, weights)
        grads = torch.autograd.grad(loss, [xi, hi, *model.parameters()])
        results.append((outputs.detach(), grads))
    (out_f, grads_f), (out_r, grads_r) = results
    assert (out_r[0, 0] == 0).any() or nonlinearity in ("relu", "tanh", "identity")  # zero entries exercised
    torch.testing.assert_close(out_f, out_r, rtol=1e-12, atol=1e-12)
    names = ["x", "h0", *(name for name, _ in fused.named_parameters())]
    for name, gf, gr in zip(names, grads_f, grads_r):
        # Normwise: the two paths add the same terms in different orders, and a chain of
        # complex tanh amplifies one rounding to a few 1e-12 of the largest entry.
        error = torch.linalg.vector_norm(gf - gr) / torch.linalg.vector_norm(gr).clamp_min(1e-300)
        assert error < 1e-12, f"{name}: relative difference {error:.2e}"


@pytest.mark.parametrize("nonlinearity", NONLINEARITIES)
def test_fused_gradcheck(nonlinearity):
    """Finite differences on the function itself, complex included (torch's gradcheck)."""
    generator = torch.Generator().manual_seed(3)
    for dtype in (torch.float64, torch.complex128):
        xw = torch.randn(5, 2, 3, dtype=dtype, generator=generator, requires_grad=True)
        weight = torch.linalg.qr(torch.randn(3, 3, dtype=dtype, generator=generator))[0].requires_grad_()
        h0 = torch.randn(2, 3, dtype=dtype, generator=generator, requires_grad=True)
        bias = None
        if nonlinearity == "modrelu":
            bias = (0.3 * torch.randn(3, dtype=torch.float64, generator=generator)).requires_grad_()
        assert torch.autograd.gradcheck(
            lambda *a: unitary_recurrence(a[0], a[1], a[2], nonlinearity, a[3] if len(a) > 3 else None),
            (xw, weight, h0) + ((bias,) if bias is not None else ()),
        )


def test_fused_path_matches_under_float32_to_rounding():
    fused, reference = _pair("modrelu", False)
    fused, reference = fused.float(), reference.float()
    x = torch.randn(8, 50, 3)
    out_f, _ = fused(x)
    out_r, _ = reference(x)
    torch.testing.assert_close(out_f, out_r, rtol=1e-5, atol=1e-5)


def test_bad_arguments():
    xw, weight, h0 = torch.zeros(4, 2, 3), torch.eye(3), torch.zeros(2, 3)
    with pytest.raises(ValueError, match="activation must be one of"):
        unitary_recurrence(xw, weight, h0, "gelu")
    with pytest.raises(ValueError, match="expected xw"):
        unitary_recurrence(xw, torch.eye(4), h0, "relu")
    with pytest.raises(ValueError, match="modrelu_bias is required"):
        unitary_recurrence(xw, weight, h0, "modrelu")
    with pytest.raises(ValueError, match="at least one step"):
        UnitaryRNN(3, 3)(torch.zeros(2, 0, 3))


def test_flush_denormals_restores_the_mode():
    subnormal = torch.tensor([1e-39], dtype=torch.float32)
    before = (subnormal * 1.0).item()
    with flush_denormals(torch.device("cpu")):
        inside = (subnormal * 1.0).item()
    assert (subnormal * 1.0).item() == before != 0.0
    if platform.machine() in ("x86_64", "AMD64", "aarch64", "arm64"):  # CPUs with a flush-to-zero mode
        assert inside == 0.0
    else:
        assert inside in (0.0, before)


@pytest.mark.parametrize("complex_state", [False, True])
@pytest.mark.parametrize("nonlinearity", ["relu", "modrelu"])
def test_token_inputs_are_a_lookup_equal_to_one_hot_products(nonlinearity, complex_state):
    """SequenceModel on token ids: the fused lookup path equals one-hot products stepped by the cell."""
    torch.manual_seed(0)
    dtype = torch.complex128 if complex_state else torch.float64
    fused = SequenceModel(10, 6, 9, tokens=True, every_step=True, nonlinearity=nonlinearity, dtype=dtype)
    reference = copy.deepcopy(fused)
    reference.rnn.fused = False
    tokens = torch.randint(0, 10, (3, 12), generator=torch.Generator().manual_seed(4))
    target = torch.randint(0, 9, (3, 12), generator=torch.Generator().manual_seed(5))
    # Time-major rows straight from the lookup: the recurrence then needs no copy of them.
    assert fused.rnn._input_terms(tokens.transpose(0, 1)).is_contiguous()
    grads = []
    for model in (fused, reference):
        logits = model(tokens)
        assert logits.shape == (3, 12, 9)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 9), target.reshape(-1))
        grads.append((loss.detach(), torch.autograd.grad(loss, list(model.parameters()))))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-13, atol=0)
    for gf, gr in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(gf, gr, rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_token_ids_outside_the_vocabulary_or_of_another_type_are_refused(dtype):
    model = SequenceModel(10, 6, 9, tokens=True, every_step=True, nonlinearity="relu", dtype=dtype)
    for fused in (True, False):
        model.rnn.fused = fused
        with pytest.raises(ValueError, match=r"token ids must lie in \[0, 10\); got ids from -1 to 3"):
            model(torch.tensor([[0, 3, -1]]))
        with pytest.raises(ValueError, match=r"got ids from 0 to 10"):
            model(torch.tensor([[0, 10]]))
        with pytest.raises(TypeError, match="token ids must be int32 or int64, got torch.uint8"):
            model(torch.tensor([[0, 1]], dtype=torch.uint8))


def _readout_weights(outputs: int, features: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return (
        torch.randn(outputs, features, dtype=torch.float64, generator=generator),
        torch.randn(outputs, dtype=torch.float64, generator=generator),
    )


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("complex_state", [False, True])
@pytest.mark.parametrize("nonlinearity", NONLINEARITIES)
def test_fused_readout_equals_a_linear_map_of_the_stepped_states(nonlinearity, complex_state, with_bias):
    """Note [Fused readout]: the read-out and every gradient (inputs, h0, cell, readout) as F.linear on the states."""
    fused, reference = _pair(nonlinearity, complex_state)
    x, h0 = _inputs_with_zero_modulus(complex_state)
    generator = torch.Generator().manual_seed(6)
    readout = _readout_weights(5, 12 if complex_state else 6, generator)
    loss_weights = torch.randn(4, 9, 5, dtype=torch.float64, generator=generator)
    results = []
    for model in (fused, reference):
        xi, hi = x.clone().requires_grad_(), h0.clone().requires_grad_()
        weight, bias = (r.clone().requires_grad_() for r in readout)
        outputs, last = model(xi, hi, readout=(weight, bias if with_bias else None))
        assert outputs.shape == (4, 9, 5)
        loss = (loss_weights * outputs).sum() + last.abs().square().sum()
        inputs = [xi, hi, weight, *([bias] if with_bias else []), *model.parameters()]
        results.append((outputs.detach(), torch.autograd.grad(loss, inputs)))
    (out_f, grads_f), (out_r, grads_r) = results
    torch.testing.assert_close(out_f, out_r, rtol=1e-12, atol=1e-12)
    for index, (gf, gr) in enumerate(zip(grads_f, grads_r)):
        error = torch.linalg.vector_norm(gf - gr) / torch.linalg.vector_norm(gr).clamp_min(1e-300)
        assert error < 1e-12, f"gradient {index}: relative difference {error:.2e}"


@pytest.mark.parametrize("complex_state", [False, True])
def test_sequence_model_reads_out_inside_the_recurrence_unless_the_readout_is_hooked(complex_state):
    """Every-step models fuse their readout; one with a hook (or replaced) is called as a module, same values."""
    dtype = torch.complex128 if complex_state else torch.float64
    torch.manual_seed(0)
    model = SequenceModel(10, 6, 9, tokens=True, every_step=True, nonlinearity="modrelu", dtype=dtype)
    tokens = torch.randint(0, 10, (3, 12), generator=torch.Generator().manual_seed(4))

    def outputs_and_gradients():
        logits = model(tokens)
        return logits.detach(), torch.autograd.grad(logits.square().sum(), list(model.parameters()))

    assert model._fusable_readout()

    def refuse(*args):
        raise AssertionError("the fused path called the readout module")

    model.readout.forward = model.to_real.forward = refuse  # read through their parameters only
    fused, fused_grads = outputs_and_gradients()
    del model.readout.forward, model.to_real.forward
    for module in (model.readout, model.to_real):
        called = []
        handle = module.register_forward_hook(lambda module, args, output, called=called: called.append(output.shape))
        assert not model._fusable_readout()
        unfused, unfused_grads = outputs_and_gradients()
        torch.testing.assert_close(unfused, fused, rtol=1e-12, atol=1e-12)
        for gf, gu in zip(fused_grads, unfused_grads):
            torch.testing.assert_close(gf, gu, rtol=1e-11, atol=1e-12)
        assert len(called) == 1 and called[0][:2] == (12, 3)  # time-major rows, through the module itself
        handle.remove()
        assert model._fusable_readout()


@pytest.mark.parametrize("complex_state", [False, True])
def test_fused_read_out_can_be_edited_in_place_and_read_alone(complex_state):
    """The read-out is a tensor of its own (not a view of a multi-output Function): in-place
    edits work; a loss of the read-out alone (no gradient of the last state) matches the cell."""
    fused, reference = _pair("relu", complex_state)
    x = torch.randn(2, 5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    weight = torch.randn(4, 12 if complex_state else 6, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    grads = []
    for model in (fused, reference):
        outputs, _ = model(x, readout=(weight, None))
        outputs.masked_fill_(outputs < 0, 0.0)
        outputs[:, 0] = 0.0
        grads.append(torch.autograd.grad(outputs.square().sum(), list(model.parameters())))
    for gf, gr in zip(*grads):
        torch.testing.assert_close(gf, gr, rtol=1e-11, atol=1e-12)


def test_fused_readout_of_the_wrong_width_is_refused():
    rnn = UnitaryRNN(3, 6, dtype=torch.complex128)
    weight = torch.zeros(5, 12, dtype=torch.float64)
    for fused in (True, False):
        rnn.fused = fused
        with pytest.raises(ValueError, match=r"readout weight of shape \(outputs, 12\), got \(5, 6\)"):
            rnn(torch.zeros(2, 4, 3), readout=(weight[:, :6], None))
        with pytest.raises(ValueError, match=r"readout bias of shape \(5,\), got \(4,\)"):
            rnn(torch.zeros(2, 4, 3), readout=(weight, torch.zeros(4, dtype=torch.float64)))


@pytest.mark.parametrize("batch, steps", [(2, 1), (1, 5), (1, 1)])
@pytest.mark.parametrize("nonlinearity", NONLINEARITIES)
def test_one_step_or_one_sequence_equals_the_cell(nonlinearity, batch, steps):
    """At T = 1 or B = 1 the input terms are a view of the product that made them; the states
    must not be written over it (autograd refuses that), with or without a readout."""
    for complex_state in (False, True):
        fused, reference = _pair(nonlinearity, complex_state)
        x = torch.randn(batch, steps, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
        generator = torch.Generator().manual_seed(10)
        weight = torch.randn(2, 12 if complex_state else 6, dtype=torch.float64, generator=generator)
        for readout in (None, (weight, None)):
            results = []
            for model in (fused, reference):
                outputs, last = model(x, readout=readout)
                loss = outputs.abs().sum() + last.abs().sum()
                results.append((outputs.detach(), torch.autograd.grad(loss, list(model.parameters()))))
            torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-12, atol=1e-12)
            for gf, gr in zip(results[0][1], results[1][1]):
                torch.testing.assert_close(gf, gr, rtol=1e-11, atol=1e-12)


class _Kernels(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the aten operators that compute (views such as a step's slice launch nothing on a GPU)."""

    VIEWS = frozenset({"select", "slice", "view", "view_as_real", "unsqueeze", "unbind", "t", "expand"})

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.overloadpacket.__name__ not in self.VIEWS
        return func(*args, **(kwargs or {}))


def _kernels_per_step(nonlinearity: str, dtype: torch.dtype) -> tuple[float, float]:
    """Forward and backward kernels per time step: the difference between 150 and 50 steps, over 100."""
    counts = []
    for steps in (50, 150):
        generator = torch.Generator().manual_seed(0)
        xw = torch.randn(steps, 2, 4, dtype=dtype, generator=generator, requires_grad=True)
        weight = torch.linalg.qr(torch.randn(4, 4, dtype=dtype, generator=generator))[0].requires_grad_()
        bias = (-0.1 * torch.rand(4, generator=generator)).requires_grad_() if nonlinearity == "modrelu" else None
        with _Kernels() as forward:
            hs = unitary_recurrence(xw, weight, torch.zeros(2, 4, dtype=dtype), nonlinearity, bias)
        loss = hs.abs().sum()
        with _Kernels() as backward:
            loss.backward()
        counts.append((forward.count, backward.count))
    return tuple((late - early) / 100 for early, late in zip(*counts))


@pytest.mark.parametrize(
    "nonlinearity, dtype, most",
    [
        ("relu", torch.float32, (2, 2)),
        ("tanh", torch.float32, (2, 2.1)),
        ("modrelu", torch.float32, (6, 2.2)),
        ("modrelu", torch.complex64, (6, 4.5)),
    ],
)
def test_kernels_per_time_step_with_the_gpus_blocks(nonlinearity, dtype, most, monkeypatch):
    """With CUDA's blocks of derivatives the backward step is the carrying product and one elementwise pass
    (complex modReLU: three), where the derivatives computed step by step took 4, 8 and 16 kernels in all."""
    monkeypatch.setitem(_recurrence.DERIVATIVE_BLOCK, "cpu", _recurrence.DERIVATIVE_BLOCK["cuda"])
    forward, backward = _kernels_per_step(nonlinearity, dtype)
    assert forward <= most[0] and backward <= most[1], (forward, backward)


def test_the_complex_modrelu_bias_gradient_keeps_its_accuracy_near_zero_modulus():
    """|z| far below b: dL/dz holds terms of size b / |z| that cancel in the bias gradient, which is
    therefore summed from dL/dh (Note [Derivatives by blocks of steps]): complex64 within rounding of
    the complex128 result."""
    generator = torch.Generator().manual_seed(0)
    xw = 1e-5 * torch.randn(3, 256, 8, dtype=torch.complex128, generator=generator)
    weight = torch.eye(8, dtype=torch.complex128)
    bias = torch.full((8,), 0.5, dtype=torch.float64)
    grads = []
    for dtype in (torch.complex64, torch.complex128):
        b = bias.to(dtype.to_real()).requires_grad_()
        hs = unitary_recurrence(xw.to(dtype), weight.to(dtype), torch.zeros(256, 8, dtype=dtype), "modrelu", b)
        hs.real.sum().backward()
        grads.append(b.grad.double())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=0)
