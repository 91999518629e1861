"""Raw tar sample -> checked, decoded, augmented sample (image tensor, caption, tags).

Every random choice of the augmentation comes from a ``random.Random`` seeded per sample
by the caller, so a resumed run reproduces the exact same crops (torchvision's transforms
draw from the global torch RNG, which the trainer also uses).
"""

from __future__ import annotations

import io
import math
import random
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data.sources import RawSample, pick_member
from data.state import shard_name
from data.stats import SkipCounter
from data.tags import MalformedTags, parse_tags
from pretrain.data.config import SourceConfig


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

    def unknown(self, tags: list[str] | None) -> int:
        """How many of ``tags`` are not in the vocabulary."""
        return sum(1 for tag in tags or () if tag not in self.index)

    def encode(self, tags: list[str] | None) -> torch.Tensor:
        """Multi-hot vector of ``tags`` (those outside the vocabulary left out: counted per
        sample by :meth:`unknown`)."""
        vec = torch.zeros(len(self.tags))
        for tag in tags or ():
            i = self.index.get(tag)
            if i is not None:
                vec[i] = 1.0
        return vec


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


PIL_MAX_IMAGE_PIXELS = 1024 * 1024 * 1024 // 4 // 3
"""PIL's own decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``, 89,478,485 pixels: ~0.25
GiB of 3-byte pixels); the default of ``data.max_image_pixels``."""


class OversizedImage(ValueError):
    """An image whose header declares more pixels than the configured limit."""


class EmptyImage(ValueError):
    """An image with no pixels."""


@dataclass
class CropPlan:
    """Where the output comes from, in the coordinates of the full-size image: ``box``
    (left, top, right, bottom) resized to ``resize`` (train: the output itself; eval: the
    short side to S, then the centre ``crop``), then flipped if ``flip``. ``needed``: the
    smallest full-image size whose ``box`` still has ``resize`` pixels (what a JPEG may be
    decoded down to without upsampling later)."""

    box: tuple[float, float, float, float]
    resize: tuple[int, int]
    crop: tuple[int, int, int, int] | None
    flip: bool
    needed: tuple[int, int]


class ImageTransform:
    """Encoded or PIL image -> normalised float tensor (3, S, S).

    train: random resized crop (``scale``, aspect 3/4..4/3) + horizontal flip with
    probability ``hflip``; eval: resize the short side to S + centre crop. Bicubic.

    :meth:`decode` (bytes) refuses images over ``max_pixels`` (:class:`OversizedImage`)
    from the header alone, and decodes a JPEG with PIL's ``draft()``: libjpeg then decodes
    at 1/2, 1/4 or 1/8 scale (the only JPEG scales; other formats ignore it), the largest
    whose crop still holds at least S x S pixels, so the bicubic resize never upsamples
    what full decoding would have downsampled, and the output is at most 2x coarser than
    the target before the final resize. The crop is drawn on the full-size geometry, so the
    random draws (and a resumed run) are the same with or without draft.
    """

    def __init__(self, size: int, train: bool, mean: tuple[float, ...], std: tuple[float, ...],
                 scale: tuple[float, float] = (0.5, 1.0), hflip: float = 0.5,
                 max_pixels: int = PIL_MAX_IMAGE_PIXELS, draft: bool = True):
        self.size = size
        self.train = train
        self.scale = scale
        self.hflip = hflip
        self.max_pixels = max_pixels
        self.draft = draft
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def plan(self, width: int, height: int, rng: random.Random) -> CropPlan:
        """The crop of a ``width`` x ``height`` image (draws from ``rng`` in train mode:
        the crop box, then the flip)."""
        s = self.size
        if self.train:
            left, top, w, h = random_resized_crop_box(width, height, self.scale,
                                                      (3 / 4, 4 / 3), rng)
            flip = rng.random() < self.hflip
            needed = (math.ceil(width * s / w), math.ceil(height * s / h))
            return CropPlan((left, top, left + w, top + h), (s, s), None, flip, needed)
        short = min(width, height)
        w, h = round(width * s / short), round(height * s / short)
        left, top = (w - s) // 2, (h - s) // 2
        return CropPlan((0, 0, width, height), (w, h), (left, top, left + s, top + s), False,
                        (w, h))

    def apply(self, img: Image.Image, plan: CropPlan, full_size: tuple[int, int] | None = None
              ) -> torch.Tensor:
        """``plan`` carried out on ``img``, an RGB image that may be a reduced decode of a
        ``full_size`` image (the plan's box is scaled to it)."""
        fx, fy = ((img.width / full_size[0], img.height / full_size[1]) if full_size
                  else (1.0, 1.0))
        left, top, right, bottom = plan.box
        box = (left * fx, top * fy, right * fx, bottom * fy)
        img = img.resize(plan.resize, Image.BICUBIC, box=box)
        if plan.crop is not None:
            img = img.crop(plan.crop)
        if plan.flip:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
        return (x.float().div_(255.0) - self.mean) / self.std

    def __call__(self, img: Image.Image, rng: random.Random) -> torch.Tensor:
        """Transform an already decoded RGB image."""
        return self.apply(img, self.plan(img.width, img.height, rng))

    def decode(self, data: bytes, rng: random.Random) -> torch.Tensor:
        """Decode ``data`` and transform it (see the class docstring). Raises
        :class:`OversizedImage`, or PIL's errors for data it cannot decode."""
        with warnings.catch_warnings():
            # Our limit is checked below from the header; PIL would only warn here (and
            # raise DecompressionBombError itself beyond twice its own limit).
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
        with img:
            width, height = img.size
            if width * height > self.max_pixels:
                raise OversizedImage(f"{width}x{height} pixels > limit {self.max_pixels}")
            if width == 0 or height == 0:
                raise EmptyImage(f"{width}x{height} image")
            plan = self.plan(width, height, rng)
            if self.draft and img.format == "JPEG":
                img.draft("RGB", plan.needed)
            img.load()  # decode fully now: truncated files raise here, not later
            rgb = img.convert("RGB")
        return self.apply(rgb, plan, (width, height))


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
        image = transform.decode(image_bytes, rng)
    except (OversizedImage, Image.DecompressionBombError):
        counter.skip(source.name, "oversized_image")
        return None
    except EmptyImage:
        counter.skip(source.name, "empty_image")
        return None
    except MemoryError:  # the worker's memory, not the sample's bytes: not a skip
        raise
    except Exception:
        counter.skip(source.name, "undecodable_image")
        return None
    # the shard's name: a presigned URL's signature or a command's token left out
    return Sample(image, caption, sample_tags(raw, source, counter),
                  f"{shard_name(raw['__url__']).rsplit('/', 1)[-1]}/{raw['__key__']}")
