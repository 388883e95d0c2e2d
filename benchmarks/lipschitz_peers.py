"""Certified robustness on MNIST: one 1-Lipschitz network, its convolution swapped, trained side by side.

Every method trains the same skeleton on the same batches and differs only in its convolutions:

    ChannelPad(1 -> C) -> stage 0: B x (conv C -> C with a bias, MaxMin)
      -> SpaceToDepth(2) -> stage 1: B x (conv 4C -> 4C, MaxMin) -> ... (S stages)
      -> Flatten -> StiefelLinear (orthonormal rows, 10 outputs)

trained on offset cross-entropy (offset sqrt(2) x margin, :func:`projunn.robust.offset_cross_entropy`)
with Adam, a cosine learning-rate schedule over all steps, and one seeded permutation of the
training images per epoch. The head is a :class:`projunn.nn.StiefelLinear` stepped by projUNN-T
in every method, so that only the convolution differs. The convolutions (:data:`METHODS`):

- ``projunn-t``, ``projunn-d``: :class:`projunn.nn.UnitaryConv2d` (full-width, one orthogonal
  C x C matrix per frequency, exactly norm-preserving), stepped by :class:`projunn.optim.ProjUNN`
  at ``--rank`` (default 1); ``projunn-t-k16`` the same with projUNN-T steps at rank 16 (at most C);
- ``cayley``: the same layer with each frequency's matrix computed by torch's orthogonal
  parametrisation through the Cayley map (Trockman & Kolter 2021, what ``projunn train --method
  cayley`` builds), the free tensors stepped by plain Adam;
- ``aoc``, ``soc``, ``aol``: orthogonium's ``AdaptiveOrthoConv2d``, ``AdaptiveSOCConv2d`` and
  ``AOLConv2D``, 3 x 3 kernels, circular padding, stride 1;
- ``spectral``: deel-torchlip's ``SpectralConv2d`` (spectral-normalised, then Bjorck-orthonormalised
  kernel, scaled by 1/3 for a 3 x 3 kernel so that the convolution is 1-Lipschitz), 3 x 3, circular.

A method whose package is missing is skipped with its reason. Each method writes
``<out-root>/<method>/``: ``checkpoint.pt`` (model, optimiser, position in the schedule, random
state and the per-epoch rows; replaced atomically), ``metrics.csv`` (one row per epoch: seconds of
training, mean training loss, accuracy and certified accuracy on the held-out 10% of the training
images, certified with the network's exact bound at that epoch, which the row gives; rows written
before the bound was part of them certified with Lipschitz constant 1) and, once the schedule ends,
``summary.json`` with the test figures, measured once on the final weights. Their certificates use
each network's own bound, the product of its layers' largest singular values, every singular value
of each convolution computed exactly (:func:`projunn.robust.conv_singular_values`): a package's
layer that left the orthogonal group in training shows in the bound rather than
in an unsound certificate. Then the soundness checks: the largest Jacobian norm over 200 test images
(from below) and an L2 PGD attack on the first 500 test images, each certified one attacked just
inside its radius (a sound certificate leaves nothing to find). A summary written before either gets
both on ``--resume``. ``<out-root>/results.md`` tabulates the summaries.

Ctrl-C or SIGTERM ends a sitting after the current step with a checkpoint; ``--resume`` continues it
on the same batches (with the same settings: changing one mid-schedule is refused).

Usage:
    python benchmarks/lipschitz_peers.py                          # every method, the defaults below
    python benchmarks/lipschitz_peers.py --resume                 # continue where the sittings stopped
    python benchmarks/lipschitz_peers.py --methods projunn-t aoc --epochs 1 --limit-train 512 --out-root /tmp/lip
    python benchmarks/lipschitz_peers.py --table-only             # rebuild results.md from the summaries
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import importlib.metadata
import json
import math
import os
import pathlib
import platform
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.utils import parametrizations, parametrize

from projunn.nn import ChannelPad, MaxMin, SpaceToDepth, StiefelLinear, UnitaryConv2d
from projunn.optim import ProjUNN
from projunn.robust import (
    certified_accuracy,
    certified_radius,
    conv_singular_values,
    jacobian_norm,
    offset_cross_entropy,
    pgd_l2,
)

ROOT = pathlib.Path(__file__).resolve().parent / "results" / "lipschitz"
METHODS = ("projunn-t", "projunn-d", "projunn-t-k16", "cayley", "aoc", "soc", "aol", "spectral")
#: The projunn methods: their update and the rank of their convolutions' steps (None: ``--rank``). The
#: frequency matrices are C x C (16 x 16, then 64 x 64 at the defaults); rank 16, capped at C, takes
#: much more of Adam's step than rank 1 at a small cost at this size.
_PROJUNN = {"projunn-t": ("t", None), "projunn-d": ("d", None), "projunn-t-k16": ("t", 16)}
#: MNIST radii in the [0, 1] pixel scale: 1.58 is the L2 radius the MNIST tables of the certified-
#: robustness literature report (e.g. BCOP, Li et al. 2019; GloRo, Leino et al. 2021), 0.5 and 1.0 below it.
RADII = (0.5, 1.0, 1.58)
JACOBIAN_IMAGES = 200
#: The soundness check: an L2 PGD attack (50 steps, from the image and 2 random starts) on the first 500 test
#: images, each certified one attacked just inside its radius (what it keeps clear of the edge: far above
#: float32 rounding of the logits, so that rounding never reads as a broken certificate).
ATTACK_IMAGES, ATTACK_STEPS, ATTACK_RESTARTS, ATTACK_SLACK = 500, 50, 2, 1e-4
EVAL_BATCH = 1000
#: A bound above 1 by more than this is a network that left the group, not rounding; its table row says so.
LOOSE_BOUND = 1e-3
#: How the summaries' Lipschitz bound is obtained (a summary written otherwise is recomputed on ``--resume``).
BOUND = "product of each layer's largest singular value, computed exactly"
VALIDATION_FRACTION = 0.1

#: method -> (distribution it needs, the convolution as the table names it).
_SOURCES = {
    "projunn-t": ("projunn", "UnitaryConv2d, projUNN-T steps"),
    "projunn-d": ("projunn", "UnitaryConv2d, projUNN-D steps"),
    "projunn-t-k16": ("projunn", "UnitaryConv2d, projUNN-T steps at rank 16"),
    "cayley": ("projunn", "UnitaryConv2d, Cayley map per frequency"),
    "aoc": ("orthogonium", "orthogonium AdaptiveOrthoConv2d 3x3"),
    "soc": ("orthogonium", "orthogonium AdaptiveSOCConv2d 3x3"),
    "aol": ("orthogonium", "orthogonium AOLConv2D 3x3"),
    "spectral": ("deel-torchlip", "deel-torchlip SpectralConv2d 3x3"),
}


@dataclass(frozen=True)
class Settings:
    """What a run trains; stored in its checkpoint, and a resumed sitting must repeat it."""

    epochs: int = 10
    channels: int = 16
    blocks: int = 2
    stages: int = 2
    batch_size: int = 64
    lr: float = 1e-3
    margin: float = 1.58
    temperature: float = 0.25
    rank: int = 1
    seed: int = 0
    limit_train: int | None = None
    data: str = "mnist"


@dataclass(frozen=True)
class Data:
    """Images (N, 1, 28, 28) float32, [0, 1] pixels less the training mean, and int64 labels; the range of
    the pixel values (the attack keeps its images in it), None for synthetic data."""

    train: tuple[torch.Tensor, torch.Tensor]
    validation: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    pixel_range: tuple[float, float] | None = None


class UnavailableError(Exception):
    """A method that cannot run here; the message is the one-line reason."""


# ----------------------------------------------------------------------------- the convolutions


def conv_factory(method: str) -> Callable[[int, tuple[int, int]], torch.nn.Module]:
    """``make(channels, size)`` -> the method's C -> C convolution with a bias, for (B, C, n, m) inputs.

    Raises:
        ValueError: an unknown method. UnavailableError: its package is missing or does not import.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if method in _PROJUNN:
        return lambda channels, size: UnitaryConv2d(channels, size, init="identity", bias=True)
    if method == "cayley":
        return _cayley_conv
    package = _SOURCES[method][0]
    try:
        if method == "aoc":
            from orthogonium.layers.conv.AOC import AdaptiveOrthoConv2d

            return lambda channels, size: AdaptiveOrthoConv2d(
                channels, channels, 3, stride=1, padding="same", padding_mode="circular"
            )
        if method == "soc":
            return _soc_conv()
        if method == "aol":
            from orthogonium.layers.conv.AOL import AOLConv2D

            return lambda channels, size: AOLConv2D(channels, channels, 3, padding=1, padding_mode="circular")
        from deel.torchlip import SpectralConv2d

        return lambda channels, size: SpectralConv2d(channels, channels, 3, padding=1, padding_mode="circular")
    except ImportError as error:  # a missing package, or one of its own imports failing
        raise UnavailableError(f"{method}: {package} does not import here ({error})") from None


