"""projunn.nn.unitary_: a one-line constraint on any module, picked up by param_groups and ProjUNN."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch.nn.utils import parametrizations

from conftest import polar_reference
from projunn.functional import unitarity_error
from projunn.nn import UnitaryConstraint, UnitaryLinear, constraints, is_constrained, remove_unitary_, unitary_
from projunn.optim import ProjUNN, param_groups, unitary_parameters

F64 = torch.float64
TOL = 1e-12


def train(model: torch.nn.Module, inputs: torch.Tensor, steps: int = 12, **projunn) -> ProjUNN:
    """Adam with ProjUNN on ``model``'s groups, a few steps of a squared-output loss."""
    base = torch.optim.Adam(param_groups(model, unitary_lr=0.05), lr=0.01)
    opt = ProjUNN(base, seed=0, **{"rank": 2, **projunn})
    for _ in range(steps):
        opt.zero_grad()
        out = model(inputs)
        out = out[0] if isinstance(out, tuple) else out
        (out - 0.5).abs().square().mean().backward()
        opt.step()
    return opt


def matrices(module: torch.nn.Module, name: str = "weight") -> torch.Tensor:
    """The constrained matrices of module.name, through the view the constraint records."""
    constraint = module.__dict__["_projunn_constraints"][name]
    return constraint.matrix(getattr(module, name).detach())


def snapshot(module: torch.nn.Module) -> dict:
    return {
        "tensors": {k: v.clone() for k, v in module.state_dict().items()},
        "constraints": {id(m): dict(m.__dict__.get("_projunn_constraints", {})) for m in module.modules()},
    }


def assert_unchanged(module: torch.nn.Module, before: dict) -> None:
    after = snapshot(module)
    assert after["constraints"] == before["constraints"]
    assert after["tensors"].keys() == before["tensors"].keys()
    for key, value in before["tensors"].items():
        assert torch.equal(after["tensors"][key], value), key


# -- what is constrained, and how --------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [F64, torch.complex128])
@pytest.mark.parametrize("shape", [(6, 6), (9, 4), (4, 9)])
def test_linear_becomes_the_closest_semi_unitary_matrix_and_stays_unitary_under_projunn(dtype, shape):
    layer = torch.nn.Linear(shape[1], shape[0], dtype=dtype)
    original = layer.weight.detach().clone()
    assert unitary_(layer) is layer
    assert torch.allclose(layer.weight.detach(), polar_reference(original), atol=1e-13)
    assert is_constrained(layer, "weight") and not is_constrained(layer, "bias")
    groups = param_groups(layer)
    assert [g["params"] for g in groups] == [[layer.bias], [layer.weight]] and groups[1]["unitary"]
    assert "matrix_shape" not in groups[1]
    start = layer.weight.detach().clone()
    train(layer, torch.randn(5, shape[1], dtype=dtype))
    assert not torch.allclose(layer.weight.detach(), start)
    assert unitarity_error(layer.weight.detach()) < TOL


def test_a_constrained_linear_trains_exactly_like_the_built_in_layer():
    builtin = UnitaryLinear(6, dtype=F64)
    plain = torch.nn.Linear(6, 6, bias=False, dtype=F64)
    with torch.no_grad():
        plain.weight.copy_(builtin.weight)
    unitary_(plain, project=False)
    x = torch.randn(4, 6, dtype=F64)
    train(builtin, x)
    train(plain, x)
    assert torch.equal(builtin.weight, plain.weight)


def test_rnn_recurrent_weight_is_orthogonal_and_gru_stacked_gates_semi_orthogonal():
    rnn = unitary_(torch.nn.RNN(3, 5, batch_first=True, dtype=F64), "weight_hh_l0")
    gru = unitary_(torch.nn.GRU(3, 5, batch_first=True, dtype=F64), "weight_hh_l0")  # blocks=1: (15, 5)
    x = torch.randn(2, 7, 3, dtype=F64)
    for module in (rnn, gru):
        assert param_groups(module)[1]["params"] == [module.weight_hh_l0]
        train(module, x)
        assert unitarity_error(module.weight_hh_l0.detach()) < TOL
    assert gru.weight_hh_l0.shape == (15, 5)


