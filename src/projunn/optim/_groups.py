"""Build parameter groups that say explicitly which weights are unitary."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch.nn.utils import parametrize

from .._constraints import own_constraints
from ..functional import Sketch

if TYPE_CHECKING:  # _projunn imports this module
    from ._projunn import Method

__all__ = ["param_groups", "unitary_parameters"]

#: Group key: every parameter p of a unitary group with this key is kept unitary as
#: ``p.view(group["matrix_shape"])``. See Note [Matrix views] in ``projunn.nn._constrain``.
MATRIX_SHAPE = "matrix_shape"


def matrix_view(param: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
    """``param`` as the matrices its group keeps unitary: a view sharing its storage (or ``param`` itself)."""
    shape = group.get(MATRIX_SHAPE)
    return param if shape is None else param.view(shape)


def constrained_slots(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module, str]]:
    """(qualified name, module, attribute) of every weight ``model`` declares unitary.

    The rule is visible and lives on modules, not on Parameter objects
    (attributes on parameters are lost by deepcopy and FSDP): the weights
    :func:`projunn.nn.unitary_` constrained and those the built-in layers
    (:class:`projunn.nn.UnitaryLinear`, ...) keep unitary are recorded on
    their modules (Note [Constraints live on the module] in
    ``projunn.nn._constrain``). A slot counts whether it holds a plain
    parameter or a weight computed by a ``torch.nn.utils.parametrize``
    parametrisation; attributes set to None are skipped.
    """
    return [
        (f"{prefix}.{name}" if prefix else name, module, name)
        for prefix, module in model.named_modules()
        for name in own_constraints(module)
        if module._parameters.get(name) is not None or parametrize.is_parametrized(module, name)
    ]


def unitary_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The (qualified name, parameter) pairs of ``model`` that are meant to be unitary.

    The plain parameters among :func:`constrained_slots`. A parameter shared by
    several modules is listed once.
    """
    found: list[tuple[str, torch.nn.Parameter]] = []
    seen: set[int] = set()
    for qualified, module, name in constrained_slots(model):
        param = module._parameters.get(name)
        if param is not None and id(param) not in seen:
            seen.add(id(param))
            found.append((qualified, param))
    return found


def param_groups(
    model: torch.nn.Module,
    *,
    unitary_lr: float | None = None,
    method: Method | None = None,
    rank: int | None = None,
    sketch: Sketch | None = None,
    include_parametrized: bool = False,
) -> list[dict[str, Any]]:
    """Split ``model``'s parameters into an ordinary group and a unitary group.

    The unitary group is ``{"params": [...], "unitary": True,
    "weight_decay": 0.0, ...}`` plus ``lr``/``method``/``rank``/``sketch``
    when given (otherwise the optimiser's and ProjUNN's defaults apply).
    Weight decay is switched off for unitary weights: it only pulls them
    radially, which the projUNN step removes, so it would waste the sketch's
    rank. Empty groups are left out.

    A parameter constrained by :func:`projunn.nn.unitary_` whose matrices are
    a view of a different shape (``kind="kernel"``, ``blocks`` > 1) goes into
    a further unitary group, one per shape, with the same settings and the
    key ``"matrix_shape"``: ProjUNN updates ``param.view(matrix_shape)``
    (Note [Matrix views] in ``projunn.nn._constrain``).

    A unitary weight that a ``torch.nn.utils.parametrize`` parametrisation
    computes (``parametrizations.orthogonal``, to compare against torch's maps)
    is not a parameter; its free tensor ``parametrizations.<name>.original``
    is an ordinary parameter unless ``include_parametrized`` is set.

    Args:
        model: module whose parameters to split (see :func:`unitary_parameters`).
        unitary_lr: learning rate of the unitary group (the paper: lr/32 for
            RNNs, lr/10 for convolutions).
        method, rank, sketch: per-group ProjUNN settings.
        include_parametrized: put the free tensors of parametrised unitary
            weights into a last unitary group with the same settings but
            ``method="none"`` (the parametrisation, not ProjUNN, keeps the
            weight on the group), so they get ``unitary_lr`` too.

    Returns:
        A list to pass to any ``torch.optim`` optimiser's constructor.

    Raises:
        ValueError: a parameter constrained by :func:`projunn.nn.unitary_`
            is also held by another module or under another name (tied
            weights are refused; share the module instead).

    Example:
        >>> model = torch.nn.Sequential(projunn.nn.UnitaryLinear(8), torch.nn.Linear(8, 2))
        >>> [len(g["params"]) for g in param_groups(model, unitary_lr=1e-4)]
        [2, 1]
    """
    views = _constrained_views(model)
    unitary_ids = {id(p) for _, p in unitary_parameters(model)}
    originals = _parametrized_originals(model) if include_parametrized else []
    excluded = unitary_ids | {id(p) for p in originals}
    ordinary = [p for p in model.parameters() if id(p) not in excluded]
    settings: dict[str, Any] = {"unitary": True, "weight_decay": 0.0}
    for key, value in (("lr", unitary_lr), ("method", method), ("rank", rank), ("sketch", sketch)):
        if value is not None:
            settings[key] = value
    unitary: dict[tuple[int, ...] | None, list[torch.nn.Parameter]] = {None: []}
    for p in model.parameters():
        if id(p) in unitary_ids:
            unitary.setdefault(views.get(id(p)), []).append(p)
    view_groups = [{"params": ps, **settings, MATRIX_SHAPE: shape} for shape, ps in unitary.items() if shape]
    parametrized = {"params": originals, **settings, "method": "none"}
    groups = [{"params": ordinary}, {"params": unitary[None], **settings}, *view_groups, parametrized]
    return [group for group in groups if group["params"]]


def _parametrized_originals(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The free tensors of the unitary weights a ``torch.nn.utils.parametrize`` parametrisation computes."""
    found: dict[int, torch.nn.Parameter] = {}
    for _, module, name in constrained_slots(model):
        if parametrize.is_parametrized(module, name):
            original = module.parametrizations[name].original
            found.setdefault(id(original), original)
    return list(found.values())


def _constrained_views(model: torch.nn.Module) -> dict[int, tuple[int, ...]]:
    """id(param) -> matrix shape, for constrained parameters read through a view; ties refused."""
    holders: dict[int, list[str]] = {}
    for prefix, module in model.named_modules():
        for name, p in module._parameters.items():
            if p is not None:
                holders.setdefault(id(p), []).append(f"{prefix}.{name}" if prefix else name)
    views = {}
    for prefix, module in model.named_modules():
        for name, constraint in own_constraints(module).items():
            p = module._parameters.get(name)
            if p is None:
                continue
            qualified = f"{prefix}.{name}" if prefix else name
            tied = [h for h in holders[id(p)] if h != qualified]
            if tied:
                raise ValueError(
                    f"{qualified!r} of {type(module).__name__} is constrained unitary but tied to {tied[0]!r}; "
                    "shared weights are refused (share the module instead)"
                )
            shape = constraint.matrix_shape(p.shape)
            if shape != tuple(p.shape):
                views[id(p)] = shape
    return views
