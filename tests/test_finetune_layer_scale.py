"""``model.layer_scale``: the released InternImage-T detection/segmentation backbones.

Every released T det/seg config builds its backbone with ``layer_scale=1.0``
(OpenGVLab/InternImage detection/configs/coco/mask_rcnn_internimage_t_fpn_1x_coco.py,
mask_rcnn_internimage_t_fpn_3x_coco.py, dino_4scale_internimage_t_1x_coco_layer_wise_lr.py;
segmentation/configs/ade20k/upernet_internimage_t_512_160k_ade20k.py,
segmentation/configs/cityscapes/upernet_internimage_t_512x1024_160k_cityscapes.py), so
their checkpoints hold a trained ``gamma1``/``gamma2`` per block, which InternImage-T
(layer_scale None) lacks: ``--init``/``--eval-only`` with such a .pth failed with "does not
match internimage_t". The released checkpoints are mmdet/mmseg files: the whole model under
``{'state_dict': ...}``, the trunk under ``backbone.``; the tiny stand-in here is built from
our own model with layer_scale=1.0 and saved the same way.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
PRESETS = REPO / "configs" / "finetune"
TINY = ["model.channels=16", "model.depths=[1,1,2,1]", "model.groups=[1,2,4,8]",
        "model.drop_path_rate=0", "model.with_cp=false"]
# our presets of the released T det/seg configs (each names its released file)
T_DENSE = ["det_dino_internimage_t_1x_coco", "det_mask_rcnn_internimage_t_fpn_1x_coco",
           "det_mask_rcnn_internimage_t_fpn_3x_coco", "seg_upernet_internimage_t_512_160k_ade20k",
           "seg_upernet_internimage_t_cityscapes_512x1024"]


def _config(stem: str, extra: tuple[str, ...] = ()):
    from launch.commands.finetune import task_entry
    from launch.config import load_config

    task = "detection" if stem.startswith("det_") else "segmentation"
    return load_config(task_entry(task)[0], PRESETS / f"{stem}.yaml", [*TINY, *extra])


def _released_layout(path: Path) -> dict[str, torch.Tensor]:
    """A det/seg checkpoint as mmdet/mmseg save it: a tiny T trunk with layer_scale 1.0
    (its gammas moved off 1.0, as training leaves them) under ``backbone.``, plus a head
    tensor, inside ``{'state_dict': ..., 'meta': ...}``. Returns the trunk's state."""
    from models import build_model

    torch.manual_seed(0)
    trunk = build_model("internimage_t", num_classes=0, channels=16, depths=[1, 1, 2, 1],
                        groups=[1, 2, 4, 8], layer_scale=1.0)
    state = {k: v for k, v in trunk.state_dict().items()
             if not k.startswith(("conv_head.", "head.", "avgpool."))}
    gammas = [k for k in state if k.endswith((".gamma1", ".gamma2"))]
    assert gammas
    for k in gammas:
        state[k] = torch.rand_like(state[k]) + 0.5
    whole = {f"backbone.{k}": v for k, v in state.items()}
    whole["decode_head.conv_seg.weight"] = torch.zeros(150, 512, 1, 1)
    torch.save({"state_dict": whole, "meta": {"mmseg_version": "0.27.0"}}, path)
    return state


@pytest.mark.parametrize("stem", T_DENSE)
def test_t_dense_presets_set_the_released_layer_scale(stem):
    cfg = _config(stem)
    assert cfg.model.name == "internimage_t" and cfg.model.layer_scale == 1.0
    # recorded with the checkpoints and compared on --init / resume
    assert cfg.model.arch()["layer_scale"] == 1.0
    assert cfg.model.build_kwargs()["layer_scale"] == 1.0


@pytest.mark.parametrize("stem", ["seg_upernet_internimage_t_512_160k_ade20k",
                                  "det_mask_rcnn_internimage_t_fpn_1x_coco"])
def test_released_t_dense_checkpoint_loads_into_the_preset_backbone(stem, tmp_path):
    from finetune.backbone import build_trunk

    path = tmp_path / "upernet_internimage_t_512_160k_ade20k.pth"
    saved = _released_layout(path)
    cfg = _config(stem)
    trunk = build_trunk(cfg.model, str(path))
    own = trunk.state_dict()
    assert saved.keys() == own.keys()
    for k, v in saved.items():
        torch.testing.assert_close(own[k], v, msg=k)


