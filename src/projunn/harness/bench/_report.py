"""Tables and plot of ``projunn bench``: CSV, markdown and a log-log PNG of time against N."""

from __future__ import annotations

import csv
import io
import pathlib
from dataclasses import asdict, dataclass, fields

from .._files import atomic_write
from ._cases import BASELINE, PROJUNN_REFERENCE

__all__ = ["RESULT_FILES", "Row", "with_ratios", "write_reports"]

#: What a bench writes into its folder (:func:`write_reports`).
RESULT_FILES = ("results.csv", "results.md", "results.png")
_TITLES = {
    "update": "Update step of one N x N orthogonal matrix (float32)",
    "layer": "Training step of an N -> N orthogonal linear layer: forward, backward, update (float32)",
}
_FLOOR_NOTE = (
    "The floor is the least work of a rank-k unitary update: one N x N by N x 2k product and one rank-2k "
    "in-place update, two passes over the matrix. `plain SGD step` is unconstrained (one elementwise pass, "
    "no product with the weight), so it is not bound by the floor and can be faster.\n"
)
#: Legend labels that say what a baseline is: the floor bounds rank-k unitary updates only, so an
#: unconstrained step (plain SGD: one elementwise pass, no product with the weight) can fall below it.
LEGEND_LABELS = {
    "floor": "floor: least work of a rank-k unitary update (U X, rank-2k update)",
    "plain SGD step": "plain SGD step (unconstrained: no rank-k update, not bound by the floor)",
}
#: A colour per method, the first (the baseline: the update floor, unconstrained Adam) black.
_COLOURS = (
    "black",
    *(f"tab:{c}" for c in ("blue", "orange", "green", "red", "purple", "brown", "pink", "gray", "olive")),
)
_LINESTYLES = ("-", "--", ":", "-.")
_MARKERS = "os^DvP*Xh<>p"


@dataclass
class Row:
    """One measured (or skipped) case at one (N, k). Rank-free cases repeat their one measurement for each k."""

    bench: str
    N: int
    k: int
    case: str
    ms: float | None
    runs: int
    peak_mib: float | None  # CUDA only (see _measure._peak_mib)
    x_projunn: float | None = None  # ms / ms of the projunn-t reference at the same (bench, N, k)
    x_baseline: float | None = None  # ms / ms of the floor (update) or of unconstrained adam (layer)
    shared_across_k: bool = False
    note: str = ""


def with_ratios(rows: list[Row]) -> list[Row]:
    """Fill ``x_projunn`` and ``x_baseline`` from the reference and baseline rows of the same (bench, N, k)."""
    times = {(r.bench, r.N, r.k, r.case): r.ms for r in rows}
    for row in rows:
        reference = times.get((row.bench, row.N, row.k, PROJUNN_REFERENCE[row.bench]))
        baseline = times.get((row.bench, row.N, row.k, BASELINE[row.bench]))
        row.x_projunn = row.ms / reference if row.ms and reference else None
        row.x_baseline = row.ms / baseline if row.ms and baseline else None
    return rows


