"""The DETR-style crop branch of the released 3x Mask R-CNN recipes (``data.crop_aug``):
resize + crop geometry against mmdet 2.x ``RandomCrop(crop_type='absolute_range',
allow_negative_crop=True)`` (open-mmlab/mmdetection mmdet/datasets/pipelines/transforms.py),
the dataset with the branch on and off, and the presets that use it
(OpenGVLab/InternImage detection/configs/coco/mask_rcnn_internimage_{t,s}_fpn_3x_coco.py and
dino_4scale_internimage_{t,l}_1x_coco_layer_wise_lr.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from finetune.det_config import DetCropAugConfig
from finetune.det_data import CocoInstances, resize_and_crop

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "finetune"


def _coordinate_scene(h: int, w: int):
    """An image whose channels 0/1 hold each pixel's x/y (so a crop can be located from its
    first pixel), two boxes with their filled-box masks, and labels."""
    img = torch.zeros(3, h, w, dtype=torch.uint8)
    img[0] = torch.arange(w, dtype=torch.uint8)[None]
    img[1] = torch.arange(h, dtype=torch.uint8)[:, None]
    boxes = torch.tensor([[4.0, 6, 14, 15], [24, 2, 36, 12]])
    masks = torch.zeros(2, h, w, dtype=torch.uint8)
    for m, (x0, y0, x1, y1) in zip(masks, boxes.long().tolist()):
        m[y0:y1, x0:x1] = 1
    return img, {"boxes": boxes, "masks": masks, "labels": torch.tensor([1, 2]), "image_id": 7}


def _check_window(img, target, out, t) -> tuple[int, int, int, int]:
    """Assert ``out``/``t`` are a window of ``img``/``target`` under mmdet's box rule;
    returns the window (top, left, height, width)."""
    ch, cw = out.shape[-2:]
    top, left = int(out[1, 0, 0]), int(out[0, 0, 0])
    assert torch.equal(out, img[:, top:top + ch, left:left + cw])
    shifted = target["boxes"] - torch.tensor([left, top, left, top])
    clipped = torch.stack([shifted[:, 0].clamp(0, cw), shifted[:, 1].clamp(0, ch),
                           shifted[:, 2].clamp(0, cw), shifted[:, 3].clamp(0, ch)], 1)
    keep = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    assert torch.equal(t["boxes"], clipped[keep])
    assert torch.equal(t["labels"], target["labels"][keep])
    assert torch.equal(t["masks"], target["masks"][keep][:, top:top + ch, left:left + cw])
    assert t["image_id"] == target["image_id"]
    return top, left, ch, cw


def test_crop_geometry_is_mmdets_absolute_range_rule():
    """Scale 1 (shorter side already the drawn size): each output is a window of the input;
    boxes are shifted by the window's offset and clipped to it, boxes without area are
    dropped with their masks and labels, masks are the same window of the input masks; the
    crop sides cover [min(side, lo), min(side, hi)] and the offsets [0, side - crop], both
    inclusive (mmdet's np.random.randint(a, b + 1)); a crop with no box left is returned."""
    h, w = 30, 40
    img, target = _coordinate_scene(h, w)
    torch.manual_seed(0)
    sides_h, sides_w, emptied = set(), set(), 0
    aug = DetCropAugConfig(prob=1.0, resize_sizes=[h], max_size=1333, crop_size=[8, 35])
    for _ in range(600):
        out, t = resize_and_crop(img, target, aug)
        top, left, ch, cw = _check_window(img, target, out, t)
        sides_h.add(ch), sides_w.add(cw)
        emptied += int(len(t["boxes"]) == 0)
    assert sides_h == set(range(8, 31)) and sides_w == set(range(8, 36))  # h caps at 30
    assert emptied > 0  # allow_negative_crop=True

    tops, lefts = set(), set()
    aug = DetCropAugConfig(prob=1.0, resize_sizes=[h], max_size=1333, crop_size=[20, 20])
    for _ in range(400):
        out, t = resize_and_crop(img, target, aug)
        top, left, ch, cw = _check_window(img, target, out, t)
        assert (ch, cw) == (20, 20)
        tops.add(top), lefts.add(left)
    assert tops == set(range(11)) and lefts == set(range(21))


def test_resize_keeps_the_ratio_caps_the_long_side_and_skips_crops_larger_than_the_image():
    """The branch's first resize (mmcv.imrescale: scale = min(short / shorter, long /
    longer), sides rounded half up); a crop range above the image's sides keeps it whole."""
    img, target = _coordinate_scene(30, 40)
    aug = DetCropAugConfig(prob=1.0, resize_sizes=[60], max_size=1333, crop_size=[384, 600])
    out, t = resize_and_crop(img, target, aug)
    assert out.shape == (3, 60, 80)
    assert torch.allclose(t["boxes"], target["boxes"] * 2)
    big = torch.nn.functional.interpolate(target["masks"][None].float(), size=(60, 80),
                                          mode="nearest")[0].to(torch.uint8)
    assert torch.equal(t["masks"], big)

    wide = torch.zeros(3, 50, 400, dtype=torch.uint8)
    aug = DetCropAugConfig(prob=1.0, resize_sizes=[100], max_size=300, crop_size=[384, 600])
    empty = {"boxes": torch.zeros(0, 4), "masks": torch.zeros(0, 50, 400, dtype=torch.uint8),
             "labels": torch.zeros(0, dtype=torch.int64)}
    out, t = resize_and_crop(wide, empty, aug)
    assert out.shape == (3, 38, 300)  # scale min(100/50, 300/400) = 0.75; 37.5 -> 38
    assert t["boxes"].shape == (0, 4) and t["masks"].shape == (0, 38, 300)


def _dataset(cache, crop_aug=None, hflip=0.5) -> CocoInstances:
    from finetune.demo_data import ensure_shapes_coco

    root = ensure_shapes_coco(cache, 16, 4, 64)
    return CocoInstances(root / "train", root / "annotations/instances_train.json", True,
                         hflip, crop_aug)


def test_dataset_with_the_branch_off_draws_only_the_flip(cache):
    """prob 0 (the default): full-size images and one random draw per item (the flip), so
    runs without the branch see the same flips as before it existed."""
    plain = _dataset(cache)
    off = _dataset(cache, DetCropAugConfig())
    for i in range(len(plain)):
        torch.manual_seed(i)
        img, t = off[i]
        after = torch.rand(())
        torch.manual_seed(i)
        flipped = bool(torch.rand(()) < 0.5)
        assert torch.rand(()) == after  # nothing else was drawn
        torch.manual_seed(i)
        ref_img, ref_t = plain[i]
        assert torch.equal(img, ref_img) and torch.equal(t["boxes"], ref_t["boxes"])
        base_img, base_t = _dataset(cache, hflip=0.0)[i]
        assert torch.equal(img, base_img.flip(-1) if flipped else base_img)
        assert len(t["boxes"]) == len(base_t["boxes"])


def test_dataset_with_the_branch_on_returns_consistent_crops(cache):
    """prob 1 on the 64 px demo images (scale 1, crops of 32..48 px): every item is a crop
    whose boxes lie inside it with area, one mask and one label per box, masks the image's
    size; some items differ from the uncropped image, and seeding repeats an item."""
    aug = DetCropAugConfig(prob=1.0, resize_sizes=[64], max_size=1333, crop_size=[32, 48])
    data = _dataset(cache, aug)
    torch.manual_seed(0)
    sizes = set()
    for i in range(len(data)):
        img, t = data[i]
        h, w = img.shape[-2:]
        sizes.add((h, w))
        assert 32 <= h <= 48 and 32 <= w <= 48
        b = t["boxes"]
        assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
        assert (b >= 0).all() and (b[:, [0, 2]] <= w).all() and (b[:, [1, 3]] <= h).all()
        assert t["masks"].shape == (len(b), h, w) and t["labels"].shape == (len(b),)
    assert len(sizes) > 1
    torch.manual_seed(3)
    a = data[5]
    torch.manual_seed(3)
    b = data[5]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1]["boxes"], b[1]["boxes"])


