"""Per-step time of the projUNN update against the memory floor and dense exact steps.

Measures, in one run and on one device (medians of repeated timings after warm-up):

- ``floor``: one N x N by N x 2k product plus one rank-2k in-place update of
  the N x N matrix, the least work any rank-k method must do;
- ``t`` / ``d``: ``projunn_t`` / ``projunn_d`` alone, given the factors a, b;
- ``lsi+t`` / ``lsi+d``: the LSI sketch of an N x N step followed by the update;
- ``optim t``: a whole ``ProjUNN(SGD)`` step (save U, base step, sketch,
  update), and ``plain sgd`` for the same parameter without projUNN;
- ``expm`` / ``cayley``: the dense O(N^3) exact steps, U exp(K) and the
  Cayley retraction U (I - K/2)^{-1} (I + K/2) (``--dense-max`` bounds N).

Results and output buffers are allocated once and reused: a fresh N x N
allocation is page-faulted on every call at large N, which would measure the
allocator rather than the method.

Usage:
    python benchmarks/bench_update.py                   # N = 1024, 2048, 4096, k = 1
    python benchmarks/bench_update.py --sizes 256 512 --ranks 1 4 --out results/
"""

from __future__ import annotations

import argparse
import csv
import pathlib
import platform

import torch

from _timing import median_ms
from projunn.functional import lowrank, projunn_d, projunn_t, unitary_init
from projunn.optim import ProjUNN


def cases(n: int, k: int, dtype: torch.dtype, dense_max: int):
    """Yield (name, callable) pairs sharing pre-allocated inputs and outputs."""
    g = torch.Generator().manual_seed(0)
    U = unitary_init(n, "haar", dtype=dtype, generator=g)
    D = 1e-3 * torch.randn(n, n, dtype=dtype, generator=g)
    a, b = lowrank(D, k, "lsi", generator=g)
    out = torch.empty_like(U)
    work = U.clone()
    X = torch.randn(n, 2 * k, dtype=dtype, generator=g)
    Y = 1e-9 * torch.randn(n, 2 * k, dtype=dtype, generator=g)

    def floor():
        Z = work @ X
        work.addmm_(Z, Y.mT)

    yield "floor", floor
    yield "t", lambda: projunn_t(U, a, b, out=out)
    yield "d", lambda: projunn_d(U, a, b, out=out)

    def sketched(update):
        def step():
            a_, b_ = lowrank(D, k, "lsi", generator=g)
            update(U, a_, b_, out=out)

        return step

    yield "lsi+t", sketched(projunn_t)
    yield "lsi+d", sketched(projunn_d)

    weight = torch.nn.Parameter(U.clone())
    weight.grad = D.clone()
    opt = ProjUNN(torch.optim.SGD([{"params": [weight], "unitary": True}], lr=1e-3), rank=k, seed=0)
    yield "optim t", opt.step
    plain_weight = torch.nn.Parameter(U.clone())
    plain_weight.grad = D.clone()
    yield "plain sgd", torch.optim.SGD([plain_weight], lr=1e-3).step

    if n <= dense_max:
        K = (U.mH @ D - D.mH @ U) / 2
        eye = torch.eye(n, dtype=dtype)
        yield "expm", lambda: torch.matmul(U, torch.linalg.matrix_exp(K), out=out)
        yield "cayley", lambda: torch.matmul(U, torch.linalg.solve(eye - K / 2, eye + K / 2), out=out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1])
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--dense-max", type=int, default=4096, help="largest N for the dense O(N^3) steps")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--out", type=pathlib.Path, default=None, help="folder for results.csv and results.md")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    cpu = platform.processor() or platform.machine()
    machine = f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    print(f"# projUNN update step, {args.dtype}, {machine}")
    rows = []
    for n in args.sizes:
        for k in args.ranks:
            timings = {}
            for name, fn in cases(n, k, dtype, args.dense_max):
                repeats = args.repeats if name not in ("expm", "cayley") else max(3, args.repeats // 5)
                timings[name] = median_ms(fn, repeats=repeats, warmup=2 if repeats < 5 else 3)
                floor = timings["floor"]
                rows.append({"N": n, "k": k, "case": name, "ms": timings[name], "x_floor": timings[name] / floor})
                print(f"N={n:5d} k={k:2d} {name:10s} {timings[name]:10.2f} ms  {timings[name] / floor:7.2f} x floor")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        with open(args.out / "results.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        with open(args.out / "results.md", "w") as f:
            f.write(f"projUNN update step, {args.dtype}, {machine}; medians; ratio to the floor in brackets\n\n")
            names = list(dict.fromkeys(r["case"] for r in rows))
            f.write("| N | k | " + " | ".join(names) + " |\n|" + "---|" * (len(names) + 2) + "\n")
            for n, k in dict.fromkeys((r["N"], r["k"]) for r in rows):
                cells = {r["case"]: r for r in rows if r["N"] == n and r["k"] == k}
                row = [f"{cells[c]['ms']:.2f} ({cells[c]['x_floor']:.2f}x)" if c in cells else "-" for c in names]
                f.write(f"| {n} | {k} | " + " | ".join(row) + " |\n")
        print(f"wrote {args.out / 'results.csv'} and {args.out / 'results.md'}")


if __name__ == "__main__":
    main()
