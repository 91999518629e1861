"""Detection data: COCO instances (boxes, masks) as torchvision detection targets."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from finetune.det_config import DetectionConfig


class CocoInstances(Dataset):
    """COCO instance annotations -> (image tensor in [0, 1], torchvision target dict)."""

    def __init__(self, image_dir: Path, ann_file: Path, train: bool, hflip: float = 0.5):
        import contextlib
        import io

        from pycocotools.coco import COCO

        with contextlib.redirect_stdout(io.StringIO()):
            self.coco = COCO(str(ann_file))
        self.image_dir, self.train, self.hflip = image_dir, train, hflip
        self.ids = sorted(self.coco.imgs)
        self.cat_ids = sorted(self.coco.cats)
        self.cat_to_label = {c: i + 1 for i, c in enumerate(self.cat_ids)}
        self.label_to_cat = [0, *self.cat_ids]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        import numpy as np
        from torchvision.transforms.functional import pil_to_tensor

        img_id = self.ids[i]
        info = self.coco.imgs[img_id]
        img = pil_to_tensor(Image.open(self.image_dir / info["file_name"]).convert("RGB"))
        anns = [a for a in self.coco.imgToAnns[img_id] if not a.get("iscrowd", 0)]
        boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                               a["bbox"][1] + a["bbox"][3]] for a in anns],
                             dtype=torch.float32).reshape(-1, 4)
        masks = torch.from_numpy(np.stack([self.coco.annToMask(a) for a in anns])) if anns \
            else torch.zeros(0, info["height"], info["width"], dtype=torch.uint8)
        target = {"boxes": boxes, "masks": masks, "image_id": img_id,
                  "labels": torch.tensor([self.cat_to_label[a["category_id"]] for a in anns],
                                         dtype=torch.int64)}
        if self.train and torch.rand(()) < self.hflip:
            w = img.shape[-1]
            img, target["masks"] = img.flip(-1), target["masks"].flip(-1)
            target["boxes"] = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0],
                                           boxes[:, 3]], 1)
        keep = (target["boxes"][:, 2] > target["boxes"][:, 0]) & \
               (target["boxes"][:, 3] > target["boxes"][:, 1])
        for k in ("boxes", "masks", "labels"):
            target[k] = target[k][keep]
        return img.float() / 255, target


def collate(batch):
    """(images, targets) of a detection batch: images differ in size, so they stay a tuple
    of tensors (torchvision's detectors take a list of images and a list of targets)."""
    return tuple(zip(*batch))


def build_datasets(cfg: DetectionConfig) -> tuple[CocoInstances, CocoInstances]:
    """(train, val) for ``data.kind``; the demo set is generated on first use."""
    d = cfg.data
    if d.kind == "demo":
        from finetune.demo_data import ensure_shapes_coco

        root = ensure_shapes_coco(d.cache_dir, d.demo_train, d.demo_val, d.demo_size)
        paths = (root / "train", root / "annotations/instances_train.json",
                 root / "val", root / "annotations/instances_val.json")
    else:
        root = Path(d.root)
        paths = (root / d.train_images, root / d.train_ann, root / d.val_images,
                 root / d.val_ann)
    for p in paths:
        if not p.exists():
            raise FileNotFoundError(f"data: {p} does not exist")
    return (CocoInstances(paths[0], paths[1], True, d.hflip),
            CocoInstances(paths[2], paths[3], False))
