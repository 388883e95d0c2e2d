"""projUNN on weights whose rows are split over processes (FSDP2 / DTensor ``Shard``), with thin communication.

Note [Row-sharded projUNN]
--------------------------
FSDP2 (``torch.distributed.fsdp.fully_shard``) hands the optimiser each
weight as a DTensor whose rows are split over the ranks of a 1-D device mesh
(``Shard(0)``, torch.chunk sizes: uneven, and empty on the last ranks when
there are more ranks than rows). The step D arrives split the same way. None
of projUNN's N x M work needs a whole matrix: every quantity that couples rows
is a thin product, which is a sum of per-rank products and so one all-reduce
of a (N or M) x k block. For U (N x M, rows split) and D = a b^H:

- LSI sketch: V = qr(D^H R) from the all-reduced M x k block sum_r D_r^H R_r
  (R, N x k, drawn whole on every rank from the shared generator and sliced,
  so the random numbers are those of the unsharded sketch); a = D V is local
  and b = V is replicated.
- Square update: c = U^H a is one all-reduce of N x k; the QR of [b, c] and
  the 2k x 2k problem are solved identically on every rank; the update
  U_r + (U_r Q) B Q^H is local.
- Stiefel updates need, besides such sums, an orthonormal basis of a tall
  N x 2k block whose rows are split ([W b, a] for tall projUNN-T,
  [a, W b] for wide projUNN-D). It comes from a TSQR (Note [TSQR]).
- Column sampling: the column norms are one all-reduce of M numbers, the draw
  is replicated, the sampled columns' left singular vectors come from a TSQR
  and b = D^H H is one all-reduce. Randomised SVD: each power iteration is a
  TSQR and one all-reduce of M x (k + oversample).
- The ``exact`` sketch needs a full SVD of D and is refused.

Communication per weight and step is O((N + M) k + P k^2) numbers for P
ranks; the weight is never gathered. Everything that decides a branch
(degenerate projUNN-D steps, NaN checks) is computed from all-reduced values,
so every rank takes the same branch and no rank waits on a collective the
others skip. The all-reduced blocks are identical on every rank (the
collective returns one result), so the small problems are too.

Note [TSQR]
-----------
A tall X (N x w) with rows split as X_r: each rank takes a Householder QR
X_r = Q_r R_r (R_r of min(n_r, w) rows), the R_r are all-gathered (padded to
w x w), and every rank takes the same Householder QR of the stacked R_r,
[R_1; ...; R_P] = Z R. Then X = diag(Q_r) Z R, and this rank's rows of the
orthonormal factor are Q_r Z_r. Unlike Cholesky-QR it stays orthonormal for a
rank-deficient X (a zero step, a step parallel to W b), as Householder QR of
the whole X does; it costs one all-gather of P w^2 numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .._validation import check_choice
from ._kernels import adjoint_times, direct_block, double, tangent_block
from ._sketch import SKETCHES
from ._stiefel import _DENSE_BELOW
from ._unitary import closest_unitary

# The public names are listed in projunn.functional.sharded.

#: Sketches that run on row-sharded steps (Note [Row-sharded projUNN]).
SHARDED_SKETCHES = tuple(s for s in SKETCHES if s != "exact")


@dataclass(frozen=True)
class RowShards:
    """How the rows (dimension -2) of a (batch of) matrices are split over a process group.

    Attributes:
        group: the process group (that of a 1-D device mesh).
        counts: rows held by each rank of the group, in rank order (torch.chunk sizes).
        index: this process's rank in the group.
    """

    group: Any
    counts: tuple[int, ...]
    index: int

    @property
    def rows(self) -> int:
        return sum(self.counts)

    @property
    def start(self) -> int:
        return sum(self.counts[: self.index])

    def local_rows(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's rows (dimension -2) of a tensor every rank holds whole."""
        return full[..., self.start : self.start + self.counts[self.index], :]


def _is_dtensor(x: torch.Tensor) -> bool:
    return type(x).__name__ == "DTensor" and hasattr(x, "placements")


