"""Classification data: an ImageFolder tree, webdataset shards held in memory (small sets)
or streamed (``stream``: finetune/cls_stream.py), with timm's transforms. Shards hold an
image (``jpg``/``jpeg``/``png``/``webp``) and a ``cls`` member per sample and may be local,
s3:// (``data.s3``), brace patterns or ``.txt`` lists. No ``data.kind`` set: the built-in
digits demo shards."""

from __future__ import annotations

import io
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler

from data.config import S3Config
from data.preflight import check_sources_readable
from finetune.data_files import NextReadable, agreed_set
from finetune.dense_data import CollateCounted, CountedItems
from finetune.eval_loader import eval_generator
from runtime.dist import DistInfo, all_gather_objects, rank_share
from runtime.preemption import loader_worker_init
from runtime.redact import redact_url, redact_urls
from runtime.rng import StartAt, loader_generator

log = logging.getLogger(__name__)


class ShardDataset(Dataset):
    """A (small) shard set read fully into memory as encoded bytes: map-style, so epochs,
    shuffling, DDP sampling and resume are exact. Large sets: ``data.kind=stream``.
    Samples without an image or a readable label, or (with ``num_classes``) with a label
    outside ``[0, num_classes)``, are skipped, counted (``skipped``, by reason in
    ``skipped_by_reason``) and logged once per shard.

    Every rank reads every shard (the sampler splits the samples), so every rank must
    hold the same items: a broken read is resumed where it broke
    (:func:`data.sources.read_whole_shard`), and the ranks then compare what they read
    (a collective: every rank builds the set). A shard some rank could not read whole, or
    ranks holding different numbers of items (a shard missing on one node only), raise
    :class:`data.sources.ShardReadError` on every rank: a set built from part of a shard,
    or samplers of different lengths, would train on a wrong set without a word."""

    def __init__(self, urls: list[str], transform, s3: S3Config | None = None,
                 label_key: str = "cls", num_classes: int | None = None):
        from data.sources import ShardReadError, expand_urls
        from data.stats import SkipCounter

        s3 = s3 or S3Config()
        self.items: list[tuple[bytes, int]] = []
        self.skipped_by_reason: Counter[str] = Counter()
        counter = SkipCounter()
        error = None
        try:
            for url in expand_urls(urls, s3):
                self._read(url, s3, counter, label_key, num_classes)
        except ShardReadError as err:  # told to every rank below, none left waiting
            error = str(err)
        _agree_on_items(len(self.items), error)
        self.skipped = sum(self.skipped_by_reason.values())
        if not self.items:
            raise ValueError(f"data: no samples in {redact_urls(urls)}")
        self.transform = transform

    def _read(self, url: str, s3: S3Config, counter, label_key: str,
              num_classes: int | None) -> None:
        """Add the usable samples of shard ``url``; count and log the others."""
        from data.sources import read_whole_shard
        from finetune.cls_stream import describe_skip, labelled_member

        skipped, first = Counter(), ""
        for raw in read_whole_shard(url, "shards", s3, counter):
            member = labelled_member(raw, label_key, num_classes)
            if isinstance(member, str):  # the reason it is unusable
                skipped[member] += 1
                first = first or describe_skip(raw, member, label_key, num_classes)
            else:
                self.items.append(member)
        if skipped:
            log.warning("data: shard %s: %d samples skipped (%s), e.g. %s",
                        redact_url(url), sum(skipped.values()), dict(skipped), first)
            self.skipped_by_reason.update(skipped)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        raw, label = self.items[i]
        img = Image.open(io.BytesIO(raw)).convert("RGB")
        return self.transform(img), label


