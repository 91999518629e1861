"""Detection data: COCO instances (boxes, masks) as torchvision detection targets.

Data faults: an image the annotation file names but its image folder lacks (a partial
copy, a cut download) is a config error at the start checks (:func:`check_data`, before
anything is built), found from one listing of the folder, and so is an annotation file
with entries the readers cannot use (:func:`_refuse_unusable`); an image that exists but
cannot be decoded is replaced by the next readable item in training (logged, naming it)
and ends an evaluation, naming it (:class:`CocoInstances`)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch.utils.data import Dataset

from finetune.data_files import NextReadable, first_few, listed_names, read_image
from finetune.data_paths import DataPath, check_data_paths
from finetune.det_config import DetCropAugConfig, DetectionConfig

# annotation file -> ((size, mtime_ns), its parsed JSON): what the start check parsed, left
# for the dataset built next from the same file in this process, so COCO train2017's
# ~450 MB are parsed once (~15 s) and not twice (see check_data)
_PARSED: dict[Path, tuple[tuple[int, int], dict]] = {}


class MissingImages(ValueError):
    """Images an annotation file names that its image folder lacks: a config error raised
    by the start checks, before anything is built (a ``ValueError``, as every data check
    that ``internimage finetune`` reports in one line)."""


def _read_json(path: Path) -> object:
    """``path`` parsed as JSON (bytes in: json detects UTF-8/16/32 as pycocotools' read
    does for UTF-8)."""
    return json.loads(path.read_bytes())


def _annotations(ann_file: Path, keep: bool = False) -> dict:
    """The parsed annotation file ``ann_file``: the copy the start check kept when the file
    has not changed since (taken, not kept twice), else parsed now; ``keep``: left for the
    dataset built next from it. A ``ValueError`` when it is not a JSON object."""
    path = Path(ann_file).resolve()
    st = path.stat()
    stamp = (st.st_size, st.st_mtime_ns)
    kept = _PARSED.pop(path, None)
    if kept is not None and kept[0] == stamp:
        data = kept[1]
    else:
        try:
            data = _read_json(path)
        except ValueError as err:  # JSONDecodeError, UnicodeDecodeError: a cut download
            raise ValueError(f"{path} is not valid JSON ({err})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path} holds a JSON {type(data).__name__}, not COCO's object "
                             "of images, annotations and categories")
    if keep:
        _PARSED[path] = (stamp, data)
    return data


def _coco(ann_file: Path):
    """pycocotools' ``COCO`` index of ``ann_file`` (parsed once, see :func:`_annotations`)."""
    import contextlib
    import io

    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = _annotations(ann_file)
    with contextlib.redirect_stdout(io.StringIO()):  # its "creating index..." lines
        coco.createIndex()
    return coco


def missing_images(image_dir: Path, file_names: list[str]) -> list[str]:
    """The ``file_names`` (relative to ``image_dir``, maybe with a sub-folder) that are not
    in ``image_dir``: one listing per folder they name, no file looked at one by one (a
    stat per image costs ~1 ms on a network filesystem, two minutes for COCO train2017)."""
    listed: dict[str, frozenset[str]] = {}  # sub-folder ('' for image_dir) -> its names
    missing = []
    for name in file_names:
        folder, _, base = name.rpartition("/")
        if folder not in listed:
            listed[folder] = listed_names(image_dir / folder if folder else image_dir)
        if base not in listed[folder]:
            missing.append(name)
    return missing


