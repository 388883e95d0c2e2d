"""Tables and plot of ``projunn bench``: CSV, markdown and a log-log PNG of time against N."""

from __future__ import annotations

import csv
import io
import pathlib
from dataclasses import asdict, dataclass

from .._files import atomic_write
from ._cases import BASELINE, PROJUNN_REFERENCE

__all__ = ["Row", "with_ratios", "write_reports"]

_TITLES = {
    "update": "Update step of one N x N orthogonal matrix (float32)",
    "layer": "Training step of an N -> N orthogonal linear layer: forward, backward, update (float32)",
    "sharded": "Optimiser step of an N x N orthogonal weight sharded by rows over 2 CPU processes (float32, gloo)",
}


@dataclass
class Row:
    """One measured (or skipped) case at one (N, k). Rank-free cases repeat their one measurement for each k."""

    bench: str
    N: int
    k: int
    case: str
    ms: float | None
    runs: int
    peak_mib: float | None
    x_projunn: float | None = None  # ms / ms of the projunn-t reference at the same (bench, N, k)
    x_baseline: float | None = None  # ms / ms of the floor (update) or of unconstrained adam (layer)
    shared_across_k: bool = False
    note: str = ""


def with_ratios(rows: list[Row]) -> list[Row]:
    """Fill ``x_projunn`` and ``x_baseline`` from the reference and baseline rows of the same (bench, N, k)."""
    times = {(r.bench, r.N, r.k, r.case): r.ms for r in rows}
    for row in rows:
        if row.ms is None:
            continue
        reference = times.get((row.bench, row.N, row.k, PROJUNN_REFERENCE[row.bench]))
        baseline = times.get((row.bench, row.N, row.k, BASELINE[row.bench]))
        row.x_projunn = row.ms / reference if reference else None
        row.x_baseline = row.ms / baseline if baseline else None
    return rows


def _csv_text(rows: list[Row]) -> str:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(asdict(rows[0])))
    writer.writeheader()
    writer.writerows(asdict(r) for r in rows)
    return text.getvalue()


