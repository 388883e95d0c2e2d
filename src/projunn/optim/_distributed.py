"""Checkpoints of sharded models with ``torch.distributed.checkpoint``: ProjUNN's state beside torch's."""

from __future__ import annotations

import warnings
from typing import Any

import torch

__all__ = ["distributed_state_dict", "load_distributed_state_dict"]


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
    optimizer.load_projunn_state(state["projunn"])
