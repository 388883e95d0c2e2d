"""Optimiser-step time of ProjUNN(Adam), batched (``foreach=True``) against per parameter (``foreach=False``).

Note [Batched steps] in ``projunn.optim._projunn`` updates the weights of one shape and setting with
one batched call. This measures what that saves on the models of issue 13, in one process:

- ``cnn32`` / ``cnn100``: DeepUnitaryCNN at depth 32 and 100 (two unitary parameters per layer: the
  complex free frequencies and the real self-mirrored ones, each a batch of C x C matrices);
- ``linear24``: a stack of 24 UnitaryLinear(1024).

Only ``optimizer.step()`` is timed: a fixed random gradient is set once, the same on both paths, and
the step is repeated (the weights move, the work does not change). Both paths are built from the same
initial model and timed interleaved, batched and per parameter alternating call by call, so a busy
machine slows both alike; the report gives each path's median and their ratio, and the base Adam step
alone (``method="none"``) for scale. ``--per-parameter`` times only the per-parameter path.

Usage:
    python benchmarks/bench_batched_step.py                      # the three models, float32, k = 1
    python benchmarks/bench_batched_step.py --quick              # small sizes, to check it runs
    python benchmarks/bench_batched_step.py --models cnn100 --repeats 50 --threads 8
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch

from projunn.nn import DeepUnitaryCNN, UnitaryLinear
from projunn.optim import ProjUNN, param_groups

#: name -> (full-size model, quick model) builders.
MODELS: dict[str, tuple[Callable[[], torch.nn.Module], Callable[[], torch.nn.Module]]] = {
    "cnn32": (lambda: DeepUnitaryCNN(32), lambda: DeepUnitaryCNN(4, channels=8, size=(8, 8))),
    "cnn100": (lambda: DeepUnitaryCNN(100), lambda: DeepUnitaryCNN(10, channels=8, size=(8, 8))),
    "linear24": (
        lambda: torch.nn.Sequential(*(UnitaryLinear(1024) for _ in range(24))),
        lambda: torch.nn.Sequential(*(UnitaryLinear(64) for _ in range(24))),
    ),
}


def _optimizer(model: torch.nn.Module, rank: int, **options) -> ProjUNN:
    groups = param_groups(model, unitary_lr=1e-4, rank=rank)
    return ProjUNN(torch.optim.Adam(groups, lr=1e-3), seed=0, drift_tolerance=None, **options)


def _with_gradients(model: torch.nn.Module, generator: torch.Generator) -> torch.nn.Module:
    for p in model.parameters():
        p.grad = 1e-3 * torch.randn(p.shape, dtype=p.dtype, generator=generator)
    return model


def steps_of(name: str, quick: bool, rank: int, paths: list[str]) -> dict[str, Callable[[], object]]:
    """path -> a zero-argument optimiser step, every path on its own copy of the same model and gradient."""
    torch.manual_seed(0)
    model = MODELS[name][1 if quick else 0]()
    options = {
        "batched": dict(foreach=True),
        "per parameter": dict(foreach=False),
        "adam alone": dict(method="none"),
    }
    steps = {}
    for path in paths:  # deepcopy leaves gradients behind: each copy gets the same ones
        copied = _with_gradients(copy.deepcopy(model), torch.Generator().manual_seed(1))
        steps[path] = _optimizer(copied, rank, **options[path]).step
    return steps


def interleaved_ms(steps: dict[str, Callable[[], object]], repeats: int, warmup: int) -> dict[str, float]:
    """Median ms of each step, the steps called in turn (round robin) so that load affects them alike."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {path: [] for path in steps}
    for _ in range(repeats):
        for path, step in steps.items():
            start = time.perf_counter()
            step()
            times[path].append(time.perf_counter() - start)
    return {path: 1e3 * statistics.median(values) for path, values in times.items()}


def count_unitary(model_name: str, quick: bool) -> tuple[int, int]:
    """(unitary parameters, distinct (shape, dtype)) of a model: how many calls each path makes."""
    model = MODELS[model_name][1 if quick else 0]()
    unitary = [p for group in param_groups(model) if group.get("unitary") for p in group["params"]]
    return len(unitary), len({(tuple(p.shape), p.dtype) for p in unitary})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--quick", action="store_true", help="small models and few repeats: checks that it runs")
    parser.add_argument("--per-parameter", action="store_true", help="time only the per-parameter path")
    parser.add_argument("--rank", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per path (default 20, --quick 3)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (3 if args.quick else 20)
    paths = ["per parameter"] if args.per_parameter else ["batched", "per parameter", "adam alone"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, k = {args.rank}, {repeats} repeats")
    print(f"{'model':>9} {'weights':>7} {'batches':>7} " + " ".join(f"{p + ' ms':>16}" for p in paths), end="")
    print(f" {'per param / batched':>19}" if "batched" in paths else "")
    for name in args.models:
        weights, batches = count_unitary(name, args.quick)
        ms = interleaved_ms(steps_of(name, args.quick, args.rank, paths), repeats, warmup=1 if args.quick else 3)
        line = f"{name:>9} {weights:>7} {batches:>7} " + " ".join(f"{ms[p]:>16.2f}" for p in paths)
        if "batched" in paths:
            line += f" {ms['per parameter'] / ms['batched']:>19.2f}"
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
