"""Where target-view patches sit, seen from an input view, and their position embeddings.

M3I: "position embeddings are computed with respect to the left top origin of the input
views" (the scheme of Siamese Image Modeling, Tao et al. 2022). A patch of the target view
covers some region of the source image; we express its centre in the input view's own
patch coordinates (row, column; the input view's patch (i, j) sits at exactly (i, j)),
following the input view's crop and flip. Patches of the same view land on the integer
grid (intra-view); another view's patches land wherever that view overlaps, or outside
(cross-view). The embedding is MAE's fixed 2-D sine-cosine one evaluated at these
(fractional) coordinates.
"""

from __future__ import annotations

import torch

from pretrain.m3i.views import ViewGeometry


def patch_centres(geometry: ViewGeometry, grid: tuple[int, int]) -> torch.Tensor:
    """(B, gh*gw, 2) source-image (x, y) of each view patch's centre, row-major over the
    view's grid as the network sees it (a flipped view's first column is the box's right)."""
    gh, gw = grid
    boxes = geometry.boxes.float()
    fy = (torch.arange(gh, dtype=torch.float32) + 0.5) / gh
    fx = (torch.arange(gw, dtype=torch.float32) + 0.5) / gw
    fy, fx = torch.meshgrid(fy, fx, indexing="ij")
    fx, fy = fx.flatten()[None], fy.flatten()[None]
    fx = torch.where(geometry.flipped[:, None], 1 - fx, fx)
    x = boxes[:, :1] + fx * (boxes[:, 2:3] - boxes[:, :1])
    y = boxes[:, 1:2] + fy * (boxes[:, 3:4] - boxes[:, 1:2])
    return torch.stack([x, y], dim=-1)


def relative_positions(target: ViewGeometry, source: ViewGeometry,
                       grid: tuple[int, int]) -> torch.Tensor:
    """(B, gh*gw, 2) (row, column) of each ``target``-view patch centre in the patch
    coordinates of the input view ``source`` (origin: its top-left patch; its flip
    followed). Both views are seen on the same ``grid``."""
    gh, gw = grid
    centres = patch_centres(target, grid)
    boxes = source.boxes.float()[:, None]
    u = (centres[..., 0] - boxes[..., 0]) / (boxes[..., 2] - boxes[..., 0])
    v = (centres[..., 1] - boxes[..., 1]) / (boxes[..., 3] - boxes[..., 1])
    u = torch.where(source.flipped[:, None], 1 - u, u)
    return torch.stack([v * gh - 0.5, u * gw - 0.5], dim=-1)


def sincos_embed(positions: torch.Tensor, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """(..., dim) sine-cosine embedding of (..., 2) (row, column) positions: the first
    half encodes the row, the second the column, each as [sin(p w_k), cos(p w_k)] with
    w_k = 1 / temperature^(k / (dim/4)) (MAE's get_2d_sincos_pos_embed, at real positions)."""
    if dim % 4:
        raise ValueError(f"position embedding width must be divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    parts = []
    for axis in (0, 1):
        angle = positions[..., axis:axis + 1].float() * omega
        parts += [angle.sin(), angle.cos()]
    return torch.cat(parts, dim=-1)


def grid_positions(grid: tuple[int, int]) -> torch.Tensor:
    """(gh*gw, 2) integer (row, column) of a view's own patches, row-major."""
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    return torch.stack([rows.flatten(), cols.flatten()], dim=-1).float()
