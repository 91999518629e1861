"""What a training start (`internimage pretrain`, `internimage finetune`) reports in one
line, exit 2, instead of a traceback: one list for both commands."""

from __future__ import annotations


def training_refusals() -> tuple[type[Exception], ...]:
    """A refused resume or start (``CheckpointError``, the run lock's included;
    ``RefusedStart``: precision, an empty epoch, a one-image BatchNorm), a store the data
    cannot be read from (``StorageAccessError``), a source whose samples are all skipped
    (``UnusableSourceError``). Imported when called: the command line starts without
    torch."""
    from data.loader import UnusableSourceError
    from data.shard_schedule import StorageAccessError
    from models import CheckpointError
    from runtime.loop import RefusedStart

    return CheckpointError, StorageAccessError, UnusableSourceError, RefusedStart
