"""ProjUNN with torch optimisers: correctness, state dicts, faults, bad settings, groups, closures, sketch seeds."""

from __future__ import annotations

import contextlib
import copy
import io
import pickle
import warnings

import pytest
import torch

import projunn
from conftest import gram_defect
from projunn.functional import lowrank, projunn_d, projunn_t, unitarity_error, unitary_init
from projunn.nn import UnitaryLinear
from projunn.optim import ProjUNN, param_groups, unitary_parameters
from projunn.optim._drift import default_tolerance

OPTIMISERS = {
    "sgd": lambda groups: torch.optim.SGD(groups, lr=0.05),
    "sgd-momentum": lambda groups: torch.optim.SGD(groups, lr=0.05, momentum=0.9, nesterov=True),
    "rmsprop": lambda groups: torch.optim.RMSprop(groups, lr=1e-3),
    "adam": lambda groups: torch.optim.Adam(groups, lr=1e-2),
    "adamw": lambda groups: torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.1),
}


class Student(torch.nn.Module):
    """A unitary layer and an ordinary one: both kinds of group in one model."""

    def __init__(self, n=8, dtype=torch.float64):
        super().__init__()
        self.rotate = UnitaryLinear(n, dtype=dtype, generator=torch.Generator().manual_seed(0))
        self.head = torch.nn.Linear(n, 1, dtype=dtype)

    def forward(self, x):
        return self.head(torch.tanh(self.rotate(x)))


def _batches(n, steps, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(16, n, dtype=dtype, generator=g), torch.randn(16, 1, dtype=dtype, generator=g))
        for _ in range(steps)
    ]


def _train(model, optimizer, batches):
    for x, y in batches:
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


# -- the update is the projection of the base optimiser's own step ---------------------


@pytest.mark.parametrize("name", list(OPTIMISERS))
@pytest.mark.parametrize("method", ["t", "d"])
@pytest.mark.parametrize("sketch", ["lsi", "exact"])
def test_each_step_is_the_projection_of_the_base_step(name, method, sketch):
    """Run plain torch alongside; ProjUNN's weight = projUNN(U, sketch(plain step)), its state = plain state."""
    torch.manual_seed(0)
    model = Student()
    shadow = copy.deepcopy(model)
    opt = ProjUNN(OPTIMISERS[name](param_groups(model)), method=method, sketch=sketch, rank=2, seed=5)
    plain = OPTIMISERS[name](param_groups(shadow))
    generator = torch.Generator().manual_seed(5)
    for x, y in _batches(8, 5):
        U = model.rotate.weight.detach().clone()
        for m in (model, shadow):
            torch.nn.functional.mse_loss(m(x), y).backward()
        shadow.load_state_dict(model.state_dict())  # same point, same gradient
        for p, q in zip(model.parameters(), shadow.parameters()):
            q.grad = p.grad.clone()
        opt.step()
        plain.step()
        D = shadow.rotate.weight.detach() - U
        a, b = lowrank(D, 2, sketch, generator=generator)
        expected = (projunn_t if method == "t" else projunn_d)(U, a, b)
        torch.testing.assert_close(model.rotate.weight.detach(), expected, atol=1e-12, rtol=0)
        # Bit-equal: the same base step (same class, groups and kernels) on the same values and gradients.
        torch.testing.assert_close(model.head.weight, shadow.head.weight, atol=0, rtol=0)
        # Statistics are kept on the raw Euclidean gradients, exactly as plain torch keeps them.
        for p, q in zip(model.parameters(), shadow.parameters()):
            for key, value in plain.state[q].items():
                torch.testing.assert_close(opt.optimizer.state[p][key], value, atol=0, rtol=0)
        opt.zero_grad()
        plain.zero_grad()
    assert gram_defect(model.rotate.weight.detach()) < 1e-13


@pytest.mark.parametrize("name", list(OPTIMISERS))
def test_projection_off_matches_plain_torch_bit_for_bit(name):
    torch.manual_seed(0)
    model = Student(dtype=torch.float32)
    reference = copy.deepcopy(model)
    opt = ProjUNN(OPTIMISERS[name](param_groups(model, method="none")), seed=0)
    plain = OPTIMISERS[name](param_groups(reference))
    batches = _batches(8, 20, dtype=torch.float32)
    _train(model, opt, batches)
    _train(reference, plain, batches)
    # Bit-equal: with method "none" the hooks do no arithmetic, so both runs make the same torch calls.
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p, q)


