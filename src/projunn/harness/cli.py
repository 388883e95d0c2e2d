"""The ``projunn`` command line.

``projunn train TASK`` runs one of the paper's experiments (see
:mod:`projunn.harness.train`); ``projunn bench`` times projUNN against the floor
and the peers (see :mod:`projunn.harness.bench`); ``projunn certify RUN`` scores a
Lipschitz run's certified radii (see :mod:`projunn.harness.certify`).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import fields

import torch

from .. import __version__
from . import bench, certify
from ._allocator import reuse_freed_memory
from ._config import TASK_OPTIONS, flag
from .tasks import TASKS, DatasetMissingError, describe_tasks, get_task
from .train import RunDivergedError, RunError, TrainConfig, resolve, train


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error message (exit status 2), usage on --help only."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


_TRAIN_EPILOG = """\
exit status: 0 done; 1 stopped because the loss stayed NaN/Inf (--max-nonfinite);
2 bad arguments, settings, output folder, data or checkpoint (one line on stderr); 130 interrupted
(Ctrl-C) and 143 stopped by SIGTERM, either after saving a checkpoint at a step boundary.
Without --out each run gets a folder of its own (runs/TASK-METHOD-TIME, then -2, -3, ...); a folder
a running projunn process writes into is refused to any other. Progress is a bar on a terminal (and
a second one while held-out data is scored: --eval-limit N scores at most N images per pass on the
image tasks) and a line per evaluation otherwise (or with --quiet). `projunn train TASK --help`
shows TASK's defaults."""