def _cayley_conv(channels: int, size: tuple[int, int]) -> torch.nn.Module:
    """UnitaryConv2d whose frequency matrices torch's orthogonal parametrisation computes by the Cayley map.

    The same construction as ``projunn train --method cayley``: each weight starts from the layer's
    own value and its free tensor is an ordinary parameter.
    """
    conv = UnitaryConv2d(channels, size, init="identity", bias=True)
    for name in ("weight_free", "weight_self"):
        parametrizations.orthogonal(conv, name, orthogonal_map="cayley")
    return conv


def _soc_conv() -> Callable[[int, tuple[int, int]], torch.nn.Module]:
    """orthogonium's SOC with the padding its explicit kernel needs.

    The layer convolves with exp(K) truncated after ``exp_niter`` terms, an explicit kernel of
    3 + 2 (exp_niter - 1) taps, so ``padding="same"`` (resolved for 3 taps) would shrink the image:
    the circular padding is set for the explicit kernel instead.
    """
    from orthogonium.layers.conv.adaptiveSOC import AdaptiveSOCConv2d
    from orthogonium.layers.conv.adaptiveSOC.fast_skew_ortho_conv import ExpParams

    reach = ExpParams().exp_niter  # each term widens the kernel by one tap per side

    def make(channels: int, size: tuple[int, int]) -> torch.nn.Module:
        conv = AdaptiveSOCConv2d(channels, channels, 3, stride=1, padding=reach, padding_mode="circular")
        if conv.weight.shape[-2:] != (2 * reach + 1, 2 * reach + 1):
            raise UnavailableError(
                f"soc: explicit kernel {tuple(conv.weight.shape[-2:])}, expected {2 * reach + 1} taps"
            )
        return conv

    return make


