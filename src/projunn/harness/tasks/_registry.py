"""The tasks ``projunn train`` knows, registered here: a task is a :class:`~._base.Task` subclass in
a file of its own (its options, defaults, paper preset, model, batches and scores) and one entry in
:data:`TASKS`; the command line's choices, flags and help follow from it."""

from __future__ import annotations

from ._base import Task
from ._images import ImageTask, PixelMNISTTask
from ._sequence import AddingTask, CopyTask
from ._unitary import UnitaryTargetTask

__all__ = ["TASKS", "describe_tasks", "get_task"]

#: Certified radii (L2, pixels in [0, 1]) of the Lipschitz model's test scores. MNIST and CIFAR-10:
#: those the literature reports (1.58 on MNIST; 36, 72 and 108 / 255 on CIFAR-10). Fashion-MNIST:
#: MNIST's times 0.75, the ratio of the two sets' median half-distance from a test image to the
#: nearest training image of another class (2.32 against 3.08; 1,000 test and 20,000 training
#: images each), about the largest radius a classifier could certify for the median test image.
MNIST_RADII, FASHION_RADII, CIFAR_RADII = (0.5, 1.0, 1.58), (0.375, 0.75, 1.19), (36 / 255, 72 / 255, 108 / 255)

TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        CopyTask(),
        AddingTask(),
        PixelMNISTTask(permuted=True),
        PixelMNISTTask(permuted=False),
        UnitaryTargetTask(),
        ImageTask(
            "mnist", "mnist", "MNIST digits, orthogonal convs (--model cnn|resnet9|lipschitz; accuracy)", MNIST_RADII
        ),
        ImageTask("fashion-mnist", "fashion-mnist", "Fashion-MNIST, as mnist", FASHION_RADII),
        ImageTask("cifar10", "cifar10", "CIFAR-10 from --data-dir, as mnist", CIFAR_RADII),
    )
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[name]


def describe_tasks() -> str:
    return "\n".join(f"  {name:14s} {task.description}" for name, task in TASKS.items())
