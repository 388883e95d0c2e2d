"""Rounding drift of a float32 unitary weight over many projUNN-T steps, with and without drift control.

Runs ``--steps`` ProjUNN(SGD) steps (projUNN-T, rank 1, LSI sketch) on an N x N
orthogonal float32 weight with a fresh random gradient each step, once with
the default drift control (``drift_tolerance="auto"``, Note [Drift control])
and once without, and records ||U^H U - I||_F (computed exactly, in float64)
every ``--record-every`` steps.

Usage:
    python benchmarks/bench_drift.py                          # N = 256, 100,000 steps (a few minutes)
    python benchmarks/bench_drift.py --steps 20000 --out benchmarks/results/drift
"""

from __future__ import annotations

import argparse
import csv
import math
import pathlib
import time

import torch

from projunn.functional import unitarity_error, unitary_init
from projunn.optim import ProjUNN


def run(n: int, steps: int, record_every: int, drift_tolerance, lr: float) -> tuple[list[tuple[int, float]], dict]:
    """Train a lone weight on random gradients; return (step, unitarity error) pairs and totals."""
    weight = torch.nn.Parameter(unitary_init(n, "haar", generator=torch.Generator().manual_seed(0)))
    optimizer = ProjUNN(
        torch.optim.SGD([{"params": [weight], "unitary": True}], lr=lr), seed=0, drift_tolerance=drift_tolerance
    )
    gradients = torch.Generator().manual_seed(1)
    curve = [(0, unitarity_error(weight.detach()).item())]
    stepping = 0.0
    for step in range(1, steps + 1):
        weight.grad = torch.randn(n, n, generator=gradients) / math.sqrt(n)
        start = time.perf_counter()
        optimizer.step()
        stepping += time.perf_counter() - start
        if step % record_every == 0:
            curve.append((step, unitarity_error(weight.detach()).item()))
    corrections = optimizer.drift_control.corrections if optimizer.drift_control else 0
    return curve, {"ms_per_step": 1e3 * stepping / steps, "corrections": corrections}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--record-every", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("benchmarks/results/drift"))
    args = parser.parse_args(argv)
    arms = {"default drift control": "auto", "no drift control": None}
    curves, totals = {}, {}
    for name, tolerance in arms.items():
        curves[name], totals[name] = run(args.n, args.steps, args.record_every, tolerance, args.lr)
        final = curves[name][-1][1]
        worst = max(error for _, error in curves[name])
        print(
            f"{name:22s} final {final:.2e}  max {worst:.2e}  corrections {totals[name]['corrections']}  "
            f"{totals[name]['ms_per_step']:.3f} ms/step"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "drift.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", *arms])
        for rows in zip(*(curves[name] for name in arms)):
            writer.writerow([rows[0][0], *(error for _, error in rows)])

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name in arms:
        steps, errors = zip(*curves[name][1:])
        ax.loglog(steps, errors, label=f"{name} ({totals[name]['corrections']} corrections)")
    ax.axhline(1e-5, color="grey", linestyle=":", label="1e-5")
    ax.set_xlabel("projUNN-T steps")
    ax.set_ylabel(r"$\|U^H U - I\|_F$")
    ax.set_title(f"float32, N = {args.n}, random gradients, SGD lr {args.lr}", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out / "drift.png", dpi=110)
    print(f"wrote {args.out / 'drift.csv'} and {args.out / 'drift.png'}")


if __name__ == "__main__":
    main()
