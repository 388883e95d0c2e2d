"""The tasks ``projunn train`` knows: data, model, loss, metric, baseline, defaults.

Every task makes its batches as a pure function of (seed, step), so a run
resumed from a checkpoint sees exactly the batches an uninterrupted run
would have seen, with no data-loader state to save.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ..functional import unitary_init
from ..nn import DeepUnitaryCNN, SequenceModel, UnitaryLinear, UnitaryResNet9
from ._mnist import load_cifar10, load_images
from ._synthetic import COPY_ALPHABET, COPY_SYMBOLS, adding_baseline, adding_batch, copy_baseline, copy_batch

__all__ = ["TASKS", "Task", "get_task"]

_EVAL_STREAM = 10**9  # offset of the seed stream used for evaluation batches


#: Settings shared by the recurrent tasks (the paper: RMSprop, unitary lr = lr / 32).
_RNN_DEFAULTS = dict(
    lr=1e-3, unitary_lr_divider=32, optimizer="rmsprop", init="henaff", nonlinearity="modrelu", eval_every=100
)


def _step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


@dataclass
class Task:
    """Base class. ``defaults`` fill unset options; ``paper`` is the ``--preset paper`` overlay."""

    name: str = ""
    description: str = ""
    defaults: dict[str, Any] = field(default_factory=dict)
    paper: dict[str, Any] = field(default_factory=dict)
    has_accuracy: bool = False
    inits: tuple[str, ...] = ("identity", "haar", "henaff", "cayley")
    #: Per ``--model`` defaults of model-specific options (tasks with a choice of model).
    model_defaults: dict[str, dict[str, Any]] = field(default_factory=dict)

    def prepare(self, config, device: torch.device) -> None:
        """Load data once before training (nothing for synthetic tasks)."""

    def total_steps(self, config) -> int:
        return config.steps

    def baseline(self, config) -> float | None:
        return None

    def build_model(self, config) -> torch.nn.Module:
        raise NotImplementedError

    def batch(self, config, step: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def loss(self, model, x, y) -> tuple[torch.Tensor, float | None]:
        """Mean loss and, where the task has one, accuracy in [0, 1]."""
        raise NotImplementedError

    def evaluate(self, model, config, device) -> dict[str, float]:
        """Held-out loss (and accuracy) during training."""
        x, y = self.batch(config, _EVAL_STREAM, device)
        loss, accuracy = self.loss(model, x, y)
        return {"eval_loss": loss.item(), **({"eval_accuracy": accuracy} if accuracy is not None else {})}

    def test(self, model, config, device) -> dict[str, float]:
        """Final numbers for summary.json (the held-out evaluation unless a test set exists)."""
        return self.evaluate(model, config, device)


class CopyTask(Task):
    def __init__(self):
        super().__init__(
            name="copy",
            description="recall 10 symbols after a delay T (cross-entropy; baseline 10 ln 8 / (T + 20))",
            defaults=dict(_RNN_DEFAULTS, hidden=128, seq_len=100, steps=2000, batch_size=128),
            paper=dict(hidden=190, seq_len=1000, steps=10000, batch_size=128, lr=1e-3, unitary_lr_divider=32),
            has_accuracy=True,
        )

    def baseline(self, config):
        return copy_baseline(config.seq_len)

    def build_model(self, config):
        return SequenceModel(
            COPY_ALPHABET + 2,
            config.hidden,
            COPY_ALPHABET + 1,
            tokens=True,
            every_step=True,
            nonlinearity=config.nonlinearity,
            complex=config.complex,
            init=config.init,
        )

    def batch(self, config, step, device):
        # Drawn on the CPU (where the generator lives), so every device sees the same batches.
        x, y = copy_batch(config.batch_size, config.seq_len, generator=_step_generator(config.seed, step))
        return x.to(device), y.to(device)

    def loss(self, model, x, y):
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        recall = logits[:, -COPY_SYMBOLS:].argmax(-1) == y[:, -COPY_SYMBOLS:]
        return loss, recall.float().mean().item()


class AddingTask(Task):
    def __init__(self):
        super().__init__(
            name="adding",
            description="sum the two marked numbers of a length-T sequence (MSE; baseline 1/6)",
            defaults=dict(_RNN_DEFAULTS, hidden=128, seq_len=200, steps=3000, batch_size=50),
            paper=dict(hidden=170, seq_len=750, steps=10000, batch_size=50, lr=1e-3, unitary_lr_divider=32),
        )

    def baseline(self, config):
        return adding_baseline()

    def build_model(self, config):
        return SequenceModel(
            2, config.hidden, 1, nonlinearity=config.nonlinearity, complex=config.complex, init=config.init
        )

    def batch(self, config, step, device):
        # Drawn on the CPU (where the generator lives), so every device sees the same batches.
        x, y = adding_batch(config.batch_size, config.seq_len, generator=_step_generator(config.seed, step))
        return x.to(device), y.to(device)

    def loss(self, model, x, y):
        return F.mse_loss(model(x).squeeze(-1), y), None


class _ClassificationTask(Task):
    """Labelled data sets: the last tenth of the training set held out for validation (as in
    the paper), a seeded shuffle per epoch, cross-entropy and accuracy, test-set numbers at the end.

    Subclasses load the data in ``prepare`` (calling ``_store``) and map raw examples to
    model inputs in ``_inputs``.
    """

    #: Also score this many training images at the end (None: do not).
    train_sample: int | None = None

    def _store(self, config, train_x, train_y, test_x, test_y) -> None:
        split = len(train_x) - len(train_x) // 10
        if split < config.batch_size:
            raise ValueError(f"batch size {config.batch_size} exceeds the {split} training images")
        self._data = {
            "train_x": train_x[:split],
            "train_y": train_y[:split],
            "val_x": train_x[split:],
            "val_y": train_y[split:],
            "test_x": test_x,
            "test_y": test_y,
        }
        self._epoch_order: tuple[int, torch.Tensor | None] = (-1, None)

    def _inputs(self, raw: torch.Tensor, device) -> torch.Tensor:
        raise NotImplementedError

    def steps_per_epoch(self, config) -> int:
        return len(self._data["train_x"]) // config.batch_size

    def total_steps(self, config):
        return config.steps if config.steps is not None else config.epochs * self.steps_per_epoch(config)

    def batch(self, config, step, device):
        epoch, index = divmod(step, self.steps_per_epoch(config))
        if self._epoch_order[0] != epoch:
            shuffle = _step_generator(config.seed, -1 - epoch)
            self._epoch_order = (epoch, torch.randperm(len(self._data["train_x"]), generator=shuffle))
        rows = self._epoch_order[1][index * config.batch_size : (index + 1) * config.batch_size]
        return self._inputs(self._data["train_x"][rows], device), self._data["train_y"][rows].to(device)

    def loss(self, model, x, y):
        logits = model(x)
        return F.cross_entropy(logits, y), (logits.argmax(-1) == y).float().mean().item()

    def _score(self, model, split, device, limit: int | None = None) -> tuple[float, float]:
        xs, ys = self._data[f"{split}_x"][:limit], self._data[f"{split}_y"][:limit]
        was_training = model.training
        model.eval()  # BatchNorm, where there is one, uses its running statistics
        total_loss = correct = 0.0
        try:
            with torch.no_grad():
                for start in range(0, len(xs), 500):
                    logits = model(self._inputs(xs[start : start + 500], device))
                    y = ys[start : start + 500].to(device)
                    total_loss += F.cross_entropy(logits, y, reduction="sum").item()
                    correct += (logits.argmax(-1) == y).sum().item()
        finally:
            model.train(was_training)
        return total_loss / len(xs), correct / len(xs)

    def evaluate(self, model, config, device):
        loss, accuracy = self._score(model, "val", device, limit=config.eval_limit)
        return {"eval_loss": loss, "eval_accuracy": accuracy}

    def test(self, model, config, device):
        loss, accuracy = self._score(model, "test", device, limit=config.eval_limit)
        scores = {"test_loss": loss, "test_accuracy": accuracy}
        if self.train_sample:
            limit = min(self.train_sample, config.eval_limit or self.train_sample)
            train_loss, train_accuracy = self._score(model, "train", device, limit=limit)
            scores |= {"train_eval_loss": train_loss, "train_accuracy": train_accuracy}
        return scores


class PixelMNISTTask(_ClassificationTask):
    """Pixel-by-pixel MNIST, in order (smnist) or under a fixed seeded permutation (pmnist)."""

    def __init__(self, permuted: bool):
        kind = "permuted" if permuted else "sequential"
        super().__init__(
            name="pmnist" if permuted else "smnist",
            description=f"{kind} pixel-by-pixel MNIST, 784 steps (cross-entropy; test accuracy)",
            defaults=dict(_RNN_DEFAULTS, hidden=170, epochs=1, batch_size=128, init="cayley", eval_limit=None),
            paper=dict(hidden=170, epochs=200, batch_size=128, lr=1e-3, unitary_lr_divider=32),
            has_accuracy=True,
        )
        self.permuted = permuted

    def prepare(self, config, device):
        images = load_images("mnist", config.data_dir)
        self._order = torch.arange(784)
        if self.permuted:
            self._order = torch.randperm(784, generator=torch.Generator().manual_seed(config.permutation_seed))
        self._store(
            config,
            torch.as_tensor(images.train_images).reshape(-1, 784),
            torch.as_tensor(images.train_labels),
            torch.as_tensor(images.test_images).reshape(-1, 784),
            torch.as_tensor(images.test_labels),
        )

    def _inputs(self, pixels: torch.Tensor, device) -> torch.Tensor:
        return (pixels[:, self._order].to(device=device, dtype=torch.get_default_dtype()) / 255.0).unsqueeze(-1)

    def build_model(self, config):
        return SequenceModel(
            1, config.hidden, 10, nonlinearity=config.nonlinearity, complex=config.complex, init=config.init
        )


class UnitaryTargetTask(Task):
    """Learn a random N x N unitary from input/output pairs (N = --hidden)."""

    def __init__(self):
        super().__init__(
            name="unitary",
            description="learn a Haar-random N x N orthogonal/unitary matrix from pairs (MSE; N = --hidden)",
            defaults=dict(
                hidden=256,
                steps=1000,
                batch_size=128,
                lr=1e-3,
                unitary_lr_divider=1,
                optimizer="adam",
                init="haar",
                nonlinearity="identity",
                eval_every=50,
            ),
            paper=dict(hidden=2048, steps=1000, batch_size=128),
        )

    def baseline(self, config):
        return 2.0  # E|W x - T x|^2 per coordinate for unrelated rotations W, T

    def prepare(self, config, device):
        dtype = torch.complex64 if config.complex else torch.get_default_dtype()
        generator = torch.Generator().manual_seed(config.seed + 7)
        self._target = unitary_init(config.hidden, "haar", dtype=dtype, generator=generator).to(device)

    def build_model(self, config):
        dtype = torch.complex64 if config.complex else None
        return UnitaryLinear(config.hidden, init=config.init, dtype=dtype)

    def batch(self, config, step, device):
        target = self._target
        x = torch.randn(
            config.batch_size, config.hidden, dtype=target.dtype, generator=_step_generator(config.seed, step)
        ).to(device)
        return x, x @ target.mT

    def loss(self, model, x, y):
        return (model(x) - y).abs().square().mean(), None


class ImageTask(_ClassificationTask):
    """Image classification with full-width orthogonal convolutions: the deep plain CNN or ResNet-9."""

    train_sample = 10_000  # train accuracy beside test accuracy: the paper's deep-CNN finding

    def __init__(self, name: str, dataset: str, description: str):
        super().__init__(
            name=name,
            description=description,
            defaults=dict(
                model="cnn",
                depth=None,
                channels=None,
                epochs=1,
                batch_size=64,
                lr=1e-3,
                unitary_lr_divider=10,
                optimizer="adam",
                init="identity",
                eval_every=100,
                eval_limit=None,
            ),
            paper=dict(depth=100, channels=32, epochs=20, batch_size=64, lr=1e-3, unitary_lr_divider=10),
            has_accuracy=True,
            inits=("identity", "haar"),
            model_defaults={"cnn": dict(depth=8, channels=32), "resnet9": dict(channels=8)},
        )
        self.dataset = dataset

    def prepare(self, config, device):
        if self.dataset == "cifar10":
            images = load_cifar10(config.data_dir)
        else:
            images = load_images(self.dataset, config.data_dir)

        def with_channels(array) -> torch.Tensor:  # (N, C, n, m); grey images get C = 1
            x = torch.as_tensor(array)
            return x.unsqueeze(1) if x.dim() == 3 else x

        self._store(
            config,
            with_channels(images.train_images),
            torch.as_tensor(images.train_labels),
            with_channels(images.test_images),
            torch.as_tensor(images.test_labels),
        )
        # Per-channel standardisation from the training split only.
        scaled = self._data["train_x"].float() / 255.0
        self._mean = scaled.mean(dim=(0, 2, 3), keepdim=True)
        self._std = scaled.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)

    def _inputs(self, images: torch.Tensor, device) -> torch.Tensor:
        x = (images.float() / 255.0 - self._mean) / self._std
        return x.to(device=device, dtype=torch.get_default_dtype())

    def build_model(self, config):
        shape = self._data["train_x"].shape
        size, in_channels = tuple(shape[-2:]), shape[1]
        if config.model == "resnet9":
            return UnitaryResNet9(width=config.channels, size=size, in_channels=in_channels, init=config.init)
        return DeepUnitaryCNN(
            config.depth, channels=config.channels, size=size, in_channels=in_channels, init=config.init
        )


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        CopyTask(),
        AddingTask(),
        PixelMNISTTask(permuted=True),
        PixelMNISTTask(permuted=False),
        UnitaryTargetTask(),
        ImageTask("mnist", "mnist", "MNIST digits, orthogonal convs (--model cnn|resnet9, --depth; accuracy)"),
        ImageTask("fashion-mnist", "fashion-mnist", "Fashion-MNIST, orthogonal convs (--model cnn|resnet9; accuracy)"),
        ImageTask("cifar10", "cifar10", "CIFAR-10 from --data-dir, orthogonal convs (--model cnn|resnet9)"),
    )
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[name]


def describe_tasks() -> str:
    return "\n".join(f"  {name:14s} {task.description}" for name, task in TASKS.items())
