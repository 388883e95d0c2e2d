"""One generic training loop behind ``projunn train``.

A run writes into its output folder (see :mod:`projunn.harness._folder`):
``config.json``, ``metrics.csv`` (one row per evaluation), ``checkpoint.pt``
(model, optimiser with projUNN state, and the :class:`~projunn.harness._state.RunState`),
and ``summary.json`` and ``curves.png`` at the end (also after Ctrl-C).

Batches are pure functions of (seed, step) (see :mod:`projunn.harness.tasks`), so
``resume`` continues to exactly the weights an uninterrupted run reaches.

The loop is :func:`_train_steps`; its steps are :func:`_open_run`, :func:`_training_step`,
:func:`_evaluation_row`, :func:`_summarise` and the Ctrl-C guard :func:`_sigint_guard`.
Settings live in :mod:`projunn.harness._config`, the model and optimiser in
:mod:`projunn.harness._build` (:func:`build` makes what a run trains without a run
folder, e.g. to time a training step).
"""

from __future__ import annotations

import contextlib
import enum
import functools
import math
import pathlib
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from ._build import Built, build, check_fits, max_unitarity_error, pick_device
from ._config import (
    AUTOCAST,
    METHODS,
    OPTIMIZERS,
    PARAMETRISED_METHODS,
    RunDivergedError,
    RunError,
    TrainConfig,
    learning_rate_factor,
    resolve,
    resumed_config,
    stored_settings,
)
from ._distributed import Replicas, start_replicas
from ._folder import (
    CHECKPOINT,
    check_out_dir,
    claim_out_dir,
    default_out_dir,
    finite_or_none,
    read_checkpoint,
    release,
    write_checkpoint,
    write_json,
    write_metrics,
)
from ._loggers import check_loggers, open_loggers
from ._plot import plot_curves
from ._sharding import full_state, load_full_state, shard_model
from ._state import RunState
from .tasks import get_task

__all__ = [
    "CHECKPOINT",
    "METHODS",
    "OPTIMIZERS",
    "STOP_SIGNALS",
    "Built",
    "Interrupted",
    "RunDivergedError",
    "RunError",
    "TrainConfig",
    "build",
    "resolve",
    "train",
]


class _Outcome(enum.Enum):
    """How the steps ended."""

    DONE = "done"
    OUT_OF_TIME = "out of time"
    INTERRUPTED = "interrupted"
    DIVERGED = "diverged"


@dataclass
class _Run:
    """An opened run: settings, folder, replicas, what it trains, where it stands, and where it reports."""

    config: TrainConfig
    out: pathlib.Path
    replicas: Replicas
    device: torch.device
    built: Built
    trained: torch.nn.Module  # the model, or its DDP wrapper for forward and backward
    state: RunState
    log: Callable[[str], None]
    loggers: list = field(default_factory=list)
    stop_signal: str | None = None  # the signal that stopped the run (SIGINT, SIGTERM), if one did

    @property
    def lines(self) -> bool:
        """A line per evaluation instead of a bar: asked for, or no one watches a bar redraw (a log file)."""
        return self.config.quiet or not _is_terminal(sys.stderr)

    def cached(self):
        """Parametrised weights computed once per forward (``expm``, ``cayley``, ``eunn``)."""
        return parametrize.cached() if self.config.method in PARAMETRISED_METHODS else contextlib.nullcontext()

    def low_precision(self):
        """Half-precision compute; parameters, unitary ones included, stay in full precision (the master copy)."""
        if self.config.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=AUTOCAST[self.config.autocast])