def test_float32_drift_over_400_adam_steps_with_and_without_control():
    """N = 128, float32: the rounding drift of an uncontrolled weight, and what each control does to it.

    Storing U in float32 rounds every entry once per step, a random walk that
    passes the default drift tolerance (5.4e-6 at N = 128) within a few
    hundred steps (measured: ~1e-5 after 600 steps). Three arms on the same
    data: no control at all (``drift_tolerance=None``) must stay under the
    random-walk bound yet pass the tolerance, so the controlled arms have
    something to remove; the default control must keep the error under its
    tolerance throughout, correcting at least once; an exact snap every 200
    steps (and no other control) must leave one rounding right after it.
    The controls change the weight only by rounding, so all arms learn alike.
    """
    n, steps, every = 128, 400, 200
    target = unitary_init(n, "haar", generator=torch.Generator().manual_seed(1))
    one_rounding = 4.1e-7  # measured unitarity error of a Haar matrix rounded to float32 at N = 128
    arms = {
        "none": dict(drift_tolerance=None),
        "auto": dict(drift_tolerance="auto"),
        "snap": dict(drift_tolerance=None, reorthogonalize_every=every),
    }
    results = {}
    for label, options in arms.items():
        torch.manual_seed(0)
        layer = UnitaryLinear(n)
        opt = ProjUNN(torch.optim.Adam(param_groups(layer), lr=1e-2), seed=0, **options)
        losses, errors = [], []
        for step in range(steps):
            x = torch.randn(64, n)
            loss = (layer(x) - x @ target.mT).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
            if step % 20 == 19:
                errors.append(unitarity_error(layer.weight.detach()).item())
        results[label] = (losses, errors, opt)
    tolerance = default_tolerance(layer.weight)
    _, free, _ = results["none"]
    assert tolerance < free[-1] < 2 * one_rounding * steps**0.5
    _, controlled, opt = results["auto"]
    assert max(controlled) < tolerance and opt.drift_control.corrections >= 1
    _, snapped, _ = results["snap"]
    assert snapped[-1] < 1.5 * one_rounding  # the last step snapped
    assert max(snapped) < free[-1]
    for losses, _, _ in results.values():
        assert sum(losses[-50:]) < 0.95 * sum(losses[:50])
        assert losses[-1] == pytest.approx(results["none"][0][-1], rel=1e-3)


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
@pytest.mark.parametrize("method", ["t", "d"])
def test_complex_weights_stay_unitary(dtype, method):
    torch.manual_seed(0)
    layer = UnitaryLinear(16, dtype=dtype)
    opt = ProjUNN(torch.optim.RMSprop(param_groups(layer), lr=1e-2), method=method, rank=2, seed=0)
    target = unitary_init(16, dtype=dtype)
    first = None
    for _ in range(300):
        x = torch.randn(32, 16, dtype=dtype)
        loss = (layer(x) - x @ target.mT).abs().square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        first = loss.item() if first is None else first
    assert loss.item() < 0.5 * first
    assert gram_defect(layer.weight.detach()) < 100 * torch.finfo(dtype).eps * 300**0.5


def test_batched_unitary_parameter():
    """A (B, N, N) parameter: each matrix gets its own projUNN step."""
    torch.manual_seed(0)
    weight = torch.nn.Parameter(unitary_init(6, batch_shape=(4,), dtype=torch.float64))
    opt = ProjUNN(torch.optim.SGD([{"params": [weight], "unitary": True}], lr=0.1), seed=0, sketch="exact")
    for _ in range(10):
        (weight * torch.arange(24.0, dtype=torch.float64).reshape(4, 6, 1)).sum().backward()
        opt.step()
        opt.zero_grad()
    assert gram_defect(weight.detach()) < 1e-13


# -- state dicts and schedulers -------------------------------------------------------


@pytest.mark.parametrize("name", ["adam", "sgd-momentum", "rmsprop"])
@pytest.mark.parametrize("sketch", ["lsi", "column", "rsvd"])
def test_state_dict_round_trip_continues_exactly(name, sketch):
    batches = _batches(8, 12)

    def fresh():
        torch.manual_seed(0)
        model = Student()
        base = OPTIMISERS[name](param_groups(model, unitary_lr=0.01))
        opt = ProjUNN(base, sketch=sketch, seed=3)
        scheduler = torch.optim.lr_scheduler.StepLR(base, step_size=3, gamma=0.5)
        return model, opt, scheduler

    def run(model, opt, scheduler, part):
        for x, y in part:
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()
            scheduler.step()

    model, opt, scheduler = fresh()
    run(model, opt, scheduler, batches)

    first, opt1, sched1 = fresh()
    run(first, opt1, sched1, batches[:6])
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt1.state_dict(), "sched": sched1.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    second, opt2, sched2 = fresh()
    second.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    assert opt2.steps == 6
    run(second, opt2, sched2, batches[6:])
    for p, q in zip(model.parameters(), second.parameters()):
        assert torch.equal(p, q)


