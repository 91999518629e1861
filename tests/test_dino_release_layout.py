"""DINO's head as the released InternImage DINO lays it out, and the released data filter and
0.1x-backbone-lr recipe around it.

Released facts (OpenGVLab/InternImage, read at main):
- detection/mmdet_custom/models/dense_heads/deformable_detr_head.py (``DeformableDETRHead``,
  the base of dino_head.py's ``DINOHead``; every released DINO config sets
  ``with_box_refine=True, as_two_stage=True``): ``num_pred = decoder.num_layers + 1``
  class branches ``Linear(embed_dims, cls_out_channels)`` and box branches ``Linear, ReLU,
  Linear, ReLU, Linear(embed_dims, 4)`` (detr_head.py ``num_reg_fcs=2``), made by
  ``_get_clones`` (deep copies of one); ``init_weights``: class biases
  ``bias_init_with_prob(0.01)``, every box branch's last Linear ``constant_init(.., 0,
  bias=0)``, branch 0's width/height bias -2.0, then, two-stage, every branch's
  width/height bias 0.0.
- detection/mmdet_custom/models/utils/transformer.py: ``DinoTransformerDecoder`` refines the
  reference boxes of layer ``lid`` with ``reg_branches[lid](output)``; ``DinoTransformer``
  scores and regresses the encoder's proposals with ``cls_branches[num_layers]`` /
  ``reg_branches[num_layers]``; its other parameters: ``level_embeds``, ``enc_output``,
  ``enc_output_norm``, ``query_embed`` (two_stage_num_proposals rows), the decoder's
  ``ref_point_head`` (MLP 2d -> d -> d) and ``norm``.
- dino_head.py: ``label_embedding = nn.Embedding(cls_out_channels, embed_dims)``
  (``cls_out_channels = num_classes`` under the sigmoid focal loss, detr_head.py);
  utils/query_denoising.py pads the denoising label queries with zeros.
- open-mmlab/mmdetection 2.x mmdet/datasets/coco.py ``CocoDataset._filter_imgs(min_size=32)``
  (called by custom.py ``CustomDataset.__init__`` unless ``test_mode``): an image stays if
  ``min(width, height) >= min_size``, whatever ``filter_empty_gt`` says.
- detection/configs/coco/dino_4scale_internimage_l_1x_coco_0.1x_backbone_lr.py: AdamW lr
  1e-4, weight_decay 0.05, paramwise_cfg custom_keys {'backbone': lr_mult 0.1} through
  mmcv's DefaultOptimizerConstructor (open-mmlab/mmcv mmcv/runner/optimizer/
  default_constructor.py: bias/norm decay multipliers default 1.0, so every parameter is
  decayed).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from finetune.heads.dino import build_dino

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "finetune"
TINY_TRUNK = {"channels": 16, "depths": (1, 1, 2, 1), "groups": (1, 2, 4, 8)}
TINY_HEAD = {"num_queries": 20, "d_model": 64, "encoder_layers": 1, "decoder_layers": 3,
             "num_heads": 4, "ffn_dim": 128, "train_sizes": (64,), "test_size": 64,
             "max_size": 96, "num_dn_queries": 10}
PRIOR_BIAS = -math.log((1 - 0.01) / 0.01)  # mmcv bias_init_with_prob(0.01) = -4.59512


def _tiny(**over):
    torch.manual_seed(0)
    return build_dino("internimage_t", 3, backbone_kwargs=TINY_TRUNK, **{**TINY_HEAD, **over})


def _images():
    g = torch.Generator().manual_seed(1)
    return [torch.rand(3, 64, 64, generator=g), torch.rand(3, 48, 64, generator=g)]


def test_one_class_and_box_branch_per_decoder_layer_plus_the_encoders():
    model = _tiny()
    n = TINY_HEAD["decoder_layers"] + 1  # the release's num_pred with as_two_stage
    assert len(model.class_embed) == n and len(model.bbox_embed) == n
    params = [id(p) for branches in (model.class_embed, model.bbox_embed)
              for b in branches for p in b.parameters()]
    assert len(params) == len(set(params))  # clones, nothing shared between layers
    for cls in model.class_embed:
        assert (cls.in_features, cls.out_features) == (64, 3)
    for box in model.bbox_embed:
        assert [(lin.in_features, lin.out_features) for lin in box.layers] == \
            [(64, 64), (64, 64), (64, 4)]


def test_branches_start_as_the_released_init():
    model = _tiny()
    first_cls, first_box = model.class_embed[0], model.bbox_embed[0]
    for cls in model.class_embed:
        assert torch.equal(cls.bias, torch.full((3,), PRIOR_BIAS))
        assert torch.equal(cls.weight, first_cls.weight)  # _get_clones: copies of one
        assert cls.weight.abs().sum() > 0                 # default Linear init, not zeroed
    for box in model.bbox_embed:
        # last Linear all zero (constant_init 0, bias 0; the -2.0 width/height bias of
        # branch 0 is reset to 0.0 in the two-stage case): a branch starts as "no change"
        assert not box.layers[-1].weight.any() and not box.layers[-1].bias.any()
        for mine, first in zip(box.layers, first_box.layers):
            assert torch.equal(mine.weight, first.weight) and torch.equal(mine.bias, first.bias)


def _encoded(model):
    pixels, mask, *_ = model._prepare(_images())
    enc = model._encode(pixels, mask)
    content, reference, _ = model._select_queries(enc)
    return enc, content, reference


def test_decoder_layer_i_refines_and_predicts_with_branch_i_the_encoder_with_the_last():
    model = _tiny().eval()
    calls: list[tuple[str, int]] = []
    for kind, branches in (("cls", model.class_embed), ("box", model.bbox_embed)):
        for i, b in enumerate(branches):
            b.register_forward_hook(lambda *_, k=kind, i=i: calls.append((k, i)))
    with torch.no_grad():
        enc, content, reference = _encoded(model)
        last = TINY_HEAD["decoder_layers"]
        assert sorted(calls) == [("box", last), ("cls", last)]  # the encoder's proposals
        calls.clear()
        model._decode(content, reference, enc, None)
    # layer i: class + box prediction on the normed output, then the refinement of its
    # reference boxes, both with branch i (reg_branches[lid] in DinoTransformerDecoder)
    assert calls == [c for i in range(last) for c in (("cls", i), ("box", i), ("box", i))]


def test_a_layers_box_branch_moves_its_own_and_later_predictions_only():
    """Shifting branch 1's box bias by delta shifts layer 1's predicted box logits by exactly
    delta (prediction = branch_1(norm(h_1)) + logit of layer 0's refined box), leaves layer
    0 alone, and reaches layer 2 through the boxes layer 1 refined with it; the class
    branch of a layer moves that layer's logits only; the encoder's branches move nothing
    the decoder computes from fixed queries."""
    from transformers.models.deformable_detr.modeling_deformable_detr import inverse_sigmoid

    model = _tiny().eval()
    with torch.no_grad():
        enc, content, reference = _encoded(model)
        logits, boxes = model._decode(content, reference, enc, None)
        delta = torch.tensor([0.1, -0.2, 0.3, -0.1])
        model.bbox_embed[1].layers[-1].bias += delta
        logits2, boxes2 = model._decode(content, reference, enc, None)
        assert torch.equal(boxes2[0], boxes[0]) and torch.equal(logits2[:2], logits[:2])
        shift = inverse_sigmoid(boxes2[1]) - inverse_sigmoid(boxes[1])
        assert torch.allclose(shift, delta.expand_as(shift), atol=1e-3)
        assert not torch.allclose(boxes2[2], boxes[2])
        model.bbox_embed[1].layers[-1].bias -= delta

        model.class_embed[2].bias += 1.0
        logits3, boxes3 = model._decode(content, reference, enc, None)
        assert torch.allclose(logits3[2], logits[2] + 1.0, atol=1e-5)
        assert torch.equal(logits3[:2], logits[:2]) and torch.equal(boxes3, boxes)
        model.class_embed[2].bias -= 1.0

        model.class_embed[-1].bias += 1.0
        model.bbox_embed[-1].layers[-1].bias += 1.0
        logits4, boxes4 = model._decode(content, reference, enc, None)
        assert torch.equal(logits4, logits) and torch.equal(boxes4, boxes)


def _released_dino_head_params(d: int, classes: int, enc_layers: int, dec_layers: int,
                               queries: int, ffn: int, heads: int, levels: int,
                               points: int) -> int:
    """Parameters of the released ``DINOHead`` (bbox_head; the ChannelMapper neck and the
    backbone are outside it), counted from the released structure (module docstring)."""
    def linear(i, o):
        return i * o + o

    norm = 2 * d
    msda = (linear(d, heads * levels * points * 2) + linear(d, heads * levels * points)
            + linear(d, d) + linear(d, d))  # mmcv MultiScaleDeformableAttention
    ffn_p = linear(d, ffn) + linear(ffn, d)
    mha = 3 * d * d + 3 * d + linear(d, d)  # nn.MultiheadAttention (mmcv MultiheadAttention)
    encoder = enc_layers * (msda + ffn_p + 2 * norm)  # self_attn, norm, ffn, norm
    decoder = dec_layers * (mha + msda + ffn_p + 3 * norm)
    transformer = (levels * d + linear(d, d) + norm + queries * d  # DinoTransformer.init_layers
                   + linear(2 * d, d) + linear(d, d) + norm)      # ref_point_head, decoder norm
    branches = (dec_layers + 1) * (linear(d, classes) + 2 * linear(d, d) + linear(d, 4))
    label_embedding = classes * d
    return encoder + decoder + transformer + branches + label_embedding


def test_head_parameter_count_equals_the_released_dino_head():
    """d=256, 80 classes, 6 + 6 layers, 900 queries, FFN 2048, 8 heads, 4 levels x 4 points:
    the released DINO-4scale head of every InternImage DINO config."""
    with torch.device("meta"):
        model = build_dino("internimage_t", 80, backbone_kwargs=TINY_TRUNK)
    head = sum(p.numel() for n, p in model.named_parameters()
               if not n.startswith(("detr.backbone.", "detr.input_proj.")))
    released = _released_dino_head_params(256, 80, 6, 6, 900, 2048, 8, 4, 4)
    assert released == 18_556_236  # the count itself, for the record
    assert head == released
    # and for another shape (the demo's): the formula, not a constant, is what matches
    with torch.device("meta"):
        small = build_dino("internimage_t", 3, backbone_kwargs=TINY_TRUNK, **TINY_HEAD)
    head = sum(p.numel() for n, p in small.named_parameters()
               if not n.startswith(("detr.backbone.", "detr.input_proj.")))
    assert head == _released_dino_head_params(64, 3, 1, 3, 20, 128, 4, 4, 4)


def test_denoising_padding_queries_get_zero_content():
    model = _tiny()
    labels = torch.tensor([[0, 2, 3], [1, 3, 3]], dtype=torch.int32)  # 3 = the padding label
    content = model._label_content(labels)
    assert model.label_embed.num_embeddings == 3  # one row per class, as released
    pad = labels == 3
    assert not content[pad].any()
    assert torch.equal(content[~pad], model.label_embed.weight[labels[~pad].long()])


# ---------------------------------------------------------------- resuming old checkpoints
def _dino_cfg(*over):
    from finetune.det_config import DetectionConfig
    from launch.config import load_config

    return load_config(DetectionConfig, CONFIGS / "det_dino_demo.yaml", list(over))


def test_dino_model_hash_names_the_head_layout_mask_rcnn_hash_unchanged():
    from finetune.det_config import DetectionConfig
    from finetune.detection import detection_model_hash
    from finetune.engine import fingerprint
    from launch.config import load_config

    rcnn = load_config(DetectionConfig, None, [])
    # Mask R-CNN: the hash its checkpoints have carried all along (they still resume)
    assert detection_model_hash(rcnn, 3) == fingerprint(
        "detection", rcnn.model.name, rcnn.model.arch(), "maskrcnn", 3)
    cfg = _dino_cfg()
    legacy = fingerprint("detection", cfg.model.name, cfg.model.arch(), "dino", 3)
    assert detection_model_hash(cfg, 3, dino_layout=False) == legacy
    assert detection_model_hash(cfg, 3) != legacy
    # a head of other parameter shapes is another model; a test-time setting is not
    assert detection_model_hash(_dino_cfg("head.decoder_layers=2"), 3) != \
        detection_model_hash(cfg, 3)
    assert detection_model_hash(_dino_cfg("head.num_select=7"), 3) == \
        detection_model_hash(cfg, 3)


def _fake_checkpoint(out: Path, model_hash: str) -> Path:
    """A run directory whose latest checkpoint's trainer state carries ``model_hash``."""
    root = out / "checkpoints"
    ckpt = root / "step_0000004"
    ckpt.mkdir(parents=True)
    (ckpt / "mp_rank_00_model_states.pt").write_bytes(b"")
    (ckpt / "trainer_state.json").write_text(json.dumps(
        {"step": 4, "model_hash": model_hash, "world_size": 1, "task": "detection",
         "epoch": 0, "epoch_step": 4, "ranks": [{}]}))
    (root / "latest").write_text("step_0000004")
    return ckpt


def test_resuming_a_shared_head_dino_checkpoint_is_refused_naming_the_cause(cache, tmp_path,
                                                                          capsys):
    """What a user gets: the CLI's one-line refusal, exit 2, saying the checkpoint has the
    earlier shared class/box head, before any model is built."""
    from finetune.engine import fingerprint
    from launch.cli import main

    over = ["data.demo_train=8", "data.demo_val=2", f"data.cache_dir={cache}",
            "run.num_workers=0", "run.progress=false"]
    cfg = _dino_cfg(*over)
    out = tmp_path / "run"
    _fake_checkpoint(out, fingerprint("detection", cfg.model.name, cfg.model.arch(), "dino",
                                      3))
    code = main(["finetune", "detection", "--config", str(CONFIGS / "det_dino_demo.yaml"),
                 "--output-dir", str(out), "--resume", "auto", *over])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    line = next(x for x in err.splitlines() if x.startswith("internimage finetune: "))
    assert "step_0000004 was written by an earlier DINO head with one class/box head " \
        "shared by all decoder layers" in line
    assert "per decoder layer" in line and "cannot be resumed" in line


def test_init_still_loads_a_classification_checkpoint_into_the_trunk_only(tmp_path):
    """--init (finetune/init.py load_init into ``model.backbone``) never touches the head, so
    the per-layer branches leave it as it was: the trunk takes the checkpoint's weights, the
    branches keep their released init."""
    from models import build_model

    source = build_model("internimage_t", num_classes=5, **TINY_TRUNK)
    path = tmp_path / "cls.pth"
    torch.save({"model": source.state_dict()}, path)
    model = build_dino("internimage_t", 3, backbone_kwargs=TINY_TRUNK, init=str(path),
                       **TINY_HEAD)
    got = model.backbone.state_dict()
    shared = [k for k in source.state_dict() if k in got]
    assert len(shared) > 50
    for key in shared:
        torch.testing.assert_close(got[key], source.state_dict()[key], msg=key)
    for cls in model.class_embed:
        assert torch.equal(cls.bias, torch.full((3,), PRIOR_BIAS))


# ---------------------------------------------------------------- mmdet's min_size filter
def _coco(tmp_path: Path, sizes: list[tuple[int, int]], annotated: set[int]) -> Path:
    images = [{"id": i + 1, "file_name": f"{i + 1}.jpg", "width": w, "height": h}
              for i, (w, h) in enumerate(sizes)]
    anns = [{"id": k, "image_id": i, "category_id": 1, "bbox": [1, 1, 9, 9], "area": 81,
             "iscrowd": 0, "segmentation": [[1, 1, 10, 1, 10, 10]]}
            for k, i in enumerate(sorted(annotated), 1)]
    ann = tmp_path / "instances.json"
    ann.write_text(json.dumps({"images": images, "annotations": anns,
                               "categories": [{"id": 1, "name": "a"}]}))
    return ann


def test_min_size_drops_training_images_under_32_px_a_side_as_mmdet(tmp_path):
    from finetune.det_data import CocoInstances

    # (w, h): min side 31 drops, 32 stays (>=), either side counts; image 5 has no box
    ann = _coco(tmp_path, [(100, 31), (32, 32), (31, 500), (640, 480), (40, 40)],
                annotated={1, 2, 3, 4})
    assert CocoInstances(tmp_path, ann, True, min_size=32).ids == [2, 4, 5]
    # each rule on its own (mmdet applies both in one pass): empty image 5 goes only with
    # filter_empty_gt, the small ones whatever filter_empty_gt says
    assert CocoInstances(tmp_path, ann, True, filter_empty_gt=True, min_size=32).ids == [2, 4]
    assert CocoInstances(tmp_path, ann, True, filter_empty_gt=True).ids == [1, 2, 3, 4]
    # never at evaluation (mmdet: only when not test_mode)
    assert CocoInstances(tmp_path, ann, False, min_size=32).ids == [1, 2, 3, 4, 5]


def test_data_min_size_defaults_to_mmdets_32_and_reaches_the_training_set(tmp_path):
    from finetune.det_config import DetectionConfig
    from finetune.det_data import build_datasets
    from launch.config import ConfigError, load_config

    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    for split in ("train2017", "val2017"):
        (root / split).mkdir()
        ann = _coco(tmp_path, [(100, 31), (64, 48)], annotated={1, 2})
        ann.rename(root / "annotations" / f"instances_{split}.json")
    cfg = load_config(DetectionConfig, None, ["data.kind=coco", f"data.root={root}"])
    assert cfg.data.min_size == 32
    train, val = build_datasets(cfg)
    assert train.ids == [2] and val.ids == [1, 2]
    off = load_config(DetectionConfig, None, ["data.kind=coco", f"data.root={root}",
                                              "data.min_size=0"])
    assert build_datasets(off)[0].ids == [1, 2]
    with pytest.raises(ConfigError, match=r"data\.min_size"):  # would drop every demo image
        load_config(DetectionConfig, None, ["data.demo_size=24"])


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("det_*coco*.yaml")))
def test_coco_presets_keep_mmdets_min_size(name):
    from finetune.det_config import DetectionConfig
    from launch.config import load_config

    assert load_config(DetectionConfig, CONFIGS / name).data.min_size == 32


