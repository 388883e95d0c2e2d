"""Fixtures that make tiny ``projunn train`` runs cheap without changing what they check.

Import them into a test module (``from harness_runs import quick_runs``) to use them there.
"""

from __future__ import annotations

import pytest

from projunn.harness import train as train_module
from projunn.harness.tasks import _sequence

#: Held-out sequences of the copy and adding tasks in tiny runs; what the full set holds is tested
#: in test_reproduction.py.
SMALL_EVAL_SIZE = 64


@pytest.fixture
def small_held_out_sets(monkeypatch):
    """Held-out sets of SMALL_EVAL_SIZE sequences, for runs that check settings, files or a number
    that does not depend on the set (the baseline), not scores. Ask for it by name."""
    monkeypatch.setattr(_sequence, "EVAL_SIZE", SMALL_EVAL_SIZE)


@pytest.fixture(autouse=True)
def quick_runs(monkeypatch):
    """Small held-out sets, and curves.png recorded instead of rendered (test_train renders it once).

    Yields the (path, history rows, summary) of every plot a run asked for. (It sets the small
    sets itself, so that importing this fixture alone is enough.)
    """
    monkeypatch.setattr(_sequence, "EVAL_SIZE", SMALL_EVAL_SIZE)
    plots = []
    monkeypatch.setattr(
        train_module, "plot_curves", lambda path, history, summary: plots.append((path, list(history), summary))
    )
    return plots
