"""Rank-k sketches of a step matrix: D ~ a @ b.mH.

All sketches are batched over leading dimensions, work for real and complex D,
use no absolute epsilon (so a step of any scale keeps its direction: unitary
learning rates are small and a threshold would swallow their updates), and
draw their random numbers only from the ``generator`` they are given, so a
fixed generator state reproduces the sketch exactly.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch

from .._rows import ALL_ROWS, Rows
from .._validation import check_choice, check_int, check_tensor
from ._kernels import adjoint_times, thin_qr

__all__ = ["Sketch", "lowrank"]

#: The sketches :func:`lowrank` draws (and ``ProjUNN``'s ``sketch`` option names).
Sketch = Literal["lsi", "column", "rsvd", "exact"]
SKETCHES: tuple[str, ...] = get_args(Sketch)  # the same names at run time, for validation


def lowrank(
    D: torch.Tensor,
    rank: int,
    sketch: Sketch = "lsi",
    *,
    generator: torch.Generator | None = None,
    samples: int | None = None,
    oversample: int = 4,
    power_iters: int = 2,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Rank-``rank`` factors (a, b) with ``D ~ a @ b.mH``.

    Sketches:

    - ``"lsi"`` (random projection, the paper's LSI): draw a Gaussian
      R (..., n, k), take an orthonormal basis V of the row-space sample
      D^H R, and return ``a = D V``, ``b = V``, i.e. ``D ~ D V V^H``.
      Two products of D with a thin block: O(k n m).
    - ``"column"`` (Drineas-Kannan-Mahoney): draw ``samples`` distinct
      columns of D with probability proportional to their squared norms,
      rescale them by 1/sqrt(samples * p_j), and keep the *top* k left
      singular vectors H of the sample: ``a = H``, ``b = D^H H``. O(k n m).
      Distinct draws (unlike the original with-replacement scheme) waste no
      sample on repeats, so a rank-k D is reproduced whenever the drawn
      columns span its range.
    - ``"rsvd"`` (Halko-Martinsson-Tropp randomized SVD): Gaussian test matrix
      with ``oversample`` extra columns and ``power_iters`` re-orthonormalised
      power iterations, then an exact SVD of the small projected matrix.
      O((k + oversample) n m (1 + 2 power_iters)). Written here rather than
      calling ``torch.svd_lowrank`` because that function draws from the
      global RNG and takes no generator, which would make the sketch
      irreproducible from a saved optimiser state.
    - ``"exact"``: truncated SVD, the best rank-k approximation
      (Eckart-Young). O(n m min(n, m)): a reference, not for large matrices.

    Args:
        D: (..., n, m) real or complex, float32/float64/complex64/complex128.
        rank: k, 1 <= k <= min(n, m).
        sketch: one of :data:`Sketch`: ``"lsi"``, ``"column"``, ``"rsvd"``, ``"exact"``.
        generator: source of randomness for ``lsi``, ``column`` and ``rsvd``,
            on D's device; None uses torch's global generator.
        samples: number of columns drawn by ``column`` (default ``2 * rank + 4``).
        oversample, power_iters: ``rsvd`` settings, ints >= 0.

    Returns:
        a: (..., n, k) and b: (..., m, k), dtype and device of D.

    Raises:
        TypeError: D not a supported tensor; rank, samples, oversample or
            power_iters not an int; sketch not a str.
        ValueError: rank outside [1, min(n, m)], an unknown sketch, samples < rank,
            oversample or power_iters < 0, a generator on another device.

    Example:
        >>> D = torch.randn(6, 1, dtype=torch.float64) @ torch.randn(1, 5, dtype=torch.float64)
        >>> a, b = lowrank(D, 1, "lsi", generator=torch.Generator().manual_seed(0))
        >>> torch.allclose(a @ b.mT, D)
        True
    """
    check_tensor("D", D)
    check_int("rank", rank)
    check_choice("sketch", sketch, SKETCHES)
    n, m = D.shape[-2:]
    if rank > min(n, m):
        raise ValueError(f"rank must be <= min(n, m) = {min(n, m)} for D of shape {tuple(D.shape)}, got {rank}")
    if generator is not None and torch.device(generator.device).type != D.device.type:
        raise ValueError(f"generator is on {generator.device} but D is on {D.device}")
    if sketch == "column" and samples is not None and check_int("samples", samples) < rank:
        raise ValueError(f"samples must be >= rank = {rank} for the column sketch, got {samples}")
    if sketch == "rsvd":
        check_int("oversample", oversample, minimum=0)
        check_int("power_iters", power_iters, minimum=0)
    return factors(
        D, rank, sketch, generator=generator, samples=samples, oversample=oversample, power_iters=power_iters
    )


