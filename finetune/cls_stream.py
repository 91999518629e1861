"""Streaming classification shards: webdataset tars (an image member and a ``cls`` label
member per sample) read on the fly, local or from object storage, for sets too large to
hold in memory (ImageNet-22K: 14M images).

The stream is the one every task's streaming runs on (:mod:`data.loader`): shards are read
in data epochs without replacement (:mod:`data.epochs`): each data epoch deals a seeded
permutation of all shards over every (rank, worker) slot, so every shard is read by
exactly one slot per data epoch whatever the slot count (with fewer shards than slots,
shards are split into interleaved sample parts). A slot's samples are shuffled in blocks of
``shuffle_buffer``.

**A training epoch** is ``data.train_samples`` samples: each rank draws the same number of
batches, its optimizer steps' worth (``train_samples // (batch x grad_accum x world)``
steps of ``grad_accum`` batches; ranks stay in step, as DDP and ZeRO-3 need), taken from
where the previous epoch stopped. The stream is never restarted at an
epoch boundary: slots whose share of a data epoch is a shard larger than another's reach
the next data epoch a little later, and after ``e`` epochs every sample was read ``e-1``,
``e`` or ``e+1`` times. (Restarting every slot at data epoch ``e`` in training epoch
``e``, as this module once did, left the end of the larger shares unread and read the
start of the next data epoch's twice, 7.2% of ImageNet-22K each at 512 x 8 slots, and
never evened out: after 8 epochs samples were read 1..14 times, now 7..9;
``benchmarks/stream_epochs.py``.)

**Resume** is exact: the checkpoint keeps every rank's stream state (:meth:`state_dict`,
a few hundred bytes per worker; restored with :meth:`load_state_dict`), and a resumed run
re-reads at most one shuffle block per worker (:mod:`data.stream`), not the samples since
the epoch's start. Each sample's augmentation is seeded by its place in its slot's stream
(:func:`runtime.rng.seeded_host_rngs`), so the resumed batches equal the uninterrupted
run's bit for bit.

Samples whose image or label cannot be read are skipped, counted and logged by the worker;
shard faults follow the shared policy of :mod:`data.shard_schedule` (a failed shard is
retried later, a missing one dropped). The counts reach the training metrics as
pre-training's do (:attr:`StreamingShards.stats`, kept in the checkpoint with the stream
position).
"""

from __future__ import annotations

import io
import logging
import random
from collections.abc import Callable, Iterator
from typing import Any

from PIL import Image
from torch.utils.data import default_collate, get_worker_info

from data.config import S3Config
from data.loader import LoaderOptions, ResumableLoader, StreamSource
from data.sources import RawSample, expand_urls, pick_member
from data.state import dist_info
from data.stats import DataStats, SkipCounter
from runtime.dist import all_gather_objects
from runtime.redact import redact_url, redact_urls
from runtime.rng import seeded_host_rngs

log = logging.getLogger(__name__)
IMAGE_KEYS = "jpg;jpeg;png;webp"
SOURCE = "train"  # the one source's name in counts and states
# A worker logs its first skips one by one, then a count at each power of ten: a shard set
# with many bad samples (a whole shard of wrong labels: 10k lines per epoch per worker)
# must not flood the job's log. Every skip is counted (the run's metrics) either way.
SKIPS_LOGGED_EACH = 10


def labelled_member(raw: RawSample, label_key: str = "cls", num_classes: int | None = None
                    ) -> tuple[bytes, int] | str:
    """(encoded image, int label) of a raw sample, or the reason it is unusable:
    ``missing_member``, ``bad_label`` (not an integer) or, with ``num_classes``,
    ``label_out_of_range`` (outside ``[0, num_classes)``: the loss would index out of its
    logits, a device-side assert on a GPU)."""
    image, label = pick_member(raw, IMAGE_KEYS), raw.get(label_key)
    if image is None or label is None:
        return "missing_member"
    try:
        target = int(label.decode().strip())
    except (UnicodeDecodeError, ValueError):
        return "bad_label"
    if num_classes is not None and not 0 <= target < num_classes:
        return "label_out_of_range"
    return image, target


def describe_skip(raw: RawSample, reason: str, label_key: str, num_classes: int | None) -> str:
    """What a log says about a skipped sample: its key, its shard (credentials removed)
    and why; an out-of-range label with its value and the valid range."""
    why = reason
    if reason == "label_out_of_range":
        label = raw[label_key].decode(errors="replace").strip()[:20]
        why = f"label {label} outside [0, {num_classes}) of data.num_classes"
    return f"sample {raw.get('__key__')} of shard {redact_url(str(raw.get('__url__')))} ({why})"


