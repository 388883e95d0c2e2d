"""Make a parameter of any existing module orthogonal/unitary in one line.

Note [Constraints live on the module]
-------------------------------------
:func:`unitary_` records ``{parameter name: UnitaryConstraint}`` in the
module's own ``__dict__`` (under ``_projunn_constraints``); the built-in
layers (:class:`projunn.nn.UnitaryLinear` and the others) record their
unitary weights there in ``__init__`` the same way. The parameter itself
stays a plain ``nn.Parameter`` with its usual name and shape, so the forward
pass, ``state_dict`` keys and checkpoints of the module are those of the
unconstrained module, and a module attribute, unlike an attribute stuck on a
Parameter object, is kept by ``copy.deepcopy``, pickling (``torch.save`` of
the whole model) and wrappers that re-create parameters (FSDP).
:func:`projunn.optim.param_groups` reads the record and puts the parameter in
a unitary group; a ``state_dict`` round trip keeps the module, hence the
record, and loads only values.

Note [Finding constrained weights]
----------------------------------
An optimiser is usually built from ``model.parameters()``, which says nothing
about constraints, and :class:`projunn.optim.ProjUNN` sees only the base
optimiser's parameters, never the model. So that a constrained weight is kept
unitary wherever it sits in the optimiser's groups, every module holding a
record is also registered in a weak set of modules (a module that is freed
leaves it): :func:`unitary_` and the built-in layers register theirs, and the
record, which knows its module through a weak reference, registers the copy
whenever the module is copied (``copy.deepcopy``) or unpickled
(``torch.load`` of a whole model). A shallow copy (``copy.copy``) shares the
original's record unseen: it is registered when ``param_groups``,
``constraints``, ``is_constrained`` or ``unitary_`` first looks at it. :func:`constrained_weights` reads the
modules' current parameters at the time it is called, so a parameter
replaced after the constraint (``module.weight = nn.Parameter(...)``, FSDP's
sharded parameters) is the one found. Every change of a record advances
:func:`constraint_generation`, which ProjUNN compares once per step to decide
whether its parameters need looking up again: weights that are not
constrained cost nothing per step.

Note [Matrix views]
-------------------
A constraint says which matrices inside the tensor are (semi-)unitary, as a
view of the parameter's storage (no copy):

- ``kind="matrix"``: the last two dimensions, leading dimensions a batch:
  (..., N, M). ``nn.Linear.weight``, ``nn.RNN.weight_hh_l0``.
- ``kind="kernel"``: a convolution kernel (out, in, *k) read as the
  (out, in * prod(k)) matrix whose rows are the flattened filters.
- ``blocks=G``: the rows split into G equal row-slices, each its own
  matrix: (..., G * N, M) is viewed as (..., G, N, M). ``nn.GRU`` stacks its
  gates' recurrent matrices as (3H, H): ``blocks=3`` keeps each gate's H x H
  matrix orthogonal, ``blocks=1`` keeps the stacked (3H, H) matrix
  semi-orthogonal (orthonormal columns).

When the view differs from the parameter's own shape,
:func:`projunn.optim.param_groups` gives the parameter a group with the key
``"matrix_shape"`` (the view's shape), and ProjUNN applies its update to
``param.view(group["matrix_shape"])``: a batch of G matrices costs one
batched update, and the base optimiser's statistics stay in the parameter's
own shape.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import get_args

import torch
from torch.nn.utils import parametrize

from .._constraints import (
    ConstraintKind,
    UnitaryConstraint,
    own_constraints,
    record_constraint,
)
from .._constraints import ConstraintRecord as _Record  # noqa: F401  (named so by whole models pickled earlier)
from .._validation import SUPPORTED_DTYPES, check_choice, check_int
from ..functional import closest_unitary, unitarity_error

__all__ = [
    "ConstraintKind",
    "UnitaryConstraint",
    "constraints",
    "is_constrained",
    "remove_unitary_",
    "unitary_",
]


def constraints(module: torch.nn.Module) -> Mapping[str, UnitaryConstraint]:
    """The unitary parameters of ``module`` and its submodules, with their constraints, read-only.

    Those :func:`unitary_` constrained and those of the built-in layers
    (:class:`projunn.nn.UnitaryLinear`, ...), under the dotted names
    ``module.named_parameters()`` gives them (see Note [Constraints live on the module]).
    :func:`projunn.optim.param_groups` puts exactly these in unitary groups.

    Returns:
        {qualified parameter name: :class:`UnitaryConstraint`}, empty if none.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh())
        >>> dict(constraints(unitary_(model, "0.weight")))
        {'0.weight': UnitaryConstraint(kind='matrix', blocks=1)}
    """
    return MappingProxyType(
        {
            f"{prefix}.{name}" if prefix else name: constraint
            for prefix, sub in module.named_modules()
            for name, constraint in own_constraints(sub).items()
        }
    )


def is_constrained(module: torch.nn.Module, name: str | None = None) -> bool:
    """Whether ``module``'s parameter ``name`` is kept unitary (any parameter below ``module`` if None).

    ``name`` may be a dotted path below ``module``, as for :func:`unitary_`.
    """
    found = constraints(module)
    return bool(found) if name is None else name in found


def unitary_(
    module: torch.nn.Module,
    name: str = "weight",
    *,
    kind: ConstraintKind = "matrix",
    blocks: int = 1,
    project: bool = True,
) -> torch.nn.Module:
    r"""Keep ``module``'s parameter ``name`` orthogonal/unitary, in place; return ``module``.

    The one-line counterpart of ``torch.nn.utils.parametrizations.orthogonal``
    and ``geotorch.orthogonal``, for the projUNN way of training: the weight
    stays a plain parameter (same name, shape and forward cost) and
    :class:`projunn.optim.ProjUNN` keeps it on the group with low-rank steps.
    :func:`projunn.optim.param_groups` puts it in the unitary group, exactly as
    for the built-in layers. Each matrix W of the parameter (Note [Matrix views])
    satisfies

    .. math:: W^H W = I \ (N \ge M), \qquad W W^H = I \ (N < M)

    (orthogonal for real dtypes, unitary for complex; square matrices both).

    With ``project=True`` the current value is replaced once by the closest
    (semi-)unitary matrix in Frobenius norm (the polar factor of each matrix),
    which is how a pretrained or freshly initialised ``nn.Linear`` becomes
    orthogonal. With ``project=False`` the value is kept exactly, and a value
    that is not already (semi-)unitary (``||W^H W - I||_F > 10 eps N``, N the
    smaller side) is refused.

    What is orthogonal for a convolution (``kind="kernel"``): the kernel
    matrix K (out, in * prod(k)), whose rows are the flattened filters. With
    out <= in * prod(k) the filters are orthonormal, so each output pixel is
    a contraction of its input patch and the layer's Lipschitz constant is at
    most sqrt(prod(k)) (stride 1); with out >= in * prod(k) each patch's norm
    is preserved, and a convolution whose stride equals its kernel size
    (non-overlapping patches, e.g. a patch embedding) is then an isometry. It
    is not an orthogonal convolution in general: for that use
    :class:`projunn.nn.UnitaryConv2d`.

    Tied weights are refused: a parameter held by another module (or under a
    second name) would be changed behind that module's back, and two
    constraints on one tensor could disagree. To use one constrained weight
    in two places, use the same module twice. Where the tie lies outside
    ``module`` it is found by :func:`projunn.optim.param_groups`, which
    refuses it the same way.

    Args:
        module: any ``nn.Module``; ``name`` may be a dotted path below it
            (``"rnn.weight_hh_l0"``), which lets ties inside ``module`` be
            found at once.
        name: the parameter to constrain.
        kind: ``"matrix"`` (default: the last two dimensions, leading ones a
            batch) or ``"kernel"`` (a convolution kernel as (out, in*prod(k))).
        blocks: split the rows into this many equal blocks, each its own
            matrix (the gates of ``nn.GRU``: 3, ``nn.LSTM``: 4); default 1.
        project: replace the value by the closest (semi-)unitary one (default),
            or keep it exactly, refusing one that is not (semi-)unitary.

    Returns:
        ``module``.

    Raises:
        TypeError: ``module`` is not a module; ``kind`` not a str or
            ``blocks`` not an int; the parameter's dtype is not
            float32/float64/complex64/complex128 (integer, bool and half
            precisions are refused: keep a float32 weight and use
            ``torch.autocast``).
        ValueError: no such parameter; a parameter already parametrised
            (``torch.nn.utils.parametrize``), already constrained (by this
            function or by its layer, e.g. ``UnitaryLinear.weight``), or tied; a shape with no such matrix view;
            an unknown ``kind``; ``blocks`` < 1; with ``project=False``, a
            value that is not (semi-)unitary.

        Every error is one line naming the module and the parameter, and
        nothing is modified when the call fails.

    Example:
        >>> layer = unitary_(torch.nn.Linear(8, 8, dtype=torch.float64))
        >>> W = layer.weight.detach()
        >>> torch.allclose(W.T @ W, torch.eye(8, dtype=torch.float64))
        True
        >>> gru = unitary_(torch.nn.GRU(4, 6), "weight_hh_l0", blocks=3)
    """
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"unitary_ needs an nn.Module, got {type(module).__name__}")
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty str, got {name!r}")
    path, _, attr = name.rpartition(".")
    try:
        owner = module.get_submodule(path) if path else module
    except AttributeError:
        raise ValueError(f"{type(module).__name__} has no submodule {path!r} (from name {name!r})") from None
    where = f"{name!r} of {type(owner).__name__}"

    def refuse(reason: str, error: type[Exception] = ValueError) -> Exception:
        return error(f"cannot make {where} unitary: {reason}")

    try:
        kind = check_choice("kind", kind, get_args(ConstraintKind))
        blocks = check_int("blocks", blocks)
    except (TypeError, ValueError) as error:
        raise refuse(str(error), type(error)) from None
    param = _free_parameter(owner, attr, refuse)
    constraint = UnitaryConstraint(kind, blocks)
    view = _matrix_view(param, constraint, refuse)
    others = [
        f"{prefix}.{other}" if prefix else other
        for prefix, sub in module.named_modules()
        for other, p in sub._parameters.items()
        if p is param and (sub is not owner or other != attr)
    ]
    if others:
        raise refuse(f"it is tied to {others[0]!r} (shared weights are refused: share the module instead)")
    value = closest_unitary(view) if project else _check_unitary(view, refuse)
    # Everything is checked; only now is anything modified.
    if value is not None:
        with torch.no_grad():
            view.copy_(value)
    record_constraint(owner, attr, constraint)
    return module


def _free_parameter(owner: torch.nn.Module, attr: str, refuse) -> torch.nn.Parameter:
    """``owner``'s parameter ``attr``, if it exists, is neither parametrised nor constrained, and has a
    supported dtype; otherwise ``refuse(reason)`` is raised (see :func:`unitary_`)."""
    if parametrize.is_parametrized(owner, attr):
        raise refuse("it is already parametrised (torch.nn.utils.parametrize); remove that parametrisation first")
    param = owner._parameters.get(attr)
    if param is None:
        found = "is None" if attr in owner._parameters else "does not exist"
        raise refuse(f"the parameter {found}; parameters: {', '.join(owner._parameters) or 'none'}")
    if attr in own_constraints(owner):
        raise refuse(
            "it is already constrained (by unitary_ or by its layer); to change the constraint, "
            "call projunn.nn.remove_unitary_ first"
        )
    if param.dtype not in SUPPORTED_DTYPES:
        hint = (
            "; keep the weight in float32 and use torch.autocast for half-precision compute"
            if param.is_floating_point()
            else ""
        )
        names = ", ".join(str(d).removeprefix("torch.") for d in SUPPORTED_DTYPES)
        raise refuse(f"dtype {param.dtype} is not one of {names}{hint}", TypeError)
    return param


def _matrix_view(param: torch.Tensor, constraint: UnitaryConstraint, refuse) -> torch.Tensor:
    """The constraint's matrices as a view of ``param``'s data (Note [Matrix views]), or ``refuse``."""
    try:
        shape = constraint.matrix_shape(param.shape)
        if 0 in shape:
            raise ValueError(f"shape {tuple(param.shape)} has an empty dimension")
    except ValueError as error:
        raise refuse(f"{error} (kind={constraint.kind!r}, blocks={constraint.blocks})") from None
    try:
        return param.detach().view(shape)
    except RuntimeError:
        raise refuse(f"its strides {param.stride()} do not allow a matrix view; make it contiguous first") from None


def _check_unitary(view: torch.Tensor, refuse) -> None:
    """``project=False``: the value is kept, so it must be (semi-)unitary to ``10 eps N`` already."""
    error = float(unitarity_error(view).max())
    tolerance = 10 * torch.finfo(view.dtype).eps * min(view.shape[-2:])
    if not error <= tolerance:
        raise refuse(
            f"||W^H W - I||_F = {error:.3g} exceeds {tolerance:.3g} and project=False keeps the value; "
            "pass project=True to start from the closest unitary matrix"
        )


def remove_unitary_(module: torch.nn.Module, name: str = "weight") -> torch.nn.Module:
    """Undo :func:`unitary_`: the parameter (its current value kept) is an ordinary one again; return ``module``.

    Raises:
        ValueError: the parameter was not constrained by :func:`unitary_`.
    """
    path, _, attr = name.rpartition(".")
    owner = module.get_submodule(path) if path else module
    if attr not in own_constraints(owner):
        raise ValueError(f"{name!r} of {type(owner).__name__} is not constrained by projunn.nn.unitary_")
    record_constraint(owner, attr, None)
    return module
