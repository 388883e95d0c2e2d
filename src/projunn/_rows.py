"""Where the rows of a matrix are: all on this process, or split over processes (FSDP2 / DTensor ``Shard``).

Note [Row-sharded projUNN]
--------------------------
FSDP2 (``torch.distributed.fsdp.fully_shard``) hands the optimiser each
weight as a DTensor whose rows are split over the ranks of a 1-D device mesh
(``Shard(0)``, torch.chunk sizes: uneven, and empty on the last ranks when
there are more ranks than rows). The step D arrives split the same way. None
of projUNN's N x M work needs a whole matrix: every quantity that couples rows
is a thin product, which is a sum of per-rank products and so one all-reduce
of a (N or M) x k block, or the orthonormal basis of a tall N x w block,
which a TSQR gives (Note [TSQR]).

So the sketches, the updates and the drift correction are written once, with
every coupling of rows taken through a :class:`Rows` object: ``sum`` (of the
per-rank partial products), ``qr`` and ``svd`` (of a tall block split by
rows), ``norm``, and ``take`` / ``gather`` (this rank's rows of a whole tensor,
and the whole tensor). On one process, :data:`ALL_ROWS`, these are the
identity and torch.linalg's own calls, so the kernels make exactly the calls
they would make without the object; :class:`RowShards` takes them with
collectives. For U (N x M, rows split) and D = a b^H:

- LSI sketch: V = qr(D^H R) from the summed M x k block sum_r D_r^H R_r
  (R, N x k, drawn whole on every rank from the shared generator and taken
  by rows, so the random numbers are those of the unsharded sketch); a = D V
  is local and b = V is whole on every rank.
- Square update: c = U^H a is one sum of N x k; the QR of [b, c] and the
  2k x 2k problem are solved identically on every rank; the update
  U_r + (U_r Q) B Q^H is local.
- Stiefel updates need, besides such sums, an orthonormal basis of a tall
  N x 2k block whose rows are split ([W b, a] for tall projUNN-T). A wide W
  is updated as its conjugate transpose (``_stiefel.py``), whose *columns*
  are split: the tall kernels take one :class:`Rows` for the rows and one
  for the columns (the rows of W^H). With the roles swapped, the products
  over columns (W^H a) become the sums and the basis of [a, W b] the TSQR.
- Column sampling: the column norms are one sum of M numbers, the draw is
  replicated, the sampled columns' left singular vectors come from a TSQR
  and b = D^H H is one sum. Randomised SVD: each power iteration is a TSQR
  and one sum of M x (k + oversample).
- The ``exact`` sketch needs the SVD of the whole step (its TSQR gathers an
  M x M block per rank) and is refused for sharded weights.

Communication per weight and step is O((N + M) k + P k^2) numbers for P
ranks; the weight is never gathered. Everything that decides a branch
(degenerate projUNN-D steps, NaN checks) is computed from summed values, so
every rank takes the same branch and no rank waits on a collective the others
skip. The summed blocks are identical on every rank (the collective returns
one result), so the small problems are too.

Note [TSQR]
-----------
A tall X (N x w) with rows split as X_r: each rank takes a Householder QR
X_r = Q_r R_r (R_r of min(n_r, w) rows), the R_r are all-gathered (padded to
w x w), and every rank takes the same Householder QR of the stacked R_r,
[R_1; ...; R_P] = Z R. Then X = diag(Q_r) Z R, and this rank's rows of the
orthonormal factor are Q_r Z_r. Unlike Cholesky-QR it stays orthonormal for a
rank-deficient X (a zero step, a step parallel to W b), as Householder QR of
the whole X does; it costs one all-gather of P w^2 numbers. The SVD of X
follows from that of R: X = (diag(Q_r) Z U_R) S V^H.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["ALL_ROWS", "RowShards", "Rows"]


class Rows:
    """The rows (dimension -2) of the matrices a kernel is given, all held by this process.

    The kernels take everything that couples rows through these methods
    (Note [Row-sharded projUNN]); here each is the identity or the plain
    torch.linalg call. :class:`RowShards` gives them for rows split over processes.
    """

    def count(self, local: int) -> int:
        """The rows of the whole matrix of which this process holds ``local`` rows."""
        return local

    def take(self, whole: torch.Tensor) -> torch.Tensor:
        """This process's rows of a tensor every process holds whole."""
        return whole

    def gather(self, part: torch.Tensor) -> torch.Tensor:
        """The whole tensor of which ``part`` holds this process's rows."""
        return part

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """The sum over processes of ``x``, a product contracting this process's rows."""
        return x

    def qr(self, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Thin QR of X (..., n, w): this process's rows of Q (..., n, r), and R (..., r, w), r = min(N, w)."""
        return torch.linalg.qr(X)

    def svd(self, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Thin SVD of X (..., n, w): this process's rows of U, and S, V^H."""
        return torch.linalg.svd(X, full_matrices=False)

    def norm(self, X: torch.Tensor) -> torch.Tensor:
        """The Frobenius norm of each matrix of X (..., n, w)."""
        return torch.linalg.matrix_norm(X)


#: Every row on this process: the identity and the plain factorisations.
ALL_ROWS = Rows()


@dataclass(frozen=True)
class RowShards(Rows):
    """Rows split over a process group, each process holding a contiguous block of them.

    Attributes:
        group: the process group (that of a 1-D device mesh).
        counts: rows held by each rank of the group, in rank order (torch.chunk sizes).
        index: this process's rank in the group.
    """

    group: Any
    counts: tuple[int, ...]
    index: int

    def count(self, local: int) -> int:
        return sum(self.counts)

    def take(self, whole: torch.Tensor) -> torch.Tensor:
        start = sum(self.counts[: self.index])
        return whole[..., start : start + self.counts[self.index], :]

    def gather(self, part: torch.Tensor) -> torch.Tensor:
        # One all-gather of the whole matrix: for the rare dense corrections, never part of a step.
        padded = part.new_zeros((*part.shape[:-2], max(self.counts), part.shape[-1]))
        padded[..., : part.shape[-2], :] = part
        gathered = self._all_gather(padded)
        return torch.cat([gathered[r, ..., :n, :] for r, n in enumerate(self.counts)], dim=-2)

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        x = x.resolve_conj().contiguous().clone()
        dist.all_reduce(torch.view_as_real(x) if x.is_complex() else x, group=self.group)
        return x

    def qr(self, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Note [TSQR]
        w = X.shape[-1]
        Q_local, R_local = torch.linalg.qr(X)
        padded = X.new_zeros((*X.shape[:-2], w, w))
        padded[..., : R_local.shape[-2], :] = R_local
        gathered = self._all_gather(padded)
        stacked = torch.cat([gathered[r, ..., : min(n, w), :] for r, n in enumerate(self.counts)], dim=-2)
        Z, R = torch.linalg.qr(stacked)
        offset = sum(min(n, w) for n in self.counts[: self.index])
        return Q_local @ Z[..., offset : offset + R_local.shape[-2], :], R

    def svd(self, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        L, R = self.qr(X)
        U, S, Vh = torch.linalg.svd(R, full_matrices=False)
        return L @ U, S, Vh

    def norm(self, X: torch.Tensor) -> torch.Tensor:
        return self.sum(X.abs().square().sum((-2, -1))).sqrt()

    def _all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """(P, *x.shape): x from every rank, stacked (x must have the same shape on every rank)."""
        x = x.resolve_conj().contiguous()
        out = torch.empty((len(self.counts), *x.shape), dtype=x.dtype, device=x.device)
        flat = (lambda t: torch.view_as_real(t).reshape(-1)) if x.is_complex() else (lambda t: t.reshape(-1))
        # all_gather_single is all_gather_into_tensor's newer name (the old one warns from torch 2.13).
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather(flat(out), flat(x), group=self.group)
        return out
