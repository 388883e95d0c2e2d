"""ProjUNN's parameter groups, closures and sketch generator: edge cases of the optimiser integration."""

from __future__ import annotations

import pytest
import torch

from conftest import gram_defect
from projunn.functional import lowrank, projunn_t, unitary_init
from projunn.optim import ProjUNN


def test_duplicate_parameter_is_updated_once():
    weight = torch.nn.Parameter(unitary_init(6, dtype=torch.float64))
    U = weight.detach().clone()
    with pytest.warns(UserWarning, match="duplicate"):
        base = torch.optim.SGD([{"params": [weight, weight], "unitary": True}], lr=0.1)
    opt = ProjUNN(base, sketch="exact", seed=0)
    weight.grad = torch.randn(6, 6, dtype=torch.float64)
    a, b = lowrank(-0.2 * weight.grad, 1, "exact")  # torch applies a twice-listed parameter twice
    opt.step()
    torch.testing.assert_close(weight.detach(), projunn_t(U, a, b), atol=1e-13, rtol=0)


def test_add_param_group_accepts_a_generator():
    opt = ProjUNN(torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1), seed=0)
    extra = torch.nn.Parameter(torch.eye(3))
    opt.add_param_group({"params": (p for p in [extra]), "unitary": True})
    assert opt.param_groups[-1]["params"] == [extra]


def test_bad_group_added_to_the_base_is_refused_before_any_change():
    good = torch.nn.Parameter(unitary_init(4, dtype=torch.float64))
    base = torch.optim.SGD([{"params": [good], "unitary": True}], lr=0.1)
    opt = ProjUNN(base, seed=0)
    bad = torch.nn.Parameter(torch.randn(5, 3, dtype=torch.float16))
    base.add_param_group({"params": [bad], "unitary": True})
    before = [good.detach().clone(), bad.detach().clone()]
    good.grad, bad.grad = torch.ones_like(good), torch.ones_like(bad)
    with pytest.raises(TypeError, match="unsupported dtype torch.float16"):
        opt.step()
    assert torch.equal(good, before[0]) and torch.equal(bad, before[1])


def test_closure_optimiser_with_stale_nan_grads_still_projects():
    weight = torch.nn.Parameter(unitary_init(5, dtype=torch.float64))
    opt = ProjUNN(torch.optim.LBFGS([{"params": [weight], "unitary": True}], lr=0.1, max_iter=2), seed=0)
    weight.grad = torch.full_like(weight, float("nan"))  # left over from an earlier failure

    def closure():
        opt.zero_grad()
        loss = (weight * torch.arange(25.0, dtype=torch.float64).reshape(5, 5)).sum()
        loss.backward()
        return loss

    opt.step(closure)
    assert opt.skipped_steps == 0
    assert gram_defect(weight.detach()) < 1e-14


def test_default_seed_does_not_consume_the_global_stream():
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    ProjUNN(torch.optim.SGD([torch.nn.Parameter(torch.eye(2))], lr=0.1))
    assert torch.equal(torch.rand(3), expected)


def test_generator_state_for_a_missing_device_is_refused_before_loading():
    weight = torch.nn.Parameter(unitary_init(3))
    opt = ProjUNN(torch.optim.SGD([{"params": [weight], "unitary": True}], lr=0.1), seed=0)
    state = opt.state_dict()
    state["projunn"]["generators"] = {"cpu": torch.zeros(3, dtype=torch.uint8)}  # not a generator state
    state["param_groups"][0]["lr"] = 0.5
    with pytest.raises(ValueError, match="cannot restore the projUNN sketch generator"):
        opt.load_state_dict(state)
    assert opt.param_groups[0]["lr"] == 0.1


def test_a_group_changed_after_construction_is_checked_again():
    weight = torch.nn.Parameter(unitary_init(4, dtype=torch.float64))
    opt = ProjUNN(torch.optim.SGD([{"params": [weight], "unitary": True}], lr=0.1), seed=0)
    opt.add_param_group({"params": (p for p in [torch.nn.Parameter(torch.zeros(2))])})  # a plain generator group
    weight.grad = torch.ones_like(weight)
    opt.step()
    opt.param_groups[0]["sketch"] = "svd"
    with pytest.raises(ValueError, match="sketch must be one of"):
        opt.step()
