"""Layers holding plain parameters that the optimiser keeps orthogonal/unitary."""

from ._linear import OrthogonalLinear, UnitaryLinear, init_unitary_
from ._models import SequenceModel
from ._rnn import NONLINEARITIES, ComplexToReal, ModReLU, UnitaryRNN, UnitaryRNNCell

__all__ = [
    "NONLINEARITIES",
    "ComplexToReal",
    "ModReLU",
    "OrthogonalLinear",
    "SequenceModel",
    "UnitaryLinear",
    "UnitaryRNN",
    "UnitaryRNNCell",
    "init_unitary_",
]
