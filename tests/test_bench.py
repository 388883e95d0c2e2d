"""``projunn bench``: the grid is complete, ratios are consistent, missing peers are skipped, files are written."""

from __future__ import annotations

import csv
import pathlib
import subprocess
import sys
import time

import matplotlib.colors
import matplotlib.pyplot
import pytest
import torch

from projunn.harness.bench import BenchConfig, _report, run_bench
from projunn.harness.bench import _cases as cases
from projunn.harness.bench._measure import _peak_mib, measure, measure_interleaved
from projunn.harness.cli import main

TINY = BenchConfig(sizes=(8, 16), ranks=(1, 2), repeats=3, budget_s=0.05, dense_max=8, peer_max=8)
SKETCHES = ("lsi", "column", "rsvd", "exact")
UPDATE_CASES = {
    "floor",
    *(f"projunn-{method} {sketch}" for sketch in SKETCHES for method in "td"),
    "ProjUNN(SGD) step",
    "ProjUNN(SGD) step, generic step",
    "plain SGD step",
    "expm step",
    "cayley step",
    "polar (SVD) step",
    "geoopt RiemannianSGD",
    "geoopt RiemannianAdam",
}
LAYER_CASES = {
    "adam",
    "adam + update floor",
    "projunn-t + adam",
    "projunn-t + adam, generic step",
    "projunn-d + adam",
    "torch orthogonal matrix_exp",
    "torch orthogonal cayley",
    "geotorch expm",
    "geotorch cayley",
}
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="peak memory is read on CUDA only")
ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_rows():
    rows, machine = run_bench(TINY, log=None)
    return rows, machine


def test_every_case_at_every_size_and_rank(tiny_rows):
    rows, machine = tiny_rows
    assert BenchConfig().benches == ("update", "layer")
    assert "float32" in machine and "torch" in machine
    for n in TINY.sizes:
        for k in TINY.ranks:
            assert {r.case for r in rows if (r.bench, r.N, r.k) == ("update", n, k)} == UPDATE_CASES
            assert {r.case for r in rows if (r.bench, r.N, r.k) == ("layer", n, k)} == LAYER_CASES


def test_ratios_are_to_the_reference_and_baseline_of_the_same_size(tiny_rows):
    rows, _ = tiny_rows
    by_key = {(r.bench, r.N, r.k, r.case): r for r in rows}
    for r in rows:
        if r.ms is None:
            assert r.x_projunn is None and r.note
            continue
        reference = by_key[(r.bench, r.N, r.k, cases.PROJUNN_REFERENCE[r.bench])]
        baseline = by_key[(r.bench, r.N, r.k, cases.BASELINE[r.bench])]
        assert r.x_projunn == pytest.approx(r.ms / reference.ms)
        assert r.x_baseline == pytest.approx(r.ms / baseline.ms)
        assert r.runs >= 3


def test_rank_free_cases_are_measured_once_and_o_n3_cases_are_capped(tiny_rows):
    rows, _ = tiny_rows
    for case in ("expm step", "torch orthogonal cayley"):
        shared = [r for r in rows if r.case == case and r.N == 8]
        assert len(shared) == 2 and shared[0].ms == shared[1].ms and shared[0].shared_across_k
    for baseline in cases.BASELINE.values():  # timed with the cases of each rank, in the same rounds
        assert not any(r.shared_across_k for r in rows if r.case == baseline)
    skipped = {r.case: r.note for r in rows if r.N == 16 and r.ms is None}
    assert "N > --dense-max 8" in skipped["expm step"] and "N > --peer-max 8" in skipped["geotorch cayley"]
    assert "full SVD" in skipped["projunn-t exact"]  # capped by dense_max = 8 here
    assert all(r.ms is not None for r in rows if r.case.startswith("projunn-t lsi"))


def test_a_missing_peer_is_skipped_with_the_install_hint(monkeypatch):
    monkeypatch.setattr(cases, "_peer", lambda module: None)
    config = BenchConfig(sizes=(8,), ranks=(1,), repeats=3, budget_s=0.01, dense_max=8, peer_max=8)
    rows, _ = run_bench(config, log=None)
    notes = {r.case: r.note for r in rows if r.ms is None}
    assert set(notes) == {"geoopt RiemannianSGD", "geoopt RiemannianAdam", "geotorch expm", "geotorch cayley"}
    assert all("pip install 'projunn[bench]'" in note for note in notes.values())
    assert next(r for r in rows if r.case == "torch orthogonal cayley").ms is not None


def test_measure_takes_fewer_runs_for_slow_cases_and_at_most_repeats():
    slow = measure(lambda: time.sleep(0.02), torch.device("cpu"), repeats=50, budget_s=0.05)
    assert slow.runs == 3 and slow.ms >= 15
    fast = measure(lambda: None, torch.device("cpu"), repeats=7, budget_s=1.0)
    assert fast.runs == 7
    assert measure(lambda: time.sleep(0.02), torch.device("cpu"), repeats=1, budget_s=0.05).runs == 1  # "at most"


