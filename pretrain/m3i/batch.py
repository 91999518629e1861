"""One training batch of the image branch: views, mix, target positions, targets.

Image A of mix i is sample i, image B is sample ``partner[i] = (i + 1) mod B`` of the same
rank's batch, so every image is once A and once B. The input is view 1 of A mixed with
view 1 of B; A's targets are the target encoder's features of its view 1 (intra-view,
mask tokens on the input's own grid), B's those of its view 2 (cross-view, mask tokens
where view 2's patches fall in view 1's patch coordinates).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pretrain.m3i.mixing import mix_masks, mix_views
from pretrain.m3i.pos_embed import grid_positions, relative_positions
from pretrain.m3i.views import two_views


@dataclass
class MixedBatch:
    """What the online model and the loss take on mixed inputs."""

    images: torch.Tensor  # (B, 3, S, S) mixed inputs
    mix_mask: torch.Tensor  # (B, h, w) True: image B's patch
    positions_a: torch.Tensor  # (B, h*w, 2) image A's target positions (input patch units)
    positions_b: torch.Tensor  # (B, h*w, 2) image B's
    partner: torch.Tensor  # (B,) sample index of image B
    targets: torch.Tensor  # (2B, h*w, C) target features: A's rows, then B's


def mix_batch(images: torch.Tensor, target_encoder, mix_share: float,
              view_scale: tuple[float, float], view_flip: float) -> MixedBatch:
    """Draw two views per image, encode them with ``target_encoder`` (no gradient; its
    map fixes the mixing grid) and mix view 1 of each image with its partner's."""
    b = images.shape[0]
    view1, view2, geom1, geom2 = two_views(images, tuple(view_scale), view_flip)
    targets = target_encoder(torch.cat([view1, view2]))  # (2B, C, h, w)
    h, w = targets.shape[-2:]
    partner = (torch.arange(b) + 1) % b
    mask = mix_masks(b, h, w, mix_share)
    mixed = mix_views(view1, view1[partner.to(view1.device)], mask)
    positions_a = grid_positions((h, w)).expand(b, -1, -1)
    positions_b = relative_positions(geom2.index(partner), geom1.index(partner), (h, w))
    features = targets.flatten(2).transpose(1, 2)
    targets = torch.cat([features[:b], features[b:][partner.to(features.device)]])
    return MixedBatch(mixed, mask, positions_a, positions_b, partner, targets)