def _shown(value) -> str:
    if isinstance(value, tuple):
        return " ".join(map(_shown, value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def _flag(name: str, value) -> str:
    return f"{flag(name)} {_shown(value)}"


def _task_defaults(name: str) -> str:
    """What ``projunn train NAME`` resolves unset options to, and what ``--preset paper`` changes.

    Both lines are flags a user can pass as shown. The preset's line lists the preset's own
    settings (``--unitary-lr-divider``, not the unitary lr it works out to, which the preset
    would refuse as a contradiction), each one that alone changes what the task resolves to.
    """
    unset = TrainConfig(task=name)
    resolved = resolve(unset)
    defaults = " ".join(
        _flag(f.name, getattr(resolved, f.name))
        for f in fields(TrainConfig)
        if getattr(resolved, f.name) not in (None, getattr(unset, f.name))
    )
    preset = " ".join(
        _flag(key, value)
        for key, value in get_task(name).paper.items()
        if resolve(TrainConfig(task=name, **{key: value})) != resolved
    )
    # Not at hyphens: a flag broken across lines ("--batch-" / "size") cannot be copied.
    wrap = lambda text: textwrap.fill(  # noqa: E731
        text, width=100, subsequent_indent="  ", break_on_hyphens=False, break_long_words=False
    )
    return "\n".join(
        [
            wrap(f"defaults of the {name} task: {defaults}"),
            wrap(f"--preset paper changes: {preset or 'nothing'}"),
            "",
            _TRAIN_EPILOG,
        ]
    )


def _help_task(argv: Sequence[str]) -> str | None:
    """The task of ``projunn train TASK --help``, whose defaults that help shows."""
    if len(argv) >= 2 and argv[0] == "train" and {"-h", "--help"} & set(argv):
        return next((word for word in argv[1:] if word in TASKS), None)
    return None


def _add_train_parser(commands, help_task: str | None = None) -> None:
    train_parser = commands.add_parser(
        "train",
        help="train a model on one of the paper's tasks",
        description=(
            "Train a model with orthogonal/unitary weights on one of the paper's tasks: a unitary RNN,\n"
            "a unitary matrix, or a deep CNN of orthogonal convolutions. The run writes config.json,\n"
            "metrics.csv, summary.json, curves.png and checkpoint.pt into --out. Ctrl-C saves a\n"
            "checkpoint; --resume continues it exactly.\n\ntasks:\n" + describe_tasks()
        ),
        epilog=_task_defaults(help_task) if help_task else _TRAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train_parser.add_argument("task", choices=tuple(TASKS), metavar="TASK", help="one of: " + ", ".join(TASKS))
    _add_flags(train_parser, fields(TrainConfig)[1:])


def _add_flags(parser: argparse.ArgumentParser, declared) -> None:
    """A flag for each of the config fields ``declared`` (see :func:`~projunn.harness._config.option`)."""
    for f in declared:
        parser.add_argument(flag(f.name), **_flag_settings(f))


def _flag_settings(f) -> dict:
    """argparse's settings of a config field's flag, from the field's declaration: its default and,
    for a setting only some tasks take, which tasks those are."""
    settings, default = {k: v for k, v in f.metadata.items() if k != "resumable"}, f.default
    if default is False:
        return {**settings, "action": "store_true"}
    if default is not None:
        settings["help"] += f" (default {_shown(default)})"
    if f.name in TASK_OPTIONS:
        takers = [name for name, task in TASKS.items() if f.name in task.options]
        settings["help"] += f" [{', '.join(takers)}]"
    return {**settings, "default": default}


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """``parser.parse_args``, with arguments no option takes refused by the command they were given to.

    argparse leaves a subcommand's unknown arguments to the top-level parser, whose error would
    say ``projunn:`` where the arguments went to ``projunn train``.
    """
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.commands.get(args.command, parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def build_parser(help_task: str | None = None) -> argparse.ArgumentParser:
    """The ``projunn`` parser; ``help_task``: the task whose resolved defaults ``train --help`` shows."""
    parser = _Parser(
        prog="projunn",
        description="Train networks whose weights stay exactly orthogonal/unitary with projUNN low-rank steps.",
    )
    parser.add_argument("--version", action="version", version=f"projunn {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    parser.commands = commands.choices  # name -> the command's parser, for its own errors (see _parse)
    _add_train_parser(commands, help_task)
    bench.add_parser(commands, _shown)
    certify.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (0 success, 1 a diverged run, 2 bad arguments, 128 + the signal
    number when a signal stopped the run: 130 Ctrl-C, 143 SIGTERM)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(help_task=_help_task(argv))
    args = _parse(parser, argv)
    if args.command is None:  # as argparse tools do: one line on stderr, exit status 2
        parser.error("a command is required: train, bench or certify (projunn --help describes them)")
    options = {k: v for k, v in vars(args).items() if k != "command"}
    if args.command == "train":
        return _run_train(TrainConfig(**options))
    if args.command == "bench":
        return bench.main(args)
    return certify.main(args)


def _run_train(config: TrainConfig) -> int:
    if config.device == "cpu" or (config.device == "auto" and not torch.cuda.is_available()):
        reuse_freed_memory()  # activation buffers are reallocated every step: see projunn.harness._allocator
    try:
        summary = train(config, log=print)
    except (RunError, DatasetMissingError) as error:
        print(f"projunn train: error: {error}", file=sys.stderr)
        return 1 if isinstance(error, RunDivergedError) else 2  # 2: the run could not start as asked
    except KeyboardInterrupt as stop:  # a second stop signal, or one outside the training steps
        signum = getattr(stop, "signum", signal.SIGINT)
        print(f"projunn train: interrupted ({signal.Signals(signum).name})", file=sys.stderr)
        return 128 + signum
    if summary["interrupted"]:  # as shells report a process a signal ended: 130 Ctrl-C, 143 SIGTERM
        return 128 + signal.Signals[summary["stop_signal"] or "SIGINT"]
    if os.environ.get("RANK", "0") != "0":  # a torchrun replica other than rank 0: rank 0 reports
        return 0
    shown = ("final_loss", "best_loss", "baseline_loss", "accuracy", "max_unitarity_error", "seconds")
    print(" ".join(f"{key}={summary[key]:.4g}" for key in shown if summary.get(key) is not None))
    print(f"wrote {summary['out']}")
    return 0


def console_main() -> None:
    sys.exit(main())


if __name__ == "__main__":
    console_main()
