"""mmsegmentation's ``PhotoMetricDistortion``, the colour augmentation of every released
InternImage segmentation recipe, on a float (3, H, W) RGB tensor in [0, 255].

Each step fires with probability 1/2, in mmseg's order: brightness (add a value in
[-32, 32]); contrast (multiply by [0.5, 1.5]) either first or last, by a coin flip;
saturation (x [0.5, 1.5]); hue (shift by up to 18 of OpenCV's 180 hue steps, i.e. 0.1 of
the circle). Values are clipped to [0, 255] after every step, as mmseg's uint8 arithmetic
does. Saturation uses torchvision's blend with the grey image rather than scaling the HSV
S channel: the same direction and range, not bit-identical.
"""

from __future__ import annotations

import random

import torch
from torchvision.transforms.v2 import functional as TF

BRIGHTNESS_DELTA = 32.0
CONTRAST_RANGE = (0.5, 1.5)
SATURATION_RANGE = (0.5, 1.5)
HUE_DELTA = 18 / 180  # fraction of the hue circle


def photometric_distortion(img: torch.Tensor, rng: random.Random | None = None) -> torch.Tensor:
    """Randomly distorted copy of ``img`` (float (3, H, W), values 0..255)."""
    rng = rng or random
    out = img.clone()

    def coin() -> bool:
        return rng.random() < 0.5

    def contrast(x: torch.Tensor) -> torch.Tensor:
        return (x * rng.uniform(*CONTRAST_RANGE)).clamp(0, 255) if coin() else x

    if coin():
        out = (out + rng.uniform(-BRIGHTNESS_DELTA, BRIGHTNESS_DELTA)).clamp(0, 255)
    contrast_first = coin()
    if contrast_first:
        out = contrast(out)
    if coin():
        out = TF.adjust_saturation(out / 255, rng.uniform(*SATURATION_RANGE)).clamp(0, 1) * 255
    if coin():
        out = TF.adjust_hue(out / 255, rng.uniform(-HUE_DELTA, HUE_DELTA)).clamp(0, 1) * 255
    if not contrast_first:
        out = contrast(out)
    return out
