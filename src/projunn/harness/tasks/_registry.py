"""The tasks ``projunn train`` knows, registered here: a task is a :class:`~._base.Task` subclass in
a file of its own (its options, defaults, paper preset, model, batches and scores) and one entry in
:data:`TASKS`; the command line's choices, flags and help follow from it."""

from __future__ import annotations

from ._base import Task
from ._images import ImageTask, PixelMNISTTask
from ._sequence import AddingTask, CopyTask
from ._unitary import UnitaryTargetTask

__all__ = ["TASKS", "describe_tasks", "get_task"]

TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        CopyTask(),
        AddingTask(),
        PixelMNISTTask(permuted=True),
        PixelMNISTTask(permuted=False),
        UnitaryTargetTask(),
        ImageTask("mnist", "mnist", "MNIST digits, orthogonal convs (--model cnn|resnet9, --depth; accuracy)"),
        ImageTask("fashion-mnist", "fashion-mnist", "Fashion-MNIST, orthogonal convs (--model cnn|resnet9; accuracy)"),
        ImageTask("cifar10", "cifar10", "CIFAR-10 from --data-dir, orthogonal convs (--model cnn|resnet9)"),
    )
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[name]


def describe_tasks() -> str:
    return "\n".join(f"  {name:14s} {task.description}" for name, task in TASKS.items())