class CocoInstances(Dataset):
    """COCO instance annotations -> (image tensor in [0, 1], torchvision target dict).

    Training draws, in the released pipelines' order: a horizontal flip (``hflip``), then,
    if ``crop_aug`` is given and on, its resize-and-crop branch (``resize_and_crop``). The
    draws use torch's default generator, which the loader seeds per worker. A crop left
    without boxes under ``crop_aug.allow_negative_crop=False`` is replaced by item ``j``, a
    uniform draw over the images of item ``i``'s aspect group (``i`` included), and so on,
    as mmdet's ``CustomDataset.__getitem__`` / ``_rand_another`` do. Training only, as
    mmdet 2.x ``CocoDataset._filter_imgs`` (open-mmlab/mmdetection mmdet/datasets/coco.py,
    called by ``CustomDataset.__init__`` unless ``test_mode``): ``filter_empty_gt`` keeps
    the images with at least one annotation of the dataset's categories, crowd ones
    included; ``min_size`` (mmdet: 32; here 0, off, unless given) keeps those whose
    recorded ``min(width, height) >= min_size``, whatever ``filter_empty_gt`` says.

    A target's boxes are those :func:`in_target` keeps, clipped to the image
    (:func:`clip_boxes`, mmdet's ``Resize``). An evaluation item's target holds
    ``boxes``, ``labels`` and ``image_id``, no ``masks``: the evaluation reads only
    ``image_id`` (COCOeval scores against the annotation file), so the masks are decoded
    for training items alone, and for those only with ``masks`` (what :func:`needs_masks`
    says of the config: Mask R-CNN's mask head learns from them, DINO's head reads only
    boxes and labels); a training target without them is flipped and cropped all the
    same, with the same random draws.

    An image that cannot be decoded (truncated, not an image; the file is named): in
    training the next readable item takes its place
    (``finetune.data_files.NextReadable``), before any random draw of the item (so a
    resume replays the same items and draws); in evaluation it ends the run
    (:class:`UnreadableFile`): an AP over fewer images than the split holds would not be
    the benchmark's number.
    """

    def __init__(self, image_dir: Path, ann_file: Path, train: bool, hflip: float = 0.5,
                 crop_aug: DetCropAugConfig | None = None, filter_empty_gt: bool = False,
                 min_size: int = 0, masks: bool = True):
        self.coco = _coco(Path(ann_file))
        self.image_dir, self.train, self.hflip = image_dir, train, hflip
        self.masks = train and masks  # decode instance masks (annToMask) into the target
        self.replace = NextReadable("image")
        self.crop_aug = crop_aug
        self.ids = sorted(self.coco.imgs)
        self.cat_ids = sorted(self.coco.cats)
        if train and filter_empty_gt:
            cats = set(self.cat_ids)
            with_ann = {a["image_id"] for a in self.coco.anns.values()
                        if a["category_id"] in cats}
            self.ids = [i for i in self.ids if i in with_ann]
        if train and min_size:
            imgs = self.coco.imgs
            self.ids = [i for i in self.ids
                        if min(imgs[i]["width"], imgs[i]["height"]) >= min_size]
        # mmdet's aspect groups (flag 1 where width / height > 1): the indices of each
        self.wide = [self.coco.imgs[i]["width"] / self.coco.imgs[i]["height"] > 1
                     for i in self.ids]
        self.groups = {w: [j for j, x in enumerate(self.wide) if x == w] for w in (False, True)}
        self.cat_to_label = {c: i + 1 for i, c in enumerate(self.cat_ids)}
        self.label_to_cat = [0, *self.cat_ids]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        return self.counted_item(i)[0]

    def counted_item(self, i: int) -> tuple[tuple, int]:
        """(item ``i``, how many unreadable images it replaced, over every crop redrawn):
        the count is made where the item is read (a DataLoader worker) and travels with it
        to the training loop (``finetune.dense_data.CountedItems``)."""
        replaced = 0
        for _ in range(1000):
            i, item, n = self._readable(i)
            replaced += n
            if item is not None:
                return item, replaced
            group = self.groups[self.wide[i]]
            i = group[int(torch.randint(len(group), ()))]
        raise RuntimeError("data.crop_aug.allow_negative_crop=false: 1000 crops in a row "
                           "left no box (images without boxes in the training set?)")

    @property
    def skipped(self) -> int:
        """Unreadable training images replaced by this process (each worker its own; the
        run's count travels with the items: :meth:`counted_item`)."""
        return self.replace.skipped

    def _readable(self, i: int) -> tuple[int, tuple | None, int]:
        """(index, :meth:`_load` of it, unreadable images replaced) for item ``i``; in
        training, for the next item in index order whose image can be read where item
        ``i``'s cannot."""
        if not self.train:
            return i, self._load(i), 0
        return self.replace.read_counted(self._load, i, len(self.ids))

    def _load(self, i: int):
        """Item ``i`` through the pipeline; None for a crop left without boxes when the
        crop branch does not allow that. Its image is read first, before any random draw:
        an :class:`UnreadableFile` (naming it) leaves the generator as it was."""
        import numpy as np

        img_id = self.ids[i]
        info = self.coco.imgs[img_id]
        img = torch.from_numpy(read_image(self.image_dir / info["file_name"])).permute(2, 0, 1)
        anns = [a for a in self.coco.imgToAnns[img_id]
                if in_target(a, info["width"], info["height"])]
        boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                               a["bbox"][1] + a["bbox"][3]] for a in anns],
                             dtype=torch.float32).reshape(-1, 4)
        target = {"boxes": clip_boxes(boxes, *img.shape[-2:]), "image_id": img_id,
                  "labels": torch.tensor([self.cat_to_label[a["category_id"]] for a in anns],
                                         dtype=torch.int64)}
        if not self.train:
            # the evaluation reads only image_id of its targets (COCOeval reads the
            # annotation file): decoding COCO val's 36k masks, up to full image size, for
            # each evaluation would be time and memory spent on nothing
            return img.float() / 255, target
        boxes = target["boxes"]
        if self.masks:  # COCO: ~7 image-size masks an item, for a head that uses them
            target["masks"] = torch.from_numpy(
                np.stack([self.coco.annToMask(a) for a in anns])) if anns else \
                torch.zeros(0, info["height"], info["width"], dtype=torch.uint8)
        if torch.rand(()) < self.hflip:
            w = img.shape[-1]
            img = img.flip(-1)
            if self.masks:
                target["masks"] = target["masks"].flip(-1)
            target["boxes"] = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0],
                                           boxes[:, 3]], 1)
        # prob 0 draws nothing: the flips of a run without the branch stay as they were
        aug = self.crop_aug
        if aug is not None and aug.prob > 0 and torch.rand(()) < aug.prob:
            img, target = resize_and_crop(img, target, aug)
            if not aug.allow_negative_crop and len(target["boxes"]) == 0:
                return None
        return img.float() / 255, target


