"""The record of which parameters are constrained, shared by :mod:`projunn.nn` (which writes it) and
:mod:`projunn.optim` (which finds the constrained weights from it).

Notes [Constraints live on the module], [Finding constrained weights] and [Matrix views] in
:mod:`projunn.nn._constrain` derive the design. It lives at the package root, as ``_validation``
does, so that neither subpackage imports a private module of the other.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch

__all__ = [
    "ConstraintKind",
    "ConstraintRecord",
    "UnitaryConstraint",
    "constrained_weights",
    "constraint_generation",
    "declare_unitary",
    "own_constraints",
    "record_constraint",
]

#: How a constrained tensor is read as matrices (Note [Matrix views]).
ConstraintKind = Literal["matrix", "kernel"]

_RECORD = "_projunn_constraints"

# Note [Finding constrained weights]: the modules that hold a record, and a count of record changes.
_owners: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()
_changes = [0]


def _register(owner: torch.nn.Module) -> None:
    _owners.add(owner)
    _changes[0] += 1


def constraint_generation() -> int:
    """A number that changes whenever a constraint is added, removed, copied or unpickled anywhere."""
    return _changes[0]


@dataclass(frozen=True)
class UnitaryConstraint:
    """How one parameter is read as (a batch of) (semi-)unitary matrices. See Note [Matrix views].

    Attributes:
        kind: ``"matrix"`` or ``"kernel"``.
        blocks: number of equal row-slices, each its own matrix.
    """

    kind: ConstraintKind = "matrix"
    blocks: int = 1

    def matrix_shape(self, shape: torch.Size | tuple[int, ...]) -> tuple[int, ...]:
        """The shape of the matrix view of a tensor of ``shape``; ValueError if there is none."""
        shape = tuple(shape)
        if len(shape) < 2:
            raise ValueError(f"shape {shape} is not a matrix (it needs at least 2 dimensions)")
        if self.kind == "kernel":
            shape = (shape[0], math.prod(shape[1:]))
        *batch, rows, cols = shape
        if rows % self.blocks:
            raise ValueError(f"shape {tuple(shape)} has {rows} rows, which do not split into blocks={self.blocks}")
        if self.blocks > 1:
            batch, rows = [*batch, self.blocks], rows // self.blocks
        return (*batch, rows, cols)

    def matrix(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` viewed as its matrices, sharing its storage (writes go to ``tensor``)."""
        return tensor.view(self.matrix_shape(tensor.shape))


class ConstraintRecord(dict):
    """{parameter name: UnitaryConstraint} of one module, stored in its ``__dict__``.

    A dict that knows its module (weakly), so that a copy of the module registers itself: see
    Note [Finding constrained weights].
    """

    def __init__(self, owner: torch.nn.Module, entries: Mapping[str, UnitaryConstraint]):
        super().__init__(entries)
        self._owner = weakref.ref(owner)
        _register(owner)

    def __deepcopy__(self, memo: dict) -> dict:
        # Copied as part of its module, whose copy deepcopy has already made and put in ``memo``.
        owner = self._owner()
        copied = memo.get(id(owner), owner)
        return dict(self) if copied is None else ConstraintRecord(copied, self)

    def __reduce__(self):
        # Pickled within its module's state: pickle has the module already and restores the reference.
        # A record whose module is gone (one a shallow copy shared) is saved as its entries; the
        # module holding it is registered when first looked at (own_constraints).
        owner = self._owner()
        return (dict, (dict(self),)) if owner is None else (ConstraintRecord, (owner, dict(self)))


def own_constraints(module: torch.nn.Module) -> Mapping[str, UnitaryConstraint]:
    """The constraints recorded on ``module`` itself, its record made its own and registered if needed.

    ``copy.copy`` of a module (which no hook sees) shares the original's record, and a record
    saved after its module was freed is loaded as plain entries: either is made ``module``'s own
    here, so that the module is found (Note [Finding constrained weights]).
    """
    record = module.__dict__.get(_RECORD)
    if record is None:
        return {}
    if not isinstance(record, ConstraintRecord) or record._owner() is not module:
        record = module.__dict__[_RECORD] = ConstraintRecord(module, record)
    return record


def record_constraint(module: torch.nn.Module, name: str, constraint: UnitaryConstraint | None) -> None:
    """Set (or, with None, remove) the constraint of ``module``'s parameter ``name``."""
    entries = {**own_constraints(module), name: constraint}
    if constraint is None:
        del entries[name]
    if entries:
        module.__dict__[_RECORD] = ConstraintRecord(module, entries)
    else:
        module.__dict__.pop(_RECORD, None)
        _changes[0] += 1


def declare_unitary(module: torch.nn.Module, *names: str) -> None:
    """Record ``module``'s parameters ``names`` as (batches of) unitary matrices, in the layer's ``__init__``.

    What the built-in layers call for the weights they keep unitary; no value is checked or changed.
    """
    for name in names:
        record_constraint(module, name, UnitaryConstraint())


def constrained_weights() -> dict[int, tuple[torch.nn.Parameter, UnitaryConstraint, str]]:
    """Every constrained parameter of every live module: id -> (parameter, constraint, "Class.name").

    See Note [Finding constrained weights]; the parameters are read from their modules now.
    """
    found = {}
    for owner in list(_owners):
        for name, constraint in own_constraints(owner).items():
            param = owner._parameters.get(name)
            if param is not None:
                found[id(param)] = (param, constraint, f"{type(owner).__name__}.{name}")
    return found
