"""Layers holding plain parameters that the optimiser keeps orthogonal/unitary."""

from ._linear import OrthogonalLinear, UnitaryLinear, init_unitary_

__all__ = ["OrthogonalLinear", "UnitaryLinear", "init_unitary_"]
