"""projunn: exact orthogonal and unitary weights trained by low-rank projUNN steps.

Submodules:
    functional  pure tensor maths: projunn_d, projunn_t, lowrank, unitarity_error
    optim       ProjUNN: makes any torch.optim optimiser keep chosen weights unitary
    nn          layers that hold unitary weights
"""

from . import functional, nn, optim

__version__ = "0.1.0"

__all__ = ["__version__", "functional", "nn", "optim"]
