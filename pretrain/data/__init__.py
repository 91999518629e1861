"""Streaming webdataset input pipeline: sources, mixing, decoding, state, shard tools.

The trainer calls :func:`build_loader`; the demo calls :func:`ensure_demo_shards`.
"""

from pretrain.data.config import DataConfig, S3Config, SourceConfig
from pretrain.data.demo import demo_source, demo_source_urls, demo_tag_vocab, ensure_demo_shards
from pretrain.data.loader import StreamingLoader, build_loader
from pretrain.data.stats import SKIP_REASONS, DataStats

__all__ = ["DataConfig", "DataStats", "S3Config", "SKIP_REASONS", "SourceConfig",
           "StreamingLoader", "build_loader", "demo_source", "demo_source_urls",
           "demo_tag_vocab", "ensure_demo_shards"]
