"""Zero-shot classification on a held-out set: class names x prompt templates -> text
embeddings; images are classified by their nearest class embedding.

Under ZeRO-3 every forward pass all-gathers parameters collectively, so every rank must
run exactly the same number of forward passes, and every rank must know, before each
one, whether another follows (a rank that finishes early and waits in any other
collective deadlocks against a rank still inside a forward). Hence:

1. every rank reads the whole held-out set once (it is small: ``max_batches`` caps it),
   keeps the raw samples of its own batches (global batch ``i`` belongs to rank
   ``i % world_size``) and counts the batches and unreadable shards;
2. one all-gather of (batch count, unreadable shards) before any forward: ranks that read
   different sets (a shard failed on one rank only) all skip the evaluation together and
   report why, instead of splitting the set wrongly;
3. the image forwards run in lock-step (runtime/lockstep.py, the one mechanism every
   evaluation uses): a rank whose share is shorter runs dummy ones until no rank has a
   batch left, and the correct counts are summed over ranks.

Text forwards (the class prompts, in chunks of ``zero_shot.prompt_batch``) depend on the
config only, so they are equal on all ranks too.
"""

from __future__ import annotations

import io
import logging
import math
import random
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from PIL import Image

from data.sources import expand_urls, read_shard
from data.stats import SkipCounter
from pretrain.config import ZeroShotConfig
from pretrain.data.config import DataConfig
from pretrain.data.decode import ImageTransform
from runtime.lockstep import lockstep
from runtime.redact import redact_urls

log = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
RawSample = tuple[bytes, int]  # (encoded image, class id)


@dataclass
class HeldOutShare:
    """One rank's read of the held-out set: the raw samples of its own batches, and the
    totals that every rank must agree on before the first forward pass."""

    batches: list[list[RawSample]] = field(default_factory=list)
    num_batches: int = 0  # batches of the whole (capped) set, all ranks together
    unreadable_shards: int = 0


def _labelled(raw: dict, label_key: str) -> RawSample | None:
    """(image bytes, class id) of a tar sample, or None when either is missing/invalid."""
    blob = next((raw[k] for k in IMAGE_KEYS if k in raw), None)
    label = raw.get(label_key)
    if blob is None or label is None:
        return None
    try:
        return blob, int(label.decode().strip())
    except (UnicodeDecodeError, ValueError):
        return None


