"""The ``sharded`` benchmark: one optimiser step of an FSDP2-sharded N x N weight, time and bytes communicated.

``world`` CPU processes (gloo, file rendezvous) each hold some rows of an orthogonal N x N float32
weight (``fully_shard``, Note [Row-sharded projUNN] in ``projunn.functional._rows``). A fixed
gradient is made once by a forward and backward pass; then the optimiser step alone is timed, the
ranks synchronised by a barrier before and after every step (the time is rank 0's, barrier
included), as the median of ``repeats`` steps after a warm-up. The bytes of every collective in one
step are counted at the dispatcher (c10d ops), each as the largest tensor it touches (an
all-reduce's buffer, an all-gather's output): what each rank receives. Cases: plain Adam on the
sharded weight (``method="none"``, no communication in the step), and projunn-t / -d + Adam with the
LSI sketch. Gloo on CPU whatever ``--device`` says: this measures the communication pattern, not a
GPU interconnect.
"""

from __future__ import annotations

import pathlib
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["SHARDED_CASES", "CollectiveBytes", "sharded_measurements"]

#: (case name, ProjUNN method) of the sharded benchmark; "none" is the base optimiser's step alone.
SHARDED_CASES = (("adam", "none"), ("projunn-t + adam", "t"), ("projunn-d + adam", "d"))


class CollectiveBytes(TorchDispatchMode):
    """Counts the collectives run under it and their bytes (the largest tensor each touches)."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace in ("c10d", "_c10d_functional"):
            leaves = torch.utils._pytree.tree_leaves((args, kwargs))
            self.total += max(t.numel() * t.element_size() for t in leaves if isinstance(t, torch.Tensor))
            self.calls += 1
        return func(*args, **(kwargs or {}))


def sharded_measurements(n: int, k: int, *, world: int = 2, repeats: int = 15) -> list[tuple[str, float, int, int]]:
    """(case, median ms per step, bytes per step, collectives per step) for each of :data:`SHARDED_CASES`.

    Args:
        n: size of the N x N weight, split by rows over ``world`` processes.
        k: sketch rank.
        world: number of processes (2 in the issue's measurement).
        repeats: timed steps per case.
    """
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_worker, args=(world, folder, n, k, repeats), nprocs=world, join=True)
        return torch.load(pathlib.Path(folder) / "results.pt")


def _worker(rank: int, world: int, folder: str, n: int, k: int, repeats: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from ...nn import OrthogonalLinear
    from ...optim import ProjUNN, param_groups

    torch.set_num_threads(max(1, torch.get_num_threads() // world))
    init = pathlib.Path(folder) / "init"
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        results = []
        for case, method in SHARDED_CASES:
            torch.manual_seed(0)
            model = torch.nn.Sequential(OrthogonalLinear(n, init="haar", bias=False))
            fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
            groups = param_groups(model, unitary_lr=1e-3, method=method, rank=min(k, n))
            optimizer = ProjUNN(torch.optim.Adam(groups, lr=1e-3), seed=0, drift_tolerance=None)
            model(torch.randn(8, n)).square().mean().backward()
            optimizer.step()  # warm-up: Adam allocates its state
            times = []
            for _ in range(repeats):
                dist.barrier()
                start = time.perf_counter()
                optimizer.step()
                dist.barrier()
                times.append(time.perf_counter() - start)
            with CollectiveBytes() as counter:
                optimizer.step()
            results.append((case, 1e3 * statistics.median(times), counter.total, counter.calls))
        if rank == 0:
            torch.save(results, pathlib.Path(folder) / "results.pt")
    finally:
        dist.destroy_process_group()