def test_scheduler_changes_the_unitary_learning_rate():
    torch.manual_seed(0)
    model = Student()
    base = torch.optim.SGD(param_groups(model, unitary_lr=0.1), lr=0.1)
    opt = ProjUNN(base, sketch="exact", seed=0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(base, lambda step: 0.0 if step >= 1 else 1.0)
    x, y = _batches(8, 1)[0]
    for expect_change in (True, False):
        before = model.rotate.weight.detach().clone()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        scheduler.step()
        assert (not torch.equal(before, model.rotate.weight)) == expect_change


def test_loading_a_malformed_projunn_entry_is_refused_and_nothing_changes():
    model = Student()
    opt = ProjUNN(torch.optim.Adam(param_groups(model)), seed=0)
    state = opt.state_dict()
    state["projunn"] = {"steps": 3}
    with pytest.raises(ValueError, match="malformed"):
        opt.load_state_dict(state)
    assert opt.steps == 0


def test_loading_a_plain_state_dict_warns():
    model = Student()
    plain = torch.optim.Adam(param_groups(model))
    opt = ProjUNN(torch.optim.Adam(param_groups(model)), seed=0)
    with pytest.warns(RuntimeWarning, match="without projUNN state"):
        opt.load_state_dict(plain.state_dict())


# -- non-finite steps -------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_gradient_leaves_unitary_weights_and_state_untouched(bad):
    torch.manual_seed(0)
    model = Student()
    opt = ProjUNN(torch.optim.Adam(param_groups(model), lr=0.01), seed=0)
    _train(model, opt, _batches(8, 2))
    weight = model.rotate.weight.detach().clone()
    state = copy.deepcopy(opt.optimizer.state[model.rotate.weight])
    x, y = _batches(8, 1, seed=9)[0]
    torch.nn.functional.mse_loss(model(x), y).backward()
    model.rotate.weight.grad[0, 0] = bad
    with pytest.warns(RuntimeWarning, match="gradient is NaN or Inf"):
        opt.step()
    assert torch.equal(model.rotate.weight, weight)
    assert opt.skipped_steps == 1
    for key, value in state.items():
        assert torch.equal(opt.optimizer.state[model.rotate.weight][key], value)
    assert model.rotate.weight.grad is not None  # handed back for inspection
    opt.zero_grad()
    _train(model, opt, _batches(8, 2, seed=4))  # training goes on normally afterwards
    assert torch.isfinite(model.rotate.weight).all() and opt.skipped_steps == 1


def test_warnings_point_at_the_line_that_called_the_optimiser():
    """Through ProjUNN.step, the base optimiser's own step, or load_state_dict: the user's line, not torch's."""
    weight = torch.nn.Parameter(unitary_init(4, dtype=torch.float64))
    opt = ProjUNN(torch.optim.Adam([{"params": [weight], "unitary": True}]), seed=0)
    calls = {
        "ProjUNN.step": opt.step,
        "base step": opt.optimizer.step,
        "load_state_dict": lambda: opt.load_state_dict(torch.optim.Adam([weight]).state_dict()),
    }
    for label, call in calls.items():
        weight.grad = torch.full_like(weight, float("nan"))
        with pytest.warns(RuntimeWarning) as caught:
            call()
        assert [w.filename for w in caught] == [__file__], label


#: Dynamo's capture and AOTAutograd's joint graph, run by eager kernels: what decides graph breaks
#: and the step's behaviour under torch.compile, without Inductor's code generation (about 30 s
#: of compiling on 2 cores, and a C++ toolchain) that says nothing about projunn.
COMPILE_BACKEND = "aot_eager"


def _skip_unless_compile_works():
    """Skip the test when this interpreter cannot run torch.compile (a Python Dynamo does not support)."""
    try:
        torch.compile(lambda x: x + 1, backend=COMPILE_BACKEND)(torch.zeros(2))
    except Exception as error:  # Dynamo raises many kinds; any of them means no torch.compile here
        pytest.skip(f"torch.compile cannot run on this machine: {type(error).__name__}: {error}")


def test_compiled_model_and_step_match_eager_without_graph_breaks(capfd):
    """A compiled model and a compiled function around ``step``: eager weights to rounding, no Dynamo noise.

    The step runs eagerly (Note [Eager steps under torch.compile]); only the model's
    graph differs from the eager run, so the two agree to float64 rounding, not bit for bit.
    """
    runs = {}
    # torch's own deprecation notices (TorchScript internals) are not ours; anything else fails below.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _skip_unless_compile_works()
        try:
            for label in ("eager", "compiled"):
                torch.manual_seed(0)
                model = Student()
                opt = ProjUNN(torch.optim.Adam(param_groups(model), lr=0.01), rank=2, seed=0)
                forward = torch.compile(model, backend=COMPILE_BACKEND) if label == "compiled" else model
                step = torch.compile(opt.step, backend=COMPILE_BACKEND) if label == "compiled" else opt.step
                for x, y in _batches(8, 3):
                    torch.nn.functional.mse_loss(forward(x), y).backward()
                    step()
                    opt.zero_grad()
                runs[label] = [p.detach().clone() for p in model.parameters()]
        finally:
            torch._dynamo.reset()  # leave no compiled frames behind for other tests
    assert [str(w.message) for w in caught if not issubclass(w.category, DeprecationWarning)] == []
    for eager, compiled in zip(runs["eager"], runs["compiled"]):
        torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-12)
    logged = capfd.readouterr().err
    assert "Graph break" not in logged and "projunn" not in logged, logged


def test_nonfinite_proposed_step_restores_every_unitary_weight():
    torch.manual_seed(0)
    w1 = torch.nn.Parameter(unitary_init(5, dtype=torch.float64))
    w2 = torch.nn.Parameter(unitary_init(5, dtype=torch.float64))
    before = [w1.detach().clone(), w2.detach().clone()]
    opt = ProjUNN(torch.optim.SGD([{"params": [w1, w2], "unitary": True}], lr=1e308), seed=0)
    (w1.sum() * 1e10 + w2.sum()).backward()  # the step overflows to Inf for w1
    with pytest.warns(RuntimeWarning, match="proposed step"):
        opt.step()
    assert torch.equal(w1, before[0]) and torch.equal(w2, before[1])


def test_nonfinite_raise_policy():
    model = Student()
    opt = ProjUNN(torch.optim.SGD(param_groups(model), lr=0.1), seed=0, on_nonfinite="raise")
    x, y = _batches(8, 1)[0]
    torch.nn.functional.mse_loss(model(x), y).backward()
    weight = model.rotate.weight.detach().clone()
    model.rotate.weight.grad.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="skipped"):
        opt.step()
    assert torch.equal(model.rotate.weight, weight)
    assert model.rotate.weight.grad is not None


# -- drift control, groups, settings --------------------------------------------------


