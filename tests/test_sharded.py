"""ProjUNN on FSDP2-sharded weights: the same steps as unsharded, with thin communication.

Three gloo processes (CPU), then two of them, shard a model with ``fully_shard`` (rows of
every weight split unevenly, the last rank's shard of some weights empty) and
train it with ProjUNN(Adam). The weights must equal those of the same steps on
one process to 1e-10 in float64 and complex128 (Note [Row-sharded projUNN]);
a run whose sketch seed differs on one rank must not, so the check can fail.
The bytes of every collective in a step are counted and must grow like
(N + M) k: doubling N doubles them.
"""

from __future__ import annotations

import datetime
import pathlib

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from projunn.harness.bench import CollectiveBytes
from projunn.nn import StiefelLinear, UnitaryLinear
from projunn.optim import ProjUNN, distributed_state_dict, load_distributed_state_dict, param_groups
from workers import start_method

STEPS, BATCH, RANK = 20, 6, 2
# (name, dtype, method, sketch, extra ProjUNN options)
CONFIGS = [
    ("f64-t-lsi", torch.float64, "t", "lsi", {}),
    ("f64-d-lsi", torch.float64, "d", "lsi", {}),
    ("c128-t-lsi", torch.complex128, "t", "lsi", {}),
    ("c128-d-lsi", torch.complex128, "d", "lsi", {}),
    ("f64-t-column", torch.float64, "t", "column", {}),
    ("c128-d-column", torch.complex128, "d", "column", {}),
    ("f64-d-rsvd", torch.float64, "d", "rsvd", {}),
    ("c128-t-rsvd", torch.complex128, "t", "rsvd", {}),
    # Every drift check corrects (Newton-Schulz from the Gram matrix); every 7th step snaps (all-gather + SVD).
    ("c128-t-lsi-drift", torch.complex128, "t", "lsi", {"drift_tolerance": 1e-300}),
    ("f64-d-lsi-snap", torch.float64, "d", "lsi", {"reorthogonalize_every": 7}),
]
CONTROL = ("f64-t-lsi-broken", torch.float64, "t", "lsi", {})
# Every configuration runs on 3 processes, where the shards are uneven and some empty; 2 processes
# (even rows for the wide layer, no empty shard) re-check one configuration per method and dtype kind.
CONFIGS_BY_WORLD = {3: CONFIGS, 2: [c for c in CONFIGS if c[0] in ("f64-t-lsi", "c128-d-lsi", "c128-t-rsvd")]}
CASES = [(world, config) for world, configs in sorted(CONFIGS_BY_WORLD.items()) for config in configs]


def _model(dtype: torch.dtype, sizes: tuple[int, int, int] = (7, 10, 2)) -> torch.nn.Sequential:
    """A square unitary layer, a tall and a wide Stiefel layer (2 rows: an empty shard on 3 ranks), a Linear."""
    n, tall, wide = sizes
    init = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(
        UnitaryLinear(n, dtype=dtype, generator=init),
        StiefelLinear(n, tall, dtype=dtype, generator=init),
        StiefelLinear(tall, wide, dtype=dtype, generator=init),
        # No complex bias: torch's DTensor view_as_real turns a 1-D complex Shard(0) tensor into a
        # Replicate one, so Adam steps such a sharded bias wrongly (torch 2.13), projUNN or not.
        torch.nn.Linear(wide, 3, bias=not dtype.is_complex, dtype=dtype),
    )
    with torch.no_grad():
        for p in model[3].parameters():
            p.copy_(0.3 * torch.randn(p.shape, dtype=dtype, generator=init))
    return model


def _batch(step: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    data = torch.Generator().manual_seed(100 + step)
    return torch.randn(BATCH, 7, dtype=dtype, generator=data), torch.randn(BATCH, 3, dtype=dtype, generator=data)


def _optimizer(model, method, sketch, options, seed):
    groups = param_groups(model, unitary_lr=0.05, method=method, rank=RANK, sketch=sketch)
    return ProjUNN(torch.optim.Adam(groups, lr=0.02), seed=seed, **options)


def _steps(model, optimizer, dtype, steps, rank=0, world=1) -> None:
    shard = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    for step in steps:
        x, y = _batch(step, dtype)
        loss = (model(x[shard]) - y[shard]).abs().square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _full(model) -> dict[str, torch.Tensor]:
    return {
        name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
        for name, p in model.named_parameters()
    }


def _shard(model: torch.nn.Module) -> torch.nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    # One FSDP unit: every parameter is still a DTensor sharded by rows, with one all-gather per
    # forward and one reduce-scatter per backward (the fewest collectives; the test is latency-bound).
    return fully_shard(model, mesh=init_device_mesh("cpu", (dist.get_world_size(),)))


def _unsharded(config) -> dict[str, torch.Tensor]:
    _, dtype, method, sketch, options = config
    model = _model(dtype)
    _steps(model, _optimizer(model, method, sketch, options, seed=5), dtype, range(STEPS))
    return _full(model)


def _start(rank: int, world: int, init_file: pathlib.Path) -> None:
    torch.set_num_threads(1)
    # A collective one rank never joins fails the test in two minutes instead of hanging for gloo's 30.
    timeout = datetime.timedelta(seconds=120)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timeout)


