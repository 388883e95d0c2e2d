"""Drift control: keep stored unitary weights at their rounding floor, at O(N^2) per check.

Note [Drift control]
--------------------
Every projUNN step is exact in exact arithmetic, but storing U + (U Q) B Q^H
in floating point rounds every entry, and these errors add up as a random
walk: ||U^H U - I||_F grows like sqrt(steps) * 0.3 * eps * sqrt(N) (measured
in float32: 5.8e-7 * sqrt(steps) at N = 256, 1.2e-6 * sqrt(steps) at
N = 1024), about 2e-4 after 100,000 steps at N = 256.

The default control bounds it near the floor of a rounded unitary matrix
(about eps * sqrt(N)) without paying O(N^3) per step:

- every ``CHECK_EVERY`` steps the error is *estimated* from two fixed random
  probes X (N x 2): ||(U^H U - I) X||_F / sqrt(2) is an unbiased estimate of
  ||U^H U - I||_F in mean square (Hutchinson), for two matrix-vector
  products' worth of work;
- when the estimate exceeds the tolerance, one Newton-Schulz step
  U <- U - U (U^H U - I) / 2 brings the error from e to about e^2 plus
  one rounding (two N x N products: O(N^3), so it must be rare);
- an estimate above ``EXACT_ABOVE`` (a weight far from the group, e.g.
  loaded from elsewhere) gets the exact projection instead, as Newton-Schulz
  converges only from nearby.

The default tolerance is max(0.3 eps N, 4 eps sqrt(N)) (N the smaller side;
9.1e-6 for float32 at N = 256, 1.5e-4 at N = 4096). The first term keeps the
root-mean-square entry of U^H U - I, ||.||_F / N, below 0.3 eps: rounding
level entry by entry. Scaling with N rather than with the floor
eps sqrt(N) is what keeps the O(N^3) correction rare at large N: the random
walk needs about (tolerance / per-step drift)^2 steps to reach it, which
grows like N, so the amortised cost per step, O(N^3) / O(N), stays O(N^2)
(at N = 4096 about one correction in 4,000 steps). The second term keeps
the tolerance above a few rounding floors for small N, where the first
alone would ask for less than one rounding can deliver.

The probes are generated once per shape from a fixed seed, so the control
draws nothing from the sketch generator and every data-parallel replica
makes the same decision. Wide (N < M) weights use U U^H - I.

On weights whose rows are split over ranks (FSDP2, Note [Row-sharded projUNN])
the estimate stays thin: one all-reduce of a 2 x M block (a wide weight: of
an M x 2 block and one number per matrix). The Newton-Schulz step needs the
M x M Gram matrix W^H W, one all-reduce of M^2 numbers (as much traffic as
all-gathering a square weight) and O(n_r M^2) flops per rank; the exact
projection all-gathers the weight once and every rank takes the same SVD.
Both are as rare as on one process.
"""

from __future__ import annotations

import math

import torch

from ._weights import ALL_ROWS, Rows, local_part, project, rows_of

__all__ = ["CHECK_EVERY", "EXACT_ABOVE", "DriftControl"]

CHECK_EVERY = 10
EXACT_ABOVE = 1e-2
_TOLERANCE_PER_ENTRY = 0.3  # in eps: bound on the RMS entry of U^H U - I
_TOLERANCE_FLOORS = 4.0  # in eps sqrt(N): never ask for less than a few rounding floors
_PROBES = 2


def default_tolerance(weight: torch.Tensor) -> float:
    """Tolerance of the default control, max(0.3 eps N, 4 eps sqrt(N)), N = min of the last two sizes."""
    n = min(weight.shape[-2:])
    eps = torch.finfo(weight.dtype).eps
    return max(_TOLERANCE_PER_ENTRY * eps * n, _TOLERANCE_FLOORS * eps * math.sqrt(n))


