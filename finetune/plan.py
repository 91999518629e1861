"""The dry-run plan every fine-tuning task prints (``--dry-run``)."""

from __future__ import annotations

from typing import Any

from torch import nn


def count_params(model: nn.Module) -> int:
    """Number of parameters (works on the meta device)."""
    return sum(p.numel() for p in model.parameters())


def print_plan(title: str, rows: dict[str, Any]) -> None:
    """The dry-run plan as an aligned table."""
    width = max(len(k) for k in rows)
    print(title)
    for k, v in rows.items():
        print(f"  {k:<{width}}  {v}")