def test_reorthogonalize_every_snaps_to_the_polar_factor():
    weight = torch.nn.Parameter(unitary_init(6, dtype=torch.float64))
    opt = ProjUNN(torch.optim.SGD([{"params": [weight], "unitary": True}], lr=0.0), seed=0, reorthogonalize_every=2)
    with torch.no_grad():
        weight.mul_(1.001)  # drifted off the group
    drifted = weight.detach().clone()
    for step in range(2):
        weight.grad = torch.zeros_like(weight)
        opt.step()
        if step == 0:
            assert torch.allclose(weight, drifted, atol=1e-15)
    assert gram_defect(weight.detach()) < 1e-14
    torch.testing.assert_close(weight.detach(), drifted / 1.001, atol=1e-14, rtol=0)


def test_groups_take_per_group_settings():
    torch.manual_seed(0)
    a, b = UnitaryLinear(6, dtype=torch.float64), UnitaryLinear(6, dtype=torch.float64)
    groups = [
        {"params": a.parameters(), "unitary": True, "method": "d", "rank": 3, "sketch": "exact", "lr": 0.1},
        {"params": b.parameters(), "unitary": True, "method": "none", "lr": 0.1},
    ]
    opt = ProjUNN(torch.optim.SGD(groups, foreach=False), seed=0)  # param.add_(grad, alpha=-lr), as below
    before_a = a.weight.detach().clone()
    x = torch.randn(4, 6, dtype=torch.float64)
    (a(x).sum() + b(x).square().sum()).backward()
    grad_a, grad_b = a.weight.grad.clone(), b.weight.grad.clone()
    before_b = b.weight.detach().clone()
    opt.step()
    ua, ub = lowrank(-0.1 * grad_a, 3, "exact")
    torch.testing.assert_close(a.weight.detach(), projunn_d(before_a, ua, ub), atol=1e-13, rtol=0)
    torch.testing.assert_close(b.weight.detach(), before_b.add(grad_b, alpha=-0.1), atol=0, rtol=0)  # the same op


def test_rank_larger_than_n_is_capped():
    weight = torch.nn.Parameter(unitary_init(3, dtype=torch.float64))
    opt = ProjUNN(torch.optim.SGD([{"params": [weight], "unitary": True}], lr=0.1), rank=8, seed=0)
    weight.grad = torch.randn(3, 3, dtype=torch.float64)
    opt.step()
    assert gram_defect(weight.detach()) < 1e-14


def test_param_groups_and_registry():
    model = torch.nn.Sequential(UnitaryLinear(4), torch.nn.Linear(4, 4), UnitaryLinear(4, bias=True))
    names = [name for name, _ in unitary_parameters(model)]
    assert names == ["0.weight", "2.weight"]
    groups = param_groups(model, unitary_lr=0.5, method="d", rank=2, sketch="column")
    assert [len(g["params"]) for g in groups] == [3, 2]
    assert groups[1] == {**groups[1], "unitary": True, "lr": 0.5, "method": "d", "rank": 2, "sketch": "column"}
    assert groups[1]["weight_decay"] == 0.0
    clone = copy.deepcopy(model)  # the registry survives deepcopy: it lives on classes
    assert [name for name, _ in unitary_parameters(clone)] == names
    assert param_groups(torch.nn.Linear(2, 2))[0].keys() == {"params"}


def test_hooks_work_when_stepping_the_base_optimiser_directly():
    torch.manual_seed(0)
    layer = UnitaryLinear(8, dtype=torch.float64)
    base = torch.optim.Adam(param_groups(layer), lr=0.1)
    ProjUNN(base, seed=0)
    for x, _ in _batches(8, 10):
        layer(x).sum().backward()
        base.step()
        base.zero_grad()
    assert gram_defect(layer.weight.detach()) < 1e-13


def test_remove_detaches():
    layer = UnitaryLinear(4, dtype=torch.float64)
    base = torch.optim.SGD(param_groups(layer), lr=1.0)
    opt = ProjUNN(base, seed=0)
    opt.remove()
    layer.weight.grad = torch.ones(4, 4, dtype=torch.float64)
    base.step()
    assert gram_defect(layer.weight.detach()) > 0.1  # plain SGD again
    ProjUNN(base, seed=0)  # can attach anew after removal


def test_repr_and_surface():
    model = Student()
    opt = ProjUNN(torch.optim.Adam(param_groups(model)), method="d", rank=2, seed=0)
    assert "ProjUNN(Adam, method='d', rank=2, sketch='lsi'" in repr(opt)
    assert opt.param_groups is opt.optimizer.param_groups
    opt.add_param_group({"params": [torch.nn.Parameter(torch.eye(3))], "unitary": True})
    assert len(opt.param_groups) == 3


