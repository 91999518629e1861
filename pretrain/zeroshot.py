"""Zero-shot classification on a held-out set: class names x prompt templates -> text
embeddings; images are classified by their nearest class embedding.

The evaluated set is the first ``max_batches * data.batch_size`` labelled samples of
``zero_shot.urls`` in URL order (all of them when ``max_batches`` is 0): it does not depend
on the number of ranks, so an evaluation curve stays comparable across a resize.

Under ZeRO-3 every forward pass all-gathers parameters collectively, so every rank must
run exactly the same number of forward passes, and every rank must know, before each
one, whether another follows (a rank that finishes early and waits in any other
collective deadlocks against a rank still inside a forward). Hence:

1. the shards are read in rounds, each shard by one rank only (shard ``s`` by rank
   ``world_size - 1 - s % world_size``, see ``_reader``), a round's shards being the next
   ones in URL order, at most one a rank. How many a round reads is decided from what is
   known (``_round_size``): without a cap all of ``world_size`` (every shard is in the
   set); with one, a single shard first, then as many as the labelled samples per shard
   read so far say the cap still lacks (``world_size`` while none was labelled). A reader
   keeps its shard's labelled raw samples (no more than the cap still lacks at the start
   of the round); then one all-gather of every rank's (labelled samples, unreadable,
   bad labels). From these counts, in shard order, every rank knows how many samples of
   each shard fall inside the cap (a reader drops the rest), whether the cap is reached
   (then all stop) and the next round's size: all ranks run the same rounds, decided by
   gathered numbers only. Before the first round one all-gather of every rank's (number
   of shards, whether its listing failed): ranks that expanded ``zero_shot.urls`` to
   different shard counts (a list file that changed between their reads) all skip the
   evaluation together, before any shard is read, and report why; so do they when any
   rank could not list the set (a ``.txt`` list that cannot be read, lists itself or
   lists no shard: ``_held_out_urls``), the run going on (the start's check refuses such
   lists before any compute, ``zero_shot_source``; this covers a list changed since).
   Those gathered first used to travel with the first round's counts, so every other
   rank read its first shard of a set the evaluation then skipped (up to ``world_size``
   shards per evaluation while the list stayed broken). An unreadable shard of the set
   is counted once (only one rank tried it) and the evaluation goes on without it. A
   sample whose label is not a class id (not an integer in ``0..len(class_names) - 1``)
   is not labelled, so not in the set, whatever the world size; those up to the set's end
   are counted (``zero_shot_bad_labels``): the gathered counts give them for the shards
   wholly in the set, and one broadcast from its reader for the shard the cap ends in;
2. the samples are dealt to the round-robin batches: global batch ``b`` (the set in URL
   order cut into batches of ``data.batch_size``, the batches of a one-rank run) belongs to
   rank ``b % world_size``. From the gathered counts every rank knows each shard's global
   indices and reader, hence which ranks it sends samples to (the owners of the batches
   its samples fall in) and which it receives from (the readers of the shards its own
   batches' samples come from), with no further collective: point-to-point transfers
   between those pairs only (``torch.distributed.batch_isend_irecv``), first one int64
   byte size per pair, then the raw bytes (per sample: global index, class id and length,
   then the encoded image); samples of a rank's own batches stay where they are, and a
   rank with no peer takes no part;
3. the image forwards run in lock-step (runtime/lockstep.py, the one mechanism every
   evaluation uses): a rank whose share is shorter (or empty) runs dummy ones until no
   rank has a batch left, and the correct counts are summed over ranks. With the deal,
   every rank runs ``ceil(num_batches / world_size)`` forwards.

Text forwards (the class prompts, in chunks of ``zero_shot.prompt_batch``) depend on the
config only, so they are equal on all ranks too.

Why point-to-point and not an all-to-all: NCCL sets up a connection, with its buffers on
the GPU, for each peer a rank first sends to or receives from, and keeps it for the
communicator's life. An all-to-all (even of the byte sizes alone) connects every rank to
all ``world_size - 1`` others: NVIDIA/nccl issue #1685 measured 1.06 -> 4.34 GB of GPU
memory a rank after the first all_to_all_single on 8 H100s (dedicated NVLink buffers for
7 peers), which InternImage-H, run near its memory limit, cannot spare. Point-to-point
transfers connect only the pairs that exchange samples. torch's batched point-to-point
operations run on the process group's own communicator (no new one); they may involve a
subset of the ranks only when they are not the first operation on the group, which they
never are here (the rounds' all-gathers precede them).

Cost, for the H preset at 512 ranks (configs/pretrain/internimage_h_m3i.yaml: ImageNet val
in 50 shards of 1000 images, ~130 MB each; 200 batches of 32 = 6400 samples, every 5000
steps): round 1 reads shard 0 (rank 511); its 1000 labelled samples say the remaining 5400
need 6 more shards, which round 2 reads in parallel (shards 1-6, ranks 510-505), and the
cap is reached. In all 7 shards, ~0.9 GB from the object store per evaluation (7000 samples
for a set of 6400: 600 read and dropped), where every rank used to read the first 6400
samples itself (~0.8 GB a rank, ~0.4 TB in all), and reading a whole shard on each of ranks
0-49 would read ~6.5 GB. The price of reading one shard first: the stall before the first
forward is two shard reads (~130 MB each, one after the other) instead of one, plus one
more all-gather of 3 integers a rank (and the listing check's 2). The rounds' sizes are
estimates from the shards read so far: with shards of similar labelled counts, as here,
reads exceed the cap by at most about one shard a round; unequal ones may take further
rounds (an estimate that fell short) or read more past the cap (a first shard with few
labelled samples; none at all makes the next round read ``world_size`` shards). The deal:
the capped set crosses the network once (~0.8 GB in all): each of ranks 511-506 sends ~130
MB to 32 ranks, rank 505 ~50 MB (the 400 samples of the cap's last shard) to 13; ranks
0-199 receive one batch each (~4 MB) from one reader (from two for the 5 batches that
straddle two shards); ranks 200-504 take no part. Two batches of point-to-point transfers
(the int64 sizes, then the bytes), plus 24 bytes of framing per sample, and one broadcast
of one integer (the bad labels of the cap's last shard). NCCL connections: a reader <= 32
peers, a receiver 1-2, 305 ranks none, instead of 511 peers for every rank; with ranks
numbered node by node (8 GPUs a node) no pair shares a node, so none of #1685's NVLink
buffers are set up, only network connections (whose point-to-point buffers NCCL draws from
one shared pool by default, NCCL_NET_SHARED_BUFFERS); the same pairs recur at every
evaluation, so they are set up once. Host memory: a reader holds its shard's raw bytes
(~130 MB) and copies them into one send buffer, releasing each sample once copied: at most
twice the shard (~260 MB), less in practice, plus, under NCCL, the buffer's copy on the GPU
during the exchange (~130 MB); a rank then holds its own batches' bytes only (~4 MB). The
forwards: 1 in lock-step on every rank (ranks 0-199 classify their batch, ranks 200-511 run
a dummy one), as the round-robin split of the 200 global batches over 512 ranks did before
the sharded read, instead of 32 (a reader's 1000 images in batches of 32) without the deal.
Under ZeRO-3 each forward all-gathers InternImage-H's parameters (~2.2 GB in bf16), so the
deal saves 31 such gathers per evaluation for the cost of moving the ~0.8 GB set once.
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
from runtime.redact import redact_url, redact_urls

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
    # samples up to the set's end whose label is not a class id (left out), all ranks
    bad_labels: int = 0
    error: str | None = None  # why the ranks cannot evaluate (they all skip it)


def _labelled(raw: dict, label_key: str, num_classes: int) -> tuple[RawSample | None, bool]:
    """(image bytes, class id) of a tar sample, or None when it has no image or no label;
    and whether its label is not a class id (not an integer in ``0..num_classes - 1``):
    such a sample is not labelled either (not in the set), only counted."""
    blob = next((raw[k] for k in IMAGE_KEYS if k in raw), None)
    label = raw.get(label_key)
    if blob is None or label is None:
        return None, False
    try:
        class_id = int(label.decode().strip())
    except (UnicodeDecodeError, ValueError):
        return None, True
    if not 0 <= class_id < num_classes:  # also keeps the framing's int64 from overflowing
        return None, True
    return (blob, class_id), False


@dataclass
class _ShardRead:
    """One rank's read of one shard: its labelled samples in tar order (at most the
    limit), whether the read failed (the samples delivered before the failure are kept),
    and the samples whose label is not a class id: in all, and before each kept sample."""

    samples: list[RawSample] = field(default_factory=list)
    failed: bool = False
    bad_labels: int = 0
    bad_before: list[int] = field(default_factory=list)  # bad labels read before samples[i]


def _read_labelled(url: str, label_key: str, num_classes: int, s3: S3Config,
                   counter: SkipCounter, limit: int | None) -> _ShardRead:
    """Read one shard's labelled samples, at most ``limit`` (None: all)."""
    outcome: dict = {}
    read = _ShardRead()
    with closing(read_shard(url, "zero_shot", s3, counter, outcome)) as raws:
        for raw in raws:
            sample, bad = _labelled(raw, label_key, num_classes)
            read.bad_labels += bad
            if sample is None:
                continue
            read.samples.append(sample)
            read.bad_before.append(read.bad_labels)
            if limit is not None and len(read.samples) >= limit:
                break  # the rest of the shard is past the cap whatever precedes it
    read.failed = bool(outcome.get("failed", False))
    return read


