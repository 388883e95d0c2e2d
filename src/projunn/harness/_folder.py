"""The run folder: claimed and locked by one process, and the files a run writes into it.

- ``config.json``: the resolved settings;
- ``metrics.csv``: one row per evaluation (:data:`METRIC_FIELDS`);
- ``checkpoint.pt``: model, optimiser (with projUNN state) and the run's state;
- ``summary.json`` and ``curves.png`` at the end.

Every file is written to a temporary name and renamed, so an interrupted write
never replaces a good file with a broken one.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import pathlib
import time
from dataclasses import dataclass
from typing import Any

import torch

from ._config import RunError
from ._files import (
    FolderBusyError,
    atomic_write,
    describe_os_error,
    list_names,
    lock_folder,
    make_new_folder,
    unlock_folder,
    visible_entries,
)
from ._loggers import TENSORBOARD_DIR
from ._state import STATE_ENTRIES

__all__ = [
    "CHECKPOINT",
    "METRIC_FIELDS",
    "RUN_ENTRIES",
    "Claim",
    "check_out_dir",
    "claim_out_dir",
    "default_out_dir",
    "read_checkpoint",
    "release",
    "write_checkpoint",
    "write_file",
    "write_json",
    "write_metrics",
]

CHECKPOINT = "checkpoint.pt"
#: The checkpoint's ``format`` entry. Its other entries: ``config`` (stored settings), ``device``
#: (the device type it was written on), ``model`` and ``optimizer`` (state dicts), and the run state
#: (see :class:`projunn.harness._state.RunState`).
CHECKPOINT_FORMAT = "projunn-run/1"
_CHECKPOINT_KEYS = ("config", *STATE_ENTRIES, "model", "optimizer")  # needed to continue a run
#: What a run writes into its folder (``overwrite`` removes exactly these).
_RUN_FILES = ("config.json", "metrics.csv", "summary.json", "curves.png", CHECKPOINT, "certify.json")
#: Every name a run puts into its folder (hidden ones aside: the lock and temporary files).
RUN_ENTRIES = frozenset({*_RUN_FILES, TENSORBOARD_DIR})
METRIC_FIELDS = (
    "step",
    "seconds",
    "train_loss",
    "eval_loss",
    "eval_accuracy",
    "eval_baseline",
    "max_unitarity_error",
)


def write_file(path: pathlib.Path, write) -> None:
    """:func:`atomic_write`, with a failure (disk full, no permission) as one line naming the file and the cause."""
    try:
        atomic_write(path, write)
    except OSError as error:
        raise RunError(f"cannot write {path}: {describe_os_error(error)}; the file there before is unchanged") from None


def finite_or_none(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def write_json(path: pathlib.Path, data: dict[str, Any]) -> None:
    """Strict JSON: NaN/Inf (a diverged run) are written as null."""
    clean = {key: finite_or_none(value) for key, value in data.items()}
    write_file(path, lambda tmp: tmp.write_text(json.dumps(clean, indent=2, allow_nan=False) + "\n"))


def write_metrics(path: pathlib.Path, history: list[dict[str, Any]]) -> None:
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=METRIC_FIELDS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(history)

    write_file(path, write)


def write_checkpoint(path: pathlib.Path, entries: dict[str, Any]) -> None:
    """Save ``entries`` (config, device, run state, model, optimizer) under the checkpoint format."""
    state = {"format": CHECKPOINT_FORMAT, **entries}
    write_file(path, lambda tmp: torch.save(state, tmp))


def _load_failure(error: Exception) -> str:
    """Why torch.load failed, in a few words: its first sentence, or for a file that is no pickle torch
    accepts, just that (torch's own message advises ``weights_only=False``, i.e. running whatever a
    damaged or foreign file contains)."""
    text = str(error).strip()
    if "weights_only" in text:
        return "not a torch.save file"
    first = text.splitlines()[0] if text else type(error).__name__
    return first.split(". ")[0]


def read_checkpoint(path: pathlib.Path) -> dict[str, Any]:
    """The checkpoint's entries, tensors on the CPU; a missing, damaged or foreign file is a RunError."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        # A run that stopped before its first checkpoint leaves its config.json: nothing to continue.
        started = " (the run there stopped before its first checkpoint: start it again without --resume)"
        raise RunError(
            f"--resume: no {CHECKPOINT} in {path.parent}" + (started if (path.parent / "config.json").exists() else "")
        ) from None
    except Exception as error:  # a truncated or foreign file: say so, load nothing
        raise RunError(
            f"{path} is not a readable projunn checkpoint; it may be truncated or damaged ({_load_failure(error)})"
        ) from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise RunError(f"{path} was not written by projunn train")
    missing = [key for key in _CHECKPOINT_KEYS if key not in checkpoint]
    if missing:
        raise RunError(f"{path} is not a complete projunn checkpoint: it has no {', '.join(map(repr, missing))} entry")
    return checkpoint


