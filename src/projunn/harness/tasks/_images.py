"""Labelled images: pixel-by-pixel MNIST for RNNs, and image classification with orthogonal convolutions."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ...models import DeepUnitaryCNN, LipschitzCNN, UnitaryResNet9
from ...robust import certified_radius, lipschitz_bound, offset_cross_entropy
from ..datasets import load_cifar10, load_images
from ._base import RNN_DEFAULTS, RNN_OPTIONS, WEIGHT_COPIES, Task, Unwatched, evaluating, stream

__all__ = ["ImageTask", "PixelMNISTTask"]

_SPLIT_NAMES = {"val": "validation set", "test": "test set", "train": "training sample"}
#: Steps per epoch of the MNIST tasks at batch 128: 54,000 training images after the 10% split.
_MNIST_STEPS_PER_EPOCH = 54_000 // 128
#: Values autograd keeps per (example, channel, pixel, layer) of the CNNs: measured 5-6 on CPU runs.
_CNN_SAVED_VALUES = 6


class _ClassificationTask(Task):
    """Labelled data sets: the last tenth of the training set held out for validation (as in
    the paper), a seeded shuffle per epoch, cross-entropy and accuracy, test-set numbers at the end.

    Subclasses load the data in ``setup`` (then :meth:`split` it) and map raw examples to model
    inputs (``inputs``).
    """

    #: Also score this many training images at the end (None: do not).
    train_sample: int | None = None

    def __init__(self, **fields):
        super().__init__(loss_label="cross-entropy", has_accuracy=True, **fields)

    def split(self, images, shaped: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Hold out validation images from ``images`` (an ``ImageSet``), each array made a tensor by ``shaped``."""
        config = self.config
        train_x, train_y = shaped(torch.as_tensor(images.train_images)), torch.as_tensor(images.train_labels)
        test_x, test_y = shaped(torch.as_tensor(images.test_images)), torch.as_tensor(images.test_labels)
        split = len(train_x) - len(train_x) // 10
        if split < config.batch_size:
            raise ValueError(f"batch size {config.batch_size} exceeds the {split} training images")
        self.splits = {
            "train": (train_x[:split], train_y[:split]),
            "val": (train_x[split:], train_y[split:]),
            "test": (test_x, test_y),
        }
        self.steps_per_epoch = split // config.batch_size
        self.total_steps = config.steps if config.steps is not None else config.epochs * self.steps_per_epoch
        self._epoch_order: tuple[int, torch.Tensor | None] = (-1, None)  # the current epoch's shuffle

    def inputs(self, raw: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, model, x, y):
        return F.cross_entropy(model(x), y)

    def batch(self, step):
        epoch, index = divmod(step, self.steps_per_epoch)
        train_x, train_y = self.splits["train"]
        if self._epoch_order[0] != epoch:
            shuffle = stream("shuffle", self.config.seed, epoch)
            self._epoch_order = (epoch, torch.randperm(len(train_x), generator=shuffle))
        size = self.config.batch_size
        rows = self._epoch_order[1][index * size : (index + 1) * size]
        return self.inputs(train_x[rows]), self.to_device(train_y[rows])

    def _score(self, model, split: str, limit: int | None, progress) -> tuple[float, float, torch.Tensor]:
        """Mean cross-entropy, accuracy, and each image's certified radius were the model 1-Lipschitz (B,)."""
        xs, ys = (part[:limit] for part in self.splits[split])
        total_loss = correct = 0.0
        radii = []
        with evaluating(model), progress(total=len(xs), desc=_SPLIT_NAMES[split], unit="image") as bar:
            for start in range(0, len(xs), 500):
                logits = model(self.inputs(xs[start : start + 500]))
                y = self.to_device(ys[start : start + 500])
                total_loss += self.summed_loss(logits, y).item()
                correct += (logits.argmax(-1) == y).sum().item()
                radii.append(certified_radius(logits, y))
                bar.update(len(y))
        return total_loss / len(xs), correct / len(xs), torch.cat(radii).cpu()

    def summed_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The training loss of a batch of logits, summed over the batch: what held-out rows report."""
        return F.cross_entropy(logits, labels, reduction="sum")

    def _prior_loss(self, split: str, limit: int | None) -> float:
        """The loss of the constant predictor (the training split's class frequencies as logits)."""
        counts = torch.bincount(self.splits["train"][1].long()).double()
        log_prior = (counts / counts.sum()).clamp_min(1e-300).log()
        labels = self.splits[split][1][:limit].long()
        labels = labels[labels < len(log_prior)]  # a class absent from training has no prior: skip it
        return (self.summed_loss(log_prior.expand(len(labels), -1), labels) / len(labels)).item()

    def certified(self, model, radii: torch.Tensor) -> dict[str, Any]:
        """What :meth:`ImageTask.certified` adds to the scores of a 1-Lipschitz model: nothing here."""
        return {}

    def evaluate(self, model, *, progress=Unwatched):
        limit = self.config.eval_limit
        loss, accuracy, _ = self._score(model, "val", limit, progress)
        return {"eval_loss": loss, "eval_accuracy": accuracy, "eval_baseline": self._prior_loss("val", limit)}

    def test(self, model, *, progress=Unwatched):
        limit = self.config.eval_limit
        loss, accuracy, radii = self._score(model, "test", limit, progress)
        scores = {"test_loss": loss, "test_accuracy": accuracy, "test_baseline": self._prior_loss("test", limit)}
        scores |= {f"test_{key}": value for key, value in self.certified(model, radii).items()}
        if self.train_sample:
            sample = min(self.train_sample, limit or self.train_sample)
            train_loss, train_accuracy, _ = self._score(model, "train", sample, progress)
            scores |= {"train_eval_loss": train_loss, "train_accuracy": train_accuracy}
        return scores


class PixelMNISTTask(_ClassificationTask):
    """Pixel-by-pixel MNIST, in order (smnist) or under a fixed seeded permutation (pmnist).

    ``--preset paper`` follows the paper's text (200 epochs, the last 10% of the
    training set held out for validation, modReLU, rank 1) and, where the text is
    silent, the authors' permuted_mnist.py at its last commit (facebookresearch/projUNN
    @c2b03eb): hidden 170 (the paper also reports 116, 360 and 512: ``--hidden`` is
    free), batch 128, RMSprop lr 1e-3 for every weight (no unitary divider at that
    commit; an older one divided by 10), lr x 0.2 every 60 epochs, identity init of
    U, He-normal W_in, LSI sketch. The script runs projUNN-D; ``--method`` is left
    to the user. The permutation is torch's from ``--permutation-seed`` (the script
    uses expRNN's NumPy permutation): the task is the same in distribution.
    """

    def __init__(self, permuted: bool):
        kind = "permuted" if permuted else "sequential"
        super().__init__(
            name="pmnist" if permuted else "smnist",
            description=f"{kind} pixel-by-pixel MNIST, 784 steps (cross-entropy; test accuracy)",
            defaults=dict(RNN_DEFAULTS, hidden=170, epochs=1, batch_size=128, init="cayley", eval_limit=None)
            | ({"permutation_seed": 0} if permuted else {}),
            paper=dict(
                hidden=170,
                epochs=200,
                batch_size=128,
                optimizer="rmsprop",
                lr=1e-3,
                unitary_lr_divider=1,
                lr_decay=0.2,
                lr_decay_every=60 * _MNIST_STEPS_PER_EPOCH,
                nonlinearity="modrelu",
                init="identity",
                input_init="he",
                sketch="lsi",
                rank=1,
                eval_every=_MNIST_STEPS_PER_EPOCH,
            ),
            options=RNN_OPTIONS | {"epochs", "eval_limit"} | ({"permutation_seed"} if permuted else set()),
            paper_free=("hidden",),
        )
        self.permuted = permuted

    def setup(self):
        images = load_images("mnist", self.config.data_dir)
        self.order = torch.arange(784)  # the pixel shown at each time step
        if self.permuted:
            self.order = torch.randperm(784, generator=torch.Generator().manual_seed(self.config.permutation_seed))
        self.split(images, lambda x: x.reshape(-1, 784))

    def footprint(self, config, batch):
        return self.rnn_footprint(config, batch, 784), "--batch-size or --hidden"  # a pixel per time step

    def inputs(self, pixels):
        return (self.to_device(pixels[:, self.order], torch.get_default_dtype()) / 255.0).unsqueeze(-1)

    def build_model(self) -> torch.nn.Module:
        return self.rnn_model(1, 10)  # a pixel in, ten class scores out


class ImageTask(_ClassificationTask):
    """Image classification with full-width orthogonal convolutions: the deep plain CNN, ResNet-9, or
    the 1-Lipschitz CNN whose test scores add certified accuracies at ``radii``.

    The Lipschitz model sees pixels in [0, 1] less the training mean, not divided by the standard
    deviation, so that its certified radii are L2 distances between images in the [0, 1] pixel
    scale, the unit of the literature's radii. It trains on offset cross-entropy
    (:func:`projunn.robust.offset_cross_entropy`) with offset sqrt(2) x ``margin``, the loss
    still falling until each training image is certified at about ``margin``; its held-out rows and
    baseline (the class prior as constant logits) report the same loss.
    """

    train_sample = 10_000  # train accuracy beside test accuracy: the paper's deep-CNN finding

    def __init__(self, name: str, dataset: str, description: str, radii: tuple[float, ...]):
        super().__init__(
            name=name,
            description=description,
            defaults=dict(
                model="cnn",
                epochs=1,
                batch_size=64,
                lr=1e-3,
                optimizer="adam",
                init="identity",
                eval_every=100,
            ),
            paper=dict(depth=100, channels=32, epochs=20, batch_size=64, lr=1e-3, unitary_lr_divider=10),
            options=frozenset({"model", "depth", "channels", "epochs", "eval_limit", "margin", "temperature"}),
            inits=("identity", "haar"),
            # The orthogonal convs of the Lipschitz model, with no BatchNorm to rescale, learn at lr.
            model_defaults={
                "cnn": dict(depth=8, channels=32, unitary_lr_divider=10),
                "resnet9": dict(channels=8, unitary_lr_divider=10),
                "lipschitz": dict(depth=2, channels=16, margin=radii[-1], temperature=0.25, unitary_lr_divider=1),
            },
            paper_models=("cnn", "resnet9"),
        )
        self.dataset, self.radii = dataset, radii

    def footprint(self, config, batch):
        pixels, width = 32 * 32 if self.dataset == "cifar10" else 28 * 28, config.channels
        # ResNet-9: nine convs; channels x4 and pixels /4 per stride, so the last stage dominates the weights.
        # Lipschitz CNN: depth convs at each of 2 resolutions, the second with 4x the entries per conv.
        layers, entries = {
            "resnet9": (9, 221),
            "lipschitz": (2 * (config.depth or 0), 5 * (config.depth or 0)),
        }.get(config.model, (config.depth, config.depth))
        flags = "--batch-size or --channels" if config.model == "resnet9" else "--batch-size, --channels or --depth"
        entries *= width**2 * pixels
        return entries * WEIGHT_COPIES + batch * width * pixels * layers * _CNN_SAVED_VALUES, flags

    def setup(self):
        data_dir = self.config.data_dir
        images = load_cifar10(data_dir) if self.dataset == "cifar10" else load_images(self.dataset, data_dir)
        self.split(images, lambda x: x.unsqueeze(1) if x.dim() == 3 else x)  # (N, C, n, m); grey images get C = 1
        # Per-channel standardisation from the training split only: (1, C, 1, 1) each.
        scaled = self.splits["train"][0].float() / 255.0
        self.mean = scaled.mean(dim=(0, 2, 3), keepdim=True)
        self.std = scaled.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
        if self.config.model == "lipschitz":  # radii in the [0, 1] pixel scale (see the class docstring)
            self.std = torch.ones_like(self.std)
            self.loss_label = f"offset cross-entropy (margin {self.config.margin:g})"

    def inputs(self, images):
        x = (images.float() / 255.0 - self.mean) / self.std
        return self.to_device(x, torch.get_default_dtype())

    def loss(self, model, x, y):
        if self.config.model != "lipschitz":
            return super().loss(model, x, y)
        return self.summed_loss(model(x), y) / len(y)

    def summed_loss(self, logits, labels):
        if self.config.model != "lipschitz":
            return super().summed_loss(logits, labels)
        offset, temperature = math.sqrt(2) * self.config.margin, self.config.temperature
        return offset_cross_entropy(logits, labels, offset=offset, temperature=temperature) * len(labels)

    def certified(self, model, radii: torch.Tensor) -> dict[str, Any]:
        """The Lipschitz model's bound (from its weights as they are) and certified accuracy at ``self.radii``."""
        if self.config.model != "lipschitz":
            return {}
        bound = lipschitz_bound(model)
        accuracy = {f"{r:g}": ((radii / bound) > r).double().mean().item() for r in self.radii}
        return {"lipschitz_bound": bound, "certified_accuracy": accuracy}

    def build_model(self) -> torch.nn.Module:
        """The model for the data set's images, of shape (C, n, m)."""
        config, image_shape = self.config, self.splits["train"][0].shape[1:]
        in_channels, size = image_shape[0], tuple(image_shape[1:])
        if config.model == "lipschitz":
            return LipschitzCNN(
                channels=config.channels, size=size, blocks=config.depth, in_channels=in_channels, init=config.init
            )
        if config.model == "resnet9":
            return UnitaryResNet9(width=config.channels, size=size, in_channels=in_channels, init=config.init)
        return DeepUnitaryCNN(
            config.depth, channels=config.channels, size=size, in_channels=in_channels, init=config.init
        )
