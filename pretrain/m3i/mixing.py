"""Block-wise mixing of two images' views at the backbone's patch grid.

M3I mixes "two views from different images as the inputs" without publishing the layout;
we take BEiT's block-wise masking (rectangles of random area and aspect ratio, placed until
the share is reached) on the grid of the map the decoder reads (stride 32 for T..XL, 16
for InternImage-H's fused map). Each patch then shows one image whole, so the CNN sees
real image content per patch and no sparse convolution is needed. The mask travels with
the batch: True where a patch shows the *second* image (B), False for the first (A).
"""

from __future__ import annotations

import math

import torch


def block_mask(height: int, width: int, share: float, min_block: int = 1,
               aspect: tuple[float, float] = (0.3, 1 / 0.3)) -> torch.Tensor:
    """(height, width) bool mask with about ``share`` of the patches True, in rectangles
    (BEiT's block-wise masking: area uniform in [min_block, patches still to mask], aspect
    ratio log-uniform in ``aspect``). Both images always keep at least one patch."""
    total = height * width
    if total < 2:
        raise ValueError(f"a {height}x{width} patch grid cannot show two images: use a "
                         f"larger data.image_size (>= 2 patches of the backbone's stride)")
    target = min(max(round(share * total), 1), total - 1)
    mask = torch.zeros(height, width, dtype=torch.bool)
    for _ in range(100 * total):  # bounded: the last patches are placed one by one
        left = target - int(mask.sum())
        if left <= 0:
            break
        area = float(torch.empty(()).uniform_(min(min_block, left), left))
        log_aspect = float(torch.empty(()).uniform_(math.log(aspect[0]), math.log(aspect[1])))
        h = min(max(round(math.sqrt(area * math.exp(log_aspect))), 1), height)
        w = min(max(round(math.sqrt(area / math.exp(log_aspect))), 1), width)
        top = int(torch.randint(0, height - h + 1, ()))
        lft = int(torch.randint(0, width - w + 1, ()))
        block = mask[top:top + h, lft:lft + w]
        new = int((~block).sum())
        if 0 < new <= left:  # never overshoot the share (BEiT's rule)
            block.fill_(True)
    # rectangles that never fit exactly: fill single free patches
    free = (~mask).flatten().nonzero().flatten()
    left = target - int(mask.sum())
    if left > 0:
        pick = free[torch.randperm(free.numel())[:left]]
        mask.view(-1)[pick] = True
    return mask


def mix_masks(batch: int, height: int, width: int, share: float) -> torch.Tensor:
    """(batch, height, width) independent block-wise masks (True: the second image)."""
    return torch.stack([block_mask(height, width, share) for _ in range(batch)])


def mix_views(first: torch.Tensor, second: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Pixels of ``second`` where the patch mask is True, else ``first``; the mask's grid
    divides the images evenly (patch = image size / grid size)."""
    _, _, h, w = first.shape
    gh, gw = mask.shape[-2:]
    if h % gh or w % gw:
        raise ValueError(f"a {gh}x{gw} mixing grid does not divide {h}x{w} images")
    pixels = mask.to(first.device)[:, None].repeat_interleave(h // gh, 2)
    pixels = pixels.repeat_interleave(w // gw, 3)
    return torch.where(pixels, second, first)