def test_crops_left_without_boxes_are_redrawn_when_negative_crops_are_not_allowed(cache):
    """allow_negative_crop=False (the released DINO-T/L files): mmdet's RandomCrop returns
    None for a crop without a box and CustomDataset.__getitem__ then runs the pipeline on
    ``_rand_another(idx)``, a uniform draw over idx's aspect group (width > height or not),
    idx included (open-mmlab/mmdetection mmdet/datasets/custom.py). True keeps the crop."""
    small = dict(prob=1.0, resize_sizes=[64], max_size=1333, crop_size=[8, 12])
    kept = _dataset(cache, DetCropAugConfig(**small))
    redrawn = _dataset(cache, DetCropAugConfig(**small, allow_negative_crop=False))
    torch.manual_seed(0)
    empty = sum(len(kept[i][1]["boxes"]) == 0 for i in range(len(kept)) for _ in range(4))
    assert empty > 0
    torch.manual_seed(0)
    assert all(len(redrawn[i][1]["boxes"]) > 0 for i in range(len(redrawn)) for _ in range(4))

    # the redraw rule: make items 0..7 one group and 8..15 the other, fail item 3 once
    redrawn.wide = [j >= 8 for j in range(len(redrawn))]
    redrawn.groups = {False: list(range(8)), True: list(range(8, 16))}
    calls: list[int] = []
    load = redrawn._load

    def first_fails(i):
        calls.append(i)
        return None if len(calls) == 1 else load(i)

    redrawn._load = first_fails
    drawn = set()
    for seed in range(60):
        calls.clear()
        torch.manual_seed(seed)
        expect = list(range(8))[int(torch.randint(8, ()))]
        torch.manual_seed(seed)
        img, t = redrawn[3]
        assert calls[:2] == [3, expect] and len(t["boxes"]) > 0
        drawn.add(calls[1])
    assert drawn == set(range(8))  # uniform over the group, the failed item included


