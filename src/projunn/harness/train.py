"""One generic training loop behind ``projunn train``.

A run writes into its output folder:

- ``config.json``: the resolved settings;
- ``metrics.csv``: one row per evaluation (step, seconds, train/eval loss,
  eval accuracy, max unitarity error of the recurrent/unitary matrices);
- ``checkpoint.pt``: model, optimiser (with projUNN state), step, history;
  written to a temporary file and renamed, so an interrupted write never
  replaces a good checkpoint with a broken one;
- ``summary.json`` and ``curves.png`` at the end (also after Ctrl-C).

Batches are pure functions of (seed, step) (see :mod:`projunn.harness.tasks`), so
``--resume`` continues to exactly the weights an uninterrupted run reaches.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import pathlib
import pickle
import signal
import struct
import sys
import threading
import time
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch.nn.utils import parametrizations, parametrize

from ..functional import SKETCHES, unitarity_error
from ..optim import ProjUNN
from ..optim._groups import unitary_slots
from ._distributed import Replicas, start_replicas
from ._files import (
    LOCK,
    FolderBusyError,
    atomic_write,
    describe_os_error,
    lock_folder,
    make_new_folder,
    unlock_folder,
)
from ._loggers import open_loggers
from ._memory import available_bytes, estimate_bytes, format_bytes, size_options
from .tasks import DatasetMissingError, get_task

__all__ = ["CHECKPOINT", "METHODS", "OPTIMIZERS", "RunDivergedError", "RunError", "TrainConfig", "train"]

#: ``--method`` choices: projUNN-T/-D, torch's orthogonal parametrisation, unconstrained.
METHODS = ("t", "d", "expm", "cayley", "none")
OPTIMIZERS = ("rmsprop", "adam", "sgd")
CHECKPOINT = "checkpoint.pt"
_CHECKPOINT_FORMAT = "projunn-run/1"
_CHECKPOINT_KEYS = ("config", "step", "seconds", "history", "model", "optimizer")  # needed to continue a run
#: What a run writes into its folder (--overwrite removes exactly these).
_RUN_FILES = ("config.json", "metrics.csv", "summary.json", "curves.png", CHECKPOINT)
_METRIC_FIELDS = (
    "step",
    "seconds",
    "train_loss",
    "eval_loss",
    "eval_accuracy",
    "eval_baseline",
    "max_unitarity_error",
)
# Settings that may differ when resuming a run (they do not change the result).
_AUTOCAST = {"bfloat16": torch.bfloat16, "float16": torch.float16}
_RESUMABLE = {
    "steps",
    "epochs",
    "max_minutes",
    "max_nonfinite",
    "resume",
    "overwrite",
    "quiet",
    "device",
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
    """Settings of ``projunn train``; None means "the task's default"."""

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
    autocast: str | None = None
    permutation_seed: int = 0
    seed: int = 0
    device: str = "auto"
    data_dir: str | None = None
    preset: str | None = None
    out: str | None = None
    resume: bool = False
    overwrite: bool = False
    quiet: bool = False
    tensorboard: bool = False


def resolve(config: TrainConfig) -> TrainConfig:
    """Fill unset settings: explicit values, then ``--preset paper``, then the task's defaults."""
    task = get_task(config.task)
    if config.method not in METHODS:
        raise RunError(f"--method must be one of {', '.join(METHODS)}; got {config.method!r}")
    if config.sketch not in (None, *SKETCHES):
        raise RunError(f"--sketch must be one of {', '.join(SKETCHES)}; got {config.sketch!r}")
    if config.preset not in (None, "paper"):
        raise RunError(f"--preset must be 'paper'; got {config.preset!r}")
    # Options that mean nothing for this task are refused rather than silently ignored.
    flags = {
        "hidden": "--hidden",
        "seq_len": "--seq-len",
        "model": "--model",
        "depth": "--depth",
        "channels": "--channels",
        "nonlinearity": "--nonlinearity",
        "epochs": "--epochs",
        "eval_limit": "--eval-limit",
    }
    for key, flag in flags.items():
        if getattr(config, key) is not None and key not in task.defaults:
            if key == "epochs":
                raise RunError(f"--epochs applies to the MNIST and image tasks; the {task.name} task counts --steps")
            raise RunError(f"{flag} does not apply to the {task.name} task")
    if config.complex and "nonlinearity" not in task.defaults:
        raise RunError(f"--complex does not apply to the {task.name} task")
    if config.init is not None and config.init not in task.inits:
        raise RunError(f"--init for the {task.name} task must be one of {', '.join(task.inits)}; got {config.init!r}")
    if config.unitary_lr is not None and config.unitary_lr_divider is not None:
        raise RunError("give --unitary-lr or --unitary-lr-divider, not both")
    if config.preset == "paper":
        _check_preset_agreement(task, config)
    layers = {**_GENERAL_DEFAULTS, **task.defaults, **(task.paper if config.preset == "paper" else {})}
    values = {f.name: getattr(config, f.name) for f in fields(config)}
    for key, value in layers.items():
        if values.get(key) is None:
            values[key] = value
    if task.model_defaults:
        _fill_model_defaults(task, config, values)
    if values["autocast"] not in (None, *_AUTOCAST):
        raise RunError(f"--autocast must be one of {', '.join(_AUTOCAST)}; got {values['autocast']!r}")
    if values["optimizer"] not in OPTIMIZERS:
        raise RunError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}; got {values['optimizer']!r}")
    if values["unitary_lr"] is None:
        values["unitary_lr"] = values["lr"] / values["unitary_lr_divider"]
        values["unitary_lr_divider"] = None  # recorded as the resulting unitary_lr
    return TrainConfig(**values)


