"""The experiment harness: the ``projunn`` command line, its training loop, tasks, data sets and benchmarks.

The library (:mod:`projunn.functional`, :mod:`projunn.optim`, :mod:`projunn.nn`)
needs only torch. The harness needs the ``harness`` extra as well
(``pip install 'projunn[harness]'``: numpy, tqdm, matplotlib), so its
submodules load on first use and ``import projunn.harness`` alone stays light::

    train      TrainConfig, resolve, train: one run into a folder (what ``projunn train`` calls)
    tasks      the paper's tasks: data, models, losses, baselines, presets
    datasets   MNIST / Fashion-MNIST / CIFAR-10 readers
    bench      the timings behind ``projunn bench``
    cli        the argument parser and ``main``
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

__all__ = ["EXTRA_MODULES", "console_main", "missing_extra"]

# What the harness imports beyond torch; pyproject.toml's "harness" extra installs them.
EXTRA_MODULES = ("numpy", "tqdm", "matplotlib")
_SUBMODULES = ("bench", "cli", "datasets", "tasks", "train")


def missing_extra() -> list[str]:
    """The harness's dependencies that are not installed (empty when the command line can run)."""
    return [name for name in EXTRA_MODULES if importlib.util.find_spec(name) is None]


def console_main() -> None:
    """The ``projunn`` command: a one-line hint instead of a traceback when the harness extra is missing."""
    missing = missing_extra()
    if missing:
        print(
            f"projunn: the command line needs the harness extra (missing: {', '.join(missing)}); "
            "install it with: pip install 'projunn[harness]'",
            file=sys.stderr,
        )
        sys.exit(1)
    from .cli import console_main as run_command_line

    run_command_line()


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_SUBMODULES))
