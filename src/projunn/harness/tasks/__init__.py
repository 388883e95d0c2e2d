"""Tasks of the paper's experiments: data, models, losses, metrics, baselines, defaults."""

from ..datasets import DatasetMissingError, ImageSet, load_images, read_idx
from ._registry import (
    TASK_OPTIONS,
    TASKS,
    AddingTask,
    CopyTask,
    ImageTask,
    PixelMNISTTask,
    RunData,
    Task,
    UnitaryTargetTask,
    describe_tasks,
    get_task,
)
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

__all__ = [
    "COPY_ALPHABET",
    "COPY_BLANK",
    "COPY_MARKER",
    "COPY_SYMBOLS",
    "TASKS",
    "TASK_OPTIONS",
    "AddingTask",
    "CopyTask",
    "DatasetMissingError",
    "ImageSet",
    "ImageTask",
    "PixelMNISTTask",
    "RunData",
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
