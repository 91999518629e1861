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


# GPU counts a dry run shows per-count values for when it is not told one
PLAN_GPU_COUNTS = (1, 8, 32, 64)


def plan_gpu_counts(gpus: int | None = None) -> tuple[int, ...]:
    """The process counts a dry run plans for: ``gpus``, else ``WORLD_SIZE`` when set
    (the launcher's, as a training start would see it), else :data:`PLAN_GPU_COUNTS`."""
    if gpus is None:
        from runtime.dist import launcher_world_size

        gpus = launcher_world_size()
        return PLAN_GPU_COUNTS if gpus is None else (gpus,)
    if gpus < 1:
        raise ValueError(f"GPU count: must be >= 1, got {gpus}")
    return (gpus,)


def per_gpu_count(values: dict[int, Any]) -> str:
    """``{gpus: value}`` as one plan cell: ``128 on 1 GPU, 1024 on 8 GPUs``."""
    return ", ".join(f"{v} on {n} GPU{'s' if n != 1 else ''}" for n, v in values.items())
