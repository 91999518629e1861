"""Detection training items decode instance masks (pycocotools ``annToMask``) only for a
head that learns from them: Mask R-CNN's do; DINO's head reads only a target's boxes and
labels (finetune/heads/dino.py ``_prepare``), so its training items hold no ``masks`` and
decode none. Before, a DINO item decoded every mask of its image (COCO: ~7 image-size
masks, ~6.7 MB an item) and the head dropped them.

The items of both heads are otherwise the same, flipped and cropped with the same random
draws (the released DINO files' crop branch included), and a DINO run still trains."""

from __future__ import annotations

import pytest
import torch

# the 64 px demo images at scale 1, crops of 32..48 px; no negative crops (the released
# DINO files' setting: a crop without boxes redraws another image, more draws)
CROP = ["data.crop_aug.prob=0.5", "data.crop_aug.resize_sizes=[64]",
        "data.crop_aug.crop_size=[32,48]", "data.crop_aug.allow_negative_crop=false"]


def _train_set(cache, head: str):
    from finetune.det_config import DetectionConfig
    from finetune.det_data import build_datasets
    from launch.config import load_config

    cfg = load_config(DetectionConfig, None, [
        f"data.cache_dir={cache}", "data.demo_train=16", "data.demo_val=4",
        "data.demo_size=64", "data.hflip=0.5", f"head.kind={head}", *CROP])
    return build_datasets(cfg)[0]


@pytest.fixture
def decoded(monkeypatch) -> list[int]:
    """The annotation ids pycocotools' ``annToMask`` decodes, in call order."""
    from pycocotools.coco import COCO

    calls: list[int] = []
    decode = COCO.annToMask
    monkeypatch.setattr(COCO, "annToMask",
                        lambda self, ann: calls.append(ann["id"]) or decode(self, ann))
    return calls


def test_dino_training_items_decode_no_masks_mask_rcnn_items_do(cache, decoded):
    dino, mask_rcnn = _train_set(cache, "dino"), _train_set(cache, "maskrcnn")
    assert dino.ids == mask_rcnn.ids
    sizes = set()
    for i in range(len(dino)):
        torch.manual_seed(i)
        img, target = dino[i]
        after = torch.rand(())
        assert "masks" not in target
        assert decoded == []
        torch.manual_seed(i)
        ref_img, ref = mask_rcnn[i]
        assert torch.rand(()) == after  # the same draws: flip, crop, redraws
        assert decoded, "Mask R-CNN's training items decode their masks"
        decoded.clear()
        assert torch.equal(img, ref_img) and target["image_id"] == ref["image_id"]
        assert torch.equal(target["boxes"], ref["boxes"])
        assert torch.equal(target["labels"], ref["labels"])
        assert ref["masks"].shape == (len(ref["boxes"]), *ref_img.shape[-2:])
        sizes.add(tuple(img.shape[-2:]))
    assert (64, 64) in sizes and len(sizes) > 1  # some items cropped, some not


def test_a_dino_training_batch_reaches_the_loss_without_masks(cache, decoded):
    """A DINO model takes its training targets without masks: finite losses."""
    from finetune.det_config import DetectionConfig
    from finetune.det_data import collate
    from finetune.detection import build_model
    from launch.config import load_config

    train = _train_set(cache, "dino")
    cfg = load_config(DetectionConfig, None, [
        "head.kind=dino", "head.num_queries=20", "head.decoder_layers=2",
        "head.ffn_dim=128", "head.num_dn_queries=10", "head.train_sizes=[64]",
        "head.test_size=64", "head.max_size=64"])
    torch.manual_seed(0)
    model = build_model(cfg, len(train.cat_ids))
    images, targets = collate([train[i] for i in range(2)])
    assert all("masks" not in t for t in targets) and decoded == []
    losses = model(list(images), list(targets))
    assert losses and all(torch.isfinite(v).all() for v in losses.values())
