"""The settings of a run: :class:`TrainConfig`, how unset ones are filled, and which may change on resume.

Messages name a setting by its field in backquotes (`` `lr` ``); the command
line shows those as its flags (``--lr``), so the wording of options lives in
:mod:`projunn.harness.cli` alone.
"""

from __future__ import annotations

import pathlib
from dataclasses import asdict, dataclass, fields
from typing import Any, get_args

import torch

from ..functional import Sketch
from .tasks import TASK_OPTIONS, get_task

__all__ = [
    "AUTOCAST",
    "METHODS",
    "OPTIMIZERS",
    "RunDivergedError",
    "RunError",
    "TrainConfig",
    "learning_rate_factor",
    "resolve",
    "resumed_config",
    "stored_settings",
]

#: Training methods: projUNN-T/-D, torch's orthogonal parametrisation (expm, cayley), unconstrained.
METHODS = ("t", "d", "expm", "cayley", "none")
OPTIMIZERS = ("rmsprop", "adam", "sgd")
#: ``autocast`` choices: the precision of forward and backward (parameters stay in full precision).
AUTOCAST = {"bfloat16": torch.bfloat16, "float16": torch.float16}
#: Defaults of every task, under the task's own.
_GENERAL_DEFAULTS = dict(sketch="lsi", lr_decay=1.0, lr_decay_every=None)
# Settings that may differ when resuming a run (they do not change the result).
_RESUMABLE = {
    "steps",
    "epochs",
    "max_minutes",
    "max_nonfinite",
    "resume",
    "overwrite",
    "quiet",
    "device",
    "fsdp",  # how the weights are laid out over processes; the checkpoint is the same either way
    "out",
    "data_dir",
    "tensorboard",  # logging only: a resumed run may start or stop writing event files
}


class RunError(ValueError):
    """A run cannot start as asked (bad settings, output folder, checkpoint); the message says why."""


class RunDivergedError(RunError):
    """The loss stayed non-finite for ``max_nonfinite`` steps in a row; the last finite checkpoint is kept."""


@dataclass(frozen=True)
class TrainConfig:
    """Settings of ``projunn train``; None means "the task's default".

    ``drift_tolerance`` is ProjUNN's (``"auto"``, a positive number, or None for no control),
    checked by ProjUNN like its other arguments (the command line checks its flag).
    ProjUNN's ``on_nonfinite`` is left at "skip": the run's policy for skipped updates is
    ``max_nonfinite`` (``1`` stops at the first, keeping the last finite checkpoint, where
    "raise" would end the run without one).
    """

    task: str
    method: str = "t"
    rank: int = 1
    sketch: str | None = None
    hidden: int | None = None
    seq_len: int | None = None
    model: str | None = None
    depth: int | None = None
    channels: int | None = None
    steps: int | None = None
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    unitary_lr: float | None = None
    unitary_lr_divider: float | None = None
    lr_decay: float | None = None
    lr_decay_every: int | None = None
    optimizer: str | None = None
    init: str | None = None
    nonlinearity: str | None = None
    input_init: str | None = None
    complex: bool = False
    eval_every: int | None = None
    eval_limit: int | None = None
    max_minutes: float | None = None
    max_nonfinite: int = 20
    reorthogonalize_every: int = 0
    drift_tolerance: float | str | None = "auto"
    autocast: str | None = None
    permutation_seed: int = 0
    seed: int = 0
    device: str = "auto"
    fsdp: bool = False
    data_dir: str | None = None
    preset: str | None = None
    out: str | None = None
    resume: bool = False
    overwrite: bool = False
    quiet: bool = False
    tensorboard: bool = False


def _check_choice(name: str, value: Any, choices) -> None:
    if value not in choices:
        raise RunError(f"`{name}` must be one of {', '.join(c for c in choices if c is not None)}; got {value!r}")


def resolve(config: TrainConfig) -> TrainConfig:
    """Fill unset settings: explicit values, then ``preset="paper"``, then the task's defaults.

    Raises:
        RunError: a setting the task does not take, a value outside its choices, or one
            that contradicts the preset.
    """
    task = get_task(config.task)
    _check_choice("method", config.method, METHODS)
    _check_choice("sketch", config.sketch, (None, *get_args(Sketch)))
    _check_choice("preset", config.preset, (None, "paper"))
    _check_task_options(task, config)
    if config.unitary_lr is not None and config.unitary_lr_divider is not None:
        raise RunError("give `unitary_lr` or `unitary_lr_divider`, not both")
    if config.preset == "paper":
        _check_preset_agreement(task, config)
    layers = {**_GENERAL_DEFAULTS, **task.defaults, **(task.paper if config.preset == "paper" else {})}
    values = {f.name: getattr(config, f.name) for f in fields(config)}
    for key, value in layers.items():
        if values.get(key) is None:
            values[key] = value
    if task.model_defaults:
        _fill_model_defaults(task, config, values)
    _check_choice("autocast", values["autocast"], (None, *AUTOCAST))
    _check_choice("optimizer", values["optimizer"], OPTIMIZERS)
    if values["unitary_lr"] is None:
        values["unitary_lr"] = values["lr"] / values["unitary_lr_divider"]
        values["unitary_lr_divider"] = None  # recorded as the resulting unitary_lr
    return TrainConfig(**values)