def train(config: TrainConfig, *, log=print, loggers=()) -> dict[str, Any]:
    """Run (or resume) a training run; return its summary (also written to summary.json).

    SIGTERM (what SLURM, Kubernetes, systemd and ``timeout`` send) is taken
    exactly as Ctrl-C: during training the first one finishes the current
    step, saves a checkpoint and returns (``summary["interrupted"]``, and
    ``summary["stop_signal"]`` names the signal); a second one stops at once,
    keeping the last checkpoint, which was written at an evaluation. Before and
    after the training steps either raises :class:`Interrupted` at once.

    Under ``torchrun`` the run is data parallel (see :mod:`projunn.harness._distributed`):
    every replica trains on its slice of each global batch, and rank 0 alone
    logs and writes files. Each ``loggers`` entry gets every metrics.csv row as
    ``log_scalars(step, row)`` (see :mod:`projunn.harness._loggers`).

    Raises:
        RunError: bad settings, an occupied output folder, or an unusable checkpoint.
        DatasetMissingError: the task's data set is not installed.
    """
    replicas, device_name = start_replicas(config.device)
    with contextlib.ExitStack() as cleanup, _StopSignals() as stops:
        cleanup.callback(replicas.close)
        log = log if replicas.is_main else (lambda message: None)
        run = _open_run(config, replicas, device_name, log, cleanup, loggers)
        return _summarise(run, _train_steps(run, stops))


def _train_steps(run: _Run, stops: _StopSignals) -> _Outcome:
    """Train until the last step, the time budget, divergence or Ctrl-C; say which ended the run."""
    state, config, total = run.state, run.config, run.built.data.total_steps
    # The seconds column continues across resumes; the time budget counts this invocation only.
    seconds_before, started = state.seconds, time.perf_counter()
    budget = math.inf if config.max_minutes is None else 60 * config.max_minutes
    with stops.deferred(run.log), _progress_bar(run) as bar:
        try:
            while state.step < total:
                _training_step(run)
                bar.update(1)
                if state.failing >= config.max_nonfinite:
                    return _Outcome.DIVERGED
                elapsed = time.perf_counter() - started
                # Replicas stop at the same step, whichever of them ran out of time or was signalled.
                out_of_time, signum = run.replicas.largest(float(elapsed > budget), float(stops.requested))
                if state.step % config.eval_every == 0 or state.step == total or out_of_time:
                    state.seconds = seconds_before + elapsed
                    _evaluation_row(run, bar)
                    if out_of_time:
                        bar.close()  # the bar's last state above the message, not redrawn below it
                        run.log(f"time budget of {config.max_minutes} min reached at step {state.step}")
                        return _Outcome.OUT_OF_TIME
                if signum:
                    run.stop_signal = signal.Signals(int(signum)).name
                    state.seconds = seconds_before + elapsed
                    _save_checkpoint(run)  # at a clean step boundary: the checkpoint continues exactly
                    bar.close()
                    run.log(f"interrupted at step {state.step}; checkpoint saved in {run.out} (continue with --resume)")
                    return _Outcome.INTERRUPTED
        except KeyboardInterrupt as stop:
            run.stop_signal = signal.Signals(getattr(stop, "signum", signal.SIGINT)).name
            bar.close()
            if state.saved_step is None:
                state.step = 0
                run.log(f"stopped before the first checkpoint; {run.out} has none (a rerun starts afresh)")
            else:
                state.step = state.saved_step  # what --resume continues from, whatever the history says
                run.log(f"stopped; the checkpoint of step {state.step} in {run.out} is kept (continue with --resume)")
            return _Outcome.INTERRUPTED
    return _Outcome.DONE


# -- opening the run -----------------------------------------------------------------------


def _open_run(
    config: TrainConfig, replicas: Replicas, device_name: str, log, cleanup: contextlib.ExitStack, loggers
) -> _Run:
    """Settle the settings, build the model (restored when resuming), then claim the folder.

    Everything that can refuse the run is checked before the folder is touched; the folder is
    released however the run ends, and a failed start removes what it created.
    """
    config, out, checkpoint = _settle(config)
    if config.batch_size % replicas.world:
        raise RunError(f"--batch-size {config.batch_size} must be divisible by the {replicas.world} processes")
    if config.out is not None:  # a default name is made unique instead
        replicas.on_main(lambda: check_out_dir(out, config))
    _check_sharding(config, replicas)
    check_loggers(config)
    device = pick_device(device_name)
    check_fits(config, device, replicas.world)
    torch.manual_seed(config.seed)  # the same model on every replica
    built = build(config, device, shard=(lambda model: shard_model(model, device)) if config.fsdp else None)
    # Forward and backward go through DDP (gradients averaged over replicas); evaluation and
    # checkpoints use the module itself, identical everywhere. A sharded model is its own wrapper.
    replicated = replicas.distributed and not config.fsdp
    trained = torch.nn.parallel.DistributedDataParallel(built.model) if replicated else built.model
    state = RunState() if checkpoint is None else _restore(built, checkpoint, out, device, log)
    claim = replicas.on_main(lambda: claim_out_dir(out, config))
    run = _Run(config, claim.out, replicas, device, built, trained, state, _above_bars(log))
    if replicas.is_main:
        failed_start = lambda kind: kind is not None and not issubclass(kind, RunDivergedError)  # noqa: E731
        cleanup.push(lambda kind, error, trace: release(claim, failed_start=failed_start(kind)))
        run.loggers = open_loggers(config, run.out, cleanup, loggers)
        write_json(run.out / "config.json", stored_settings(config))
    return run


