"""Run an InternImage on a real photograph, end to end on the CPU.

The photo is scikit-learn's bundled sample image (no download). Without ``--weights`` the
model is randomly initialised (released weights cannot be fetched here), so the classes it
prints are meaningless; pass a released checkpoint (e.g. ``internimage_t_1k_224.pth``) and
they become real ImageNet predictions (``make demo`` runs the pre-training demo instead).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F

from models import CheckpointError, build_model, load_pretrained
from models.constants import IMAGENET_MEAN, IMAGENET_STD

MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def load_photo(size: int) -> torch.Tensor:
    """scikit-learn's 'china.jpg' as a normalised (1, 3, size, size) batch (resize + crop)."""
    from sklearn.datasets import load_sample_image

    photo = load_sample_image("china.jpg").copy()  # the bundled array is read-only
    img = torch.from_numpy(photo).permute(2, 0, 1)[None].float() / 255
    h, w = img.shape[-2:]
    scale = size / min(h, w)
    img = F.interpolate(img, size=(round(h * scale), round(w * scale)), mode="bilinear",
                        antialias=True, align_corners=False)
    top, left = (img.shape[-2] - size) // 2, (img.shape[-1] - size) // 2
    img = img[..., top:top + size, left:left + size]
    return (img - MEAN) / STD


def main(argv: list[str] | None = None) -> dict:
    """Classify the photo; print and return a JSON summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="internimage_t")
    parser.add_argument("--weights", help="released checkpoint (.pth or .safetensors)")
    parser.add_argument("--image-size", type=int, default=224)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    try:
        model = build_model(args.model).eval()
        if args.weights:
            print(load_pretrained(model, args.weights))
    except (CheckpointError, ValueError) as err:  # a wrong name or file: one line, exit 2
        print(f"launch.image_demo: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    x = load_photo(args.image_size)
    start = time.perf_counter()
    with torch.inference_mode():
        feats = model.forward_features(x)
        probs = model(x).softmax(-1)[0]
    seconds = time.perf_counter() - start
    top = probs.topk(5)
    summary = {
        "model": args.model,
        "weights": args.weights or "random init (pass --weights for real predictions)",
        "parameters": sum(p.numel() for p in model.parameters()),
        "image": "sklearn china.jpg",
        "input": list(x.shape),
        "stage_features": [list(f.shape) for f in feats],
        "top5_classes": top.indices.tolist(),
        "top5_probs": [round(p, 4) for p in top.values.tolist()],
        "seconds_forward_features_and_logits": round(seconds, 3),
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
