"""`internimage`: one console script, one subcommand module per verb (launch/commands/)."""

from __future__ import annotations

import argparse
import atexit
import gc
import logging
import sys

from launch.commands import COMMANDS
from launch.config import REFUSED_STATUS, ConfigError


class Parser(argparse.ArgumentParser):
    """argparse without abbreviated flags (``--res`` for ``--resume``): a SLURM job reruns
    its command line and finds its flags by their full names (launch/slurm/job.py
    ``resume_argv``, jobspec ``with_flag``), so an abbreviation slipped past them (a
    restart before the first save resumed ``auto`` instead of the path given). Subcommand
    parsers are of the same class (argparse's default ``parser_class``)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (each subcommand adds its own arguments)."""
    parser = Parser(
        prog="internimage",
        description="Pre-train, convert, fine-tune and launch InternImage models.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module in COMMANDS.items():
        module.register(sub, name)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script (and of each task of a SLURM job); returns the
    process exit code."""
    # What is alive at the interpreter's exit is frozen first (gc.freeze, at exit, before
    # the last collection): that collection would walk the ~570k objects of torch,
    # DeepSpeed and timm only to free memory the exit frees anyway (2 s per process on
    # these CPUs, 0.4 s frozen, at every rank's exit; in-process callers pay it only once
    # they exit). Registered once per process.
    atexit.unregister(gc.freeze)
    atexit.register(gc.freeze)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may also follow options (argparse stops collecting a positional
    # list at the first option, e.g. `pretrain a=1 --resume auto b=2`).
    if hasattr(args, "overrides"):
        args.overrides += [e for e in extra if "=" in e and not e.startswith("-")]
        extra = [e for e in extra if not ("=" in e and not e.startswith("-"))]
    if extra and not getattr(args, "accepts_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    # A command that re-runs a command line elsewhere (submit: in every SLURM task) is
    # handed this entry point and parser, so that nothing below launch.cli imports it back.
    args.cli_entry = main
    args.cli_parser = parser
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except ConfigError as err:
        print(f"internimage {args.command}: config error: {err}", file=sys.stderr)
        return REFUSED_STATUS


if __name__ == "__main__":
    sys.exit(main())