def _train(configs, rank: int, world: int) -> dict[str, dict[str, torch.Tensor]]:
    trained = {}
    for config in configs:
        name, dtype, method, sketch, options = config
        seed = 6 if config is CONTROL and rank == 1 else 5  # the control breaks the shared sketch seed
        model = _shard(_model(dtype))
        assert all(hasattr(p, "placements") for p in model.parameters())
        _steps(model, _optimizer(model, method, sketch, options, seed), dtype, range(STEPS), rank, world)
        trained[name] = _full(model)
    return trained


def _worker(rank: int, out: str) -> None:
    """Everything the tests below check, from 3 started processes (starting processes is the slow part).

    Three process groups in turn, each from its own rendezvous file: 3 ranks train and save a
    checkpoint; a fresh group of the same 3 processes builds a new model and optimiser and loads
    it (only what the checkpoint holds carries over: projunn keeps no state outside the model and
    the optimiser); a group of ranks 0 and 1 trains again, counts the bytes and checks the refusals.
    """
    folder = pathlib.Path(out)
    results = {}
    _start(rank, 3, folder / "init-3")
    try:
        results[3] = {"trained": _train(CONFIGS_BY_WORLD[3], rank, 3), "checkpoint": _checkpoint(rank, 3, out, "save")}
    finally:
        dist.destroy_process_group()
    _start(rank, 3, folder / "init-3-resumed")
    try:
        results[3]["resumed"] = _checkpoint(rank, 3, out, "load")
    finally:
        dist.destroy_process_group()
    if rank < 2:
        _start(rank, 2, folder / "init-2")
        try:
            results[2] = {
                "trained": _train([*CONFIGS_BY_WORLD[2], CONTROL], rank, 2),
                "bytes": {
                    (sketch, method): [step_bytes(n, sketch, method) for n in (128, 256)]
                    for sketch in ("lsi", "column", "rsvd")
                    for method in ("t", "d")
                },
                "refusals": _refusals(2),
                "grad_on_one_rank": _grad_on_one_rank(rank),
            }
        finally:
            dist.destroy_process_group()
    if rank == 0:
        torch.save(results, folder / "results.pt")


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("sharded")
    mp.start_processes(_worker, args=(str(folder),), nprocs=3, join=True, start_method=start_method())
    return torch.load(folder / "results.pt")


@pytest.mark.slow
@pytest.mark.parametrize(("world", "config"), CASES, ids=[f"{w} processes-{c[0]}" for w, c in CASES])
def test_sharded_steps_equal_unsharded_steps(sharded, world, config):
    trained = sharded[world]["trained"][config[0]]
    reference = _unsharded(config)
    for name, value in reference.items():
        torch.testing.assert_close(trained[name], value, rtol=0, atol=1e-10, msg=name)
    for name in ("0.weight", "1.weight", "2.weight"):
        W = trained[name]
        gram = W.mH @ W if W.shape[0] >= W.shape[1] else W @ W.mH
        assert (gram - torch.eye(gram.shape[0], dtype=W.dtype)).abs().max() < 1e-13, name
    # The layers moved: the agreement is not that of untrained weights.
    assert (reference["0.weight"] - _model(config[1])[0].weight).abs().max() > 1e-2


@pytest.mark.slow
def test_the_check_fails_when_one_rank_sketches_with_another_seed(sharded):
    broken, reference = sharded[2]["trained"][CONTROL[0]], _unsharded(CONTROL)
    assert max((broken[name] - reference[name]).abs().max() for name in ("0.weight", "1.weight")) > 1e-6


# -- communication ---------------------------------------------------------------------------


