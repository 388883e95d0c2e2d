"""Data-parallel training under ``torchrun``: which replica this is, and the few things replicas must agree on.

``torchrun --nproc_per_node P -m projunn train ...`` starts P processes with
RANK/WORLD_SIZE/LOCAL_RANK in the environment. Each builds the same model
(same seed), DistributedDataParallel averages the gradients, and projUNN's
sketches are seeded identically (Note [Sketches under data parallelism] in
:mod:`projunn.optim`), so every replica applies the identical step. Each
replica trains on its own contiguous slice of every global batch, so a run
on P processes sees the same global batches as a run on one. Only rank 0
writes files; the others keep no state of their own to lose.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

__all__ = ["Replicas", "start_replicas"]

T = TypeVar("T")


@dataclass(frozen=True)
class Replicas:
    """This process's place among the data-parallel replicas (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    owns_group: bool = False  # the process group was started here, so it is closed here
    #: The group of the host-side agreements (:meth:`largest`): gloo over CPU tensors, so that taking
    #: them every step never waits for a GPU (None: the default group, gloo already on CPU runs).
    control: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        """This replica's contiguous slice of a global batch (dimension 0)."""
        if not self.distributed:
            return batch
        size = batch.shape[0] // self.world
        return batch[self.rank * size : (self.rank + 1) * size]

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of a scalar over replicas (the global batch's loss from the shards' losses)."""
        if not self.distributed:
            return value
        total = value.detach().clone()
        dist.all_reduce(total)
        return total / self.world

    def largest(self, *values: float) -> tuple[float, ...]:
        """Each value's largest over replicas, in one all-reduce of a CPU tensor: stops (a signal, the
        time budget) are taken together, at the same step, without waiting for any GPU."""
        if not self.distributed:
            return values
        reduced = torch.tensor([float(value) for value in values])
        dist.all_reduce(reduced, op=dist.ReduceOp.MAX, group=self.control)
        return tuple(reduced.tolist())

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 only; an exception there is raised on every replica (none is left waiting).

        Interrupts included: a second stop signal while rank 0 writes the checkpoint stops every
        replica, which would otherwise wait in the broadcast where their own handlers cannot run.
        """
        if not self.distributed:
            return fn()
        result: list[Any] = [None, None]
        if self.is_main:
            try:
                result[0] = fn()
            except BaseException as error:
                result[1] = error
        dist.broadcast_object_list(result, src=0)
        if result[1] is not None:
            raise result[1]
        return result[0]

    def close(self) -> None:
        """Close what was started here: the process group (with its subgroups), or else the control group."""
        if not dist.is_initialized():
            return
        if self.owns_group:
            dist.destroy_process_group()
        elif self.control is not None:
            dist.destroy_process_group(self.control)


def start_replicas(device_name: str) -> tuple[Replicas, str]:
    """Join the process group torchrun describes, if any; returns the replicas and the device to use.

    gloo on CPU, nccl on CUDA (one GPU per process, by LOCAL_RANK).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Replicas(), device_name
    use_cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    owns = not dist.is_initialized()
    if owns:
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo")
    control = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None
    replicas = Replicas(rank=dist.get_rank(), world=dist.get_world_size(), owns_group=owns, control=control)
    return replicas, (f"cuda:{local_rank}" if use_cuda else "cpu")