def test_segmentor_of_the_t_ade20k_preset_takes_the_released_backbone(tmp_path):
    from finetune.seg_model import build_segmentor

    path = tmp_path / "upernet_internimage_t_512_160k_ade20k.pth"
    saved = _released_layout(path)
    cfg = _config("seg_upernet_internimage_t_512_160k_ade20k", ("head_channels=16",))
    model = build_segmentor(cfg, str(path))
    gamma = next(k for k in saved if k.endswith(".gamma1"))
    got = dict(model.named_parameters())
    name = next(n for n in got if n.endswith(gamma))
    torch.testing.assert_close(got[name].detach(), saved[gamma])


def test_without_layer_scale_the_refusal_can_name_the_key(tmp_path):
    """The T backbone without model.layer_scale refuses the released file; the gamma keys
    it names are what :func:`models.layer_scale.layer_scale_hint` turns into advice."""
    from finetune.backbone import build_trunk
    from models import CheckpointError
    from models.layer_scale import layer_scale_hint

    path = tmp_path / "mask_rcnn_internimage_t_fpn_1x_coco.pth"
    _released_layout(path)
    cfg = _config("det_mask_rcnn_internimage_t_fpn_1x_coco", ("model.layer_scale=null",))
    with pytest.raises(CheckpointError, match="does not match internimage_t") as err:
        build_trunk(cfg.model, str(path))
    assert ".gamma1" in str(err.value)
    hint = layer_scale_hint(["levels.0.blocks.0.gamma1", "levels.0.blocks.0.norm1.0.weight"])
    assert "set model.layer_scale" in hint and "1.0" in hint
    assert layer_scale_hint(["levels.0.blocks.0.norm1.0.weight"]) == ""


def test_the_refusal_says_to_set_model_layer_scale(tmp_path):
    from finetune.backbone import build_trunk
    from models import CheckpointError

    path = tmp_path / "mask_rcnn_internimage_t_fpn_1x_coco.pth"
    _released_layout(path)
    cfg = _config("det_mask_rcnn_internimage_t_fpn_1x_coco", ("model.layer_scale=null",))
    with pytest.raises(CheckpointError, match=r"gamma1/gamma2\): set model\.layer_scale"):
        build_trunk(cfg.model, str(path))


def _classifier_1k_without_gammas(path: Path) -> dict[str, torch.Tensor]:
    """A tiny T 1K classifier (no layer scale), as internimage_t_1k_224.pth: the init the
    released T det/seg configs start from."""
    from models import build_model

    torch.manual_seed(1)
    state = build_model("internimage_t", num_classes=10, channels=16, depths=[1, 1, 2, 1],
                        groups=[1, 2, 4, 8]).state_dict()
    assert not any(k.endswith(".gamma1") for k in state)
    torch.save({"model": state}, path)
    return state


def test_fresh_gammas_are_the_missing_gammas_of_a_checkpoint_without_any():
    from models.layer_scale import fresh_gammas

    missing = ["levels.0.blocks.0.gamma1", "levels.0.blocks.0.gamma2", "patch_embed.conv1.weight"]
    assert fresh_gammas(missing, ["patch_embed.conv1.bias"]) == missing[:2]
    # a checkpoint holding some gammas but not these: damaged, nothing starts fresh
    assert fresh_gammas(missing, ["levels.1.blocks.0.gamma1"]) == []


def test_the_1k_classifier_initialises_the_layer_scaled_t_backbone(tmp_path):
    """The released T det/seg configs start from internimage_t_1k_224.pth, which has no
    gammas; their backbone loads it non-strictly (init_weights: load_state_dict(state_dict,
    False), detection/mmdet_custom/models/backbones/intern_image.py), so the gammas start
    at 1.0 and everything else is the classifier's."""
    from finetune.backbone import build_trunk

    path = tmp_path / "internimage_t_1k_224.pth"
    saved = _classifier_1k_without_gammas(path)
    trunk = build_trunk(_config("det_mask_rcnn_internimage_t_fpn_1x_coco").model, str(path))
    own = trunk.state_dict()
    for k, v in own.items():
        if k.endswith((".gamma1", ".gamma2")):
            assert torch.equal(v, torch.ones_like(v)), k
        else:
            torch.testing.assert_close(v, saved[k], msg=k)


@pytest.mark.parametrize("value", ["0", "-1", ".inf"])
def test_layer_scale_must_be_positive_and_finite(value):
    from finetune.segmentation import SegmentationConfig
    from launch.config import load_config

    with pytest.raises(ValueError, match=r"model\.layer_scale: must be > 0"):
        load_config(SegmentationConfig, None, [f"model.layer_scale={value}"])
