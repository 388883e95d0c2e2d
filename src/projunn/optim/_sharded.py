"""ProjUNN's hooks on DTensor weights: each rank works on its own rows (Note [Row-sharded projUNN]).

Plain tensors and DTensors replicated on every rank go through the ordinary
functions on the local tensor; weights whose rows are split (FSDP2's
``Shard(0)``) go through :mod:`projunn.functional.sharded`. Decisions that
skip work (a NaN gradient on one rank's rows) are agreed by all ranks with one
all-reduce of a flag, so no rank waits on a collective the others skip.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist

from ..functional import closest_unitary, lowrank, projunn_d, projunn_t
from ..functional.sharded import (
    SHARDED_SKETCHES,
    local_part,
    row_shards,
    sharded_closest_unitary,
    sharded_lowrank,
    sharded_update,
)

__all__ = [
    "all_finite_everywhere",
    "check_weight",
    "distributed_state_dict",
    "load_distributed_state_dict",
    "local_part",
    "project",
    "sketch",
    "update",
]

_UPDATES = {"t": projunn_t, "d": projunn_d}


def check_weight(p: torch.Tensor, sketch_name: str) -> None:
    """Refuse a DTensor placement or a sketch that a sharded weight cannot take (one-line ValueError)."""
    if row_shards(p) is not None and sketch_name not in SHARDED_SKETCHES:
        raise ValueError(
            f"sketch {sketch_name!r} needs the whole step (a full SVD) and is refused for the row-sharded "
            f"weight of shape {tuple(p.shape)}; use one of {', '.join(map(repr, SHARDED_SKETCHES))}"
        )


def sketch(D: torch.Tensor, rank: int, method: str, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-k factors of the step held by ``D`` (a parameter): this rank's rows of a, and b whole."""
    shards = row_shards(D)
    if shards is None:
        return lowrank(local_part(D), rank, method, generator=generator)
    return sharded_lowrank(local_part(D), rank, method, shards, generator=generator)


def update(method: str, p: torch.Tensor, saved: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """Write the projUNN update of the weight ``saved`` (this rank's part) by a b^H into ``p``."""
    shards = row_shards(p)
    if shards is None:
        _UPDATES[method](saved, a, b, out=local_part(p))
    else:
        sharded_update(method, saved, a, b, shards, out=local_part(p))


def project(p: torch.Tensor) -> None:
    """Snap ``p`` in place to the closest (semi-)unitary matrix (a sharded weight is all-gathered once)."""
    shards = row_shards(p)
    local = local_part(p)
    local.copy_(closest_unitary(local) if shards is None else sharded_closest_unitary(local, shards))


def all_finite_everywhere(
    check: Callable[[list[torch.Tensor]], bool], tensors: list[torch.Tensor], params: Iterable[torch.Tensor]
) -> bool:
    """``check`` of the local parts of ``tensors``, agreed over the process groups of the sharded ``params``.

    Every rank must call this with the same ``params`` (the same model), even
    where its own ``tensors`` are empty.
    """
    finite = check([local_part(t) for t in tensors]) if tensors else True
    groups = {}
    for p in params:
        shards = row_shards(p)
        if shards is not None:
            groups.setdefault(id(shards.group), (shards.group, local_part(p).device))
    for group, device in groups.values():
        flag = torch.tensor([1.0 if finite else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
        finite = bool(flag.item() > 0)
    return finite


def distributed_state_dict(model: torch.nn.Module, optimizer: Any) -> dict[str, Any]:
    """The model's and the ProjUNN optimiser's state for ``torch.distributed.checkpoint``.

    ``{"model": ..., "optimizer": ..., "projunn": ...}``: the first two from
    ``torch.distributed.checkpoint.state_dict.get_state_dict`` (DTensors stay
    sharded, each rank saves its rows), the third ProjUNN's step counters and
    sketch generator states, which ``get_state_dict`` would drop. Pass it to
    ``dcp.save``; to resume, build the same model and optimiser, take this
    dict as the destination of ``dcp.load`` and hand the loaded dict to
    :func:`load_distributed_state_dict`. The run then continues exactly as
    an uninterrupted one.

    Example:
        >>> import torch.distributed.checkpoint as dcp  # doctest: +SKIP
        >>> dcp.save(distributed_state_dict(model, opt), checkpoint_id=path)  # doctest: +SKIP
        >>> # later, in a new process group, with the same model and optimiser built afresh:
        >>> state = distributed_state_dict(model, opt)  # doctest: +SKIP
        >>> dcp.load(state, checkpoint_id=path)  # doctest: +SKIP
        >>> load_distributed_state_dict(model, opt, state)  # doctest: +SKIP
    """
    from torch.distributed.checkpoint.state_dict import get_state_dict

    # For an optimiser without state yet, get_state_dict takes one step with zero gradients and lr 0 to
    # allocate it; that step draws sketch numbers, so ProjUNN's own state is read only afterwards.
    model_state, optimizer_state = get_state_dict(model, optimizer.optimizer)
    return {"model": model_state, "optimizer": optimizer_state, "projunn": optimizer.state_dict()["projunn"]}


def load_distributed_state_dict(model: torch.nn.Module, optimizer: Any, state: dict[str, Any]) -> None:
    """Load a dict of the form :func:`distributed_state_dict` returns (after ``dcp.load``) into model and optimiser."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    with warnings.catch_warnings():
        # set_state_dict loads the base optimiser's state without ProjUNN's, which is applied just below.
        warnings.filterwarnings("ignore", "loading an optimizer state dict without projUNN state", RuntimeWarning)
        set_state_dict(model, optimizer.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    optimizer._take_state(optimizer.optimizer, {"projunn": state["projunn"]})
    optimizer._restore_state(optimizer.optimizer)
