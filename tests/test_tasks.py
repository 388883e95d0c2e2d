"""Synthetic tasks: structure, determinism, and the baselines they are scored against, measured."""

from __future__ import annotations

import pytest
import torch

from projunn.harness.tasks import TASKS
from projunn.harness.tasks._synthetic import COPY_MARKER, adding_baseline, adding_batch, copy_baseline, copy_batch


def memoryless_cross_entropy(y: torch.Tensor, classes: int) -> float:
    """Cross-entropy per step on targets ``y`` (B, T) of the best predictor that sees no input: at each
    step, the frequencies of the classes at that step in ``y`` itself. A measurement on the data, not
    a formula: no predictor that ignores the input scores less on ``y``."""
    counts = torch.nn.functional.one_hot(y, classes).sum(0).double()  # (T, classes)
    frequencies = counts / len(y)
    return -(counts * frequencies.clamp_min(1e-300).log()).sum().item() / y.numel()


def test_copy_batch_structure():
    x, y = copy_batch(64, 30, generator=torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (64, 50) and x.dtype == torch.int64
    symbols = x[:, :10]
    assert symbols.min() >= 1 and symbols.max() <= 8
    assert (x[:, 10:39] == 0).all() and (x[:, 39] == COPY_MARKER).all() and (x[:, 40:] == 0).all()
    assert (y[:, :40] == 0).all() and torch.equal(y[:, 40:], symbols)


@pytest.mark.parametrize("delay", [1, 30, 100])
def test_copy_baseline_is_the_memoryless_cross_entropy_measured_on_a_batch(delay):
    """The best input-free predictor, fitted on 20,000 sequences and scored on them, reaches the
    baseline to sampling error (its fitted frequencies can only help it: <=)."""
    _, y = copy_batch(20_000, delay, generator=torch.Generator().manual_seed(1))
    measured = memoryless_cross_entropy(y, 9)
    assert measured <= copy_baseline(delay)
    assert measured == pytest.approx(copy_baseline(delay), rel=1e-3)


def test_adding_batch_and_baseline():
    x, y = adding_batch(20000, 50, generator=torch.Generator().manual_seed(0))
    assert x.shape == (20000, 50, 2) and y.shape == (20000,)
    marks = x[..., 1]
    assert (marks.sum(1) == 2).all()
    assert (marks[:, :25].sum(1) == 1).all() and (marks[:, 25:].sum(1) == 1).all()
    torch.testing.assert_close((x[..., 0] * marks).sum(1), y)
    # The baseline measured: the MSE of predicting 1, and of the best constant (the mean), on the batch.
    mse_of_one = (y - 1).square().mean().item()
    assert mse_of_one == pytest.approx(adding_baseline(), abs=0.005)
    assert (y - y.mean()).square().mean().item() == pytest.approx(adding_baseline(), abs=0.005)


def test_generators_are_deterministic():
    for make in (lambda g: copy_batch(4, 10, generator=g), lambda g: adding_batch(4, 10, generator=g)):
        a = make(torch.Generator().manual_seed(5))
        b = make(torch.Generator().manual_seed(5))
        assert all(torch.equal(p, q) for p, q in zip(a, b))


def test_bad_arguments():
    with pytest.raises(ValueError, match="delay must be an int >= 1"):
        copy_batch(2, 0)
    with pytest.raises(ValueError, match="length must be an int >= 2"):
        adding_batch(2, 1)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        adding_batch(0, 10)


class _HostSyncs(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the operators that make a GPU's host wait (reading a tensor's value on the host)."""

    SYNCING = frozenset({torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default})

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in self.SYNCING
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    "task, settings",
    [("copy", dict(seq_len=5)), ("adding", dict(seq_len=5)), ("unitary", {})],
)
def test_a_training_batchs_loss_reads_nothing_back_to_the_host(task, settings):
    """The loss of a training step is a tensor: beyond the model's forward pass (whose own reads are
    the recurrence's business), computing it never waits for the device (an accuracy read with
    .item() at every step did)."""
    from projunn.harness.train import TrainConfig, resolve

    config = resolve(TrainConfig(task=task, hidden=8, batch_size=4, steps=2, **settings))
    data = TASKS[task].prepare(config, torch.device("cpu"))
    model, (x, y) = data.build_model(), data.batch(0)
    with _HostSyncs() as forward:
        model(x)
    with _HostSyncs() as syncs:
        loss = data.loss(model, x, y)
    assert loss.dim() == 0 and syncs.count == forward.count
