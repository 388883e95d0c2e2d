"""The README's training loop and every docstring example run as written."""

from __future__ import annotations

import doctest
import importlib
import pathlib
import re

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
