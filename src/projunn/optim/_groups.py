"""Build parameter groups that say explicitly which weights are unitary."""

from __future__ import annotations

from typing import Any

import torch
from torch.nn.utils import parametrize

__all__ = ["param_groups", "unitary_parameters"]


def unitary_slots(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module, str]]:
    """(qualified name, module, attribute) of every weight ``model`` declares unitary.

    The rule is visible and lives on module *classes*, not on Parameter
    objects (attributes on parameters are lost by deepcopy and FSDP): a module
    whose class defines ``unitary_parameter_names`` (a tuple of attribute
    names, as :class:`projunn.nn.UnitaryLinear` does) declares those
    attributes unitary. A slot counts whether it holds a plain parameter or a
    weight computed by a ``torch.nn.utils.parametrize`` parametrisation;
    attributes set to None are skipped.
    """
    return [
        (f"{prefix}.{name}" if prefix else name, module, name)
        for prefix, module in model.named_modules()
        for name in getattr(type(module), "unitary_parameter_names", ())
        if module._parameters.get(name) is not None or parametrize.is_parametrized(module, name)
    ]


def unitary_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The (qualified name, parameter) pairs of ``model`` that are meant to be unitary.

    The plain parameters among :func:`unitary_slots`. A parameter shared by
    several modules is listed once.
    """
    found: list[tuple[str, torch.nn.Parameter]] = []
    seen: set[int] = set()
    for qualified, module, name in unitary_slots(model):
        param = module._parameters.get(name)
        if param is not None and id(param) not in seen:
            seen.add(id(param))
            found.append((qualified, param))
    return found


def param_groups(
    model: torch.nn.Module,
    *,
    unitary_lr: float | None = None,
    method: str | None = None,
    rank: int | None = None,
    sketch: str | None = None,
) -> list[dict[str, Any]]:
    """Split ``model``'s parameters into an ordinary group and a unitary group.

    The unitary group is ``{"params": [...], "unitary": True,
    "weight_decay": 0.0, ...}`` plus ``lr``/``method``/``rank``/``sketch``
    when given (otherwise the optimiser's and ProjUNN's defaults apply).
    Weight decay is switched off for unitary weights: it only pulls them
    radially, which the projUNN step removes, so it would waste the sketch's
    rank. Empty groups are left out.

    Args:
        model: module whose parameters to split (see :func:`unitary_parameters`).
        unitary_lr: learning rate of the unitary group (the paper: lr/32 for
            RNNs, lr/10 for convolutions).
        method, rank, sketch: per-group ProjUNN settings.

    Returns:
        A list to pass to any ``torch.optim`` optimiser's constructor.

    Example:
        >>> model = torch.nn.Sequential(projunn.nn.UnitaryLinear(8), torch.nn.Linear(8, 2))
        >>> [len(g["params"]) for g in param_groups(model, unitary_lr=1e-4)]
        [2, 1]
    """
    unitary_ids = {id(p) for _, p in unitary_parameters(model)}
    ordinary = [p for p in model.parameters() if id(p) not in unitary_ids]
    unitary = [p for p in model.parameters() if id(p) in unitary_ids]
    unitary_group: dict[str, Any] = {"params": unitary, "unitary": True, "weight_decay": 0.0}
    for key, value in (("lr", unitary_lr), ("method", method), ("rank", rank), ("sketch", sketch)):
        if value is not None:
            unitary_group[key] = value
    return [group for group in ({"params": ordinary}, unitary_group) if group["params"]]
