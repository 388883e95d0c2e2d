"""The optimiser step of an FSDP2-sharded orthogonal weight: its time, and the bytes its collectives move.

Usage:
    python benchmarks/sharded_bytes.py [--sizes N ...] [--ranks K ...] [--processes P] [--repeats R]

(defaults: N = 1024 2048 4096, k = 1 8, 2 processes, 15 timed steps). Prints a markdown table.

``processes`` CPU processes (gloo, file rendezvous) each hold some rows of an orthogonal N x N
float32 weight (``fully_shard``, Note [Row-sharded projUNN] in ``projunn._rows``). A
fixed gradient is made once by a forward and backward pass; then the optimiser step alone is timed,
the ranks synchronised by a barrier before and after every step (the time is rank 0's, barrier
included), as the median of ``repeats`` steps after a warm-up. The bytes of every collective in one
more step are counted at the dispatcher (c10d ops), each as the largest tensor it touches (an
all-reduce's buffer, an all-gather's output): what each rank receives. They are compared with one
all-gather of the weight (N^2 * 4 bytes), what an orthogonalising optimiser that needs the whole
matrix would move per step. Cases: plain Adam on the sharded weight (no communication in its step),
and projunn-t / -d + Adam with each sketch. Gloo on CPU: this measures the communication pattern,
not a GPU interconnect.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from projunn.harness.bench import CollectiveBytes

#: (case name, ProjUNN method, sketch); method "none" is the base optimiser's step alone.
CASES = (
    ("adam", "none", "lsi"),
    ("projunn-t + adam", "t", "lsi"),
    ("projunn-d + adam", "d", "lsi"),
    ("projunn-t + adam, column sketch", "t", "column"),
    ("projunn-t + adam, rsvd sketch", "t", "rsvd"),
)


def measure(n: int, k: int, *, processes: int = 2, repeats: int = 15) -> list[tuple[str, float, int, int]]:
    """(case, median ms per step, bytes per step, collectives per step) for each of :data:`CASES`."""
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_worker, args=(processes, folder, n, k, repeats), nprocs=processes, join=True)
        return torch.load(pathlib.Path(folder) / "results.pt")


def _worker(rank: int, world: int, folder: str, n: int, k: int, repeats: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from projunn.nn import OrthogonalLinear
    from projunn.optim import ProjUNN, param_groups

    torch.set_num_threads(max(1, torch.get_num_threads() // world))
    init = pathlib.Path(folder) / "init"
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        results = []
        for case, method, sketch in CASES:
            torch.manual_seed(0)
            model = torch.nn.Sequential(OrthogonalLinear(n, init="haar", bias=False))
            fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
            groups = param_groups(model, unitary_lr=1e-3, method=method, rank=min(k, n), sketch=sketch)
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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    print(f"Float32, {args.processes} CPU processes (gloo), median of {args.repeats} steps.\n")
    print("| N | k | case | ms per step | x adam | bytes per step | collectives | one all-gather / bytes |")
    print("|---|---|---|---|---|---|---|---|")
    for n in args.sizes:
        for k in args.ranks:
            results = measure(n, k, processes=args.processes, repeats=args.repeats)
            adam = results[0][1]
            for case, ms, sent, calls in results:
                gathers = f"{n * n * 4 / sent:,.0f}x" if sent else "-"
                print(
                    f"| {n} | {k} | {case} | {ms:.3g} | {ms / adam:.2f}x | {sent:,} | {calls} | {gathers} |", flush=True
                )


if __name__ == "__main__":
    main()