def _reader(shard: int, world_size: int) -> int:
    """The rank that reads ``shard``: shards in order from the last rank down. A round's
    shards are consecutive (at most ``world_size``), so its readers are distinct ranks.
    Batches are dealt from rank 0 up, so when the set has far fewer batches than there are
    ranks (the H preset: 200 on 512) the readers own none of them and, with ranks numbered
    node by node, share no node with a rank they send to: no NVLink connection is set up
    for the deal (module docstring, why point-to-point)."""
    return world_size - 1 - shard % world_size


def _round_size(cap: int | None, num_samples: int, shards_read: int, shards_left: int,
                world_size: int) -> int:
    """How many shards the next round reads, one per rank (module docstring, step 1).

    Without a cap every shard is in the set: as many as there are ranks. With one: a
    single shard first (nothing is known yet about how many labelled samples a shard
    holds), then as many as the labelled samples per shard read so far say the cap still
    needs (all ranks while none was labelled). Every rank computes it from the same
    gathered counts."""
    if cap is None:
        return min(world_size, shards_left)
    if shards_read == 0:
        return min(1, shards_left)
    if num_samples == 0:
        return min(world_size, shards_left)
    needed = -(-(cap - num_samples) * shards_read // num_samples)  # ceil
    return min(world_size, shards_left, needed)


def zero_shot_source(zs: ZeroShotConfig, resumed: bool = False) -> list[tuple[str, list[str]]]:
    """The held-out set as a source of the start's check (``data.preflight``'s
    ``check_sources_readable``), named ``zero_shot``: ``[("zero_shot", zs.urls)]`` when
    zero-shot evaluation is configured (``urls`` and ``class_names`` set, as the trainer
    runs it) on a fresh start, else ``[]``. A list of the set that cannot be read, lists
    itself or lists no shard then ends a fresh start before any compute, instead of every
    evaluation being skipped (:func:`read_share`). A ``resumed`` run is not checked: an
    auxiliary evaluation set gone since must not end a run of weeks at its requeue; its
    evaluations are skipped instead, logged."""
    return [("zero_shot", list(zs.urls))] if zs.urls and zs.names() and not resumed \
        else []


def _held_out_urls(zs: ZeroShotConfig, s3: S3Config) -> tuple[list[str], str | None]:
    """(the shard URLs of ``zs.urls``, None), or ([], why) when they cannot be listed: a
    ``.txt`` list that lists itself or lists no shard (``ShardListError``), or that cannot
    be read (any error: an evaluation never ends the run; :func:`evaluate` logs why)."""
    try:
        return expand_urls(zs.urls, s3), None
    except Exception as err:  # noqa: BLE001 - the ranks agree on skipping (read_share)
        why = (f"zero-shot evaluation skipped: the held-out set zero_shot.urls cannot be "
               f"listed ({type(err).__name__}: {redact_url(str(err))})")
        return [], why


def _gather_ints(mine: tuple[int, ...], world_size: int,
                 device: torch.device) -> list[tuple[int, ...]]:
    """Every rank's ``mine`` (the same number of integers on each), in rank order."""
    if world_size == 1:
        return [mine]
    t = torch.tensor(mine, dtype=torch.int64, device=device)
    parts = [torch.empty_like(t) for _ in range(world_size)]
    dist.all_gather(parts, t)
    return [tuple(row) for row in torch.stack(parts).tolist()]  # one copy to the host


def _listing_error(urls: list[str], unlisted: str | None, world_size: int,
                   device: torch.device) -> str | None:
    """Why every rank skips the evaluation (the same on all: a gathered decision), or None
    when all ranks listed the same number of shards. Collective."""
    listed = _gather_ints((len(urls), int(unlisted is not None)), world_size, device)
    failed = [r for r, (_, bad) in enumerate(listed) if bad]
    if failed:
        return unlisted or (f"zero-shot evaluation skipped: rank {failed[0]} could not "
                            "list the held-out set zero_shot.urls (its log says why)")
    other = next((r for r, (n, _) in enumerate(listed) if n != listed[0][0]), None)
    if other is not None:
        return (f"zero-shot evaluation skipped: ranks found different numbers of held-out "
                f"shards in zero_shot.urls (rank 0: {listed[0][0]}, rank {other}: "
                f"{listed[other][0]})")
    return None


def read_share(zs: ZeroShotConfig, data: DataConfig, rank: int, world_size: int,
               device: torch.device | None = None) -> HeldOutShare:
    """Read this rank's shards of the held-out set (see the module docstring, step 1), deal
    the samples inside the cap to the ranks of their round-robin batches (step 2) and cut
    this rank's into batches of ``data.batch_size``.

    Collective when ``world_size > 1`` (one all-gather per round, one broadcast when the
    cap is reached, then point-to-point transfers between the ranks that exchange samples,
    on ``device``); every rank must call it. Batches come from the raw samples (not from
    decoding); images are decoded later, only by their rank.
    """
    device = device if device is not None else torch.device("cpu")
    urls, unlisted = _held_out_urls(zs, data.s3)  # ([], why) when the lists are unusable
    cap = zs.max_batches * data.batch_size if zs.max_batches else None
    num_classes = len(zs.names())
    counter = SkipCounter()
    share = HeldOutShare()
    mine: list[tuple[int, RawSample]] = []  # (global index in the set, sample)
    held: list[tuple[int, int, int]] = []  # (first global index, samples, reader) a shard
    cut: tuple[int, int] | None = None  # (reader, bad labels) of the shard the cap ends in
    done = 0  # shards read in the rounds so far
    share.error = _listing_error(urls, unlisted, world_size, device)
    if share.error is not None:  # before any read: the ranks agree to skip
        return share
    while done < len(urls):  # the same number on every rank (just checked), at least 1
        shards = range(done, done + _round_size(cap, share.num_samples, done,
                                                len(urls) - done, world_size))
        read = _ShardRead()
        ours = next((s for s in shards if _reader(s, world_size) == rank), None)
        if ours is not None:  # at most one: a round has no more shards than ranks
            # the shard's samples after the first ``cap - num_samples`` are past the cap
            # whatever the round's earlier shards hold: not read
            limit = None if cap is None else cap - share.num_samples
            read = _read_labelled(urls[ours], zs.label_key, num_classes, data.s3, counter,
                                  limit)
        counts = _gather_ints((len(read.samples), int(read.failed), read.bad_labels),
                              world_size, device)
        for shard in shards:  # the round's shards in URL order
            if cap is not None and share.num_samples >= cap:
                break  # this shard and the later ones are past the cap: not in the set
            reader = _reader(shard, world_size)
            n, unreadable, bad = counts[reader]
            take = n if cap is None else min(n, cap - share.num_samples)
            if cap is not None and take > 0 and share.num_samples + take == cap:
                # The set ends inside this shard: only its bad labels before the set's
                # last sample count, and only its reader knows how many those are.
                cut = (reader, read.bad_before[take - 1] if reader == rank else 0)
            else:  # the whole shard is in the set (its reader read it to the end)
                share.bad_labels += bad
            if reader == rank:
                mine.extend(enumerate(read.samples[:take], start=share.num_samples))
            if take:
                held.append((share.num_samples, take, reader))
            share.num_samples += take
            share.unreadable_shards += unreadable
        del read  # the kept samples are in ``mine``; the deal releases them one by one
        done += len(shards)
        if cap is not None and share.num_samples >= cap:
            break
    if cut is not None:
        share.bad_labels += _from_rank(cut[1], cut[0], world_size, device)
    if world_size > 1 and share.num_samples > 0:  # the same decision on every rank
        own = _deal(mine, held, share.num_samples, data.batch_size, rank, world_size, device)
    else:
        own = [sample for _, sample in mine]
    size = data.batch_size
    share.batches = [own[i:i + size] for i in range(0, len(own), size)]
    return share


def _from_rank(value: int, src: int, world_size: int, device: torch.device) -> int:
    """``value`` of rank ``src`` on every rank (a broadcast of one integer)."""
    if world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.broadcast(t, src=src)
    return int(t.item())


def _exchange(sends: dict[int, torch.Tensor], recvs: dict[int, torch.Tensor]) -> None:
    """Send ``sends[peer]`` to each of its peers and receive ``recvs[peer]`` from each of
    its peers, in one batch of point-to-point operations; nothing when this rank has no
    peer (batch_isend_irecv rejects an empty batch). Not a collective: only the ranks in a
    pair take part, so it must never be the first operation on the process group (torch's
    batch_isend_irecv then needs every rank); the rounds' all-gathers always precede it."""
    ops = [dist.P2POp(dist.isend, t, peer) for peer, t in sends.items()]
    ops += [dist.P2POp(dist.irecv, t, peer) for peer, t in recvs.items()]
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()


def _deal(mine: list[tuple[int, RawSample]], held: list[tuple[int, int, int]],
          num_samples: int, batch_size: int, rank: int, world_size: int,
          device: torch.device) -> list[RawSample]:
    """The samples of this rank's round-robin batches, in global order, given the samples
    this rank read with their global indices and, for every shard of the set, its first
    global index, sample count and reader (module docstring, step 2). Point-to-point
    transfers on ``device`` with the ranks this rank exchanges samples with, known to both
    sides from ``held``. Empties ``mine`` (each sample is released once copied)."""

    def owner(index: int) -> int:  # the rank of the global batch holding sample ``index``
        return index // batch_size % world_size

    # Samples of this rank's own batches stay; the others go into one buffer, grouped by
    # destination rank (one contiguous slice a destination).
    kept = [(index, sample) for index, sample in mine if owner(index) == rank]
    sizes = [0] * world_size
    for index, (blob, _) in mine:
        if owner(index) != rank:
            sizes[owner(index)] += _FRAME.size + len(blob)
    ends = list(itertools.accumulate(sizes))
    starts = [end - n for end, n in zip(ends, sizes)]
    offsets = list(starts)
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
    # The peers: those this rank sends to (it holds a sample of one of their batches), and
    # those it receives from (the readers of shards holding a sample of one of its own
    # batches; every rank knows every shard's global indices and reader).
    receivers = [peer for peer in range(world_size) if sizes[peer]]
    senders = sorted({reader for first, count, reader in held if reader != rank and any(
        batch % world_size == rank
        for batch in range(first // batch_size, (first + count - 1) // batch_size + 1))})
    # Receivers know how many samples they get but not their sizes: exchange those first.
    recv_sizes = {peer: torch.empty(1, dtype=torch.int64, device=device) for peer in senders}
    _exchange({peer: torch.tensor([sizes[peer]], dtype=torch.int64, device=device)
               for peer in receivers}, recv_sizes)
    split = [int(recv_sizes[peer].item()) for peer in senders]
    send = send.to(device)  # a copy on the GPU under NCCL; gloo sends the host buffer
    recv = torch.empty(sum(split), dtype=torch.uint8, device=device)
    parts = dict(zip(senders, torch.split(recv, split))) if senders else {}
    _exchange({peer: send[starts[peer]:ends[peer]] for peer in receivers}, parts)
    del send, parts
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
    names, templates = zs.names(), zs.prompt_templates()
    num_templates = len(templates)
    prompts = [t.format(name) for name in names for t in templates]
    sums = None
    for start in range(0, len(prompts), zs.prompt_batch):
        tokens = tokenizer(prompts[start:start + zs.prompt_batch],
                           context_length=context_length).to(device)
        emb = model.encode_text(tokens).float()
        if sums is None:
            sums = emb.new_zeros(len(names), emb.shape[-1])
        owner = torch.arange(start, start + len(emb), device=emb.device) // num_templates
        sums.index_add_(0, owner, emb)
    return torch.nn.functional.normalize(sums / num_templates, dim=-1)


@torch.no_grad()
def evaluate(engine, tokenizer, zs: ZeroShotConfig, data: DataConfig, rank: int,
             world_size: int, device: torch.device, dtype: torch.dtype) -> dict:
    """``zero_shot_top1`` / ``zero_shot_top5`` over the held-out set (same on all ranks).

    Also ``zero_shot_samples`` (images classified), ``zero_shot_unreadable_shards``
    (shards of the set that could not be read: the evaluation goes on without them) and
    ``zero_shot_bad_labels`` (samples up to the set's end whose label is not a class id of
    ``zero_shot.class_names``: left out of the set, so they do not count against the cap);
    ``zero_shot_error`` instead of accuracies when the ranks found different shard lists
    or a rank could not list them (logged as an error on every rank; the run goes on).
    Collective: every rank calls it with the same configs.
    """
    share = read_share(zs, data, rank, world_size, device)
    unreadable = share.unreadable_shards
    if share.error is not None:
        log.error(share.error)
        return {"zero_shot_error": share.error, "zero_shot_unreadable_shards": unreadable}
    if unreadable:
        log.warning("zero-shot evaluation without %d unreadable held-out shard(s)", unreadable)
    if share.bad_labels:
        log.warning("zero-shot evaluation without %d held-out sample(s) whose label is not a "
                    "class id (0 to %d, zero_shot.class_names)", share.bad_labels,
                    len(zs.names()) - 1)
    totals = {"zero_shot_unreadable_shards": unreadable, "zero_shot_bad_labels": share.bad_labels}
    if share.num_samples == 0:
        log.warning("zero-shot evaluation skipped: the held-out set %s has no labelled sample",
                    redact_urls(zs.urls))
        return {"zero_shot_samples": 0} | totals
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
            "zero_shot_samples": int(counts[2].item())} | totals


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
