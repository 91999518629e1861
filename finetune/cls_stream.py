"""Streaming classification shards: webdataset tars (an image member and a ``cls`` label
member per sample) read on the fly, local or from object storage, for sets too large to
hold in memory (ImageNet-22K: 14M images).

An epoch is ``data.train_samples`` samples: each rank delivers exactly
``train_samples // (batch x world)`` batches per epoch (ranks stay in step, as DDP and
ZeRO-3 need). Shards are read in epochs without replacement, like pre-training's
(:mod:`data.epochs`): each data epoch deals a seeded permutation of all shards over every
(rank, worker) slot (``slot = rank * workers + worker``), so every shard is read by exactly
one slot per data epoch whatever the slot count; with fewer shards than slots each shard is
split into interleaved sample parts (several slots read disjoint samples of one shard). A
slot reads its units through a seeded shuffle buffer that is drained at the end of each of
its data epochs (its share of a data epoch is a permutation of that share), then goes on
with its share of the next data epoch. Training epoch ``e`` starts at data epoch ``e`` on
every slot: when ``train_samples`` is the size of the set and it divides evenly over the
slots, an epoch reads every sample exactly once; else a slot may run into the next data
epoch or leave part of its share unread.

Batches are assigned to workers by their index in the epoch, so the data of every batch is
a function of (seed, epoch, batch index, world size, workers): a mid-epoch resume skips the
consumed samples without decoding them and continues with the same batches (exact as long
as no sample before the resume point was corrupt). Samples whose image or label cannot be
read are skipped, counted and logged by the worker; shard faults follow the shared policy
of :mod:`data.shard_schedule` (a failed shard is retried later, a missing one dropped).

Counts reach the training metrics as pre-training's do (:mod:`data.stats`): each item
carries its worker's counts since the item before it, :meth:`StreamingShards.collate` puts
a batch's together, and the loader's consumer folds them into :attr:`StreamingShards.stats`
in the main process (``finetune.cls_data.epoch_batches``). They are this process's totals:
what a damaged shard loses is counted in the first data epoch it trains
(:class:`data.stream.SourceStream`), once, not once per epoch.
"""

from __future__ import annotations

import io
import logging
import random
from collections.abc import Callable, Iterator

from PIL import Image
from torch.utils.data import IterableDataset, default_collate, get_worker_info

from data.config import S3Config
from data.epochs import extra_offsets, parts_per_shard
from data.sources import RawSample, expand_urls, pick_member
from data.state import derive_seed, dist_info
from data.stats import DataStats, SkipCounter
from data.stream import SourceStream
from runtime.redact import redact_url, redact_urls

log = logging.getLogger(__name__)
IMAGE_KEYS = "jpg;jpeg;png;webp"


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


def decode_labelled(raw: RawSample, transform: Callable, label_key: str = "cls",
                    num_classes: int | None = None):
    """(transformed image, int label) of a raw sample, or the reason it is unusable
    (:func:`labelled_member`, or ``undecodable_image``)."""
    member = labelled_member(raw, label_key, num_classes)
    if isinstance(member, str):
        return member
    image, target = member
    try:
        img = Image.open(io.BytesIO(image))
        img = img.convert("RGB")
    except Exception:  # noqa: BLE001 - any undecodable image is skipped, never fatal
        return "undecodable_image"
    return transform(img), target


def describe_skip(raw: RawSample, reason: str, label_key: str, num_classes: int | None) -> str:
    """What a log says about a skipped sample: its key, its shard (credentials removed)
    and why; an out-of-range label with its value and the valid range."""
    why = reason
    if reason == "label_out_of_range":
        label = raw[label_key].decode(errors="replace").strip()[:20]
        why = f"label {label} outside [0, {num_classes}) of data.num_classes"
    return f"sample {raw.get('__key__')} of shard {redact_url(str(raw.get('__url__')))} ({why})"


