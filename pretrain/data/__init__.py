"""The pre-training data recipe: mixing of sources, decoding of image, text and tags, the
demo's source config (shard I/O and the demo shards themselves live in the top-level
``data`` package; ``ensure_demo_shards`` and friends are re-exported here for callers).

The trainer calls :func:`build_loader`; the demo calls :func:`ensure_demo_shards`.
"""

from data.demo import demo_source_urls, demo_tag_vocab, ensure_demo_shards
from pretrain.data.config import DataConfig, SourceConfig
from pretrain.data.demo import demo_source
from pretrain.data.loader import StreamingLoader, build_loader

__all__ = ["DataConfig", "SourceConfig",
           "StreamingLoader", "build_loader", "demo_source", "demo_source_urls",
           "demo_tag_vocab", "ensure_demo_shards"]
