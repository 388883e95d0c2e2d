"""Optimiser integration: any torch.optim optimiser plus exact unitary projUNN steps."""

from ._distributed import distributed_state_dict, load_distributed_state_dict
from ._groups import param_groups, unitary_parameters
from ._projunn import Method, ProjUNN

__all__ = [
    "Method",
    "ProjUNN",
    "distributed_state_dict",
    "load_distributed_state_dict",
    "param_groups",
    "unitary_parameters",
]