@pytest.mark.parametrize("rnn_class, gates", [(torch.nn.GRU, 3), (torch.nn.LSTM, 4)])
def test_gate_blocks_are_a_batch_view_of_the_stacked_matrix(rnn_class, gates):
    rnn = unitary_(rnn_class(3, 5, num_layers=2, dtype=F64), "weight_hh_l1", blocks=gates)
    W = rnn.weight_hh_l1.detach()
    assert W.shape == (gates * 5, 5)
    for g in range(gates):  # each row-slice, the gate's own recurrent matrix, is orthogonal
        assert unitarity_error(W[g * 5 : (g + 1) * 5]) < TOL
    groups = param_groups(rnn)
    view_group = groups[-1]
    assert view_group["params"] == [rnn.weight_hh_l1] and view_group["unitary"]
    assert view_group["matrix_shape"] == (gates, 5, 5)
    assert torch.equal(matrices(rnn, "weight_hh_l1"), W.view(gates, 5, 5))


@pytest.mark.parametrize("rnn_class, gates", [(torch.nn.GRU, 3), (torch.nn.LSTM, 4)])
def test_gate_blocks_stay_orthogonal_under_projunn(rnn_class, gates):
    rnn = unitary_(rnn_class(3, 5, batch_first=True, dtype=F64), "weight_hh_l0", blocks=gates)
    train(rnn, torch.randn(2, 6, 3, dtype=F64))
    assert unitarity_error(matrices(rnn, "weight_hh_l0")).max() < TOL


@pytest.mark.parametrize(
    "conv, matrix_shape",
    [(torch.nn.Conv1d(3, 4, 5, dtype=F64), (4, 15)), (torch.nn.Conv2d(2, 24, 3, dtype=F64), (24, 18))],
)
def test_conv_kernel_is_read_as_an_out_by_in_k_matrix(conv, matrix_shape):
    original = conv.weight.detach().clone()
    unitary_(conv, kind="kernel")
    K = conv.weight.detach().reshape(matrix_shape)
    assert torch.allclose(K, polar_reference(original.reshape(matrix_shape)), atol=1e-13)
    assert unitarity_error(K) < TOL  # rows (filters) orthonormal when out <= in*k, columns otherwise
    assert param_groups(conv)[-1]["matrix_shape"] == matrix_shape


def test_conv_with_orthonormal_columns_and_stride_equal_to_kernel_is_an_isometry():
    patchify = unitary_(torch.nn.Conv2d(2, 8, 2, stride=2, bias=False, dtype=F64), kind="kernel")
    x = torch.randn(3, 2, 6, 6, dtype=F64)
    assert torch.allclose(patchify(x).flatten(1).norm(dim=1), x.flatten(1).norm(dim=1))


def test_conv_kernel_stays_orthogonal_under_projunn():
    conv = unitary_(torch.nn.Conv2d(2, 6, 3, padding=1, dtype=F64), kind="kernel")
    train(conv, torch.randn(2, 2, 5, 5, dtype=F64))
    assert unitarity_error(matrices(conv)) < TOL


def test_a_batch_of_unitaries_over_leading_dimensions():
    class Mixer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(3, 4, 4, dtype=torch.complex128))

        def forward(self, x):
            return (self.weight @ x).abs()

    mixer = unitary_(Mixer())
    assert "matrix_shape" not in param_groups(mixer)[-1]
    train(mixer, torch.randn(3, 4, 2, dtype=torch.complex128))
    assert unitarity_error(mixer.weight.detach()).max() < TOL


