"""Zero-shot classification on a held-out set: class names x prompt templates -> text
embeddings; images are classified by their nearest class embedding.

The evaluated set is the first ``max_batches * data.batch_size`` labelled samples of
``zero_shot.urls`` in URL order (all of them when ``max_batches`` is 0): it does not depend
on the number of ranks, so an evaluation curve stays comparable across a resize.

Under ZeRO-3 every forward pass all-gathers parameters collectively, so every rank must
run exactly the same number of forward passes, and every rank must know, before each
one, whether another follows (a rank that finishes early and waits in any other
collective deadlocks against a rank still inside a forward). Hence:

1. the shards are read in rounds, each shard by one rank only: in round ``t`` rank ``r``
   reads shard ``t * world_size + r`` (if there is one) and keeps its labelled raw
   samples (no more than the cap still lacks at the start of the round); then one
   all-gather of every rank's (labelled samples, unreadable, number of shards). From
   these counts, in shard order, every rank knows how many samples of its shard fall
   inside the cap (it drops the rest) and whether the cap is reached (then all stop):
   all ranks run the same rounds, decided by gathered numbers only. Ranks that expanded
   ``zero_shot.urls`` to different shard counts (a list file that changed between their
   reads) all skip the evaluation together and report why. An unreadable shard of the set
   is counted once (only one rank tried it) and the evaluation goes on without it;
2. the samples are dealt to the round-robin batches: global batch ``b`` (the set in URL
   order cut into batches of ``data.batch_size``, the batches of a one-rank run) belongs to
   rank ``b % world_size``. From the gathered counts every rank knows the global index of
   each sample it read and which rank's batch it falls in, so one all-to-all of byte sizes
   (``world_size`` integers a rank) and one variable-size all-to-all of the raw bytes
   (per sample: global index, class id and length, then the encoded image) move every
   sample to its batch's rank; samples of a rank's own batches stay where they are;
3. the image forwards run in lock-step (runtime/lockstep.py, the one mechanism every
   evaluation uses): a rank whose share is shorter (or empty) runs dummy ones until no
   rank has a batch left, and the correct counts are summed over ranks. With the deal,
   every rank runs ``ceil(num_batches / world_size)`` forwards.

Text forwards (the class prompts, in chunks of ``zero_shot.prompt_batch``) depend on the
config only, so they are equal on all ranks too.

Cost, for the H preset at 512 ranks (configs/pretrain/internimage_h_m3i.yaml: ImageNet val
in 50 shards of 1000 images, ~130 MB each; 200 batches of 32 = 6400 samples, every 5000
steps): 7 shards hold the set, so one round, in which ranks 0-6 read one shard each and
ranks 7-511 read nothing: ~0.9 GB from the object store per evaluation in all, where every
rank used to read the first 6400 samples itself (~0.8 GB a rank, ~0.4 TB in all), and the
stall before the first forward is one shard's read (~130 MB) instead of ~0.8 GB. Then one
all-gather of 3 integers per rank. The deal: the capped set crosses the network once
(~0.8 GB in all, less the few batches a reader keeps): each of ranks 0-5 sends ~125 MB
(rank 6: ~50 MB, the 400 samples of the cap's last shard), ranks 0-199 receive one batch
each (~4 MB), ranks 200-511 nothing (~1.6 MB a rank on average); two collectives (the
all-to-all of 512 sizes, then the bytes), plus 24 bytes of framing per sample. Memory: a
reader holds its shard's raw bytes (~130 MB) and copies them into one send buffer,
releasing each sample once copied: at most twice the shard (~260 MB) on the host, less in
practice, plus, under NCCL, the buffer's copy on the GPU during the exchange (~130 MB); a
rank then holds its own batches' bytes only (~4 MB). The forwards: 1 in
lock-step on every rank (ranks 0-199 classify their batch, ranks 200-511 run a dummy one),
as the round-robin split of the 200 global batches over 512 ranks did before the sharded
read, instead of 32 (a reader's 1000 images in batches of 32) without the deal. Under
ZeRO-3 each forward all-gathers InternImage-H's parameters (~2.2 GB in bf16), so the deal
saves 31 such gathers per evaluation for the cost of moving the ~0.8 GB set once.
"""

from __future__ import annotations

import io
import itertools
import logging
import random
import struct
from contextlib import closing
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from PIL import Image

