"""How the tests start worker processes."""

from __future__ import annotations

import torch


def start_method() -> str:
    """ "fork" where it is safe, else "spawn".

    Forked children start with torch and the test modules already imported, where spawned ones
    import them again (most of a short multi-process test's time). It is safe with a CPU-only
    torch build as long as each child sets one thread before any parallel work (the tests'
    workers do). With an accelerator present, the autograd engine starts a thread per device at
    the first backward pass and refuses any backward pass in a child forked after that.
    """
    return "spawn" if torch.accelerator.device_count() > 0 else "fork"