def step_bytes(n: int, sketch: str, method: str, dtype=torch.float64) -> tuple[int, int]:
    """Bytes of all collectives in one ProjUNN(Adam) step of a sharded model with an n x n unitary,
    a 2n x n and an n/2 x 2n Stiefel layer (each collective counted as the largest tensor it
    touches: what every rank receives), and the bytes of one all-gather of those three weights."""
    model = _shard(_model(dtype, (n, 2 * n, n // 2)))
    optimizer = _optimizer(model, method, sketch, {"drift_tolerance": None}, seed=5)
    model(torch.randn(4, n, dtype=dtype)).abs().square().mean().backward()
    with CollectiveBytes() as counter:
        optimizer.step()
    gather = sum(p.numel() * p.element_size() for p in (model[0].weight, model[1].weight, model[2].weight))
    return counter.total, gather


@pytest.mark.slow
def test_step_communication_grows_like_n_k_not_n_squared(sharded):
    for (sketch, method), [(small, gather_small), (large, gather_large)] in sharded[2]["bytes"].items():
        # Doubling every size doubles the traffic (O((N + M) k)), where the weights' own size quadruples.
        assert 1.8 < large / small < 2.2, (sketch, method, small, large)
        assert gather_large == 4 * gather_small
        assert large < gather_large / (4 if sketch == "rsvd" else 20), (sketch, method, large, gather_large)


# -- checkpoints -----------------------------------------------------------------------------


def _checkpoint(rank: int, world: int, out: str, phase: str) -> tuple[dict[str, torch.Tensor], int]:
    """Save after 10 steps and take 10 more ("save"), or load that checkpoint and take the same 10 ("load")."""
    import torch.distributed.checkpoint as dcp

    _, dtype, method, sketch, options = CONFIGS[3]
    model = _shard(_model(dtype))
    optimizer = _optimizer(model, method, sketch, options, seed=5)
    path = str(pathlib.Path(out) / "checkpoint")
    if phase == "save":
        _steps(model, optimizer, dtype, range(STEPS // 2), rank, world)
        dcp.save(distributed_state_dict(model, optimizer), checkpoint_id=path)
    else:
        state = distributed_state_dict(model, optimizer)
        dcp.load(state, checkpoint_id=path)
        load_distributed_state_dict(model, optimizer, state)
    _steps(model, optimizer, dtype, range(STEPS // 2, STEPS), rank, world)
    return _full(model), optimizer.steps


@pytest.mark.slow
def test_distributed_checkpoint_resumes_exactly(sharded):
    # A fresh process group of the same 3 processes, with a new model and optimiser, loaded what the
    # first one saved (a run resumed in new processes: the torchrun test of test_distributed.py).
    uninterrupted, steps = sharded[3]["checkpoint"]
    resumed, resumed_steps = sharded[3]["resumed"]
    assert steps == resumed_steps == STEPS
    for name, value in uninterrupted.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=0, msg=name)


# -- a gradient on some ranks only ----------------------------------------------------------


def _sgd(model, method: str, sketch: str) -> ProjUNN:
    """Plain SGD under ProjUNN: a missing gradient and a zero one take the same step."""
    groups = param_groups(model, unitary_lr=0.05, method=method, rank=RANK, sketch=sketch)
    return ProjUNN(torch.optim.SGD(groups, lr=0.02), seed=5)


def _grad_on_some_ranks(dtype: torch.dtype, rank: int | None, world: int) -> dict[str, torch.Tensor]:
    """3 SGD steps in which the square layer's gradient is missing for the rows of rank 1 (as for a
    shard its forward did not reach): on 2 ranks rank 1 drops its gradient; on one process
    (``rank=None``) those rows of the gradient are zeroed, the step the sharded run must take."""
    model = _model(dtype)
    if rank is not None:
        model = _shard(model)
    optimizer = _sgd(model, "t", "lsi")
    rows_of_rank_1 = slice(-(-model[0].weight.shape[0] // world), None)  # FSDP2: ceil(N / world) rows each
    for step in range(3):
        x, y = _batch(step, dtype)
        part = slice(None) if rank is None else slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        optimizer.zero_grad()
        (model(x[part]) - y[part]).abs().square().mean().backward()
        if rank == 1:
            model[0].weight.grad = None
        elif rank is None:
            model[0].weight.grad[rows_of_rank_1] = 0
        optimizer.step()
    return _full(model)


def _grad_on_one_rank(rank: int) -> dict[str, torch.Tensor]:
    return _grad_on_some_ranks(torch.float64, rank, 2)


@pytest.mark.slow
def test_a_weight_with_a_gradient_on_some_ranks_only_is_stepped_on_all(sharded):
    """Every rank steps the weight (rank 1 with a zero step for its rows) instead of leaving rank 0's
    sketch collectives unanswered: the weights are those of one process with those rows' gradient zeroed."""
    sharded_run, reference = sharded[2]["grad_on_one_rank"], _grad_on_some_ranks(torch.float64, None, 2)
    for name, value in reference.items():
        torch.testing.assert_close(sharded_run[name], value, atol=1e-10, rtol=0, msg=name)
    assert (reference["0.weight"] - _model(torch.float64)[0].weight).abs().max() > 1e-3  # it moved


# -- placements ------------------------------------------------------------------------------


def _refusals(world: int) -> dict[str, str | None]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    messages = {}
    weight = _model(torch.float64)[0].weight.detach()
    for name, placement, sketch in (
        ("columns", Shard(1), "lsi"),
        ("replicated", Replicate(), "lsi"),
        ("exact", Shard(0), "exact"),
    ):
        param = torch.nn.Parameter(distribute_tensor(weight, mesh, [placement]))
        try:
            ProjUNN(torch.optim.SGD([{"params": [param], "unitary": True, "sketch": sketch}], lr=0.1))
            messages[name] = None
        except ValueError as error:
            messages[name] = str(error)
    return messages


@pytest.mark.slow
def test_other_placements_are_refused_with_their_name(sharded):
    messages = sharded[2]["refusals"]
    assert "Shard(dim=1)" in messages["columns"] and "\n" not in messages["columns"]
    assert messages["replicated"] is None  # every rank holds the whole weight: the ordinary step
    assert "'exact'" in messages["exact"] and "sharded" in messages["exact"]
