"""Learn a random unitary: one orthogonal/unitary linear layer fitted to input/output pairs."""

from __future__ import annotations

import torch

from ...functional import unitary_init
from ...nn import UnitaryLinear
from ._base import WEIGHT_COPIES, Task, Unwatched, stream, weight_dtype

__all__ = ["UnitaryTargetTask"]


class UnitaryTargetTask(Task):
    """Learn a random N x N unitary from input/output pairs (N = --hidden)."""

    #: Input/output pairs in the fixed held-out set.
    eval_size = 1024

    def __init__(self):
        super().__init__(
            name="unitary",
            description="learn a Haar-random N x N orthogonal/unitary matrix from pairs (MSE; N = --hidden)",
            defaults=dict(
                hidden=256,
                steps=1000,
                batch_size=128,
                lr=1e-3,
                unitary_lr_divider=1,
                optimizer="adam",
                init="haar",
                eval_every=50,
            ),
            paper=dict(hidden=2048, steps=1000, batch_size=128),
            options=frozenset({"hidden", "complex"}),
            loss_label="squared error per coordinate",
        )

    def baseline(self, config):
        return 1.0  # E|T x|^2 per coordinate: the MSE of predicting 0, the best constant

    def footprint(self, config, batch):
        # The weight and the target it learns, and a few (batch, N) blocks.
        return (WEIGHT_COPIES + 1) * config.hidden**2 + 4 * batch * config.hidden, "--hidden or --batch-size"

    def setup(self):
        config, device = self.config, self.device
        generator = torch.Generator().manual_seed(config.seed + 7)
        dtype = weight_dtype(config)
        self.target = unitary_init(config.hidden, "haar", dtype=dtype, generator=generator).to(device)
        x = torch.randn(self.eval_size, config.hidden, dtype=dtype, generator=stream("eval", self.name, config.hidden))
        self.validation = x.to(device), x.to(device) @ self.target.mT

    def build_model(self):
        return UnitaryLinear(self.config.hidden, init=self.config.init, dtype=weight_dtype(self.config))

    def loss(self, model, x, y):
        return (model(x) - y).abs().square().mean()

    def batch(self, step):
        config = self.config
        drawn = stream("train", config.seed, step)
        x = self.to_device(torch.randn(config.batch_size, config.hidden, dtype=self.target.dtype, generator=drawn))
        return x, x @ self.target.mT

    def evaluate(self, model, *, progress=Unwatched):  # one product: nothing to show
        x, y = self.validation
        with torch.no_grad():
            loss = self.loss(model, x, y)
        # The zero predictor (the best constant) on the same pairs; an unrelated rotation scores 2.
        return {"eval_loss": loss.item(), "eval_baseline": y.abs().square().mean().item()}
