"""Compact tables for docs/benchmarks.md from a ``projunn bench`` results.csv.

Usage:
    python benchmarks/summarise_bench.py benchmarks/results/bench-cpu-2core/results.csv [--k 1]
"""

from __future__ import annotations

import argparse
import csv
import pathlib


def _headline(case: str) -> bool:
    """A case of the compact tables: the LSI sketch only, the default optimiser step only, no plain SGD."""
    other_sketch = case.startswith("projunn-") and not case.endswith(("lsi", "adam"))
    return not (other_sketch or case.endswith("generic step") or case == "plain SGD step")


def headline_cases(rows: list[dict], bench: str) -> tuple[str, ...]:
    """The compact tables' cases of ``bench``, in the order the bench lists them."""
    return tuple(filter(_headline, dict.fromkeys(r["case"] for r in rows if r["bench"] == bench)))


def _cell(row: dict | None, ratio: str) -> str:
    if row is None or not row["ms"]:
        return "-"
    ms = float(row["ms"])
    shown = f"{ms:.3g} ms" if ms < 1000 else f"{ms / 1000:.3g} s"
    if not row[ratio]:
        return shown
    x = float(row[ratio])
    return f"{shown} ({x:.0f}x)" if x >= 10 else f"{shown} ({x:.2g}x)"


def table(rows: list[dict], bench: str, cases: tuple[str, ...], k: str, ratio: str) -> str:
    lines = ["| N | " + " | ".join(cases) + " |", "|---" * (len(cases) + 1) + "|"]
    for n in dict.fromkeys(r["N"] for r in rows if r["bench"] == bench):
        cells = {r["case"]: r for r in rows if (r["bench"], r["N"], r["k"]) == (bench, n, k)}
        lines.append(f"| {n} | " + " | ".join(_cell(cells.get(c), ratio) for c in cases) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csv", type=pathlib.Path)
    parser.add_argument("--k", default="1")
    args = parser.parse_args(argv)
    with open(args.csv) as f:
        rows = list(csv.DictReader(f))
    print(f"Update step, k = {args.k}; in brackets, the ratio to the floor:\n")
    print(table(rows, "update", headline_cases(rows, "update"), args.k, "x_baseline"))
    print(f"\nUpdate step, k = {args.k}; in brackets, the ratio to projunn-t with the LSI sketch:\n")
    print(table(rows, "update", headline_cases(rows, "update"), args.k, "x_projunn"))
    print(f"\nLayer training step, k = {args.k}; in brackets, the ratio to unconstrained Adam:\n")
    print(table(rows, "layer", headline_cases(rows, "layer"), args.k, "x_baseline"))


if __name__ == "__main__":
    main()