def in_target(ann: dict, width: int, height: int) -> bool:
    """Whether annotation ``ann`` of a ``width`` x ``height`` image reaches its item's
    target (what training learns from), by the rules of mmdet 2.28.1's
    ``CocoDataset._parse_ann_info`` (open-mmlab/mmdetection mmdet/datasets/coco.py; the
    mmdet version of OpenGVLab/InternImage detection/README.md): not marked ``ignore``; its box
    ``[x, y, w, h]`` overlapping the image by some area; ``area`` > 0 (where the entry
    has one: mmdet's KeyError otherwise), ``w`` >= 1 and ``h`` >= 1; not ``iscrowd``.

    mmdet keeps crowd boxes aside as ``gt_bboxes_ignore``; a torchvision-style target has
    no such boxes, and the released recipes use none either (Mask R-CNN's assigners have
    ``ignore_iof_thr=-1``; DINO's head takes no ignore boxes), so a crowd entry is left
    out like the rest. mmdet's last rule, a ``category_id`` outside the dataset's classes,
    never applies here: the classes are the file's categories, and the start check
    refuses an annotation of any other (``_annotation_fault``), where mmdet would drop it
    without a word."""
    if ann.get("ignore", False) or ann.get("iscrowd", 0):
        return False
    x, y, w, h = ann["bbox"]
    if min(x + w, width) - max(x, 0) <= 0 or min(y + h, height) - max(y, 0) <= 0:
        return False  # no overlap with the image
    return ann.get("area", 1) > 0 and w >= 1 and h >= 1


