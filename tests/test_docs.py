"""The documentation holds: the README's commands are CI's and its quote of the main job's last lines is
current, the README's training loop and every docstring example run as written, the names the guide's
API table lists exist, and links point to files that exist."""

from __future__ import annotations

import difflib
import doctest
import importlib
import importlib.util
import json
import pathlib
import re
import subprocess
import sys

import pytest
import torch

import projunn
import projunn.robust
from harness_runs import small_held_out_sets  # noqa: F401  (fixture)

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _modules_with_examples() -> list[str]:
    """Every module of src/projunn with a docstring example that runs: a ``>>>`` line holding code
    (not only a comment) and not marked +SKIP."""
    package = ROOT / "src" / "projunn"
    found = []
    for path in sorted(package.rglob("*.py")):
        lines = path.read_text(encoding="utf-8").splitlines()
        if any(re.search(r">>> *[^#\s]", line) and "+SKIP" not in line for line in lines):
            parts = path.relative_to(package).with_suffix("").parts
            found.append(".".join(["projunn", *(parts[:-1] if parts[-1] == "__init__" else parts)]))
    return found


MODULES = _modules_with_examples()


def test_readme_training_loop_runs(tmp_path, monkeypatch):
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
    assert blocks, "README has no python example"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    model = namespace["model"]
    # Float32 rounding walk: ~4e-7 per step at N = 128, x sqrt(256 / 128), x sqrt(1000 steps), x2 margin.
    assert projunn.functional.unitarity_error(model[0].weight.detach()) < 2 * 4e-7 * 2**0.5 * 1000**0.5
    assert (tmp_path / "ckpt.pt").exists()


def test_docstring_examples_cover_every_layer_model_and_task_module():
    """The modules that had no example (and so passed by running nothing) are found now, with the rest."""
    expected = {
        "projunn.functional._sketch",
        "projunn.functional._unitary",
        "projunn.functional._update",
        "projunn.optim._groups",
        "projunn.optim._projunn",
        "projunn.nn._constrain",
        "projunn.nn._conv",
        "projunn.nn._linear",
        "projunn.nn._rnn",
        "projunn.nn._shape",
        "projunn.nn._activation",
        "projunn.models._lipschitz",
        "projunn.robust",
        "projunn.models._cnn",
        "projunn.models._resnet",
        "projunn.models._sequence",
        "projunn.harness.tasks._synthetic",
    }
    assert expected <= set(MODULES), sorted(expected - set(MODULES))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    globs = {"torch": torch, "projunn": projunn, **vars(module)}
    torch.manual_seed(0)
    result = doctest.testmod(module, globs=globs, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} has no docstring example that doctest runs"
    assert result.failed == 0


def _quick_start() -> str:
    return (ROOT / "README.md").read_text().split("\n## Quick start (fresh machine)\n", 1)[1].split("\n## ", 1)[0]


def test_readme_commands_are_what_ci_runs_and_fit_one_screen():
    readme = (ROOT / "README.md").read_text()
    main_job, tests = re.findall(r"```bash\n(.*?)\n```", _quick_start(), flags=re.DOTALL)
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert tests == ci
    install_torch = ci.split(" && .venv/bin/pip install -e ")[0]
    assert main_job == f"{install_torch} && .venv/bin/pip install '.[harness]' && .venv/bin/projunn train copy"
    # What projunn is, its headline figures and both commands, before a reader has to scroll.
    assert tests in "\n".join(readme.splitlines()[:50])
    assert len(readme.splitlines()) < 150, "the README is for what a user needs first: the rest is in docs/"


def _fields(line: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in line.split())


