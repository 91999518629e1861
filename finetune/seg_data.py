"""Segmentation data: dataset layouts (demo, ADE20K, Cityscapes, Mapillary Vistas,
COCO-Stuff) and mmsegmentation's training transforms (rescale, crop with
``cat_max_ratio``, flip, photometric distortion, normalise, pad to the crop size), in the
order the released recipes use them.

Data faults: images without a label file are a config error when the pairs are listed
(:func:`check_data`, before anything is built); a file that lists but cannot be read is
replaced by the next readable pair in training (logged, naming it) and ends an
evaluation, naming it (:class:`SegDataset`); a training label map holding a value that is
no class ends the run in one line naming the file (:class:`LabelRangeError`)."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from finetune.data_files import NextReadable, agreed_set, read_image
from finetune.data_paths import DataPath, check_data_paths
from finetune.datasets.base import IGNORE_INDEX, UnlabelledImages
from finetune.seg_config import SPLIT_NAMES, SegDataConfig
from models.constants import IMAGENET_MEAN, IMAGENET_STD
from runtime.loop import RefusedStart

# images stay on the 0..255 scale here (mmseg's recipe), so ImageNet's statistics are too
MEAN = torch.tensor([255 * m for m in IMAGENET_MEAN]).view(3, 1, 1)
STD = torch.tensor([255 * s for s in IMAGENET_STD]).view(3, 1, 1)


def _split_pairs(kind: str, root: Path, split: str, cfg: SegDataConfig) -> list[tuple]:
    """(image, label, label lookup table or None) of one split of a ``kind`` layout."""
    if kind == "demo":
        from finetune.demo_data import ensure_shapes_ade

        root = ensure_shapes_ade(cfg.cache_dir, cfg.demo_train, cfg.demo_val, cfg.demo_size)
    if kind == "cityscapes":
        from finetune.datasets.cityscapes import cityscapes_pairs

        return cityscapes_pairs(root, split)
    if kind == "mapillary":
        from finetune.datasets.mapillary import cityscapes_lut, class_names, mapillary_pairs

        return mapillary_pairs(root, split, cityscapes_lut(class_names(root)))
    if kind == "cocostuff":
        from finetune.datasets.cocostuff import cocostuff_pairs

        return cocostuff_pairs(root, split)
    from finetune.datasets.ade20k import ade20k_pairs

    return ade20k_pairs(root, split)


# kind -> (its name, the image folder of a split and the files it holds, the label folder)
LAYOUTS = {"ade20k": ("ADE20K", "images/{}", "*.jpg", "annotations/{}"),
           "cityscapes": ("Cityscapes", "leftImg8bit/{}", "*/*_leftImg8bit.png", "gtFine/{}"),
           "mapillary": ("Mapillary Vistas", "{}/images", "*.jpg", "{}/labels"),
           "cocostuff": ("COCO-Stuff-164k", "images/{}", "*.jpg", "annotations/{}")}


def _layout_paths(kind: str, key: str, root: Path, splits: list[str]) -> list[DataPath]:
    """What :func:`_split_pairs` opens for ``splits`` of a ``kind`` layout at ``root``
    (``key``: the config key that sets ``root``)."""
    if kind == "demo":
        return []
    name, images, pattern, labels = LAYOUTS[kind]
    tops = sorted({images.format(s).split("/")[0] + "/" for s in splits}
                  | {labels.format(s).split("/")[0] + "/" for s in splits})
    out = [DataPath(key, root, f"the {name} folder holding {', '.join(tops)}")]
    for split in splits:
        label_dir = root / labels.format(split)
        if kind == "mapillary":  # a v2.0 release keeps the v1.2 labels one level down
            from finetune.datasets.mapillary import labels_dir

            label_dir = labels_dir(root, split)
        out += [DataPath(key, root / images.format(split), f"the {split} images of {name}, "
                         f"{pattern}", holds=pattern, holds_desc=f"holds no {pattern} "
                         "images"),
                DataPath(key, label_dir, f"the {split} label maps of {name}")]
    return out


def data_paths(cfg: SegDataConfig, val_only: bool = False) -> list[DataPath]:
    """The local folders the training and evaluation sets read (finetune/data_paths.py):
    each layout's root, then per split its image folder (holding at least one image) and
    its label folder (the evaluation set's alone with ``val_only``); nothing for the demo
    (generated on first use)."""
    train_splits = cfg.train_splits or [SPLIT_NAMES[cfg.kind][0]]
    val_key = "data.val_root" if cfg.val_root else "data.root"
    train = [] if val_only else _layout_paths(cfg.kind, "data.root", Path(cfg.root),
                                              train_splits)
    return train + _layout_paths(cfg.eval_kind, val_key, Path(cfg.eval_root),
                                 [SPLIT_NAMES[cfg.eval_kind][1]])


def check_data(cfg, thorough: bool = True, val_only: bool = False) -> None:
    """Refuse, before anything is built, a segmentation run's missing data folders, then
    images without their label file (a ``ValueError`` naming the key and the path;
    ``cfg``: SegmentationConfig). The pairing lists each image and label folder once
    (the listing the datasets make again when they are built), never a stat per file: as
    cheap as the folder checks, so done at submit too (``thorough`` changes nothing).
    ``val_only`` (``--eval-only``): the evaluation set's alone."""
    d = cfg.data
    check_data_paths(data_paths(d, val_only))
    if d.kind != "demo" and not val_only:  # the demo set is generated, on first use
        _pairs(d, train=True)
    if d.eval_kind != "demo":
        _pairs(d, train=False)


def _pairs(cfg: SegDataConfig, train: bool) -> list[tuple[Path, Path, np.ndarray | None]]:
    """The training pairs (every ``train_splits`` split) or the evaluation pairs (the val
    split of ``val_kind`` / ``val_root`` when set); images without a label file are an
    :class:`UnlabelledImages` naming the config key of their root."""
    key = "data.root" if train or not cfg.val_root else "data.val_root"
    try:
        if train:
            splits = cfg.train_splits or [SPLIT_NAMES[cfg.kind][0]]
            return [pair for split in splits
                    for pair in _split_pairs(cfg.kind, Path(cfg.root), split, cfg)]
        return _split_pairs(cfg.eval_kind, Path(cfg.eval_root), SPLIT_NAMES[cfg.eval_kind][1],
                            cfg)
    except UnlabelledImages as err:
        raise UnlabelledImages(f"{key}: {err}") from None


def reduce_zero_label(label: torch.Tensor) -> torch.Tensor:
    """``data.reduce_zero_label`` (ADE20K: 0 is "other"): stored ids 1..N become classes
    0..N-1, and 0 the ignore index; a stored 255 stays the ignore index. As mmseg 0.27's
    ``LoadAnnotations`` (mmseg/datasets/pipelines/loading.py: 0 -> 255, minus 1 on
    uint8, then 254 -> 255), the pipeline of the released segmentation configs."""
    return torch.where((label == 0) | (label == IGNORE_INDEX), IGNORE_INDEX, label - 1)


class LabelRangeError(RefusedStart):
    """A training label that is neither a class id (0 .. ``data.num_classes - 1``) nor the
    ignore index: every head's loss would index past its classes (on a GPU a device-side
    assert that kills the process). Raised where the label map is read
    (:func:`check_label_range`, a DataLoader worker when ``run.num_workers`` > 0), so the
    message names the file; the command line reports it in one line, exit 2, as a refused
    start (``launch.commands.refusals.refusal_line`` takes the message out of the
    worker's traceback that torch re-raises it with). The other ranks, inside
    collectives, are ended by torchrun or srun's ``--kill-on-bad-exit`` (set by
    launch/slurm/executor.py); a bare srun without it leaves them to the process group's
    timeout."""


def check_label_range(label: torch.Tensor, num_classes: int, label_path: Path,
                      img_path: Path, reduced: bool = False) -> None:
    """Raise :class:`LabelRangeError` when ``label`` (a training label map, after
    ``data.reduce_zero_label`` and any lookup table: the values the loss sees) holds a
    value outside [0, ``num_classes``) other than the ignore index: the label file and
    its image named, the value (the largest bad one) and how many pixels hold it.
    ``reduced``: whether ``reduce_zero_label`` made ``label`` (the message then also
    gives the stored value).

    Cost: one ``bincount`` pass over the map in the loader worker, 0.36 ms for a 512 x 512
    int64 map on one CPU thread (the reduce_zero_label mapping before it: 0.8 ms; reading
    the image and label files: several ms)."""
    try:
        counts = torch.bincount(label.flatten())
    except RuntimeError:  # a negative value (a lookup table's): bincount takes none
        counts = None
    if counts is not None:
        present = counts.nonzero().flatten()
        bad = present[(present >= num_classes) & (present != IGNORE_INDEX)]
        if len(bad) == 0:
            return
        value = int(bad[-1])
        pixels = int(counts[value])
    else:
        value = int(label.min())
        pixels = int((label == value).sum())
    stored = f" (stored as {value + 1}, before data.reduce_zero_label)" \
        if reduced and value >= 0 else ""
    fix = (f"set data.num_classes to the dataset's class count (at least {value + 1} for "
           "this value) or fix the label map" if value >= 0 else "fix the label map")
    raise LabelRangeError(
        f"segmentation: training label map {label_path} (image {img_path}) holds the "
        f"value {value}{stored} in {pixels} pixels, outside the classes 0 .. "
        f"data.num_classes - 1 = {num_classes - 1} (and not the ignore index "
        f"{IGNORE_INDEX}); {fix}")


def agreed_seg_set(cfg: SegDataConfig, train: bool) -> SegDataset:
    """The training or validation :class:`SegDataset`, built on every rank and its pairs
    agreed on (``finetune.data_files.agreed_set``: one rank's failed listing or other
    files end every rank together). Collective."""
    from runtime.dist import all_gather_objects

    return agreed_set("training" if train else "validation", lambda: SegDataset(cfg, train),
                      lambda dataset: dataset.pairs, cfg.root if train else cfg.eval_root,
                      all_gather_objects)


class SegDataset(Dataset):
    """(normalised image, label map with 255 = ignore); train: rescale, crop, flip,
    photometric distortion, normalise, then pad to ``crop_size`` (image 0, label 255, at
    the bottom and right), mmseg's order; evaluation: the whole image, normalised.

    A pair whose image or label cannot be read (truncated, not an image; the file is
    named): in training the next readable pair takes its place
    (``finetune.data_files.NextReadable``); in evaluation it ends the run
    (:class:`UnreadableFile`): an mIoU over fewer images than the split holds would not be
    the benchmark's number. A training label map holding a value that is no class ends the
    run naming the file (:class:`LabelRangeError`), never replaced: the set or
    ``data.num_classes`` is wrong, not one file.
    """

    def __init__(self, cfg: SegDataConfig, train: bool):
        self.cfg, self.train = cfg, train
        self.replace = NextReadable("pair")
        self.pairs = _pairs(cfg, train)
        if not self.pairs:
            kind, where = (cfg.kind, cfg.root) if train else (cfg.eval_kind, cfg.eval_root)
            raise FileNotFoundError(f"data: no {kind} images found under {where or 'demo'}")

    def __len__(self) -> int:
        return len(self.pairs)

    def _load(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        from finetune.datasets.base import read_label

        img_path, label_path, lut = self.pairs[i]
        img = torch.from_numpy(read_image(img_path)).permute(2, 0, 1)
        label = torch.from_numpy(read_label(label_path, lut))
        if self.cfg.reduce_zero_label:
            label = reduce_zero_label(label)
        if self.train:  # evaluation leaves such pixels out, as mmseg (finetune/metrics.py)
            check_label_range(label, self.cfg.num_classes, label_path, img_path,
                              self.cfg.reduce_zero_label)
        return img.float(), label

    @property
    def skipped(self) -> int:
        """Unreadable training pairs replaced by this process (each worker its own; the
        run's count travels with the items: :meth:`counted_item`)."""
        return self.replace.skipped

    def _readable(self, i: int) -> tuple[tuple[torch.Tensor, torch.Tensor], int]:
        """(pair ``i`` as read, unreadable pairs replaced); in training the next readable
        one where it cannot be read."""
        if not self.train:
            return self._load(i), 0
        _, pair, replaced = self.replace.read_counted(self._load, i, len(self.pairs))
        return pair, replaced

    def __getitem__(self, i: int):
        return self.counted_item(i)[0]

    def counted_item(self, i: int) -> tuple[tuple[torch.Tensor, torch.Tensor], int]:
        """(item ``i``, how many unreadable pairs it replaced): the count is made where the
        item is read (a DataLoader worker) and travels with it to the training loop
        (``finetune.dense_data.CountedItems``)."""
        (img, label), replaced = self._readable(i)
        c = self.cfg
        if self.train:
            ratio = random.uniform(*c.ratio_range)
            img, label = resize_short_side(img, label, int(c.scale_short * ratio),
                                           int(c.scale_long * ratio))
            img, label = random_crop(img, label, c.crop_size, c.cat_max_ratio)
            if random.random() < c.hflip:
                img, label = img.flip(-1), label.flip(-1)
            if c.photometric:
                from finetune.photometric import photometric_distortion

                img = photometric_distortion(img)
        img = (img - MEAN) / STD
        if self.train:  # after Normalize, as mmseg: the padding is exactly 0
            img, label = pad_to_crop(img, label, c.crop_size)
        return (img, label), replaced


def rescale_size(h: int, w: int, short: int, long: int = 0) -> tuple[int, int]:
    """(height, width) of an (h, w) image rescaled, aspect kept, as large as fits a short
    side of ``short`` and a long side of ``long`` (0: no cap).

    mmseg's ``Resize(keep_ratio=True)`` calls mmcv's ``imrescale``, whose ``rescale_size``
    (mmcv 1.5 ``mmcv/image/geometric.py``, what InternImage's segmentation installs) takes
    the factor ``min(long / max(h, w), short / min(h, w))`` and rounds each side with
    ``_scale_size``: ``int(side * factor + 0.5)``, halves up (Python's ``round`` would
    round them to even)."""
    s = short / min(h, w)
    if long:
        s = min(long / max(h, w), s)
    return max(1, int(h * s + 0.5)), max(1, int(w * s + 0.5))


def _bilinear(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, C, H, W) resized to ``size``: mmcv's ``imresize`` default (cv2 ``INTER_LINEAR``:
    half-pixel centres, no anti-aliasing); a no-op at the same size."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size, mode="bilinear", align_corners=False)


def resize_short_side(img: torch.Tensor, label: torch.Tensor, short: int, long: int = 0):
    """Rescale (aspect kept) so the short side is ``short`` and the long side at most
    ``long`` (0: no cap); sizes as mmcv's ``rescale_size`` (``rescale_size`` here)."""
    size = rescale_size(*img.shape[-2:], short, long)
    img = _bilinear(img[None], size)[0]
    label = F.interpolate(label[None, None].float(), size, mode="nearest")[0, 0].long()
    return img, label


def crop_is_dominated(label: torch.Tensor, cat_max_ratio: float) -> bool:
    """Whether one class covers more than ``cat_max_ratio`` of the labelled pixels (or
    fewer than two classes are present): mmseg's criterion for retrying a crop."""
    counts = torch.bincount(label[label != IGNORE_INDEX].flatten())
    counts = counts[counts > 0]
    return len(counts) < 2 or counts.max().item() / counts.sum().item() >= cat_max_ratio


def random_crop(img: torch.Tensor, label: torch.Tensor, crop: tuple[int, int],
                cat_max_ratio: float = 1.0):
    """A random window of ``crop`` = (h, w), cut to the image where a side is shorter (no
    padding: :func:`pad_to_crop` pads after normalisation); with ``cat_max_ratio`` < 1 a
    window dominated by one class (:func:`crop_is_dominated`) is redrawn, at most 10 times.

    As mmseg 0.27's ``RandomCrop`` (mmseg/datasets/pipelines/transforms.py, the
    ``RandomCrop(crop_size, cat_max_ratio=0.75)`` of OpenGVLab/InternImage
    segmentation/configs/_base_/datasets/ade20k.py): each draw takes the top offset, then
    the left one, uniform in [0, max(side - crop, 0)]; the window is checked and redrawn up
    to 10 times, so when all 10 are dominated the 11th draw is kept unchecked."""
    ch, cw = crop
    h, w = img.shape[-2:]

    def draw() -> tuple[int, int]:
        return random.randint(0, max(h - ch, 0)), random.randint(0, max(w - cw, 0))

    y, x = draw()
    if cat_max_ratio < 1:
        for _ in range(10):
            if not crop_is_dominated(label[y:y + ch, x:x + cw], cat_max_ratio):
                break
            y, x = draw()
    return img[:, y:y + ch, x:x + cw], label[y:y + ch, x:x + cw]


def pad_to_crop(img: torch.Tensor, label: torch.Tensor, crop: tuple[int, int]):
    """A NORMALISED (C, h, w) image padded with 0 and its label with the ignore index, at
    the bottom and the right, to ``crop`` = (H, W) (every side at most ``crop``'s: a
    :func:`random_crop` window): mmseg's ``Pad(size=crop_size, pad_val=0,
    seg_pad_val=255)`` after ``Normalize`` in the released training pipelines
    (OpenGVLab/InternImage segmentation/configs/_base_/datasets/ade20k.py,
    cityscapes.py, the Mask2Former configs), mmcv's ``impad`` placing the image at the top
    left. Padding after the flip and the photometric distortion keeps it at the right and
    exactly 0 (the mean colour) for the convolutions and BatchNorm, which see it (the loss
    ignores it); every training item then has the one size the collate stacks."""
    ph, pw = crop[0] - img.shape[-2], crop[1] - img.shape[-1]
    if ph < 0 or pw < 0:
        raise ValueError(f"pad_to_crop: a {tuple(img.shape[-2:])} image is larger than "
                         f"data.crop_size {tuple(crop)}")
    if ph == 0 and pw == 0:
        return img, label
    return (F.pad(img, (0, pw, 0, ph), value=0.0),
            F.pad(label, (0, pw, 0, ph), value=IGNORE_INDEX))


def resize_to_multiple(x: torch.Tensor, divisor: int) -> torch.Tensor:
    """Stretch (B, C, H, W) up to the next multiple of ``divisor`` per side (mmseg's
    ``ResizeToMultiple``); a no-op for divisor 0 or sizes already multiples."""
    if not divisor:
        return x
    h, w = x.shape[-2:]
    return _bilinear(x, (math.ceil(h / divisor) * divisor, math.ceil(w / divisor) * divisor))


def eval_view(img: torch.Tensor, short: int, long: int = 0, divisor: int = 0,
               ratio: float = 1.0) -> torch.Tensor:
    """(1, C, h, w): the test view of one ORIGINAL (C, H, W) image at ``ratio`` of the test
    scale, as mmseg's ``MultiScaleFlipAug`` + ``Resize(keep_ratio=True)`` +
    ``ResizeToMultiple`` make it (mmseg 0.27 ``datasets/pipelines/test_time_aug.py``,
    ``transforms.py``; OpenGVLab/InternImage ``segmentation/configs``).

    The test scale ``img_scale=(long, short)`` times ``ratio``, each side truncated
    (``int(side * ratio)``, MultiScaleFlipAug's mode 2; ``short`` 0 "as loaded": the
    image's own sides, its mode 1), bounds a rescale of the original (``rescale_size``,
    bilinear), which is then stretched up to a multiple of ``divisor`` (0: not), a second
    bilinear resampling as ``ResizeToMultiple``'s. Ratio 1 is the single-scale input; every
    multi-scale view is made from the original, never from another view.
    """
    h, w = img.shape[-2:]
    if not short:
        short, long = min(h, w), max(h, w)
    size = rescale_size(h, w, int(short * ratio), int(long * ratio))
    return resize_to_multiple(_bilinear(img[None], size), divisor)
