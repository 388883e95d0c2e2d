"""ProjUNN inside the trainers people use: Lightning, Hugging Face accelerate, torch.amp's GradScaler.

Each tool is the real package (the ``trainers`` extra, installed by the ``test`` extra); a test whose
package is absent is skipped with the command that installs it.
"""

from __future__ import annotations

import itertools
import logging
import pathlib
import runpy
from contextlib import nullcontext

import pytest
import torch

from harness_runs import small_held_out_sets  # noqa: F401  (fixture)
from projunn.functional import unitarity_error
from projunn.nn import unitary_
from projunn.optim import ProjUNN, param_groups, unitary_parameters

INSTALL = "install the trainers extra: pip install 'projunn[trainers]'"
ROOT = pathlib.Path(__file__).resolve().parents[1]


def _require(name: str):
    return pytest.importorskip(name, reason=f"{name} is not installed; {INSTALL}")


def _data(n: int = 16, dtype=torch.float32) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(1)
    return torch.utils.data.TensorDataset(torch.randn(n, 8, generator=g, dtype=dtype), torch.randn(n, 1, dtype=dtype))


def _net(dtype=torch.float32, constrained: bool = True) -> torch.nn.Module:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 8, bias=False), torch.nn.Tanh(), torch.nn.Linear(8, 1)).to(dtype)
    return unitary_(net, "0.weight") if constrained else net


# -- Lightning ---------------------------------------------------------------------------------------

# Lightning's own notices, not about this code: the CPU data loader's worker count (a
# PossibleUserWarning), and torch's deprecation of LeafSpec that Lightning's _pytree still triggers.
LIGHTNING_NOISE = [
    pytest.mark.filterwarnings("ignore:The '\\w+_dataloader' does not have many workers"),
    pytest.mark.filterwarnings("ignore:.*isinstance\\(treespec, LeafSpec\\).* is deprecated"),
]


@pytest.fixture
def lightning():
    L = _require("lightning")
    logging.getLogger("lightning").setLevel(logging.ERROR)  # banners and tips on every Trainer
    return L


def _module_class(L):
    class Regressor(L.LightningModule):
        """A LightningModule whose configure_optimizers returns the base optimiser with ProjUNN attached."""

        def __init__(self, dtype=torch.float32, constrained: bool = True):
            super().__init__()
            self.net = _net(dtype, constrained)
            self.constrained = constrained
            self.seen: list[int] = []

        def training_step(self, batch, batch_idx):
            x, y = batch
            self.seen.append(batch_idx)
            return torch.nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            base = torch.optim.Adam(param_groups(self, unitary_lr=0.05), lr=0.01)
            if self.constrained:
                self.projunn = ProjUNN(base, seed=0)
            return base

    return Regressor


def _trainer(L, steps: int, root, **kwargs):
    return L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        **{"enable_checkpointing": False, **kwargs},
    )


def _loader(dtype=torch.float32):
    return torch.utils.data.DataLoader(_data(dtype=dtype), batch_size=4)  # 4 batches per epoch


def _lightning_test(fn):
    for mark in LIGHTNING_NOISE:
        fn = mark(fn)
    return fn


@_lightning_test
def test_lightning_trains_with_projunn_and_checkpoints_its_state(lightning, tmp_path):
    Regressor = _module_class(lightning)
    model = Regressor(torch.float64)
    trainer = _trainer(lightning, 6, tmp_path, precision="64-true")
    trainer.fit(model, _loader(torch.float64))
    assert model.projunn.steps == 6 and trainer.global_step == 6
    assert unitarity_error(model.net[0].weight.detach()) < 1e-12
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert checkpoint["optimizer_states"][0]["projunn"]["steps"] == 6