def read_share(zs: ZeroShotConfig, data: DataConfig, rank: int,
               world_size: int) -> HeldOutShare:
    """Read the held-out set once (up to ``max_batches`` batches); keep this rank's batches.

    Batch boundaries come from the raw samples (not from decoding), so they are the same
    on every rank that read the same bytes; images are decoded later, only by their rank.
    """
    batch_size = data.batch_size
    cap = zs.max_batches * batch_size if zs.max_batches else None
    share, seen = HeldOutShare(), 0
    counter = SkipCounter()
    for url in expand_urls(zs.urls, data.s3):
        outcome: dict[str, bool] = {}
        for raw in read_shard(url, "zero_shot", data.s3, counter, outcome):
            sample = _labelled(raw, zs.label_key)
            if sample is None:
                continue
            batch = seen // batch_size
            if batch % world_size == rank:
                if len(share.batches) <= batch // world_size:
                    share.batches.append([])
                share.batches[batch // world_size].append(sample)
            seen += 1
            if cap is not None and seen >= cap:
                break
        share.unreadable_shards += int(outcome.get("failed", False))
        if cap is not None and seen >= cap:
            break
    share.num_batches = math.ceil(seen / batch_size)
    return share


def decode_batch(samples: list[RawSample],
                 transform: ImageTransform) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(images, labels) of one batch in the eval transform; corrupt images are dropped (as
    in training); None when none is left."""
    rng = random.Random(0)  # unused by the eval transform; required by its signature
    images, labels = [], []
    for blob, label in samples:
        try:
            images.append(transform(Image.open(io.BytesIO(blob)).convert("RGB"), rng))
        except Exception:  # noqa: BLE001 - any undecodable image is skipped, never fatal
            continue
        labels.append(label)
    if not images:
        return None
    return torch.stack(images), torch.tensor(labels)


def agree_on_reads(share: HeldOutShare, world_size: int,
                   device: torch.device) -> list[tuple[int, int]]:
    """Every rank's (num_batches, unreadable_shards), in rank order (one all-gather)."""
    mine = (share.num_batches, share.unreadable_shards)
    if world_size == 1:
        return [mine]
    t = torch.tensor(mine, dtype=torch.int64, device=device)
    parts = [torch.empty_like(t) for _ in range(world_size)]
    dist.all_gather(parts, t)
    return [(int(p[0]), int(p[1])) for p in parts]


@torch.no_grad()
def class_embeddings(model, tokenizer, zs: ZeroShotConfig, context_length: int,
                     device: torch.device) -> torch.Tensor:
    """(num_classes, D) normalised mean of each class's prompt embeddings.

    Prompts go through the text tower ``zs.prompt_batch`` at a time (ImageNet's 1000
    classes x 80 templates would not fit as one batch); the per-class sums are
    accumulated, so memory stays O(classes x D).
    """
    num_templates = len(zs.templates)
    prompts = [t.format(name) for name in zs.class_names for t in zs.templates]
    sums = None
    for start in range(0, len(prompts), zs.prompt_batch):
        tokens = tokenizer(prompts[start:start + zs.prompt_batch],
                           context_length=context_length).to(device)
        emb = model.encode_text(tokens).float()
        if sums is None:
            sums = emb.new_zeros(len(zs.class_names), emb.shape[-1])
        owner = torch.arange(start, start + len(emb), device=emb.device) // num_templates
        sums.index_add_(0, owner, emb)
    return torch.nn.functional.normalize(sums / num_templates, dim=-1)


def _check_agreement(reads: list[tuple[int, int]]) -> str | None:
    """Why the ranks cannot split the evaluation, or None when they read the same set."""
    if len(set(reads)) == 1:
        return None
    per_rank = ", ".join(f"rank {r}: {n} batches, {u} unreadable shards"
                         for r, (n, u) in enumerate(reads))
    return (f"zero-shot evaluation skipped: ranks read different held-out sets ({per_rank}); "
            f"see the 'skipping unreadable shard' warnings")


@torch.no_grad()
def evaluate(engine, tokenizer, zs: ZeroShotConfig, data: DataConfig, rank: int,
             world_size: int, device: torch.device, dtype: torch.dtype) -> dict:
    """``zero_shot_top1`` / ``zero_shot_top5`` over the held-out set (same on all ranks).

    Also ``zero_shot_samples`` (images classified) and ``zero_shot_unreadable_shards``;
    ``zero_shot_error`` instead of accuracies when the ranks read different sets.
    """
    share = read_share(zs, data, rank, world_size)
    reads = agree_on_reads(share, world_size, device)
    error = _check_agreement(reads)
    if error is not None:
        log.error(error)
        return {"zero_shot_error": error,
                "zero_shot_unreadable_shards": max(u for _, u in reads)}
    num_batches, unreadable = reads[0]
    if unreadable:
        log.warning("zero-shot evaluation without %d unreadable held-out shard(s)", unreadable)
    if num_batches == 0:
        log.warning("zero-shot evaluation skipped: the held-out set %s has no labelled sample",
                    redact_urls(zs.urls))
        return {"zero_shot_samples": 0, "zero_shot_unreadable_shards": unreadable}
    model = engine.module
    was_training = model.training
    engine.eval()
    try:
        counts = _classify(model, tokenizer, zs, data, share, world_size, device, dtype)
    finally:
        if was_training:
            engine.train()
    seen = max(counts[2].item(), 1.0)
    return {"zero_shot_top1": counts[0].item() / seen, "zero_shot_top5": counts[1].item() / seen,
            "zero_shot_samples": int(counts[2].item()),
            "zero_shot_unreadable_shards": unreadable}


def _classify(model, tokenizer, zs: ZeroShotConfig, data: DataConfig, share: HeldOutShare,
              world_size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(top-1 hits, top-5 hits, images) summed over ranks; the same forwards on every rank."""
    classes = class_embeddings(model, tokenizer, zs, data.context_length, device)
    transform = ImageTransform(data.image_size, train=False, mean=data.mean, std=data.std)
    counts = torch.zeros(3, device=device, dtype=torch.float64)
    size = data.image_size

    def dummy_args() -> tuple[torch.Tensor]:
        return (torch.zeros(1, 3, size, size, device=device, dtype=dtype),)

    with lockstep(model.encode_image, dummy_args, device) as encode_image:
        for samples in share.batches:
            batch = decode_batch(samples, transform)
            if batch is None:  # no decodable image: no pass of its own (a dummy matches)
                continue
            images, labels = batch
            logits = encode_image(images.to(device, dtype)).float() @ classes.t()
            top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices.cpu()
            counts[0] += (top[:, 0] == labels).sum()
            counts[1] += (top == labels[:, None]).any(-1).sum()
            counts[2] += len(labels)
    if world_size > 1:
        dist.all_reduce(counts)
    return counts
