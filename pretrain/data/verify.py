"""Read every sample of some shards through the training decode path and count them."""

from __future__ import annotations

from typing import Any

from data.config import S3Config
from data.sources import expand_urls
from pretrain.data.config import DataConfig, SourceConfig
from pretrain.data.loader import build_loader


def verify_shards(urls: list[str] | str, s3: S3Config | None = None,
                  image_key: str = "jpg;png;webp", text_key: str | None = "txt",
                  tags_key: str | None = "json:tags", image_size: int = 224,
                  batch_size: int = 64) -> dict[str, Any]:
    """One pass over ``urls`` (eval transform, in order, one process) and the tally:
    ``{"samples": good, "skipped": bad, "reasons": {...}, "shards": n}``."""
    s3 = s3 or S3Config()
    source = SourceConfig("verify", urls, image_key=image_key, text_key=text_key,
                          tags_key=tags_key, resampled=False)
    cfg = DataConfig(sources=[source], image_size=image_size, batch_size=batch_size,
                     workers=0, shuffle_buffer=0, s3=s3)
    loader = build_loader(cfg, rank=0, world_size=1, train=False)
    for _ in loader:
        pass
    stats = loader.stats
    return {"samples": sum(stats.samples.values()), "skipped": stats.total_skipped,
            "reasons": dict(sorted(stats.skipped.items())),
            "shards": len(expand_urls(urls, s3))}
