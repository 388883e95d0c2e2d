"""Time per training iteration of the copy-task RNN: projUNN-T vs torch's orthogonal maps vs unconstrained.

One iteration = make the batch, forward, backward, optimiser step (and, for
``expm``/``cayley``, computing the parametrised weight once per forward, as
``projunn train`` does with ``parametrize.cached``). All methods run in the
same process on the same model, as medians after warm-up, so the ratios are
comparable.

Usage:
    python benchmarks/bench_rnn_iteration.py                       # hidden 190, 512, 1024; T = 20
    python benchmarks/bench_rnn_iteration.py --hidden 190 --seq-len 100 --out benchmarks/results/rnn-iteration
    python benchmarks/bench_rnn_iteration.py --device cuda                 # on a GPU
"""

from __future__ import annotations

import argparse
import pathlib

import torch

from paper_step_times import step_of
from projunn.harness._build import pick_device
from projunn.harness.bench import describe_machine, measure
from projunn.harness.train import TrainConfig, resolve

METHODS = ("t", "expm", "cayley", "none")


def iteration_ms(hidden: int, seq_len: int, batch_size: int, method: str, repeats: int, device: torch.device) -> float:
    config = resolve(TrainConfig(task="copy", method=method, hidden=hidden, seq_len=seq_len, batch_size=batch_size))
    one = step_of(config, device)  # the model constrained by the method and its optimiser, as projunn train builds them
    # The whole budget of time goes to `repeats` calls at most (a large hidden size gets fewer).
    return measure(one, device, repeats=repeats, budget_s=60.0, warmup=3).ms


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, nargs="+", default=[190, 512, 1024])
    parser.add_argument("--seq-len", type=int, default=20, help="copy-task delay T (sequence length T + 20)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=pathlib.Path, default=None, help="folder for results.md")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    header = (
        f"copy task, T = {args.seq_len} (sequence length {args.seq_len + 20}), batch {args.batch_size}, "
        f"{describe_machine(device)}; median ms per iteration"
    )
    print(header)
    lines = ["| hidden | " + " | ".join(METHODS) + " | expm / t | cayley / t | t / none |", "|---" * 8 + "|"]
    for hidden in args.hidden:
        ms = {m: iteration_ms(hidden, args.seq_len, args.batch_size, m, args.repeats, device) for m in METHODS}
        print(hidden, {k: round(v, 2) for k, v in ms.items()}, flush=True)
        cells = " | ".join(f"{ms[m]:.1f}" for m in METHODS)
        lines.append(
            f"| {hidden} | {cells} | {ms['expm'] / ms['t']:.2f}x | {ms['cayley'] / ms['t']:.2f}x "
            f"| {ms['t'] / ms['none']:.2f}x |"
        )
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.md").write_text(header + "\n\n" + table + "\n")


if __name__ == "__main__":
    main()
