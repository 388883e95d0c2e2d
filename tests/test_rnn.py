"""Recurrent layers: shapes, norm preservation, modReLU, training keeps U unitary."""

from __future__ import annotations

import pytest
import torch

from conftest import gram_defect
from projunn.nn import NONLINEARITIES, ComplexToReal, ModReLU, UnitaryRNN, UnitaryRNNCell
from projunn.optim import ProjUNN, param_groups, unitary_parameters


@pytest.mark.parametrize("complex_state", [False, True])
@pytest.mark.parametrize("nonlinearity", NONLINEARITIES)
def test_shapes_and_dtypes(complex_state, nonlinearity):
    rnn = UnitaryRNN(3, 8, nonlinearity=nonlinearity, complex=complex_state)
    out, h = rnn(torch.randn(4, 5, 3))
    assert out.shape == (4, 5, 8) and h.shape == (4, 8)
    assert out.is_complex() == complex_state
    assert torch.equal(out[:, -1], h)


@pytest.mark.parametrize("complex_state", [False, True])
def test_identity_recurrence_preserves_the_hidden_norm(complex_state):
    cell = UnitaryRNNCell(2, 16, nonlinearity="identity", complex=complex_state, init="haar", dtype=torch.float64)
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


@pytest.mark.parametrize("complex_state", [False, True])
def test_training_keeps_the_recurrent_matrix_unitary(complex_state):
    torch.manual_seed(0)
    rnn = UnitaryRNN(2, 12, complex=complex_state, dtype=torch.float64)
    readout = torch.nn.Linear(24 if complex_state else 12, 1, dtype=torch.float64)
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
    with pytest.raises(ValueError, match="nonlinearity must be one of"):
        UnitaryRNNCell(2, 4, nonlinearity="gelu")
    with pytest.raises(ValueError, match="hidden_size must be an int >= 1"):
        UnitaryRNNCell(2, 0)
    with pytest.raises(TypeError, match="real dtype"):
        UnitaryRNNCell(2, 4, dtype=torch.complex64)
    cell = UnitaryRNNCell(2, 4)
    with pytest.raises(ValueError, match=r"expected input of shape \(batch, 2\)"):
        cell(torch.zeros(3, 5))
    with pytest.raises(ValueError, match=r"expected hidden state of shape \(batch, 4\)"):
        cell(torch.zeros(3, 2), torch.zeros(3, 5))
    with pytest.raises(ValueError, match=r"expected input of shape \(batch, time, 2\)"):
        UnitaryRNN(2, 4)(torch.zeros(3, 2))
    assert "orthogonal, nonlinearity='modrelu', init='henaff'" in repr(cell)
