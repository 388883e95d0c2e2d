"""Several ``projunn`` command lines in one ``torchrun`` launch: one start of the processes and of
the process group serves many cases.

    python -m torch.distributed.run --nproc_per_node P tests/torchrun_cases.py CASES.json

CASES.json is a list of cases, run in order on every process. A case is an argument list, expected
to exit with status 0, or ``{"argv": [...], "status": S, "sigterm": [RANK, STEP]}``: the process of
rank RANK sends itself SIGTERM during training step STEP (what SLURM or Kubernetes sends, reaching
one replica before the others), and the case must exit with status S on every process. The launch
exits with 0 if every case did as expected, 1 otherwise. Held-out sets are as small as in the
in-process tests (harness_runs), so the results compare with runs made there.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import signal
import sys

import torch.distributed as dist

from harness_runs import SMALL_EVAL_SIZE
from projunn.harness import cli
from projunn.harness.tasks import _registry, _sequence


@contextlib.contextmanager
def _sigterm_at(task_name: str, rank: int, step: int):
    """On process ``rank``, SIGTERM to itself inside the loss of training step ``step`` of ``task_name``."""
    task = _registry.TASKS[task_name]
    original, calls = task.loss, [0]

    def loss(model, x, y):
        if model.training:
            calls[0] += 1
            if calls[0] == step and dist.get_rank() == rank:
                os.kill(os.getpid(), signal.SIGTERM)
        return original(model, x, y)

    task.loss = loss
    try:
        yield
    finally:
        del task.loss


def _run(case) -> bool:
    """Run one case; whether it exited as expected."""
    if isinstance(case, list):
        return cli.main(case) == 0
    signalled = _sigterm_at(case["argv"][1], *case["sigterm"]) if "sigterm" in case else contextlib.nullcontext()
    with signalled:
        status = cli.main(case["argv"])
    if status != case["status"]:
        print(
            f"rank {dist.get_rank()}: {case['argv']} exited with {status}, expected {case['status']}", file=sys.stderr
        )
    return status == case["status"]


def main() -> int:
    cases = json.loads(pathlib.Path(sys.argv[1]).read_text())
    _sequence.EVAL_SIZE = SMALL_EVAL_SIZE
    dist.init_process_group("gloo")  # started here, so each run joins it instead of starting its own
    try:
        return 0 if all([_run(case) for case in cases]) else 1
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
