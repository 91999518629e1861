"""DINO object detection on an InternImage backbone, on transformers' Deformable DETR parts.

DINO (Zhang et al., 2022) is Deformable DETR (two-stage, iterative box refinement) plus
three changes. What is kept from libraries and what is written here:

- Kept (transformers ``DeformableDetrModel``): the backbone wrapper (our timm features
  model through ``InternImageBackbone``), input projections + extra stride-2 level,
  the 6-layer multi-scale deformable encoder, encoder proposal
  generation, and the decoder layers (self-attention, deformable cross-attention, FFN).
  Kept (transformers' losses): the focal-cost Hungarian matcher (scipy
  ``linear_sum_assignment``), the focal / L1 / GIoU losses, RT-DETR's contrastive
  denoising group builder and its denoising match indices.
- Written here, because transformers' Deformable DETR lacks them:
  * the feature maps' sine position embedding as mmdet's (``finetune/heads/common.py``
    ``SinePositionEmbedding``: no 0.5 offset, float32 under bf16);
  * contrastive denoising (CDN): noised ground-truth queries (positives inside the box-noise
    band, negatives outside it, labels flipped at ``label_noise_ratio / 2``) in dynamic
    groups, concatenated before the matching queries; the self-attention mask keeps the
    matching queries from seeing any denoising query and each group from seeing the
    others; positives reconstruct their box/class, negatives are trained as "no object";
    the slots padding an image with fewer boxes than the batch's most get zero content and
    the reference box (0.5, 0.5, 0.5, 0.5), as released (``_denoising``);
  * mixed query selection: reference boxes = top-k encoder proposals (by max class logit,
    detached); content queries = a learned embedding (not the selected encoder features);
  * look-forward-twice: layer i's box prediction is ``sigmoid(delta_i + logit(b_{i-1}))``
    with ``b_{i-1}`` the *undetached* refined box of layer i-1, so layer i's loss also
    reaches layer i-1's box head; the box fed to layer i for sampling stays detached;
    ``logit`` clamps at the release's eps 1e-3 (``LOGIT_EPS``), not mmdet's default 1e-5;
  * DINO's per-layer positional query: an MLP of the sine embedding of the current box
    (transformers' embedding, coordinates reordered to DINO's y, x, w, h) and a final decoder
    LayerNorm;
  * the released head's class/box branches (OpenGVLab/InternImage
    detection/mmdet_custom/models/dense_heads/deformable_detr_head.py with dino_head.py,
    ``with_box_refine=True, as_two_stage=True``): one class branch (Linear) and one box
    branch (3-layer MLP) per decoder layer plus one more, the last, for the encoder's
    proposals (``class_embed[i]`` / ``bbox_embed[i]``, ``i = decoder_layers``: the
    encoder's). Decoder layer i refines its reference boxes with ``bbox_embed[i]`` and
    predicts with ``class_embed[i]`` / ``bbox_embed[i]``. Initialised as released: the
    branches are copies of one (identical at the start), class biases at the focal prior
    0.01, each box branch's last layer all zero. Checkpoints of the earlier layout (one
    class/box head shared across the decoder layers) cannot be resumed (finetune/detection.py
    refuses them by name).

Input/output follow torchvision's detection convention, so the detection entrypoint can use
this head like its Mask R-CNN: ``model(images, targets)`` in training returns a dict of
loss terms, ``model(images)`` in eval returns one dict per image with ``boxes`` (absolute
xyxy), ``scores`` and ``labels`` (1..num_classes; 0 is background). Resizing,
normalisation and padding are torchvision's ``GeneralizedRCNNTransform`` (``model.transform``,
whose ``min_size`` the entrypoint switches between train and test sizes).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import box_convert, clip_boxes_to_image
from transformers import DeformableDetrConfig
from transformers.loss.loss_deformable_detr import (
    DeformableDetrHungarianMatcher,
    DeformableDetrImageLoss,
)
from transformers.models.deformable_detr.modeling_deformable_detr import (
    DeformableDetrMLPPredictionHead,
    DeformableDetrModel,
    inverse_sigmoid,
)
from transformers.models.rt_detr.modeling_rt_detr import get_contrastive_denoising_training_group

from finetune.heads.common import SinePositionEmbedding
from finetune.heads.dino_criterion import dino_losses
from finetune.heads.hf_backbone import backbone_config
from finetune.heads.mask2former import ARCH_KEYS, reset_backbone_init
from models.constants import IMAGENET_MEAN, IMAGENET_STD
from models.intern_image import InternImage

# Model/loss settings ``build_dino`` accepts in ``**cfg``, with DINO's defaults (DINO-4scale,
# the setting of the public InternImage DINO configs; the H preset overrides what differs).
DEFAULTS: dict = {
    "num_queries": 900,            # top-k encoder proposals = matching queries
    "d_model": 256,
    "encoder_layers": 6,
    "decoder_layers": 6,
    "num_heads": 8,
    "ffn_dim": 2048,
    "n_points": 4,                 # deformable sampling points per head and level
    "num_feature_levels": 4,       # backbone out_indices levels + extra stride-2 levels
    "out_indices": (1, 2, 3),      # strides 8/16/32 (+ one extra level: 64) = "4-scale"
    "dropout": 0.0,
    "pos_temperature": 20,         # sine position embedding of the feature maps
    "num_dn_queries": 100,         # CDN budget: groups = num_dn_queries // max #boxes per image
    "label_noise_ratio": 0.5,
    "box_noise_scale": 1.0,
    "focal_alpha": 0.25,
    "cost_class": 2.0, "cost_bbox": 5.0, "cost_giou": 2.0,      # matcher
    "weight_class": 1.0, "weight_bbox": 5.0, "weight_giou": 2.0,  # loss
    "num_select": 300,             # detections kept per image (top-k over queries x classes)
    "train_sizes": (800,),         # shorter side, one drawn per image (torchvision transform)
    "test_size": 800,
    "max_size": 1333,
    "size_divisible": 32,
    "label_offset": 1,             # torchvision convention: dataset labels 1..C, 0 = background
}

# The logit clamp of every inverse_sigmoid on the released DINO path (OpenGVLab/InternImage
# detection/mmdet_custom/): the decoder's box refinement (models/utils/transformer.py,
# DinoTransformerDecoder.forward), the head's per-layer box prediction
# (models/dense_heads/dino_head.py, DINOHead.forward) and the denoising boxes
# (models/utils/query_denoising.py, DnQueryGenerator.forward) all pass eps=1e-3, where
# mmdet's (and transformers') inverse_sigmoid defaults to 1e-5: a box coordinate below
# 1e-3 (or above 1 - 1e-3) enters the next logit as 1e-3 (1 - 1e-3).
LOGIT_EPS = 1e-3


def _logit(boxes: torch.Tensor) -> torch.Tensor:
    """The released DINO's ``inverse_sigmoid(boxes, eps=1e-3)`` (``LOGIT_EPS``)."""
    return inverse_sigmoid(boxes, eps=LOGIT_EPS)


