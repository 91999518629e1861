"""UperNet decode head (Xiao et al., 2018): a pyramid pooling module on the last stage plus
an FPN over all stages, fused at stride 4 and classified per pixel.

Written from the paper's description: PPM pools the stride-32 map to 1/2/3/6 bins,
projects each, upsamples and concatenates with the map; lateral 1x1 convs + top-down
addition + 3x3 convs form the FPN; all levels are upsampled to stride 4, concatenated
and fused by a 3x3 conv before the 1x1 classifier.

The released InternImage UperNet recipes also train an auxiliary FCN head (one 3x3 conv of
256 channels, dropout 0.1, classifier) on the stride-16 stage with loss weight 0.4; it is
used in training only (``aux_weight`` > 0).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from finetune.datasets.base import IGNORE_INDEX


def pixel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor,
                        ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Per-pixel cross-entropy averaged over every pixel, ignored ones counting 0: mmseg
    0.x's ``CrossEntropyLoss`` as the released UperNet recipes train it
    (``avg_non_ignore=False``, its default: ``mmseg/models/losses/cross_entropy_loss.py``).
    torch's mean over the non-ignored pixels instead weighs an image by its share of
    labelled pixels and rescales the loss the gradient clip sees."""
    total = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    return total / labels.numel()


def conv_bn_relu(cin: int, cout: int, k: int) -> nn.Sequential:
    """Conv (no bias) -> BatchNorm -> ReLU, the unit every UperNet branch is made of, the
    conv initialised as mmcv's ``ConvModule`` does on construction (``kaiming_init``:
    normal, ``mode='fan_out'``, ReLU gain; the released heads are built of them)."""
    conv = nn.Conv2d(cin, cout, k, padding=k // 2, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return nn.Sequential(conv, nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def pixel_classifier(channels: int, num_classes: int) -> nn.Conv2d:
    """The 1x1 per-pixel classifier, initialised as mmseg 0.x's ``BaseDecodeHead.conv_seg``
    (``init_cfg=dict(type='Normal', std=0.01, override=dict(name='conv_seg'))``: weights
    N(0, 0.01), bias 0) rather than torch's default (uniform, std ~0.026 at 512 inputs,
    and a random bias per class)."""
    classifier = nn.Conv2d(channels, num_classes, 1)
    nn.init.normal_(classifier.weight, std=0.01)
    nn.init.zeros_(classifier.bias)
    return classifier


class PyramidPooling(nn.Module):
    """PPM: adaptive average pools at ``bins``, projected to ``channels``, upsampled back."""

    def __init__(self, in_channels: int, channels: int, bins: Sequence[int] = (1, 2, 3, 6)):
        super().__init__()
        self.stages = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(b), conv_bn_relu(in_channels, channels, 1))
            for b in bins)
        self.bottleneck = conv_bn_relu(in_channels + len(bins) * channels, channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        pooled = [F.interpolate(s(x), size, mode="bilinear", align_corners=False)
                  for s in self.stages]
        return self.bottleneck(torch.cat([x, *pooled], 1))


class UperNetHead(nn.Module):
    """Multi-level features (strides 4..32) -> per-pixel logits at stride 4."""

    def __init__(self, in_channels: Sequence[int], num_classes: int, channels: int = 512,
                 dropout: float = 0.1):
        super().__init__()
        self.ppm = PyramidPooling(in_channels[-1], channels)
        self.lateral = nn.ModuleList(conv_bn_relu(c, channels, 1) for c in in_channels[:-1])
        self.fpn_out = nn.ModuleList(conv_bn_relu(channels, channels, 3)
                                     for _ in in_channels[:-1])
        self.fuse = conv_bn_relu(len(in_channels) * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = pixel_classifier(channels, num_classes)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        laterals = [lat(f) for lat, f in zip(self.lateral, feats[:-1])]
        laterals.append(self.ppm(feats[-1]))
        for i in range(len(laterals) - 1, 0, -1):  # top-down pathway
            laterals[i - 1] = laterals[i - 1] + F.interpolate(
                laterals[i], laterals[i - 1].shape[-2:], mode="bilinear", align_corners=False)
        outs = [conv(x) for conv, x in zip(self.fpn_out, laterals[:-1])] + [laterals[-1]]
        size = outs[0].shape[-2:]
        outs = [outs[0]] + [F.interpolate(o, size, mode="bilinear", align_corners=False)
                            for o in outs[1:]]
        return self.classifier(self.dropout(self.fuse(torch.cat(outs, 1))))


class FCNAuxHead(nn.Module):
    """The auxiliary head: 3x3 conv-BN-ReLU, dropout, 1x1 classifier (training only)."""

    def __init__(self, in_channels: int, num_classes: int, channels: int = 256,
                 dropout: float = 0.1):
        super().__init__()
        self.conv = conv_bn_relu(in_channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = pixel_classifier(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.conv(x)))


class UperNetSegmentor(nn.Module):
    """InternImage trunk + UperNet head; ``forward`` returns logits at input resolution,
    ``loss`` the training loss (cross-entropy, plus ``aux_weight`` x the auxiliary head's).

    The trunk's stage maps are channels-last views; the head converts them once.
    """

    AUX_STAGE = 2  # stride 16, as the released recipes

    def __init__(self, trunk: nn.Module, num_classes: int, channels: int = 512,
                 aux_weight: float = 0.0, ignore_index: int = IGNORE_INDEX):
        super().__init__()
        self.backbone = trunk
        self.decode_head = UperNetHead(trunk.stage_channels, num_classes, channels)
        self.aux_weight = aux_weight
        self.auxiliary_head = (FCNAuxHead(trunk.stage_channels[self.AUX_STAGE], num_classes)
                               if aux_weight > 0 else None)
        self.ignore_index = ignore_index

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [f.contiguous() for f in self.backbone.forward_features(x)]

    def _upsample(self, logits: torch.Tensor, size) -> torch.Tensor:
        return F.interpolate(logits, size, mode="bilinear", align_corners=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._upsample(self.decode_head(self._features(x)), x.shape[-2:])

    def loss(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """``loss_ce`` of the decode head and, with the auxiliary head, ``loss_aux``
        (already weighted): the training loss is their sum."""
        feats = self._features(x)
        logits = self._upsample(self.decode_head(feats), x.shape[-2:])
        losses = {"loss_ce": pixel_cross_entropy(logits, labels, self.ignore_index)}
        if self.auxiliary_head is not None:
            aux = self._upsample(self.auxiliary_head(feats[self.AUX_STAGE]), x.shape[-2:])
            losses["loss_aux"] = self.aux_weight * pixel_cross_entropy(aux, labels,
                                                                       self.ignore_index)
        return losses
