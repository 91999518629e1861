"""Classification data: an ImageFolder tree or webdataset shards (``jpg``/``cls`` members),
with timm's transforms. No ``data.kind`` set: the built-in digits demo shards."""

from __future__ import annotations

import io
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from finetune.runtime import Dist


class ShardDataset(Dataset):
    """A (small) shard set read fully into memory as encoded bytes: map-style, so epochs,
    shuffling, DDP sampling and resume are exact. ImageNet-size sets: use an ImageFolder
    tree (streaming large shard sets is not implemented yet)."""

    def __init__(self, urls: list[str], transform, image_key: str = "jpg",
                 label_key: str = "cls"):
        import webdataset as wds

        self.items: list[tuple[bytes, int]] = []
        # every rank reads every shard (the sampler splits the samples), so no node
        # splitter: webdataset's default refuses to run once a process group exists
        for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False,
                                     nodesplitter=None):
            self.items.append((sample[image_key], int(sample[label_key])))
        if not self.items:
            raise ValueError(f"data: no samples in {urls[:3]}")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        raw, label = self.items[i]
        img = Image.open(io.BytesIO(raw)).convert("RGB")
        return self.transform(img), label


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
    from pretrain.data import demo_source_urls, ensure_demo_shards

    manifest = ensure_demo_shards(cache_dir, image_size=img_size)
    return demo_source_urls(manifest, "train"), demo_source_urls(manifest, "val")


def build_datasets(cfg) -> tuple[Dataset, Dataset]:
    """(train, val) datasets for ``cfg.data.kind``."""
    d = cfg.data
    train_tf, val_tf = build_transforms(cfg, True), build_transforms(cfg, False)
    if d.kind == "imagefolder":
        from torchvision.datasets import ImageFolder

        return (ImageFolder(str(Path(d.root) / d.train_split), train_tf),
                ImageFolder(str(Path(d.root) / d.val_split), val_tf))
    if d.kind == "demo":
        train_urls, val_urls = demo_urls(d.cache_dir, d.source_size)
    else:
        from braceexpand import braceexpand

        train_urls = [u for p in d.train_urls for u in braceexpand(p)]
        val_urls = [u for p in d.val_urls for u in braceexpand(p)]
    return ShardDataset(train_urls, train_tf), ShardDataset(val_urls, val_tf)


def build_loaders(cfg, d: Dist, train_set: Dataset, val_set: Dataset, epoch: int = 0):
    """DataLoaders (DistributedSampler when several ranks); returns (train, val, sampler)."""
    sampler = (DistributedSampler(train_set, d.world_size, d.rank, shuffle=True,
                                  seed=cfg.run.seed, drop_last=True)
               if d.world_size > 1 else None)
    g = torch.Generator().manual_seed(cfg.run.seed + epoch)
    train = DataLoader(train_set, batch_size=cfg.run.batch_size, shuffle=sampler is None,
                       sampler=sampler, num_workers=cfg.run.num_workers, drop_last=True,
                       generator=g, persistent_workers=False)
    val_sampler = (DistributedSampler(val_set, d.world_size, d.rank, shuffle=False)
                   if d.world_size > 1 else None)
    val = DataLoader(val_set, batch_size=cfg.run.batch_size * 2, shuffle=False,
                     sampler=val_sampler, num_workers=cfg.run.num_workers)
    return train, val, sampler