def test_a_loaded_pretrained_model_is_constrained_by_dotted_name(tmp_path):
    torch.manual_seed(0)
    pretrained = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2)).double()
    torch.save(pretrained.state_dict(), tmp_path / "weights.pt")
    model = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2)).double()
    model.load_state_dict(torch.load(tmp_path / "weights.pt", weights_only=True))
    unitary_(model, "0.weight")
    assert is_constrained(model[0], "weight")
    assert torch.allclose(model[0].weight.detach(), polar_reference(pretrained[0].weight.detach()), atol=1e-13)
    for key in ("0.bias", "2.weight", "2.bias"):
        assert torch.equal(model.state_dict()[key], pretrained.state_dict()[key])
    assert [name for name, _ in unitary_parameters(model)] == ["0.weight"]
    train(model, torch.randn(8, 6, dtype=F64))
    assert unitarity_error(model[0].weight.detach()) < TOL


def test_the_constraint_survives_deepcopy_state_dict_and_whole_model_save():
    model = torch.nn.Sequential(torch.nn.Linear(5, 5), torch.nn.GRU(5, 4)).double()
    unitary_(model, "0.weight")
    unitary_(model, "1.weight_hh_l0", blocks=3)

    def described(m):
        return [(g.get("matrix_shape"), [p.shape for p in g["params"]]) for g in param_groups(m)]

    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    copies = [copy.deepcopy(model), torch.load(buffer, weights_only=False)]
    for clone in copies:
        assert described(clone) == described(model)
        assert clone[1].__dict__["_projunn_constraints"] == {"weight_hh_l0": UnitaryConstraint("matrix", 3)}
        assert all(torch.equal(a, b) for a, b in zip(clone.state_dict().values(), model.state_dict().values()))
    # state_dict keys are the unconstrained module's: it loads into a plain model and back
    plain = torch.nn.Sequential(torch.nn.Linear(5, 5), torch.nn.GRU(5, 4)).double()
    plain.load_state_dict(model.state_dict())
    fresh = torch.nn.Sequential(torch.nn.Linear(5, 5), torch.nn.GRU(5, 4)).double()
    unitary_(fresh, "0.weight")
    fresh.load_state_dict(plain.state_dict())
    assert is_constrained(fresh[0], "weight") and torch.equal(fresh[0].weight, model[0].weight)
    train(copies[0][:1], torch.randn(3, 5, dtype=F64))
    assert unitarity_error(copies[0][0].weight.detach()) < TOL
    assert torch.equal(model[0].weight, plain[0].weight)  # the copy trained, the original did not


def test_project_false_keeps_a_unitary_value_exactly():
    layer = torch.nn.Linear(5, 5, bias=False, dtype=F64)
    with torch.no_grad():
        layer.weight.copy_(torch.linalg.qr(layer.weight)[0])
    before = layer.weight.detach().clone()
    unitary_(layer, project=False)
    assert torch.equal(layer.weight, before)


def test_remove_unitary_makes_the_parameter_ordinary_again():
    layer = unitary_(torch.nn.Linear(4, 4))
    remove_unitary_(layer)
    assert not is_constrained(layer) and "_projunn_constraints" not in layer.__dict__
    assert len(param_groups(layer)) == 1
    unitary_(layer, kind="kernel")  # and it may be constrained again, differently
    with pytest.raises(ValueError, match="not constrained"):
        remove_unitary_(layer, "bias")


def test_a_module_used_twice_shares_its_constraint():
    shared = unitary_(torch.nn.Linear(4, 4, bias=False, dtype=F64))
    model = torch.nn.Sequential(shared, torch.nn.Tanh(), shared)
    assert [len(g["params"]) for g in param_groups(model)] == [1]
    train(model, torch.randn(3, 4, dtype=F64))
    assert unitarity_error(shared.weight.detach()) < TOL


# -- bad input: one-line errors naming module and parameter, nothing modified -----------------------


def _tied():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    model[1].weight = model[0].weight
    return model


def _parametrised():
    return parametrizations.orthogonal(torch.nn.Linear(4, 4))


def _int_weight():
    layer = torch.nn.Linear(4, 4)
    layer.weight = torch.nn.Parameter(torch.ones(4, 4, dtype=torch.int64), requires_grad=False)
    return layer


