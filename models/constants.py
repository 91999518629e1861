"""Constants every task shares, defined once.

ImageNet's per-channel RGB mean and std on a [0, 1] scale: the normalisation of every
released InternImage checkpoint (the released configs' ``img_norm_cfg`` gives the same
values on a [0, 255] scale: mean 123.675, 116.28, 103.53, std 58.395, 57.12, 57.375),
equal to timm's ``IMAGENET_DEFAULT_MEAN``/``IMAGENET_DEFAULT_STD``.
"""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