@pytest.mark.usefixtures("small_held_out_sets")
def test_readme_quotes_how_the_main_job_ends(tmp_path, capsys):
    from projunn.harness.cli import main

    final, wrote = re.search(r"```text\n(final_loss=.*)\n(wrote .*)\n```", _quick_start()).groups()
    tiny = ["--hidden", "8", "--batch-size", "4", "--steps", "1", "--quiet"]  # the main job's task and T
    assert main(["train", "copy", *tiny, "--out", str(tmp_path / "r")]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert list(_fields(printed[-2])) == list(_fields(final))
    assert _fields(printed[-2])["baseline_loss"] == _fields(final)["baseline_loss"]
    assert printed[-1] == f"wrote {tmp_path / 'r'}" and wrote.startswith("wrote runs/copy-t-")


def _guide_api_names() -> list[str]:
    """Dotted names in the first column of the guide's API table; a bare name in a row with others
    lives in the same module as the row's first name (`projunn.nn.UnitaryRNN`, `ModReLU`, ...)."""
    section = (ROOT / "docs" / "guide.md").read_text().split("\n## API\n", 1)[1].split("\n## ", 1)[0]
    names = []
    for row in re.findall(r"^\| (.+?) \|", section, flags=re.MULTILINE):
        cells = re.findall(r"`([\w.]+)", row)
        if not cells or not cells[0].startswith("projunn."):
            continue
        names.append(cells[0])
        module = cells[0].rsplit(".", 1)[0]
        names += [name if name.startswith("projunn.") else f"{module}.{name}" for name in cells[1:]]
    return names


def test_guide_api_names_resolve():
    names = _guide_api_names()
    assert "projunn.harness.tasks" in names and "projunn.harness.bench.run_bench" in names, names
    assert "projunn.harness.train.train" in names  # the loggers' way in, which the version policy covers
    for name in names:
        parts = name.split(".")
        # The longest importable module prefix, then attributes (classes, functions, constants).
        for cut in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
                break
            except ModuleNotFoundError:
                continue
        for part in parts[cut:]:
            obj = getattr(obj, part)


# The harness's extra dependencies made unimportable (a None entry in sys.modules is what Python
# uses for "known missing": import raises ModuleNotFoundError, importlib.util.find_spec returns None),
# before torch and projunn load, so the library must work on an install of torch alone.
_WITHOUT_HARNESS_EXTRA = """
import sys
for name in ("numpy", "tqdm", "matplotlib"):
    sys.modules[name] = None
"""


def test_library_needs_only_torch_and_the_command_line_names_the_missing_extra():
    """One fresh interpreter without numpy, tqdm and matplotlib: the library trains a step and
    loads no harness; then the command line stops with a one-line hint, not a traceback."""
    code = (
        _WITHOUT_HARNESS_EXTRA
        + """
import torch
import projunn, projunn.functional, projunn.optim, projunn.nn, projunn.models
model = projunn.nn.UnitaryLinear(8)
optimizer = projunn.optim.ProjUNN(torch.optim.Adam(projunn.optim.param_groups(model, unitary_lr=0.01)))
model(torch.randn(4, 8)).square().sum().backward()
optimizer.step()
assert float(projunn.functional.unitarity_error(model.weight.detach())) < 1e-5
assert not any(name.startswith("projunn.harness") for name in sys.modules), "import projunn loaded the harness"
assert not any(name.split(".")[0] in ("numpy", "tqdm", "matplotlib") for name in sys.modules if sys.modules[name])
print("library ok")
sys.argv = ["projunn", "train", "copy"]
import projunn.harness
projunn.harness.console_main()
"""
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "library ok", result.stderr
    assert result.returncode == 1
    # torch itself may warn that numpy is missing; projunn's part is one line and no traceback.
    ours = [line for line in result.stderr.splitlines() if line.startswith("projunn:")]
    assert len(ours) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "missing: numpy, tqdm, matplotlib" in ours[0] and "pip install 'projunn[harness]'" in ours[0]


def test_committed_runs_record_no_machine_specific_path():
    """A committed run folder moves with the repository: its config.json names no absolute path."""
    for path in sorted((ROOT / "benchmarks" / "results").rglob("config.json")):
        settings = json.loads(path.read_text())
        absolute = {k: v for k, v in settings.items() if isinstance(v, str) and pathlib.PurePath(v).is_absolute()}
        assert not absolute, f"{path.relative_to(ROOT)}: {absolute}"


def _api_generator():
    spec = importlib.util.spec_from_file_location("gen_api_docs", ROOT / "tools" / "gen_api_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_api_reference_is_current(tmp_path):
    """docs/api.md is what tools/gen_api_docs.py writes from today's docstrings."""
    fresh = tmp_path / "api.md"
    assert _api_generator().main(["--output", str(fresh)]) == 0
    committed = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    regenerated = fresh.read_text(encoding="utf-8")
    diff = "".join(
        difflib.unified_diff(
            committed.splitlines(keepends=True),
            regenerated.splitlines(keepends=True),
            "docs/api.md",
            "regenerated",
            n=1,
        )
    )
    assert committed == regenerated, f"docs/api.md is out of date: run python tools/gen_api_docs.py\n{diff[:3000]}"


def test_api_reference_covers_the_public_api_and_its_notes():
    text = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    for module in (projunn.functional, projunn.optim, projunn.nn, projunn.models, projunn.robust):
        for name in module.__all__:
            assert f"\n### {module.__name__}.{name}\n" in text, f"{module.__name__}.{name} missing from docs/api.md"
    # Every Note a docstring (or another Note) refers to is on the page, e.g. those help(ProjUNN) names.
    headings = set(re.findall(r"^### Note \[([^\]]+)\]$", text, flags=re.MULTILINE))
    for title in ("Composition with the base optimiser", "Non-finite steps", "Drift control"):
        assert title in headings
    referred = set(re.findall(r"Note \[([^\]]+)\]", text))
    assert referred <= headings, f"Notes referred to but not found: {sorted(referred - headings)}"


def _cff_top_level(text: str) -> dict[str, str]:
    """Top-level ``key: value`` pairs of a YAML file, for when PyYAML is not installed."""
    pairs = {}
    for line in text.splitlines():
        match = re.match(r"^([A-Za-z][\w-]*):\s*(.*)$", line)
        if match:
            pairs[match[1]] = match[2].strip().strip("\"'")
    return pairs


def test_citation_cff():
    text = (ROOT / "CITATION.cff").read_text(encoding="utf-8")
    try:
        import yaml
    except ImportError:
        yaml = None
    if yaml is None:
        data = _cff_top_level(text)
        for key in ("cff-version", "message", "title", "authors", "type", "version", "preferred-citation"):
            assert key in data, f"CITATION.cff has no top-level {key}"
        block = text.split("\npreferred-citation:\n", 1)[1]
        for key in ("type", "title", "authors", "year"):
            assert re.search(rf"^  {key}:", block, flags=re.MULTILINE), f"preferred-citation has no {key}"
        assert "arXiv.2203.05483" in block
    else:
        data = yaml.safe_load(text)
        assert isinstance(data["authors"], list) and data["authors"]
        cited = data["preferred-citation"]
        assert cited["type"] == "conference-paper" and cited["year"] == 2022
        assert [a["family-names"] for a in cited["authors"]] == ["Kiani", "Balestriero", "LeCun", "Lloyd"]
        assert "projUNN" in cited["title"]
    assert data["cff-version"] == "1.2.0"
    assert data["type"] == "software"
    assert str(data["version"]) == projunn.__version__


def test_readme_bibtex_names_this_version():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Citing\n", 1)[1].split("\n## ", 1)[0]
    bibtex = re.findall(r"```bibtex\n(.*?)```", section, flags=re.DOTALL)
    assert bibtex, "README's Citing section has no BibTeX block"
    assert "@inproceedings{kiani2022projunn," in bibtex[0] and "2203.05483" in bibtex[0]
    assert re.search(rf"version\s*=\s*{{{re.escape(projunn.__version__)}}}", bibtex[0])
    assert bibtex[0].count("{") == bibtex[0].count("}")


def _slug(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: pathlib.Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.MULTILINE | re.DOTALL)
    return {_slug(h) for h in re.findall(r"^#{1,6} (.+)$", text, flags=re.MULTILINE)}


DOCUMENTS = ["README.md", "CHANGELOG.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("document", DOCUMENTS)
def test_links_point_to_files_that_exist(document):
    """Relative links and images in the README and docs/ name files (and headings) that exist."""
    path = ROOT / document
    text = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.MULTILINE | re.DOTALL)
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    broken = []
    for target in targets:
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        missing_heading = anchor and linked.suffix == ".md" and linked.exists() and anchor not in _anchors(linked)
        if not linked.exists() or missing_heading:
            broken.append(target)
    assert not broken, f"{document}: broken links {broken}"


def test_readme_certified_robustness_example_runs():
    """The README's second example: a Lipschitz classifier trained, certified and exported."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.DOTALL)
    namespace: dict = {}
    exec(compile(blocks[1], "README.md", "exec"), namespace)
    assert abs(namespace["bound"] - 1) < 1e-5
    plain, model = namespace["plain"], namespace["model"]
    x = torch.rand(2, 4, 28, 28)
    assert type(plain) is torch.nn.Conv2d and torch.allclose(plain(x), model[1](x), atol=1e-5)