def _tall(weight: torch.Tensor) -> tuple[torch.Tensor, Rows, Rows]:
    """This rank's part of the weight (its transpose if wide, N < M), and how its rows and columns are split.

    The view's Gram condition is U^H U = I: W W^H = I exactly when
    (W^T)^H W^T = conj(W W^H) = I, and writes into the view are writes into
    the weight, so one set of formulas serves both. The rows of a wide
    weight's transpose are whole and its columns split (Note [Row-sharded projUNN]).
    """
    rows, local = rows_of(weight), local_part(weight)
    if rows.count(local.shape[-2]) >= local.shape[-1]:
        return local, rows, ALL_ROWS
    return local.mT, ALL_ROWS, rows


def _newton_schulz_(weight: torch.Tensor) -> None:
    """One Newton-Schulz step U <- U - U (U^H U - I) / 2 of the weight's tall view, in place.

    A wide weight whose rows are split takes the step as W - W (W^H W - I) / 2,
    the same matrix since W (W^H W) = (W W^H) W, from the M x M Gram matrix
    summed over ranks (its transpose's Gram matrix would be split both ways).
    That is one all-reduce of M^2 numbers and O(n_r M^2) flops per rank.
    """
    U, rows, cols = _tall(weight)
    if cols is not ALL_ROWS:
        U, rows = local_part(weight), cols
    defect = rows.sum(U.mH @ U)
    defect.diagonal(dim1=-2, dim2=-1).sub_(1)
    U.sub_(U @ defect, alpha=0.5)


class DriftControl:
    """Estimate and correct the drift of unitary weights (Note [Drift control]).

    Args:
        tolerance: largest estimated ||U^H U - I||_F left alone; ``"auto"``
            uses :func:`default_tolerance` per weight.
    """

    def __init__(self, tolerance: float | str = "auto") -> None:
        if tolerance != "auto" and not (isinstance(tolerance, (int, float)) and 0 < tolerance < math.inf):
            raise ValueError(f"drift_tolerance must be 'auto', None or a positive number, got {tolerance!r}")
        self.tolerance = tolerance
        self.corrections = 0
        self._probes: dict[tuple, torch.Tensor] = {}

    def _probe(self, n: int, like: torch.Tensor) -> torch.Tensor:
        key = (n, like.dtype, like.device)
        if key not in self._probes:
            generator = torch.Generator().manual_seed(0)
            probe = torch.randn(n, _PROBES, generator=generator, dtype=torch.float64)
            self._probes[key] = probe.to(device=like.device, dtype=like.dtype)
        return self._probes[key]

    def estimate(self, weight: torch.Tensor) -> torch.Tensor:
        """Estimated ||U^H U - I||_F (or ||U U^H - I||_F for wide U), one value per matrix, O(N M)."""
        U, rows, cols = _tall(weight)
        X = cols.take(self._probe(cols.count(U.shape[-1]), U))
        # (U X)^H U = (U^H U X)^H, no conjugate copy of U; with split rows or columns, thin sums only.
        residual = rows.sum(cols.sum(U @ X).mH @ U).mH - X
        return cols.norm(residual) / math.sqrt(_PROBES)

    @torch.no_grad()
    def __call__(self, *weights: torch.Tensor) -> int:
        """Correct in place each weight whose estimated drift exceeds its tolerance; return how many.

        All estimates are read back together, so the check costs one device
        synchronisation however many weights there are.
        """
        if not weights:
            return 0
        errors = torch.stack([self.estimate(w).max().to(torch.float64) for w in weights]).tolist()
        corrected = 0
        for weight, error in zip(weights, errors):
            tolerance = default_tolerance(weight) if self.tolerance == "auto" else self.tolerance
            if not error > tolerance:
                continue
            if error > EXACT_ABOVE:
                project(weight)  # a sharded weight is all-gathered once
            else:
                _newton_schulz_(weight)
            corrected += 1
        self.corrections += corrected
        return corrected
