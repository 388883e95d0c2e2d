"""Optimiser integration: any torch.optim optimiser plus exact unitary projUNN steps."""

from ._groups import param_groups, unitary_parameters
from ._projunn import METHODS, ProjUNN

__all__ = ["METHODS", "ProjUNN", "param_groups", "unitary_parameters"]
