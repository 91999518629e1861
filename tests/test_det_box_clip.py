"""Detection training boxes are clipped to the image border, as mmdet 2.28.1's (the mmdet of
OpenGVLab/InternImage detection/README.md) ``Resize`` clips them with its default
``bbox_clip_border=True`` (open-mmlab/mmdetection mmdet/datasets/pipelines/transforms.py,
``Resize._resize_bboxes``: ``bboxes = results[key] * results['scale_factor']``, then x
clipped to [0, img_shape[1]] and y to [0, img_shape[0]], no box dropped; ``RandomFlip``
mirrors x as ``w - x2``, ``w - x1`` on the resized image). Before, a box reaching past
the image kept its outside part in the target the detector trained on.

And evaluation items no longer decode instance masks (pycocotools ``annToMask``), which the
evaluation never reads (COCOeval scores against the annotation file): before, every
evaluation decoded each of COCO val's 36k masks at image size."""

from __future__ import annotations

import json

import pytest
import torch

from tests.test_det_target_filter import _ann
from tests.test_finetune_det_images import _coco

# image 1 of tests/test_finetune_det_images.py's set: a.jpg, 48 wide, 40 high
W, H = 48, 40
BOXES = [[2, 3, 20, 16],  # inside: unchanged
         [-6, -4, 20, 16],  # past the left and top border
         [40, 30, 20, 20]]  # past the right and bottom border


def _dataset(tmp_path, train: bool, hflip: float = 0.0):
    from finetune.det_data import CocoInstances

    root = _coco(tmp_path / "coco")
    split = "train2017" if train else "val2017"
    ann_file = root / "annotations" / f"instances_{split}.json"
    data = json.loads(ann_file.read_text())
    first = data["images"][0]
    assert (first["id"], first["width"], first["height"]) == (1, W, H)
    data["annotations"] = [_ann(i, box) for i, box in enumerate(BOXES, 1)] + [
        {**a, "id": 100 + a["id"]} for a in data["annotations"] if a["image_id"] != 1]
    ann_file.write_text(json.dumps(data))
    return CocoInstances(root / split, ann_file, train, hflip=hflip)


def _mmdet_resize_then_flip(boxes: torch.Tensor, new_h: int, new_w: int,
                            flip: bool) -> torch.Tensor:
    """mmdet 2.x ``Resize`` (keep_ratio: scale_factor = (new_w / w, new_h / h), boxes
    scaled, then clipped to the resized image) followed by ``RandomFlip``'s
    horizontal ``bbox_flip`` on the resized image (the Mask R-CNN recipes' order)."""
    out = boxes * torch.tensor([new_w / W, new_h / H, new_w / W, new_h / H])
    out[:, 0::2] = out[:, 0::2].clamp(0, new_w)
    out[:, 1::2] = out[:, 1::2].clamp(0, new_h)
    if flip:
        out = torch.stack([new_w - out[:, 2], out[:, 1], new_w - out[:, 0], out[:, 3]], 1)
    return out


@pytest.mark.parametrize("flip", [False, True])
def test_training_boxes_are_clipped_where_mmdets_resize_clips_them(flip, tmp_path):
    """The boxes the detector trains on, after the model's own resize (torchvision's
    GeneralizedRCNNTransform, which Mask R-CNN and DINO here use), are mmdet's
    ``Resize(bbox_clip_border=True)`` + ``RandomFlip`` boxes; the item's boxes lie in
    the image, the masks are unchanged (one per box)."""
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    data = _dataset(tmp_path, train=True, hflip=1.0 if flip else 0.0)
    img, target = data[data.ids.index(1)]
    raw = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in BOXES], dtype=torch.float32)
    clipped = torch.tensor([[2, 3, 22, 19], [0, 0, 14, 12], [40, 30, 48, 40]],
                           dtype=torch.float32)
    assert torch.equal(_mmdet_resize_then_flip(raw, H, W, False), clipped)  # scale 1
    expected_item = torch.stack([W - clipped[:, 2], clipped[:, 1], W - clipped[:, 0],
                                 clipped[:, 3]], 1) if flip else clipped
    assert torch.equal(target["boxes"], expected_item)
    assert target["masks"].shape == (3, H, W) and target["labels"].tolist() == [1, 1, 1]

    # 48 x 40 -> shorter side 100: 120 x 100
    transform = GeneralizedRCNNTransform(100, 1333, [0.0] * 3, [1.0] * 3)
    images, (resized,) = transform([img], [{k: v for k, v in target.items()
                                           if k != "image_id"}])
    new_h, new_w = images.image_sizes[0]
    assert (new_h, new_w) == (100, 120)
    torch.testing.assert_close(resized["boxes"],
                               _mmdet_resize_then_flip(raw, new_h, new_w, flip))


def test_evaluation_items_decode_no_masks(tmp_path, monkeypatch):
    """An evaluation item's target: the image id, boxes and labels, no ``masks``, and no
    ``annToMask`` call; a training item still decodes one mask per kept annotation."""
    from pycocotools.coco import COCO

    calls: list[int] = []
    decode = COCO.annToMask

    def counted(self, ann):
        calls.append(ann["id"])
        return decode(self, ann)

    monkeypatch.setattr(COCO, "annToMask", counted)
    val = _dataset(tmp_path / "val", train=False)
    for i in range(len(val)):
        img, target = val[i]
        assert "masks" not in target and target["image_id"] == val.ids[i]
        assert len(target["boxes"]) == len(target["labels"]) == len(
            val.coco.imgToAnns[val.ids[i]])
    assert calls == []
    train = _dataset(tmp_path / "train", train=True)
    _, target = train[train.ids.index(1)]
    assert calls == [1, 2, 3] and target["masks"].shape == (3, H, W)
