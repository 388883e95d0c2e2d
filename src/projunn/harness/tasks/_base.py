"""What every task is: a :class:`Task` describes itself (options, defaults, paper preset) and, bound
to one run by :meth:`Task.prepare`, makes that run's model, batches and scores.

Every task makes its batches as a pure function of (seed, step), so a run
resumed from a checkpoint sees exactly the batches an uninterrupted run
would have seen, with no data-loader state to save.

Held-out numbers come from fixed sets that depend on the task's settings
only, never on the run's seed or method: every run of a task and sequence
length is scored on the same sequences, beside the loss of a constant or
memoryless predictor measured on that same set (``eval_baseline``). Each
task keeps a validation set, which every evaluation row scores (anything
chosen by looking at held-out data, a best step, is chosen on it), apart
from a test set, which only the final weights are scored on, once, for
summary.json.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from ...models import SequenceModel

__all__ = ["Task", "Unwatched"]

#: Settings shared by the recurrent tasks (the paper: RMSprop, unitary lr = lr / 32).
RNN_DEFAULTS = dict(
    lr=1e-3, unitary_lr_divider=32, optimizer="rmsprop", init="henaff", nonlinearity="modrelu", eval_every=100
)
RNN_OPTIONS = frozenset({"hidden", "nonlinearity", "input_init", "complex"})
#: For the memory check (see :meth:`Task.footprint`), measured on CPU runs: values per weight entry
#: (the weight, its gradient, up to two optimiser moments, projUNN's temporaries), and values autograd
#: keeps per (example, time step, hidden unit) of an RNN, 9-10 measured.
WEIGHT_COPIES, RNN_SAVED_VALUES = 6, 10


def stream(*parts: object) -> torch.Generator:
    """A generator seeded by a hash of ``parts``, e.g. ("train", seed, step).

    Distinct tuples give unrelated streams (no arithmetic on seeds that lets
    seed 0 at one step collide with seed 1 at another), the same on every
    platform and torch version.
    """
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


def weight_dtype(config) -> torch.dtype:
    """The default dtype, or its complex counterpart for ``complex`` runs (float32 -> complex64)."""
    default = torch.get_default_dtype()
    return torch.promote_types(default, torch.complex64) if config.complex else default


@contextlib.contextmanager
def evaluating(model: torch.nn.Module):
    """No gradients, and the model in eval mode (BatchNorm uses its running statistics) until the block ends."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


#: The progress of a scoring pass nobody watches (the default): ``with progress(total=n, desc=...) as bar``,
#: then ``bar.update(examples)`` after each chunk, as with the tqdm bar ``projunn train`` passes on a terminal.
Unwatched = functools.partial(tqdm, disable=True)


@dataclass
class Task:
    """One task: its description and, once :meth:`prepare` binds it to a run, that run's data.

    ``defaults`` fill unset options; ``paper`` is the ``preset="paper"`` overlay; ``options``
    are the settings only some tasks take (see ``projunn.harness._config.TASK_OPTIONS``) that
    this one takes. A task registered in ``_registry.TASKS`` holds no run: :meth:`prepare`
    returns a copy bound to the run's settings (``config``), device and length (``total_steps``).
    """

    name: str = ""
    description: str = ""
    defaults: dict[str, Any] = field(default_factory=dict)
    paper: dict[str, Any] = field(default_factory=dict)
    options: frozenset[str] = frozenset()
    has_accuracy: bool = False
    inits: tuple[str, ...] = ("identity", "haar", "henaff", "cayley")
    #: Per ``model`` defaults of model-specific options (tasks with a choice of model).
    model_defaults: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Options of ``paper`` that the paper itself varies, so ``preset="paper"`` lets them be set.
    paper_free: tuple[str, ...] = ()
    #: The models the paper trains, where there is a choice: ``preset="paper"`` refuses the others.
    paper_models: tuple[str, ...] = ()
    #: What the loss and the accuracy measure, in the words of a plot's axis.
    loss_label: str = "loss"
    accuracy_label: str = "accuracy"

    def prepare(self, config, device: torch.device) -> Task:
        """This task bound to one run with these (resolved) settings, its tensors on ``device``."""
        run = copy.copy(self)
        run.config, run.device, run.total_steps = config, device, config.steps
        run.setup()
        return run

    def to_device(self, tensor: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``tensor``, made on the CPU, on the run's device (as ``dtype``); to a GPU through pinned
        memory, so that the copy does not make the host wait."""
        if self.device.type == "cuda":
            return tensor.pin_memory().to(device=self.device, dtype=dtype, non_blocking=True)
        return tensor.to(device=self.device, dtype=dtype)

    def setup(self) -> None:
        """Make the bound run's tensors (held-out sets, data sets, targets)."""

    def footprint(self, config, batch: int) -> tuple[int, str]:
        """Roughly the values one process of a run with these (resolved) settings holds at its peak
        (weights with their gradients and optimiser state, what autograd keeps for a ``batch``), and
        the flags that set it; within a factor of about 1.5, so that only a run that plainly cannot
        fit is refused."""
        raise NotImplementedError

    def rnn_footprint(self, config, batch: int, length: int) -> int:
        """:meth:`footprint` of a unitary RNN of ``config.hidden`` units over ``length`` time steps."""
        return WEIGHT_COPIES * config.hidden**2 + RNN_SAVED_VALUES * batch * length * config.hidden

    def rnn_model(self, input_size: int, output_size: int, *, tokens: bool = False) -> SequenceModel:
        """The unitary RNN of the sequence tasks: ``config.hidden`` units with the run's RNN settings;
        ``tokens``: one-hot symbols in, a prediction at every step out (copy)."""
        config = self.config
        return SequenceModel(
            input_size,
            config.hidden,
            output_size,
            tokens=tokens,
            every_step=tokens,
            nonlinearity=config.nonlinearity,
            dtype=weight_dtype(config),
            init=config.init,
            input_init=config.input_init or "he",
        )

    def baseline(self, config) -> float | None:
        return None

    def build_model(self) -> torch.nn.Module:
        raise NotImplementedError

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets of training step ``step``: a pure function of (seed, step)."""
        raise NotImplementedError

    def loss(self, model, x, y) -> torch.Tensor:
        """The mean training loss of a batch (a 0-d tensor: reading it would stop a GPU's queue)."""
        raise NotImplementedError

    def evaluate(self, model, *, progress=Unwatched) -> dict[str, float]:
        """Held-out ``eval_loss``, ``eval_baseline`` and, where the task has one, ``eval_accuracy``.

        ``progress`` is told how far a long pass has got (see :data:`Unwatched`; ``projunn train``
        passes a tqdm bar on a terminal).
        """
        raise NotImplementedError

    def test(self, model, *, progress=Unwatched) -> dict[str, float]:
        """Final numbers for summary.json (the held-out evaluation unless a test set exists)."""
        return self.evaluate(model, progress=progress)
