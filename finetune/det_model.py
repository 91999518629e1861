"""Detection models: Mask R-CNN (torchvision) on an InternImage + FPN backbone, or DINO
(finetune/heads/dino.py), built from the config with its ``--init`` checkpoint."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from finetune.det_config import DetectionConfig, DetectorConfig


class InternImageFPN(nn.Module):
    """torchvision-style backbone: InternImage stage maps -> FPN P2..P5 + max-pooled P6."""

    def __init__(self, trunk: nn.Module, out_channels: int):
        from torchvision.ops import FeaturePyramidNetwork
        from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

        super().__init__()
        self.body = trunk
        self.fpn = FeaturePyramidNetwork(list(trunk.stage_channels), out_channels,
                                         extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels  # what torchvision's heads read

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        feats = self.body.forward_features(x)
        return self.fpn(OrderedDict((str(i), f.contiguous()) for i, f in enumerate(feats)))


def build_detector(cfg: DetectionConfig, num_classes: int, init: str | None = None) -> nn.Module:
    """torchvision MaskRCNN (``num_classes`` + background) on InternImage + FPN.

    RPN proposals and RoIAlign follow mmdet's Mask R-CNN base (``detector``'s
    ``rpn_post_nms_train`` / ``roi_sampling_ratio``). Not expressible with torchvision:
    mmcv's RoIAlign ``aligned=True`` half-pixel offset (``MultiScaleRoIAlign`` calls
    ``roi_align`` with ``aligned=False``) and mmdet's L1 box losses (torchvision: smooth L1).
    """
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads
    from torchvision.ops import MultiScaleRoIAlign

    from finetune.backbone import build_trunk

    c = cfg.detector
    backbone = InternImageFPN(build_trunk(cfg.model, init), c.fpn_channels)
    anchors = AnchorGenerator(tuple((s,) for s in c.anchor_sizes), ((0.5, 1.0, 2.0),) * 5)
    levels = ["0", "1", "2", "3"]  # P2..P5 (InternImageFPN's names); P6 feeds the RPN only
    return MaskRCNN(
        backbone, min_size=tuple(c.train_sizes),
        max_size=c.max_size, rpn_anchor_generator=anchors,
        rpn_post_nms_top_n_train=c.rpn_post_nms_train,
        box_roi_pool=MultiScaleRoIAlign(levels, 7, c.roi_sampling_ratio),
        mask_roi_pool=MultiScaleRoIAlign(levels, 14, c.roi_sampling_ratio),
        rpn_batch_size_per_image=c.rpn_batch_per_image,
        box_batch_size_per_image=c.box_batch_per_image,
        box_detections_per_img=c.detections_per_image,
        box_head=TwoMLPHead(c.fpn_channels * 7 * 7, c.box_head_dim),
        mask_head=MaskRCNNHeads(c.fpn_channels, [c.mask_head_channels] * c.mask_head_layers, 1),
        **_predictors(c, num_classes + 1))


def build_model(cfg: DetectionConfig, num_classes: int, init: str | None = None) -> nn.Module:
    """``head.kind``'s detector for ``num_classes`` foreground classes (labels 1..C)."""
    if cfg.head.kind == "dino":
        from finetune.heads import build_dino

        return build_dino(cfg.model.name, num_classes, backbone_kwargs=cfg.model.build_kwargs(),
                          init=init, **cfg.head.dino_kwargs())
    return build_detector(cfg, num_classes, init)


def _predictors(c: DetectorConfig, num_classes: int) -> dict:
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
    from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor

    return {"box_predictor": FastRCNNPredictor(c.box_head_dim, num_classes),
            "mask_predictor": MaskRCNNPredictor(c.mask_head_channels, c.mask_head_channels,
                                                num_classes),
            "num_classes": None}