def factors(
    D: torch.Tensor,
    rank: int,
    sketch: Sketch,
    *,
    rows: Rows = ALL_ROWS,
    generator: torch.Generator | None = None,
    samples: int | None = None,
    oversample: int = 4,
    power_iters: int = 2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The factors (a, b) of :func:`lowrank`, its arguments unchecked, for D whose rows ``rows`` describes.

    With rows split over processes (Note [Row-sharded projUNN]) D and a are
    this process's rows, b is whole, and the random numbers are those the
    sketch of the whole D draws from the same generator state.
    """
    if sketch == "lsi":
        a, b = _lsi(D, rank, generator, rows)
    elif sketch == "column":
        a, b = _column(D, rank, 2 * rank + 4 if samples is None else samples, generator, rows)
    elif sketch == "rsvd":
        a, b = _rsvd(D, rank, oversample, power_iters, generator, rows)
    else:
        a, b = _exact(D, rank, rows)
    # Plain tensors, not lazily conjugated views (which .numpy() and view_as_real refuse); N x k, cheap.
    return a.resolve_conj(), b.resolve_conj()


def _gaussian(D: torch.Tensor, shape: tuple[int, ...], generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(shape, dtype=D.dtype, device=D.device, generator=generator)


def _lsi(D: torch.Tensor, k: int, generator: torch.Generator | None, rows: Rows) -> tuple[torch.Tensor, torch.Tensor]:
    # The span of D^H R equals the row space of R^H D, whose right singular
    # vectors the paper takes; a QR gives an orthonormal basis of it with no
    # threshold and no SVD. If D^H R = 0 (D = 0), a b^H = D V V^H = 0 whatever V
    # is: Householder's unit vector and the closed form's zero give the same
    # zero step (Note [No solver calls for rank 1]).
    # R is drawn whole and taken by rows, so split rows draw the numbers of the whole D.
    R = rows.take(_gaussian(D, (*D.shape[:-2], rows.count(D.shape[-2]), k), generator))
    V, _ = thin_qr(rows.sum(adjoint_times(D, R)))
    return D @ V, V


def _column(
    D: torch.Tensor, k: int, samples: int, generator: torch.Generator | None, rows: Rows
) -> tuple[torch.Tensor, torch.Tensor]:
    n, m = D.shape[-2:]
    batch = D.shape[:-2]
    count = min(samples, m)
    weights = rows.sum(torch.linalg.vector_norm(D, dim=-2).square())  # (..., m), real
    total = weights.sum(-1, keepdim=True)
    # A zero matrix has no column distribution; any columns give the right
    # (zero) answer, so fall back to uniform rather than dividing by zero.
    probs = torch.where(total > 0, weights / total.clamp_min(torch.finfo(weights.dtype).tiny), 1.0 / m)
    # Distinct columns (no replacement): a repeat adds nothing to the sampled
    # span, and with replacement a rank-k matrix can be missed even with
    # c > k draws. Zero columns get a tiny weight so that `count` distinct
    # columns always exist; they are drawn last and contribute nothing.
    flat_probs = probs.reshape(-1, m)
    drawable = flat_probs.clamp_min(torch.finfo(flat_probs.dtype).tiny)
    picks = torch.multinomial(drawable, count, replacement=False, generator=generator)  # (B, c)
    scale = torch.rsqrt(count * drawable.gather(-1, picks)).to(D.dtype)  # DKM rescaling 1/sqrt(c p_j)
    # (B, n, c); B counted, not -1: a process may hold no rows of a split D
    columns = D.reshape(len(flat_probs), n, m).gather(-1, picks.unsqueeze(-2).expand(-1, n, -1))
    sample = (columns * scale.unsqueeze(-2)).reshape(*batch, n, count)
    H = rows.svd(sample)[0][..., :k]  # top-k left singular vectors
    return H, rows.sum(adjoint_times(D, H))


def _rsvd(
    D: torch.Tensor, k: int, oversample: int, power_iters: int, generator: torch.Generator | None, rows: Rows
) -> tuple[torch.Tensor, torch.Tensor]:
    n, m = rows.count(D.shape[-2]), D.shape[-1]
    width = min(k + oversample, n, m)
    Y = D @ _gaussian(D, (*D.shape[:-2], m, width), generator)
    for _ in range(power_iters):
        # Re-orthonormalise between products so the small singular
        # directions are not lost to rounding (Halko et al., Alg. 4.4).
        Z = rows.sum(adjoint_times(D, rows.qr(Y)[0]))
        Y = D @ torch.linalg.qr(Z)[0]
    basis = rows.qr(Y)[0]  # (..., n, width)
    small_u, s, small_vh = torch.linalg.svd(rows.sum(adjoint_times(D, basis)).mH, full_matrices=False)
    a = (basis @ small_u[..., :k]) * s[..., None, :k].to(D.dtype)
    return a, small_vh[..., :k, :].mH


def _exact(D: torch.Tensor, k: int, rows: Rows) -> tuple[torch.Tensor, torch.Tensor]:
    u, s, vh = rows.svd(D)
    return u[..., :k] * s[..., None, :k].to(D.dtype), vh[..., :k, :].mH