from data.config import S3Config
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
# The framing of one sample in the deal's byte exchange, before its encoded image: its
# global index (the receiver orders and checks by it), class id and image length.
_FRAME = struct.Struct("<qqq")


@dataclass
class HeldOutShare:
    """One rank's part of the held-out set: the raw samples of its round-robin batches
    (global batches ``rank``, ``rank + world_size``, ...), in order; and totals over all
    ranks, the same on every rank."""

    batches: list[list[RawSample]] = field(default_factory=list)
    num_samples: int = 0  # labelled samples in the evaluated set, all ranks together
    unreadable_shards: int = 0  # all ranks together
    error: str | None = None  # why the ranks cannot evaluate (they all skip it)


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


def _read_labelled(url: str, label_key: str, s3: S3Config, counter: SkipCounter,
                   limit: int | None) -> tuple[list[RawSample], bool]:
    """The labelled samples of one shard in tar order, at most ``limit`` (None: all), and
    whether the read failed (the samples delivered before a failure are kept)."""
    outcome: dict = {}
    samples: list[RawSample] = []
    with closing(read_shard(url, "zero_shot", s3, counter, outcome)) as raws:
        for raw in raws:
            sample = _labelled(raw, label_key)
            if sample is None:
                continue
            samples.append(sample)
            if limit is not None and len(samples) >= limit:
                break  # the rest of the shard is past the cap whatever precedes it
    return samples, bool(outcome.get("failed", False))


def _gather_round(mine: tuple[int, int, int], world_size: int,
                  device: torch.device) -> list[tuple[int, int, int]]:
    """Every rank's (labelled samples, unreadable, shard count), in rank order."""
    if world_size == 1:
        return [mine]
    t = torch.tensor(mine, dtype=torch.int64, device=device)
    parts = [torch.empty_like(t) for _ in range(world_size)]
    dist.all_gather(parts, t)
    return [(int(p[0]), int(p[1]), int(p[2])) for p in parts]


def read_share(zs: ZeroShotConfig, data: DataConfig, rank: int, world_size: int,
               device: torch.device | None = None) -> HeldOutShare:
    """Read this rank's shards of the held-out set (see the module docstring, step 1), deal
    the samples inside the cap to the ranks of their round-robin batches (step 2) and cut
    this rank's into batches of ``data.batch_size``.

    Collective when ``world_size > 1`` (one all-gather per round, then two all-to-alls, on
    ``device``); every rank must call it. Batches come from the raw samples (not from
    decoding); images are decoded later, only by their rank.
    """
    device = device if device is not None else torch.device("cpu")
    urls = expand_urls(zs.urls, data.s3)
    cap = zs.max_batches * data.batch_size if zs.max_batches else None
    counter = SkipCounter()
    share = HeldOutShare()
    mine: list[tuple[int, RawSample]] = []  # (global index in the set, sample)
    for start in itertools.count(0, world_size):
        index = start + rank
        samples, failed = [], False
        if index < len(urls):
            # the shard's samples after the first ``cap - num_samples`` are past the cap
            # whatever the round's earlier shards hold: not read
            limit = None if cap is None else cap - share.num_samples
            samples, failed = _read_labelled(urls[index], zs.label_key, data.s3, counter,
                                             limit)
        counts = _gather_round((len(samples), int(failed), len(urls)), world_size, device)
        other = next((r for r, c in enumerate(counts) if c[2] != counts[0][2]), None)
        if other is not None:  # the ranks would not agree on the rounds: all stop here
            share.error = (f"zero-shot evaluation skipped: ranks found different numbers of "
                           f"held-out shards in zero_shot.urls (rank 0: "
                           f"{counts[0][2]}, rank {other}: {counts[other][2]})")
            return share
        for r, (n, unreadable, _) in enumerate(counts):  # the round's shards in URL order
            if cap is not None and share.num_samples >= cap:
                break  # this shard and the later ones are past the cap: not in the set
            take = n if cap is None else min(n, cap - share.num_samples)
            if r == rank:
                mine.extend(enumerate(samples[:take], start=share.num_samples))
            share.num_samples += take
            share.unreadable_shards += unreadable
        del samples  # the kept ones are in ``mine``; the deal releases them one by one
        if cap is not None and share.num_samples >= cap:
            break
        if start + world_size >= len(urls):
            break
    if world_size > 1 and share.num_samples > 0:  # the same decision on every rank
        own = _deal(mine, share.num_samples, data.batch_size, rank, world_size, device)
    else:
        own = [sample for _, sample in mine]
    size = data.batch_size
    share.batches = [own[i:i + size] for i in range(0, len(own), size)]
    return share