def test_bad_settings_name_the_problem():
    model = Student()
    make = lambda: torch.optim.SGD(param_groups(model), lr=0.1)  # noqa: E731
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        ProjUNN(object())
    with pytest.raises(ValueError, match="method must be one of 't', 'd', 'none'"):
        ProjUNN(make(), method="cayley")
    with pytest.raises(ValueError, match="rank must be >= 1"):
        ProjUNN(make(), rank=0)
    with pytest.raises(ValueError, match="sketch must be one of"):
        ProjUNN(make(), sketch="svd")
    with pytest.raises(ValueError, match="on_nonfinite"):
        ProjUNN(make(), on_nonfinite="ignore")
    with pytest.raises(ValueError, match="reorthogonalize_every must be >= 0"):
        ProjUNN(make(), reorthogonalize_every=-1)
    with pytest.raises(ValueError, match=r"must be matrices .*got shape \(3,\)"):
        ProjUNN(torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(3))], "unitary": True}], lr=0.1))
    with pytest.raises(TypeError, match="unsupported dtype torch.float16"):
        ProjUNN(torch.optim.SGD([{"params": [torch.nn.Parameter(torch.eye(3).half())], "unitary": True}], lr=0.1))
    with pytest.raises(ValueError, match="rank must be >= 1"):
        ProjUNN(torch.optim.SGD([{"params": [torch.nn.Parameter(torch.eye(3))], "unitary": True, "rank": 0}], lr=0.1))
    base = make()
    ProjUNN(base, seed=0)
    with pytest.raises(ValueError, match="already has a ProjUNN attached"):
        ProjUNN(base)


def test_public_names():
    assert set(projunn.optim.__all__) == {
        "Method",
        "ProjUNN",
        "distributed_state_dict",
        "load_distributed_state_dict",
        "param_groups",
        "unitary_parameters",
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ProjUNN(torch.optim.SGD(param_groups(Student()), lr=0.1))


def test_a_failing_base_step_leaves_nothing_half_updated():
    weight = torch.nn.Parameter(unitary_init(4, dtype=torch.float64))
    before = weight.detach().clone()
    opt = ProjUNN(torch.optim.LBFGS([{"params": [weight], "unitary": True}], lr=0.1, max_iter=3), seed=0)
    calls = []
    failing = [True]

    def closure():
        opt.zero_grad()
        loss = (weight * torch.arange(16.0, dtype=torch.float64).reshape(4, 4)).sum()
        loss.backward()
        calls.append(1)
        if failing[0] and len(calls) == 3:
            raise RuntimeError("data loader failed")
        return loss

    with pytest.raises(RuntimeError, match="data loader failed"):
        opt.step(closure)
    assert torch.equal(weight, before)
    # A closure-based optimiser works through the hooks. (LBFGS's own state
    # is not valid after an interrupted step, so use a fresh one.)
    opt.remove()
    opt = ProjUNN(torch.optim.LBFGS([{"params": [weight], "unitary": True}], lr=0.1, max_iter=3), seed=0)
    failing[0] = False
    opt.step(closure)
    assert not torch.equal(weight, before)
    assert gram_defect(weight.detach()) < 1e-14


# -- ProjUNN is the optimiser (Note [ProjUNN is the optimiser]) ---------------------------------


def _student_and_projunn(**options):
    torch.manual_seed(0)
    model = Student()
    return model, ProjUNN(torch.optim.Adam(param_groups(model, unitary_lr=0.05), lr=1e-2), seed=5, **options)


def test_projunn_is_an_optimizer_sharing_the_base_groups_state_and_defaults():
    model, opt = _student_and_projunn()
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is opt.optimizer.param_groups and opt.defaults is opt.optimizer.defaults
    _train(model, opt, _batches(8, 2))
    assert opt.state is opt.optimizer.state and len(opt.state) == len(list(model.parameters()))
    assert opt.unitary_defaults == {"method": "t", "rank": 1, "sketch": "lsi"}
    opt.param_groups[0]["lr"] = 0.5  # written through to the base
    assert opt.optimizer.param_groups[0]["lr"] == 0.5


def test_a_scheduler_steps_the_learning_rate_of_the_projunn_optimizer():
    model, opt = _student_and_projunn()
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for x, y in _batches(8, 4):
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()  # no "scheduler.step() before optimizer.step()" warning (warnings are errors here)
        opt.zero_grad()
        scheduler.step()
    assert [g["lr"] for g in opt.param_groups] == [1e-2 / 4, 0.05 / 4]
    assert gram_defect(model.rotate.weight.detach()) < 1e-13


def test_hooks_registered_on_projunn_run_with_the_base_step_and_state_dict():
    model, opt = _student_and_projunn()
    seen = []
    opt.register_step_pre_hook(lambda o, args, kwargs: seen.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: seen.append("post"))
    opt.register_state_dict_post_hook(lambda o, state: seen.append("saved"))
    _train(model, opt, _batches(8, 1))
    opt.state_dict()
    assert seen == ["pre", "post", "saved"]


def test_a_base_optimizer_takes_one_projunn_at_a_time():
    _, opt = _student_and_projunn()
    with pytest.raises(ValueError, match="already has a ProjUNN attached"):
        ProjUNN(opt.optimizer)
    assert not hasattr(opt.optimizer, "_projunn_attached")  # nothing stamped on the base
    opt.remove()
    ProjUNN(opt.optimizer)


def test_copying_projunn_is_refused_in_one_line_naming_the_state_dict():
    _, opt = _student_and_projunn()
    for copier in (copy.deepcopy, pickle.dumps):
        with pytest.raises(TypeError, match=r"save and load its state_dict\(\) instead"):
            copier(opt)


def test_projunn_state_loads_on_its_own_as_after_a_distributed_checkpoint():
    batches = _batches(8, 6)
    model, opt = _student_and_projunn()
    _train(model, opt, batches[:3])
    saved_model, saved = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    _train(model, opt, batches[3:])
    resumed, resumed_opt = _student_and_projunn()
    resumed.load_state_dict(saved_model)
    with pytest.warns(RuntimeWarning, match="without projUNN state"):
        resumed_opt.load_state_dict({k: v for k, v in saved.items() if k != "projunn"})
    resumed_opt.load_projunn_state(saved["projunn"])
    _train(resumed, resumed_opt, batches[3:])
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="malformed"):
        resumed_opt.load_projunn_state({"steps": 1})


