"""Layers holding plain parameters that the optimiser keeps orthogonal/unitary."""

from ._cnn import ChannelPad, DeepUnitaryCNN, SpaceToDepth
from ._constrain import KINDS, UnitaryConstraint, constraints, is_constrained, remove_unitary_, unitary_
from ._conv import UnitaryConv2d, frequency_layout
from ._linear import OrthogonalLinear, StiefelLinear, UnitaryLinear, init_unitary_
from ._models import SequenceModel
from ._recurrence import flush_denormals, unitary_recurrence
from ._resnet import UnitaryResNet9
from ._rnn import INPUT_INITS, NONLINEARITIES, ComplexToReal, ModReLU, UnitaryRNN, UnitaryRNNCell

__all__ = [
    "INPUT_INITS",
    "KINDS",
    "NONLINEARITIES",
    "ChannelPad",
    "ComplexToReal",
    "DeepUnitaryCNN",
    "ModReLU",
    "OrthogonalLinear",
    "SequenceModel",
    "SpaceToDepth",
    "StiefelLinear",
    "UnitaryConstraint",
    "UnitaryConv2d",
    "UnitaryLinear",
    "UnitaryRNN",
    "UnitaryRNNCell",
    "UnitaryResNet9",
    "constraints",
    "flush_denormals",
    "frequency_layout",
    "init_unitary_",
    "is_constrained",
    "remove_unitary_",
    "unitary_",
    "unitary_recurrence",
]