def _empty():
    layer = torch.nn.Linear(4, 4)
    layer.weight = torch.nn.Parameter(torch.ones(4, 0))
    return layer


def _constrained():
    return unitary_(torch.nn.Linear(4, 4))


def _channels_last():
    return torch.nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)


BAD = [
    ("int", _int_weight, {"name": "weight"}, TypeError, "'weight' of Linear.*dtype torch.int64"),
    ("half", lambda: torch.nn.Linear(4, 4).half(), {}, TypeError, "'weight' of Linear.*float16.*autocast"),
    ("bf16", lambda: torch.nn.Linear(4, 4).bfloat16(), {}, TypeError, "'weight' of Linear.*bfloat16"),
    ("vector", lambda: torch.nn.Linear(4, 4), {"name": "bias"}, ValueError, "'bias' of Linear.*not a matrix"),
    (
        "blocks",
        lambda: torch.nn.GRU(2, 4),
        {"name": "weight_hh_l0", "blocks": 5},
        ValueError,
        "'weight_hh_l0' of GRU.*12 rows",
    ),
    (
        "zero blocks",
        lambda: torch.nn.Linear(4, 4),
        {"blocks": 0},
        ValueError,
        "Linear.*blocks must be >= 1",
    ),
    (
        "float blocks",
        lambda: torch.nn.Linear(4, 4),
        {"blocks": 2.0},
        TypeError,
        "Linear.*blocks must be an int",
    ),
    ("kind", lambda: torch.nn.Linear(4, 4), {"kind": "rows"}, ValueError, "'weight' of Linear.*kind must be one of"),
    ("kind type", lambda: torch.nn.Linear(4, 4), {"kind": None}, TypeError, "'weight' of Linear.*kind must be a str"),
    ("missing", lambda: torch.nn.Linear(4, 4), {"name": "weights"}, ValueError, "'weights' of Linear.*does not exist"),
    ("none", lambda: torch.nn.Linear(4, 4, bias=False), {"name": "bias"}, ValueError, "'bias' of Linear.*is None"),
    (
        "submodule",
        lambda: torch.nn.Sequential(torch.nn.Linear(4, 4)),
        {"name": "3.weight"},
        ValueError,
        "Sequential has no submodule '3'",
    ),
    ("parametrised", _parametrised, {}, ValueError, "'weight' of ParametrizedLinear.*already parametrised"),
    ("twice", _constrained, {}, ValueError, "'weight' of Linear.*already constrained"),
    (
        "built-in",
        lambda: UnitaryLinear(4),
        {},
        ValueError,
        "'weight' of UnitaryLinear.*already constrained \\(by unitary_ or by its layer\\)",
    ),
    ("tied", _tied, {"name": "1.weight"}, ValueError, "'1.weight' of Linear.*tied to '0.weight'"),
    ("strides", _channels_last, {"kind": "kernel"}, ValueError, "'weight' of Conv2d.*contiguous"),
    ("not unitary", lambda: torch.nn.Linear(4, 4), {"project": False}, ValueError, "'weight' of Linear.*project=True"),
    ("empty", _empty, {}, ValueError, "'weight' of Linear.*empty dimension"),
]