def _settle(config: TrainConfig) -> tuple[TrainConfig, pathlib.Path, dict[str, Any] | None]:
    """The run's resolved settings, its folder, and the checkpoint it resumes (None for a new run)."""
    if config.resume and config.overwrite:
        raise RunError("--resume continues the run in --out and --overwrite replaces it: give one of them")
    if not config.resume:
        config = resolve(config)
        return config, default_out_dir(config), None
    if config.out is None:
        raise RunError("--resume needs --out, the folder of the run to continue")
    out = pathlib.Path(config.out)
    checkpoint = read_checkpoint(out / CHECKPOINT)
    return resumed_config(config, checkpoint["config"], out), out, checkpoint


def _check_sharding(config: TrainConfig, replicas: Replicas) -> None:
    """``fsdp`` needs several processes, and weights that ProjUNN or a plain optimiser steps."""
    if not config.fsdp:
        return
    if config.method in PARAMETRISED_METHODS:
        raise RunError(
            f"--fsdp trains the methods t, d and none; {config.method} (a parametrisation) "
            "computes each weight whole: use DDP (leave out --fsdp)"
        )
    if not replicas.distributed:
        raise RunError(
            "--fsdp splits the weights over the processes torchrun starts: run under "
            "`torchrun --nproc_per_node P` with P >= 2"
        )


def _restore(built: Built, checkpoint: dict[str, Any], out: pathlib.Path, device: torch.device, log) -> RunState:
    """Load the checkpoint's weights and optimiser state into ``built``; return its run state."""
    try:
        load_full_state(built.model, built.optimizer, checkpoint["model"], checkpoint["optimizer"])
    except (RuntimeError, ValueError, KeyError, IndexError) as error:
        raise RunError(f"the checkpoint in {out} does not fit this model ({error})") from error
    if checkpoint.get("device", device.type) != device.type:
        log(f"note: the run was on {checkpoint['device']}, now on {device.type}; the result may differ slightly")
    return RunState.from_checkpoint(checkpoint)


# -- the steps -----------------------------------------------------------------------------


def _training_step(run: _Run) -> None:
    """Forward and backward on this replica's share of the batch, then the update; a loss that is
    NaN/Inf on any replica is skipped on all of them."""
    state, optimizer = run.state, run.built.optimizer
    x, y = run.built.data.batch(state.step)
    with run.cached(), run.low_precision():
        loss = run.built.data.loss(run.trained, run.replicas.shard(x), run.replicas.shard(y))
    value = run.replicas.mean(loss.detach()).item()  # the step's one wait for the device
    finite = math.isfinite(value)
    skipped_before = optimizer.skipped_steps
    if finite:
        loss.backward()
        factor = learning_rate_factor(run.config, state.step)
        for group in optimizer.param_groups:
            group["lr"] = group.setdefault("initial_lr", group["lr"]) * factor
        optimizer.step()
    optimizer.zero_grad()
    state.count_step(value if finite else None, skipped=optimizer.skipped_steps > skipped_before)