def test_interleaved_rounds_keep_ratios_while_the_machine_slows_down():
    """Two calls, one twice the other, while the machine halves its speed: the ratio stays 2.

    The slowdown comes after 5 of the 20 timed rounds, so both medians are slow ones. Timed one
    after the other, the first call would see the fast machine about half the time and the second
    never (a ratio of ~2.7).
    """
    calls, slowdown = [], {"factor": 1.0}

    def sleeper(name, ms):
        def call():
            calls.append(name)
            if len(calls) == 14:  # the warm-up's 4 calls and 5 of the 20 timed rounds
                slowdown["factor"] = 2.0
            time.sleep(ms * slowdown["factor"] / 1e3)

        return call

    short, long = measure_interleaved(
        [sleeper("short", 2), sleeper("long", 4)], torch.device("cpu"), repeats=20, budget_s=10.0
    )
    assert short.runs == long.runs == 20
    assert 1.6 < long.ms / short.ms < 2.5
    timed = calls[4:44]  # each round calls both, the order reversed every other round
    assert timed[:4] == ["short", "long", "long", "short"] and timed.count("short") == 20


def test_peak_memory_is_not_reported_on_cpu(tiny_rows):
    """The CPU has no allocator statistics to read it from (see _measure._peak_mib): the column says '-'."""
    rows, machine = tiny_rows
    assert all(r.peak_mib is None for r in rows)
    markdown = _report.markdown(rows, machine)
    assert "read on CUDA only" in markdown and "| 8 | floor |" in markdown


@CUDA
def test_peak_memory_counts_temporaries_freed_within_the_call():
    """A 64 MiB temporary, allocated and freed inside the call, after warm-up calls that did the same."""
    device = torch.device("cuda")

    def allocate():
        torch.ones(16 * 2**20, dtype=torch.float32, device=device).sum()

    result = measure(allocate, device, repeats=3, budget_s=1.0)
    assert result.peak_mib == pytest.approx(64, abs=0.1)  # the sum's own scratch (a few KiB) aside


@CUDA
def test_peak_memory_counts_a_step_that_frees_what_the_previous_one_allocated():
    """A gradient replaced every step: the old one is freed, the new one allocated; the call's own need is ~0."""
    device = torch.device("cuda")
    held = [torch.zeros(2**20, device=device)]

    def replace():
        held[0] = None  # free the previous call's 4 MiB first,
        held[0] = torch.zeros(2**20, device=device)  # then allocate as much again

    assert measure(replace, device, repeats=3, budget_s=1.0).peak_mib < 0.01


@CUDA
def test_dense_steps_at_1024_show_their_n_by_n_temporaries():
    """The 0.0 MiB the resident-set reading gave for these at N = 1024, against the N x N (4 MiB) they need."""
    n, device, n_by_n_mib = 1024, torch.device("cuda"), 1024 * 1024 * 4 / 2**20
    config = BenchConfig(dense_max=n)
    dense = {"expm step", "cayley step", "polar (SVD) step"}
    steps = {c.name: c.fn for c in cases.update_cases_full_rank(n, config, device) if c.name in dense}
    steps["projunn-t lsi"] = next(c.fn for c in cases.update_cases(n, 1, config, device) if c.name == "projunn-t lsi")
    measured = {}
    for name, step in steps.items():
        step()  # warm, as measure_interleaved() does before reading the peak
        measured[name] = _peak_mib(step, device)
    assert all(measured[name] >= n_by_n_mib for name in dense), measured
    assert measured["projunn-t lsi"] < n_by_n_mib / 4, measured  # its N x k factors and small matrices only