def default_out_dir(config) -> pathlib.Path:
    """``out``, or the default name ``runs/TASK-METHOD-TIME`` (made unique when the folder is claimed)."""
    if config.out is not None and not str(config.out).strip():
        raise RunError("--out is empty: give a folder name, or leave --out unset for a new folder under runs/")
    return pathlib.Path(config.out or f"runs/{config.task}-{config.method}-{time.strftime('%Y%m%d-%H%M%S')}")


def occupant(out: pathlib.Path) -> str | None:
    """What in folder ``out`` a new run must not silently join, or None.

    A checkpoint is a run that can be continued, and a summary without one the results of a run
    whose checkpoint is gone (deleted to save space, say). A run's other files are what a run that
    never reached its first checkpoint left (killed, interrupted, or diverged first, as its summary
    then says): nothing to continue or keep, so a new run replaces them. Anything else is not ours
    to write beside unasked.
    """
    names = visible_entries(out)
    if CHECKPOINT in names:
        return "already holds a run; pass --resume to continue it or --overwrite to replace it"
    foreign = [name for name in names if name not in RUN_ENTRIES]
    if foreign:
        return (
            f"holds files that are not a projunn run ({list_names(foreign)}); choose an empty or new folder, "
            "or pass --overwrite to write the run beside them"
        )
    if "summary.json" in names and not _diverged(out / "summary.json"):
        return "holds a run's results (summary.json) without its checkpoint; pass --overwrite to replace them"
    return None


def _diverged(summary: pathlib.Path) -> bool:
    """Whether a summary.json says its run diverged (an unreadable one is kept, as results)."""
    try:
        content = json.loads(summary.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(content, dict) and bool(content.get("diverged"))


def check_out_dir(out: pathlib.Path, config) -> None:
    """Refuse an occupied folder unless resuming or overwriting; touch nothing."""
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out} is a file, not a folder")
    if not config.resume and not config.overwrite and out.is_dir():
        problem = occupant(out)
        if problem:
            raise RunError(f"{out} {problem}")


@dataclass(frozen=True)
class Claim:
    """A run folder this process writes into: its lock, and whether this start created the folder."""

    out: pathlib.Path
    lock: int
    created: bool


def claim_out_dir(out: pathlib.Path, config) -> Claim:
    """Create (or open) the folder and take its lock, once everything else has been checked.

    A default name is made unique (``-2``, ``-3``, ...) by creating the folder
    atomically; a given ``out`` is locked, so a second process aimed at it is
    refused, and checked again under the lock (clearing an old run with ``overwrite``).
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
    claim = Claim(out, lock, created)
    try:
        check_out_dir(out, config)  # again under the lock: another run may have finished here meanwhile
        if not config.resume:  # an overwritten run, or the files of one that never reached a checkpoint
            for name in _RUN_FILES:
                (out / name).unlink(missing_ok=True)
        for stale in out.glob(".*.tmp-*"):  # left by a process killed while writing; never the current file
            stale.unlink(missing_ok=True)
    except OSError as error:
        release(claim, failed_start=True)
        raise RunError(f"cannot write to {out}: {describe_os_error(error)}") from None
    except RunError:
        release(claim, failed_start=True)
        raise
    return claim


def release(claim: Claim, *, failed_start: bool) -> None:
    """Unlock the folder (removing the lock file); after a start that never wrote a checkpoint, remove
    what it created.

    So a failed start leaves the folder as it found it (or no folder), which both
    a rerun and ``resume`` of an earlier run accept.
    """
    removing = failed_start and not (claim.out / CHECKPOINT).exists()
    if removing:
        for name in ("config.json", "metrics.csv"):
            (claim.out / name).unlink(missing_ok=True)
        board = claim.out / TENSORBOARD_DIR
        for events in board.glob("events.out.tfevents.*"):  # logged by a run with no checkpoint: nothing to continue
            events.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # absent, or holding something else
            board.rmdir()
    unlock_folder(claim.out, claim.lock)
    if removing and claim.created:
        with contextlib.suppress(OSError):  # not empty: something else was put there meanwhile
            claim.out.rmdir()
