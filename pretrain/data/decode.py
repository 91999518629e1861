"""Raw tar sample -> checked, decoded, augmented sample (image tensor, caption, tags).

Every random choice of the augmentation comes from a ``random.Random`` seeded per sample
by the caller, so a resumed run reproduces the exact same crops (torchvision's transforms
draw from the global torch RNG, which the trainer also uses).
"""

from __future__ import annotations

import io
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pretrain.data.config import SourceConfig
from pretrain.data.sources import RawSample
from pretrain.data.stats import SkipCounter


@dataclass
class Sample:
    """One good sample, ready for batching (the caption is tokenised per batch)."""

    image: torch.Tensor
    caption: str | None
    tags: list[str] | None
    key: str


class TagVocab:
    """Tag name -> index over a vocabulary file (one tag per line, ``#`` comments)."""

    def __init__(self, tags: list[str]):
        self.tags = tags
        self.index = {t: i for i, t in enumerate(tags)}

    @classmethod
    def load(cls, path: str | Path | None) -> TagVocab:
        """The vocabulary in ``path``, or an empty one for None."""
        if path is None:
            return cls([])
        lines = Path(path).read_text(encoding="utf-8").splitlines()
        return cls([ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")])

    def __len__(self) -> int:
        return len(self.tags)

    def encode(self, tags: list[str] | None) -> tuple[torch.Tensor, int]:
        """Multi-hot vector of ``tags`` and how many of them were not in the vocabulary."""
        vec = torch.zeros(len(self.tags))
        unknown = 0
        for tag in tags or ():
            i = self.index.get(tag)
            if i is None:
                unknown += 1
            else:
                vec[i] = 1.0
        return vec, unknown


def random_resized_crop_box(width: int, height: int, scale: tuple[float, float],
                            ratio: tuple[float, float], rng: random.Random
                            ) -> tuple[int, int, int, int]:
    """(left, top, w, h) of a crop covering a random area fraction in ``scale`` with a
    random log-uniform aspect ratio in ``ratio``; the usual Inception-style sampling with
    10 attempts and a centre-crop fallback, drawn from ``rng``."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


class ImageTransform:
    """PIL image -> normalised float tensor (3, S, S).

    train: random resized crop (``scale``, aspect 3/4..4/3) + horizontal flip with
    probability ``hflip``; eval: resize the short side to S + centre crop. Bicubic.
    """

    def __init__(self, size: int, train: bool, mean: tuple[float, ...], std: tuple[float, ...],
                 scale: tuple[float, float] = (0.5, 1.0), hflip: float = 0.5):
        self.size = size
        self.train = train
        self.scale = scale
        self.hflip = hflip
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __call__(self, img: Image.Image, rng: random.Random) -> torch.Tensor:
        s = self.size
        if self.train:
            left, top, w, h = random_resized_crop_box(img.width, img.height, self.scale,
                                                      (3 / 4, 4 / 3), rng)
            img = img.resize((s, s), Image.BICUBIC, box=(left, top, left + w, top + h))
            if rng.random() < self.hflip:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
        else:
            short = min(img.width, img.height)
            w, h = round(img.width * s / short), round(img.height * s / short)
            left, top = (w - s) // 2, (h - s) // 2
            img = img.resize((w, h), Image.BICUBIC).crop((left, top, left + s, top + s))
        x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
        return (x.float().div_(255.0) - self.mean) / self.std


EXT_ALIASES = {"jpg": ("jpg", "jpeg"), "jpeg": ("jpeg", "jpg"), "tif": ("tif", "tiff"),
               "tiff": ("tiff", "tif")}
"""Spellings of one format: a ``.jpeg`` (or ``.JPEG``: members are keyed lower-case) image
answers ``image_key: jpg``, as in webdataset's own image decoder, which treats both alike."""


def pick_member(sample: RawSample, alternatives: str) -> bytes | None:
    """The first present member among ``a;b;c`` (each also under its :data:`EXT_ALIASES`)."""
    for ext in alternatives.split(";"):
        for spelling in EXT_ALIASES.get(ext, (ext,)):
            if spelling and spelling in sample:
                return sample[spelling]
    return None


class MalformedTags(ValueError):
    """A tags member that is present but cannot be read as tags."""


def parse_tags(sample: RawSample, tags_key: str | None) -> list[str] | None:
    """Tags of a sample: ``ext:field`` reads a JSON member's list field, ``ext`` a comma
    separated text member. None when absent (no member, no such field, null or empty).
    Raises :class:`MalformedTags` for a member that is not valid JSON / UTF-8 or a field
    that is not a list or string (the caller keeps the sample untagged and counts it)."""
    if tags_key is None:
        return None
    ext, _, fld = tags_key.partition(":")
    data = sample.get(ext)
    if not data:
        return None
    try:
        if fld:
            doc = json.loads(data)
            if not isinstance(doc, dict):
                raise MalformedTags(f"{ext} holds a JSON {type(doc).__name__}, not an object")
            value = doc.get(fld)
        else:
            value = data.decode("utf-8").split(",")
    except (ValueError, UnicodeDecodeError) as err:
        raise MalformedTags(str(err)) from None
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise MalformedTags(f"{tags_key} is a {type(value).__name__}, not a list")
    tags = [str(t).strip() for t in value if str(t).strip()]
    return tags or None


def sample_tags(raw: RawSample, source: SourceConfig, counter: SkipCounter
                ) -> list[str] | None:
    """:func:`parse_tags`, with a malformed tags member counted (event ``malformed_tags``)
    instead of kept silently; the sample stays, untagged."""
    try:
        return parse_tags(raw, source.tags_key)
    except MalformedTags:
        counter.event(source.name, "malformed_tags")
        return None


def decode_sample(raw: RawSample, source: SourceConfig, transform: ImageTransform,
                  rng: random.Random, counter: SkipCounter) -> Sample | None:
    """Check and decode one raw sample; None (and a counted reason) if it is unusable.

    Checks run cheapest first so that a sample without caption is never decoded.
    """
    image_bytes = pick_member(raw, source.image_key)
    if image_bytes is None:
        counter.skip(source.name, "missing_image")
        return None
    if len(image_bytes) == 0:
        counter.skip(source.name, "empty_image")
        return None
    caption = None
    if source.text_key is not None:
        try:
            caption = (raw.get(source.text_key) or b"").decode("utf-8").strip()
        except UnicodeDecodeError:
            caption = ""
        if not caption:
            counter.skip(source.name, "missing_caption")
            return None
    try:
        with Image.open(io.BytesIO(image_bytes)) as img:
            img.load()  # decode fully now: truncated files raise here, not later
            rgb = img.convert("RGB")
    except Exception:
        counter.skip(source.name, "undecodable_image")
        return None
    if rgb.width == 0 or rgb.height == 0:
        counter.skip(source.name, "empty_image")
        return None
    image = transform(rgb, rng)
    return Sample(image, caption, sample_tags(raw, source, counter),
                  f"{raw['__url__'].rsplit('/', 1)[-1]}/{raw['__key__']}")