# The head settings its parameter shapes depend on, and the layout they are laid out in:
# both enter a DINO run's model hash (finetune/detection.py), so a resume under other
# shapes, or of a checkpoint of an earlier layout, is refused before any compute. Change
# HEAD_LAYOUT whenever the head's parameters change name or shape. "per-layer-branches":
# a class/box branch per decoder layer + the encoder's, one CDN row per class (earlier,
# unnamed: one class/box head shared by the decoder layers and a CDN padding row).
SHAPE_KEYS = ("num_queries", "d_model", "encoder_layers", "decoder_layers", "num_heads",
              "ffn_dim", "n_points", "num_feature_levels", "out_indices")
HEAD_LAYOUT = "per-layer-branches"


def _branches(d: int, num_classes: int, count: int) -> tuple[nn.ModuleList, nn.ModuleList]:
    """``count`` class branches (Linear) and box branches (3-layer MLP), initialised as the
    released DINO head's (OpenGVLab/InternImage detection/mmdet_custom/models/dense_heads/
    deformable_detr_head.py, ``_init_layers`` / ``init_weights``, ``with_box_refine`` and
    ``as_two_stage``): deep copies of one branch each (so they start identical), every
    class bias at the focal-loss prior ``bias_init_with_prob(0.01)``, every box branch's
    last Linear at zero weight and bias (the release's -2.0 width/height bias of branch 0
    is reset to 0 in the two-stage case)."""
    cls = nn.Linear(d, num_classes)
    box = DeformableDetrMLPPredictionHead(d, d, 4, 3)
    nn.init.constant_(cls.bias, -math.log((1 - 0.01) / 0.01))
    nn.init.zeros_(box.layers[-1].weight)
    nn.init.zeros_(box.layers[-1].bias)
    return (nn.ModuleList(copy.deepcopy(cls) for _ in range(count)),
            nn.ModuleList(copy.deepcopy(box) for _ in range(count)))


