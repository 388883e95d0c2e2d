"""``projunn train --fsdp``: the model's weights split by rows over the processes (FSDP2).

Each process holds its rows of every weight and of the optimiser's state;
forward and backward all-gather a layer's weights while they run, and
ProjUNN steps each rank's rows with O((N + M) k) communication per weight
(Note [Row-sharded projUNN] in ``projunn._rows``). Batches are
split over the processes as under DDP, so a run on P processes sees the same
global batches as a run on one and equals it to rounding.

Checkpoints stay in the one-file format of an unsharded run: every tensor is
gathered whole (one all-gather per tensor, at evaluations only) and rank 0
writes it. A run saved with ``--fsdp`` therefore resumes on one process, on
another number of processes, or sharded again, which ``--resume`` allows.
The price is that each process briefly holds a whole copy of the state while
a checkpoint is written; a model too large for that wants
:func:`projunn.optim.distributed_state_dict` and ``torch.distributed.checkpoint``.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

__all__ = ["full_state", "gathered", "load_full_state", "shard_model"]


def shard_model(model: torch.nn.Module, device: torch.device) -> None:
    """Split every parameter of ``model`` by rows over the default process group (in place).

    The mesh is made for ``device``'s type explicitly: left to itself, FSDP2 would choose CUDA
    wherever there is a GPU, even for a run on the CPU with gloo.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    _check_shardable(model)
    # FSDP2 warns that a forward returning a view (a sequence model's batch-first transpose of its
    # time-major outputs) could be modified in place past its hooks; the tasks' losses never do.
    warnings.filterwarnings("ignore", r"FSDP2-wrapped module .* returned a view tensor", UserWarning)
    fully_shard(model, mesh=init_device_mesh(device.type, (dist.get_world_size(),)))


def _check_shardable(model: torch.nn.Module) -> None:
    """Refuse what row sharding would get wrong or cannot do (ValueError naming the parameter)."""
    from ..optim import unitary_parameters

    for name, p in unitary_parameters(model):
        if p.dim() != 2:
            raise ValueError(
                f"--fsdp splits unitary matrices by rows; {name} of shape {tuple(p.shape)} is a batch of them "
                "(as in the convolutional models): train it data parallel (leave out --fsdp)"
            )
    for name, p in model.named_parameters():
        if p.is_complex() and p.dim() == 1:
            # torch 2.13's optimisers step a row-sharded 1-D complex DTensor wrongly (view_as_real replicates it).
            raise ValueError(
                f"--fsdp cannot split the complex vector {name} (torch steps a sharded 1-D complex parameter "
                "wrongly): leave out --fsdp, or use a real model or the modrelu nonlinearity"
            )


def gathered(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` whole: a DTensor is all-gathered (every rank must call this), a plain tensor is returned."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def full_state(model: torch.nn.Module, optimizer: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The model's and optimiser's state dicts with every sharded tensor gathered whole.

    A collective: every rank calls it, in the same order, and gets the same dicts, in the format
    an unsharded model and optimiser would give.
    """
    model_state = {name: gathered(value) for name, value in model.state_dict().items()}
    optimizer_state = optimizer.state_dict()
    optimizer_state["state"] = {
        index: {key: gathered(value) if isinstance(value, torch.Tensor) else value for key, value in entry.items()}
        for index, entry in optimizer_state["state"].items()
    }
    return model_state, optimizer_state


def load_full_state(
    model: torch.nn.Module, optimizer: Any, model_state: dict[str, Any], optimizer_state: dict[str, Any]
) -> None:
    """Load whole-tensor state dicts (an unsharded run's, or :func:`full_state`'s) into a sharded model and
    its optimiser: each rank keeps its own rows. Every rank holds the whole dicts, so nothing is sent."""
    current = model.state_dict()
    model.load_state_dict({name: _like(value, current.get(name)) for name, value in model_state.items()})
    params = [p for group in optimizer.param_groups for p in group["params"]]
    optimizer_state = dict(optimizer_state)
    optimizer_state["state"] = {
        index: {
            # Per-row state (Adam's moments, RMSprop's square average) is split like its parameter;
            # scalars such as the step count are not.
            key: _like(value, params[int(index)]) if _same_shape(value, params[int(index)]) else value
            for key, value in entry.items()
        }
        for index, entry in optimizer_state["state"].items()
    }
    optimizer.load_state_dict(optimizer_state)


def _same_shape(value: Any, param: torch.Tensor) -> bool:
    return isinstance(value, torch.Tensor) and value.shape == param.shape


def _like(value: Any, reference: Any) -> Any:
    """``value`` split like ``reference`` when that is a DTensor; else ``value`` unchanged.

    ``src_data_rank=None``: every rank cuts its own rows from its own whole copy, without communication.
    """
    if not isinstance(reference, DTensor) or not isinstance(value, torch.Tensor):
        return value
    value = value.to(device=reference.device, dtype=reference.dtype)
    return distribute_tensor(value, reference.device_mesh, reference.placements, src_data_rank=None)
