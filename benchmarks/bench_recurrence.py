"""Seconds per training iteration of the sequence models: fused recurrence vs stepping the cell.

Measures, interleaved in one process so that both see the same machine state:
- ``fused``: :class:`projunn.nn.UnitaryRNN` with the whole-sequence recurrence;
- ``stepped``: the same model stepping :class:`UnitaryRNNCell` under autograd;
- ``matmul floor``: only the recurrent products an iteration cannot avoid
  (T forward ``addmm``, T backward ``addmm``, one gradient product).

An iteration is forward, loss, backward and a ProjUNN(RMSprop) step, as
``projunn train`` runs it. Usage::

    python benchmarks/bench_recurrence.py --threads 1 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

try:
    from projunn.harness._allocator import reuse_freed_memory
except ImportError:  # an older projunn, measured as the "before" variant

    def reuse_freed_memory() -> bool:
        return False


from projunn.models import SequenceModel
from projunn.optim import ProjUNN, param_groups

CASES = {
    # name: (input size, hidden, output, tokens, every step, T, nonlinearity, init)
    "copy T=1000 h=190 relu": (10, 190, 9, True, True, 1020, "relu", "henaff"),
    "pmnist h=170 modrelu": (1, 170, 10, False, False, 784, "modrelu", "cayley"),
}


def _model(case: tuple, fused: bool) -> SequenceModel:
    inputs, hidden, outputs, tokens, every_step, _, nonlinearity, init = case
    torch.manual_seed(0)
    model = SequenceModel(
        inputs, hidden, outputs, tokens=tokens, every_step=every_step, nonlinearity=nonlinearity, init=init
    )
    model.rnn.fused = fused
    return model


def _batch(case: tuple, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    inputs, _, outputs, tokens, _, steps, _, _ = case
    generator = torch.Generator().manual_seed(0)
    if tokens:
        return torch.randint(0, inputs, (batch, steps), generator=generator), torch.randint(
            0, outputs, (batch, steps), generator=generator
        )
    return torch.rand(batch, steps, inputs, generator=generator), torch.randint(
        0, outputs, (batch,), generator=generator
    )


def _iteration(model, optimizer, x, y) -> float:
    start = time.perf_counter()
    logits = model(x)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return time.perf_counter() - start


def _matmul_floor(case: tuple, batch: int) -> float:
    _, hidden, _, _, _, steps, _, _ = case
    weight = torch.linalg.qr(torch.randn(hidden, hidden))[0]
    xw = torch.randn(steps, batch, hidden)
    hs, grads = torch.empty_like(xw), torch.empty_like(xw)
    start = time.perf_counter()
    h = torch.zeros(batch, hidden)
    for t in range(steps):
        h = torch.addmm(xw[t], h, weight.t(), out=hs[t])
    for t in range(steps - 1, 0, -1):
        torch.addmm(xw[t - 1], grads[t], weight, out=grads[t - 1])
    _ = grads.reshape(-1, hidden).mT @ hs.reshape(-1, hidden)
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="timed iterations per variant (after one warm-up)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument(
        "--variants",
        default="fused,stepped",
        help="comma-separated subset of fused,stepped (for an older projunn without the fused path: stepped)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    reuse_freed_memory()  # as projunn train does
    results = {}
    for name, case in CASES.items():
        x, y = _batch(case, args.batch_size)
        runs = {}
        for fused in [v == "fused" for v in args.variants.split(",")]:
            model = _model(case, fused)
            optimizer = ProjUNN(torch.optim.RMSprop(param_groups(model, unitary_lr=1e-3 / 32), lr=1e-3), seed=0)
            runs["fused" if fused else "stepped"] = (model, optimizer)
        times = {label: [] for label in (*runs, "matmul floor")}
        for repeat in range(args.repeats + 1):  # interleaved; the first round warms up
            for label, (model, optimizer) in runs.items():
                elapsed = _iteration(model, optimizer, x, y)
                if repeat:
                    times[label].append(elapsed)
            if repeat:
                times["matmul floor"].append(_matmul_floor(case, args.batch_size))
        medians = {label: statistics.median(values) for label, values in times.items()}
        results[name] = medians
        ratios = "".join(f", {label}/floor {medians[label] / medians['matmul floor']:.2f}x" for label in runs)
        print(
            f"{name}, batch {args.batch_size}, {args.threads} thread(s): "
            + ", ".join(f"{label} {seconds:.3f} s" for label, seconds in medians.items())
            + ratios
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "batch_size": args.batch_size, "seconds": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
