"""One generic training loop behind ``projunn train``.

A run writes into its output folder:

- ``config.json``: the resolved settings;
- ``metrics.csv``: one row per evaluation (step, seconds, train/eval loss,
  eval accuracy, max unitarity error of the recurrent/unitary matrices);
- ``checkpoint.pt``: model, optimiser (with projUNN state), step, history;
  written to a temporary file and renamed, so an interrupted write never
  replaces a good checkpoint with a broken one;
- ``summary.json`` and ``curves.png`` at the end (also after Ctrl-C).

Batches are pure functions of (seed, step) (see :mod:`projunn.tasks`), so
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
import threading
import time
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch.nn.utils import parametrizations, parametrize

from ._distributed import Replicas, start_replicas
from ._files import atomic_write as _atomic_write
from ._loggers import open_loggers
from .functional import SKETCHES, unitarity_error
from .optim import ProjUNN
from .optim._groups import unitary_slots
from .tasks import DatasetMissingError, get_task

__all__ = ["CHECKPOINT", "METHODS", "OPTIMIZERS", "RunError", "TrainConfig", "train"]

#: ``--method`` choices: projUNN-T/-D, torch's orthogonal parametrisation, unconstrained.
METHODS = ("t", "d", "expm", "cayley", "none")
OPTIMIZERS = ("rmsprop", "adam", "sgd")
CHECKPOINT = "checkpoint.pt"
_CHECKPOINT_FORMAT = "projunn-run/1"
_METRIC_FIELDS = ("step", "seconds", "train_loss", "eval_loss", "eval_accuracy", "max_unitarity_error")
# Settings that may differ when resuming a run (they do not change the result).
_AUTOCAST = {"bfloat16": torch.bfloat16, "float16": torch.float16}
_RESUMABLE = {"steps", "epochs", "max_minutes", "resume", "overwrite", "quiet", "device", "out", "data_dir"}


class RunError(ValueError):
    """A run cannot start as asked (bad settings, output folder, checkpoint); the message says why."""


@dataclass(frozen=True)
class TrainConfig:
    """Settings of ``projunn train``; None means "the task's default"."""

    task: str
    method: str = "t"
    rank: int = 1
    sketch: str = "lsi"
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
    optimizer: str | None = None
    init: str | None = None
    nonlinearity: str | None = None
    complex: bool = False
    eval_every: int | None = None
    eval_limit: int | None = None
    max_minutes: float | None = None
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
    if config.sketch not in SKETCHES:
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
    layers = {**task.defaults, **(task.paper if config.preset == "paper" else {})}
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
    return ProjUNN(base, seed=config.seed, reorthogonalize_every=config.reorthogonalize_every)


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
    return pathlib.Path(config.out or f"runs/{config.task}-{config.method}-{time.strftime('%Y%m%d-%H%M%S')}")


def _check_out_dir(out: pathlib.Path, config: TrainConfig) -> None:
    """Refuse an occupied folder unless resuming or overwriting; touch nothing yet."""
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out} is a file, not a folder")
    if not config.resume and not config.overwrite and out.is_dir() and any(out.iterdir()):
        raise RunError(f"{out} already holds a run; pass --resume to continue it or --overwrite to replace it")


def _claim_out_dir(out: pathlib.Path, config: TrainConfig) -> None:
    """Create the folder (clearing an old run with --overwrite) once everything else has been checked."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        if config.overwrite and not config.resume:
            for name in ("config.json", "metrics.csv", "summary.json", "curves.png", CHECKPOINT):
                (out / name).unlink(missing_ok=True)
        for stale in out.glob(".*.tmp-*"):  # left by a process killed while writing; never the current file
            stale.unlink(missing_ok=True)
    except OSError as error:
        raise RunError(f"cannot write to {out}: {error}") from error


def _read_checkpoint(path: pathlib.Path) -> dict[str, Any]:
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise RunError(f"--resume: no {CHECKPOINT} in {path.parent}") from None
    except Exception as error:  # a truncated or foreign file: say so, load nothing
        raise RunError(f"{path} is not a readable checkpoint ({type(error).__name__}: {error})") from error
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != _CHECKPOINT_FORMAT:
        raise RunError(f"{path} was not written by projunn train")
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


