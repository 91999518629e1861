"""Pre-training's view of the built-in digits demo (the shards themselves are written by
``data.demo``, shared with classification): one split as a :class:`SourceConfig`."""

from __future__ import annotations

from pathlib import Path

from data.demo import demo_source_urls
from pretrain.data.config import SourceConfig


def demo_source(manifest: str | Path, split: str = "train") -> SourceConfig:
    """A :class:`SourceConfig` for one split of the demo (train: resampled; val: one pass)."""
    return SourceConfig(name=f"digits-{split}", urls=demo_source_urls(manifest, split),
                        image_key="jpg", text_key="txt", tags_key="json:tags",
                        resampled=split == "train")