# -- steps from zero (Note [Steps from zero]) ---------------------------------------------

VALUE_FREE = {
    "adam": lambda groups: torch.optim.Adam(groups, lr=1e-2, amsgrad=True, maximize=True),
    "adamw": lambda groups: torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.1),  # 0 on the unitary group
    "rmsprop": lambda groups: torch.optim.RMSprop(groups, lr=1e-3, centered=True, momentum=0.5),
    "sgd-momentum": lambda groups: torch.optim.SGD(groups, lr=0.02, momentum=0.9, nesterov=True),
}


def _weight_seen_during_the_base_step(optimizer) -> list[torch.Tensor]:
    """The unitary weight as the base optimiser sees it when its step starts (a pre-hook after ProjUNN's)."""
    seen = []
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: seen.append(opt.param_groups[1]["params"][0].clone()))
    return seen


@pytest.mark.parametrize("name", list(VALUE_FREE))
@pytest.mark.parametrize("method", ["t", "d"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_steps_from_zero_equal_the_generic_path(name, method, dtype):
    """The base step on a zeroed buffer gives the weights of the copy-and-subtract path.

    The generic path recovers fl(fl(U + D) - U), the other D itself: they differ by up to
    eps |U| per entry of the step, so the weights agree to a few eps per step (1e-12 over 10
    float64 steps), and the optimiser states, fed the same gradients up to that, to 1e-12 relative.
    """
    runs = {}
    for from_zero in (True, False):
        torch.manual_seed(0)
        model = Student(dtype=dtype)
        base = VALUE_FREE[name](param_groups(model))
        opt = ProjUNN(base, method=method, rank=2, seed=5, step_from_zero=from_zero)
        seen = _weight_seen_during_the_base_step(base)
        for x, y in _batches(8, 10, dtype=dtype):
            (model(x) - y).abs().square().mean().backward()
            opt.step()
            opt.zero_grad()
        # Which path ran: the zeros, or the weight itself, while the base optimiser stepped.
        assert all((w.abs().max() == 0) == from_zero for w in seen)
        runs[from_zero] = (model, base)
    (fast, fast_base), (generic, generic_base) = runs[True], runs[False]
    for p, q in zip(fast.parameters(), generic.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)
        for key, value in generic_base.state[q].items():
            torch.testing.assert_close(fast_base.state[p][key], value, rtol=1e-12, atol=1e-12)
    assert gram_defect(fast.rotate.weight.detach()) < 1e-13


class _MyAdam(torch.optim.Adam):
    """A subclass may change ``step``: not on the list."""


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: torch.optim.Adam([{"params": ps, "unitary": True, "weight_decay": 1e-3}]),
        lambda ps: torch.optim.AdamW([{"params": ps, "unitary": True}], weight_decay=1e-2),  # AdamW's default is not 0
        lambda ps: torch.optim.SGD([{"params": ps, "unitary": True}], lr=0.1, weight_decay=1e-3),
        lambda ps: torch.optim.RMSprop([{"params": ps, "unitary": True}], weight_decay=1e-3),
        lambda ps: torch.optim.Adagrad([{"params": ps, "unitary": True}]),
        lambda ps: _MyAdam([{"params": ps, "unitary": True}]),
    ],
    ids=["adam-wd", "adamw-wd", "sgd-wd", "rmsprop-wd", "adagrad", "subclass"],
)
def test_optimisers_off_the_list_take_the_generic_path(make):
    weight = torch.nn.Parameter(unitary_init(5, dtype=torch.float64))
    before = weight.detach().clone()
    base = make([weight])
    opt = ProjUNN(base, seed=0)
    seen = []
    base.register_step_pre_hook(lambda o, args, kwargs: seen.append(weight.detach().clone()))
    weight.grad = torch.randn(5, 5, dtype=torch.float64)
    opt.step()
    assert torch.equal(seen[0], before)  # the base step saw the weight, not zeros
    assert not projunn.optim._projunn.steps_from_zero(base, base.param_groups[0], weight)
    assert opt._zeros == {} and gram_defect(weight.detach()) < 1e-14


def test_a_differentiable_step_is_not_taken_from_zero():
    weight = torch.nn.Parameter(unitary_init(3, dtype=torch.float64))
    for differentiable in (False, True):
        base = torch.optim.Adam([{"params": [weight], "unitary": True}], differentiable=differentiable)
        assert projunn.optim._projunn.steps_from_zero(base, base.param_groups[0], weight) != differentiable


def test_a_closure_takes_the_generic_path():
    """The closure's forward pass runs during the step: it must see the weight, not zeros."""
    weight = torch.nn.Parameter(unitary_init(4, dtype=torch.float64))
    opt = ProjUNN(torch.optim.SGD([{"params": [weight], "unitary": True}], lr=0.1), seed=0)
    seen = []

    def closure():
        opt.zero_grad()
        seen.append(weight.detach().clone())
        loss = (weight * torch.arange(16.0, dtype=torch.float64).reshape(4, 4)).sum()
        loss.backward()
        return loss

    before = weight.detach().clone()
    opt.step(closure)
    assert torch.equal(seen[0], before) and not torch.equal(weight, before)