def _check_task_options(task, config: TrainConfig) -> None:
    """Options that mean nothing for this task are refused rather than silently ignored."""
    for key in TASK_OPTIONS:
        given = getattr(config, key)
        if given is None or given is False or key in task.options:
            continue
        if key == "epochs":
            raise RunError(f"`epochs` applies to the MNIST and image tasks; the {task.name} task counts `steps`")
        raise RunError(f"`{key}` does not apply to the {task.name} task")
    if config.init is not None and config.init not in task.inits:
        raise RunError(f"`init` for the {task.name} task must be one of {', '.join(task.inits)}; got {config.init!r}")


def _check_preset_agreement(task, config: TrainConfig) -> None:
    """``preset="paper"`` fixes the authors' settings: an explicit option may only repeat them.

    Options the paper itself varies (``task.paper_free``, e.g. the delay T of
    the copy task) may be set freely, and so may those that do not change the
    trajectory (seed aside): the method, output, device, time budget.
    """
    for key, value in task.paper.items():
        given = getattr(config, key)
        if key in task.paper_free or given is None or given == value:
            continue
        raise RunError(f"`preset` paper sets `{key}` {value} for the {task.name} task; `{key}` {given} contradicts it")
    if config.unitary_lr is not None and "unitary_lr_divider" in task.paper:
        raise RunError(
            f"`preset` paper sets `unitary_lr_divider` {task.paper['unitary_lr_divider']} for the {task.name} "
            f"task; `unitary_lr` {config.unitary_lr} contradicts it"
        )


def _fill_model_defaults(task, config: TrainConfig, values: dict) -> None:
    """Settings that depend on the chosen ``model`` (image tasks: cnn or resnet9)."""
    model = values["model"]
    _check_choice("model", model, tuple(task.model_defaults))
    defaults = task.model_defaults[model]
    for key in sorted(set().union(*task.model_defaults.values())):
        if key not in defaults:
            if getattr(config, key) is not None:
                raise RunError(f"`{key}` does not apply to `model` {model}")
            values[key] = None  # a preset's value for another model
        elif values[key] is None:
            values[key] = defaults[key]


def learning_rate_factor(config: TrainConfig, step: int) -> float:
    """Step decay: lr x ``lr_decay`` every ``lr_decay_every`` steps (a pure function of the step)."""
    if not config.lr_decay_every or config.lr_decay in (None, 1.0):
        return 1.0
    return config.lr_decay ** (step // config.lr_decay_every)


def stored_settings(config: TrainConfig) -> dict[str, Any]:
    """The settings for config.json and the checkpoint: nothing machine-specific, so a run folder can move.

    ``out`` is left out: it is the folder the file is in (``resume`` with ``out`` says where that is now).
    """
    return {key: value for key, value in asdict(config).items() if key != "out"}


def resumed_config(config: TrainConfig, saved: dict[str, Any], out: pathlib.Path) -> TrainConfig:
    """The saved run's settings; options given now must agree with them, except the resumable ones."""
    try:
        stored = TrainConfig(**saved)
    except TypeError as error:
        raise RunError(f"the run in {out} was written by another version of projunn ({error})") from error
    if config.task != stored.task:
        raise RunError(f"`resume`: the run in {out} is a {stored.task} run, not {config.task}")
    defaults = TrainConfig(task=config.task)
    merged = {}
    for f in fields(TrainConfig):
        given, default, kept = getattr(config, f.name), getattr(defaults, f.name), getattr(stored, f.name)
        if f.name in _RESUMABLE:
            merged[f.name] = given if given != default else kept
        elif given not in (default, kept):
            raise RunError(f"`resume`: the run in {out} has {f.name.replace('_', '-')}={kept!r}, not {given!r}")
        else:
            merged[f.name] = kept
    merged["fsdp"] = config.fsdp  # this invocation's layout over processes, whatever the saved run used
    return TrainConfig(**{**merged, "resume": True, "overwrite": False, "out": str(out)})
