"""Where a run stands between two steps: what a checkpoint saves beside the weights, and restores."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["STATE_ENTRIES", "RunState"]

#: The checkpoint entries of a :class:`RunState` (the checkpoint format keeps these names).
STATE_ENTRIES = ("step", "seconds", "history", "window", "nonfinite_losses", "failing")


@dataclass
class RunState:
    """The progress of a run; with the model and optimiser it is all a resumed run needs to continue exactly.

    Attributes:
        step: training steps done.
        seconds: wall-clock seconds of training at the last evaluation (continued across resumes).
        history: the metrics.csv rows so far, one per evaluation.
        window_loss, window_count: sum and number of the finite training losses since the last row.
        nonfinite_losses: steps whose loss was NaN/Inf (skipped), over the whole run.
        failing: steps in a row with a non-finite loss or a skipped update (``max_nonfinite`` stops the run).
        saved_step: the step of the checkpoint on disk (None: none yet); not saved, it is the saved ``step``.
    """

    step: int = 0
    seconds: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)
    window_loss: float = 0.0
    window_count: int = 0
    nonfinite_losses: int = 0
    failing: int = 0
    saved_step: int | None = None

    def to_checkpoint(self) -> dict[str, Any]:
        """The checkpoint entries of the state (:data:`STATE_ENTRIES`)."""
        return {
            "step": self.step,
            "seconds": self.seconds,
            "history": self.history,
            "window": (self.window_loss, self.window_count),
            "nonfinite_losses": self.nonfinite_losses,
            "failing": self.failing,
        }

    @classmethod
    def from_checkpoint(cls, checkpoint: dict[str, Any]) -> RunState:
        """The state a checkpoint saved (:func:`projunn.harness._folder.read_checkpoint` checked its entries)."""
        window_loss, window_count = checkpoint["window"]
        kept = {key: checkpoint[key] for key in STATE_ENTRIES if key != "window"}
        return cls(**kept, window_loss=window_loss, window_count=window_count, saved_step=checkpoint["step"])

    @property
    def best_loss(self) -> float:
        """The lowest held-out loss so far (inf before the first finite one)."""
        return min((row["eval_loss"] for row in self.history if row["eval_loss"] is not None), default=math.inf)

    @property
    def train_loss(self) -> float | None:
        """The mean training loss since the last row (None: no finite loss since)."""
        return self.window_loss / self.window_count if self.window_count else None

    def count_step(self, loss: float | None, *, skipped: bool) -> None:
        """Record one training step: its finite loss (None: non-finite, not applied) and whether the
        optimiser skipped its update."""
        self.step += 1
        if loss is None:
            self.nonfinite_losses += 1
            self.failing += 1
            return
        self.window_loss += loss
        self.window_count += 1
        self.failing = self.failing + 1 if skipped else 0

    def add_row(self, row: dict[str, Any]) -> None:
        """Append an evaluation row; the next row's training loss starts afresh."""
        self.history.append(row)
        self.window_loss, self.window_count = 0.0, 0
