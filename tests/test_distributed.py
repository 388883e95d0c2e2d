"""Data-parallel training: every replica applies the identical projUNN step.

Two processes (gloo, CPU) train a small unitary RNN with a randomised sketch.
Their weights must be bit-identical at the end and equal (to float64
rounding) to one process trained on the same global batches. With per-rank
sketch seeds, as a script seeding each rank differently would get without
Note [Sketches under data parallelism], the replicas diverge: the check below
is shown to fail then.
"""

from __future__ import annotations

import csv
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from harness_runs import quick_runs  # noqa: F401  (small held-out sets, as in torchrun_cases.py)
from projunn.models import SequenceModel
from projunn.optim import ProjUNN, param_groups
from workers import start_method

WORLD = 2
GLOBAL_BATCH, STEPS, SEQ_LEN, FEATURES, HIDDEN, CLASSES = 8, 20, 6, 3, 10, 4


def _train(rank: int, world: int, seed: int | None, distributed: bool) -> dict[str, torch.Tensor]:
    """STEPS of Adam + projUNN-T (rank 2, randomised SVD sketch) on this rank's shard of each global batch."""
    init = torch.Generator().manual_seed(0)  # the same model everywhere, whatever the global seed
    model = SequenceModel(FEATURES, HIDDEN, CLASSES, dtype=torch.float64, init="haar", generator=init)
    with torch.no_grad():
        for p in model.parameters():
            if not any(p is q for q in (model.rnn.cell.recurrent_weight,)):
                torch.nn.init.normal_(p, std=0.3, generator=init)
    wrapped = DistributedDataParallel(model) if distributed else model
    groups = param_groups(model, unitary_lr=0.05, method="t", rank=2, sketch="rsvd")
    optimizer = ProjUNN(torch.optim.Adam(groups, lr=0.01), seed=seed)
    shard = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    for step in range(STEPS):
        data = torch.Generator().manual_seed(step)
        x = torch.randn(GLOBAL_BATCH, SEQ_LEN, FEATURES, dtype=torch.float64, generator=data)
        y = torch.randint(CLASSES, (GLOBAL_BATCH,), generator=data)
        loss = F.cross_entropy(wrapped(x[shard]), y[shard])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _replica(rank: int, init_file: str, out: str) -> None:
    """Train with the shared sketch seed (ProjUNN's default) and, as the control, with per-rank seeds."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        for seeded in (True, False):
            torch.manual_seed(1000 + rank)  # global seeds that differ per rank, as data-parallel scripts often set
            seed = None if seeded else torch.initial_seed()  # None: rank 0's seed on every rank
            name = "seeded" if seeded else "unseeded"
            torch.save(_train(rank, WORLD, seed, distributed=True), pathlib.Path(out) / f"{name}-rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def replicas(tmp_path_factory) -> dict[str, list[dict[str, torch.Tensor]]]:
    """Both trainings from one process group (starting the processes is the slow part)."""
    folder = tmp_path_factory.mktemp("replicas")
    mp.start_processes(
        _replica, args=(str(folder / "init"), str(folder)), nprocs=WORLD, join=True, start_method=start_method()
    )
    return {name: [torch.load(folder / f"{name}-rank{r}.pt") for r in range(WORLD)] for name in ("seeded", "unseeded")}


def _identical(replicas: list[dict[str, torch.Tensor]]) -> bool:
    first = replicas[0]
    return all(torch.equal(first[name], other[name]) for other in replicas[1:] for name in first)


@pytest.mark.slow
def test_replicas_stay_bit_identical_and_match_one_process(replicas):
    replicas = replicas["seeded"]
    assert _identical(replicas)
    # One process, the whole global batch, the sketch seed rank 0 had.
    reference = _train(0, 1, seed=1000, distributed=False)
    for name, value in reference.items():
        torch.testing.assert_close(replicas[0][name], value, rtol=1e-9, atol=1e-11)
    # The sketch matters: another seed gives other weights, so the agreement above is not vacuous.
    other = _train(0, 1, seed=7, distributed=False)["rnn.cell.recurrent_weight"]
    assert (other - reference["rnn.cell.recurrent_weight"]).abs().max() > 1e-6


@pytest.mark.slow
def test_the_check_fails_when_sketch_seeds_differ_per_rank(replicas):
    replicas = replicas["unseeded"]
    assert not _identical(replicas)
    weight = "rnn.cell.recurrent_weight"
    assert (replicas[0][weight] - replicas[1][weight]).abs().max() > 1e-6


def _rows(folder: pathlib.Path) -> list[dict[str, str]]:
    with open(folder / "metrics.csv") as f:
        return list(csv.DictReader(f))


def _weights(folder: pathlib.Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / "checkpoint.pt", weights_only=False)["model"]


@pytest.mark.slow
def test_cli_under_torchrun_replicated_and_sharded_matches_one_process(tmp_path, capsys):
    """One torchrun launch of 2 processes runs `projunn train` data parallel (DDP), sharded (--fsdp),
    and sharded in two sittings (--resume); each equals one process to float32 rounding, the resumed
    run equals the uninterrupted one exactly, and the sharded checkpoint resumes on one process."""
    argv = ["train", "copy", "--steps", "6", "--eval-every", "3", "--batch-size", "8", "--hidden", "12"]
    argv += ["--seq-len", "8", "--sketch", "rsvd", "--quiet", "--device", "cpu"]
    cases = [
        [*argv, "--out", str(tmp_path / "ddp")],
        [*argv, "--fsdp", "--out", str(tmp_path / "fsdp")],
        [*argv, "--fsdp", "--steps", "3", "--out", str(tmp_path / "fsdp-resumed")],
        ["train", "copy", "--resume", "--fsdp", "--steps", "6", "--quiet", "--out", str(tmp_path / "fsdp-resumed")],
        # SIGTERM reaches rank 1 alone during step 4: both ranks finish it, save and exit with 143.
        {"argv": [*argv, "--out", str(tmp_path / "ddp-stopped")], "sigterm": [1, 4], "status": 143},
        ["train", "copy", "--resume", "--quiet", "--out", str(tmp_path / "ddp-stopped")],
    ]
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    script = pathlib.Path(__file__).with_name("torchrun_cases.py")
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    parallel = subprocess.run(
        [*launch, str(tmp_path / "cases.json")], env=env, capture_output=True, text=True, timeout=400
    )
    assert parallel.returncode == 0, parallel.stderr[-3000:]
    assert parallel.stdout.count("wrote ") == len(cases) - 1  # rank 0 reports, rank 1 is silent
    assert "interrupted at step 4" in parallel.stdout  # both ranks stopped at the step rank 1 was in

    from projunn.harness.cli import main

    assert main([*argv, "--out", str(tmp_path / "one")]) == 0
    single = _weights(tmp_path / "one")
    for name in ("ddp", "fsdp", "fsdp-resumed"):
        for two, one in zip(_rows(tmp_path / name), _rows(tmp_path / "one"), strict=True):
            assert two["step"] == one["step"]
            assert float(two["eval_loss"]) == pytest.approx(float(one["eval_loss"]), rel=1e-5)
        torch.testing.assert_close(_weights(tmp_path / name), single, rtol=1e-5, atol=1e-5)
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        assert summary["processes"] == 2 and summary["steps"] == 6
    # Resuming replays the same operations in the same order: no rounding difference at all.
    for resumed_run, uninterrupted_run in (("fsdp-resumed", "fsdp"), ("ddp-stopped", "ddp")):
        resumed, uninterrupted = _weights(tmp_path / resumed_run), _weights(tmp_path / uninterrupted_run)
        assert resumed.keys() == uninterrupted.keys()
        for key, value in resumed.items():
            assert torch.equal(value, uninterrupted[key]), (resumed_run, key)
    assert [row["step"] for row in _rows(tmp_path / "ddp-stopped")] == ["3", "6"]  # no row at the stop
    written = {p.name for p in (tmp_path / "fsdp").iterdir()} - {"curves.png"}  # not drawn in this process
    assert written == {p.name for p in (tmp_path / "one").iterdir()}

    # The sharded run's checkpoint is an ordinary one: it continues on one process.
    assert main(["train", "copy", "--resume", "--steps", "9", "--quiet", "--out", str(tmp_path / "fsdp")]) == 0
    assert main(["train", "copy", "--resume", "--steps", "9", "--quiet", "--out", str(tmp_path / "one")]) == 0
    last_sharded, last_one = _rows(tmp_path / "fsdp")[-1], _rows(tmp_path / "one")[-1]
    assert last_sharded["step"] == last_one["step"] == "9"
    assert float(last_sharded["eval_loss"]) == pytest.approx(float(last_one["eval_loss"]), rel=1e-5)


def test_fsdp_is_refused_without_several_processes_or_with_torch_parametrisations(capsys):
    from projunn.harness.cli import main

    argv = ["train", "copy", "--steps", "1", "--hidden", "4", "--seq-len", "4", "--fsdp", "--device", "cpu"]
    assert main(argv) == 2
    assert "--fsdp splits the weights over the processes torchrun starts" in capsys.readouterr().err
    for method in ("expm", "eunn"):
        assert main([*argv, "--method", method]) == 2
        assert f"{method} (a parametrisation) computes each weight whole" in capsys.readouterr().err


def test_fsdp_refuses_batched_unitary_weights_and_complex_vectors_by_name():
    from projunn.harness._sharding import _check_shardable
    from projunn.models import DeepUnitaryCNN

    with pytest.raises(ValueError, match=r"blocks\.0\.0\.weight_free of shape \(30, 4, 4\) is a batch of them"):
        _check_shardable(DeepUnitaryCNN(2, channels=4, size=(8, 8)))
    with pytest.raises(ValueError, match=r"cannot split the complex vector rnn\.cell\.bias"):
        _check_shardable(SequenceModel(2, 4, 2, nonlinearity="relu", dtype=torch.complex64))
    _check_shardable(SequenceModel(2, 4, 2, nonlinearity="modrelu", dtype=torch.complex64))  # a real bias
    _check_shardable(SequenceModel(2, 4, 2))