class StreamingShards(IterableDataset):
    """Training samples streamed from ``urls`` (brace patterns, ``.txt`` lists, s3://).

    Items are ``(image, label, counts)``: ``counts`` are the worker's skip and shard counts
    (:meth:`data.stats.SkipCounter.drain`) since its previous item. Batch them with
    :meth:`collate`, and fold each batch's counts into :attr:`stats` (what
    ``finetune.cls_data.epoch_batches`` does).
    """

    def __init__(self, urls: list[str], transform: Callable, num_samples: int,
                 batch_size: int, seed: int = 0, shuffle_buffer: int = 2000,
                 s3: S3Config | None = None, label_key: str = "cls",
                 num_classes: int | None = None):
        self.s3 = s3 or S3Config()
        self.urls = expand_urls(urls, self.s3)
        if not self.urls:
            raise ValueError(f"data.train_urls: no shards in {redact_urls(urls)}")
        self.rank, self.world = dist_info()  # captured in the main process
        if num_samples < batch_size * self.world:
            raise ValueError(f"data.train_samples={num_samples} is less than one global batch "
                             f"({batch_size} x {self.world} ranks)")
        self.transform, self.num_samples, self.batch_size = transform, num_samples, batch_size
        self.seed, self.shuffle_buffer, self.label_key = seed, shuffle_buffer, label_key
        self.num_classes = num_classes  # labels outside [0, num_classes) are skipped
        self.epoch, self.skip_batches = 0, 0
        # the data epoch whose reads count damaged shards: this process's first
        self.count_epoch: int | None = None
        self.stats = DataStats()  # the consumer's totals (main process), see collate

    @staticmethod
    def collate(items: list[tuple]) -> tuple:
        """``(images, labels, counts)`` of a batch of items: the images and labels batched
        as the default collate does, the counts of every item concatenated."""
        images, labels = default_collate([(image, label) for image, label, _ in items])
        return images, labels, [c for _, _, counts in items for c in counts]

    def __len__(self) -> int:
        return self.num_samples

    @property
    def batches_per_epoch(self) -> int:
        """Batches each rank delivers per epoch."""
        return self.num_samples // (self.batch_size * self.world)

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Next iteration: ``epoch``'s batches from index ``skip_batches`` on (resume)."""
        self.epoch, self.skip_batches = epoch, skip_batches
        if self.count_epoch is None:
            self.count_epoch = epoch

    def _raw(self, slot: int, nslots: int, counter: SkipCounter) -> Iterator[RawSample]:
        """Endless raw samples of one slot: its share of data epoch ``self.epoch``, then of
        the next ones (:mod:`data.epochs` dealing), through the shuffle buffer."""
        units = len(self.urls) * parts_per_shard(len(self.urls), nslots)
        offsets, stride = extra_offsets([units], nslots)
        stream = SourceStream("train", self.urls, slot, nslots, self.seed, self.s3, counter,
                              resampled=True, shuffle=True, first_epoch=self.epoch,
                              deal_offset=offsets[0], deal_stride=stride,
                              count_epoch=self.count_epoch)
        rng = random.Random(derive_seed(self.seed, self.epoch, slot, "buffer"))
        buffer: list[RawSample] = []
        data_epoch = self.epoch
        for raw in stream:
            now = stream.cursor().epoch
            if now != data_epoch:  # the share of a data epoch is a permutation of it
                rng.shuffle(buffer)
                yield from buffer
                buffer, data_epoch = [], now
            if len(buffer) < self.shuffle_buffer:
                buffer.append(raw)
                continue
            i = rng.randrange(len(buffer))
            buffer[i], raw = raw, buffer[i]
            yield raw
        raise RuntimeError(f"no readable sample left in the {len(self.urls)} shards for "
                           f"stream slot {slot} (e.g. {redact_urls(self.urls, 2)}): every shard is "
                           f"missing or unreadable, see the errors logged above")

    def __iter__(self):
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        # The loader takes batches round-robin from worker 0 on: rotating the slot by the
        # resume point keeps "batch b comes from slot b % workers" true after a resume.
        slot = (worker + self.skip_batches) % workers
        mine = range(slot, self.batches_per_epoch, workers)
        skipped = sum(1 for b in mine if b < self.skip_batches)
        wanted = (len(mine) - skipped) * self.batch_size
        counter = SkipCounter()
        stream = self._raw(self.rank * workers + slot, self.world * workers, counter)
        for _ in range(skipped * self.batch_size):  # resume: consumed samples, not decoded
            next(stream)
        produced = bad = 0
        while produced < wanted:
            raw = next(stream)
            item = decode_labelled(raw, self.transform, self.label_key, self.num_classes)
            if isinstance(item, str):
                bad += 1
                counter.skip("train", item)
                log.warning("skipped %s; %d skipped by this worker this epoch",
                            describe_skip(raw, item, self.label_key, self.num_classes), bad)
                continue
            produced += 1
            yield (*item, counter.drain())
