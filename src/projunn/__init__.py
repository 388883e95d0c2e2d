"""projunn: exact orthogonal and unitary weights trained by low-rank projUNN steps.

Submodules:
    functional  pure tensor maths: projunn_d, projunn_t, lowrank, unitarity_error
    optim       ProjUNN: makes any torch.optim optimiser keep chosen weights unitary
    nn          layers that hold unitary weights
    tasks       the experiments' data, models and baselines (imported on first use)
    bench       the timings behind ``projunn bench`` (imported on first use)
"""

import importlib as _importlib

from . import functional, nn, optim

__version__ = "0.1.0"

__all__ = ["__version__", "functional", "nn", "optim"]

# Submodules the core does not need (data sets, benchmarks) load on first access, so that
# ``import projunn`` stays light and ``projunn.tasks`` works without ``import projunn.tasks``.
_LAZY_SUBMODULES = ("tasks", "bench")


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        return _importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_SUBMODULES))
