"""Decoding for throughput: large JPEGs decoded at reduced scale with PIL's ``draft()``
without losing quality, and images over the pixel limit skipped and counted
``oversized_image`` from their header alone."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from data.stats import SkipCounter
from pretrain.data.config import DataConfig, SourceConfig
from pretrain.data.decode import ImageTransform, decode_sample

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)  # tensor = 2 * pixel / 255 - 1


def _photo(width: int, height: int, fmt: str = "JPEG") -> bytes:
    """A photo-like image: smooth gradients plus mild noise."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    rgb = np.stack([255 * x / width, 255 * y / height,
                    127 + 100 * np.sin(x / 37.0) * np.cos(y / 23.0)], axis=-1)
    rgb += np.random.default_rng(0).normal(0, 4, rgb.shape)
    img = Image.fromarray(rgb.clip(0, 255).astype(np.uint8))
    buf = io.BytesIO()
    img.save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _decoded_size(transform: ImageTransform, data: bytes, rng: random.Random
                  ) -> tuple[tuple[int, int], torch.Tensor]:
    """The size of the image the transform actually decoded, and its output."""
    seen: list[tuple[int, int]] = []
    apply = transform.apply

    def spy(img, plan, full_size=None):
        seen.append(img.size)
        return apply(img, plan, full_size)

    transform.apply = spy
    out = transform.decode(data, rng)
    return seen[0], out


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    # tensors in [-1, 1] (mean/std 0.5): peak-to-peak 2
    mse = torch.mean((a - b) ** 2).item()
    return 10 * np.log10(4.0 / mse)


def test_eval_jpeg_is_drafted_to_the_largest_scale_that_keeps_the_target():
    # PIL docs (Image.draft): for JPEG the loader picks the scale 1/1, 1/2, 1/4 or 1/8
    # giving an image "equal or larger than the requested size". A 1600x1200 JPEG whose
    # short side must become 100 needs >= 133x100: 1/8 gives 200x150 (>= the need), 1/16
    # does not exist.
    data = _photo(1600, 1200)
    t = ImageTransform(100, train=False, mean=MEAN, std=STD)
    size, drafted = _decoded_size(t, data, random.Random(0))
    assert size == (200, 150)
    full = ImageTransform(100, train=False, mean=MEAN, std=STD, draft=False)
    size_full, reference = _decoded_size(full, data, random.Random(0))
    assert size_full == (1600, 1200)
    assert drafted.shape == reference.shape == (3, 100, 100)
    # Quality holds: > 30 dB PSNR, the usual lower bound of good lossy image quality
    # (Wikipedia, "Peak signal-to-noise ratio": typical values 30-50 dB for 8-bit images).
    assert _psnr(drafted, reference) > 30


def test_train_crop_keeps_at_least_the_target_pixels_and_the_same_random_draws():
    data = _photo(1024, 768)
    t = ImageTransform(64, train=True, mean=MEAN, std=STD, scale=(0.5, 1.0))
    full = ImageTransform(64, train=True, mean=MEAN, std=STD, scale=(0.5, 1.0), draft=False)
    for seed in range(5):
        (w, h), drafted = _decoded_size(t, data, random.Random(seed))
        _, reference = _decoded_size(full, data, random.Random(seed))
        # JPEG draft scales are 1, 1/2, 1/4, 1/8 of the full size, rounded up (PIL docs)
        reduction = 1024 // w
        assert reduction in (2, 4, 8) and (w, h) == (-(-1024 // reduction), -(-768 // reduction))
        box = t.plan(1024, 768, random.Random(seed)).box
        # the crop region of the reduced image still has >= 64 pixels per side
        assert (box[2] - box[0]) / reduction >= 64 and (box[3] - box[1]) / reduction >= 64
        # same crop and flip as the full decode: the same picture
        assert _psnr(drafted, reference) > 30


def test_png_is_decoded_whole():
    # PIL docs: draft() only acts on JPEG (and PCD) files; a PNG decodes at full size.
    data = _photo(800, 600, "PNG")
    size, _ = _decoded_size(ImageTransform(50, False, MEAN, STD), data, random.Random(0))
    assert size == (800, 600)


def _claims_size(jpeg: bytes, width: int, height: int) -> bytes:
    """``jpeg`` with its frame header (SOF0, marker FFC0) claiming ``width`` x ``height``:
    ITU-T T.81 B.2.2: marker, 2-byte length, 1-byte precision, then height and width as
    16-bit big-endian numbers."""
    at = jpeg.index(b"\xff\xc0")
    return (jpeg[:at + 5] + height.to_bytes(2, "big") + width.to_bytes(2, "big")
            + jpeg[at + 9:])


@pytest.mark.parametrize("limit,side,reason", [
    # PIL's Image.MAX_IMAGE_PIXELS is 89,478,485 (docs: "int(1024 * 1024 * 1024 // 4 // 3)");
    # a header claiming 12,000 x 12,000 = 144M pixels is over it (and under PIL's own
    # error threshold of twice that, where PIL only warns).
    (None, 12000, "oversized_image"),
    (1000, 40, "oversized_image"),  # 1,600 pixels over a 1,000-pixel limit
    (1600, 40, None),               # exactly at the limit: kept
])
def test_pixel_limit_skips_and_counts_oversized_images(limit, side, reason):
    cfg = DataConfig() if limit is None else DataConfig(max_image_pixels=limit)
    assert cfg.max_image_pixels == Image.MAX_IMAGE_PIXELS or limit is not None
    jpeg = _photo(40, 40)
    if side != 40:
        jpeg = _claims_size(jpeg, side, side)
        with Image.open(io.BytesIO(jpeg)) as img:
            assert img.size == (side, side)  # the forged header is what PIL reads
    source = SourceConfig(name="s", urls="x.tar")
    t = ImageTransform(16, True, MEAN, STD, max_pixels=cfg.max_image_pixels)
    counter = SkipCounter()
    raw = {"__key__": "k", "__url__": "x.tar", "jpg": jpeg, "txt": b"a caption"}
    sample = decode_sample(raw, source, t, random.Random(0), counter)
    skips = {name: n for kind, _, name, n in counter.drain() if kind == "skip"}
    if reason is None:
        assert sample is not None and skips == {}
    else:
        assert sample is None and skips == {reason: 1}


def test_max_image_pixels_is_validated():
    with pytest.raises(ValueError, match="data.max_image_pixels"):
        DataConfig(max_image_pixels=0)


def test_a_worker_out_of_memory_is_not_counted_as_an_undecodable_image(monkeypatch):
    """A MemoryError while decoding is the worker's memory, not the sample's bytes: it was
    counted ``undecodable_image`` and the next samples skipped alike until
    max_skipped_in_a_row ended the run naming the data. Other decode errors still skip."""
    source = SourceConfig(name="s", urls="x.tar")
    t = ImageTransform(16, True, MEAN, STD)
    raw = {"__key__": "k", "__url__": "x.tar", "jpg": _photo(40, 40), "txt": b"a caption"}

    def fails(error):
        def decode(data, rng):
            raise error
        return decode

    monkeypatch.setattr(t, "decode", fails(MemoryError()))
    with pytest.raises(MemoryError):
        decode_sample(raw, source, t, random.Random(0), SkipCounter())
    monkeypatch.setattr(t, "decode", fails(OSError("broken data stream")))
    counter = SkipCounter()
    assert decode_sample(raw, source, t, random.Random(0), counter) is None
    assert {name: n for kind, _, name, n in counter.drain() if kind == "skip"} == {
        "undecodable_image": 1}
