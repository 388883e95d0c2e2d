"""``python -m projunn``, the same as the ``projunn`` command (and what ``torchrun -m projunn`` runs)."""

from .harness import console_main

console_main()
