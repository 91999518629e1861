"""Mask2Former semantic segmentation on an InternImage backbone (transformers' model).

transformers' ``Mask2FormerForUniversalSegmentation`` supplies the pixel decoder
(multi-scale deformable attention), the masked-attention transformer decoder, the
Hungarian-matched loss with point sampling and the auxiliary losses; its backbone is our
timm feature extractor through ``InternImageBackbone``. This file adds only what the
fine-tuning loops need around it:

- ``loss(images, label_maps)``: (B, H, W) class-id maps with an ignore index become the
  per-image binary masks + class ids Mask2Former trains on (one mask per present class,
  the semantic-segmentation recipe of the Mask2Former paper).
- ``forward(images)`` / ``semantic_scores``: (B, C, H, W) per-class scores at input size
  (softmax class probabilities x sigmoid masks, summed over queries at the masks' 1/4
  resolution, then resized, as released), so the existing sliding-window / whole-image
  evaluators use this head unchanged.
- ``build_mask2former`` swaps two transformers parts for the release's behaviour: the
  loss normaliser (target masks averaged over all ranks, ``RankMeanMask2FormerLoss``) and
  the sine position embeddings (computed in float32, ``SinePositionEmbedding``).
- ``predict_semantic(images, scales=..., flip=...)``: class ids, single- or multi-scale.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation
from transformers.models.mask2former.modeling_mask2former import Mask2FormerLoss

from finetune.datasets.base import IGNORE_INDEX
from finetune.heads.common import SinePositionEmbedding, rank_mean
from finetune.heads.hf_backbone import backbone_config
from finetune.heads.seg_inference import multiscale_flip_scores
from models.intern_image import InternImage
from ops.dcnv3 import DCNv3

ARCH_KEYS = ("channels", "depths", "groups")


def semantic_targets(label_maps: torch.Tensor, num_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> tuple[list[torch.Tensor],
                                                               list[torch.Tensor]]:
    """Per image: binary masks (K, H, W) float and class ids (K,) of the classes present.

    Ignored pixels belong to no mask. A label outside ``[0, num_classes)`` that is not the
    ignore index means a wrong class mapping upstream, so it raises instead of training on it.
    """
    mask_labels, class_labels = [], []
    for labels in label_maps:
        classes = labels.unique()
        classes = classes[classes != ignore_index]
        if classes.numel() and (classes.min() < 0 or classes.max() >= num_classes):
            raise ValueError(f"label map holds ids {classes.tolist()} outside [0, {num_classes}) "
                             f"and not the ignore index {ignore_index}")
        mask_labels.append((labels[None] == classes[:, None, None]).float())
        class_labels.append(classes.long())
    return mask_labels, class_labels


class RankMeanMask2FormerLoss(Mask2FormerLoss):
    """transformers' Mask2Former loss with the released normaliser of the mask and dice
    terms: the number of target masks averaged over all ranks, at least 1.

    The released head (OpenGVLab/InternImage segmentation/mmseg_custom/models/decode_heads/
    mask2former_head.py, ``loss_single``) divides the summed dice loss by
    ``num_total_masks = max(reduce_mean(num_total_pos), 1)`` and the summed point BCE by
    that times the number of points. transformers averages over ranks only through
    ``accelerate``'s state, which these runs do not set up, so each rank divided by its own
    count: a rank with fewer masks weighted each of them more. The class term is unchanged:
    both are the per-rank weighted mean cross-entropy (no-object weight ``no_object_weight``),
    ``sum(w * ce) / sum(w)`` over the rank's queries (mmdet's ``avg_factor =
    class_weight[labels].sum()`` is torch's weighted mean).
    """

    def get_num_masks(self, class_labels: list[torch.Tensor], device: torch.device) -> float:
        """Target masks of this rank's batch, averaged over the ranks (at least 1)."""
        return rank_mean(sum(len(classes) for classes in class_labels))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # the class weights (``empty_weight``: 1 per class, ``no_object_weight`` last) are
        # this run's config, not learned; a loaded one (a resume through DeepSpeed's
        # load_state_dict, a whole-segmenter init) replaced a changed head.no_object_weight
        # without a word. The key stays (checkpoints hold it: strict loads need it).
        key = prefix + "empty_weight"
        if key in state_dict:
            state_dict[key] = self.empty_weight.detach().clone()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class Mask2FormerSegmenter(nn.Module):
    """Training/inference interface around a transformers Mask2Former (see module doc)."""

    def __init__(self, model: Mask2FormerForUniversalSegmentation,
                 ignore_index: int = IGNORE_INDEX):
        super().__init__()
        self.model = model
        self.num_classes = model.config.num_labels
        self.ignore_index = ignore_index

    @property
    def backbone(self) -> InternImage:
        """The InternImage trunk (released-checkpoint parameter names) for --init and lr groups."""
        return self.model.model.pixel_level_module.encoder.internimage

    def loss(self, images: torch.Tensor, label_maps: torch.Tensor) -> torch.Tensor:
        """Mask2Former's weighted loss (class CE + mask BCE + dice, with auxiliary layers).

        ``images``: normalised (B, 3, H, W); ``label_maps``: (B, H, W) ids, ignore index.
        """
        mask_labels, class_labels = semantic_targets(label_maps, self.num_classes,
                                                     self.ignore_index)
        out = self.model(pixel_values=images, mask_labels=mask_labels, class_labels=class_labels)
        return out.loss

    def semantic_scores(self, images: torch.Tensor) -> torch.Tensor:
        """(B, num_classes, H, W) class scores at the input size (one forward pass).

        As released (OpenGVLab/InternImage segmentation/mmseg_custom/models/decode_heads/
        mask2former_head.py ``forward_test`` and segmentors/encoder_decoder_mask2former.py
        ``encode_decode``): the per-class scores are formed at the mask predictions' 1/4
        resolution (sigmoid of the mask logits there), then the C-channel map is resized
        bilinearly (``align_corners=False``) to the input size. Resizing the Q mask logits
        first would change the scores (the sigmoid does not commute with interpolation)
        and hold Q full-size maps.
        """
        out = self.model(pixel_values=images)
        # The last class of Mask2Former's classifier is "no object"; it votes for nothing.
        class_probs = out.class_queries_logits.softmax(-1)[..., :-1]
        scores = torch.einsum("bqc,bqhw->bchw", class_probs, out.masks_queries_logits.sigmoid())
        return F.interpolate(scores, size=images.shape[-2:], mode="bilinear",
                             align_corners=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Same as ``semantic_scores``: lets logits-based evaluators use this head."""
        return self.semantic_scores(images)

    @torch.no_grad()
    def predict_semantic(self, images: torch.Tensor, scales: Sequence[float] | None = None,
                         flip: bool = False) -> torch.Tensor:
        """(B, H, W) class ids. ``scales``/``flip``: the multi-scale + flip protocol."""
        if scales is None and not flip:
            return self.semantic_scores(images).argmax(1)
        scores = multiscale_flip_scores(self.semantic_scores, images,
                                        scales=scales or (1.0,), flip=flip)
        return scores.argmax(1)


def reset_backbone_init(backbone: InternImage) -> None:
    """Give the trunk InternImage's own initialisation back.

    transformers' ``post_init`` re-initialises every submodule with its generic scheme
    (e.g. N(0, 0.02) BatchNorm weights, non-zero DCN offsets); a trunk trained from
    scratch should start as InternImage does.
    """
    for module in backbone.modules():
        if not isinstance(module, DCNv3) and hasattr(module, "reset_parameters"):
            module.reset_parameters()
    backbone.apply(InternImage._init_weights)
    for module in backbone.modules():
        if isinstance(module, DCNv3):
            module.reset_parameters()


def build_mask2former(backbone: str, num_classes: int, *,
                      backbone_kwargs: dict | None = None, init: str | None = None,
                      ignore_index: int = IGNORE_INDEX, **head_cfg) -> Mask2FormerSegmenter:
    """Mask2Former on InternImage ``backbone`` (a variant or released name).

    ``backbone_kwargs``: architecture overrides for the trunk (``channels``, ``depths``,
    ``groups``, ``drop_path_rate``, ``with_cp``, ``dcn_backend``), e.g.
    ``BackboneConfig.build_kwargs()``. ``init``: a classification checkpoint (or converted
    pre-training run) loaded into the trunk with ``finetune.init.load_init``.
    ``head_cfg``: ``Mask2FormerConfig`` fields (``num_queries``, ``hidden_dim``,
    ``decoder_layers``, ``train_num_points``, ...); its defaults are the paper's
    (100 queries, 256 dims, 9 decoder layers + 1, 6 pixel-decoder layers).
    """
    backbone_kwargs = dict(backbone_kwargs or {})
    config = Mask2FormerConfig(backbone_config=backbone_config(backbone, **backbone_kwargs),
                               num_labels=num_classes, ignore_value=ignore_index, **head_cfg)
    model = Mask2FormerForUniversalSegmentation(config)
    # mask/dice normaliser over all ranks, as released (see RankMeanMask2FormerLoss); its
    # only state is the class-weight buffer, rebuilt here with the same name and values
    model.criterion = RankMeanMask2FormerLoss(config, weight_dict=model.weight_dict)
    # position embeddings in float32 whatever the features' dtype (bf16 runs collided
    # neighbouring positions); same formula as transformers' Mask2Former one (mmdet's,
    # offset 0), no parameters
    model.model.pixel_level_module.decoder.position_embedding = SinePositionEmbedding(
        config.feature_size // 2)
    model.model.transformer_module.position_embedder = SinePositionEmbedding(
        config.hidden_dim // 2)
    segmenter = Mask2FormerSegmenter(model, ignore_index)
    reset_backbone_init(segmenter.backbone)
    if init:
        from finetune.init import load_init
        from models import resolve_variant

        arch = {k: backbone_kwargs[k] for k in ARCH_KEYS if backbone_kwargs.get(k) is not None}
        load_init(segmenter.backbone, init, variant=resolve_variant(backbone), arch=arch,
                  backbone_only=True)
    return segmenter
