"""Which processes read a dataset's files: a spy for tests of loader workers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def log_reader_pids(monkeypatch: pytest.MonkeyPatch, module, name: str, log: Path) -> None:
    """Make ``module.name`` (a file reader, e.g. ``read_image``) append the pid of each
    calling process to ``log`` (a file: loader workers are other processes)."""
    read = getattr(module, name)

    def logged(path):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        return read(path)

    monkeypatch.setattr(module, name, logged)