def test_plot_gives_every_series_its_own_style_and_keeps_the_legend_off_the_data(tiny_rows):
    rows, machine = tiny_rows
    fig = _report.figure(rows, machine)
    assert not matplotlib.pyplot.get_fignums()  # drawn without pyplot: nothing left open in its registry
    try:
        fig.canvas.draw()
        for ax in fig.axes:
            lines = ax.get_lines()
            looks = {
                (matplotlib.colors.to_hex(line.get_color()), line.get_linestyle(), line.get_marker()) for line in lines
            }
            assert len(lines) >= 7 and len(looks) == len(lines)
            legend = ax.get_legend().get_window_extent()
            assert legend.x0 >= ax.get_window_extent().x1  # beside the axes, not over them
            low, high = ax.get_xlim()
            shown = [label.get_text() for n, label in zip(ax.get_xticks(), ax.get_xticklabels()) if low <= n <= high]
            assert shown == ["8", "16"]  # the sizes as numbers, not 2^3, 2^4
        labels = [text.get_text() for text in fig.axes[0].get_legend().get_texts()]
        # The floor bounds rank-k unitary updates; plain SGD, drawn below it, is said to be no such update.
        assert labels[0].startswith("floor: least work of a rank-k unitary update")
        assert any(label.startswith("plain SGD step (unconstrained") for label in labels)
    finally:
        matplotlib.pyplot.close(fig)
    update_cases_in_order = list(dict.fromkeys(r.case for r in rows if r.bench == "update"))
    styles = _report.series_styles(update_cases_in_order)
    looks = {(s["color"], s["linestyle"], s["marker"]) for s in styles.values()}
    assert len(styles) == 17 and len(looks) == 17
    # A colour per method, few enough to tell apart (not 17 near-identical hues): sketches share projunn-t's.
    assert len({s["color"] for s in styles.values()}) <= 10
    assert len({styles[f"projunn-t {sketch}"]["color"] for sketch in ("lsi", "column", "rsvd", "exact")}) == 1
    assert styles["projunn-t lsi"]["color"] != styles["projunn-d lsi"]["color"] != styles["floor"]["color"]


def test_cli_writes_csv_markdown_and_plot(tmp_path, capsys):
    out = tmp_path / "bench"
    argv = ["bench", "--sizes", "8", "--ranks", "1", "--repeats", "3", "--budget-s", "0.01", "--only", "update"]
    assert main([*argv, "--out", str(out), "--quiet"]) == 0
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["case"] for r in rows} == UPDATE_CASES and all(r["bench"] == "update" for r in rows)
    markdown = (out / "results.md").read_text()
    assert "| 8 | projunn-t lsi |" in markdown and "k = 1" in markdown
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"
    assert "wrote" in capsys.readouterr().out


def test_cli_flags_override_quick_and_with_8192_adds_a_size(tmp_path, monkeypatch):
    import projunn.harness.bench as bench

    configs = []
    monkeypatch.setattr(bench, "run_bench", lambda config, log: (configs.append(config), ([], "machine"))[1])
    monkeypatch.setattr(bench, "write_reports", lambda out, rows, machine: [])
    argv = ["--quick", "--ranks", "2", "--with-8192", "--only", "layer", "--dense-max", "8", "--out", str(tmp_path)]
    assert main(["bench", *argv]) == 0
    assert main(["bench", "--batch-size", "4", "--device", "cpu", "--out", str(tmp_path), "--overwrite"]) == 0
    assert configs == [
        BenchConfig(**{**bench.QUICK, "sizes": (256, 1024, 8192), "ranks": (2,)}, benches=("layer",), dense_max=8),
        BenchConfig(batch_size=4, device="cpu"),
    ]


def test_cli_bad_arguments_exit_2_with_one_line(tmp_path, capsys):
    out = tmp_path / "b"
    assert main(["bench", "--sizes", "1", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "sizes must be integers >= 2" in err and err.count("\n") == 1
    refused = [(["--sizes", "0"], "expected a positive integer"), (["--only", "x"], "invalid choice")]
    # The sharded step is timed by benchmarks/sharded_bytes.py, which starts its processes itself.
    refused.append((["--only", "sharded"], "invalid choice: 'sharded'"))
    for argv, message in refused:
        with pytest.raises(SystemExit) as caught:
            main(["bench", *argv, "--out", str(out)])
        err = capsys.readouterr().err
        assert caught.value.code == 2 and message in err and err.count("\n") == 1
    assert not out.exists()


@pytest.mark.slow  # starts two processes
def test_sharded_script_reports_time_and_bytes_per_step():
    # One size: how the bytes grow with N is counted in test_sharded.py, without the script's timing.
    n = 32
    script = ROOT / "benchmarks" / "sharded_bytes.py"
    argv = [sys.executable, str(script), "--sizes", str(n), "--ranks", "1", "--repeats", "1"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines() if line.startswith(f"| {n} | 1 |")]
    ms = {cells[2].strip(): float(cells[3]) for cells in rows}
    x_adam = {cells[2].strip(): float(cells[4].strip(" x")) for cells in rows}
    sent = {cells[2].strip(): int(cells[5].replace(",", "")) for cells in rows}
    assert list(ms) == [
        "adam",
        "projunn-t + adam",
        "projunn-d + adam",
        *(f"projunn-t + adam, {s} sketch" for s in ("column", "rsvd")),
    ]
    assert all(t > 0 and x_adam[case] == pytest.approx(t / ms["adam"], rel=0.01, abs=0.01) for case, t in ms.items())
    assert sent["adam"] == 0  # the base step of row-split weights needs no communication
    for case in ("projunn-t + adam", "projunn-d + adam"):  # thin blocks, far below one gather of the weight
        assert 0 < sent[case] < n * n * 4 / 2, (case, sent)
