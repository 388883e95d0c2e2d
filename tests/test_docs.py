"""The documentation holds: the README's training loop and every docstring example run as written, the
names the README lists exist, and links point to files that exist."""

from __future__ import annotations

import doctest
import importlib
import pathlib
import re
import subprocess
import sys

import pytest
import torch

import projunn

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODULES = [
    "projunn.functional._update",
    "projunn.functional._sketch",
    "projunn.functional._unitary",
    "projunn.optim._projunn",
    "projunn.optim._groups",
    "projunn.nn._linear",
    "projunn.nn._rnn",
    "projunn.tasks._synthetic",
]


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


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    globs = {"torch": torch, "projunn": projunn, **vars(module)}
    torch.manual_seed(0)
    result = doctest.testmod(module, globs=globs, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0


def _readme_api_names() -> list[str]:
    """Dotted names in the first column of the README's API table; a bare name in a row with others
    lives in the same module as the row's first name (`projunn.nn.UnitaryRNN`, `ModReLU`, ...)."""
    section = (ROOT / "README.md").read_text().split("\n## API\n", 1)[1].split("\n## ", 1)[0]
    names = []
    for row in re.findall(r"^\| (.+?) \|", section, flags=re.MULTILINE):
        cells = re.findall(r"`([\w.]+)", row)
        if not cells or not cells[0].startswith("projunn."):
            continue
        names.append(cells[0])
        module = cells[0].rsplit(".", 1)[0]
        names += [f"{module}.{name}" for name in cells[1:]]
    return names


def test_readme_api_names_resolve_from_a_bare_import():
    names = _readme_api_names()
    assert "projunn.tasks" in names and "projunn.bench.run_bench" in names, names
    # A fresh interpreter: other tests have imported projunn.tasks already.
    code = f"""
import sys
import projunn
lazy = ("projunn.tasks", "projunn.bench")
assert not any(name in sys.modules for name in lazy), "import projunn loaded a lazy submodule"
for name in {names!r}:
    obj = projunn
    for part in name.split(".")[1:]:
        obj = getattr(obj, part)
try:
    projunn.no_such_name
except AttributeError as error:
    assert "no_such_name" in str(error)
else:
    raise AssertionError("projunn.no_such_name did not raise AttributeError")
assert {{"tasks", "bench"}} <= set(dir(projunn))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
