"""Streaming classification shards: webdataset tars (an image member and a ``cls`` label
member per sample) read on the fly, local or from object storage, for sets too large to
hold in memory (ImageNet-22K: 14M images).

An epoch is ``data.train_samples`` samples: each rank delivers exactly
``train_samples // (batch x world)`` batches per epoch (ranks stay in step, as DDP and
ZeRO-3 need). Each DataLoader worker of each rank owns a disjoint slice of the shards
(pre-training's slot split) and reads it in passes, each pass in a newly seeded shard
order through a seeded shuffle buffer (drained at the end of each pass, so a pass is a
permutation of the slice); every epoch starts fresh passes, so an epoch is about one pass
over the data when ``train_samples`` is the size of the set.

Batches are assigned to workers by their index in the epoch, so the data of every batch is
a function of (seed, epoch, batch index, world size, workers): a mid-epoch resume skips the
consumed samples without decoding them and continues with the same batches (exact as long
as no sample before the resume point was corrupt). Samples whose image or label cannot be
read are skipped, counted and logged by the worker; unreadable shards are skipped after
the storage layer's retries (pretrain/data).
"""

from __future__ import annotations

import io
import itertools
import logging
import random
from collections.abc import Callable, Iterator

from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from pretrain.data.config import S3Config
from pretrain.data.decode import pick_member
from pretrain.data.sources import RawSample, expand_urls, read_shard, shard_order, shards_for_slot
from pretrain.data.state import derive_seed, dist_info
from pretrain.data.stats import SkipCounter

log = logging.getLogger(__name__)
IMAGE_KEYS = "jpg;jpeg;png;webp"


def labelled_member(raw: RawSample, label_key: str = "cls") -> tuple[bytes, int] | str:
    """(encoded image, int label) of a raw sample, or the reason it is unusable."""
    image, label = pick_member(raw, IMAGE_KEYS), raw.get(label_key)
    if image is None or label is None:
        return "missing_member"
    try:
        return image, int(label.decode().strip())
    except (UnicodeDecodeError, ValueError):
        return "bad_label"


def decode_labelled(raw: RawSample, transform: Callable, label_key: str = "cls"):
    """(transformed image, int label) of a raw sample, or the reason it is unusable."""
    member = labelled_member(raw, label_key)
    if isinstance(member, str):
        return member
    image, target = member
    try:
        img = Image.open(io.BytesIO(image))
        img = img.convert("RGB")
    except Exception:  # noqa: BLE001 - any undecodable image is skipped, never fatal
        return "undecodable_image"
    return transform(img), target


class StreamingShards(IterableDataset):
    """Training samples streamed from ``urls`` (brace patterns, ``.txt`` lists, s3://)."""

    def __init__(self, urls: list[str], transform: Callable, num_samples: int,
                 batch_size: int, seed: int = 0, shuffle_buffer: int = 2000,
                 s3: S3Config | None = None, label_key: str = "cls"):
        self.s3 = s3 or S3Config()
        self.urls = expand_urls(urls, self.s3)
        if not self.urls:
            raise ValueError(f"data.train_urls: no shards in {urls}")
        self.rank, self.world = dist_info()  # captured in the main process
        if num_samples < batch_size * self.world:
            raise ValueError(f"data.train_samples={num_samples} is less than one global batch "
                             f"({batch_size} x {self.world} ranks)")
        self.transform, self.num_samples, self.batch_size = transform, num_samples, batch_size
        self.seed, self.shuffle_buffer, self.label_key = seed, shuffle_buffer, label_key
        self.epoch, self.skip_batches = 0, 0

    def __len__(self) -> int:
        return self.num_samples

    @property
    def batches_per_epoch(self) -> int:
        """Batches each rank delivers per epoch."""
        return self.num_samples // (self.batch_size * self.world)

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Next iteration: ``epoch``'s batches from index ``skip_batches`` on (resume)."""
        self.epoch, self.skip_batches = epoch, skip_batches

    def _raw(self, slot: int, nslots: int, counter: SkipCounter) -> Iterator[RawSample]:
        """Endless raw samples of one slot: seeded passes over its shards, buffer-shuffled."""
        shards = shards_for_slot(self.urls, slot, nslots, resampled=True)
        rng = random.Random(derive_seed(self.seed, self.epoch, slot, "buffer"))
        buffer: list[RawSample] = []
        for pass_id in itertools.count():
            got = 0
            order = shard_order(shards, False, derive_seed(self.seed, self.epoch, slot, pass_id))
            for url in order:
                for raw in read_shard(url, "train", self.s3, counter):
                    got += 1
                    if len(buffer) < self.shuffle_buffer:
                        buffer.append(raw)
                        continue
                    i = rng.randrange(len(buffer))
                    buffer[i], raw = raw, buffer[i]
                    yield raw
            if not got:
                raise RuntimeError(f"no readable sample in the {len(shards)} shards of stream "
                                   f"slot {slot} (e.g. {shards[:2]})")
            rng.shuffle(buffer)  # each pass is a permutation of the slice: drain it at its end
            yield from buffer
            buffer = []

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
            item = decode_labelled(raw, self.transform, self.label_key)
            if isinstance(item, str):
                bad += 1
                log.warning("skipped sample %s of %s (%s); %d skipped by this worker this "
                            "epoch", raw.get("__key__"), raw.get("__url__"), item, bad)
                continue
            produced += 1
            yield item