def test_a_failing_base_step_from_zero_gives_the_weight_back():
    weight = torch.nn.Parameter(unitary_init(4, dtype=torch.float64))
    storage = weight.data_ptr()
    before = weight.detach().clone()
    base = torch.optim.Adam([{"params": [weight], "unitary": True}])
    opt = ProjUNN(base, seed=0)

    def fail(optimizer, args, kwargs):
        raise RuntimeError("hook failed")

    handle = base.register_step_pre_hook(fail)
    weight.grad = torch.ones(4, 4, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="hook failed"):
        opt.step()
    assert weight.data_ptr() == storage and torch.equal(weight, before)
    handle.remove()
    opt.step()  # and the next step works
    assert weight.data_ptr() == storage and not torch.equal(weight, before)


# -- edge cases of the integration: duplicate parameters, added groups, closures, the sketch generator --


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


def test_a_replica_on_another_gpu_continues_from_rank_0s_saved_sketch_generator():
    from projunn.optim._projunn import _states_for_devices

    # Rank 0 of a data-parallel run saved cuda:0's state; the replica stepping weights on cuda:3 takes it.
    assert _states_for_devices({"cuda:0": "s0"}, {"cuda:3"}) == {"cuda:3": "s0"}
    assert _states_for_devices({"cpu": "c", "cuda:0": "s0"}, {"cpu", "cuda:3"}) == {"cpu": "c", "cuda:3": "s0"}
    # Exact keys and ambiguous cases are left as they are (an unmatched device starts from the seed).
    assert _states_for_devices({"cuda:0": "s0", "cuda:1": "s1"}, {"cuda:0", "cuda:1"}) == {
        "cuda:0": "s0",
        "cuda:1": "s1",
    }
    assert _states_for_devices({"cuda:0": "s0", "cuda:1": "s1"}, {"cuda:2"}) == {"cuda:0": "s0", "cuda:1": "s1"}
    assert _states_for_devices({"cuda:0": "s0"}, {"cuda:2", "cuda:3"}) == {"cuda:0": "s0"}
    assert _states_for_devices({"cpu": "c"}, {"cpu"}) == {"cpu": "c"}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_step_inside_autocast_is_the_full_precision_step(dtype):
    """A common loop calls step() inside the autocast block: the update still runs in the weights'
    precision (float32, which autocast would lower), so it equals the step taken outside bit for bit."""
    results = []
    for inside in (True, False):
        torch.manual_seed(0)
        model = Student(dtype=torch.float32)
        opt = ProjUNN(torch.optim.Adam(param_groups(model, unitary_lr=0.05), lr=1e-2), seed=5)
        for x, y in _batches(8, 3, dtype=torch.float32):
            torch.nn.functional.mse_loss(model(x), y).backward()
            with torch.autocast("cpu", dtype=dtype, enabled=inside):
                opt.step()
            opt.zero_grad()
        results.append(model.rotate.weight.detach().clone())
    assert torch.equal(*results)
    assert gram_defect(results[0]) < 1e-6


def test_a_projunn_cannot_wrap_another_projunn():
    _, opt = _student_and_projunn()
    with pytest.raises(ValueError, match="already a ProjUNN; wrap the base optimizer once"):
        ProjUNN(opt)
    assert len(opt.optimizer._optimizer_step_pre_hooks) == 1  # nothing attached by the refused call


def test_a_closure_runs_under_the_callers_autocast_and_the_update_in_full_precision():
    torch.manual_seed(0)
    model = Student(dtype=torch.float32)
    opt = ProjUNN(torch.optim.Adam(param_groups(model), lr=1e-2), seed=5)
    x, y = _batches(8, 1, dtype=torch.float32)[0]
    seen = []

    def closure():
        opt.zero_grad()
        out = model(x)
        seen.append(out.dtype)
        loss = torch.nn.functional.mse_loss(out.float(), y)
        loss.backward()
        return loss

    with torch.autocast("cpu", dtype=torch.bfloat16):
        opt.step(closure)
    assert seen == [torch.bfloat16]
    assert gram_defect(model.rotate.weight.detach()) < 1e-6


def test_a_set_of_parameters_is_refused_as_torch_refuses_it():
    _, opt = _student_and_projunn()
    with pytest.raises(TypeError, match="ordered collections"):
        opt.add_param_group({"params": {torch.nn.Parameter(torch.zeros(2, 2, dtype=torch.float64))}})


def test_the_seed_broadcast_goes_through_the_weights_device(monkeypatch):
    """Under nccl the seed travels through a GPU: the rank's own (the weights'), not the current
    CUDA device every rank shares unless the script called set_device."""
    from projunn.optim import _projunn

    sent = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "broadcast_object_list", lambda objs, src, device=None: sent.append(device))
    assert _projunn._replica_seed(None, torch.device("cuda", 3)) == torch.initial_seed()
    assert _projunn._replica_seed(None, torch.device("cpu")) == torch.initial_seed()
    assert sent == [torch.device("cuda", 3), None]  # gloo on the CPU: torch's own choice
    ProjUNN(torch.optim.Adam(param_groups(Student()), lr=1e-2))  # seed None: broadcast from its CPU weights
    assert sent == [torch.device("cuda", 3), None, None]


# -- waits for the device ---------------------------------------------------------------------

