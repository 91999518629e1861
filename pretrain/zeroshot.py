"""Zero-shot classification on a held-out set: class names x prompt templates -> text
embeddings; images are classified by their nearest class embedding.

Under ZeRO-3 every rank must run the same number of forward passes (parameters are
gathered collectively), so every rank reads the whole held-out set, evaluates every
``world_size``-th batch, pads with a repeated batch where its share is shorter, and the
correct counts are summed over ranks.
"""

from __future__ import annotations

import io
import random
from collections.abc import Iterator

import torch
from PIL import Image

from pretrain.config import ZeroShotConfig
from pretrain.data.config import DataConfig
from pretrain.data.decode import ImageTransform
from pretrain.data.sources import expand_urls, read_shard
from pretrain.data.stats import SkipCounter


def eval_batches(zs: ZeroShotConfig,
                 data: DataConfig) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) batches of the held-out set, in shard order, eval transform."""
    transform = ImageTransform(data.image_size, train=False, mean=data.mean, std=data.std)
    rng = random.Random(0)  # unused by the eval transform; required by its signature
    counter = SkipCounter()
    images, labels = [], []
    image_keys = ("jpg", "jpeg", "png", "webp")
    for url in expand_urls(zs.urls, data.s3):
        for raw in read_shard(url, "zero_shot", data.s3, counter):
            blob = next((raw[k] for k in image_keys if k in raw), None)
            label = raw.get(zs.label_key)
            if blob is None or label is None:
                continue
            try:
                img = Image.open(io.BytesIO(blob)).convert("RGB")
                images.append(transform(img, rng))
                labels.append(int(label.decode().strip()))
            except Exception:  # a corrupt held-out image is skipped, as in training
                continue
            if len(images) == data.batch_size:
                yield torch.stack(images), torch.tensor(labels)
                images, labels = [], []
    if images:
        yield torch.stack(images), torch.tensor(labels)


@torch.no_grad()
def class_embeddings(model, tokenizer, zs: ZeroShotConfig, context_length: int,
                     device: torch.device) -> torch.Tensor:
    """(num_classes, D) normalised mean of each class's prompt embeddings."""
    prompts = [t.format(name) for name in zs.class_names for t in zs.templates]
    tokens = tokenizer(prompts, context_length=context_length).to(device)
    emb = model.encode_text(tokens).float()
    emb = emb.view(len(zs.class_names), len(zs.templates), -1).mean(1)
    return torch.nn.functional.normalize(emb, dim=-1)


@torch.no_grad()
def evaluate(engine, tokenizer, zs: ZeroShotConfig, data: DataConfig, rank: int,
             world_size: int, device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    """``zero_shot_top1`` / ``zero_shot_top5`` over the held-out set (same on all ranks)."""
    import torch.distributed as dist

    model = engine.module
    was_training = model.training
    engine.eval()
    classes = class_embeddings(model, tokenizer, zs, data.context_length, device)
    counts = torch.zeros(3, device=device, dtype=torch.float64)  # top1, top5, seen
    mine, first = 0, None
    for i, (images, labels) in enumerate(eval_batches(zs, data)):
        if zs.max_batches and i >= zs.max_batches:
            break
        first = first if first is not None else images
        if i % world_size != rank:
            continue
        mine += 1
        logits = model.encode_image(images.to(device, dtype)).float() @ classes.t()
        top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices.cpu()
        counts[0] += (top[:, 0] == labels).sum()
        counts[1] += (top == labels[:, None]).any(-1).sum()
        counts[2] += len(labels)
    if world_size > 1:  # equalise forward passes across ranks (ZeRO-3 gathers collectively)
        most = torch.tensor([mine], device=device)
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        for _ in range(int(most.item()) - mine):
            model.encode_image(first.to(device, dtype))
        dist.all_reduce(counts)
    if was_training:
        engine.train()
    seen = max(counts[2].item(), 1.0)
    return {"zero_shot_top1": counts[0].item() / seen, "zero_shot_top5": counts[1].item() / seen,
            "zero_shot_samples": int(counts[2].item())}