def _plot(path: pathlib.Path, history: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [row["step"] for row in history]
    has_accuracy = any(row.get("eval_accuracy") is not None for row in history)
    fig, axes = plt.subplots(1, 3 if has_accuracy else 2, figsize=(13 if has_accuracy else 9, 3.6))
    ax = axes[0]
    ax.plot(steps, [row["train_loss"] for row in history], label="train")
    ax.plot(steps, [row["eval_loss"] for row in history], label="held out")
    if summary.get("baseline_loss") is not None:
        ax.axhline(summary["baseline_loss"], color="k", linestyle="--", linewidth=1, label="baseline")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title("loss")
    ax.legend()
    ax = axes[1]
    ax.plot(steps, [max(row["max_unitarity_error"], 1e-16) for row in history], color="tab:red")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title(r"max $\|U^H U - I\|_F$")
    if has_accuracy:
        ax = axes[2]
        ax.plot(steps, [row.get("eval_accuracy") for row in history], color="tab:green")
        ax.set_ylim(0, 1)
        ax.set_xlabel("step")
        ax.set_title("held-out accuracy")
    shown = [("T", "seq_len"), ("hidden", "hidden"), ("model", "model"), ("depth", "depth"), ("channels", "channels")]
    details = "".join(f", {label} {summary[key]}" for label, key in shown if summary.get(key) is not None)
    fig.suptitle(f"{summary['task']}{details}, method {summary['method']}", fontsize=10)
    fig.tight_layout()
    _atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


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

    Under ``torchrun`` the run is data parallel (see :mod:`projunn._distributed`):
    every replica trains on its slice of each global batch, and rank 0 alone
    logs and writes files. Each ``loggers`` entry gets every metrics.csv row as
    ``log_scalars(step, row)`` (see :mod:`projunn._loggers`).

    Raises:
        RunError: bad settings, an occupied output folder, or an unusable checkpoint.
        DatasetMissingError: the task's data set is not installed.
    """
    replicas, device_name = start_replicas(config.device)
    try:
        return _train(config, replicas, device_name, log if replicas.is_main else (lambda message: None), loggers)
    finally:
        replicas.close()


def _train(config: TrainConfig, replicas: Replicas, device_name: str, log, loggers=()) -> dict[str, Any]:
    from tqdm.auto import tqdm

    checkpoint = None
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
    replicas.on_main(lambda: _check_out_dir(out, config))
    device = _pick_device(device_name)
    torch.manual_seed(config.seed)  # the same model on every replica
    task, model, optimizer = _build(config, device)
    # Forward and backward go through DDP (gradients averaged over replicas);
    # evaluation and checkpoints use the module itself, identical everywhere.
    trained = torch.nn.parallel.DistributedDataParallel(model) if replicas.distributed else model
    total = task.total_steps(config)
    step, seconds, history, nonfinite_losses = 0, 0.0, [], 0
    window_loss, window_count = 0.0, 0
    if checkpoint is not None:
        try:
            model.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
        except (RuntimeError, ValueError, KeyError) as error:
            raise RunError(f"the checkpoint in {out} does not fit this model ({error})") from error
        step, seconds, history = checkpoint["step"], checkpoint["seconds"], checkpoint["history"]
        nonfinite_losses = checkpoint.get("nonfinite_losses", 0)
        window_loss, window_count = checkpoint.get("window", (0.0, 0))
        if checkpoint.get("device", device.type) != device.type:
            log(f"note: the run was on {checkpoint['device']}, now on {device.type}; the result may differ slightly")
    replicas.on_main(lambda: (_claim_out_dir(out, config), _write_json(out / "config.json", asdict(config))))
    opened = contextlib.ExitStack()
    loggers = open_loggers(config, out, opened, loggers) if replicas.is_main else []
    cached = parametrize.cached if config.method in ("expm", "cayley") else contextlib.nullcontext
    # Half-precision compute; parameters, unitary ones included, stay in full precision (the master copy).
    low_precision = (
        (lambda: torch.autocast(device.type, dtype=_AUTOCAST[config.autocast]))
        if config.autocast
        else contextlib.nullcontext
    )

    def save_checkpoint():
        if not replicas.is_main:
            return
        state = {
            "format": _CHECKPOINT_FORMAT,
            "config": asdict(config),
            "device": device.type,
            "step": step,
            "seconds": seconds,
            "history": history,
            "window": (window_loss, window_count),
            "nonfinite_losses": nonfinite_losses,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
        }
        _atomic_write(out / CHECKPOINT, lambda tmp: torch.save(state, tmp))

    stop_requested = []

    def request_stop(signum, frame):
        if stop_requested:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        stop_requested.append(signum)
        log("stopping after this step (Ctrl-C again to stop at once)")

    in_main_thread = threading.current_thread() is threading.main_thread()
    previous_handler = signal.signal(signal.SIGINT, request_stop) if in_main_thread else None
    best = min((row["eval_loss"] for row in history if row["eval_loss"] is not None), default=math.inf)
    interrupted = False
    bar = tqdm(
        total=total,
        initial=step,
        disable=config.quiet or not replicas.is_main,
        unit="step",
        desc=f"{task.name}/{config.method}",
    )
    started = time.perf_counter() - seconds
    try:
        while step < total:
            x, y = task.batch(config, step, device)
            with cached(), low_precision():
                loss, _ = task.loss(trained, replicas.shard(x), replicas.shard(y))
            global_loss = replicas.mean(loss.detach())  # every replica skips, or none does
            if torch.isfinite(global_loss):
                loss.backward()
                optimizer.step()
                window_loss += global_loss.item()
                window_count += 1
            else:
                nonfinite_losses += 1
            optimizer.zero_grad()
            step += 1
            bar.update(1)
            out_of_time = config.max_minutes is not None and time.perf_counter() - started > 60 * config.max_minutes
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
                save_checkpoint()
                postfix = {"loss": f"{scores['eval_loss']:.4g}", "best": f"{best:.4g}"}
                if row["eval_accuracy"] is not None:
                    postfix["acc"] = f"{row['eval_accuracy']:.3f}"
                postfix["unitarity"] = f"{row['max_unitarity_error']:.1e}"
                bar.set_postfix(postfix)
                if config.quiet:
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
        opened.close()
        if previous_handler is not None:
            signal.signal(signal.SIGINT, previous_handler)

    final = {}
    if not interrupted:
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
        "baseline_loss": task.baseline(config),
        "accuracy": accuracy if task.has_accuracy else None,
        "max_unitarity_error": max((row["max_unitarity_error"] for row in history), default=None),
        "seconds": round(seconds, 3),
        "interrupted": interrupted,
        "stopped_by_time_budget": step < total and not interrupted,
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
    return summary