def clip_boxes(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``boxes`` (N, 4 xyxy pixels) clipped to a ``height`` x ``width`` image: x to
    [0, width], y to [0, height], as mmdet 2.28.1's ``Resize._resize_bboxes`` clips
    the loaded boxes with its default ``bbox_clip_border=True``
    (open-mmlab/mmdetection mmdet/datasets/pipelines/transforms.py). A box that clipping
    leaves without area is kept, as Resize keeps it (only ``RandomCrop`` drops such
    boxes); none of a target's boxes is one, since :func:`in_target` keeps only boxes
    that overlap their image by some area.

    Clipping to the image as loaded gives the boxes mmdet clips after its resize: the
    resize scales x and the width by one factor, y and the height by another, so clipping
    before or after it is the same box; a horizontal flip maps [0, width] onto itself, so
    clipping before it (DINO's pipeline flips before it resizes) is the same too."""
    return torch.stack([boxes[:, 0].clamp(0, width), boxes[:, 1].clamp(0, height),
                        boxes[:, 2].clamp(0, width), boxes[:, 3].clamp(0, height)], 1)


def resize_and_crop(img: torch.Tensor, target: dict,
                    aug: DetCropAugConfig) -> tuple[torch.Tensor, dict]:
    """The crop branch of mmdet's DETR-style ``AutoAugment``, up to its last resize.

    ``img``: (3, H, W); ``target``: ``boxes`` (xyxy pixels), ``labels`` and, where the
    dataset decodes them, ``masks`` (N, H, W) (a target without them: the same draws).
    Resize to a shorter side drawn from ``aug.resize_sizes`` (longer side <= ``aug.max_size``),
    then mmdet 2.x ``RandomCrop(crop_type='absolute_range', allow_negative_crop=True)``
    (open-mmlab/mmdetection mmdet/datasets/pipelines/transforms.py): crop height and width
    drawn independently and uniformly from the integers [min(side, lo), min(side, hi)], the
    offset uniformly from [0, side - crop]; boxes shifted and clipped to the crop, those left
    without area dropped with their masks and labels; a crop with no box left is kept.
    """
    from torchvision import tv_tensors
    from torchvision.transforms.v2 import functional as F

    h, w = img.shape[-2:]
    short = aug.resize_sizes[int(torch.randint(len(aug.resize_sizes), ()))]
    scale = min(short / min(h, w), aug.max_size / max(h, w))
    size = [int(h * scale + 0.5), int(w * scale + 0.5)]  # mmcv.imrescale's rounding
    boxes = tv_tensors.BoundingBoxes(target["boxes"], format="XYXY", canvas_size=(h, w),
                                     clamping_mode="hard")
    # antialias off: mmcv resizes with cv2's bilinear, which does not antialias
    img = F.resize(img, size, antialias=False)
    boxes = F.resize(boxes, size)

    lo, hi = aug.crop_size
    crop_h, crop_w = (int(torch.randint(min(s, lo), min(s, hi) + 1, ())) for s in size)
    top = int(torch.randint(size[0] - crop_h + 1, ()))
    left = int(torch.randint(size[1] - crop_w + 1, ()))
    img = F.crop(img, top, left, crop_h, crop_w)
    boxes = F.crop(boxes, top, left, crop_h, crop_w).as_subclass(torch.Tensor)  # clipped
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    out = {**target, "boxes": boxes[keep], "labels": target["labels"][keep]}
    if "masks" in target:
        masks = F.resize(tv_tensors.Mask(target["masks"]), size)  # nearest, as mmdet's masks
        masks = F.crop(masks, top, left, crop_h, crop_w).as_subclass(torch.Tensor)
        out["masks"] = masks[keep]
    return img, out


def collate(batch):
    """(images, targets) of a detection batch: images differ in size, so they stay a tuple
    of tensors (torchvision's detectors take a list of images and a list of targets)."""
    return tuple(zip(*batch))


_SPLITS = (("training", "train_images", "train_ann"), ("validation", "val_images", "val_ann"))


def data_paths(cfg: DetectionConfig, val_only: bool = False) -> list[DataPath]:
    """What the COCO readers of ``data.kind=coco`` open (finetune/data_paths.py), in the
    order a user would fix them: the root, then each split's annotation file and image
    folder (the validation split's alone with ``val_only``; nothing for the demo,
    generated on first use)."""
    d = cfg.data
    if d.kind == "demo":
        return []
    root = Path(d.root)
    out = [DataPath("data.root", root, "the COCO folder holding train2017/, val2017/ and "
                    "annotations/")]
    for split, images, ann in _SPLITS[1:] if val_only else _SPLITS:
        out += [DataPath(f"data.{ann}", root / getattr(d, ann), f"COCO's instance "
                         f"annotation JSON of the {split} images", kind="file"),
                DataPath(f"data.{images}", root / getattr(d, images), f"the folder of the "
                         f"{split} images its annotation file names")]
    return out


def check_data(cfg: DetectionConfig, thorough: bool = True, val_only: bool = False) -> None:
    """Refuse, before anything is built, COCO paths that are missing, then an annotation
    file that is not JSON, then one whose entries the readers cannot use (see
    :func:`_refuse_unusable`: how many of how many, the first and what is wrong with it),
    then images an annotation file names that its image folder lacks (a ``ValueError``
    naming the key: how many of how many, the folder, the first few).

    The annotation files are parsed here, ~15 s for COCO train2017's ~450 MB, and the
    parse is kept for the dataset built next from the same file in this process (the
    ``internimage finetune`` start, then ``train``), which would otherwise parse it again:
    the start costs no more than before. ``thorough=False`` (``internimage submit`` on a
    login node, see ``finetune.init.start_checks``): the paths only, no parse. The entries
    are checked in one Python pass over the parse (~2 s for train2017's 860k annotations);
    the images are compared with one listing per folder. ``val_only`` (``--eval-only``): the
    validation split's alone."""
    check_data_paths(data_paths(cfg, val_only))
    d = cfg.data
    if d.kind == "demo" or not thorough:  # demo: generated, complete, on first use
        return
    root = Path(d.root)
    checked = set()
    categories = {}
    try:
        for _, images, ann in _SPLITS[1:] if val_only else _SPLITS:
            ann_file, image_dir = root / getattr(d, ann), root / getattr(d, images)
            try:
                data = _annotations(ann_file, keep=True)
                names = _file_names(data, ann_file)
                # the validation file is also read by COCOeval (finetune/metrics.py);
                # the masks only by a head that learns and predicts them (Mask R-CNN)
                _refuse_unusable(data, ann_file, evaluated=ann == "val_ann",
                                 masks=needs_masks(cfg))
            except ValueError as err:
                raise ValueError(f"data.{ann}: {err}") from None
            categories[ann] = (ann_file, {c["id"]: c.get("name") for c in
                                          data.get("categories", [])})
            checked.add(ann_file.resolve())
            _refuse_missing(f"data.{images}", image_dir, ann_file, names)
        if not val_only:
            refuse_other_categories(*categories["train_ann"], *categories["val_ann"])
    except ValueError:
        _PARSED.clear()  # a refused start builds nothing: free the parses
        raise
    for path in set(_PARSED) - checked:  # an earlier check's, that nothing will take now
        del _PARSED[path]


def refuse_other_categories(train_file: Path, train: dict[int, object], val_file: Path,
                            val: dict[int, object]) -> None:
    """Raise a ``ValueError`` naming ``data.val_ann`` when the two annotation files'
    categories (id -> name) differ: the classes are the training file's (label i = its
    i-th category id), while an evaluation maps predicted labels back to category ids with
    the validation file's list, so a different list scored a class as another one, or
    failed at the first evaluation. mmdet's ``CocoDataset`` takes one class list for both
    splits (``get_cat_ids(cat_names=CLASSES)``); here they must simply be the same."""
    if train == val:
        return
    only_train = sorted(set(train) - set(val))
    only_val = sorted(set(val) - set(train))
    renamed = sorted(c for c in set(train) & set(val) if train[c] != val[c])
    if only_train:
        first = f"id {only_train[0]} ({_show(train[only_train[0]])}) is only in {train_file}"
    elif only_val:
        first = f"id {only_val[0]} ({_show(val[only_val[0]])}) is only in {val_file}"
    else:
        c = renamed[0]
        first = f"id {c} is {_show(train[c])} in {train_file} but {_show(val[c])} in it"
    raise ValueError(f"data.val_ann: {val_file} lists other categories than data.train_ann "
                     f"({len(val)} vs {len(train)}; {first}); the model's classes are the "
                     "training file's and the evaluation reads its labels back with the "
                     "validation file's: both must list the same (id, name) categories")


def _file_names(data: dict, ann_file: Path) -> list[str]:
    """The ``file_name`` of each entry of the ``images`` list of ``data`` (``ann_file``
    parsed; a file without the list names no image, as pycocotools reads it)."""
    entries = data.get("images", [])
    names = [e.get("file_name") for e in entries if isinstance(e, dict)] \
        if isinstance(entries, list) else []
    if not isinstance(entries, list) or len(names) != len(entries) or \
            not all(isinstance(n, str) for n in names):
        raise ValueError(f"{ann_file}: 'images' must be a list of objects with a file_name, "
                         "as COCO's")
    return names


def _refuse_missing(key: str, image_dir: Path, ann_file: Path, names: list[str]) -> None:
    """Raise :class:`MissingImages` for the ``names`` (those ``ann_file`` names) that
    ``image_dir`` lacks: ``key``, how many of how many, the folder, the first few."""
    missing = missing_images(image_dir, names)
    if not missing:
        return
    raise MissingImages(f"{key}: {len(missing)} of {len(names)} images that {ann_file} "
                        f"names are not in {image_dir} (first: "
                        f"{first_few(missing, len(missing))})")


def _show(value: object) -> str:
    """``value`` as it reads in the JSON file, cut short for a one-line message."""
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _image_fault(img: dict) -> str | None:
    """What keeps image entry ``img`` (an object with a file_name, see
    :func:`_file_names`) from being read, or None."""
    # COCO's format: id, width, height are ints; finetune/metrics.py int()s the id, and
    # CocoInstances divides width by height, sizes empty mask stacks with them
    # (torch.zeros) and pycocotools' annToRLE rasterises polygons at that size
    for key in ("id", "width", "height"):
        if key not in img:
            return f"no {key}"
        value = img[key]
        if not isinstance(value, int) or (key != "id" and value < 1):
            return f"{key} {_show(value)} is not a {'positive ' * (key != 'id')}integer"
    return None


def _segmentation_fault(segm: object, size: tuple[int, int] | None,
                        rles: list) -> str | None:
    """What keeps ``segm`` from becoming a mask through pycocotools' ``annToMask`` (its
    image's (height, width) ``size``, None when no image entry has its image_id), or
    None; a compressed RLE's (counts, size) is added to ``rles``, whose pixels are counted
    for the whole file at once (:func:`_rle_pixels`)."""
    if isinstance(segm, list):
        # COCO's polygons: a list of [x1, y1, x2, y2, ...]. pycocotools' frPyObjects
        # (PythonAPI/pycocotools/_mask.pyx) branches on the FIRST polygon's length: 4
        # numbers read the whole list as boxes (frBbox: every entry then 4 numbers, else
        # the ragged array fails), more than 4 as polygons (frPoly: each np.array(poly,
        # np.double), so numbers only; an odd count or a short later polygon is read as
        # its len // 2 points, no error), fewer raise "input type is not supported", and
        # an empty list fails at pyobj[0]. Only what fails is refused: polygons that
        # pycocotools reads (detectron2 drops odd or short ones with a warning) load
        if not segm:
            return "segmentation is an empty list of polygons"
        first = segm[0]
        if not isinstance(first, list) or len(first) < 4:
            return (f"segmentation polygon 0 {_show(first)} is not x, y pairs (pycocotools "
                    "reads a first polygon of 4 numbers or more)")
        for j, poly in enumerate(segm):
            if not isinstance(poly, list) or (len(first) == 4 and len(poly) != 4):
                return (f"segmentation polygon {j} {_show(poly)} does not fit polygon 0 "
                        f"{_show(first)} (4 numbers: pycocotools reads them all as boxes)"
                        if isinstance(poly, list) else
                        f"segmentation polygon {j} {_show(poly)} is not a list of numbers")
            try:  # sum: a C loop over the numbers, raising on anything else
                sum(poly)
            except TypeError:
                return f"segmentation polygon {j} {_show(poly)} holds a non-number"
        return None
    if not isinstance(segm, dict):
        return f"segmentation {_show(segm)} is neither polygons nor an RLE object"
    # an RLE: pycocotools' annToRLE reads segm['counts'] (KeyError without it), and
    # decode() gives a mask of the RLE's own size, which must be its image's as the
    # masks of one image are stacked (np.stack) and flipped/cropped with it
    rle_size, counts = segm.get("size"), segm.get("counts")
    if not (isinstance(rle_size, list) and len(rle_size) == 2
            and all(isinstance(v, int) and v >= 0 for v in rle_size)):
        return f"segmentation RLE size {_show(rle_size)} is not [height, width]"
    if size is not None and tuple(rle_size) != size:
        return (f"segmentation RLE size {_show(rle_size)} is not its image's [height, "
                f"width] {_show(list(size))}")
    if isinstance(counts, str):  # compressed: its pixels counted per file (_refuse_unusable)
        fault = _compressed_rle_fault(counts)
        if fault is None:
            rles.append((counts, rle_size))
        return fault
    # uncompressed (COCO's crowd regions): frPyObjects makes uint32 run lengths, and
    # rleDecode writes every run, past the mask when they cover more than its pixels
    if not isinstance(counts, list) or \
            not all(isinstance(c, int) and c >= 0 for c in counts):
        return (f"segmentation RLE counts {_show(counts)} is neither a string nor a list "
                "of run lengths")
    if sum(counts) > rle_size[0] * rle_size[1]:
        return (f"segmentation RLE counts cover {sum(counts)} pixels, more than its size "
                f"{_show(rle_size)}")
    return None


# a compressed RLE's characters (pycocotools' maskApi.c rleToString: 6 bits a character,
# ASCII 48..111, bit 0x20 set where the number goes on in the next character)
_RLE_CHARS = re.compile(r"[0-o]*")


def _compressed_rle_fault(counts: str) -> str | None:
    """What keeps compressed RLE string ``counts`` from being read at all, or None; the
    pixels its runs cover are compared with its size afterwards, for all of a file's
    strings at once (:func:`_rle_pixels`)."""
    if not _RLE_CHARS.fullmatch(counts) or (counts and (ord(counts[-1]) - 48) & 0x20):
        # pycocotools would read past the string's end (a number left open) or take a
        # character outside the alphabet as some number
        return f"segmentation RLE counts {_show(counts)} is not a compressed RLE string"
    return None


def _rle_pixels(strings: list[str]):
    """The pixels the runs of each compressed RLE string cover, as pycocotools 2.0.11
    reads them (maskApi.c ``rleFrString``: per number, 5 bits a character, low first, the
    last character's bit 0x10 its sign; from the fourth number on, each adds the number
    two before it; every run then stored as a uint32), -1 for a string with a number of
    more than 7 characters (past 32 bits). ``strings``: passed by
    :func:`_compressed_rle_fault`, so each ends its last number.

    Its ``decode`` (``annToMask`` in a loader worker) raises ``Invalid RLE mask
    representation`` for runs covering more pixels than the size, and leaves those past
    runs covering fewer unwritten (a garbage mask, no error). A decode writes every pixel,
    ~0.9 ms for a 640 x 480 mask (13 minutes for 860k annotations); this reads the strings
    only, as numpy operations over ~4M characters at a time."""
    import numpy as np

    out, chunk, chars = [], [], 0
    for text in strings:
        chunk.append(text)
        chars += len(text)
        if chars >= 1 << 22:  # bounds the arrays: ~10 int64 copies of the characters
            out.append(_rle_pixels_of(chunk))
            chunk, chars = [], 0
    out.append(_rle_pixels_of(chunk))
    return np.concatenate(out)


def _rle_pixels_of(strings: list[str]):
    """:func:`_rle_pixels` of one chunk of strings."""
    import numpy as np

    n = len(strings)
    lengths = np.fromiter(map(len, strings), np.int64, n)
    c = np.frombuffer("".join(strings).encode("ascii"), np.uint8).astype(np.int64) - 48
    if c.size == 0:
        return np.zeros(n, np.int64)
    ends = np.flatnonzero((c & 0x20) == 0)  # each number's last character
    starts = np.concatenate(([0], ends[:-1] + 1))
    size = ends - starts + 1
    sid = np.repeat(np.arange(n), lengths)[ends]  # each number's string
    k = np.minimum(np.arange(c.size) - np.repeat(starts, size), 7)  # 7+: refused below
    x = np.add.reduceat((c & 0x1F) << (5 * k), starts)
    x -= ((c[ends] & 0x10) != 0) << (5 * np.minimum(size, 8))  # negative: x |= -1 << 5k
    # each number's index m in its string; from m = 2 on, a running sum over every other
    # number (m = 2, 4, ... and m = 1, 3, ...), each restarted at its string's start
    count = np.bincount(sid, minlength=n)
    first = np.cumsum(count) - count  # each string's first number
    m = np.arange(len(x)) - first[sid]
    runs = np.where(m == 0, x, 0)
    for parity in (0, 1):
        mine = (m >= 1) & (m % 2 == parity)
        part = np.where(mine, x, 0)
        total = np.cumsum(part)
        # the running sum, less what came before the first number of its string
        runs += np.where(mine, total - (total - part)[first[sid]], 0)
    pixels = np.bincount(sid, weights=np.mod(runs, 1 << 32), minlength=n)  # as uint32
    pixels = pixels.astype(np.int64)
    pixels[np.unique(sid[size > 7])] = -1
    return pixels


def _annotation_fault(ann: object, cats: set, sizes: dict, evaluated: bool,
                      rles: list, masks: bool = True) -> str | None:
    """What keeps annotation entry ``ann`` from being read, or None: by pycocotools'
    index (every entry), then by ``CocoInstances`` (those :func:`in_target` keeps), and,
    with ``evaluated``, by COCOeval (every entry). ``masks``: whether its ``segmentation``
    is read at all (:func:`needs_masks`: Mask R-CNN's training items decode it, its segm
    COCOeval reads it; DINO's items and bbox COCOeval never do). ``cats``: the file's
    category ids; ``sizes``: image id -> (height, width); ``rles``: see
    :func:`_segmentation_fault`."""
    if not isinstance(ann, dict):  # COCO.createIndex indexes ann['image_id']
        return f"not an object ({_show(ann)})"
    # createIndex keys its dicts by id and image_id (KeyError without them, TypeError
    # for a list or object); CocoInstances maps category_id to its label (KeyError for
    # one that is not a category of the file)
    for key in ("id", "image_id"):
        if not isinstance(ann.get(key), (int, str)):
            return f"no {key}" if key not in ann else \
                f"{key} {_show(ann[key])} is not an integer"
    if "category_id" not in ann:
        return "no category_id"
    cat = ann["category_id"]
    if not isinstance(cat, int) or cat not in cats:
        return f"category_id {_show(cat)} is not one of the file's {len(cats)} categories"
    if evaluated:
        # COCOeval: int(gt['iscrowd']) in computeIoU/evaluateImg, gt['area'] compared
        # with the area ranges in evaluateImg; and it reads the box of every entry, crowd
        # ones too, and for segm (Mask R-CNN's) the mask (annToRLE in _prepare)
        for key in ("iscrowd", "area"):
            if not isinstance(ann.get(key), (int, float)):
                return f"no {key}" if key not in ann else \
                    f"{key} {_show(ann[key])} is not a number"
    elif ann.get("iscrowd", 0) or ann.get("ignore", False):  # never in a target
        return None
    # the box: COCO's [x, y, width, height], read as numbers by in_target (mmdet's
    # _parse_ann_info unpacks it for every entry not marked ignore too); a box that
    # misses its image or has a side under 1 is fine: left out of the target, as mmdet's
    if "bbox" not in ann:
        return "no bbox"
    box = ann["bbox"]
    if not (isinstance(box, list) and len(box) == 4
            and all(isinstance(v, (int, float)) for v in box)):
        return f"bbox {_show(box)} is not [x, y, width, height] numbers"
    if "area" in ann and not isinstance(ann["area"], (int, float)):  # in_target: > 0?
        return f"area {_show(ann['area'])} is not a number"
    size = sizes.get(ann["image_id"])
    if not evaluated and size is not None and not in_target(ann, size[1], size[0]):
        return None  # left out of the training target: its mask is never made
    if not masks:  # DINO: its training items decode no mask, its COCOeval is bbox only
        return None
    # the mask: a Mask R-CNN training item decodes one for every entry in its target
    # (CocoInstances, annToMask); its segm COCOeval one for every entry of the validation
    # file (annToRLE); an evaluation item decodes none
    if "segmentation" not in ann:
        return "no segmentation"
    return _segmentation_fault(ann["segmentation"], size, rles)


def _refuse_unusable(data: dict, ann_file: Path, evaluated: bool, masks: bool = True) -> None:
    """Raise a ``ValueError`` when entries of ``data`` (``ann_file`` parsed, its images
    list checked by :func:`_file_names`) cannot be read by ``CocoInstances``,
    pycocotools, or, with ``evaluated`` (the validation file), COCOeval: how many of how
    many, the first (index, and id where it has one) and what is wrong with it. Images
    first: an annotation's mask is made at its image's size. The masks (``segmentation``)
    only with ``masks`` (:func:`needs_masks`): nothing else reads them.

    What is not read is left alone, as mmdet's ``CocoDataset`` leaves it: the training
    file's entries that :func:`in_target` leaves out (crowd, ``ignore``, a box outside its
    image or under 1 pixel a side, ``area`` <= 0), annotations of an image the file does
    not list (no image asks for them). One Python pass over the entries, ~2 s for
    train2017's 860k annotations (0.2 s per 100k measured on 2 shared cores), then the
    compressed RLE masks' pixels counted (:func:`_rle_pixels`: ~3.4 s per 100k strings of
    ~580 characters, 640 x 480 masks; COCO's own files hold none)."""
    for key in ("annotations", "categories"):  # createIndex iterates over both
        if not isinstance(data.get(key, []), list):
            raise ValueError(f"{ann_file}: '{key}' must be a list, as COCO's")
    cats = set()
    for i, cat in enumerate(data.get("categories", [])):
        # createIndex keys its dict by cat['id']; finetune/metrics.py int()s it
        if not (isinstance(cat, dict) and isinstance(cat.get("id"), int)):
            raise ValueError(f"{ann_file}: category {i} {_show(cat)} has no integer id, "
                             "as COCO's")
        cats.add(cat["id"])
    images = data["images"]
    faults = [(i, f) for i, f in enumerate(map(_image_fault, images)) if f is not None]
    if faults:
        i, fault = faults[0]
        raise ValueError(f"{ann_file}: {len(faults):,} of {len(images):,} images unusable, "
                         f"first: {_entry('image', images[i], i)}: {fault}")
    sizes = {img["id"]: (img["height"], img["width"]) for img in images}
    anns = data.get("annotations", [])
    faults, rles = [], []  # rles: (index, counts, size) of the compressed RLE masks read
    for i, ann in enumerate(anns):
        found: list = []
        fault = _annotation_fault(ann, cats, sizes, evaluated, found, masks)
        if fault is not None:
            faults.append((i, fault))
        rles += [(i, *rle) for rle in found]
    if rles:  # runs covering more or fewer pixels than the mask's size: decode fails
        pixels = _rle_pixels([counts for _, counts, _ in rles])
        for (i, counts, size), got in zip(rles, pixels.tolist()):
            if got != size[0] * size[1]:
                faults.append((i, f"segmentation RLE counts {_show(counts)} " + (
                    f"cover {got} pixels, not the {size[0] * size[1]} of its size "
                    f"{_show(size)}" if got >= 0 else "hold a number past 32 bits")))
        faults.sort(key=lambda fault: fault[0])
    if faults:
        i, fault = faults[0]
        raise ValueError(f"{ann_file}: {len(faults):,} of {len(anns):,} annotations "
                         f"unusable, first: {_entry('annotation', anns[i], i)}: {fault}")


def _entry(kind: str, entry: object, i: int) -> str:
    """``kind`` entry ``entry`` at index ``i`` as a message names it: by its id where it
    has one, and its index (the id may be missing or repeated)."""
    if isinstance(entry, dict) and isinstance(entry.get("id"), (int, str)):
        return f"{kind} id {_show(entry['id'])} (index {i})"
    return f"{kind} index {i}"


def _split_files(cfg: DetectionConfig) -> tuple[Path, Path, Path, Path]:
    """(train images, train annotations, val images, val annotations) of ``data.kind``;
    the demo set is generated on first use."""
    d = cfg.data
    if d.kind == "demo":
        from finetune.demo_data import ensure_shapes_coco

        root = ensure_shapes_coco(d.cache_dir, d.demo_train, d.demo_val, d.demo_size)
        return (root / "train", root / "annotations/instances_train.json",
                root / "val", root / "annotations/instances_val.json")
    root = Path(d.root)
    return root / d.train_images, root / d.train_ann, root / d.val_images, root / d.val_ann


def needs_masks(cfg: DetectionConfig) -> bool:
    """Whether ``head.kind`` learns from instance masks and predicts them (Mask R-CNN:
    its training items decode them, its evaluation scores segm AP too); DINO's head reads
    only the boxes and labels of a target and predicts boxes (finetune/heads/dino.py
    ``_prepare``), so its training items decode none (annToMask of ~7 image-size masks
    an item on COCO, for nothing)."""
    return cfg.head.kind == "maskrcnn"


def build_datasets(cfg: DetectionConfig) -> tuple[CocoInstances, CocoInstances]:
    """(train, val) for ``data.kind``; the demo set is generated on first use. The
    training items hold instance masks where the head needs them (:func:`needs_masks`)."""
    d = cfg.data
    if d.kind != "demo":
        # the paths only: the images were compared with their folders at the start checks
        # (finetune.init.start_checks), whose parse of the annotation files is taken below
        check_data_paths(data_paths(cfg))
    paths = _split_files(cfg)
    train = CocoInstances(paths[0], paths[1], True, d.hflip, d.crop_aug, d.filter_empty_gt,
                          d.min_size, masks=needs_masks(cfg))
    val = CocoInstances(paths[2], paths[3], False)
    refuse_other_categories(
        Path(paths[1]), {c: train.coco.cats[c].get("name") for c in train.cat_ids},
        Path(paths[3]), {c: val.coco.cats[c].get("name") for c in val.cat_ids})
    return train, val


def build_val_set(cfg: DetectionConfig) -> CocoInstances:
    """The validation set alone (``--eval-only``: the training annotations, COCO's 450 MB,
    are not parsed); its categories are the class list, as the training set's are when
    both files list the same (COCO's do: all 80 in each)."""
    if cfg.data.kind != "demo":
        check_data_paths(data_paths(cfg, val_only=True))
    _, _, images, ann = _split_files(cfg)
    return CocoInstances(images, ann, False)
