"""Bytes communicated by one ProjUNN(Adam) step of an FSDP2-sharded unitary weight, against one all-gather of it.

Usage: python benchmarks/sharded_bytes.py [N] [processes]   (default N = 4096, 2 processes; CPU, gloo)

Every collective the optimiser step issues is counted at the dispatcher (c10d ops), as the largest
tensor it touches: an all-reduce's buffer, an all-gather's output, i.e. what each rank receives.
An N x N float32 weight is compared with one all-gather of it (N^2 * 4 bytes), what an
orthogonalising optimiser that needs the whole matrix would move per step.
"""

from __future__ import annotations

import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from projunn.harness.bench import CollectiveBytes


def _run(rank: int, world: int, init: str, n: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from projunn.nn import UnitaryLinear
    from projunn.optim import ProjUNN, param_groups

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        gather = n * n * 4
        if rank == 0:
            print(f"N = {n}, float32, {world} processes; one all-gather of the weight = {gather:,} bytes")
            print(
                f"{'sketch':>7} {'method':>6} {'rank k':>6} {'bytes/step':>12} {'collectives':>11} "
                f"{'all-gather / step':>17} {'step s':>7}"
            )
        for sketch, method, k in [
            ("lsi", "t", 1),
            ("lsi", "d", 1),
            ("lsi", "t", 8),
            ("lsi", "d", 8),
            ("column", "t", 8),
            ("rsvd", "t", 8),
        ]:
            torch.manual_seed(0)
            model = torch.nn.Sequential(UnitaryLinear(n, init="identity"))
            fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
            groups = param_groups(model, unitary_lr=1e-3, method=method, rank=k, sketch=sketch)
            optimizer = ProjUNN(torch.optim.Adam(groups), seed=0, drift_tolerance=None)
            model(torch.randn(8, n)).square().mean().backward()
            optimizer.step()  # warm-up: Adam allocates its state
            model(torch.randn(8, n)).square().mean().backward()
            dist.barrier()
            start = time.perf_counter()
            with CollectiveBytes() as counter:
                optimizer.step()
            elapsed = time.perf_counter() - start
            if rank == 0:
                print(
                    f"{sketch:>7} {method:>6} {k:>6} {counter.total:>12,} {counter.calls:>11} "
                    f"{gather / counter.total:>16,.0f}x {elapsed:>7.3f}",
                    flush=True,
                )
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 4096
    world = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    mp.spawn(_run, args=(world, tempfile.mkdtemp() + "/init", n), nprocs=world, join=True)
