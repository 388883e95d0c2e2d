"""Time per training step of each method on the paper's sequence experiments, measured side by side.

The runs in benchmarks/results/paper/ record their own seconds, but those are seconds of a shared
machine (two runs side by side, other work beside them, different sittings), so a ratio of two
runs' steps per second measures the machine as much as the method. Here every method's step is
built as ``projunn train TASK --preset paper --method M`` builds it and timed in the same process,
in interleaved rounds (:func:`projunn.harness.bench._measure.measure_interleaved`), so the ratios
hold whatever the machine does meanwhile. One step = the batch, forward, loss, backward and the
optimiser step (for the parametrised methods, the weight computed once per forward, as a run does).

Usage:
    OMP_NUM_THREADS=1 python benchmarks/paper_step_times.py                     # copy T = 1000 and pMNIST h170
    OMP_NUM_THREADS=1 python benchmarks/paper_step_times.py --tasks pmnist --out benchmarks/results/paper
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import pathlib

import torch
from torch.nn.utils import parametrize

from projunn.harness._build import pick_device
from projunn.harness._config import PARAMETRISED_METHODS
from projunn.harness.bench import describe_machine
from projunn.harness.bench._measure import measure_interleaved
from projunn.harness.train import TrainConfig, build, resolve

METHODS = ("t", "expm", "eunn", "none")
#: The experiments: task and the preset's own free setting (copy: the delay T).
TASKS = {"copy": {"seq_len": 1000}, "pmnist": {}}


def training_step(task: str, method: str, device: torch.device):
    """One training step of ``projunn train TASK --preset paper --method METHOD``, a fresh batch per call."""
    return step_of(resolve(TrainConfig(task=task, method=method, preset="paper", **TASKS[task])), device)


def step_of(config: TrainConfig, device: torch.device):
    """One training step of a run with these (resolved) settings, built as ``projunn train`` builds it."""
    torch.manual_seed(0)
    built = build(config, device)
    cached = parametrize.cached if config.method in PARAMETRISED_METHODS else contextlib.nullcontext
    steps = itertools.count()

    def step():
        x, y = built.data.batch(next(steps))
        with cached():
            loss = built.data.loss(built.model, x, y)
        loss.backward()
        built.optimizer.step()
        built.optimizer.zero_grad()

    return step


def table(rows: dict[str, dict[str, float]], header: str) -> str:
    """Markdown: seconds per step of each method and its ratio to projUNN-T's, per task."""
    lines = [header, "", "| task | " + " | ".join(f"{m} (s/step)" for m in METHODS) + " | "]
    lines[-1] += " | ".join(f"{m} / t" for m in METHODS if m != "t") + " |"
    lines.append("|---" * (2 * len(METHODS)) + "|")
    for task, seconds in rows.items():
        cells = [f"{seconds[m]:.3f}" for m in METHODS] + [f"{seconds[m] / seconds['t']:.2f}x" for m in METHODS[1:]]
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", choices=tuple(TASKS), default=list(TASKS))
    parser.add_argument("--repeats", type=int, default=7, help="timed steps per method at most")
    parser.add_argument("--budget-s", type=float, default=20.0, help="seconds per method and task")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    parser.add_argument("--out", type=pathlib.Path, default=None, help="folder for step-times.md")
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    rows = {}
    for task in args.tasks:
        steps = [training_step(task, method, device) for method in METHODS]
        found = measure_interleaved(steps, device, repeats=args.repeats, budget_s=args.budget_s)
        rows[task] = {method: m.ms / 1e3 for method, m in zip(METHODS, found)}
        print(task, {method: round(s, 3) for method, s in rows[task].items()}, f"({found[0].runs} rounds)", flush=True)
        del steps
    header = (
        f"Seconds per training step, `--preset paper` (copy: T = 1000), medians of interleaved rounds after "
        f"warm-up; {describe_machine(device)}."
    )
    text = table(rows, header)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "step-times.md").write_text(text)


if __name__ == "__main__":
    main()