# ---------------------------------------------------------------- DINO-L 0.1x backbone lr
def test_dino_l_0_1x_backbone_lr_preset_decays_every_parameter_and_scales_the_trunk():
    """The released file's optimizer through ours: trunk at 0.1 x lr (DCNv3 offsets too),
    the rest (neck, transformer, level embeddings, sampling offsets, branches) at the base
    lr, weight decay 0.05 on every parameter, norms and biases included."""
    from finetune.det_config import DetectionConfig
    from finetune.detection import build_model, optimizer_and_schedule
    from launch.config import load_config

    cfg = load_config(DetectionConfig,
                      CONFIGS / "det_dino_internimage_l_1x_coco_0.1x_backbone_lr.yaml",
                      ["model.channels=16", "model.depths=[1,1,2,1]", "model.groups=[1,2,4,8]"])
    with torch.device("meta"):
        model = build_model(cfg, num_classes=80)
    opt, sched = optimizer_and_schedule(model, cfg, 20_000)
    sched.step_update(cfg.optim.warmup_steps)
    prefix = model.backbone_prefix
    seen = set()
    for g in opt.param_groups:
        assert g["weight_decay"] == 0.05, g["names"][:3]
        for n in g["names"]:
            seen.add(n)
            want = 1e-5 if n.startswith(prefix) else 1e-4
            assert g["lr"] == pytest.approx(want), n
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert seen == names
    # the ones our layer-decay rule would exempt from decay are among them
    assert any(n.endswith("norm.weight") for n in names) and any("bias" in n for n in names)
    assert any("sampling_offsets" in n for n in names) and any("level_embed" in n for n in names)