def unavailable_reason(method: str) -> str | None:
    """Why ``method`` cannot run here, or None when it can."""
    try:
        conv_factory(method)
    except UnavailableError as reason:
        return str(reason)
    return None


# ----------------------------------------------------------------------------- the network


def build_model(method: str, settings: Settings, *, size: tuple[int, int] = (28, 28)) -> torch.nn.Sequential:
    """The shared skeleton with ``method``'s convolutions (see the module docstring); float32.

    Same layout as :class:`projunn.models.LipschitzCNN` (init ``"identity"``), so for the projunn
    methods it is that model.
    """
    make_conv = conv_factory(method)
    channels, (n, m) = settings.channels, size
    if channels % 2 or n % 2 ** (settings.stages - 1) or m % 2 ** (settings.stages - 1):
        raise ValueError(f"channels ({channels}) must be even and {size} divisible by 2^(stages - 1)")
    layers: list[torch.nn.Module] = [ChannelPad(1, channels)]
    for stage in range(settings.stages):
        if stage:
            layers.append(SpaceToDepth(2))
            channels, n, m = 4 * channels, n // 2, m // 2
        for _ in range(settings.blocks):
            layers += [make_conv(channels, (n, m)), MaxMin()]
    return torch.nn.Sequential(*layers, torch.nn.Flatten(), StiefelLinear(channels * n * m, 10))


def conv_layers(model: torch.nn.Sequential) -> list[torch.nn.Module]:
    """The skeleton's convolutions: the layers each MaxMin follows."""
    return [model[i - 1] for i, layer in enumerate(model) if isinstance(layer, MaxMin)]


def build_optimizer(method: str, model: torch.nn.Sequential, settings: Settings) -> ProjUNN:
    """Adam under ProjUNN: projunn convolutions in a unitary group, the head in another (projUNN-T), the rest plain."""
    head = model[-1].weight
    groups: list[dict[str, Any]] = []
    if method in _PROJUNN:
        update, rank = _PROJUNN[method]
        for conv in conv_layers(model):
            weights = [conv.weight_free, conv.weight_self]
            group = {"params": weights, "unitary": True, "method": update}
            groups.append(group | ({"rank": min(rank, conv.weight_free.shape[-1])} if rank else {}))
    groups.append({"params": [head], "unitary": True, "method": "t"})
    taken = {id(p) for group in groups for p in group["params"]}
    groups.append({"params": [p for p in model.parameters() if id(p) not in taken]})
    base = torch.optim.Adam(groups, lr=settings.lr)
    for group in base.param_groups:
        group["initial_lr"] = group["lr"]
    return ProjUNN(base, rank=settings.rank, seed=settings.seed)


def parameter_count(model: torch.nn.Module) -> int:
    """Real numbers trained (a complex entry counts twice)."""
    return sum(p.numel() * (2 if p.is_complex() else 1) for p in model.parameters())


def spectra(model: torch.nn.Sequential, image: torch.Tensor) -> list[torch.Tensor]:
    """Every singular value of each convolution of the skeleton at the size it sees, exactly
    (:func:`projunn.robust.conv_singular_values`), then the head's; float64."""
    was_training = model.training
    model.eval()  # a peer's layer may update state in a training-mode forward (a power iteration)
    try:
        shapes = conv_input_shapes(model, image)
        convs = [conv_singular_values(conv, shape) for conv, shape in zip(conv_layers(model), shapes)]
    finally:
        model.train(was_training)
    return [*convs, torch.linalg.svdvals(model[-1].weight.detach().double())]