def _number(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def markdown(rows: list[Row], machine: str) -> str:
    """One table per (benchmark, k): rows N and case, times with both ratios."""
    lines = [f"# projunn bench\n\n{machine}. Medians of repeated timings after warm-up.\n"]
    for bench, k in dict.fromkeys((r.bench, r.k) for r in rows):
        lines += [
            f"\n## {_TITLES[bench]}, k = {k}\n",
            f"Ratios: to `{PROJUNN_REFERENCE[bench]}` and to `{BASELINE[bench]}` at the same N. Peak: the most "
            "memory torch holds at once during one call, above what it held before (MiB; read on CUDA only).\n",
            *([_FLOOR_NOTE] if bench == "update" else []),
            f"| N | case | ms | x projunn | x {BASELINE[bench]} | peak MiB | runs | note |",
            "|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r.N} | {r.case} | {_number(r.ms, '.3g')} | {_number(r.x_projunn, '.3g')} | "
            f"{_number(r.x_baseline, '.3g')} | {_number(r.peak_mib, '.1f')} | {r.runs or '-'} | {r.note} |"
            for r in rows
            if (r.bench, r.k) == (bench, k)
        ]
    return "\n".join(lines) + "\n"


def _method(case: str) -> str:
    """A case's method, its name's first word: ``projunn-t lsi`` and ``projunn-t + adam`` are projunn-t's."""
    return case.split()[0]


def series_styles(cases: list[str], emphasised: tuple[str, ...] = ()) -> dict[str, dict]:
    """Matplotlib line styles that tell every case apart: a colour per method, a line style and marker per case.

    A handful of well-separated colours, one per method (:func:`_method`: projunn-t, projunn-d,
    the ProjUNN optimiser step, expm, geoopt, geotorch, ...) in the order the methods first
    appear, black for the first (the baseline); the cases of one method, in order, get the solid,
    dashed, dotted and dash-dot lines with their own markers. The ``emphasised`` cases (reference
    and baseline) are drawn thick.

    Args:
        cases: series names, in plotting order.
        emphasised: names drawn with a thicker line.

    Returns:
        case -> keyword arguments for ``Axes.plot`` (color, linestyle, marker, linewidth, markersize).
    """
    methods = list(dict.fromkeys(map(_method, cases)))
    seen = [_method(case) for case in cases]
    return {
        case: {
            "color": _COLOURS[methods.index(method) % len(_COLOURS)],
            "linestyle": _LINESTYLES[seen[:i].count(method) % len(_LINESTYLES)],
            "marker": _MARKERS[seen[:i].count(method) % len(_MARKERS)],
            "linewidth": 2.5 if case in emphasised else 1.3,
            "markersize": 5,
        }
        for i, (case, method) in enumerate(zip(cases, seen))
    }


def figure(rows: list[Row], machine: str):
    """Log-log time against N, one panel per benchmark at the smallest k measured, legends beside the panels.

    Drawn on its own Agg canvas, without pyplot, so it neither switches the caller's backend nor
    leaves a figure open in pyplot's registry.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import StrMethodFormatter

    benches = list(dict.fromkeys(r.bench for r in rows))
    fig = Figure(figsize=(9 * len(benches), 5), layout="tight")
    FigureCanvasAgg(fig)
    for ax, bench in zip(fig.subplots(1, len(benches), squeeze=False)[0], benches):
        k = min(r.k for r in rows if r.bench == bench)
        cases = list(dict.fromkeys(r.case for r in rows if r.bench == bench))
        styles = series_styles(cases, emphasised=(BASELINE[bench], PROJUNN_REFERENCE[bench]))
        methods = list(dict.fromkeys(map(_method, cases)))
        for case in sorted(cases, key=lambda case: methods.index(_method(case))):  # a method's cases together
            points = [(r.N, r.ms) for r in rows if (r.bench, r.k, r.case) == (bench, k, case) and r.ms is not None]
            if points:
                ax.plot(*zip(*points), label=LEGEND_LABELS.get(case, case), **styles[case])
        ax.set(yscale="log", xlabel="N", ylabel="ms per step (median)")
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(StrMethodFormatter("{x:,.0f}"))  # 1,024 rather than 2^10
        ax.set_title(f"{bench}, k = {k}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        # Beside the panel, not over it: 16 series leave no empty corner on a log-log plot.
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    fig.suptitle(machine, fontsize=9)
    return fig


def write_reports(folder: pathlib.Path, rows: list[Row], machine: str) -> list[pathlib.Path]:
    """:data:`RESULT_FILES` in ``folder``: the rows as CSV, as markdown tables and drawn (:func:`figure`).

    Returns:
        the paths written.
    """
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / name for name in RESULT_FILES]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=[f.name for f in fields(Row)])
    writer.writeheader()
    writer.writerows(map(asdict, rows))
    atomic_write(paths[0], lambda tmp: tmp.write_text(text.getvalue()))
    atomic_write(paths[1], lambda tmp: tmp.write_text(markdown(rows, machine)))
    fig = figure(rows, machine)
    atomic_write(paths[2], lambda tmp: fig.savefig(tmp, dpi=110, format="png", bbox_inches="tight"))
    return paths
