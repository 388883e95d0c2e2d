"""Tasks of the paper's experiments: data, models, losses, metrics, baselines, defaults (one
:class:`Task` subclass each, registered in ``_registry.TASKS``). The data generators of the copy
and adding tasks are in :mod:`._synthetic`, the data set readers in :mod:`projunn.harness.datasets`."""

from ..datasets import DatasetMissingError
from ._base import Task
from ._registry import TASKS, describe_tasks, get_task

__all__ = ["TASKS", "DatasetMissingError", "Task", "describe_tasks", "get_task"]