def test_crop_aug_config_is_checked_before_compute():
    from finetune.det_config import DetectionConfig
    from launch.config import ConfigError, load_config

    for override, key in [("data.crop_aug.prob=1.5", "data.crop_aug.prob"),
                          ("data.crop_aug.crop_size=[600,384]", "data.crop_aug.crop_size"),
                          ("data.crop_aug.crop_size=[384]", "data.crop_aug.crop_size"),
                          ("data.crop_aug.max_size=300", "data.crop_aug.max_size"),
                          ("data.crop_aug.size=3", "data.crop_aug.size")]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(DetectionConfig, None, [override])
    assert load_config(DetectionConfig, None, []).data.crop_aug.prob == 0.0  # demo: off


RELEASED_CROP = {"prob": 0.5, "resize_sizes": [400, 500, 600], "max_size": 1333,
                 "crop_size": [384, 600], "allow_negative_crop": True}
# OpenGVLab/InternImage detection/configs/coco/
# dino_4scale_internimage_{t,l}_1x_coco_layer_wise_lr.py: the crop policy's first resize caps
# the longer side at 4200 (img_scale (400..600, 4200)); RandomCrop allow_negative_crop=False
RELEASED_DINO_CROP = {**RELEASED_CROP, "max_size": 4200, "allow_negative_crop": False}


@pytest.mark.parametrize("name, crop", [
    ("det_mask_rcnn_internimage_t_fpn_3x_coco.yaml", RELEASED_CROP),
    ("det_mask_rcnn_internimage_s_fpn_3x_coco.yaml", RELEASED_CROP),
    ("det_dino_internimage_t_1x_coco.yaml", RELEASED_DINO_CROP),
    ("det_dino_internimage_l_1x_coco.yaml", RELEASED_DINO_CROP),
    # dino_4scale_internimage_l_1x_coco_0.1x_backbone_lr.py: the same train_pipeline
    ("det_dino_internimage_l_1x_coco_0.1x_backbone_lr.yaml", RELEASED_DINO_CROP),
    # the 1x files train single-scale (_base_/datasets/coco_instance.py); DINO-H's
    # dino_4scale_internimage_h_objects365_coco_ss.py resizes over a range, no crop branch
    ("det_mask_rcnn_internimage_t_fpn_1x_coco.yaml", None),
    ("det_dino_internimage_h_coco.yaml", None),
])
def test_presets_hold_the_released_crop_branch(name, crop, capsys):
    from dataclasses import asdict

    from finetune.det_config import DetectionConfig
    from launch.cli import main
    from launch.config import load_config

    cfg = load_config(DetectionConfig, CONFIGS / name)
    if crop is None:
        assert cfg.data.crop_aug.prob == 0.0
    else:
        assert asdict(cfg.data.crop_aug) == crop
        # the policy's other resizes: shorter side 480..800 step 32, longer <= 1333 (the
        # model's own resize: Mask R-CNN's detector.*, DINO's head.*)
        sizes = cfg.head if cfg.head.kind == "dino" else cfg.detector
        assert list(sizes.train_sizes) == list(range(480, 801, 32))
        assert sizes.max_size == 1333
        assert main(["finetune", "detection", "--dry-run", "--config", str(CONFIGS / name)]) == 0
        assert (f"crop p=0.5 to [400, 500, 600] (<= {crop['max_size']}), 384..600 px"
                in capsys.readouterr().out)
