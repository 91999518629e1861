"""Tag statistics across a resume on another slot count: the samples that the new slots
read again (each old worker's current shuffle block) are counted ``unknown_tags`` and
``malformed_tags`` once, as the run that never changed its slot count counts them."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from s3_server import good_samples, write_tar

from data.config import S3Config
from pretrain.data import DataConfig, SourceConfig, build_loader

SHARDS, PER_SHARD = 6, 6


@pytest.fixture(scope="module")
def tagged(tmp_path_factory) -> tuple[list[str], str, Counter[str]]:
    """Shard URLs, a vocabulary of ``a`` and ``b``, and what the data holds: per shard,
    samples 0 and 3 carry a tag outside the vocabulary, 1 and 4 a tags member that is not
    JSON, 2 and 5 only known tags."""
    d = tmp_path_factory.mktemp("tagged")
    urls = []
    for i in range(SHARDS):
        samples = good_samples(f"s{i}-", PER_SHARD, size=8)
        for j, sample in enumerate(samples):
            sample["json"] = (json.dumps({"tags": ["a", f"new{i}{j}"]}) if j % 3 == 0
                              else "{not json" if j % 3 == 1
                              else json.dumps({"tags": ["b"]}))
        urls.append(str(write_tar(d / f"s{i}.tar", samples)))
    vocab = d / "tags.txt"
    vocab.write_text("a\nb\n")
    truth = Counter(unknown_tags=2 * SHARDS, malformed_tags=2 * SHARDS)
    reference: Counter[str] = Counter()
    for rank in range(2):  # one uninterrupted pass on 2 ranks counts each sample once
        loader = _loader(urls, str(vocab), rank, 2, 2)
        for _ in loader:
            pass
        reference.update(_tag_counts(loader))
    assert reference == truth
    return urls, str(vocab), truth


def _loader(urls, vocab, rank, world_size, batch_size, state=None):
    # one pass, shuffled in blocks of 4 (train=True): a saved position inside a block
    # makes a resumed run read the block's samples again
    cfg = DataConfig(sources=[SourceConfig("s", urls, resampled=False)], image_size=16,
                     batch_size=batch_size, workers=0, shuffle_buffer=4, context_length=12,
                     tag_vocab=vocab, s3=S3Config(retries=0, backoff=0.01))
    return build_loader(cfg, rank, world_size, train=True, state=state)


def _tag_counts(loader) -> Counter[str]:
    return Counter({k: loader.stats.events[k] for k in ("unknown_tags", "malformed_tags")})


# (batch size, batches read by old rank 0 and by old rank 1 before the save)
@pytest.mark.parametrize("batch, takes", [
    (1, (2, 7)), (1, (5, 1)), (2, (1, 3)),
    # a batch that holds the end of one block and the start of the next: counted at collate
    # time, after the next block began, the first block's unknown tags in it were taken out
    # with the block's (11 counted, not 12); counted per sample when decoded, they are not
    (3, (1, 3)),
])
def test_tag_counts_of_the_old_shuffle_blocks_count_once_across_a_resize(tagged, batch,
                                                                         takes):
    # The new slots read each old worker's current block again and count its samples'
    # tags again; the other per-sample counts of those blocks (skips, unread bytes) were
    # taken out of the totals, these were not: counted twice.
    urls, vocab, truth = tagged
    saved, mid_block = [], 0
    for rank, take in enumerate(takes):
        loader = _loader(urls, vocab, rank, 2, batch)
        for i, _ in enumerate(loader, 1):
            if i == take:
                break
        state = json.loads(json.dumps(loader.state_dict()))  # as in checkpoints
        mid_block += state["positions"]["0"]["emitted"] > 0
        saved.append(state)
    assert mid_block  # an old worker saved inside a block: its samples are read again
    totals: Counter[str] = Counter()
    for rank in range(3):  # resumed on 3 ranks to the end of the pass
        loader = _loader(urls, vocab, rank, 3, batch, state=saved)
        for _ in loader:
            pass
        totals.update(_tag_counts(loader))
    assert totals == truth
