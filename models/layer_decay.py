"""Layer ids of InternImage's parameters for layer-wise lr decay, by the released rules:
which layer each released key belongs to (runtime/param_groups.py builds the optimizer
groups from them; ``InternImageTimm.group_matcher`` hands the classification rule to
timm's optimizer factory). The two rules (``dense``: detection and segmentation;
``classification``) are described in runtime/param_groups.py's docstring.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

LAYER_RULES = ("dense", "classification")
_LEVEL_PART = re.compile(r"levels\.(\d+)\.([A-Za-z_]+)\.(\d+\.)?")


def layer_id(name: str, depths: Sequence[int], rule: str = "dense") -> int:
    """Layer id of trunk parameter ``name`` (released keys) under ``rule``
    (runtime/param_groups.py's docstring); ids run from 0 (dense) or 1 (classification)
    to :func:`num_layers`, the id of whatever the rule gives the full rate."""
    top = num_layers(depths, rule)
    first_block = [1 + sum(depths[:i]) for i in range(len(depths))]
    if name.startswith("patch_embed."):
        return 0 if rule == "dense" else first_block[0]
    m = _LEVEL_PART.match(name)
    if m is None:
        return top
    level, part, index = int(m.group(1)), m.group(2), m.group(3)
    last = len(depths) - 1
    if part in ("downsample", "norm"):
        if rule == "dense":
            return first_block[min(level + 1, last)]
        return first_block[level + 1] if level < last else top
    if part == "blocks" or (rule == "dense" and index is not None):
        return first_block[level] + int(index[:-1])
    return top


def num_layers(depths: Sequence[int], rule: str = "dense") -> int:
    """The layer id that trains at the full rate under ``rule``."""
    return sum(depths) + 1 if rule == "dense" else sum(depths)
