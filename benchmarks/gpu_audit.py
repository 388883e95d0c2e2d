"""What a GPU does with projunn, measured in one run and written to one report (needs CUDA).

    python benchmarks/gpu_audit.py [--out runs/gpu-check/audit.md] [--steps 2000]

- waits: a projUNN-T step (LSI, k = 1) of one weight, sixteen weights and a depth-32 stack of
  orthogonal convolutions under ``torch.cuda.set_sync_debug_mode("warn")``, counting the
  synchronising calls (tests/test_optim.py counts the same path's operations on the CPU: 2);
- drift: ``--steps`` Adam + projUNN steps of a 256 x 256 layer, t and d, real and complex, on the
  GPU with TF32 off and on ("highest" / "high") and on the CPU from the same start: the largest
  ||U^H U - I||_F and the distance between the GPU's and the CPU's final weights;
- time: a training step of DeepUnitaryCNN at depth 8 and 32 (32 channels, batch 64, 28 x 28) and a
  forward + backward of the unitary RNN at T = 1000 and 784 (hidden 170, batch 128), fused and step
  by step, in float32 and under bfloat16 autocast.

Without a GPU it says so in one line and exits with status 1.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
import warnings

import torch

from projunn.functional import unitarity_error
from projunn.models import DeepUnitaryCNN
from projunn.nn import UnitaryLinear, UnitaryRNN
from projunn.optim import ProjUNN, param_groups


def _optimizer(model: torch.nn.Module, method: str = "t") -> ProjUNN:
    groups = param_groups(model, unitary_lr=1e-3, method=method, rank=1, sketch="lsi")
    return ProjUNN(torch.optim.Adam(groups, lr=1e-3), seed=0)


def waits(device: torch.device) -> list[str]:
    cases = {
        "one weight": (lambda: UnitaryLinear(256), (64, 256)),
        "sixteen weights": (lambda: torch.nn.Sequential(*(UnitaryLinear(256) for _ in range(16))), (64, 256)),
        "depth-32 conv stack": (lambda: DeepUnitaryCNN(32, channels=8), (16, 1, 28, 28)),
    }
    rows = []
    for name, (build, shape) in cases.items():
        model = build().to(device)
        optimizer = _optimizer(model)
        for step in range(3):
            model(torch.randn(shape, device=device)).square().mean().backward()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn" if step == 2 else "default")
                optimizer.step()
                torch.cuda.set_sync_debug_mode("default")
            optimizer.zero_grad()
        rows.append(f"| {name} | {len(caught)} |")
    return ["## Synchronising calls in one ProjUNN step", "", "| model | waits |", "|---|---|", *rows, ""]


def drift(device: torch.device, steps: int) -> list[str]:
    rows = []
    for dtype in (torch.float32, torch.complex64):
        for method in ("t", "d"):
            finals = {}
            for where, precision in ((device, "highest"), (device, "high"), (torch.device("cpu"), "highest")):
                torch.set_float32_matmul_precision(precision)
                torch.manual_seed(0)
                layer = UnitaryLinear(256, dtype=dtype).to(where)
                optimizer, worst = _optimizer(layer, method), 0.0
                data = torch.Generator().manual_seed(1)
                for _ in range(steps):
                    x = torch.randn(64, 256, generator=data).to(where, dtype)
                    layer(x).abs().square().mean().backward()
                    optimizer.step()
                    optimizer.zero_grad()
                    worst = max(worst, float(unitarity_error(layer.weight.detach())))
                finals[(where.type, precision)] = (layer.weight.detach().cpu(), worst)
            torch.set_float32_matmul_precision("highest")
            cpu = finals[("cpu", "highest")][0]
            for (kind, precision), (weight, worst) in finals.items():
                gap = float((weight - cpu).abs().max())
                rows.append(f"| {dtype} | {method} | {kind} | {precision} | {worst:.2e} | {gap:.2e} |")
    header = "| dtype | method | device | matmul precision | max unitarity error | max diff from CPU |"
    title = f"## Drift over {steps} steps (256 x 256, Adam lr 1e-3)"
    return [title, "", header, "|---|---|---|---|---|---|", *rows, ""]


def _timed(fn, device: torch.device, repeats: int = 10) -> float:
    fn()
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize(device)
    return 1e3 * (time.perf_counter() - start) / repeats


def timings(device: torch.device) -> list[str]:
    rows = []
    for depth in (8, 32):
        model = DeepUnitaryCNN(depth).to(device)
        optimizer, x = _optimizer(model), torch.randn(64, 1, 28, 28, device=device)

        def step(model=model, optimizer=optimizer, x=x):
            model(x).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()

        rows.append(f"| DeepUnitaryCNN depth {depth}, training step | {_timed(step, device):.1f} |")
    for length in (1000, 784):
        for fused in (True, False):
            for autocast in (False, True):
                rnn = UnitaryRNN(1, 170, fused=fused).to(device)
                x = torch.randn(128, length, 1, device=device)

                def forward_backward(rnn=rnn, x=x, autocast=autocast):
                    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                        rnn(x)[0].float().square().mean().backward()

                kind = f"{'fused' if fused else 'step by step'}, {'bf16 autocast' if autocast else 'float32'}"
                ms = _timed(forward_backward, device, 3)
                rows.append(f"| RNN T = {length}, {kind}, forward + backward | {ms:.1f} |")
    return ["## Time (ms)", "", "| what | ms |", "|---|---|", *rows, ""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("runs/gpu-check/audit.md"))
    parser.add_argument("--steps", type=int, default=2000, help="steps of the drift comparison")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_audit: no CUDA device: this audit needs a GPU", file=sys.stderr)
        return 1
    device = torch.device("cuda")
    lines = [f"# GPU audit: {torch.cuda.get_device_name(device)}, torch {torch.__version__}", ""]
    lines += waits(device) + drift(device, args.steps) + timings(device)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
