"""Synthetic tasks: structure, determinism, and the baselines they are scored against."""

from __future__ import annotations

import math

import pytest
import torch

from projunn.harness.tasks import COPY_MARKER, adding_baseline, adding_batch, copy_baseline, copy_batch


def test_copy_batch_structure():
    x, y = copy_batch(64, 30, generator=torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (64, 50) and x.dtype == torch.int64
    symbols = x[:, :10]
    assert symbols.min() >= 1 and symbols.max() <= 8
    assert (x[:, 10:39] == 0).all() and (x[:, 39] == COPY_MARKER).all() and (x[:, 40:] == 0).all()
    assert (y[:, :40] == 0).all() and torch.equal(y[:, 40:], symbols)


def test_copy_baseline_is_the_memoryless_cross_entropy():
    assert copy_baseline(1000) == pytest.approx(0.0204, abs=1e-4)
    assert copy_baseline(2000) == pytest.approx(0.0103, abs=1e-4)
    _, y = copy_batch(256, 100, generator=torch.Generator().manual_seed(1))
    logits = torch.full((256, 120, 9), -1e9)
    logits[:, :110, 0] = 0.0  # certain blank while waiting,
    logits[:, 110:, 1:] = 0.0  # uniform over the 8 symbols when recalling
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 9), y.reshape(-1))
    assert loss.item() == pytest.approx(copy_baseline(100), rel=1e-6)


def test_adding_batch_and_baseline():
    x, y = adding_batch(20000, 50, generator=torch.Generator().manual_seed(0))
    assert x.shape == (20000, 50, 2) and y.shape == (20000,)
    marks = x[..., 1]
    assert (marks.sum(1) == 2).all()
    assert (marks[:, :25].sum(1) == 1).all() and (marks[:, 25:].sum(1) == 1).all()
    torch.testing.assert_close((x[..., 0] * marks).sum(1), y)
    mse_of_one = (y - 1).square().mean().item()
    assert mse_of_one == pytest.approx(adding_baseline(), abs=0.005)
    assert adding_baseline() == pytest.approx(0.167, abs=1e-3)


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
    assert copy_baseline(1) == pytest.approx(10 * math.log(8) / 21, rel=1e-12)
