"""Recurrent layers: shapes, norm preservation, modReLU, training keeps U unitary."""

from __future__ import annotations

from typing import get_args

import pytest
import torch

from conftest import gram_defect
from projunn.models import SequenceModel
from projunn.nn import ComplexToReal, ModReLU, Nonlinearity, UnitaryRNN, UnitaryRNNCell
from projunn.optim import ProjUNN, param_groups, unitary_parameters


@pytest.mark.parametrize("dtype", [torch.float32, torch.complex64])
@pytest.mark.parametrize("nonlinearity", get_args(Nonlinearity))
def test_shapes_and_dtypes(dtype, nonlinearity):
    rnn = UnitaryRNN(3, 8, nonlinearity=nonlinearity, dtype=dtype)
    out, h = rnn(torch.randn(4, 5, 3))
    assert out.shape == (4, 5, 8) and h.shape == (4, 8)
    assert out.dtype == dtype and rnn.cell.complex == dtype.is_complex
    assert torch.equal(out[:, -1], h)


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_identity_recurrence_preserves_the_hidden_norm(dtype):
    cell = UnitaryRNNCell(2, 16, nonlinearity="identity", init="haar", dtype=dtype)
    with torch.no_grad():
        cell.bias.zero_()
        h = torch.randn(3, 16, dtype=cell.state_dtype)
        norm = torch.linalg.vector_norm(h, dim=-1)
        zero = torch.zeros(3, 2, dtype=torch.float64)
        for _ in range(1000):
            h = cell(zero, h)
    torch.testing.assert_close(torch.linalg.vector_norm(h, dim=-1), norm, atol=0, rtol=1e-12)


