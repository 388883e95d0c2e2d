"""The kernels on rows split over processes equal the kernels on whole matrices (Note [Row-sharded projUNN]).

Each process is played by a thread holding its rows (torch.chunk sizes: uneven, some empty). Only
the two collectives of RowShards, its all-reduce and its all-gather, are replaced by exchanges
between the threads, so the TSQR, the sums and the row bookkeeping run as between processes, in
milliseconds. tests/test_sharded.py runs the same kernels through ProjUNN on FSDP2 weights in
real processes.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from projunn._rows import RowShards
from projunn.functional import lowrank, projunn_d, projunn_t
from projunn.functional._sketch import factors
from projunn.functional._update import update


class _Threads:
    """What every thread contributes to a collective, handed to all of them in rank order."""

    def __init__(self, world: int) -> None:
        self.barrier = threading.Barrier(world, timeout=60)
        self.slots: list[torch.Tensor | None] = [None] * world

    def exchange(self, index: int, x: torch.Tensor) -> list[torch.Tensor]:
        self.slots[index] = x
        self.barrier.wait()
        values = list(self.slots)
        self.barrier.wait()  # nobody writes the next collective's slot before all have read this one
        return values


class _ThreadShards(RowShards):
    """RowShards whose group is a set of threads."""

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        total = None
        for part in self.group.exchange(self.index, x.resolve_conj().clone()):
            total = part if total is None else total + part  # the same order on every rank
        return total

    def _all_gather(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack(self.group.exchange(self.index, x.resolve_conj().contiguous()))


def _split(rows: int, world: int) -> list[tuple[int, int]]:
    """(start, count) of each rank's rows, torch.chunk sizes as FSDP2 splits them."""
    chunk = -(-rows // world)
    counts = [max(0, min(chunk, rows - r * chunk)) for r in range(world)]
    return [(sum(counts[:r]), n) for r, n in enumerate(counts)]


def _on_ranks(world: int, rows: int, fn) -> list:
    """fn(shards, take) on every rank, take(x) giving that rank's rows of x; the results in rank order."""
    split = _split(rows, world)
    group = _Threads(world)
    counts = tuple(n for _, n in split)

    def run(index: int):
        start, n = split[index]
        return fn(_ThreadShards(group, counts, index), lambda x: x[..., start : start + n, :])

    with ThreadPoolExecutor(world) as pool:
        return list(pool.map(run, range(world)))


DTYPES = [torch.float64, torch.complex128]
# square, tall, wide with an empty shard on 3 ranks, and a batch
SHAPES = [(7, 7), (10, 6), (2, 9), (2, 5, 5)]


def _unitary(shape: tuple[int, ...], dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    n = max(shape[-2:])
    full = torch.linalg.qr(torch.randn(*shape[:-2], n, n, dtype=dtype, generator=generator))[0]
    return full[..., : shape[-2], : shape[-1]].contiguous()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("sketch", ["lsi", "column", "rsvd", "exact"])
def test_split_sketches_equal_the_whole_sketch(sketch, shape, dtype):
    D = torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(1))
    rank = 2 if min(shape[-2:]) > 2 else 1
    # Fewer columns sampled than D has, so that the column sketch depends on its draw.
    options = {"samples": rank + 1} if sketch == "column" else {}
    a, b = lowrank(D, rank, sketch, generator=torch.Generator().manual_seed(7), **options)

    def sketch_rows(shards, take):
        return factors(take(D), rank, sketch, rows=shards, generator=torch.Generator().manual_seed(7), **options)

    parts = _on_ranks(3, shape[-2], sketch_rows)
    a_split = torch.cat([part[0] for part in parts], dim=-2)
    for _, b_rank in parts[1:]:
        torch.testing.assert_close(b_rank, parts[0][1], rtol=0, atol=0)  # b is the same on every rank
    # The factors' signs follow the QR that made them; the sketch a b^H does not.
    torch.testing.assert_close(a_split @ parts[0][1].mH, a @ b.mH, rtol=0, atol=1e-12)
    # Another seed draws another sketch, so the agreement is not that of any two sketches.
    if sketch in ("lsi", "column") and min(shape[-2:]) > rank:
        other = lowrank(D, rank, sketch, generator=torch.Generator().manual_seed(8), **options)
        assert (other[0] @ other[1].mH - a @ b.mH).abs().max() > 1e-3


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("method", ["t", "d"])
@pytest.mark.parametrize("world", [2, 3])
def test_split_updates_equal_the_whole_update(world, method, shape, dtype):
    generator = torch.Generator().manual_seed(2)
    U = _unitary(shape, dtype, generator)
    a = 0.3 * torch.randn(*shape[:-1], 2, dtype=dtype, generator=generator)
    b = torch.randn(*shape[:-2], shape[-1], 2, dtype=dtype, generator=generator)
    whole = (projunn_t if method == "t" else projunn_d)(U, a, b)

    def update_rows(shards, take):
        local = take(U)
        out = torch.empty_like(local)
        return update(method, local, take(a), b, out=out, rows=shards)

    split = torch.cat(_on_ranks(world, shape[-2], update_rows), dim=-2)
    torch.testing.assert_close(split, whole, rtol=0, atol=1e-12)
    assert (whole - U).abs().max() > 1e-2  # the step moved U


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(10, 6), (2, 9)])
def test_a_singular_split_projunn_d_step_takes_the_gathered_polar_factor(shape, dtype):
    # W + a b^H = W - W v v^H (tall) or W - v v^H W (wide) loses a direction: the dense fallback
    # of Note [Stiefel projUNN-D] runs, gathering the matrix on every rank.
    generator = torch.Generator().manual_seed(3)
    W = _unitary(shape, dtype, generator)
    if shape[0] >= shape[1]:
        b = torch.linalg.qr(torch.randn(shape[1], 1, dtype=dtype, generator=generator))[0]
        a = -(W @ b)
    else:
        a = torch.linalg.qr(torch.randn(shape[0], 1, dtype=dtype, generator=generator))[0]
        b = -(W.mH @ a)
    whole = projunn_d(W, a, b)

    def update_rows(shards, take):
        return update("d", take(W), take(a), b, out=torch.empty_like(take(W)), rows=shards)

    split = torch.cat(_on_ranks(3, shape[0], update_rows), dim=-2)
    torch.testing.assert_close(split, whole, rtol=0, atol=1e-12)
    gram = split.mH @ split if shape[0] >= shape[1] else split @ split.mH
    torch.testing.assert_close(gram, torch.eye(min(shape), dtype=dtype), rtol=0, atol=1e-12)