def _deal(mine: list[tuple[int, RawSample]], num_samples: int, batch_size: int, rank: int,
          world_size: int, device: torch.device) -> list[RawSample]:
    """The samples of this rank's round-robin batches, in global order, given the samples
    this rank read with their global indices (module docstring, step 2). Collective: two
    all-to-alls on ``device``. Empties ``mine`` (each sample is released once copied)."""

    def owner(index: int) -> int:  # the rank of the global batch holding sample ``index``
        return index // batch_size % world_size

    # Samples of this rank's own batches stay; the others go into one buffer, grouped by
    # destination rank (all_to_all_single sends a contiguous slice to each rank).
    kept = [(index, sample) for index, sample in mine if owner(index) == rank]
    sizes = [0] * world_size
    for index, (blob, _) in mine:
        if owner(index) != rank:
            sizes[owner(index)] += _FRAME.size + len(blob)
    ends = list(itertools.accumulate(sizes))
    offsets = [end - n for end, n in zip(ends, sizes)]
    send = torch.empty(sum(sizes), dtype=torch.uint8)
    view = memoryview(send.numpy())
    for k, (index, (blob, label)) in enumerate(mine):
        mine[k] = None  # released as copied: the shard's bytes are held once, not twice
        dest = owner(index)
        if dest == rank:
            continue
        at = offsets[dest]
        _FRAME.pack_into(view, at, index, label, len(blob))
        view[at + _FRAME.size:at + _FRAME.size + len(blob)] = blob
        offsets[dest] = at + _FRAME.size + len(blob)
    mine.clear()
    del view
    # Receivers know how many samples they get but not their sizes: exchange those first.
    send_sizes = torch.tensor(sizes, dtype=torch.int64, device=device)
    recv_sizes = torch.empty_like(send_sizes)
    dist.all_to_all_single(recv_sizes, send_sizes)
    recv_split = recv_sizes.tolist()
    send = send.to(device)  # a copy on the GPU under NCCL; gloo sends the host buffer
    recv = torch.empty(sum(recv_split), dtype=torch.uint8, device=device)
    dist.all_to_all_single(recv, send, output_split_sizes=recv_split, input_split_sizes=sizes)
    del send
    data = memoryview(recv.cpu().numpy())
    at = 0
    while at < len(data):
        index, label, length = _FRAME.unpack_from(data, at)
        at += _FRAME.size
        kept.append((index, (bytes(data[at:at + length]), label)))
        at += length
    kept.sort(key=lambda item: item[0])
    # Every rank derived the deal from the same gathered counts: a mismatch is a bug here,
    # never a data problem, so fail loudly rather than evaluate a wrong set.
    num_batches = -(-num_samples // batch_size)
    expected = [index for batch in range(rank, num_batches, world_size)
                for index in range(batch * batch_size,
                                   min((batch + 1) * batch_size, num_samples))]
    got = [index for index, _ in kept]
    if got != expected:
        raise RuntimeError(f"zero-shot deal on rank {rank}: received {len(got)} samples "
                           f"(first {got[:3]}), expected {len(expected)} "
                           f"(first {expected[:3]})")
    return [sample for _, sample in kept]


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


@torch.no_grad()
def evaluate(engine, tokenizer, zs: ZeroShotConfig, data: DataConfig, rank: int,
             world_size: int, device: torch.device, dtype: torch.dtype) -> dict:
    """``zero_shot_top1`` / ``zero_shot_top5`` over the held-out set (same on all ranks).

    Also ``zero_shot_samples`` (images classified) and ``zero_shot_unreadable_shards``
    (shards of the set that could not be read: the evaluation goes on without them);
    ``zero_shot_error`` instead of accuracies when the ranks found different shard lists.
    Collective: every rank calls it with the same configs.
    """
    share = read_share(zs, data, rank, world_size, device)
    unreadable = share.unreadable_shards
    if share.error is not None:
        log.error(share.error)
        return {"zero_shot_error": share.error, "zero_shot_unreadable_shards": unreadable}
    if unreadable:
        log.warning("zero-shot evaluation without %d unreadable held-out shard(s)", unreadable)
    if share.num_samples == 0:
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