def network_bound(values: list[torch.Tensor]) -> float:
    """A sound L2 Lipschitz bound of the skeleton from its layers' :func:`spectra`: the product of their largest
    singular values (channel padding, space-to-depth, MaxMin and flattening are 1-Lipschitz)."""
    return math.prod(v.max().item() for v in values)


def conv_input_shapes(model: torch.nn.Sequential, image: torch.Tensor) -> list[tuple[int, ...]]:
    """The (C, n, m) each convolution of the skeleton sees, from one image (1, 1, 28, 28)."""
    shapes, x = [], image
    with torch.no_grad():
        for i, layer in enumerate(model):
            if i + 1 < len(model) and isinstance(model[i + 1], MaxMin):
                shapes.append(tuple(x.shape[1:]))
            x = layer(x)
    return shapes


# ----------------------------------------------------------------------------- data


def load_data(settings: Settings) -> Data:
    """MNIST (or ``synthetic``), 10% of the training images held out by a seeded permutation.

    ``limit_train`` N keeps N training images and at most N validation and N test images.
    """
    if settings.data == "synthetic":
        return synthetic_data(settings.limit_train or 512, settings.seed)
    from projunn.harness.datasets import load_images

    images = load_images("mnist")
    x = torch.as_tensor(images.train_images).unsqueeze(1)
    y = torch.as_tensor(images.train_labels)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(settings.seed))
    held = round(VALIDATION_FRACTION * len(x))
    train, validation = order[held:], order[:held]
    test_x, test_y = torch.as_tensor(images.test_images).unsqueeze(1), torch.as_tensor(images.test_labels)
    limit = settings.limit_train
    if limit is not None:
        train, validation, test_x, test_y = train[:limit], validation[:limit], test_x[:limit], test_y[:limit]
    mean = (x[train].double() / 255).mean().float()
    scaled = lambda images: images.float() / 255 - mean  # noqa: E731  radii stay in [0, 1] pixel units
    pixel_range = (-mean.item(), 1 - mean.item())
    return Data(
        (scaled(x[train]), y[train]), (scaled(x[validation]), y[validation]), (scaled(test_x), test_y), pixel_range
    )