def _evaluation_row(run: _Run, bar) -> None:
    """Score the model on held-out data; record, write and show the row; checkpoint a finite state."""
    state = run.state
    with torch.no_grad(), run.cached():
        scores = run.built.data.evaluate(run.built.model, progress=_scoring_bar(run))
    row = {
        "step": state.step,
        "seconds": round(state.seconds, 3),
        "train_loss": state.train_loss,
        "eval_loss": finite_or_none(scores["eval_loss"]),
        "eval_accuracy": scores.get("eval_accuracy"),
        # The constant / memoryless predictor's loss on the same held-out set.
        "eval_baseline": scores.get("eval_baseline"),
        "max_unitarity_error": max_unitarity_error(run.built.slots),
    }
    state.add_row(row)
    if run.replicas.is_main:
        write_metrics(run.out / "metrics.csv", state.history)
        for logger in run.loggers:
            logger.log_scalars(state.step, row)
    if row["eval_loss"] is not None:  # a non-finite state never replaces the last good checkpoint
        _save_checkpoint(run)
    shown = {"loss": f"{scores['eval_loss']:.4g}", "best": f"{state.best_loss:.4g}"}
    if row["eval_accuracy"] is not None:
        shown["acc"] = f"{row['eval_accuracy']:.3f}"
    shown["unitarity"] = f"{row['max_unitarity_error']:.1e}"
    bar.set_postfix(shown)
    if run.lines:
        rate = state.step / max(state.seconds, 1e-9)
        total = run.built.data.total_steps
        run.log(f"step {state.step}/{total} " + " ".join(f"{k} {v}" for k, v in shown.items()) + f" {rate:.1f} step/s")


def _save_checkpoint(run: _Run) -> None:
    """Write the checkpoint (rank 0; never of non-finite weights) and remember its step.

    Sharded weights and optimiser state are gathered whole on every process first, so the file is
    the one an unsharded run writes. Every replica returns once the file is in place (or the
    write failed, which each of them raises), so none can go on to read an older checkpoint.
    """
    model_state, optimizer_state = full_state(run.built.model, run.built.optimizer)

    def write() -> bool:
        if not _finite(model_state):
            return False
        entries = {
            "config": stored_settings(run.config),
            "device": run.device.type,
            **run.state.to_checkpoint(),
            "model": model_state,
            "optimizer": optimizer_state,
        }
        write_checkpoint(run.out / CHECKPOINT, entries)
        return True

    if run.replicas.on_main(write):
        run.state.saved_step = run.state.step


def _summarise(run: _Run, outcome: _Outcome) -> dict[str, Any]:
    """The test pass of a run that was not stopped early, summary.json and curves.png; return the summary.

    Raises:
        RunDivergedError: the run diverged (after the summary is written).
    """
    final = {}
    if outcome in (_Outcome.DONE, _Outcome.OUT_OF_TIME):
        with torch.no_grad(), run.cached():
            final = run.built.data.test(run.built.model, progress=_scoring_bar(run))
    summary = _summary(run, outcome, final)
    if run.replicas.is_main:
        write_json(run.out / "summary.json", summary)
        if run.state.history:
            plot_curves(run.out / "curves.png", run.state.history, summary)
    summary["out"] = str(run.out)
    if outcome is _Outcome.DIVERGED:
        state, kept = run.state, run.state.saved_step
        checkpoint = (
            f"the checkpoint of step {kept} in {run.out} is kept"
            if kept is not None
            else f"{run.out} has no checkpoint, so a rerun with the same --out starts afresh"
        )
        raise RunDivergedError(
            f"stopped at step {state.step}: {state.failing} steps in a row had a non-finite loss or a skipped "
            f"update (--max-nonfinite {run.config.max_nonfinite}); {checkpoint} (try a smaller --lr)"
        )
    return summary


#: The settings summary.json repeats, so that tables of runs need not read config.json.
_SUMMARY_SETTINGS = ("rank", "capacity", "sketch", "hidden", "seq_len", "model", "depth", "channels")


