"""Where ``projunn train`` sends its evaluation scalars besides metrics.csv.

A logger is any object with ``log_scalars(step, scalars)``.
``projunn.harness.train.train(config, loggers=[...])`` takes such objects (a Weights & Biases or MLflow adapter is a
few lines), and ``--tensorboard`` adds :class:`TensorBoardLogger`. Each call
gets the same row as metrics.csv: ``step``, ``seconds``, ``train_loss``,
``eval_loss``, ``eval_accuracy`` where the task has one, and
``max_unitarity_error``; values that are None (not measured) are left out.
"""

from __future__ import annotations

import contextlib
import math
import pathlib
from collections.abc import Iterable, Mapping
from typing import Any, Protocol, runtime_checkable

from ._config import RunError

__all__ = ["ScalarLogger", "TensorBoardLogger", "check_loggers", "open_loggers"]

#: Folder of the TensorBoard event files inside a run folder.
TENSORBOARD_DIR = "tensorboard"
_TENSORBOARD_MISSING = "TensorBoard logging needs the tensorboard package: pip install 'projunn[trainers]'"


def _summary_writer():
    """torch's SummaryWriter class (torch imports the tensorboard package for it)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        raise ImportError(_TENSORBOARD_MISSING) from error
    return SummaryWriter


@runtime_checkable
class ScalarLogger(Protocol):
    """Receives one row of scalars per evaluation."""

    def log_scalars(self, step: int, scalars: Mapping[str, Any]) -> None: ...


class TensorBoardLogger:
    """Write scalars as TensorBoard events (``tensorboard --logdir DIR`` shows them).

    Each scalar is a tag of its own (``eval_loss``, ``max_unitarity_error``,
    ...) at the given step; ``step`` itself is the x axis and not written.
    Non-finite and missing values are skipped. Events are flushed at every
    call, so a run killed later keeps what was logged.

    Args:
        log_dir: folder for the event files (created if needed).

    Raises:
        ImportError: the ``tensorboard`` package is not installed.
    """

    def __init__(self, log_dir: str | pathlib.Path) -> None:
        self._writer = _summary_writer()(log_dir=str(log_dir))

    def log_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        for tag, value in scalars.items():
            if tag != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                self._writer.add_scalar(tag, value, global_step=step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def check_loggers(config: Any) -> None:
    """Refuse, before the run folder is touched, a logger that cannot start (a missing package).

    Raises:
        RunError: ``config.tensorboard`` is set and the tensorboard package is not installed.
    """
    if getattr(config, "tensorboard", False):
        try:
            _summary_writer()
        except ImportError:
            raise RunError(f"--tensorboard: {_TENSORBOARD_MISSING}") from None


def open_loggers(
    config: Any, out: pathlib.Path, cleanup: contextlib.ExitStack, extra: Iterable[ScalarLogger] = ()
) -> list[ScalarLogger]:
    """The run's loggers: ``extra`` (left open: the caller owns them) plus TensorBoard under ``out`` if
    ``config.tensorboard`` (closed by ``cleanup``)."""
    loggers = list(extra)
    for logger in loggers:
        if not isinstance(logger, ScalarLogger):
            raise TypeError(f"a logger needs a log_scalars(step, scalars) method; got {type(logger).__name__}")
    if getattr(config, "tensorboard", False):
        if not getattr(config, "resume", False):  # a new or overwritten run: no curves of the one before
            for stale in (out / TENSORBOARD_DIR).glob("events.out.tfevents.*"):
                stale.unlink()
        tensorboard = TensorBoardLogger(out / TENSORBOARD_DIR)
        cleanup.callback(tensorboard.close)
        loggers.append(tensorboard)
    return loggers
