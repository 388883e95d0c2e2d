"""What ProjUNN does to one weight, a plain tensor or a DTensor, with one call per operation.

A plain tensor, or a DTensor replicated on every rank, is worked on whole by
each process. A DTensor whose rows are split (FSDP2's ``Shard(0)``) gives each
rank its own rows, and the same kernels take their sums over rows and their
tall QRs through collectives (Note [Row-sharded projUNN] in
``projunn._rows``). Decisions that skip work (a NaN gradient on
one rank's rows) are agreed by all ranks with one all-reduce of a flag, so no
rank waits on a collective the others skip.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist

from .._rows import ALL_ROWS, Rows, RowShards
from ..functional import closest_unitary
from ..functional._sketch import SKETCHES, factors
from ..functional._update import update as _update

__all__ = [
    "ALL_ROWS",
    "Rows",
    "all_finite_everywhere",
    "any_rank",
    "check_weight",
    "local_part",
    "project",
    "rows_of",
    "sketch_step",
    "update",
]

#: Sketches that run on row-sharded steps (Note [Row-sharded projUNN]).
_SHARDED_SKETCHES = tuple(s for s in SKETCHES if s != "exact")


def _is_dtensor(x: torch.Tensor) -> bool:
    return type(x).__name__ == "DTensor" and hasattr(x, "placements")


def local_part(x: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (the storage of the parameter, writes go through), or ``x`` itself."""
    return x.to_local() if _is_dtensor(x) else x


def rows_of(x: torch.Tensor) -> Rows:
    """How the rows of the weight ``x`` are held: :data:`ALL_ROWS`, or split over the ranks of its mesh.

    Supported: a plain tensor; a DTensor replicated on every mesh dimension;
    a DTensor on a 1-D mesh sharded along its row dimension (``Shard(0)`` of a
    matrix, as FSDP2 gives by default; ``Shard(d)`` with d = dim - 2 for a
    (..., N, M) batch). Anything else is refused.

    Raises:
        ValueError: a placement other than these, named in the message.
    """
    if not _is_dtensor(x):
        return ALL_ROWS
    from torch.distributed.tensor import Replicate, Shard

    placements = tuple(x.placements)
    if all(isinstance(p, Replicate) for p in placements):
        return ALL_ROWS
    row_dim = x.dim() - 2
    if len(placements) != 1 or not isinstance(placements[0], Shard) or placements[0].dim % x.dim() != row_dim:
        raise ValueError(
            f"projUNN supports unitary DTensor weights replicated or sharded along their rows "
            f"(Shard({row_dim}) on a 1-D mesh); got placements {placements} on a {x.device_mesh.ndim}-D mesh "
            f"for shape {tuple(x.shape)}"
        )
    mesh = x.device_mesh
    size, index, rows = mesh.size(), mesh.get_local_rank(), x.shape[-2]
    chunk = -(-rows // size)
    counts = tuple(max(0, min(chunk, rows - r * chunk)) for r in range(size))
    if x.to_local().shape[-2] != counts[index]:
        raise ValueError(
            f"the local shard of a weight of shape {tuple(x.shape)} has {x.to_local().shape[-2]} rows on rank "
            f"{index}, not the {counts[index]} of an even torch.chunk split; projUNN needs the chunk split"
        )
    return RowShards(mesh.get_group(), counts, index)


def check_weight(p: torch.Tensor, sketch: str) -> None:
    """Refuse a DTensor placement or a sketch that a sharded weight cannot take (one-line ValueError)."""
    if rows_of(p) is not ALL_ROWS and sketch not in _SHARDED_SKETCHES:
        raise ValueError(
            f"sketch {sketch!r} needs the whole step (a full SVD) and is refused for the row-sharded "
            f"weight of shape {tuple(p.shape)}; use one of {', '.join(map(repr, _SHARDED_SKETCHES))}"
        )


def sketch_step(
    D: torch.Tensor, rank: int, sketch: str, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-k factors (a, b) of the step held by ``D`` (a parameter): this rank's rows of a, and b whole."""
    return factors(local_part(D), rank, sketch, rows=rows_of(D), generator=generator)


def update(method: str, p: torch.Tensor, saved: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """Write the projUNN update (``method`` "t" or "d") of the weight ``saved`` (this rank's part) into ``p``."""
    _update(method, saved, a, b, out=local_part(p), rows=rows_of(p))


def project(p: torch.Tensor) -> None:
    """Snap ``p`` in place to the closest (semi-)unitary matrix (a sharded weight is all-gathered once)."""
    rows, local = rows_of(p), local_part(p)
    local.copy_(rows.take(closest_unitary(rows.gather(local))))


def any_rank(flags: list[bool], params: list[torch.Tensor]) -> list[bool]:
    """``flags[i]`` or'ed over the ranks sharing ``params[i]``'s rows (its own value for an unsharded one).

    What a row-sharded weight takes part in must be the same on all its ranks, or their collectives
    pair up wrongly: a gradient present on one rank only (a shard its forward did not reach, a grad
    set to None) still makes every rank step that weight, the others with a zero step for their rows.
    The base optimiser skips the weight where its gradient is missing, so its state for the weight
    (Adam's moments and step count) then differs between ranks. Every rank must call this with the
    same ``params``.
    """
    agreed = list(flags)
    for group, device, indices in _shard_groups(params).values():
        mask = torch.tensor([float(agreed[i]) for i in indices], device=device)
        dist.all_reduce(mask, op=dist.ReduceOp.MAX, group=group)
        for i, value in zip(indices, mask.tolist()):
            agreed[i] = value > 0
    return agreed


def _shard_groups(params: Iterable[torch.Tensor]) -> dict[int, tuple[object, torch.device, list[int]]]:
    """The process groups that split the rows of ``params``: id -> (group, device, indices of its params)."""
    groups: dict[int, tuple[object, torch.device, list[int]]] = {}
    for i, p in enumerate(params):
        rows = rows_of(p)
        if isinstance(rows, RowShards):
            groups.setdefault(id(rows.group), (rows.group, local_part(p).device, []))[2].append(i)
    return groups


def all_finite_everywhere(
    check: Callable[[list[torch.Tensor]], bool], tensors: list[torch.Tensor], params: Iterable[torch.Tensor]
) -> bool:
    """``check`` of the local parts of ``tensors``, agreed over the process groups of the sharded ``params``.

    Every rank must call this with the same ``params`` (the same model), even
    where its own ``tensors`` are empty.
    """
    finite = check([local_part(t) for t in tensors]) if tensors else True
    for group, device, _ in _shard_groups(params).values():
        flag = torch.tensor([1.0 if finite else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
        finite = bool(flag.item() > 0)
    return finite