def _summary(run: _Run, outcome: _Outcome, final: dict[str, float]) -> dict[str, Any]:
    """summary.json: the final numbers (the test pass's, else the last row's) and the run's settings."""
    config, state, task = run.config, run.state, get_task(run.config.task)
    last = state.history[-1] if state.history else {}
    accuracy = final.get("test_accuracy", final.get("eval_accuracy", last.get("eval_accuracy")))
    best = state.best_loss
    stopped = outcome in (_Outcome.INTERRUPTED, _Outcome.DIVERGED)
    return {
        "task": task.name,
        "method": config.method,
        "loss": run.built.data.loss_label,
        "steps": state.step,
        "final_loss": final.get("test_loss", final.get("eval_loss", last.get("eval_loss"))),
        "best_loss": best if math.isfinite(best) else None,
        "baseline_loss": final.get("test_baseline", final.get("eval_baseline", last.get("eval_baseline")))
        or task.baseline(config),
        "accuracy": accuracy if task.has_accuracy else None,
        "max_unitarity_error": max((row["max_unitarity_error"] for row in state.history), default=None),
        "seconds": round(state.seconds, 3),
        "interrupted": outcome is _Outcome.INTERRUPTED,
        "stop_signal": run.stop_signal,
        "stopped_by_time_budget": state.step < run.built.data.total_steps and not stopped,
        "diverged": outcome is _Outcome.DIVERGED,
        **{key: getattr(config, key) for key in _SUMMARY_SETTINGS},
        "skipped_steps": run.built.optimizer.skipped_steps,
        "nonfinite_losses": state.nonfinite_losses,
        "processes": run.replicas.world,
        **final,
    }


# -- around the steps ----------------------------------------------------------------------


class Interrupted(KeyboardInterrupt):
    """A stop signal (Ctrl-C's SIGINT, or SIGTERM) that ends a run at once; ``signum`` says which."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    def __reduce__(self):
        # Rebuilt from the number (its args hold the name): replicas receive rank 0's by pickle.
        return (type(self), (self.signum,))


#: The signals that stop a run: Ctrl-C, and what SLURM, Kubernetes, systemd and ``timeout`` send.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class _StopSignals:
    """While open (in the main thread: elsewhere the signals stay Python's), a stop signal raises
    :class:`Interrupted` at once, except inside :meth:`deferred`: there the first one only asks to stop
    after the current step (:attr:`requested` then holds its number) and a second one stops at once."""

    def __init__(self):
        self.requested, self.log, self.previous = 0, None, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {signum: signal.signal(signum, self._handle) for signum in STOP_SIGNALS}
        return self

    def __exit__(self, *exc_info):
        for signum, old in self.previous.items():
            signal.signal(signum, old)

    def _handle(self, signum, frame):
        if self.log is None or self.requested:
            raise Interrupted(signum)
        self.requested = signum
        again = "Ctrl-C" if signum == signal.SIGINT else "a second signal"
        self.log(f"{signal.Signals(signum).name}: stopping after this step ({again} stops at once)")

    @contextlib.contextmanager
    def deferred(self, log):
        """The training steps: a first stop signal is logged with ``log`` and waits for the step's end."""
        self.log = log
        try:
            yield
        finally:
            self.log = None


def _scoring_bar(run: _Run):
    """Bars for the passes over held-out data, shown where the training bar is (scoring ~26,000 images
    takes minutes) and removed when a pass ends; ``--eval-limit`` shortens the image tasks' passes."""
    return functools.partial(tqdm, leave=False, disable=run.lines or not run.replicas.is_main)


def _above_bars(log):
    """``log`` with any progress bars cleared while it writes and redrawn after, so that a line
    (Ctrl-C's "stopping after this step") does not land inside a bar."""

    def say(message: str) -> None:
        with tqdm.external_write_mode():
            log(message)

    return say


def _progress_bar(run: _Run):
    """A tqdm bar on rank 0 where someone watches it (see ``_Run.lines``); disabled otherwise."""
    return tqdm(
        total=run.built.data.total_steps,
        initial=run.state.step,
        disable=run.lines or not run.replicas.is_main,
        unit="step",
        desc=f"{run.config.task}/{run.config.method}",
    )


def _is_terminal(stream) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def _finite(state: dict[str, torch.Tensor]) -> bool:
    return all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point() or t.is_complex())
