"""Tasks of the paper's experiments: data, models, losses, metrics, baselines, defaults (one
:class:`Task` subclass each, registered in ``_registry.TASKS``)."""

from ..datasets import DatasetMissingError, ImageSet, load_images, read_idx
from ._base import Task
from ._images import ImageTask, PixelMNISTTask
from ._registry import TASKS, describe_tasks, get_task
from ._sequence import AddingTask, CopyTask
from ._synthetic import (
    COPY_ALPHABET,
    COPY_BLANK,
    COPY_MARKER,
    COPY_SYMBOLS,
    adding_baseline,
    adding_batch,
    copy_baseline,
    copy_batch,
)
from ._unitary import UnitaryTargetTask

__all__ = [
    "COPY_ALPHABET",
    "COPY_BLANK",
    "COPY_MARKER",
    "COPY_SYMBOLS",
    "TASKS",
    "AddingTask",
    "CopyTask",
    "DatasetMissingError",
    "ImageSet",
    "ImageTask",
    "PixelMNISTTask",
    "Task",
    "UnitaryTargetTask",
    "adding_baseline",
    "adding_batch",
    "copy_baseline",
    "copy_batch",
    "describe_tasks",
    "get_task",
    "load_images",
    "read_idx",
]