@pytest.mark.parametrize("build, kwargs, error, message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_is_refused_in_one_line_without_modifying_anything(build, kwargs, error, message):
    module = build()
    before = snapshot(module)
    with pytest.raises(error, match=message) as info:
        unitary_(module, **kwargs)
    assert "\n" not in str(info.value)
    assert_unchanged(module, before)


def test_a_non_module_is_refused():
    with pytest.raises(TypeError, match="needs an nn.Module"):
        unitary_(torch.zeros(3, 3))


def test_a_tie_outside_the_constrained_module_is_refused_by_param_groups():
    model = _tied()
    unitary_(model[0])  # model[0] alone cannot see model[1]
    with pytest.raises(ValueError, match=r"'0.weight' of Linear is constrained unitary but tied to '1.weight'"):
        param_groups(model)


def test_docstring_examples():
    import doctest

    import projunn.nn._constrain as module

    assert doctest.testmod(module, globs={"torch": torch, **vars(module)}).failed == 0


def test_constraints_are_read_only_and_public():
    layer = unitary_(torch.nn.Linear(4, 4))
    assert dict(constraints(layer)) == {"weight": UnitaryConstraint("matrix", 1)}
    assert dict(constraints(torch.nn.Linear(4, 4))) == {}
    with pytest.raises(TypeError):
        constraints(layer)["bias"] = UnitaryConstraint()


# -- a constraint holds however the optimiser is built ------------------------------------------------


def _mlp() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()


def _state_dict_loaded(model: torch.nn.Module) -> torch.nn.Module:
    fresh = unitary_(_mlp(), "0.weight")
    fresh.load_state_dict(model.state_dict())
    return fresh


def _pickled(model: torch.nn.Module) -> torch.nn.Module:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def _plain_steps(model: torch.nn.Module, optimizer, inputs: torch.Tensor, steps: int = 30) -> None:
    for _ in range(steps):
        optimizer.zero_grad()
        out = model(inputs)
        out = out[0] if isinstance(out, tuple) else out
        (out - 0.5).abs().square().mean().backward()
        optimizer.step()


@pytest.mark.parametrize(
    "copied", [lambda m: m, copy.deepcopy, _pickled, _state_dict_loaded], ids=["itself", "deepcopy", "pickled", "state"]
)
@pytest.mark.parametrize("base", [torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD])
def test_a_constrained_weight_stays_unitary_in_an_optimiser_built_from_model_parameters(copied, base):
    model = copied(unitary_(_mlp(), "0.weight"))
    opt = ProjUNN(base(model.parameters(), lr=0.05), seed=0)
    start = model[0].weight.detach().clone()
    _plain_steps(model, opt, torch.randn(16, 8, dtype=F64))
    assert not torch.allclose(model[0].weight.detach(), start)  # it trained
    assert unitarity_error(model[0].weight.detach()) < TOL
    assert unitarity_error(model[2].weight.detach().T) > 0.1  # the 3 x 8 head is left alone: rows not orthonormal


def test_in_an_ordinary_group_a_constrained_weight_steps_as_in_a_unitary_group_of_the_same_settings():
    x = torch.randn(16, 8, dtype=F64)
    runs = []
    for groups in (lambda m: m.parameters(), lambda m: param_groups(m)):
        model = unitary_(_mlp(), "0.weight")
        _plain_steps(model, ProjUNN(torch.optim.Adam(groups(model), lr=0.05), seed=0), x)
        runs.append(model.state_dict())
    for key, value in runs[0].items():
        assert torch.equal(value, runs[1][key]), key


@pytest.mark.parametrize(
    "module, inputs, name",
    [
        (lambda: unitary_(torch.nn.Conv2d(2, 6, 3, padding=1, dtype=F64), kind="kernel"), (2, 2, 5, 5), "weight"),
        (lambda: unitary_(torch.nn.GRU(3, 5, dtype=F64), "weight_hh_l0", blocks=3), (6, 2, 3), "weight_hh_l0"),
        (lambda: torch.nn.Sequential(UnitaryLinear(6, dtype=F64), torch.nn.Tanh()), (4, 6), "0.weight"),
    ],
    ids=["conv kernel", "gate blocks", "built-in layer"],
)
def test_kernels_gate_blocks_and_built_in_layers_hold_with_model_parameters(module, inputs, name):
    module = module()
    opt = ProjUNN(torch.optim.Adam(module.parameters(), lr=0.05), seed=0)
    _plain_steps(module, opt, torch.randn(inputs, dtype=F64))
    owner_path, _, attr = name.rpartition(".")
    owner = module.get_submodule(owner_path)
    constraint = constraints(module)[name]
    assert unitarity_error(constraint.matrix(getattr(owner, attr).detach())).max() < TOL


def test_a_weight_constrained_after_the_optimiser_was_built_is_kept_unitary_from_then_on():
    model = _mlp()
    opt = ProjUNN(torch.optim.Adam(model.parameters(), lr=0.05), seed=0)
    _plain_steps(model, opt, torch.randn(16, 8, dtype=F64), steps=2)
    unitary_(model, "0.weight")
    _plain_steps(model, opt, torch.randn(16, 8, dtype=F64))
    assert unitarity_error(model[0].weight.detach()) < TOL
    remove_unitary_(model, "0.weight")  # and an ordinary weight again: plain steps leave the group
    _plain_steps(model, opt, torch.randn(16, 8, dtype=F64))
    assert unitarity_error(model[0].weight.detach()) > 1e-3


def test_a_group_added_later_keeps_its_constrained_weight_unitary():
    model = unitary_(_mlp(), "0.weight")
    opt = ProjUNN(torch.optim.Adam(model[2].parameters(), lr=0.05), seed=0)
    opt.add_param_group({"params": list(model[0].parameters())})
    _plain_steps(model, opt, torch.randn(16, 8, dtype=F64))
    assert unitarity_error(model[0].weight.detach()) < TOL


def test_a_group_that_contradicts_the_constraints_view_is_refused_in_one_line():
    gru = unitary_(torch.nn.GRU(3, 5, dtype=F64), "weight_hh_l0", blocks=3)
    group = {"params": [gru.weight_hh_l0], "unitary": True, "matrix_shape": (15, 5)}
    with pytest.raises(ValueError, match=r"GRU.weight_hh_l0 is constrained as matrices of shape \(3, 5, 5\)"):
        ProjUNN(torch.optim.Adam([group], lr=0.05))


def test_constraints_are_looked_up_only_when_groups_or_constraints_change(monkeypatch):
    from projunn.optim import _projunn

    model = unitary_(_mlp(), "0.weight")
    opt = ProjUNN(torch.optim.Adam(model.parameters(), lr=0.05), seed=0)
    lookups = []
    real = _projunn.constrained_weights
    monkeypatch.setattr(_projunn, "constrained_weights", lambda: lookups.append(1) or real())
    _plain_steps(model, opt, torch.randn(16, 8, dtype=F64), steps=5)
    assert lookups == []  # nothing per step
    copy.deepcopy(model)  # a copy anywhere registers a constraint: the next step looks again, once
    _plain_steps(model, opt, torch.randn(16, 8, dtype=F64), steps=5)
    assert len(lookups) == len(opt.param_groups)


def test_queries_accept_the_dotted_names_unitary_accepts():
    model = unitary_(_mlp(), "0.weight")
    assert is_constrained(model, "0.weight") and not is_constrained(model, "2.weight")
    assert is_constrained(model) and not is_constrained(_mlp())
    assert dict(constraints(model)) == {"0.weight": UnitaryConstraint("matrix", 1)}
    nested = torch.nn.Sequential(
        torch.nn.Sequential(UnitaryLinear(4)), unitary_(torch.nn.GRU(4, 4), blocks=1, name="weight_hh_l0")
    )
    assert set(constraints(nested)) == {"0.0.weight", "1.weight_hh_l0"}
    remove_unitary_(model, "0.weight")
    assert dict(constraints(model)) == {}


def test_a_shallow_copy_outliving_its_original_saves_loads_and_is_found():
    original = unitary_(torch.nn.Linear(6, 6, dtype=F64))
    shallow = copy.copy(original)
    del original
    import gc

    gc.collect()
    assert is_constrained(shallow, "weight")  # looking at it makes the shared record its own
    loaded = _pickled(shallow)
    assert is_constrained(loaded, "weight")
    opt = ProjUNN(torch.optim.SGD(loaded.parameters(), lr=0.5), seed=0)
    _plain_steps(loaded, opt, torch.randn(4, 6, dtype=F64), steps=3)
    assert unitarity_error(loaded.weight.detach()) < TOL
