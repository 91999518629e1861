"""Shared behaviour of subcommands whose issue has not landed yet."""

from __future__ import annotations

import argparse
import sys


def not_implemented(what: str, issue: int):
    """A ``run`` function that says clearly what is missing and exits with status 2."""

    def run(args: argparse.Namespace) -> int:
        print(f"internimage {what}: not implemented yet (tracked in issue {issue})",
              file=sys.stderr)
        return 2

    return run
