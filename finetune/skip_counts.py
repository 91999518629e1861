"""The ``skipped`` field of fine-tuning's training records (metrics.jsonl), one mechanism for
every task.

A map-style training set (segmentation, detection, an image folder or in-memory shards)
reads the next item in place of one that exists but cannot be read
(``finetune.data_files.NextReadable``); each batch carries how many its items replaced out
of the DataLoader worker that read them (``finetune.dense_data.Counted``). The loop adds
up those of the batches it trains on (:meth:`SkipCounts.counted`, after a resume's
skipped batches: the run that trained on them counted them), and the run's total, with
the resumed checkpoint's (``trainer_state.json``'s ``skipped``), is logged as
``{"unreadable": N}``: N counts replacements (reads that met an unreadable item),
cumulative over the run, not distinct files (a bad file met every epoch counts every
epoch; of two bad files side by side, the first drawn counts two, the second one). A streamed
classification set counts its own skips by reason (``data.stats``), carried across a
resume by its stream position.

Shards held in memory also skip, once, the samples they cannot use (no image, a label
outside the classes: ``finetune.cls_data.ShardDataset.skipped_by_reason``) while every
rank reads every shard: those counts, the same on each rank, are added to the records as
they are (``loaded``), never summed over ranks nor saved (a resumed run's set counts them
again when it loads).

Either way the field is absent until something was skipped, and the counts are summed
over ranks by one all-reduce of a fixed list of reasons (``REASONS``:
``runtime.dist.sum_counts``) per logged step and per checkpoint; rank 0 alone writes
the records and the checkpoint's shared state.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from data.stats import SKIP_REASONS
from finetune.dense_data import UNREADABLE, Counted
from runtime.dist import sum_counts

# every reason a fine-tuning count holds: replaced unreadable items, a stream's skips
REASONS = (UNREADABLE, *SKIP_REASONS)


class SkipCounts:
    """The run's skipped items. ``before``: the resumed checkpoint's total (its shared
    state's ``skipped``; None for a fresh start or a checkpoint saved before it was kept);
    ``stream``: a streamed set's own counts by reason (then :meth:`counted` is unused and
    nothing goes into the shared state); ``loaded``: the samples the training set skipped
    while it loaded, by reason, the same on every rank (added to the records only)."""

    def __init__(self, before: Mapping[str, int] | None = None,
                 stream: Callable[[], Mapping[str, int]] | None = None,
                 loaded: Mapping[str, int] | None = None):
        self.stream = stream
        self.before = Counter(before or {}) if stream is None else Counter()
        self.loaded = Counter(loaded or {})
        self.here: Counter[str] = Counter()  # this process's batches, since it started

    def counted(self, batches: Iterable[Counted]) -> Iterator[Any]:
        """The batches, their replaced items counted as each is drawn for an update."""
        for batch, replaced in batches:
            self.here[UNREADABLE] += replaced
            yield batch

    def total(self) -> dict[str, int] | None:
        """The run's skips by reason while it trains, summed over ranks, on rank 0 (None
        on the others; ``loaded`` not included). Collective: every rank calls it, at logged
        steps and checkpoints only."""
        summed = sum_counts(self.stream() if self.stream is not None else self.here,
                            REASONS)
        if summed is None:
            return None
        total = Counter(self.before)
        total.update({reason: int(n) for reason, n in summed.items()})
        return {reason: n for reason, n in sorted(total.items()) if n}

    def record(self) -> dict[str, Any]:
        """A training record's field: absent until something was skipped (and on ranks
        other than 0, which write no record)."""
        skipped = self.total()  # every rank: a collective, whatever it returns
        if skipped is None:
            return {}
        skipped = Counter(skipped) + self.loaded  # drops zero counts
        return {"skipped": dict(sorted(skipped.items()))} if skipped else {}

    def state(self) -> dict[str, Any]:
        """What a checkpoint's shared state keeps (rank 0 writes it): a map-style set's
        total; nothing for a streamed set (its position carries its counts) and no
        collective."""
        if self.stream is not None:
            return {}
        return {"skipped": self.total() or {}}
