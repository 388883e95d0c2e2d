"""projunn: exact orthogonal and unitary weights trained by low-rank projUNN steps.

The library needs only torch:

    functional  pure tensor maths: projunn_d, projunn_t, lowrank, unitarity_error
    optim       ProjUNN: makes any torch.optim optimiser keep chosen weights unitary
    nn          layers that hold unitary weights, and unitary_ for any module's weight
    models      the paper's models built from those layers
    robust      certified radii of Lipschitz networks, their bound and soundness checks

The experiment harness (the ``projunn`` command line, its tasks, data sets and
benchmarks) is :mod:`projunn.harness`, with its own extra:
``pip install 'projunn[harness]'``.
"""

from . import functional, models, nn, optim, robust

__version__ = "0.1.0"

__all__ = ["__version__", "functional", "models", "nn", "optim", "robust"]