#: Defaults of every task, under the task's own.
_GENERAL_DEFAULTS = dict(sketch="lsi", lr_decay=1.0, lr_decay_every=None)


def _check_preset_agreement(task, config: TrainConfig) -> None:
    """``--preset paper`` fixes the authors' settings: an explicit option may only repeat them.

    Options the paper itself varies (``task.paper_free``, e.g. the delay T of
    the copy task) may be set freely, and so may those that do not change the
    trajectory (seed aside): the method, output, device, time budget.
    """
    for key, value in task.paper.items():
        given = getattr(config, key)
        if key in task.paper_free or given is None or given == value:
            continue
        flag = "--" + key.replace("_", "-")
        raise RunError(f"--preset paper sets {flag} {value} for the {task.name} task; {flag} {given} contradicts it")
    if config.unitary_lr is not None and "unitary_lr_divider" in task.paper:
        raise RunError(
            f"--preset paper sets --unitary-lr-divider {task.paper['unitary_lr_divider']} for the {task.name} "
            f"task; --unitary-lr {config.unitary_lr} contradicts it"
        )


def _learning_rate_factor(config: TrainConfig, step: int) -> float:
    """Step decay: lr x ``lr_decay`` every ``lr_decay_every`` steps (a pure function of the step)."""
    if not config.lr_decay_every or config.lr_decay in (None, 1.0):
        return 1.0
    return config.lr_decay ** (step // config.lr_decay_every)


def _set_learning_rates(optimizer: ProjUNN, config: TrainConfig, step: int) -> None:
    factor = _learning_rate_factor(config, step)
    for group in optimizer.param_groups:
        # setdefault: checkpoints written before schedules existed carry no initial_lr.
        group["lr"] = group.setdefault("initial_lr", group["lr"]) * factor


def _fill_model_defaults(task, config: TrainConfig, values: dict) -> None:
    """Settings that depend on the chosen ``--model`` (image tasks: cnn or resnet9)."""
    model = values["model"]
    if model not in task.model_defaults:
        raise RunError(f"--model must be one of {', '.join(task.model_defaults)}; got {model!r}")
    defaults = task.model_defaults[model]
    for key in sorted(set().union(*task.model_defaults.values())):
        if key not in defaults:
            if getattr(config, key) is not None:
                raise RunError(f"--{key} does not apply to --model {model}")
            values[key] = None  # a preset's value for another model
        elif values[key] is None:
            values[key] = defaults[key]


# -- building the run -------------------------------------------------------------------------


def _constrain(model: torch.nn.Module, method: str) -> None:
    """For ``expm``/``cayley`` re-express the unitary weights with torch's orthogonal parametrisation."""
    if method in ("expm", "cayley"):
        orthogonal_map = {"expm": "matrix_exp", "cayley": "cayley"}[method]
        for _, module, name in unitary_slots(model):
            parametrizations.orthogonal(module, name, orthogonal_map=orthogonal_map)


def _build_optimizer(model: torch.nn.Module, config: TrainConfig) -> ProjUNN:
    unitary = []
    for _, module, name in unitary_slots(model):
        if parametrize.is_parametrized(module, name):
            unitary.append(module.parametrizations[name].original)
        else:
            unitary.append(module._parameters[name])
    unitary_ids = {id(p) for p in unitary}
    ordinary = [p for p in model.parameters() if id(p) not in unitary_ids]
    projected = config.method in ("t", "d")
    groups = [
        {"params": ordinary},
        {
            "params": unitary,
            "lr": config.unitary_lr,
            "unitary": True,
            "method": config.method if projected else "none",
            "rank": config.rank,
            "sketch": config.sketch,
        },
    ]
    groups = [g for g in groups if g["params"]]
    base = {
        "rmsprop": lambda: torch.optim.RMSprop(groups, lr=config.lr),
        "adam": lambda: torch.optim.Adam(groups, lr=config.lr),
        "sgd": lambda: torch.optim.SGD(groups, lr=config.lr, momentum=0.9),
    }[config.optimizer]()
    for group in base.param_groups:
        group["initial_lr"] = group["lr"]  # the schedule's reference; saved with the optimiser's state
    return ProjUNN(base, seed=config.seed, reorthogonalize_every=config.reorthogonalize_every)


def _check_fits(config: TrainConfig, device: torch.device, processes: int) -> None:
    """Refuse, before anything is allocated, settings the parameters' dtype or the device cannot hold."""
    largest = torch.finfo(torch.get_default_dtype()).max
    for flag, value in (("--lr", config.lr), ("--unitary-lr", config.unitary_lr)):
        if value > largest:  # torch cannot even multiply a gradient by it
            raise RunError(f"{flag} {value:g} exceeds {largest:.4g}, the largest {torch.get_default_dtype()}")
    needed, available = estimate_bytes(config, processes), available_bytes(device)
    if available is not None and needed > available:
        raise RunError(
            f"this run needs about {format_bytes(needed)} of memory (weights, optimiser state and one batch's "
            f"activations), more than the {format_bytes(available)} available on {device.type}; "
            f"reduce {size_options(config)}"
        )


def _check_rank(config: TrainConfig, model: torch.nn.Module) -> None:
    """A projUNN rank above the size of a unitary matrix would be cut silently: refuse it, naming the maximum."""
    if config.method not in ("t", "d"):
        return
    sizes = [min(getattr(m, name).shape[-2:]) for _, m, name in unitary_slots(model)]
    if sizes and config.rank > min(sizes):
        raise RunError(f"--rank {config.rank} exceeds {min(sizes)}, the size of this model's smallest unitary matrix")


def _is_terminal(stream) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def _finite_weights(model: torch.nn.Module) -> bool:
    return all(torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point() or t.is_complex())


def _max_unitarity_error(model: torch.nn.Module) -> float:
    with torch.no_grad():
        weights = [getattr(m, name).detach() for _, m, name in unitary_slots(model)]
        errors = [unitarity_error(w).max().item() for w in weights if w.numel() > 0]
    return max(errors, default=0.0)


def _pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RunError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    if name.startswith("cuda:"):  # one GPU per replica under torchrun
        return torch.device(name)
    if name not in ("cpu", "cuda"):
        raise RunError(f"--device must be auto, cpu or cuda; got {name!r}")
    return torch.device(name)


# -- files ---------------------------------------------------------------------------------


def _stored_settings(config: TrainConfig) -> dict[str, Any]:
    """The settings for config.json and the checkpoint: nothing machine-specific, so a run folder can move.

    ``out`` is left out: it is the folder the file is in (``--resume --out`` says where that is now).
    """
    return {key: value for key, value in asdict(config).items() if key != "out"}


def _atomic_write(path: pathlib.Path, write) -> None:
    """:func:`atomic_write`, with a failure (disk full, no permission) as one line naming the file and the cause."""
    try:
        atomic_write(path, write)
    except OSError as error:
        raise RunError(f"cannot write {path}: {describe_os_error(error)}; the file there before is unchanged") from None


def _finite_or_none(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _write_json(path: pathlib.Path, data: dict[str, Any]) -> None:
    """Strict JSON: NaN/Inf (a diverged run) are written as null."""
    clean = {key: _finite_or_none(value) for key, value in data.items()}
    _atomic_write(path, lambda tmp: tmp.write_text(json.dumps(clean, indent=2, allow_nan=False) + "\n"))


def _write_metrics(path: pathlib.Path, history: list[dict[str, Any]]) -> None:
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=_METRIC_FIELDS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(history)

    _atomic_write(path, write)


def _out_dir(config: TrainConfig) -> pathlib.Path:
    """``--out``, or the default name ``runs/TASK-METHOD-TIME`` (made unique when the folder is claimed)."""
    return pathlib.Path(config.out or f"runs/{config.task}-{config.method}-{time.strftime('%Y%m%d-%H%M%S')}")


def _holds_run(out: pathlib.Path) -> bool:
    """Whether the folder holds anything but the lock and what a start killed before its first checkpoint left."""
    leftovers = {LOCK, "config.json"}
    return any(p.name not in leftovers and not p.name.startswith(".") for p in out.iterdir())


def _check_out_dir(out: pathlib.Path, config: TrainConfig) -> None:
    """Refuse an occupied folder unless resuming or overwriting; touch nothing."""
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out} is a file, not a folder")
    if not config.resume and not config.overwrite and out.is_dir() and _holds_run(out):
        raise RunError(f"{out} already holds a run; pass --resume to continue it or --overwrite to replace it")


@dataclass(frozen=True)
class _Claim:
    """A run folder this process writes into: its lock, and whether this start created the folder."""

    out: pathlib.Path
    lock: int
    created: bool


def _claim_out_dir(out: pathlib.Path, config: TrainConfig) -> _Claim:
    """Create (or open) the folder and take its lock, once everything else has been checked.

    A default name is made unique (``-2``, ``-3``, ...) by creating the folder
    atomically; a given ``--out`` is locked, so a second process aimed at it is
    refused, and checked again under the lock (clearing an old run with --overwrite).
    """
    try:
        if config.out is None:
            out, created = make_new_folder(out), True
        else:
            out.parent.mkdir(parents=True, exist_ok=True)
            try:
                out.mkdir()
                created = True
            except FileExistsError:
                created = False
        lock = lock_folder(out)
    except FolderBusyError:
        raise RunError(
            f"{out} is in use by another projunn process; wait for it to end or choose another --out"
        ) from None
    except OSError as error:
        raise RunError(f"cannot write to {out}: {describe_os_error(error)}") from None
    claim = _Claim(out, lock, created)
    try:
        _check_out_dir(out, config)  # again under the lock: another run may have finished here meanwhile
        if config.overwrite and not config.resume:
            for name in _RUN_FILES:
                (out / name).unlink(missing_ok=True)
        for stale in out.glob(".*.tmp-*"):  # left by a process killed while writing; never the current file
            stale.unlink(missing_ok=True)
    except OSError as error:
        _release(claim, failed_start=True)
        raise RunError(f"cannot write to {out}: {describe_os_error(error)}") from None
    except RunError:
        _release(claim, failed_start=True)
        raise
    return claim


def _release(claim: _Claim | None, *, failed_start: bool) -> None:
    """Unlock the folder (removing the lock file); after a start that never wrote a checkpoint, remove
    what it created.

    So a failed start leaves the folder as it found it (or no folder), which both
    a rerun and ``--resume`` of an earlier run accept.
    """
    if claim is None:
        return
    removing = failed_start and not (claim.out / CHECKPOINT).exists()
    if removing:
        for name in ("config.json", "metrics.csv"):
            (claim.out / name).unlink(missing_ok=True)
    unlock_folder(claim.out, claim.lock)
    if removing and claim.created:
        with contextlib.suppress(OSError):  # not empty: something else was put there meanwhile
            claim.out.rmdir()


def _load_failure(error: Exception) -> str:
    """Why torch.load failed, in a few words: its first sentence, or for a file that is no pickle torch
    accepts, just that (torch's own message advises ``weights_only=False``, i.e. running whatever a
    damaged or foreign file contains)."""
    text = str(error).strip()
    if "weights_only" in text:
        return "not a torch.save file"
    first = text.splitlines()[0] if text else type(error).__name__
    return first.split(". ")[0]


def _read_checkpoint(path: pathlib.Path) -> dict[str, Any]:
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise RunError(f"--resume: no {CHECKPOINT} in {path.parent}") from None
    except Exception as error:  # a truncated or foreign file: say so, load nothing
        raise RunError(
            f"{path} is not a readable projunn checkpoint; it may be truncated or damaged ({_load_failure(error)})"
        ) from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != _CHECKPOINT_FORMAT:
        raise RunError(f"{path} was not written by projunn train")
    missing = [key for key in _CHECKPOINT_KEYS if key not in checkpoint]
    if missing:
        raise RunError(f"{path} is not a complete projunn checkpoint: it has no {', '.join(map(repr, missing))} entry")
    return checkpoint


def _resumed_config(config: TrainConfig, saved: dict[str, Any], out: pathlib.Path) -> TrainConfig:
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
    return TrainConfig(**{**merged, "resume": True, "overwrite": False, "out": str(out)})


_MARKED_POINTS = 30
_UNITARITY_RANGE = (1e-8, 1e-2)  # the y range of the unitarity panel unless values fall outside it


def _plot(path: pathlib.Path, history: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    """Write curves.png: loss (with the baseline), unitarity error and, where there is one, accuracy."""
    import matplotlib.pyplot as plt

    fig = _figure(history, summary)
    _atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def _figure(history: list[dict[str, Any]], summary: dict[str, Any]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    steps = [row["step"] for row in history]
    # Markers while there are few points: a one-point line is invisible without one.
    points = {"marker": "o", "markersize": 3} if len(history) <= _MARKED_POINTS else {}
    has_accuracy = any(row.get("eval_accuracy") is not None for row in history)
    fig, axes = plt.subplots(1, 3 if has_accuracy else 2, figsize=(13 if has_accuracy else 9, 3.6))
    ax = axes[0]
    ax.plot(steps, [row["train_loss"] for row in history], label="train", **points)
    ax.plot(steps, [row["eval_loss"] for row in history], label="held out", **points)
    # The constant / memoryless predictor on the held-out set these curves are measured on.
    measured = [row.get("eval_baseline") for row in history if row.get("eval_baseline") is not None]
    baseline = measured[-1] if measured else summary.get("baseline_loss")
    if baseline is not None:
        ax.axhline(baseline, color="k", linestyle="--", linewidth=1, label="baseline (same set)")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title("loss")
    ax.legend()
    ax = axes[1]
    errors = [max(row["max_unitarity_error"], 1e-16) for row in history]
    ax.plot(steps, errors, color="tab:red", **points)
    # A fixed decade range, so rounding-level noise (1e-7..1e-6) stays a flat line near the floor
    # instead of being stretched into spikes; it widens only for values outside it.
    dtype = torch.get_default_dtype()
    ax.axhline(
        torch.finfo(dtype).eps, color="gray", linestyle="--", linewidth=1, label=f"{dtype} eps".replace("torch.", "")
    )
    ax.set_yscale("log")
    ax.set_ylim(min(_UNITARITY_RANGE[0], min(errors) / 3), max(_UNITARITY_RANGE[1], max(errors) * 3))
    ax.set_xlabel("step")
    ax.set_title(r"max $\|U^H U - I\|_F$")
    ax.legend(loc="upper right")
    if has_accuracy:
        ax = axes[2]
        ax.plot(steps, [row.get("eval_accuracy") for row in history], color="tab:green", **points)
        ax.set_ylim(-0.02, 1.04)  # a curve at 0 or 1 stays visible inside the frame
        ax.set_xlabel("step")
        ax.set_title("held-out accuracy")
    shown = [("T", "seq_len"), ("hidden", "hidden"), ("model", "model"), ("depth", "depth"), ("channels", "channels")]
    details = "".join(f", {label} {summary[key]}" for label, key in shown if summary.get(key) is not None)
    fig.suptitle(f"{summary['task']}{details}, method {summary['method']}", fontsize=10)
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps, not 0.96 ... 1.04 around one point
    fig.tight_layout()
    return fig


# -- the loop ------------------------------------------------------------------------------


def _build(config: TrainConfig, device: torch.device):
    """Data, model and optimiser, checked on a first batch; any failure becomes a one-line RunError."""
    task = get_task(config.task)
    try:
        task.prepare(config, device)
        model = task.build_model(config)
        _constrain(model, config.method)
        model.to(device)
        optimizer = _build_optimizer(model, config)
        task.batch(config, 0, device)  # batches are pure: this checks the settings, changes nothing
    except DatasetMissingError:
        raise
    except (ValueError, TypeError, OSError, struct.error, pickle.UnpicklingError) as error:
        raise RunError(f"{type(error).__name__}: {error}") from error
    return task, model, optimizer


def train(config: TrainConfig, *, log=print, loggers=()) -> dict[str, Any]:
    """Run (or resume) a training run; return its summary (also written to summary.json).

    The first Ctrl-C finishes the current step, saves a checkpoint and
    returns (``summary["interrupted"]``); a second one stops at once, keeping
    the last checkpoint, which was written at an evaluation.

    Under ``torchrun`` the run is data parallel (see :mod:`projunn.harness._distributed`):
    every replica trains on its slice of each global batch, and rank 0 alone
    logs and writes files. Each ``loggers`` entry gets every metrics.csv row as
    ``log_scalars(step, row)`` (see :mod:`projunn.harness._loggers`).

    Raises:
        RunError: bad settings, an occupied output folder, or an unusable checkpoint.
        DatasetMissingError: the task's data set is not installed.
    """
    replicas, device_name = start_replicas(config.device)
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(replicas.close)
        return _train(
            config, replicas, device_name, log if replicas.is_main else (lambda message: None), cleanup, loggers
        )


def _train(
    config: TrainConfig, replicas: Replicas, device_name: str, log, cleanup: contextlib.ExitStack, loggers=()
) -> dict[str, Any]:
    from tqdm.auto import tqdm

    checkpoint = None
    if config.resume and config.overwrite:
        raise RunError("--resume continues the run in --out and --overwrite replaces it: give one of them")
    if config.resume:
        if config.out is None:
            raise RunError("--resume needs --out, the folder of the run to continue")
        out = pathlib.Path(config.out)
        checkpoint = _read_checkpoint(out / CHECKPOINT)
        config = _resumed_config(config, checkpoint["config"], out)
    else:
        config = resolve(config)
        out = _out_dir(config)
    if config.batch_size % replicas.world:
        raise RunError(f"--batch-size {config.batch_size} must be divisible by the {replicas.world} processes")
    if config.out is not None:  # a default name is made unique instead
        replicas.on_main(lambda: _check_out_dir(out, config))
    device = _pick_device(device_name)
    _check_fits(config, device, replicas.world)
    torch.manual_seed(config.seed)  # the same model on every replica
    task, model, optimizer = _build(config, device)
    _check_rank(config, model)
    # Forward and backward go through DDP (gradients averaged over replicas);
    # evaluation and checkpoints use the module itself, identical everywhere.
    trained = torch.nn.parallel.DistributedDataParallel(model) if replicas.distributed else model
    total = task.total_steps(config)
    step, seconds, history, nonfinite_losses = 0, 0.0, [], 0
    failing = 0  # steps in a row with a non-finite loss or a skipped update
    window_loss, window_count = 0.0, 0
    if checkpoint is not None:
        try:
            model.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
        except (RuntimeError, ValueError, KeyError) as error:
            raise RunError(f"the checkpoint in {out} does not fit this model ({error})") from error
        step, seconds, history = checkpoint["step"], checkpoint["seconds"], checkpoint["history"]
        nonfinite_losses = checkpoint.get("nonfinite_losses", 0)
        failing = checkpoint.get("failing", 0)
        window_loss, window_count = checkpoint.get("window", (0.0, 0))
        if checkpoint.get("device", device.type) != device.type:
            log(f"note: the run was on {checkpoint['device']}, now on {device.type}; the result may differ slightly")
    claim = replicas.on_main(lambda: _claim_out_dir(out, config))
    if replicas.is_main:  # released however the run ends; a failed start removes what it created
        cleanup.push(
            lambda kind, error, trace: _release(
                claim, failed_start=kind is not None and not issubclass(kind, RunDivergedError)
            )
        )
    out = claim.out
    loggers = open_loggers(config, out, cleanup, loggers) if replicas.is_main else []
    replicas.on_main(lambda: _write_json(out / "config.json", _stored_settings(config)))
    cached = parametrize.cached if config.method in ("expm", "cayley") else contextlib.nullcontext
    # Half-precision compute; parameters, unitary ones included, stay in full precision (the master copy).
    low_precision = (
        (lambda: torch.autocast(device.type, dtype=_AUTOCAST[config.autocast]))
        if config.autocast
        else contextlib.nullcontext
    )

    saved_step = step if checkpoint is not None else None

    def save_checkpoint():
        nonlocal saved_step
        if not replicas.is_main or not _finite_weights(model):
            return
        state = {
            "format": _CHECKPOINT_FORMAT,
            "config": _stored_settings(config),
            "device": device.type,
            "step": step,
            "seconds": seconds,
            "history": history,
            "window": (window_loss, window_count),
            "nonfinite_losses": nonfinite_losses,
            "failing": failing,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
        }
        _atomic_write(out / CHECKPOINT, lambda tmp: torch.save(state, tmp))
        saved_step = step

    stop_requested = []

    def request_stop(signum, frame):
        if stop_requested:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        stop_requested.append(signum)
        log("stopping after this step (Ctrl-C again to stop at once)")

    in_main_thread = threading.current_thread() is threading.main_thread()
    previous_handler = signal.signal(signal.SIGINT, request_stop) if in_main_thread else None
    best = min((row["eval_loss"] for row in history if row["eval_loss"] is not None), default=math.inf)
    interrupted = diverged = False
    # A bar only where someone watches it redraw: in a log file each redraw would be another line.
    lines = config.quiet or not _is_terminal(sys.stderr)
    bar = tqdm(
        total=total,
        initial=step,
        disable=lines or not replicas.is_main,
        unit="step",
        desc=f"{task.name}/{config.method}",
    )
    started = time.perf_counter() - seconds  # the seconds column continues across resumes
    budget_started = time.perf_counter()  # --max-minutes counts this invocation only
    try:
        while step < total:
            x, y = task.batch(config, step, device)
            with cached(), low_precision():
                loss, _ = task.loss(trained, replicas.shard(x), replicas.shard(y))
            global_loss = replicas.mean(loss.detach())  # every replica skips, or none does
            if torch.isfinite(global_loss):
                skipped = optimizer.skipped_steps
                loss.backward()
                _set_learning_rates(optimizer, config, step)
                optimizer.step()
                window_loss += global_loss.item()
                window_count += 1
                failing = failing + 1 if optimizer.skipped_steps > skipped else 0
            else:
                nonfinite_losses += 1
                failing += 1
            optimizer.zero_grad()
            step += 1
            bar.update(1)
            if failing >= config.max_nonfinite:
                diverged = True
                break
            out_of_time = (
                config.max_minutes is not None and time.perf_counter() - budget_started > 60 * config.max_minutes
            )
            # Replicas stop at the same step, whichever of them ran out of time or was interrupted.
            out_of_time, stop = replicas.any(out_of_time, bool(stop_requested), device=device)
            if step % config.eval_every == 0 or step == total or out_of_time:
                seconds = time.perf_counter() - started
                with torch.no_grad(), cached():
                    scores = task.evaluate(model, config, device)
                row = {
                    "step": step,
                    "seconds": round(seconds, 3),
                    "train_loss": window_loss / window_count if window_count else None,
                    "eval_loss": _finite_or_none(scores["eval_loss"]),
                    "eval_accuracy": scores.get("eval_accuracy"),
                    # The constant / memoryless predictor's loss on the same held-out set.
                    "eval_baseline": scores.get("eval_baseline"),
                    "max_unitarity_error": _max_unitarity_error(model),
                }
                window_loss, window_count = 0.0, 0
                history.append(row)
                if row["eval_loss"] is not None:
                    best = min(best, row["eval_loss"])
                if replicas.is_main:
                    _write_metrics(out / "metrics.csv", history)
                    for logger in loggers:
                        logger.log_scalars(step, row)
                if row["eval_loss"] is not None:  # a non-finite state never replaces the last good checkpoint
                    save_checkpoint()
                postfix = {"loss": f"{scores['eval_loss']:.4g}", "best": f"{best:.4g}"}
                if row["eval_accuracy"] is not None:
                    postfix["acc"] = f"{row['eval_accuracy']:.3f}"
                postfix["unitarity"] = f"{row['max_unitarity_error']:.1e}"
                bar.set_postfix(postfix)
                if lines:
                    rate = step / max(seconds, 1e-9)
                    log(
                        f"step {step}/{total} "
                        + " ".join(f"{k} {v}" for k, v in postfix.items())
                        + f" {rate:.1f} step/s"
                    )
                if out_of_time:
                    log(f"time budget of {config.max_minutes} min reached at step {step}")
                    break
            if stop:
                # A clean step boundary: the checkpoint continues exactly.
                interrupted = True
                seconds = time.perf_counter() - started
                save_checkpoint()
                log(f"interrupted at step {step}; checkpoint saved in {out} (continue with --resume)")
                break
    except KeyboardInterrupt:
        interrupted = True
        step = history[-1]["step"] if history else 0
        log(f"stopped; the checkpoint of step {step} in {out} is kept (continue with --resume)")
    finally:
        bar.close()
        if previous_handler is not None:
            signal.signal(signal.SIGINT, previous_handler)

    final = {}
    if not interrupted and not diverged:
        with torch.no_grad(), cached():
            final = task.test(model, config, device)
    last = history[-1] if history else {}
    accuracy = final.get("test_accuracy", final.get("eval_accuracy", last.get("eval_accuracy")))
    summary = {
        "task": task.name,
        "method": config.method,
        "steps": step,
        "final_loss": final.get("test_loss", final.get("eval_loss", last.get("eval_loss"))),
        "best_loss": best if math.isfinite(best) else None,
        "baseline_loss": final.get("test_baseline", final.get("eval_baseline", last.get("eval_baseline")))
        or task.baseline(config),
        "accuracy": accuracy if task.has_accuracy else None,
        "max_unitarity_error": max((row["max_unitarity_error"] for row in history), default=None),
        "seconds": round(seconds, 3),
        "interrupted": interrupted,
        "stopped_by_time_budget": step < total and not interrupted and not diverged,
        "diverged": diverged,
        "rank": config.rank,
        "sketch": config.sketch,
        "hidden": config.hidden,
        "seq_len": config.seq_len,
        "model": config.model,
        "depth": config.depth,
        "channels": config.channels,
        "skipped_steps": optimizer.skipped_steps,
        "nonfinite_losses": nonfinite_losses,
        "processes": replicas.world,
        **final,
    }
    if replicas.is_main:
        _write_json(out / "summary.json", summary)
        if history:
            _plot(out / "curves.png", history, summary)
    summary["out"] = str(out)
    if diverged:
        kept = saved_step
        raise RunDivergedError(
            f"stopped at step {step}: {failing} steps in a row had a non-finite loss or a skipped update "
            f"(--max-nonfinite {config.max_nonfinite}); "
            + (f"the checkpoint of step {kept} in {out} is kept" if kept is not None else f"{out} has no checkpoint")
            + " (try a smaller --lr)"
        )
    return summary