class DinoDetector(nn.Module):
    """DINO (see module doc) with a torchvision-style detection interface."""

    def __init__(self, config: DeformableDetrConfig, num_classes: int, cfg: dict):
        super().__init__()
        self.cfg = cfg
        self.num_classes = num_classes
        self.num_queries = cfg["num_queries"]
        self.label_offset = cfg["label_offset"]
        d = config.d_model
        self.detr = DeformableDetrModel(config)
        # DINO replaces Deformable DETR's one-off proposal -> query projection by a per-layer
        # positional query (ref_point_head); the unused layers would idle under DDP.
        del self.detr.pos_trans, self.detr.pos_trans_norm
        # mmdet's SinePositionalEncoding(num_feats=d/2, temperature=20, normalize=True) of
        # the released DINO configs (offset 0; transformers' Deformable DETR one subtracts
        # 0.5), in float32 whatever the features' dtype; it holds no parameters
        self.detr.position_embedding = SinePositionEmbedding(
            d // 2, temperature=cfg["pos_temperature"])

        self.query_content = nn.Embedding(self.num_queries, d)          # mixed query selection
        # CDN content: one row per class, as the release's label_embedding (cls_out_channels
        # rows under the sigmoid focal loss); padding queries get zeros (_label_content)
        self.label_embed = nn.Embedding(num_classes, d)
        self.ref_point_head = DeformableDetrMLPPredictionHead(2 * d, d, d, 2)
        self.decoder_norm = nn.LayerNorm(d)
        self.class_embed, self.bbox_embed = _branches(d, num_classes, config.decoder_layers + 1)
        nn.init.normal_(self.query_content.weight)

        self.transform = GeneralizedRCNNTransform(
            tuple(cfg["train_sizes"]), cfg["max_size"], list(IMAGENET_MEAN), list(IMAGENET_STD),
            size_divisible=cfg["size_divisible"])
        self.matcher = DeformableDetrHungarianMatcher(
            class_cost=cfg["cost_class"], bbox_cost=cfg["cost_bbox"], giou_cost=cfg["cost_giou"])
        self.criterion = DeformableDetrImageLoss(self.matcher, num_classes, cfg["focal_alpha"],
                                                 losses=["labels", "boxes"])

    # ------------------------------------------------------------ structure
    @property
    def backbone(self) -> InternImage:
        """The InternImage trunk (released-checkpoint parameter names) for --init and lr groups."""
        return self.detr.backbone.model.model

    backbone_prefix = "detr.backbone.model.model."  # for runtime.param_groups.param_groups

    # ------------------------------------------------------------ encoder
    def _encode(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor) -> dict:
        """Backbone + projections + deformable encoder; flattened multi-scale memory."""
        m = self.detr
        features = m.backbone(pixel_values, pixel_mask)
        sources = [m.input_proj[i](f) for i, (f, _) in enumerate(features)]
        masks = [mask for _, mask in features]
        for level in range(len(sources), m.config.num_feature_levels):
            src = features[-1][0] if level == len(features) else sources[-1]
            sources.append(m.input_proj[level](src))
            masks.append(F.interpolate(pixel_mask[None].float(), size=sources[-1].shape[-2:])
                         .bool()[0])
        pos = [m.position_embedding(s.shape, s.device, s.dtype, mask=k)
               for s, k in zip(sources, masks)]
        shapes_list = [tuple(s.shape[-2:]) for s in sources]
        flat = torch.cat([s.flatten(2).transpose(1, 2) for s in sources], 1)
        mask_flat = torch.cat([k.flatten(1) for k in masks], 1)
        pos_flat = torch.cat([p.flatten(2).transpose(1, 2) + m.level_embed[i].view(1, 1, -1)
                              for i, p in enumerate(pos)], 1)
        shapes = torch.as_tensor(shapes_list, dtype=torch.long, device=flat.device)
        start = torch.cat((shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]))
        valid_ratios = torch.stack([m.get_valid_ratio(k, dtype=flat.dtype) for k in masks], 1)
        memory = m.encoder(inputs_embeds=flat, attention_mask=mask_flat,
                           spatial_position_embeddings=pos_flat, spatial_shapes=shapes,
                           spatial_shapes_list=shapes_list, level_start_index=start,
                           valid_ratios=valid_ratios).last_hidden_state
        return {"memory": memory, "mask": mask_flat, "shapes": shapes,
                "shapes_list": shapes_list, "start": start, "valid_ratios": valid_ratios}

    def _select_queries(self, enc: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Mixed query selection: (content, reference boxes, encoder outputs for the loss)."""
        memory = enc["memory"]
        if memory.shape[1] < self.num_queries:
            raise ValueError(f"num_queries={self.num_queries} exceeds the {memory.shape[1]} "
                             "encoder tokens of this input size; lower num_queries or use "
                             "larger images")
        tokens, proposals = self.detr.gen_encoder_output_proposals(memory, ~enc["mask"],
                                                                   enc["shapes_list"])
        # the last class/box branch is the encoder's (the release's cls_branches[num_layers])
        logits = self.class_embed[-1](tokens)
        coords = self.bbox_embed[-1](tokens) + proposals       # box logits (inf: invalid)
        # Padding / border proposals carry inf coordinates; never select them.
        scores = logits.max(-1).values.masked_fill(~proposals.isfinite().all(-1), float("-inf"))
        top = scores.topk(self.num_queries, dim=1).indices
        top_coords = coords.gather(1, top[..., None].expand(-1, -1, 4))
        enc_out = {"logits": logits.gather(1, top[..., None].expand(-1, -1, logits.shape[-1])),
                   "pred_boxes": top_coords.sigmoid()}
        reference = top_coords.detach().sigmoid()                # positional part: proposals
        content = self.query_content.weight[None].expand(memory.shape[0], -1, -1)  # learned
        return content, reference, enc_out

    # ------------------------------------------------------------ decoder
    def box_sine_embed(self, boxes: torch.Tensor) -> torch.Tensor:
        """(B, Q, 4) cxcywh boxes in [0, 1] -> (B, Q, 2 * d_model) sine embedding, the input
        of ``ref_point_head``: per coordinate ``d_model // 2`` interleaved sin/cos features
        of ``2 * pi * v`` (temperature 10000), coordinates in DINO's order (y, x, w, h)."""
        # transformers' get_proposal_pos_embed embeds (x, y, w, h) in that order, while DINO's
        # gen_sineembed_for_position puts y first: swapping cx/cy here gives DINO's layout, so
        # the first layer of a ref_point_head ported from DINO weights reads the right inputs.
        # It takes logits (it applies the sigmoid itself), hence the inverse_sigmoid: a round
        # trip, not one of the release's logits (DINO embeds the box itself), so it keeps
        # the default eps 1e-5, which moves no coordinate in [1e-5, 1 - 1e-5].
        return self.detr.get_proposal_pos_embed(inverse_sigmoid(boxes[..., [1, 0, 2, 3]]))

    def _decode(self, content: torch.Tensor, reference: torch.Tensor, enc: dict,
                self_attn_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoder with look-forward-twice; (L, B, Q, C) logits and (L, B, Q, 4) cxcywh boxes."""
        hidden, ref, prev_box = content, reference, reference
        ratios = torch.cat([enc["valid_ratios"], enc["valid_ratios"]], -1)[:, None]
        all_logits, all_boxes = [], []
        for i, layer in enumerate(self.detr.decoder.layers):
            ref_input = ref[:, :, None] * ratios
            query_pos = self.ref_point_head(self.box_sine_embed(ref_input[:, :, 0]))
            hidden = layer(hidden, query_pos, ref_input, enc["shapes"], enc["shapes_list"],
                           enc["start"], enc["memory"], enc["mask"], attention_mask=self_attn_mask)
            normed = self.decoder_norm(hidden)
            cls_branch, box_branch = self.class_embed[i], self.bbox_embed[i]
            all_logits.append(cls_branch(normed))
            # Look forward twice: prediction built on the previous layer's undetached box.
            all_boxes.append((box_branch(normed) + _logit(prev_box)).sigmoid())
            # layer i refines with its own box branch, on the un-normed output (the
            # release's DinoTransformerDecoder: reg_branches[lid](output))
            prev_box = (box_branch(hidden) + _logit(ref)).sigmoid()
            ref = prev_box.detach()  # sampling locations of the next layer: no gradient
        return torch.stack(all_logits), torch.stack(all_boxes)

    def _label_content(self, labels: torch.Tensor) -> torch.Tensor:
        """CDN content of (noised) class ``labels``; the builder's padding label
        ``num_classes`` (an image with fewer boxes than the batch's most) gets zeros, as
        the release's query generator leaves its padding queries (``padding_label`` in
        OpenGVLab/InternImage detection/mmdet_custom/models/utils/query_denoising.py)."""
        pad = labels >= self.num_classes
        content = self.label_embed(labels.masked_fill(pad, 0).long())
        return content.masked_fill(pad[..., None], 0.0)

    def _denoising(self, targets: list[dict]) -> tuple:
        """CDN queries (content, reference boxes), the (1, 1, T, T) additive attention mask,
        meta. The reference boxes are the release's (OpenGVLab/InternImage
        detection/mmdet_custom/models/utils/query_denoising.py, DnQueryGenerator.forward, and
        the ``reference_points.sigmoid()`` of models/utils/transformer.py DinoTransformer):
        ``sigmoid(inverse_sigmoid(noised box, eps=1e-3))`` for the slots of a ground-truth
        box, and ``sigmoid(0) = 0.5`` in every coordinate for the slots that pad an image with
        fewer boxes than the batch's most (its ``padding_bbox`` zeros are box *logits*)."""
        content, box_logits, attn, meta = get_contrastive_denoising_training_group(
            targets, self.num_classes, self.num_queries, self._label_content,
            num_denoising_queries=self.cfg["num_dn_queries"],
            label_noise_ratio=self.cfg["label_noise_ratio"],
            box_noise_scale=self.cfg["box_noise_scale"])
        if content is None:  # no boxes in the whole batch: nothing to denoise
            return None, None, None, None
        # RT-DETR's builder returns the noised boxes' logits at eps 1e-5 (the boxes themselves
        # when box_noise_scale is 0): back to boxes, then through the release's 1e-3 clamp
        # (clamping at 1e-5 first changes nothing that the 1e-3 clamp leaves)
        boxes = box_logits.sigmoid() if self.cfg["box_noise_scale"] > 0 else box_logits
        boxes = _logit(boxes).sigmoid()
        # its padding slots hold zero *boxes* (logit -11.5, a box of ~1e-5); the release's
        # hold zero logits
        counts = torch.tensor([len(t["class_labels"]) for t in targets], device=boxes.device)
        slot = torch.arange(boxes.shape[1], device=boxes.device) % counts.max()
        boxes = boxes.masked_fill((slot[None] >= counts[:, None])[..., None], 0.5)
        blocked = torch.isinf(attn)
        mask = torch.zeros(blocked.shape, dtype=content.dtype, device=content.device)
        mask = mask.masked_fill(blocked, torch.finfo(content.dtype).min)[None, None]
        return content, boxes, mask, meta

    # ------------------------------------------------------------ batches
    def _prepare(self, images, targets=None):
        """torchvision transform -> (pixels, pixel mask, image sizes, originals, DETR targets)."""
        if isinstance(images, torch.Tensor):
            images = list(images)
        originals = [tuple(img.shape[-2:]) for img in images]
        if targets is not None:  # only what the box loss needs; spares resizing masks
            targets = [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets]
        image_list, targets = self.transform(images, targets)
        pixels = image_list.tensors
        pixel_mask = torch.zeros(pixels.shape[0], *pixels.shape[-2:], dtype=torch.long,
                                 device=pixels.device)
        for i, (h, w) in enumerate(image_list.image_sizes):
            pixel_mask[i, :h, :w] = 1
        detr_targets = None
        if targets is not None:
            detr_targets = []
            for t, (h, w) in zip(targets, image_list.image_sizes):
                labels = t["labels"].long() - self.label_offset
                if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
                    raise ValueError(f"labels must lie in [{self.label_offset}, "
                                     f"{self.label_offset + self.num_classes}), got "
                                     f"{(labels + self.label_offset).unique().tolist()}")
                scale = torch.tensor([w, h, w, h], dtype=pixels.dtype, device=pixels.device)
                boxes = box_convert(t["boxes"].to(pixels.dtype) / scale, "xyxy", "cxcywh")
                detr_targets.append({"boxes": boxes, "class_labels": labels})
        return pixels, pixel_mask, image_list.image_sizes, originals, detr_targets

    # ------------------------------------------------------------ losses
    def loss(self, images, targets: Sequence[dict]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total DINO loss and its weighted terms.

        ``images``: list of (3, H, W) tensors in [0, 1] (or a batch tensor); ``targets``:
        dicts with ``boxes`` (absolute xyxy pixels) and ``labels`` (``label_offset``-based).
        Terms: the last decoder layer (``loss_ce``/``loss_bbox``/``loss_giou``), the other
        decoder layers (``loss_aux``), the encoder proposals (``loss_enc``) and the
        denoising queries of all layers (``loss_dn``); they sum to the total.
        """
        pixels, pixel_mask, _, _, tgts = self._prepare(list(images), list(targets))
        enc = self._encode(pixels, pixel_mask)
        content, reference, enc_out = self._select_queries(enc)
        dn_content, dn_boxes, attn_mask, meta = self._denoising(tgts)
        unused_dn = None
        if dn_content is not None:
            content = torch.cat([dn_content, content], 1)
            reference = torch.cat([dn_boxes, reference], 1)
        else:
            # No box here: the CDN builder never called label_embed, which another rank's
            # may have. ZeRO 1-3 reduce (and ZeRO-3 gathers) only the parameters each rank
            # used, so run the module at the same point and add exactly zero (see below).
            index = torch.zeros(1, dtype=torch.long, device=pixels.device)
            unused_dn = self.label_embed(index).sum() * 0.0
        logits, boxes = self._decode(content, reference, enc, attn_mask)
        num_dn = meta["dn_num_split"][0] if meta else 0
        total, losses = dino_losses(self.criterion, self.matcher, self.cfg, logits, boxes,
                                    num_dn, enc_out, meta, tgts, zero=pixels.new_zeros(()))
        if unused_dn is not None:  # into the terms too: the training loop sums those
            losses["loss_dn"] = losses["loss_dn"] + unused_dn
            total = total + unused_dn
        return total, losses

    # ------------------------------------------------------------ inference
    @torch.no_grad()
    def predict(self, images) -> list[dict[str, torch.Tensor]]:
        """Per image: ``boxes`` (absolute xyxy, clipped to the input image), ``scores``,
        ``labels``."""
        pixels, pixel_mask, sizes, originals, _ = self._prepare(images)
        enc = self._encode(pixels, pixel_mask)
        content, reference, _ = self._select_queries(enc)
        logits, boxes = self._decode(content, reference, enc, None)
        prob = logits[-1].sigmoid().flatten(1)                 # (B, Q * C)
        k = min(self.cfg["num_select"], prob.shape[1])
        scores, flat_idx = prob.topk(k, dim=1)
        query = flat_idx // self.num_classes
        results = []
        for b, (h, w) in enumerate(sizes):
            cxcywh = boxes[-1, b, query[b]]
            xyxy = box_convert(cxcywh, "cxcywh", "xyxy") * cxcywh.new_tensor([w, h, w, h])
            # Clipped to the resized image before scaling back, as the released DINO head's
            # post-processing (DETRHead._get_bboxes_single in OpenGVLab/InternImage
            # detection/mmdet_custom/models/dense_heads/detr_head.py): a box reaching into
            # the padding or past the border would otherwise be scored as predicted.
            xyxy = clip_boxes_to_image(xyxy, (h, w))
            results.append({"boxes": xyxy, "scores": scores[b],
                            "labels": flat_idx[b] % self.num_classes + self.label_offset})
        return self.transform.postprocess(results, sizes, originals)

    def forward(self, images, targets: Sequence[dict] | None = None):
        """torchvision convention: loss terms in training with targets, else detections."""
        if self.training and targets is not None:
            return self.loss(images, targets)[1]
        return self.predict(images)


def build_dino(backbone_name: str, num_classes: int, *, backbone_kwargs: dict | None = None,
               init: str | None = None, **cfg) -> DinoDetector:
    """DINO on InternImage ``backbone_name`` (a variant or released name).

    ``backbone_kwargs``: trunk overrides (``channels``, ``depths``, ``groups``,
    ``drop_path_rate``, ``with_cp``, ...), e.g. ``BackboneConfig.build_kwargs()``.
    ``init``: a classification checkpoint / converted run loaded into the trunk.
    ``cfg``: keys of ``DEFAULTS`` (unknown keys raise, naming the allowed ones).
    """
    unknown = sorted(set(cfg) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"build_dino: unknown keys {unknown}; allowed: {sorted(DEFAULTS)}")
    cfg = {**DEFAULTS, **cfg}
    levels = len(cfg["out_indices"])
    if cfg["num_feature_levels"] < levels:
        raise ValueError(f"num_feature_levels={cfg['num_feature_levels']} < the "
                         f"{levels} backbone levels of out_indices={cfg['out_indices']}")
    if cfg["d_model"] % 32:
        raise ValueError(f"d_model={cfg['d_model']} must be a multiple of 32 (GroupNorm(32))")
    backbone_kwargs = dict(backbone_kwargs or {})
    config = DeformableDetrConfig(
        backbone_config=backbone_config(backbone_name, tuple(cfg["out_indices"]),
                                        **backbone_kwargs),
        num_labels=num_classes, num_queries=cfg["num_queries"], d_model=cfg["d_model"],
        encoder_layers=cfg["encoder_layers"], decoder_layers=cfg["decoder_layers"],
        encoder_attention_heads=cfg["num_heads"], decoder_attention_heads=cfg["num_heads"],
        encoder_ffn_dim=cfg["ffn_dim"], decoder_ffn_dim=cfg["ffn_dim"],
        encoder_n_points=cfg["n_points"], decoder_n_points=cfg["n_points"],
        num_feature_levels=cfg["num_feature_levels"], dropout=cfg["dropout"],
        attention_dropout=0.0, activation_dropout=0.0, two_stage=True, with_box_refine=True,
        two_stage_num_proposals=cfg["num_queries"])
    model = DinoDetector(config, num_classes, cfg)
    reset_backbone_init(model.backbone)
    if init:
        from finetune.init import load_init
        from models import resolve_variant

        arch = {k: backbone_kwargs[k] for k in ARCH_KEYS if backbone_kwargs.get(k) is not None}
        load_init(model.backbone, init, variant=resolve_variant(backbone_name), arch=arch,
                  backbone_only=True)
    return model
