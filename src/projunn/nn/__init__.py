"""Layers holding plain parameters that the optimiser keeps orthogonal/unitary, and the constraint API.

:func:`unitary_` constrains a parameter of any existing module. The paper's
models, built from these layers, are in :mod:`projunn.models`.
"""

from ._constrain import ConstraintKind, UnitaryConstraint, constraints, is_constrained, remove_unitary_, unitary_
from ._conv import UnitaryConv2d
from ._linear import OrthogonalLinear, StiefelLinear, UnitaryLinear, unitary_init_
from ._recurrence import Nonlinearity, unitary_recurrence
from ._rnn import ComplexToReal, InputInit, ModReLU, UnitaryRNN, UnitaryRNNCell
from ._shape import ChannelPad, SpaceToDepth

__all__ = [
    "ChannelPad",
    "ComplexToReal",
    "ConstraintKind",
    "InputInit",
    "ModReLU",
    "Nonlinearity",
    "OrthogonalLinear",
    "SpaceToDepth",
    "StiefelLinear",
    "UnitaryConstraint",
    "UnitaryConv2d",
    "UnitaryLinear",
    "UnitaryRNN",
    "UnitaryRNNCell",
    "constraints",
    "is_constrained",
    "remove_unitary_",
    "unitary_",
    "unitary_init_",
    "unitary_recurrence",
]
