"""Semantic-segmentation datasets in their official on-disk layouts.

``cityscapes``: 19 train ids (255 ignore), from ``*_labelTrainIds.png`` or mapped from
``*_labelIds.png``. ``mapillary``: Mapillary Vistas v1.2 (66 classes), natively or mapped
onto Cityscapes' 19 classes for the two-stage Cityscapes recipe. ``cocostuff``:
COCO-Stuff-164k (171 classes), stage 1 of the H ADE20K recipe. Items are
``(image uint8 (3, H, W), label int64 (H, W))`` before an optional joint ``transform``.
"""

from finetune.datasets.base import PairedSegmentation
from finetune.datasets.cityscapes import CITYSCAPES_CLASSES, CityscapesSegmentation
from finetune.datasets.cocostuff import COCO_STUFF_CLASSES
from finetune.datasets.mapillary import VISTAS_V12_CLASSES, MapillaryVistasSegmentation

__all__ = ["CITYSCAPES_CLASSES", "COCO_STUFF_CLASSES", "VISTAS_V12_CLASSES",
           "CityscapesSegmentation", "MapillaryVistasSegmentation", "PairedSegmentation"]
