"""Built-in data: ``builtin:digits/...`` URLs name the digits demo shards, written on first
use into a cache directory, so the demo config (configs/pretrain/demo.yaml) stays a plain
YAML file whose every key can be overridden."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from data.demo import cache_dir
from pretrain.config import PretrainConfig
from pretrain.data import demo_source_urls, ensure_demo_shards

BUILTIN = "builtin:digits/"


def _resolve(value: str, manifest: Path) -> list[str]:
    name = value[len(BUILTIN):]
    if name in ("train", "val"):
        return demo_source_urls(manifest, name)
    path = manifest.parent / name
    if not path.exists():
        files = sorted(p.name for p in manifest.parent.iterdir())
        raise ValueError(f"{value!r}: the digits demo has train, val and {files}")
    return [str(path)]


def _uses_builtin(values: list[str]) -> bool:
    return any(v.startswith(BUILTIN) for v in values)


def resolve_builtin(cfg: PretrainConfig) -> PretrainConfig:
    """Replace ``builtin:digits/{train,val,tags.txt}`` by the cached shards' local paths."""
    data = cfg.data
    if data is None:
        return cfg
    urls = [s.urls if isinstance(s.urls, list) else [s.urls] for s in data.sources]
    wanted = [u for us in urls for u in us] + list(cfg.zero_shot.urls) + [data.tag_vocab or ""]
    if not _uses_builtin(wanted):
        return cfg
    manifest = ensure_demo_shards(cache_dir(), image_size=data.image_size)

    def fix(values: list[str]) -> list[str]:
        out: list[str] = []
        for v in values:
            out += _resolve(v, manifest) if v.startswith(BUILTIN) else [v]
        return out

    sources = [replace(s, urls=fix(us)) for s, us in zip(data.sources, urls)]
    tag_vocab = data.tag_vocab
    if tag_vocab and tag_vocab.startswith(BUILTIN):
        tag_vocab = _resolve(tag_vocab, manifest)[0]
    data = replace(data, sources=sources, tag_vocab=tag_vocab)
    zero_shot = replace(cfg.zero_shot, urls=fix(list(cfg.zero_shot.urls)))
    return replace(cfg, data=data, zero_shot=zero_shot)