def synthetic_data(count: int, seed: int) -> Data:
    """``count`` training images (and count // 4 each to validate and test): a noisy pattern per class."""
    generator = torch.Generator().manual_seed(seed)
    patterns = 0.3 * torch.randn(10, 1, 28, 28, generator=generator)

    def split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.randint(0, 10, (n,), generator=generator)
        return patterns[labels] + 0.1 * torch.randn(n, 1, 28, 28, generator=generator), labels

    return Data(split(count), split(max(count // 4, 1)), split(max(count // 4, 1)))


def epoch_order(settings: Settings, epoch: int, count: int) -> torch.Tensor:
    """The batch order of ``epoch``: the same for every method and every sitting."""
    return torch.randperm(count, generator=torch.Generator().manual_seed(settings.seed * 100_003 + epoch))


def learning_rate_factor(step: int, total: int) -> float:
    """Cosine decay from 1 at step 0 to 0 after the last step."""
    return 0.5 * (1 + math.cos(math.pi * step / total))


# ----------------------------------------------------------------------------- training


def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, lipschitz: float = 1.0) -> dict[str, float]:
    """Clean accuracy and certified accuracy at :data:`RADII` for Lipschitz constant ``lipschitz`` (evaluation
    mode)."""
    return _scores(_logits(model, x), y, lipschitz)


def _logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad(), parametrize.cached():
        logits = torch.cat([model(x[i : i + EVAL_BATCH]) for i in range(0, len(x), EVAL_BATCH)])
    model.train()
    return logits


def _scores(logits: torch.Tensor, y: torch.Tensor, lipschitz: float) -> dict[str, float]:
    certified = certified_accuracy(logits, y, RADII, lipschitz)
    return {"accuracy": (logits.argmax(1) == y).double().mean().item(), **{f"{r:g}": certified[r] for r in RADII}}


def _save_atomically(value: Any, path: pathlib.Path) -> None:
    partial = path.with_name(path.name + ".partial")
    torch.save(value, partial)
    os.replace(partial, path)


def _write_metrics(rows: list[dict[str, float]], path: pathlib.Path) -> None:
    partial = path.with_name(path.name + ".partial")
    with partial.open("w", newline="") as handle:
        # Rows written before a column was added leave it empty.
        writer = csv.DictWriter(handle, fieldnames=list(dict.fromkeys(key for row in rows for key in row)) or ["epoch"])
        writer.writeheader()
        writer.writerows(rows)
    os.replace(partial, path)


def training_step(
    model: torch.nn.Module, optimizer: ProjUNN, x: torch.Tensor, y: torch.Tensor, settings: Settings
) -> torch.Tensor:
    """One step on the batch (x, y): offset cross-entropy, backward, the optimiser's step; returns the loss."""
    offset = math.sqrt(2) * settings.margin
    with parametrize.cached():  # a parametrised weight computed once per step, as projunn train does
        loss = offset_cross_entropy(model(x), y, offset=offset, temperature=settings.temperature)
        optimizer.zero_grad()
        loss.backward()
    optimizer.step()
    return loss


def time_steps(settings: Settings, data: Data, methods: list[str], *, repeats: int) -> dict[str, float]:
    """Seconds per training step of each available method, timed side by side in interleaved rounds
    (:func:`projunn.harness.bench._measure.measure_interleaved`), so that the ratios do not depend on
    what else the machine did while each method trained: the runs' own seconds per epoch do."""
    from projunn.harness.bench._measure import measure_interleaved

    x, y = data.train
    batches = epoch_order(settings, 0, len(x)).split(settings.batch_size)
    steps = {}
    for method in methods:
        if unavailable_reason(method) is not None:
            continue
        torch.manual_seed(settings.seed)
        try:
            model = build_model(method, settings)
        except UnavailableError as reason:
            print(f"skipped {reason}")
            continue
        optimizer = build_optimizer(method, model, settings)
        model.train()
        steps[method] = _stepper(model, optimizer, x, y, batches, settings)
    found = measure_interleaved(list(steps.values()), torch.device("cpu"), repeats=repeats, budget_s=30.0)
    return {method: m.ms / 1e3 for method, m in zip(steps, found)}


def _stepper(model, optimizer, x, y, batches, settings) -> Callable[[], torch.Tensor]:
    """A training step on the next batch of the epoch's order at every call."""
    drawn = iter(range(10**9))

    def step() -> torch.Tensor:
        batch = batches[next(drawn) % len(batches)]
        return training_step(model, optimizer, x[batch], y[batch], settings)

    return step


def check_settings(saved: dict[str, Any], settings: Settings, folder: pathlib.Path) -> None:
    """Refuse to continue (or re-measure) a checkpoint with settings other than those it was trained with.

    Raises:
        ValueError: names each setting that differs.
    """
    changed = {k: (v, saved["settings"].get(k)) for k, v in dataclasses.asdict(settings).items()}
    changed = {k: pair for k, pair in changed.items() if pair[0] != pair[1]}
    if changed:
        described = ", ".join(f"{k}: {new!r} (the run has {old!r})" for k, (new, old) in changed.items())
        raise ValueError(f"{folder} was trained with other settings; {described}")


def train_method(
    method: str,
    settings: Settings,
    data: Data,
    folder: pathlib.Path,
    *,
    resume: bool = False,
    max_steps: int | None = None,
    stop: Callable[[], bool] = lambda: False,
    log: Callable[[str], None] = print,
) -> dict[str, Any] | None:
    """Train ``method`` into ``folder`` (or continue it); its summary, or None when the sitting stopped early.

    A sitting stops after ``max_steps`` steps or once ``stop()`` is true, at a step boundary, with a
    checkpoint from which ``resume=True`` continues on the same batches.

    Raises:
        ValueError: a folder that already holds a run without ``resume``, or one trained with other settings.
    """
    checkpoint, summary_path = folder / "checkpoint.pt", folder / "summary.json"
    if checkpoint.exists() and not resume:
        raise ValueError(f"{folder} already holds a run: pass --resume to continue it, or choose another --out-root")
    if resume and summary_path.exists():
        log(f"{method}: finished earlier ({summary_path})")
        summary = json.loads(summary_path.read_text())
        stale = summary.get("bound") != BOUND or (
            summary["lipschitz_bound"] > 1 + LOOSE_BOUND and "attack_at_lipschitz_1" not in summary
        )
        if stale and not checkpoint.exists():
            log(f"{method}: certified with Lipschitz constant 1; no checkpoint left to compute its exact bound from")
        elif stale:  # finished before certificates used the network's exact bound (and attacked the claim's radii)
            saved = torch.load(checkpoint, weights_only=True)
            check_settings(saved, settings, folder)
            model = build_model(method, settings)
            model.load_state_dict(saved["model"])
            summary = summarise(method, settings, model, data, saved["position"]["rows"])
            summary_path.write_text(json.dumps(summary, indent=2) + "\n")
        return summary
    torch.manual_seed(settings.seed)
    model = build_model(method, settings)
    optimizer = build_optimizer(method, model, settings)
    position = {"epoch": 0, "step": 0, "loss_sum": 0.0, "seconds": 0.0, "rows": []}
    if resume and checkpoint.exists():
        saved = torch.load(checkpoint, weights_only=True)
        check_settings(saved, settings, folder)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        torch.set_rng_state(saved["rng"])
        position = saved["position"]
        log(f"{method}: resuming at epoch {position['epoch'] + 1}, step {position['step']}")
    folder.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state()}
        _save_atomically({**state, "settings": dataclasses.asdict(settings), "position": position}, checkpoint)
        _write_metrics(position["rows"], folder / "metrics.csv")

    x, y = data.train
    per_epoch = math.ceil(len(x) / settings.batch_size)
    total = settings.epochs * per_epoch
    done_here = 0
    model.train()
    while position["epoch"] < settings.epochs:
        order = epoch_order(settings, position["epoch"], len(x))
        while position["step"] < per_epoch:
            step = position["step"]
            batch = order[step * settings.batch_size : (step + 1) * settings.batch_size]
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"] * learning_rate_factor(position["epoch"] * per_epoch + step, total)
            started = time.perf_counter()
            loss = training_step(model, optimizer, x[batch], y[batch], settings)
            position["seconds"] += time.perf_counter() - started
            position["loss_sum"] += loss.item() * len(batch)
            position["step"], done_here = step + 1, done_here + 1
            if position["step"] < per_epoch and (stop() or done_here == max_steps):
                save()
                log(f"{method}: stopped at epoch {position['epoch'] + 1}, step {position['step']}; --resume continues")
                return None
        bound = network_bound(spectra(model, x[:1]))
        scores = evaluate(model, *data.validation, bound)
        row = {
            "epoch": position["epoch"] + 1,
            "seconds": position["seconds"],
            "train_loss": position["loss_sum"] / len(x),
            "val_accuracy": scores["accuracy"],
            **{f"val_certified_{r:g}": scores[f"{r:g}"] for r in RADII},
            "val_lipschitz_bound": bound,
        }
        position = {
            "epoch": position["epoch"] + 1,
            "step": 0,
            "loss_sum": 0.0,
            "seconds": 0.0,
            "rows": [*position["rows"], row],
        }
        save()
        certified = ", ".join(f"{r:g}: {scores[f'{r:g}']:.1%}" for r in RADII)
        log(
            f"{method}: epoch {row['epoch']}/{settings.epochs}, {row['seconds']:.1f} s, loss {row['train_loss']:.4f}, "
            f"validation {row['val_accuracy']:.1%}, certified {certified}"
        )
        if position["epoch"] < settings.epochs and (stop() or done_here == max_steps):
            log(f"{method}: stopped after epoch {position['epoch']}; --resume continues")
            return None
    summary = summarise(method, settings, model, data, position["rows"])
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def attack(model: torch.nn.Module, data: Data, lipschitz: float = 1.0, count: int = ATTACK_IMAGES) -> dict[str, int]:
    """L2 PGD on the first ``count`` test images: each certified one (radius margin / (sqrt(2) ``lipschitz``))
    attacked just inside its radius. A sound certificate leaves nothing to find: ``broken_inside_radius``
    counts the images misclassified there."""
    x, y = (part[:count] for part in data.test)
    model.eval()
    with parametrize.cached():  # a parametrised weight computed once for the whole attack
        with torch.no_grad():
            radius = certified_radius(model(x), y, lipschitz)
        certified = radius > 2 * ATTACK_SLACK
        fooled = torch.zeros(0, dtype=torch.bool)
        if certified.any():
            inside = (0.999 * radius[certified]).clamp_max(radius[certified] - ATTACK_SLACK)
            _, fooled = pgd_l2(
                model,
                x[certified],
                y[certified],
                inside,
                steps=ATTACK_STEPS,
                restarts=ATTACK_RESTARTS,
                bounds=data.pixel_range,
                generator=torch.Generator().manual_seed(0),
            )
    model.train()
    return {"images": len(x), "attacked": int(certified.sum()), "broken_inside_radius": int(fooled.sum())}


def summarise(
    method: str, settings: Settings, model: torch.nn.Sequential, data: Data, rows: list[dict[str, float]]
) -> dict[str, Any]:
    """The test figures of the final weights, measured once, certified with the network's own bound, the
    soundness checks, and the run's cost."""
    test_x, test_y = data.test
    model.eval()
    jacobian = jacobian_norm(model, test_x[:JACOBIAN_IMAGES]).max().item()
    values = spectra(model, test_x[:1])
    model.train()
    # A package's layer may drift from orthogonality (a truncated series, an iteration stopped early): its
    # certificates use the network's exact bound, not the Lipschitz constant 1 the package aims for.
    bound = network_bound(values)
    logits = _logits(model, test_x)
    scores, at_one = _scores(logits, test_y, bound), _scores(logits, test_y, 1.0)
    deviations = [(v - 1).abs().max().item() for v in values[:-1]]
    package = _SOURCES[method][0]
    return {
        "method": method,
        "convolution": _SOURCES[method][1],
        "package": f"{package} {importlib.metadata.version(package)}",
        "settings": dataclasses.asdict(settings),
        "epochs": len(rows),
        "seconds_per_epoch": sum(row["seconds"] for row in rows) / max(len(rows), 1),
        "parameters": parameter_count(model),
        "test_images": len(test_x),
        "test_accuracy": scores["accuracy"],
        "test_certified": {f"{r:g}": scores[f"{r:g}"] for r in RADII},
        "test_certified_at_lipschitz_1": {f"{r:g}": at_one[f"{r:g}"] for r in RADII},
        "bound": BOUND,
        "lipschitz_bound": bound,
        "jacobian_norm_max": jacobian,
        "jacobian_images": min(JACOBIAN_IMAGES, len(test_x)),
        "norm_deviation_max": max(deviations),
        "norm_deviation_per_conv": deviations,
        "attack": attack(model, data, bound),
        # Where the bound exceeds 1, the same attack inside the radii the package's claim (constant 1) gives.
        **({"attack_at_lipschitz_1": attack(model, data, 1.0)} if bound > 1 + LOOSE_BOUND else {}),
        "machine": machine(),
    }


def machine() -> str:
    threads = torch.get_num_threads()
    return f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, torch threads: {threads}"


# ----------------------------------------------------------------------------- the table


def results_table(root: pathlib.Path) -> str:
    """Markdown: one row per finished method (in :data:`METHODS` order), then those in progress or unavailable."""
    header = [
        "method",
        "convolution",
        "parameters",
        "s / epoch",
        "epochs",
        "clean",
        *(f"certified @ {r:g}" for r in RADII),
        "Lipschitz bound",
        "max ‖J(x)‖₂",
        "max \\|s - 1\\| over a conv's singular values s",
        "PGD: broken / attacked",
    ]
    timing_path = root / "step-times.json"
    timing = json.loads(timing_path.read_text()) if timing_path.exists() else None
    if timing is not None:
        header.insert(4, "s / epoch, side by side")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    notes = []
    for method in METHODS:
        folder = root / method
        if (folder / "summary.json").exists():
            s = json.loads((folder / "summary.json").read_text())
            cells = [
                method,
                s["convolution"],
                f"{s['parameters']:,}",
                f"{s['seconds_per_epoch']:.1f}",
                *([_side_by_side(timing, method, s["settings"])] if timing is not None else []),
                str(s["epochs"]),
                f"{s['test_accuracy']:.1%}",
                *(f"{s['test_certified'][f'{r:g}']:.1%}" for r in RADII),
                f"{s['lipschitz_bound']:.4f}" if s.get("bound") == BOUND else "-",
                f"{s['jacobian_norm_max']:.4f}",
                f"{s['norm_deviation_max']:.1e}",
                f"{s['attack']['broken_inside_radius']} / {s['attack']['attacked']}" if "attack" in s else "-",
            ]
            lines.append("| " + " | ".join(cells) + " |")
            if s.get("bound") != BOUND:
                notes.append(f"- {method}: certified with Lipschitz constant 1, not yet its exact bound (`--resume`)")
            elif s["lipschitz_bound"] > 1 + LOOSE_BOUND:
                claimed = " / ".join(f"{s['test_certified_at_lipschitz_1'][f'{r:g}']:.1%}" for r in RADII)
                broken = s.get("attack_at_lipschitz_1")
                found = (
                    f"; PGD broke {broken['broken_inside_radius']} of {broken['attacked']} such certificates"
                    if broken
                    else ""
                )
                notes.append(
                    f"- {method}: its layers left the orthogonal group in training (a convolution's singular "
                    f"values up to {s['norm_deviation_max']:.2f} from 1), so the network's bound is "
                    f"{s['lipschitz_bound']:.2f} and its certificates shrink by that factor; at Lipschitz constant "
                    f"1, as its package intends, it would claim {claimed}, which its exact bound does not "
                    f"support{found}."
                )
        elif (folder / "metrics.csv").exists():
            with (folder / "metrics.csv").open() as handle:
                notes.append(f"- {method}: in progress, {sum(1 for _ in csv.DictReader(handle))} epochs done")
        else:
            reason = unavailable_reason(method)
            notes.append(f"- {reason}" if reason else f"- {method}: not run")
    first = next((json.loads(p.read_text()) for p in sorted(root.glob("*/summary.json"))), None)
    context = []
    if timing is not None:
        context = [
            "s / epoch: the run's own training seconds per epoch (a shared machine, methods trained at different "
            "times); side by side: the median of one training step of every method timed in interleaved rounds of "
            f"one process (`--time-steps`, with the runs' settings; '-' otherwise), times {timing['steps_per_epoch']} "
            f"steps per epoch; machine: {timing['machine']}.",
            "",
        ]
    if first is not None:
        context += [
            f"Test images: {first['test_images']:,}; certified radii in [0, 1]-pixel L2 units with each network's "
            "Lipschitz bound: the product of its layers' largest singular values, every singular value of each "
            "convolution computed exactly in the Fourier basis (`projunn.robust.conv_singular_values`; the "
            "bound is 1 to rounding for an exact isometry).",
            f"‖J‖ over {first['jacobian_images']} test images; PGD: of the first {ATTACK_IMAGES} test "
            f"images, those certified, attacked just inside their radius ({ATTACK_STEPS} steps, "
            f"{ATTACK_RESTARTS} random restarts), and how many it misclassified there; machine: {first['machine']}.",
            "",
        ]
    return "\n".join(context + lines + (["", *notes] if notes else [])) + "\n"


def _side_by_side(timing: dict[str, Any], method: str, settings: dict[str, Any]) -> str:
    """The method's median step time times the steps of an epoch, where it was timed with the run's settings."""
    seconds = timing["seconds_per_step"].get(method)
    if seconds is None or timing.get("settings") != settings:
        return "-"
    return f"{seconds * timing['steps_per_epoch']:.1f}"


# ----------------------------------------------------------------------------- command line


@contextlib.contextmanager
def stop_requests() -> Iterator[Callable[[], bool]]:
    """While inside, SIGINT and SIGTERM only ask for a stop at the next step boundary; yields whether one was
    asked for. The previous handlers are restored on leaving."""
    requested: list[int] = []

    def request(signum, frame) -> None:
        requested.append(signum)
        print(f"signal {signum}: stopping after this step", file=sys.stderr)

    previous = {s: signal.signal(s, request) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield lambda: bool(requested)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    defaults = Settings()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    for name in ("epochs", "channels", "blocks", "stages", "batch_size", "rank", "seed"):
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(defaults, name))
    for name in ("lr", "margin", "temperature"):
        parser.add_argument("--" + name, type=float, default=getattr(defaults, name))
    parser.add_argument("--limit-train", type=int, default=None, help="train on N images (smoke tests)")
    parser.add_argument("--data", choices=("mnist", "synthetic"), default="mnist")
    parser.add_argument("--max-steps", type=int, default=None, help="end each method's sitting after N steps")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out-root", type=pathlib.Path, default=ROOT)
    parser.add_argument("--resume", action="store_true", help="continue the runs in --out-root")
    parser.add_argument("--table-only", action="store_true", help="rebuild <out-root>/results.md and print it")
    parser.add_argument(
        "--time-steps",
        type=_positive,
        metavar="REPEATS",
        help="only time every method's training step side by side (at most REPEATS rounds): <out-root>/step-times.json",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.time_steps is not None:
        settings = Settings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Settings)})
        data = load_data(settings)
        seconds = time_steps(settings, data, args.methods, repeats=args.time_steps)
        per_epoch = math.ceil(len(data.train[0]) / settings.batch_size)
        timing = {
            "seconds_per_step": seconds,
            "steps_per_epoch": per_epoch,
            "settings": dataclasses.asdict(settings),
            "machine": machine(),
        }
        args.out_root.mkdir(parents=True, exist_ok=True)
        (args.out_root / "step-times.json").write_text(json.dumps(timing, indent=2) + "\n")
        print(json.dumps(timing, indent=2))
    elif not args.table_only:
        settings = Settings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Settings)})
        with stop_requests() as stop:
            data = load_data(settings)
            for method in args.methods:
                reason = unavailable_reason(method)
                if reason is not None:
                    print(f"skipped {reason}")
                    continue
                folder = args.out_root / method
                try:
                    train_method(
                        method,
                        settings,
                        data,
                        folder,
                        resume=args.resume,
                        max_steps=args.max_steps,
                        stop=stop,
                    )
                except UnavailableError as reason:
                    print(f"skipped {reason}")
                    continue
                except ValueError as error:
                    print(f"lipschitz_peers: {error}", file=sys.stderr)
                    return 2
                if stop():
                    return 1
    args.out_root.mkdir(parents=True, exist_ok=True)
    table = results_table(args.out_root)
    (args.out_root / "results.md").write_text(table)
    print(table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
