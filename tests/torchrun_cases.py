"""Several ``projunn`` command lines in one ``torchrun`` launch: one start of the processes and of
the process group serves many cases.

    python -m torch.distributed.run --nproc_per_node P tests/torchrun_cases.py CASES.json

CASES.json is a list of argument lists, run in order on every process; the exit status is the
largest of theirs. Held-out sets are as small as in the in-process tests (harness_runs), so the
results compare with runs made there.
"""

from __future__ import annotations

import json
import pathlib
import sys

import torch.distributed as dist

from harness_runs import SMALL_EVAL_SIZE
from projunn.harness import cli
from projunn.harness.tasks import _registry


def main() -> int:
    cases = json.loads(pathlib.Path(sys.argv[1]).read_text())
    _registry.EVAL_SIZE = SMALL_EVAL_SIZE
    dist.init_process_group("gloo")  # started here, so each run joins it instead of starting its own
    try:
        return max(cli.main(argv) for argv in cases)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