def local_part(x: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (the storage of the parameter, writes go through), or ``x`` itself."""
    return x.to_local() if _is_dtensor(x) else x


def row_shards(x: torch.Tensor) -> RowShards | None:
    """The row split of a DTensor weight, or None if every rank holds it whole.

    Supported: a plain tensor; a DTensor replicated on every mesh dimension;
    a DTensor on a 1-D mesh sharded along its row dimension (``Shard(0)`` of a
    matrix, as FSDP2 gives by default; ``Shard(d)`` with d = dim - 2 for a
    (..., N, M) batch). Anything else is refused.

    Raises:
        ValueError: a placement other than these, named in the message.
    """
    if not _is_dtensor(x):
        return None
    from torch.distributed.tensor import Replicate, Shard

    placements = tuple(x.placements)
    if all(isinstance(p, Replicate) for p in placements):
        return None
    row_dim = x.dim() - 2
    if len(placements) != 1 or not isinstance(placements[0], Shard) or placements[0].dim % x.dim() != row_dim:
        raise ValueError(
            f"projUNN supports unitary DTensor weights replicated or sharded along their rows "
            f"(Shard({row_dim}) on a 1-D mesh); got placements {placements} on a {x.device_mesh.ndim}-D mesh "
            f"for shape {tuple(x.shape)}"
        )
    mesh = x.device_mesh
    size, index, rows = mesh.size(), mesh.get_local_rank(), x.shape[-2]
    chunk = -(-rows // size)
    counts = tuple(max(0, min(chunk, rows - r * chunk)) for r in range(size))
    if x.to_local().shape[-2] != counts[index]:
        raise ValueError(
            f"the local shard of a weight of shape {tuple(x.shape)} has {x.to_local().shape[-2]} rows on rank "
            f"{index}, not the {counts[index]} of an even torch.chunk split; projUNN needs the chunk split"
        )
    return RowShards(mesh.get_group(), counts, index)


# -- collectives -------------------------------------------------------------------------


def _all_sum(x: torch.Tensor, shards: RowShards) -> torch.Tensor:
    """The sum over ranks of x (a fresh tensor, identical on every rank)."""
    x = x.resolve_conj().contiguous().clone()
    dist.all_reduce(torch.view_as_real(x) if x.is_complex() else x, group=shards.group)
    return x


def _all_gather(x: torch.Tensor, shards: RowShards) -> torch.Tensor:
    """(P, *x.shape): x from every rank, stacked (x must have the same shape on every rank)."""
    x = x.resolve_conj().contiguous()
    out = torch.empty((len(shards.counts), *x.shape), dtype=x.dtype, device=x.device)
    flat = (lambda t: torch.view_as_real(t).reshape(-1)) if x.is_complex() else (lambda t: t.reshape(-1))
    # all_gather_single is all_gather_into_tensor's newer name (the old one warns from torch 2.13).
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(flat(out), flat(x), group=shards.group)
    return out


def _tall_qr(X: torch.Tensor, shards: RowShards) -> tuple[torch.Tensor, torch.Tensor]:
    """Thin QR of the row-split X (..., N, w): this rank's rows of Q (..., n_r, r) and R (..., r, w).

    r = min(N, w), as for ``torch.linalg.qr(X)`` of the whole X. Note [TSQR].
    """
    w = X.shape[-1]
    Q_local, R_local = torch.linalg.qr(X)
    padded = X.new_zeros((*X.shape[:-2], w, w))
    padded[..., : R_local.shape[-2], :] = R_local
    gathered = _all_gather(padded, shards)
    stacked = torch.cat([gathered[r, ..., : min(n, w), :] for r, n in enumerate(shards.counts)], dim=-2)
    Z, R = torch.linalg.qr(stacked)
    offset = sum(min(n, w) for n in shards.counts[: shards.index])
    return Q_local @ Z[..., offset : offset + R_local.shape[-2], :], R


def sharded_gram(W: torch.Tensor, shards: RowShards) -> torch.Tensor:
    """W^H W (..., M, M) of the row-split W: one all-reduce of M x M numbers."""
    return _all_sum(W.mH @ W, shards)


# -- sketches ------------------------------------------------------------------------------


def sharded_lowrank(
    D: torch.Tensor,
    rank: int,
    sketch: str,
    shards: RowShards,
    *,
    generator: torch.Generator | None = None,
    samples: int | None = None,
    oversample: int = 4,
    power_iters: int = 2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`projunn.functional.lowrank` of a row-split step: this rank's rows of a, and b whole.

    The random numbers drawn are those the unsharded sketch draws from the same
    generator state, so a sharded run follows the unsharded one to rounding.
    Note [Row-sharded projUNN].

    Args:
        D: (..., n_r, M), this rank's rows of the step.
        rank: k <= min(N, M) (N = shards.rows).
        sketch: ``"lsi"``, ``"column"`` or ``"rsvd"``.
        shards: the row split.
        generator, samples, oversample, power_iters: as for ``lowrank``.

    Returns:
        a: (..., n_r, k), b: (..., M, k), identical on every rank.

    Raises:
        ValueError: ``sketch="exact"`` or an unknown sketch.
    """
    if sketch == "exact":
        raise ValueError(
            "the 'exact' sketch needs a full SVD of the step, i.e. gathering it whole; "
            f"use one of {', '.join(map(repr, SHARDED_SKETCHES))} for sharded weights"
        )
    check_choice("sketch", sketch, SHARDED_SKETCHES)
    N, M = shards.rows, D.shape[-1]
    gaussian = lambda shape: torch.randn(shape, dtype=D.dtype, device=D.device, generator=generator)  # noqa: E731
    if sketch == "lsi":
        R = shards.local_rows(gaussian((*D.shape[:-2], N, rank)))
        V, _ = torch.linalg.qr(_all_sum(adjoint_times(D, R), shards))
        a, b = D @ V, V
    elif sketch == "column":
        a, b = _column(D, rank, 2 * rank + 4 if samples is None else samples, shards, generator)
    else:
        width = min(rank + oversample, N, M)
        Y = D @ gaussian((*D.shape[:-2], M, width))
        for _ in range(power_iters):
            Z = _all_sum(adjoint_times(D, _tall_qr(Y, shards)[0]), shards)
            Y = D @ torch.linalg.qr(Z)[0]
        basis = _tall_qr(Y, shards)[0]
        small_u, s, small_vh = torch.linalg.svd(_all_sum(adjoint_times(D, basis), shards).mH, full_matrices=False)
        a = (basis @ small_u[..., :rank]) * s[..., None, :rank].to(D.dtype)
        b = small_vh[..., :rank, :].mH
    return a.resolve_conj(), b.resolve_conj()


def _column(
    D: torch.Tensor, k: int, samples: int, shards: RowShards, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The column sketch of ``_sketch._column`` with the column norms summed over ranks."""
    n, m = D.shape[-2:]
    count = min(samples, m)
    weights = _all_sum(torch.linalg.vector_norm(D, dim=-2).square(), shards)
    total = weights.sum(-1, keepdim=True)
    probs = torch.where(total > 0, weights / total.clamp_min(torch.finfo(weights.dtype).tiny), 1.0 / m)
    flat_probs = probs.reshape(-1, m)
    drawable = flat_probs.clamp_min(torch.finfo(flat_probs.dtype).tiny)
    picks = torch.multinomial(drawable, count, replacement=False, generator=generator)
    scale = torch.rsqrt(count * drawable.gather(-1, picks)).to(D.dtype)
    columns = D.reshape(len(flat_probs), n, m).gather(-1, picks.unsqueeze(-2).expand(-1, n, -1))
    sample = (columns * scale.unsqueeze(-2)).reshape(*D.shape[:-2], n, count)
    # Left singular vectors of the split sample: L X from sample = L R and R = X S Y^H.
    L, R = _tall_qr(sample, shards)
    H = L @ torch.linalg.svd(R, full_matrices=False)[0][..., :k]
    return H, _all_sum(adjoint_times(D, H), shards)


# -- updates -------------------------------------------------------------------------------


def sharded_update(
    method: str, U: torch.Tensor, a: torch.Tensor, b: torch.Tensor, shards: RowShards, *, out: torch.Tensor
) -> torch.Tensor:
    """projUNN-T (``"t"``) or -D (``"d"``) of a row-split (semi-)unitary U, written into ``out``.

    The same matrices as :func:`projunn.functional.projunn_t` / ``projunn_d``
    of the whole U, to rounding (Note [Row-sharded projUNN]).

    Args:
        method: ``"t"`` or ``"d"``.
        U: (..., n_r, M), this rank's rows of the (N x M) weight before the step.
        a: (..., n_r, k), this rank's rows of a. b: (..., M, k), whole.
        shards: the row split (N = shards.rows).
        out: (..., n_r, M), may be U itself.

    Returns:
        ``out``.
    """
    check_choice("method", method, ("t", "d"))
    N, M = shards.rows, U.shape[-1]
    if N == M:
        update = _square
    elif N > M:
        update = _tall_t if method == "t" else _tall_d
    else:
        update = _wide_t if method == "t" else _wide_d
    left, right, fallback = update(method, U, a, b, shards)
    if out is not U:
        out.copy_(U)
    out.add_(left @ right)
    if fallback is not None:
        degenerate, value = fallback
        out[degenerate] = value
    return out


_Parts = tuple[torch.Tensor, torch.Tensor, Any]


def _square(method: str, U: torch.Tensor, a: torch.Tensor, b: torch.Tensor, shards: RowShards) -> _Parts:
    k, precise = a.shape[-1], double(U.dtype)
    c = _all_sum(adjoint_times(U, a), shards)  # U^H a, N x k
    Q, R = torch.linalg.qr(torch.cat([b.to(precise), c.to(precise)], dim=-1))
    block_fn: Callable = tangent_block if method == "t" else direct_block
    Q = Q.to(U.dtype)
    return (U @ Q) @ block_fn(R[..., :k], R[..., k:]).to(U.dtype), Q.mH, None


def _tall_t(method: str, W: torch.Tensor, a: torch.Tensor, b: torch.Tensor, shards: RowShards) -> _Parts:
    # Note [Stiefel projUNN-T]: exp(A) W = W + L (exp(S) - I) (L^H W), [W b, a] = L R split by rows.
    k, precise = a.shape[-1], double(W.dtype)
    L, R = _tall_qr(torch.cat([(W @ b).to(precise), a.to(precise)], dim=-1), shards)
    block = tangent_block(R[..., :k], R[..., k:]).to(W.dtype)
    L = L.to(W.dtype)
    return L, block @ _all_sum(adjoint_times(W, L), shards).mH, None


def _direct_small(
    R_b: torch.Tensor, R_c: torch.Tensor, gram_a: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """C = (I + S)^{-1/2} - I of Note [Stiefel projUNN-D], the identity, and which matrices are degenerate."""
    S = R_c @ R_b.mH + R_b @ R_c.mH + R_b @ gram_a @ R_b.mH
    eye = torch.eye(S.shape[-1], dtype=S.dtype, device=S.device)
    lam, V = torch.linalg.eigh(eye + (S + S.mH) / 2)
    degenerate = lam[..., 0] < _DENSE_BELOW * lam[..., -1].clamp_min(1.0)
    scale = lam.clamp_min(torch.finfo(lam.dtype).tiny).rsqrt() - 1
    return (V * scale.unsqueeze(-2).to(S.dtype)) @ V.mH, eye, degenerate


def _dense_fallback(W, a, b, degenerate, shards):
    """The exact polar factor of the degenerate matrices of the batch (an all-gather; a step no run takes)."""
    if not bool(degenerate.any()):
        return None
    stepped = (W + a @ b.mH)[degenerate]
    return degenerate, sharded_closest_unitary(stepped, shards)


def _tall_d(method: str, W: torch.Tensor, a: torch.Tensor, b: torch.Tensor, shards: RowShards) -> _Parts:
    # Note [Stiefel projUNN-D]: polar(W + a b^H) = W + ((W Q) C + a R_b^H (I + C)) Q^H, [b, W^H a] = Q R.
    k, precise = a.shape[-1], double(W.dtype)
    a_precise = a.to(precise)
    # W^H a (M x k) and a^H a (k x k) summed in one all-reduce.
    sums = _all_sum(torch.cat([adjoint_times(W, a).mH.to(precise), a_precise.mH @ a_precise], dim=-1), shards)
    c, gram_a = sums[..., : W.shape[-1]].mH, sums[..., W.shape[-1] :]
    Q, R = torch.linalg.qr(torch.cat([b.to(precise), c], dim=-1))
    R_b = R[..., :k]
    C, eye, degenerate = _direct_small(R_b, R[..., k:], gram_a)
    fallback = _dense_fallback(W, a, b, degenerate, shards)
    left = (W @ Q.to(W.dtype)) @ C.to(W.dtype) + a @ (R_b.mH @ (eye + C)).to(W.dtype)
    return left, Q.mH.to(W.dtype), fallback


def _wide_t(method: str, W: torch.Tensor, a: torch.Tensor, b: torch.Tensor, shards: RowShards) -> _Parts:
    # The tall update of W^H with the step b a^H: [W^H a, b] = L R is whole on every rank, and
    # (W^H + L B (W L)^H)^H = W + (W L) B^H L^H has this rank's rows in (W_r L) B^H L^H.
    k, precise = a.shape[-1], double(W.dtype)
    L, R = torch.linalg.qr(torch.cat([_all_sum(adjoint_times(W, a), shards).to(precise), b.to(precise)], dim=-1))
    block = tangent_block(R[..., :k], R[..., k:]).to(W.dtype)
    L = L.to(W.dtype)
    return W @ L, block.mH @ L.mH, None


def _wide_d(method: str, W: torch.Tensor, a: torch.Tensor, b: torch.Tensor, shards: RowShards) -> _Parts:
    # The tall update of T = W^H with a' = b, b' = a: [a, W b] = Q R is split by rows (TSQR), and
    # (T + left Q^H)^H = W + Q left^H with left = (T Q) C + b R_a^H (I + C), T Q = sum_r W_r^H Q_r.
    k, precise = a.shape[-1], double(W.dtype)
    Q, R = _tall_qr(torch.cat([a.to(precise), (W @ b).to(precise)], dim=-1), shards)
    R_a = R[..., :k]
    b_precise = b.to(precise)
    C, eye, degenerate = _direct_small(R_a, R[..., k:], b_precise.mH @ b_precise)
    fallback = _dense_fallback(W, a, b, degenerate, shards)
    Q = Q.to(W.dtype)
    left = _all_sum(adjoint_times(W, Q), shards) @ C.to(W.dtype) + b @ (R_a.mH @ (eye + C)).to(W.dtype)
    return Q, left.mH, fallback


# -- projection ----------------------------------------------------------------------------


def sharded_closest_unitary(A: torch.Tensor, shards: RowShards) -> torch.Tensor:
    """This rank's rows of :func:`projunn.functional.closest_unitary` of the row-split A.

    The polar factor couples all rows through an SVD, so A is all-gathered
    (N x M numbers, one all-gather of the weight) and every rank takes the
    same double-precision SVD, O(N M min(N, M)): a rare correction, never
    part of the step.
    """
    chunk = max(shards.counts)
    padded = A.new_zeros((*A.shape[:-2], chunk, A.shape[-1]))
    padded[..., : A.shape[-2], :] = A
    gathered = _all_gather(padded, shards)
    whole = torch.cat([gathered[r, ..., :n, :] for r, n in enumerate(shards.counts)], dim=-2)
    return shards.local_rows(closest_unitary(whole))


# -- drift control -------------------------------------------------------------------------


def sharded_drift_residual(W: torch.Tensor, X: torch.Tensor, shards: RowShards) -> torch.Tensor:
    """||(U^H U - I) X||_F per matrix for the row-split W (U = W, or W^T when wide), from thin products.

    The estimate of Note [Drift control] in ``projunn.optim._drift``: one all-reduce of a p x M
    block (tall W; p probes, X whole, M x p) or of an M x p block and p numbers per matrix
    (wide W; X the N x p probe, whole on every rank).
    """
    if shards.rows >= W.shape[-1]:
        return torch.linalg.matrix_norm(_all_sum((W @ X).mH @ W, shards).mH - X)
    # U = W^T, U^H U X = conj(W) (W^T X): this rank's rows are conj(W_r) Y with Y = sum_r W_r^T X_r.
    Y = _all_sum(W.mT @ shards.local_rows(X), shards)
    residual = (W @ Y.conj()).conj() - shards.local_rows(X)
    return _all_sum(residual.abs().square().sum((-2, -1)), shards).sqrt()


def sharded_newton_schulz_(W: torch.Tensor, shards: RowShards) -> torch.Tensor:
    """One Newton-Schulz step W <- W - W (W^H W - I) / 2 on the row-split W, in place.

    For a wide W this is the same matrix as W - (W W^H - I) W / 2, the step on
    its transpose, since W (W^H W) = (W W^H) W. It needs the M x M Gram matrix,
    one all-reduce of M^2 numbers (as much as all-gathering a square weight),
    and O(n_r M^2) flops per rank: drift control makes it rare.
    """
    defect = sharded_gram(W, shards)
    defect.diagonal(dim1=-2, dim2=-1).sub_(1)
    return W.sub_(W @ defect, alpha=0.5)
