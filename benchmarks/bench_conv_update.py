"""Per-step update time of a full-width orthogonal convolution: projUNN vs dense per-frequency steps.

An orthogonal conv on n x n images with C channels holds one C x C matrix
per independent frequency (about n * (n / 2 + 1) of them). Per step this
measures, in one process, as medians after warm-up:

- ``projunn t``: LSI sketch (k = 1) + projunn_t, batched over frequencies;
- ``cayley``: the dense Cayley step W (I - K/2)^{-1} (I + K/2) per frequency, batched;
- ``polar``: the exact projection polar(W + D) by SVD per frequency, batched.

Usage:
    python benchmarks/bench_conv_update.py --out benchmarks/results/conv-update
"""

from __future__ import annotations

import argparse
import pathlib

import torch

from projunn.functional import lowrank, projunn_t
from projunn.harness._build import pick_device
from projunn.harness.bench import describe_machine, measure
from projunn.nn import UnitaryConv2d

_BUDGET_S = 60.0  # per case: the O(C^3) steps at large C get fewer timed calls


def time_case(
    c: int, n: int, repeats: int, generator: torch.Generator, device: torch.device
) -> tuple[int, float, float, float]:
    """(frequencies, projunn ms, cayley ms, polar ms) for C = c channels on n x n images."""
    conv = UnitaryConv2d(c, (n, n), init="haar").to(device)
    W = conv.weight_free.detach()  # (F, C, C) complex64: the bulk of the parameters
    D = 1e-3 * torch.randn(W.shape, dtype=W.dtype, generator=generator).to(device)
    out = torch.empty_like(W)
    eye = torch.eye(c, dtype=W.dtype, device=device)
    sketches = torch.Generator(device=device).manual_seed(1)

    def projunn_step():
        a, b = lowrank(D, 1, "lsi", generator=sketches)
        projunn_t(W, a, b, out=out)

    def cayley_step():
        K = (W.mH @ D - D.mH @ W) / 2
        torch.matmul(W, torch.linalg.solve(eye - K / 2, eye + K / 2), out=out)

    def polar_step():
        # In the weights' own precision, as a user of the dense method would
        # (projunn's closest_unitary works in double precision, slower).
        X, _, Yh = torch.linalg.svd(W + D)
        torch.matmul(X, Yh, out=out)

    return (
        W.shape[0],
        measure(projunn_step, device, repeats=repeats, budget_s=_BUDGET_S).ms,
        measure(cayley_step, device, repeats=repeats, budget_s=_BUDGET_S).ms,
        measure(polar_step, device, repeats=repeats, budget_s=_BUDGET_S).ms,
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--channels", type=int, nargs="+", default=[16, 64, 128])
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=pathlib.Path, default=None)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    header = f"conv update per step, {describe_machine(device)}"
    print(header)
    lines = [
        "| C | n | frequencies | projunn t (ms) | cayley (ms) | polar (ms) | cayley / t | polar / t |",
        "|---|---|---|---|---|---|---|---|",
    ]
    generator = torch.Generator().manual_seed(0)
    for c in args.channels:
        for n in args.sizes:
            frequencies, t, cay, pol = time_case(c, n, args.repeats, generator, device)
            lines.append(
                f"| {c} | {n} | {frequencies} | {t:.2f} | {cay:.2f} | {pol:.2f} | {cay / t:.1f}x | {pol / t:.1f}x |"
            )
            print(lines[-1], flush=True)
    table = "\n".join(lines)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.md").write_text(header + "\n\n" + table + "\n")


if __name__ == "__main__":
    main()
