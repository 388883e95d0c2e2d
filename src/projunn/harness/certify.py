"""``projunn certify RUN``: certified accuracy of a trained Lipschitz model, and an attack that checks it.

The run folder's checkpoint is loaded into the model its config builds; its test
set is scored as at the end of training (:meth:`ImageTask.test`), with the
Lipschitz bound composed from the weights (:func:`projunn.robust.lipschitz_bound`).
``attack=N`` then runs an L2 PGD attack (:func:`projunn.robust.pgd_l2`) on the
first N test images, each at just under its own certified radius: a sound
certificate leaves it nothing to find. The result is written to ``RUN/certify.json``.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from dataclasses import replace
from typing import Any

import torch

from ..robust import certified_radius, pgd_l2
from ._build import build, pick_device
from ._config import DEVICES, RunError, TrainConfig, folder_name, non_negative_int
from ._folder import CHECKPOINT, read_checkpoint, write_json
from ._sharding import load_full_state
from .tasks import DatasetMissingError

__all__ = ["add_parser", "certify", "main"]


def certify(
    out: str | pathlib.Path, *, attack: int = 0, data_dir: str | None = None, device: str = "auto", log=print
) -> dict[str, Any]:
    """Score the run in ``out`` on its test set with certified radii; attack ``attack`` test images.

    ``device``: where to score (``auto``: CUDA when there is one), whatever the run trained on.

    Returns:
        the test scores (``test_accuracy``, ``test_lipschitz_bound``, ``test_certified_accuracy``
        {radius: fraction}, ...) and, with an attack, ``attacked`` (images certified and attacked)
        and ``broken_inside_radius`` (how many the attack misclassified inside their radius: 0 if sound).

    Raises:
        RunError: no readable checkpoint, or not a ``--model lipschitz`` run.
    """
    out = pathlib.Path(out)
    if not (out / CHECKPOINT).is_file():
        raise RunError(f"no {CHECKPOINT} in {out}: not a run folder, or its run stopped before its first checkpoint")
    checkpoint = read_checkpoint(out / CHECKPOINT)
    config = TrainConfig(**checkpoint["config"])
    if config.model != "lipschitz":
        raise RunError(f"the run in {out} trains --model {config.model}; only --model lipschitz runs have radii")
    config = replace(config, data_dir=data_dir or config.data_dir, out=str(out), device=device)
    built = build(config, pick_device(device))
    load_full_state(built.model, built.optimizer, checkpoint["model"], checkpoint["optimizer"])
    model, task = built.model, built.data
    task.train_sample = None  # the test set only: the training sample is the end of training's business
    result: dict[str, Any] = {"step": checkpoint["step"], **task.test(model)}
    if attack:
        result |= _attack(model, task, attack, result["test_lipschitz_bound"])
    write_json(out / "certify.json", result)
    accuracy = ", ".join(f"{radius}: {value:.4f}" for radius, value in result["test_certified_accuracy"].items())
    log(f"step {result['step']}: test accuracy {result['test_accuracy']:.4f}; certified at {accuracy}")
    if attack:
        log(f"attack on {result['attacked']} certified images: {result['broken_inside_radius']} broken inside")
    return result


#: What the attack keeps clear of a radius's edge, in pixel units: far above what float32 rounding of
#: the logits (~1e-6) moves a radius by, so a sound certificate is never reported broken by rounding.
_ATTACK_SLACK = 1e-4


def _attack(model: torch.nn.Module, task, count: int, bound: float) -> dict[str, int]:
    """PGD on those of the first ``count`` test images that have a certificate, each just inside its radius."""
    images, labels = (part[:count] for part in task.splits["test"])
    x, y = task.inputs(images), task.to_device(labels).long()
    with torch.no_grad():  # the model has no batch statistics: train and eval mode agree
        radius = certified_radius(model(x), y, bound)
    certified = radius > 2 * _ATTACK_SLACK
    if not certified.any():  # nothing to attack: no image of these has a certificate
        return {"attacked": 0, "broken_inside_radius": 0}
    generator = torch.Generator().manual_seed(0)
    inside = (0.999 * radius[certified]).clamp_max(radius[certified] - _ATTACK_SLACK)
    _, fooled = pgd_l2(model, x[certified], y[certified], inside, generator=generator)
    return {"attacked": int(certified.sum()), "broken_inside_radius": int(fooled.sum())}


def add_parser(commands) -> None:
    """``projunn certify``'s subcommand parser."""
    parser = commands.add_parser(
        "certify",
        help="certified test accuracy of a --model lipschitz run, checked by an attack",
        description="Score a --model lipschitz run's final weights on its test set with certified L2 radii "
        "(margin / (sqrt(2) L), L composed from the weights), optionally attack test images inside their "
        "radii, and write RUN/certify.json.",
    )
    parser.add_argument("run", type=folder_name, metavar="RUN", help="the run folder (holding checkpoint.pt)")
    parser.add_argument(
        "--attack", type=non_negative_int, default=0, help="L2 PGD on this many test images (default 0: none)"
    )
    parser.add_argument("--data-dir", help="where the data set is, if not where the run found it")
    parser.add_argument("--device", choices=DEVICES, default="auto", help="where to score (default auto: cuda if any)")


def main(args: argparse.Namespace) -> int:
    """Run ``projunn certify``; 0 done (an attack that broke a certificate is reported, and exits 1), 2 a bad run."""
    try:
        result = certify(args.run, attack=args.attack, data_dir=args.data_dir, device=args.device)
    except (RunError, DatasetMissingError) as error:
        print(f"projunn certify: error: {error}", file=sys.stderr)
        return 2
    return 1 if result.get("broken_inside_radius") else 0