def test_modrelu():
    act = ModReLU(3, dtype=torch.float64)
    with torch.no_grad():
        act.bias.copy_(torch.tensor([-0.5, 0.0, 0.5], dtype=torch.float64))
    z = torch.tensor([[3 + 4j, 0j, -1j]], dtype=torch.complex128)
    expected = torch.tensor([[(4.5 / 5) * (3 + 4j), 0j, -1.5j]], dtype=torch.complex128)
    torch.testing.assert_close(act(z), expected)
    x = torch.tensor([[-2.0, 1.0, -0.25]], dtype=torch.float64)
    torch.testing.assert_close(act(x), torch.tensor([[-1.5, 1.0, -0.75]], dtype=torch.float64))
    small = torch.tensor([[0.2, 0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    act(small).sum().backward()  # |z| + b < 0 and z = 0: zero output, finite gradient
    assert torch.isfinite(small.grad).all()


def test_complex_to_real():
    z = torch.tensor([[1 + 2j, 3 - 4j]])
    assert torch.equal(ComplexToReal()(z), torch.tensor([[1.0, 3.0, 2.0, -4.0]]))
    x = torch.randn(2, 3)
    assert ComplexToReal()(x) is x


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_training_keeps_the_recurrent_matrix_unitary(dtype):
    torch.manual_seed(0)
    rnn = UnitaryRNN(2, 12, dtype=dtype)
    readout = torch.nn.Linear(24 if dtype.is_complex else 12, 1, dtype=torch.float64)
    model = torch.nn.ModuleDict({"rnn": rnn, "readout": readout})
    assert [name for name, _ in unitary_parameters(model)] == ["rnn.cell.recurrent_weight"]
    opt = ProjUNN(torch.optim.RMSprop(param_groups(model, unitary_lr=1e-3), lr=1e-2), seed=0)
    for _ in range(30):
        x = torch.randn(8, 10, 2, dtype=torch.float64)
        _, h = rnn(x)
        loss = (readout(ComplexToReal()(h)) - x.sum((1, 2)).unsqueeze(-1)).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert gram_defect(rnn.cell.recurrent_weight.detach()) < 1e-13


def test_bad_arguments():
    """A wrong type is a TypeError, a wrong value a ValueError; both name the argument and what it accepts."""
    with pytest.raises(
        ValueError, match="nonlinearity must be one of 'modrelu', 'relu', 'tanh', 'identity'; got 'gelu'"
    ):
        UnitaryRNNCell(2, 4, nonlinearity="gelu")
    with pytest.raises(ValueError, match="hidden_size must be >= 1, got 0"):
        UnitaryRNNCell(2, 0)
    with pytest.raises(TypeError, match="input_size must be an int >= 1, got float 2.0"):
        UnitaryRNNCell(2.0, 4)
    with pytest.raises(
        TypeError, match="dtype must be one of float32, float64, complex64, complex128; got torch.float16"
    ):
        UnitaryRNNCell(2, 4, dtype=torch.float16)
    with pytest.raises(TypeError, match="dtype must be one of float32, float64; got torch.complex64"):
        ModReLU(4, dtype=torch.complex64)
    with pytest.raises(ValueError, match="input_init must be one of 'he', 'xavier'; got 'orthogonal'"):
        UnitaryRNNCell(2, 4, input_init="orthogonal")
    with pytest.raises(TypeError, match="output_size must be an int >= 1, got NoneType None"):
        SequenceModel(2, 4, None)
    cell = UnitaryRNNCell(2, 4)
    with pytest.raises(ValueError, match=r"expected input of shape \(batch, 2\)"):
        cell(torch.zeros(3, 5))
    with pytest.raises(ValueError, match=r"expected hidden state of shape \(batch, 4\)"):
        cell(torch.zeros(3, 2), torch.zeros(3, 5))
    with pytest.raises(ValueError, match=r"expected input of shape \(batch, time, 2\)"):
        UnitaryRNN(2, 4)(torch.zeros(3, 2))
    assert "orthogonal, nonlinearity='modrelu', init='henaff'" in repr(cell)


def test_a_complex_dtype_is_the_one_way_to_ask_for_a_unitary_cell():
    """The ``complex=`` flag of the unreleased 0.1.0 is gone: passing it is a TypeError naming it."""
    for build in (UnitaryRNNCell, UnitaryRNN, lambda *sizes, **options: SequenceModel(*sizes, 1, **options)):
        with pytest.raises(TypeError, match="'complex'"):
            build(2, 4, complex=True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
@pytest.mark.parametrize(
    "build",
    [
        lambda **f: ModReLU(4, dtype=f["dtype"].to_real(), device=f["device"]),
        lambda **f: UnitaryRNNCell(2, 4, **f),
        lambda **f: UnitaryRNN(2, 4, nonlinearity="tanh", **f),
        lambda **f: SequenceModel(2, 4, 3, **f),
    ],
    ids=["ModReLU", "UnitaryRNNCell", "UnitaryRNN", "SequenceModel"],
)
def test_recurrent_layers_and_models_take_device_and_dtype(build, dtype):
    """Every parameter where ``device`` says (SequenceModel's readout included), in ``dtype`` or its real part."""
    model = build(dtype=dtype, device="meta")
    params = list(model.parameters())
    assert params and all(p.device.type == "meta" for p in params)
    assert all(p.dtype in (dtype, dtype.to_real()) for p in params)
    layer_dtype = dtype.to_real() if isinstance(model, ModReLU) else dtype  # modReLU's bias is real
    assert any(p.dtype == layer_dtype for p in params)


def test_sequence_model_readout_is_real_for_a_complex_rnn():
    model = SequenceModel(2, 4, 3, dtype=torch.complex64)
    assert model.rnn.cell.state_dtype == torch.complex64
    assert model.readout.weight.dtype == torch.float32 and model.readout.in_features == 8
    assert model(torch.randn(5, 7, 2)).shape == (5, 3)


@pytest.mark.parametrize("nonlinearity", ["relu", "modrelu"])
def test_under_autocast_the_fused_recurrence_runs_in_the_cells_precision(nonlinearity, monkeypatch):
    """The fused path is kept under bfloat16 autocast (not replaced by stepping the cell), and computes
    exactly what it computes without autocast: the same operations in float32."""
    import projunn.nn._rnn as module

    torch.manual_seed(0)
    rnn = UnitaryRNN(3, 16, nonlinearity=nonlinearity, init="haar")
    x = torch.randn(4, 50, 3)
    plain, _ = rnn(x)
    monkeypatch.setattr(module.UnitaryRNN, "_step_by_step", None)  # stepping would fail: it must not run
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast, _ = rnn(x)
        autocast.abs().sum().backward()
    assert autocast.dtype == torch.float32 and torch.equal(autocast, plain)
    assert rnn.cell.recurrent_weight.grad is not None and rnn.cell.recurrent_weight.grad.dtype == torch.float32