def _agree_on_items(count: int, error: str | None) -> None:
    """Raise :class:`data.sources.ShardReadError` on every rank when any rank could not
    read its shards whole (``error``) or the ranks hold different numbers of items
    (``count``): a collective, called by every rank that builds a :class:`ShardDataset`."""
    from data.sources import ShardReadError

    seen = all_gather_objects((count, error))
    failed = [(rank, err) for rank, (_, err) in enumerate(seen) if err is not None]
    if failed:
        rank, err = failed[0]
        where = f"rank {rank}" if len(seen) > 1 else "this process"
        raise ShardReadError(f"data: {where} could not read the set: {err}")
    counts = sorted({n for n, _ in seen})
    if len(counts) > 1:
        per_rank = ", ".join(f"rank {r}: {n}" for r, (n, _) in enumerate(seen))
        raise ShardReadError(
            f"data: the ranks read different numbers of samples from the same shards "
            f"({per_rank}): every rank must hold the same set for the sampler to split "
            "it. A shard missing or damaged on some nodes only (see the warnings above)? "
            "Make the shards readable alike from every node and run again")


class SkipUnreadable(Dataset):
    """A map-style set whose unreadable samples (an image PIL cannot decode: truncated,
    not an image, a decompression bomb) are logged and skipped instead of ending the run.

    Training (``substitute``): the next readable sample in index order takes its place
    (``finetune.data_files.NextReadable``, every task's rule: every batch keeps its size,
    a resume replays the same samples; mmdet/mmseg datasets substitute another sample
    alike). Validation: the sample is left out (None; :func:`drop_unreadable` filters the
    batch) and every metric is over the images actually evaluated; evaluate() logs how
    many.

    The training loop's count of replaced samples is :meth:`counted_item`'s: made where
    the sample is read (a DataLoader worker) and carried out with it (``NextReadable``'s
    own count stays in the worker's copy of this object)."""

    def __init__(self, dataset: Dataset, substitute: bool):
        self.dataset, self.substitute = dataset, substitute
        # any error: torchvision's ImageFolder and PIL raise errors of every type
        self.replace = NextReadable("sample", errors=(Exception,))

    def __len__(self) -> int:
        return len(self.dataset)

    def counted_item(self, i: int) -> tuple[Any, int]:
        """(training sample ``i`` or the next readable one, how many unreadable samples it
        replaced): what ``finetune.dense_data.CountedItems`` hands the loader."""
        _, item, replaced = self.replace.read_counted(self.dataset.__getitem__, i,
                                                      len(self.dataset))
        return item, replaced

    def __getitem__(self, i: int):
        if self.substitute:
            return self.counted_item(i)[0]
        try:
            return self.dataset[i]
        except Exception as err:  # noqa: BLE001 - any unreadable sample is left out
            log.warning("data: validation sample %d unreadable (%s: %s), left out", i,
                        type(err).__name__, err)
            return None


def drop_unreadable(items: list):
    """Collate a validation batch without the samples :class:`SkipUnreadable` left out
    (None for a batch that held nothing readable)."""
    from torch.utils.data import default_collate

    kept = [item for item in items if item is not None]
    return default_collate(kept) if kept else None


def build_transforms(cfg, train: bool):
    """timm's ``create_transform``: RandAugment, random erasing, resize/crop, normalise."""
    from timm.data import create_transform

    a = cfg.aug
    if not train:
        return create_transform(cfg.data.img_size, is_training=False,
                                crop_pct=a.test_crop_pct, interpolation="bicubic")
    return create_transform(
        cfg.data.img_size, is_training=True, scale=tuple(a.scale), hflip=a.hflip,
        color_jitter=a.color_jitter or None, auto_augment=a.auto_augment or None,
        interpolation="bicubic", re_prob=a.re_prob, re_mode="pixel", re_count=1)


def demo_urls(cache_dir: str, img_size: int) -> tuple[list[str], list[str]]:
    """Train/val shard paths of the digits demo (written on first use)."""
    from data.demo import demo_source_urls, ensure_demo_shards

    manifest = ensure_demo_shards(cache_dir, image_size=img_size)
    return demo_source_urls(manifest, "train"), demo_source_urls(manifest, "val")


