"""What a run trains: the device, the task's data, the model (constrained by the run's method) and the optimiser."""

from __future__ import annotations

import pickle
import struct
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.nn.utils import parametrizations

from ..functional import unitarity_error
from ..nn import eunn
from ..optim import ProjUNN, param_groups, unitary_parameters
from ._config import RunError, TrainConfig, flag
from ._memory import available_bytes, estimate_bytes, format_bytes, size_options
from ._sharding import gathered
from .tasks import DatasetMissingError, Task, get_task

__all__ = ["Built", "build", "build_optimizer", "check_fits", "constrain", "max_unitarity_error", "pick_device"]

#: ``method`` -> the ``orthogonal_map`` of torch's orthogonal parametrisation.
_TORCH_MAPS = {"expm": "matrix_exp", "cayley": "cayley"}
_BASE_OPTIMIZERS = {
    "rmsprop": lambda groups, lr: torch.optim.RMSprop(groups, lr=lr),
    "adam": lambda groups, lr: torch.optim.Adam(groups, lr=lr),
    "sgd": lambda groups, lr: torch.optim.SGD(groups, lr=lr, momentum=0.9),
}


def pick_device(name: str) -> torch.device:
    """``auto`` (cuda where there is one), ``cpu``, ``cuda`` or, under torchrun, ``cuda:I``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RunError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):  # cuda:I: one GPU per replica under torchrun
        raise RunError(f"--device must be auto, cpu or cuda; got {name!r}")
    return torch.device(name)


def check_fits(config: TrainConfig, device: torch.device, processes: int) -> None:
    """Refuse, before anything is allocated, settings the parameters' dtype or the device cannot hold."""
    largest = torch.finfo(torch.get_default_dtype()).max
    for name, value in (("lr", config.lr), ("unitary_lr", config.unitary_lr)):
        if value > largest:  # torch cannot even multiply a gradient by it
            raise RunError(f"{flag(name)} {value:g} exceeds {largest:.4g}, the largest {torch.get_default_dtype()}")
    needed, available = estimate_bytes(config, processes), available_bytes(device)
    if available is not None and needed > available:
        raise RunError(
            f"this run needs about {format_bytes(needed)} of memory (weights, optimiser state and one batch's "
            f"activations), more than the {format_bytes(available)} available on {device.type}; "
            f"reduce {size_options(config)}"
        )


def unitary_slots(model: torch.nn.Module) -> list[tuple[torch.nn.Module, str]]:
    """(module, attribute) of each weight :func:`projunn.optim.unitary_parameters` lists.

    Taken before :func:`constrain`: a weight torch's parametrisation computes is a parameter no more,
    but ``getattr(module, attribute)`` still gives it.
    """
    slots = []
    for qualified, _ in unitary_parameters(model):
        prefix, _, name = qualified.rpartition(".")
        slots.append((model.get_submodule(prefix), name))
    return slots


def constrain(slots: list[tuple[torch.nn.Module, str]], method: str, capacity: int | str | None = None) -> None:
    """For ``expm``/``cayley`` re-express the unitary weights with torch's orthogonal parametrisation,
    for ``eunn`` with an EUNN mesh of ``capacity`` layers, as resolved (a number, or "full"), each
    starting from the weight's value."""
    for module, name in slots:
        if method in _TORCH_MAPS:
            parametrizations.orthogonal(module, name, orthogonal_map=_TORCH_MAPS[method])
        elif method == "eunn":
            try:  # capacity "full": as many layers of rotations as the matrix has rows (the library's None)
                eunn(module, name, capacity=None if capacity == "full" else capacity)
            except ValueError as error:  # the library names the weights it can start from
                raise RunError(f"--method eunn --capacity {capacity}: {error} (here: --capacity full)") from None


def build_optimizer(model: torch.nn.Module, config: TrainConfig) -> ProjUNN:
    """The base optimiser over :func:`projunn.optim.param_groups` (unitary weights at ``unitary_lr``), under ProjUNN.

    Unitary weights get projUNN steps for methods ``t``/``d``, plain steps otherwise.
    """
    groups = param_groups(
        model,
        unitary_lr=config.unitary_lr,
        method=config.method if config.method in ("t", "d") else "none",
        rank=config.rank,
        sketch=config.sketch,
        include_parametrized=True,
    )
    base = _BASE_OPTIMIZERS[config.optimizer](groups, config.lr)
    for group in base.param_groups:
        group["initial_lr"] = group["lr"]  # the schedule's reference; saved with the optimiser's state
    return ProjUNN(
        base,
        seed=config.seed,
        reorthogonalize_every=config.reorthogonalize_every,
        drift_tolerance=config.drift_tolerance,
    )


def _check_rank(config: TrainConfig, slots: list[tuple[torch.nn.Module, str]]) -> None:
    """A projUNN rank above the size of a unitary matrix would be cut silently: refuse it, naming the maximum."""
    if config.method not in ("t", "d"):
        return
    sizes = [min(getattr(module, name).shape[-2:]) for module, name in slots]
    if sizes and config.rank > min(sizes):
        raise RunError(f"--rank {config.rank} exceeds {min(sizes)}, the size of this model's smallest unitary matrix")


def max_unitarity_error(slots: list[tuple[torch.nn.Module, str]]) -> float:
    """The largest ``||W^H W - I||_F`` over the unitary weights (0 for a model without any).

    A weight split over processes is gathered whole first: every process must call this.
    """
    with torch.no_grad():
        weights = [gathered(getattr(module, name).detach()) for module, name in slots]
        errors = [unitarity_error(w).max().item() for w in weights if w.numel() > 0]
    return max(errors, default=0.0)


@dataclass
class Built:
    """The task's data for the run, the model on the device, its unitary slots and the optimiser."""

    data: Task  # bound to the run (see Task.prepare)
    model: torch.nn.Module
    slots: list[tuple[torch.nn.Module, str]]
    optimizer: ProjUNN


def build(config: TrainConfig, device: torch.device, shard: Callable[[torch.nn.Module], None] | None = None) -> Built:
    """Data, model and optimiser, checked on a first batch; any failure becomes a one-line RunError.

    ``shard``, if given, splits the model's weights over processes (``--fsdp``) before the
    optimiser is built over them.
    """
    try:
        data = get_task(config.task).prepare(config, device)
        model = data.build_model()
        slots = unitary_slots(model)
        constrain(slots, config.method, config.capacity)
        model.to(device)
        if shard is not None:
            shard(model)
        optimizer = build_optimizer(model, config)
        data.batch(0)  # batches are pure: this checks the settings, changes nothing
    except (DatasetMissingError, RunError):
        raise
    except (ValueError, TypeError, OSError, struct.error, pickle.UnpicklingError) as error:
        raise RunError(_described(error)) from error
    _check_rank(config, slots)
    return Built(data, model, slots, optimizer)


def _described(error: Exception) -> str:
    """The message of a RunError made from ``error``: its type named, except a plain ValueError,
    which a RunError already is (a Python caller would otherwise read "ValueError" twice)."""
    message = str(error)
    if type(error) is ValueError and message:
        return message
    return f"{type(error).__name__}: {message}" if message else type(error).__name__