@_lightning_test
# The resumed runs write no checkpoints, so they leave out the ModelCheckpoint callbacks Lightning asks for.
@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`, callbacks used to create the checkpoint")
def test_lightning_resume_is_exactly_as_exact_as_plain_adam(lightning, tmp_path):
    """Bit-exact from a checkpoint written after an epoch's last batch; where Lightning replays data
    on resume (a mid-epoch or an on-epoch-end checkpoint) plain Adam is not exact either."""
    Regressor = _module_class(lightning)
    checkpoint_cls = lightning.pytorch.callbacks.ModelCheckpoint
    exact = {}
    for constrained in (False, True):
        full = Regressor(constrained=constrained)
        callbacks = [
            checkpoint_cls(dirpath=tmp_path / f"{constrained}" / "steps", save_top_k=-1, every_n_train_steps=2),
            checkpoint_cls(dirpath=tmp_path / f"{constrained}" / "epochs", save_top_k=-1, every_n_epochs=1),
        ]
        _trainer(lightning, 8, tmp_path, callbacks=callbacks, enable_checkpointing=True).fit(full, _loader())
        for kind, name in [("epoch boundary", "steps/epoch=0-step=4.ckpt"), ("mid-epoch", "steps/epoch=0-step=2.ckpt")]:
            resumed = Regressor(constrained=constrained)
            # Lightning warns that it replays the epoch from its start for a mid-epoch checkpoint.
            replay = (
                pytest.warns(UserWarning, match="dataloader is not resumable") if kind == "mid-epoch" else nullcontext()
            )
            with replay:
                _trainer(lightning, 8, tmp_path).fit(resumed, _loader(), ckpt_path=tmp_path / f"{constrained}" / name)
            same = [torch.equal(a, b) for a, b in zip(full.state_dict().values(), resumed.state_dict().values())]
            exact[constrained, kind] = all(same)
            if constrained:
                assert resumed.projunn.steps == 8
                assert unitarity_error(resumed.net[0].weight.detach()) < 1e-5
        epoch_end = Regressor(constrained=constrained)
        path = tmp_path / f"{constrained}" / "epochs" / "epoch=0-step=4.ckpt"
        _trainer(lightning, 8, tmp_path).fit(epoch_end, _loader(), ckpt_path=path)
        exact[constrained, "on epoch end"] = all(
            torch.equal(a, b) for a, b in zip(full.state_dict().values(), epoch_end.state_dict().values())
        )
    assert exact[False, "epoch boundary"] and exact[True, "epoch boundary"]
    for kind in ("mid-epoch", "on epoch end"):
        assert exact[True, kind] == exact[False, kind], kind


@_lightning_test
def test_lightning_bf16_mixed_keeps_float32_unitary_weights(lightning, tmp_path):
    Regressor = _module_class(lightning)
    model = Regressor()
    _trainer(lightning, 4, tmp_path, precision="bf16-mixed").fit(model, _loader())
    weight = model.net[0].weight
    assert weight.dtype == torch.float32 and model.projunn.steps == 4
    assert unitarity_error(weight.detach()) < 1e-5


# -- accelerate --------------------------------------------------------------------------------------


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)  # an Accelerator's settings are process-wide
    GradientState._reset_state()


@pytest.fixture
def accelerate():
    module = _require("accelerate")
    yield module
    _reset_accelerate()


def test_accelerate_projects_once_per_real_step_under_gradient_accumulation(accelerate):
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = _net()
    base = torch.optim.Adam(param_groups(model, unitary_lr=0.05), lr=0.01)
    projunn = ProjUNN(base, seed=0)  # attached to the base optimiser, before prepare
    reference = _net()
    reference.load_state_dict(model.state_dict())
    ref_base = torch.optim.Adam(param_groups(reference, unitary_lr=0.05), lr=0.01)
    ref_projunn = ProjUNN(ref_base, seed=0)

    loader = torch.utils.data.DataLoader(_data(), batch_size=2)
    model, optimizer, prepared = accelerator.prepare(model, base, loader)
    weights = [model[0].weight.detach().clone()]
    for x, y in prepared:
        with accelerator.accumulate(model):
            accelerator.backward(torch.nn.functional.mse_loss(model(x), y))
            optimizer.step()
            optimizer.zero_grad()
        weights.append(model[0].weight.detach().clone())
    changed = [not torch.equal(a, b) for a, b in itertools.pairwise(weights)]
    assert changed == [False, True] * 4 and projunn.steps == 4
    assert unitarity_error(model[0].weight.detach()) < 1e-5

    # The same as a hand-written loop that steps every second micro-batch.
    for i, (x, y) in enumerate(loader):
        (torch.nn.functional.mse_loss(reference(x), y) / 2).backward()
        if i % 2:
            ref_base.step()
            ref_base.zero_grad()
    assert ref_projunn.steps == 4
    assert torch.allclose(model[0].weight, reference[0].weight, atol=1e-6)


# -- torch.amp ---------------------------------------------------------------------------------------


def test_grad_scaler_skips_overflowing_steps_without_projecting():
    model = _net()
    base = torch.optim.SGD(param_groups(model, unitary_lr=0.05), lr=0.01)
    projunn = ProjUNN(base, seed=0)
    # The first scale overflows float16; the scaler then skips base.step() (and so ProjUNN's hooks)
    # and backs off to 2**10.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**100, backoff_factor=2.0**-90)
    x, y = _data().tensors
    weights = [model[0].weight.detach().clone()]
    for _ in range(4):
        with torch.autocast("cpu", dtype=torch.float16):
            loss = torch.nn.functional.mse_loss(model(x), y)
        scaler.scale(loss).backward()
        scaler.unscale_(base)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(base)
        scaler.update()
        base.zero_grad()
        weights.append(model[0].weight.detach().clone())
    assert scaler.get_scale() == 2.0**10
    assert projunn.steps == 3 and projunn.skipped_steps == 0
    assert [not torch.equal(a, b) for a, b in itertools.pairwise(weights)] == [False, True, True, True]
    assert unitarity_error(model[0].weight.detach()) < 1e-5


# -- the examples of docs/guide.md ----------------------------------------------------------------------

EXAMPLES = [
    pytest.param("constrain.py", None, id="constrain"),
    pytest.param("amp.py", None, id="amp"),
    pytest.param(
        "lightning_module.py",
        "lightning",
        id="lightning",
        marks=[
            *LIGHTNING_NOISE,
            # Lightning's model summary sizes parameters as float32 under bf16-mixed and says so.
            pytest.mark.filterwarnings("ignore:Precision bf16-mixed is not supported by the model summary"),
        ],
    ),
    pytest.param("accelerate_loop.py", "accelerate", id="accelerate"),
]


@pytest.mark.parametrize("name, package", EXAMPLES)
def test_guide_example_is_an_examples_file_verbatim_and_runs(name, package, tmp_path, monkeypatch):
    path = ROOT / "examples" / name
    guide = (ROOT / "docs" / "guide.md").read_text()
    assert f"```python\n{path.read_text()}```" in guide, f"docs/guide.md lacks examples/{name}"
    if package is not None:  # the example says which extra it needs, and so does the guide's text
        assert "pip install 'projunn[trainers]'" in path.read_text().splitlines()[0], f"examples/{name}"
        assert f"`examples/{name}`, needs the `trainers` extra" in guide or (
            f"(`examples/{name}`, needs the `trainers` extra)" in guide
        ), f"docs/guide.md does not say examples/{name} needs the trainers extra"
    if package is not None:
        _require(package)
    if package == "lightning":
        logging.getLogger("lightning").setLevel(logging.ERROR)
    monkeypatch.chdir(tmp_path)
    try:
        namespace = runpy.run_path(str(path), run_name="__main__")
    finally:
        if package == "accelerate":
            _reset_accelerate()
    models = [value for value in namespace.values() if isinstance(value, torch.nn.Module)]
    weights = [p for model in models for _, p in unitary_parameters(model)]
    assert weights and all(unitarity_error(w.detach()).max() < 1e-5 for w in weights)
    # Every constrained weight is trained, not only constrained: some optimiser of the example holds it.
    optimizers = [value for value in namespace.values() if isinstance(value, torch.optim.Optimizer)]
    for value in namespace.values():
        held_by = getattr(value, "optimizers", None)  # a Lightning Trainer's list (a module's is a method)
        optimizers += held_by if isinstance(held_by, list) else []
    held = {id(p) for optimizer in optimizers for group in optimizer.param_groups for p in group["params"]}
    assert all(id(w) in held for w in weights)


# -- TensorBoard -------------------------------------------------------------------------------------


def _read_scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    accumulator = _require("tensorboard.backend.event_processing.event_accumulator").EventAccumulator(str(log_dir))
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


class Recorder:
    """A logger that keeps every (step, scalars) it is given."""

    def __init__(self):
        self.rows = []

    def log_scalars(self, step, scalars):
        self.rows.append((step, dict(scalars)))


def test_tensorboard_logger_writes_the_metrics_rows_as_scalars(tmp_path):
    _require("tensorboard")
    from projunn.harness._loggers import TensorBoardLogger

    logger = TensorBoardLogger(tmp_path / "tb")
    logger.log_scalars(10, {"step": 10, "train_loss": 0.5, "eval_accuracy": None, "max_unitarity_error": 3e-7})
    logger.log_scalars(20, {"step": 20, "train_loss": float("nan"), "eval_loss": 0.25, "max_unitarity_error": 4e-7})
    logger.close()
    scalars = _read_scalars(tmp_path / "tb")
    assert scalars.keys() == {"train_loss", "eval_loss", "max_unitarity_error"}  # None, NaN and step left out
    assert scalars["train_loss"] == [(10, 0.5)] and scalars["eval_loss"] == [(20, 0.25)]
    assert [step for step, _ in scalars["max_unitarity_error"]] == [10, 20]
    assert scalars["max_unitarity_error"][1][1] == pytest.approx(4e-7)


def test_open_loggers_adds_tensorboard_clears_a_replaced_run_and_refuses_non_loggers(tmp_path):
    import contextlib
    import types

    _require("tensorboard")
    from projunn.harness._loggers import TensorBoardLogger, open_loggers

    recorder = Recorder()
    for run in range(2):  # the second, a new run in the same folder, replaces the first one's curves
        with contextlib.ExitStack() as cleanup:
            config = types.SimpleNamespace(tensorboard=True, resume=False)
            loggers = open_loggers(config, tmp_path, cleanup, extra=[recorder])
            assert loggers[0] is recorder and isinstance(loggers[1], TensorBoardLogger)
            for logger in loggers:
                logger.log_scalars(run + 1, {"eval_loss": float(run)})
    assert _read_scalars(tmp_path / "tensorboard") == {"eval_loss": [(2, 1.0)]}
    assert recorder.rows == [(1, {"eval_loss": 0.0}), (2, {"eval_loss": 1.0})]
    with contextlib.ExitStack() as cleanup:
        assert open_loggers(types.SimpleNamespace(), tmp_path, cleanup) == []
        with pytest.raises(TypeError, match="log_scalars"):
            open_loggers(types.SimpleNamespace(), tmp_path, cleanup, extra=[print])


@pytest.mark.usefixtures("small_held_out_sets")
def test_cli_tensorboard_writes_the_rows_of_metrics_csv(tmp_path):
    import csv

    from projunn.harness.cli import main

    _require("tensorboard")
    out = tmp_path / "run"
    argv = ["train", "copy", "--steps", "20", "--eval-every", "10", "--hidden", "16", "--seq-len", "5", "--quiet"]
    assert main([*argv, "--tensorboard", "--out", str(out)]) == 0
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    scalars = _read_scalars(out / "tensorboard")
    assert {"seconds", "train_loss", "eval_loss", "max_unitarity_error"} <= scalars.keys()
    for tag in ("train_loss", "eval_loss", "max_unitarity_error"):
        assert [step for step, _ in scalars[tag]] == [int(row["step"]) for row in rows] == [10, 20]
        assert [value for _, value in scalars[tag]] == pytest.approx([float(row[tag]) for row in rows], rel=1e-6)


@pytest.mark.usefixtures("small_held_out_sets")
def test_a_run_may_start_logging_to_tensorboard_when_resumed(tmp_path):
    from projunn.harness.cli import main

    _require("tensorboard")
    out = tmp_path / "run"
    argv = ["train", "copy", "--eval-every", "10", "--hidden", "16", "--seq-len", "5", "--quiet", "--out", str(out)]
    assert main([*argv, "--steps", "10"]) == 0
    assert main(["train", "copy", "--resume", "--steps", "20", "--tensorboard", "--out", str(out), "--quiet"]) == 0
    assert [step for step, _ in _read_scalars(out / "tensorboard")["eval_loss"]] == [20]


def test_train_passes_each_metrics_row_to_other_loggers(tmp_path):
    from projunn.harness.train import TrainConfig, train

    recorder = Recorder()
    config = TrainConfig(
        task="copy", steps=20, eval_every=10, hidden=16, seq_len=5, quiet=True, out=str(tmp_path / "r")
    )
    summary = train(config, log=lambda message: None, loggers=[recorder])
    assert [step for step, _ in recorder.rows] == [10, 20]
    assert recorder.rows[-1][1]["max_unitarity_error"] == summary["max_unitarity_error"]
    assert not (tmp_path / "r" / "tensorboard").exists()