def check_data(cfg, thorough: bool = True, val_only: bool = False) -> None:
    """Refuse, before anything is built, data the readers of ``cfg.data.kind`` would not
    find (a ``ValueError`` naming the key and the path): the image folder's train and val
    class folders, the local shards and shard lists (remote URLs are the pipeline's).
    Nothing here reads more than a listing or a shard list, so ``thorough`` (False at
    submit: see ``finetune.init.start_checks``) changes nothing. ``val_only``: the
    validation data alone (an evaluation without training: finetune/eval_only.py)."""
    from finetune.data_paths import DataPath, check_data_paths, check_shard_urls

    d = cfg.data
    if d.kind == "imagefolder":
        root = Path(d.root)
        splits = (d.val_split,) if val_only else (d.train_split, d.val_split)
        check_data_paths([DataPath("data.root", root, "an image folder holding "
                                   + " and ".join(f"{s}/" for s in splits)
                                   + ", as ImageNet's")])
        check_data_paths(DataPath("data.root", root / split, f"ImageNet's {split}/ folder of "
                                  "class folders", holds="*/", holds_desc="holds no class "
                                  "folders") for split in splits)
        _check_class_folders(root / d.train_split, root / d.val_split, d.num_classes)
    elif d.kind in ("shards", "stream"):
        if not val_only:
            check_shard_urls("data.train_urls", d.train_urls)
        check_shard_urls("data.val_urls", d.val_urls)


def class_folders(folder: Path) -> list[str]:
    """The class folders of an ImageFolder split, sorted: torchvision's own rule
    (``torchvision.datasets.folder.find_classes``: every sub-folder, hidden ones included),
    so index ``i`` here is the label ImageFolder gives the ``i``-th. Kept here rather than
    imported: torchvision takes seconds to import, and check_data runs at submit too."""
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if e.is_dir())


def _named(names: list[str], most: int = 5) -> str:
    """``names`` for a one-line message (ImageNet has 1000: the first ``most``)."""
    return ", ".join(names[:most]) + (f", ... ({len(names)} in all)" if len(names) > most
                                      else "")


def _check_class_folders(train: Path, val: Path, num_classes: int) -> None:
    """Refuse class folders the run would mislabel or crash on, from the listings alone:
    more training class folders than ``num_classes`` (a label past the head: the loss
    fails mid-run) and a validation class folder training does not have (validation
    takes training's class->index mapping: such images have no index). ``train``
    missing (an evaluation of the validation set alone): ``val``'s folders are what
    ``num_classes`` is checked against. Fewer folders (a subset) are legitimate."""
    val_classes = class_folders(val)
    labelled = train if train.is_dir() else val
    classes = class_folders(train) if train.is_dir() else val_classes
    if len(classes) > num_classes:
        raise ValueError(f"data.num_classes={num_classes} but {labelled} holds {len(classes)} "
                         f"class folders ({_named(classes)}): set "
                         f"data.num_classes={len(classes)}")
    _refuse_extra_val_classes(val, val_classes, train, classes)


def _refuse_extra_val_classes(val: Path, val_classes: list[str], train: Path,
                              train_classes: list[str] | dict[str, int]) -> None:
    """Refuse validation class folders training does not have: validation takes
    training's class->index mapping, so their images would have no index."""
    extra = sorted(set(val_classes) - set(train_classes))
    if extra:
        raise ValueError(f"data.val_split: {val} holds {len(extra)} class folder(s) that "
                         f"{train} does not ({_named(extra)}): validation labels follow "
                         "the training set's class folders, so these images would have "
                         "none; remove them from the validation set or add them to training")