#: Operators that make the host wait for a CUDA device: reading a value (``.item()``, ``bool()``),
#: and the solvers whose batched CUDA versions loop over matrices from the host and check each
#: one's status (Note [No solver calls for rank 1]). Counted on the CPU, where the calls are visible.
_WAITING_OPS = ("_local_scalar_dense", "linalg_qr", "_linalg_eigh", "_linalg_svd", "geqrf", "nonzero", "multinomial")


class _CountWaits(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.__name__.split(".")[0] in _WAITING_OPS
        return func(*args, **(kwargs or {}))


def _waits_of_a_step(model: torch.nn.Module, make_input, optimizer) -> int:
    for step in range(3):  # the last step counted, with the optimiser's state in place
        model(make_input()).square().sum().backward()
        counter = _CountWaits()
        with counter if step == 2 else contextlib.nullcontext():
            optimizer.step()
        optimizer.zero_grad()
    return counter.count


@pytest.mark.parametrize("method", ["t", "d"])
@pytest.mark.parametrize(
    "build, make_input",
    [
        (lambda: UnitaryLinear(32), lambda: torch.randn(4, 32)),
        (lambda: torch.nn.Sequential(*(UnitaryLinear(32) for _ in range(16))), lambda: torch.randn(4, 32)),
        # 32 orthogonal convolutions: batches of complex and of real frequency matrices.
        (lambda: projunn.models.DeepUnitaryCNN(32, channels=2, size=(4, 4)), lambda: torch.randn(2, 1, 4, 4)),
        # Semi-unitary (Stiefel) weights, tall and wide: the rectangular kernels' small problems.
        (lambda: torch.nn.Sequential(*(_tall_then_wide() for _ in range(8))), lambda: torch.randn(4, 32)),
    ],
    ids=["one weight", "sixteen weights", "depth-32 conv stack", "sixteen rectangular weights"],
)
def test_a_rank_1_step_waits_for_the_device_twice_however_many_weights(method, build, make_input, monkeypatch):
    """At most 2 waits beyond the base optimiser's own (Adam reads its CPU step counters): the
    finiteness of the gradients and of the sketches, each one decision over every weight. Counted
    on the path a GPU takes (Note [No solver calls for rank 1]: the CPU keeps LAPACK's solvers)."""
    monkeypatch.setattr(projunn.functional._kernels, "CLOSED_FORMS_ON_CPU", True)
    torch.manual_seed(0)
    model = build()
    base = _waits_of_a_step(model, make_input, torch.optim.Adam(param_groups(model, unitary_lr=1e-3), lr=1e-3))
    torch.manual_seed(0)
    model = build()
    groups = param_groups(model, unitary_lr=1e-3, method=method, rank=1, sketch="lsi")
    stepped = _waits_of_a_step(model, make_input, ProjUNN(torch.optim.Adam(groups, lr=1e-3), drift_tolerance=None))
    # Stiefel projUNN-D asks, per rectangular weight, whether its step is one of those (no training run
    # takes them) that need the dense projection (Note [Stiefel projUNN-D]).
    rectangular = sum(p.shape[-1] != p.shape[-2] for _, p in unitary_parameters(model))
    assert stepped - base <= 2 + (rectangular if method == "d" else 0)


class _CountQR(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.__name__.split(".")[0] in ("linalg_qr", "geqrf")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("method", ["t", "d"])
def test_a_rank_2_step_takes_no_householder_qr_on_the_gpus_path(method, monkeypatch):
    """Householder QR is the solver a GPU runs matrix by matrix (Note [No solver calls for rank 1]): at
    rank 2 the tall blocks of square and rectangular weights, batched or not, are orthonormalised by CGS2
    (a block wider than tall, 2k > N, keeps Householder QR)."""
    monkeypatch.setattr(projunn.functional._kernels, "CLOSED_FORMS_ON_CPU", True)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        projunn.models.DeepUnitaryCNN(2, channels=4, size=(4, 4)), torch.nn.Flatten(), torch.nn.LazyLinear(32)
    )
    model.append(_tall_then_wide())
    model(torch.randn(2, 1, 4, 4))
    groups = param_groups(model, unitary_lr=1e-3, method=method, rank=2, sketch="lsi")
    optimizer = ProjUNN(torch.optim.Adam(groups, lr=1e-3), drift_tolerance=None)
    for _ in range(2):
        model(torch.randn(2, 1, 4, 4)).square().sum().backward()
        with _CountQR() as counter:
            optimizer.step()
        optimizer.zero_grad()
        assert counter.count == 0


def _tall_then_wide() -> torch.nn.Module:
    return torch.nn.Sequential(projunn.nn.StiefelLinear(32, 16), projunn.nn.StiefelLinear(16, 32))


def test_the_update_runs_at_full_float32_matmul_precision_whatever_the_global_setting(monkeypatch):
    """With TF32 allowed ("high"/"medium", common on GPUs) the update would leave the group by ~1e-3:
    the step's hooks run at "highest" and give the caller's setting back."""
    import projunn.optim._projunn as module

    seen = []
    real_update = module.update

    def recording_update(*args):
        seen.append(torch.get_float32_matmul_precision())
        return real_update(*args)

    monkeypatch.setattr(module, "update", recording_update)
    layer = UnitaryLinear(8)
    optimizer = ProjUNN(torch.optim.SGD(param_groups(layer, unitary_lr=0.1), lr=0.1), method="t")
    layer(torch.randn(4, 8)).sum().backward()
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        optimizer.step()
        assert seen == ["highest"] and torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(before)