class LabelledCodec:
    """Raw sample -> ``(transformed image, int label)``, the transform seeded per sample;
    samples -> ``(images, labels)`` batched as the default collate does. Unusable samples
    are counted by reason and logged with their key and shard."""

    def __init__(self, transform: Callable, label_key: str = "cls",
                 num_classes: int | None = None):
        self.transform, self.label_key, self.num_classes = transform, label_key, num_classes
        self.skipped = 0  # by this process (each worker has its own copy)

    def decode(self, source_id: int, raw: RawSample, rng: random.Random,
               counter: SkipCounter) -> tuple[Any, int] | None:
        """The sample, or None (its reason counted and logged)."""
        member = labelled_member(raw, self.label_key, self.num_classes)
        if isinstance(member, str):
            return self._skip(raw, member, counter)
        image, target = member
        try:
            img = Image.open(io.BytesIO(image))
            img = img.convert("RGB")
        except MemoryError:  # the worker's memory, not the sample's bytes: not a skip
            raise
        except Exception:  # noqa: BLE001 - any undecodable image is skipped, never fatal
            return self._skip(raw, "undecodable_image", counter)
        # a worker's generators serve nothing else; the main process's serve training
        with seeded_host_rngs(rng.getrandbits(63), restore=get_worker_info() is None):
            return self.transform(img), target

    def _skip(self, raw: RawSample, reason: str, counter: SkipCounter) -> None:
        self.skipped += 1
        counter.skip(SOURCE, reason)
        n = self.skipped
        if n <= SKIPS_LOGGED_EACH:
            log.warning("skipped %s; %d skipped by this worker%s",
                        describe_skip(raw, reason, self.label_key, self.num_classes), n,
                        "" if n < SKIPS_LOGGED_EACH else
                        " (further skips are logged at each power of ten; all are counted "
                        "in the metrics' skipped)")
        elif n == 10 ** len(str(n)[1:]):  # 100, 1000, ...
            log.warning("%d samples skipped by this worker (the latest: %s)", n,
                        describe_skip(raw, reason, self.label_key, self.num_classes))
        return None

    def collate(self, samples: list[tuple[int, tuple[Any, int]]], worker: int,
                counter: SkipCounter) -> tuple[Any, Any]:
        """``(images, labels)`` of a batch."""
        return tuple(default_collate([sample for _, sample in samples]))


class StreamingShards:
    """Training batches streamed from ``urls`` (brace patterns, ``.txt`` lists, s3://) by
    ``workers`` DataLoader processes per rank (0: in this process);
    ``on_shard_list_change``: what a resume over a changed shard list does
    (:class:`data.loader.LoaderOptions`).

    :meth:`batches` goes on with the run's stream where the previous call stopped; its
    position is :meth:`state_dict` (every rank's goes into a checkpoint) and
    :meth:`load_state_dict` continues from a saved one. ``rank``/``world`` default to
    torch.distributed, then RANK/WORLD_SIZE.
    """

    def __init__(self, urls: list[str], transform: Callable, num_samples: int,
                 batch_size: int, seed: int = 0, shuffle_buffer: int = 2000,
                 s3: S3Config | None = None, label_key: str = "cls",
                 num_classes: int | None = None, workers: int = 0,
                 rank: int | None = None, world: int | None = None,
                 on_shard_list_change: str = "error"):
        s3 = s3 or S3Config()
        shards = expand_urls(urls, s3)
        if not shards:
            raise ValueError(f"data.train_urls: no shards in {redact_urls(urls)}")
        if rank is None or world is None:
            rank, world = dist_info()
        if num_samples < batch_size * world:
            raise ValueError(f"data.train_samples={num_samples} is less than one global batch "
                             f"({batch_size} x {world} ranks)")
        self.num_samples, self.batch_size, self.world = num_samples, batch_size, world
        opts = LoaderOptions(seed, batch_size, workers, shuffle_buffer, s3,
                             on_shard_list_change=on_shard_list_change)
        self.loader = ResumableLoader([StreamSource(SOURCE, shards)], opts,
                                      LabelledCodec(transform, label_key, num_classes),
                                      rank, world, train=True)
        self.loader.check_same_lists(all_gather_objects)  # every rank built its list
        self._live: Iterator | None = None

    def __len__(self) -> int:
        return self.num_samples

    @property
    def batches_per_epoch(self) -> int:
        """The most batches of ``batch_size`` a rank's share of an epoch holds (the loop
        draws whole optimizer steps of them: fewer when ``run.grad_accum`` does not
        divide it)."""
        return self.num_samples // (self.batch_size * self.world)

    @property
    def stats(self) -> DataStats:
        """Skip and shard counts of this rank's stream since the run began (restored with
        the stream position)."""
        return self.loader.stats

    def batches(self) -> Iterator[tuple[Any, Any]]:
        """The stream's next ``(images, labels)`` batches, endless: draw what an epoch
        needs, and the next call goes on after the last one drawn (the workers and what
        they prefetched live on between calls)."""
        if self._live is None:
            self._live = self.loader.endless()
        while True:
            yield next(self._live)

    def state_dict(self) -> dict[str, Any]:
        """This rank's stream position after the last batch drawn (JSON-ready)."""
        return self.loader.state_dict()

    def load_state_dict(self, states: dict[str, Any] | list[dict[str, Any] | None],
                        epoch: int = 0) -> None:
        """Continue after the batches the checkpoint's stream positions had delivered:
        this rank's own (a dict, from :meth:`state_dict`, saved on the same world size and
        worker count) or every rank's (a list; another worker count is re-dealt,
        :mod:`data.redeal`). A checkpoint saved before positions were kept (None entries)
        starts the stream afresh at data epoch ``epoch`` (the resumed training epoch),
        logged."""
        if isinstance(states, list) and any(s is None for s in states):
            log.warning("data: the checkpoint holds no stream position (saved by an older "
                        "version): the stream starts afresh at data epoch %d, so samples "
                        "of this epoch read before the checkpoint may be read again", epoch)
            self.loader.start_at(epoch)
        else:
            self.loader.load_state_dict(states)
        self._live = None