def _val_image_folder(folder: Path, transform, class_to_idx: dict[str, int] | None,
                      train: Path):
    """The validation ImageFolder, its targets by ``class_to_idx`` (the training set's
    class->index mapping): on its own, ImageFolder numbers the folders it holds, so a
    validation set without some class would shift the labels of every class after it.
    A class folder missing (or empty) is logged once; one training does not have is
    refused (:func:`check_data` refuses it first). ``class_to_idx`` None: no training
    set to take it from (an evaluation with no train split): the folders' own order,
    as torchvision numbers them."""
    from torchvision.datasets import ImageFolder

    # empty folders allowed: a missing class is counted below, not torchvision's error
    val = ImageFolder(str(folder), transform, allow_empty=True)
    if not val.samples:
        raise ValueError(f"data.val_split: {folder} holds no images")
    if class_to_idx is None:
        return val
    _refuse_extra_val_classes(folder, val.classes, train, class_to_idx)
    # remapped in place rather than by overriding find_classes in a subclass: a plain
    # ImageFolder pickles for spawned DataLoader workers (a class made on first use,
    # torchvision being imported lazily, would not)
    index = [class_to_idx[c] for c in val.classes]
    val.samples = [(path, index[t]) for path, t in val.samples]
    val.imgs, val.targets = val.samples, [t for _, t in val.samples]
    missing = len(class_to_idx) - len(set(val.targets))
    if missing:
        log.warning("data: %s holds no images of %d of the training set's %d classes: "
                    "their labels kept as training numbers them, top-1/top-5 over the "
                    "classes present", folder, missing, len(class_to_idx))
    val.classes, val.class_to_idx = list(class_to_idx), dict(class_to_idx)
    return val


def build_datasets(cfg, resumed: bool = False) -> tuple[Dataset, Dataset]:
    """(train, val) datasets for ``cfg.data.kind``; ``resumed``: the run continues a
    checkpoint (a remote store that does not answer is then waited for)."""
    d = cfg.data
    train_tf = build_transforms(cfg, True)
    if d.kind == "imagefolder":
        from torchvision.datasets import ImageFolder

        train = agreed_set("training", lambda: ImageFolder(str(Path(d.root) / d.train_split),
                                                            train_tf),
                           _samples, d.root, all_gather_objects)
        val = agreed_set("validation", lambda: _val_set(cfg, train.class_to_idx), _samples,
                         d.root, all_gather_objects)
        return train, val
    n = d.num_classes  # a label outside [0, n) is skipped, never handed to the loss
    if d.kind == "demo":
        train_urls, _ = demo_urls(d.cache_dir, d.source_size)
        return ShardDataset(train_urls, train_tf, num_classes=n), _val_set(cfg)
    # a store that serves no shard of either set ends the run here, before the model is
    # built, not in a reader waiting for it (data/preflight.py; local paths: check_data)
    check_sources_readable([("train", d.train_urls), ("val", d.val_urls)], d.s3, resumed,
                           gather=all_gather_objects)
    val = _val_set(cfg)
    if d.kind == "stream":
        from finetune.cls_stream import StreamingShards

        return StreamingShards(d.train_urls, train_tf, d.train_samples, cfg.run.batch_size,
                               cfg.run.seed, d.shuffle_buffer, d.s3, num_classes=n,
                               workers=cfg.run.num_workers,
                               on_shard_list_change=d.on_shard_list_change), val
    return ShardDataset(d.train_urls, train_tf, d.s3, num_classes=n), val


def _samples(dataset: Dataset) -> list:
    """An image folder's ``(path, label)`` samples, compared across the ranks; none for
    shards (ShardDataset agrees on its own lists)."""
    from torchvision.datasets import ImageFolder

    return dataset.samples if isinstance(dataset, ImageFolder) else []


def build_val_set(cfg) -> Dataset:
    """The validation set alone, as :func:`build_datasets` builds it (an evaluation
    without training reads no training image or shard: finetune/eval_only.py), the ranks'
    listings of an image folder agreed on (collective)."""
    d = cfg.data
    if d.kind in ("shards", "stream"):  # as build_datasets: refused here, not in a reader
        check_sources_readable([("val", d.val_urls)], d.s3, gather=all_gather_objects)
    if d.kind != "imagefolder":  # shards agree on their own items, inside their build
        return _val_set(cfg)
    return agreed_set("validation", lambda: _val_set(cfg), _samples, d.root,
                      all_gather_objects)


