"""Heads of the paper's headline systems, built on kept libraries (transformers).

``build_mask2former``: Mask2Former semantic segmentation (ADE20K, Cityscapes) on an
InternImage backbone; ``multiscale_flip_scores``: the paper's multi-scale + flip protocol.
Nothing outside finetune/ imports this package (models/ stays free of transformers).
"""

from finetune.heads.dino import DinoDetector, build_dino
from finetune.heads.mask2former import Mask2FormerSegmenter, build_mask2former
from finetune.heads.seg_inference import multiscale_flip_scores

__all__ = ["Mask2FormerSegmenter", "build_mask2former", "multiscale_flip_scores"]
__all__ += ["DinoDetector", "build_dino"]
