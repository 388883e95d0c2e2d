"""The memory a ``projunn train`` run needs, estimated from its settings before anything is allocated.

A run whose settings ask for terabytes (``--seq-len 1000000000``) should be
refused with a sentence, not end in an allocator traceback minutes later. The
estimate counts the weights with their gradient, optimiser state and projUNN
temporaries, plus the activations autograd keeps for one batch. Its constants
were measured on CPU runs of the copy, adding, CNN and ResNet-9 tasks and are
meant to be within a factor of about 1.5 of the peak, so a run is refused only
when it plainly cannot fit.
"""

from __future__ import annotations

import os
import pathlib

import torch

__all__ = ["available_bytes", "estimate_bytes", "format_bytes", "size_options"]

# Per weight entry: the weight, its gradient, up to two optimiser moments, projUNN's temporaries.
_WEIGHT_COPIES = 6
# Values autograd keeps per (example, time step, hidden unit) of an RNN, and per (example,
# channel, pixel, layer) of a CNN: measured 9-10 and 5-6 on CPU runs.
_RNN_SAVED_VALUES = 10
_CNN_SAVED_VALUES = 6
_PIXEL_TASKS = {"pmnist": 784, "smnist": 784}  # one pixel per time step
_IMAGE_PIXELS = {"cifar10": 32 * 32}  # the others are 28 x 28
_COPY_EXTRA_STEPS = 20  # the copy task's sequence is its delay plus 20 steps


def _element_bytes(config) -> int:
    dtype = torch.get_default_dtype()
    return dtype.itemsize * (2 if getattr(config, "complex", False) else 1)


def _sequence_length(config) -> int | None:
    if config.task in _PIXEL_TASKS:
        return _PIXEL_TASKS[config.task]
    if config.seq_len is not None:
        return config.seq_len + _COPY_EXTRA_STEPS
    return None


def estimate_bytes(config, processes: int = 1) -> int:
    """Rough peak memory of one process of a run with these (resolved) settings, in bytes.

    Args:
        config: resolved :class:`projunn.harness.train.TrainConfig`.
        processes: data-parallel replicas sharing each global batch.
    """
    batch = config.batch_size // max(processes, 1)
    size = _element_bytes(config)
    if config.model is not None:  # image tasks: full-width orthogonal convolutions
        pixels = _IMAGE_PIXELS.get(config.task, 28 * 28)
        width = config.channels
        if config.model == "resnet9":
            # Nine convs; channels x4 and pixels /4 per stride, so the last stage dominates the weights.
            layers, weight_entries = 9, 221 * width**2 * pixels
        else:
            layers, weight_entries = config.depth, config.depth * width**2 * pixels
        activations = batch * width * pixels * layers * _CNN_SAVED_VALUES
        return (weight_entries * _WEIGHT_COPIES + activations) * size
    hidden = config.hidden
    length = _sequence_length(config)
    if length is None:  # a single unitary matrix (and the target it learns)
        return ((_WEIGHT_COPIES + 1) * hidden**2 + 4 * batch * hidden) * size
    return (_WEIGHT_COPIES * hidden**2 + _RNN_SAVED_VALUES * batch * length * hidden) * size


def size_options(config) -> str:
    """The settings that set a run's size, for the message that refuses it (named as in RunError messages)."""
    if config.model is not None:
        return "--batch-size, --channels or --depth" if config.model == "cnn" else "--batch-size or --channels"
    if _sequence_length(config) is None:
        return "--hidden or --batch-size"
    return "--batch-size, --seq-len or --hidden" if config.seq_len is not None else "--batch-size or --hidden"


def available_bytes(device: torch.device) -> int | None:
    """Memory a new allocation can use on ``device`` now (None: unknown)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    meminfo = pathlib.Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def format_bytes(count: float) -> str:
    """``1.5 GiB``-style sizes."""
    *units, largest = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
    for unit in units:
        if count < 1024:
            return f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} {largest}"