def _val_set(cfg, class_to_idx: dict[str, int] | None = None) -> Dataset:
    """``cfg.data``'s validation set (a stream's is held in memory too); an image folder's
    labelled by the training set's ``class_to_idx`` (not given: read from the train
    split's class folders where there is one)."""
    d = cfg.data
    transform = build_transforms(cfg, False)
    if d.kind == "imagefolder":
        train, val = Path(d.root) / d.train_split, Path(d.root) / d.val_split
        if class_to_idx is None and train.is_dir():  # an evaluation without training
            class_to_idx = {c: i for i, c in enumerate(class_folders(train))}
        elif class_to_idx is None and (n := len(class_folders(val))) < d.num_classes:
            # nothing to check the numbering against: a class missing from val/ shifts
            # the labels of every class sorted after it
            log.warning("data: no %s to number the classes by: labels follow %s's own %d "
                        "class folders (data.num_classes=%d), right only if the missing "
                        "classes sort last", train, val, n, d.num_classes)
        return _val_image_folder(val, transform, class_to_idx, train)
    urls = demo_urls(d.cache_dir, d.source_size)[1] if d.kind == "demo" else d.val_urls
    return ShardDataset(urls, transform, d.s3, num_classes=d.num_classes)


def build_loaders(cfg, d: DistInfo, train_set, val_set: Dataset, epoch: int = 0,
                  skip: int = 0):
    """The epoch's loaders: training (a DataLoader over a DistributedSampler when several
    ranks, from micro-batch ``skip`` on: a resumed epoch's, whose earlier samples are not
    read; a streaming set is its own loader, its stream going on across epochs, restored
    where it stopped) and validation (this rank's share, unpadded); returns (train, val,
    sampler), the sampler set to ``epoch``.

    A map-style training loader yields ``finetune.dense_data.Counted`` batches, each with
    the number of unreadable samples its samples replaced (what the training loop sums
    into the records' ``skipped``), each sample augmented from its own seed
    (``CountedItems``); a streaming set counts its own by reason."""
    from finetune.cls_stream import StreamingShards

    sampler = None
    if isinstance(train_set, StreamingShards):
        train = train_set
    else:
        # per rank and epoch: the order on one rank, the workers' base seeds
        g = loader_generator(cfg.run.seed, d.rank, epoch)
        if d.world_size > 1:
            sampler = DistributedSampler(train_set, d.world_size, d.rank, shuffle=True,
                                         seed=cfg.run.seed, drop_last=True)
            sampler.set_epoch(epoch)
        # the sampler draws from the set itself: the wrappers only change what a bad
        # index holds, seed its augmentation and carry the replacement count out of the
        # worker with the batch
        order = sampler if sampler is not None else RandomSampler(train_set, generator=g)
        items = CountedItems(SkipUnreadable(train_set, substitute=True), cfg.run.seed, epoch)
        train = DataLoader(
            items, batch_size=cfg.run.batch_size,
            sampler=StartAt(order, skip * cfg.run.batch_size),
            num_workers=cfg.run.num_workers, drop_last=True, generator=g,
            persistent_workers=False, collate_fn=CollateCounted(),
            worker_init_fn=loader_worker_init)
    return train, build_val_loader(cfg, d, val_set), sampler


def build_val_loader(cfg, d: DistInfo, val_set: Dataset) -> DataLoader:
    """This rank's share of ``val_set``, unpadded, in batches of 2 x ``run.batch_size``
    (unreadable images left out: :class:`SkipUnreadable`). Its own generator
    (:func:`finetune.eval_loader.eval_generator`): an evaluation leaves torch's global RNG,
    and so training's randomness, as it found it."""
    # each validation image on exactly one rank (no padding): evaluate() sums the counts
    return DataLoader(SkipUnreadable(val_set, substitute=False),
                      batch_size=cfg.run.batch_size * 2, shuffle=False,
                      sampler=rank_share(len(val_set), d), num_workers=cfg.run.num_workers,
                      collate_fn=drop_unreadable, generator=eval_generator(),
                      worker_init_fn=loader_worker_init)


def epoch_batches(loader):
    """The epoch's ``(images, labels)`` batches (a counted loader's: ``Counted`` ones): a
    streaming set's stream goes on where it stopped (a resumed one was restored there); a
    map-style loader starts where :func:`build_loaders` was told to."""
    from finetune.cls_stream import StreamingShards

    if isinstance(loader, StreamingShards):
        return loader.batches()
    return loader
