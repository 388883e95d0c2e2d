"""Layers holding plain parameters that the optimiser keeps orthogonal/unitary, and the constraint API.

:func:`unitary_` constrains a parameter of any existing module. The paper's
models, built from these layers, are in :mod:`projunn.models`. :func:`eunn`
(:class:`EUNN`) computes a weight instead with EUNN's mesh of rotations, a
``torch.nn.utils.parametrize`` parametrisation: a baseline to compare against.
"""

from ._activation import MaxMin
from ._constrain import ConstraintKind, UnitaryConstraint, constraints, is_constrained, remove_unitary_, unitary_
from ._conv import UnitaryConv2d
from ._eunn import EUNN, eunn, eunn_matrix
from ._linear import OrthogonalLinear, StiefelLinear, UnitaryLinear, unitary_init_
from ._recurrence import Nonlinearity, unitary_recurrence
from ._rnn import ComplexToReal, InputInit, ModReLU, UnitaryRNN, UnitaryRNNCell
from ._shape import ChannelPad, SpaceToDepth

__all__ = [
    "EUNN",
    "ChannelPad",
    "ComplexToReal",
    "ConstraintKind",
    "InputInit",
    "MaxMin",
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
    "eunn",
    "eunn_matrix",
    "is_constrained",
    "remove_unitary_",
    "unitary_",
    "unitary_init_",
    "unitary_recurrence",
]