def _number(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


_FLOOR_NOTE = (
    "The floor is the least work of a rank-k unitary update: one N x N by N x 2k product and one rank-2k "
    "in-place update, two passes over the matrix. `plain SGD step` is unconstrained (one elementwise pass, "
    "no product with the weight), so it is not bound by the floor and can be faster.\n"
)


def markdown(rows: list[Row], machine: str) -> str:
    """One table per (benchmark, k): rows N and case, times with both ratios."""
    lines = [f"# projunn bench\n\n{machine}. Medians of repeated timings after warm-up.\n"]
    for bench in dict.fromkeys(r.bench for r in rows):
        baseline = BASELINE[bench]
        for k in dict.fromkeys(r.k for r in rows if r.bench == bench):
            lines += [
                f"\n## {_TITLES[bench]}, k = {k}\n",
                f"Ratios: to `{PROJUNN_REFERENCE[bench]}` and to `{baseline}` at the same N. "
                "Peak: the most memory torch holds at once during one call, above what it held before (MiB; "
                "BLAS/LAPACK's own buffers not included).\n",
                *([_FLOOR_NOTE] if baseline == "floor" else []),
                f"| N | case | ms | x projunn | x {baseline} | peak MiB | runs | note |",
                "|---|---|---|---|---|---|---|---|",
            ]
            for r in (r for r in rows if r.bench == bench and r.k == k):
                lines.append(
                    f"| {r.N} | {r.case} | {_number(r.ms, '.3g')} | {_number(r.x_projunn, '.3g')} | "
                    f"{_number(r.x_baseline, '.3g')} | {_number(r.peak_mib, '.1f')} | {r.runs or '-'} | {r.note} |"
                )
    return "\n".join(lines) + "\n"


#: A colour per method, the first whose words a case's name contains; the cases of one method
#: (sketches, libraries, step paths) share it and differ by line style and marker.
_METHOD_COLOURS = (
    (("projunn-t",), "tab:blue"),
    (("projunn-d",), "tab:orange"),
    (("projunn(sgd)",), "tab:green"),
    (("expm", "matrix_exp"), "tab:red"),
    (("cayley",), "tab:purple"),
    (("polar",), "tab:brown"),
    (("geoopt",), "tab:pink"),
    (("plain sgd",), "tab:gray"),
    (("floor", "adam"), "black"),  # the baselines: the update floor, unconstrained Adam
)
_OTHER_COLOURS = ("tab:olive", "tab:cyan")
_LINESTYLES = ("-", "--", ":", "-.")
_MARKERS = "os^DvP*Xh<>p"
#: Legend labels that say what a baseline is: the floor bounds rank-k unitary updates only, so an
#: unconstrained step (plain SGD: one elementwise pass, no product with the weight) can fall below it.
LEGEND_LABELS = {
    "floor": "floor: least work of a rank-k unitary update (U X, rank-2k update)",
    "plain SGD step": "plain SGD step (unconstrained: no rank-k update, not bound by the floor)",
}


def _colour(case: str, unknown: dict[str, str]) -> str:
    name = case.lower()
    for words, colour in _METHOD_COLOURS:
        if any(word in name for word in words):
            return colour
    return unknown.setdefault(case, _OTHER_COLOURS[len(unknown) % len(_OTHER_COLOURS)])


def series_styles(cases: list[str], emphasised: tuple[str, ...] = ()) -> dict[str, dict]:
    """Matplotlib line styles that tell every case apart: a colour per method, a line style and marker per case.

    A handful of well-separated colours, one per method (projunn-t, projunn-d,
    the ProjUNN optimiser step, expm, cayley, polar, geoopt, plain SGD, and
    black for the baselines); the cases of one method, in order, get the solid,
    dashed, dotted and dash-dot lines with their own markers. The
    ``emphasised`` cases (reference and baseline) are drawn thick.

    Args:
        cases: series names, in plotting order.
        emphasised: names drawn with a thicker line.

    Returns:
        case -> keyword arguments for ``Axes.plot`` (color, linestyle, marker, linewidth, markersize).
    """
    unknown: dict[str, str] = {}
    seen: dict[str, int] = {}  # colour -> cases given it so far
    styles = {}
    for case in cases:
        colour = _colour(case, unknown)
        i = seen[colour] = seen.get(colour, -1) + 1
        styles[case] = {
            "color": colour,
            "linestyle": _LINESTYLES[i % len(_LINESTYLES)],
            "marker": _MARKERS[i % len(_MARKERS)],
            "linewidth": 2.5 if case in emphasised else 1.3,
            "markersize": 5,
        }
    return styles


def figure(rows: list[Row], machine: str):
    """Log-log time against N, one panel per benchmark at the smallest k measured, legends beside the panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import StrMethodFormatter

    benches = list(dict.fromkeys(r.bench for r in rows))
    fig, axes = plt.subplots(1, len(benches), figsize=(9 * len(benches), 5), squeeze=False)
    for ax, bench in zip(axes[0], benches):
        k = min(r.k for r in rows if r.bench == bench)
        cases = list(dict.fromkeys(r.case for r in rows if r.bench == bench))
        styles = series_styles(cases, emphasised=(BASELINE[bench], PROJUNN_REFERENCE[bench]))
        # The legend lists the cases of one method (one colour) together, baselines first.
        colours = list(dict.fromkeys(styles[case]["color"] for case in [BASELINE[bench], *cases] if case in styles))
        cases.sort(key=lambda case: colours.index(styles[case]["color"]))
        for case in cases:
            points = [(r.N, r.ms) for r in rows if (r.bench, r.k, r.case) == (bench, k, case) and r.ms is not None]
            if points:
                sizes, times = zip(*points)
                ax.plot(sizes, times, label=LEGEND_LABELS.get(case, case), **styles[case])
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(StrMethodFormatter("{x:,.0f}"))  # 1,024 rather than 2^10
        ax.set_yscale("log")
        ax.set_xlabel("N")
        ax.set_ylabel("ms per step (median)")
        ax.set_title(f"{bench}, k = {k}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        # Beside the panel, not over it: 16 series leave no empty corner on a log-log plot.
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    fig.suptitle(machine, fontsize=9)
    fig.tight_layout()
    return fig


def plot(path: pathlib.Path, rows: list[Row], machine: str) -> None:
    """Write :func:`figure` as a PNG."""
    fig = figure(rows, machine)
    import matplotlib.pyplot as plt  # after figure() has chosen the Agg backend

    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png", bbox_inches="tight"))
    plt.close(fig)


def write_reports(folder: pathlib.Path, rows: list[Row], machine: str) -> list[pathlib.Path]:
    """results.csv, results.md and results.png in ``folder``; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / "results.csv", folder / "results.md", folder / "results.png"]
    atomic_write(paths[0], lambda tmp: tmp.write_text(_csv_text(rows)))
    atomic_write(paths[1], lambda tmp: tmp.write_text(markdown(rows, machine)))
    plot(paths[2], rows, machine)
    return paths
