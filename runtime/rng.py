"""Random state of a training process: seeding, per-rank save/restore, data-loader seeds.

One home for what an exact resume needs from the random generators, used by pre-training
and every fine-tuning task:

- :func:`rng_state` / :func:`set_rng_state`: this process's python, numpy, torch CPU and
  (current device) CUDA generators as JSON-ready values. Every rank has its own state
  (different data, different augmentations, different dropout masks), so a checkpoint keeps
  one per rank (in that rank's own ``rank_states/NNNNN.json``, runtime/checkpoint.py) and
  each rank restores its own with :func:`set_rng_state` (:func:`warn_rng_not_restored`
  when the checkpoint holds none for this run's ranks).
- :func:`loader_seed`: the seed of an epoch's ``DataLoader`` generator. torch seeds each
  worker from a base seed drawn from that generator, so it must differ per rank (else every
  rank's worker k draws the same augmentations) and per epoch.
- :func:`seeded_host_rngs`: one sample's augmentation drawn from a seed of its own (a
  streamed sample's place in its stream, a map-style set's :func:`sample_seed`), whatever
  the process drew before it.
- :class:`StartAt`: an epoch's sampler from the first sample a resumed run has not
  trained on; the samples before it are never read (their augmentations depend on
  nothing the skipped ones drew).
"""

from __future__ import annotations

import base64
import itertools
import logging
import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

log = logging.getLogger(__name__)


def seed_all(seed: int) -> None:
    """Seed python's ``random``, numpy's global generator and torch (CPU and every CUDA
    device: ``torch.manual_seed`` seeds both)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextmanager
def seeded_host_rngs(seed: int, restore: bool = True) -> Iterator[None]:
    """Run the block with python's ``random``, numpy's global generator and torch's CPU
    generator seeded from ``seed``; with ``restore``, give them back their previous states
    after it.

    For library transforms that draw from the global generators (timm's RandAugment draws
    from numpy and ``random``, its crops and erasing from ``random``, torchvision's flips
    from torch): seeding each sample makes its augmentation a function of its seed alone,
    so a resumed stream augments exactly as the uninterrupted one. CUDA generators are
    left alone (``torch.manual_seed`` would reseed them too). Seeding costs ~12 us; the
    restore ~140 us (numpy's state copy), so a DataLoader worker, whose generators serve
    nothing else, passes ``restore=False``; the main process must restore (training
    draws from them)."""
    saved = ((random.getstate(), np.random.get_state(), torch.random.get_rng_state())
             if restore else None)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.random.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        if saved is not None:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.random.set_rng_state(saved[2])


def loader_seed(seed: int, rank: int, epoch: int) -> int:
    """Seed of the ``DataLoader`` generator of ``epoch`` on ``rank``.

    torch draws each iterator's worker base seed from the loader's generator (worker ``w``
    gets ``base_seed + w``), so a generator seeded alike on every rank gives every rank the
    same augmentation stream. numpy's ``SeedSequence`` mixes the three numbers into
    independent, well-spread seeds (``seed + rank + epoch`` would collide across them).
    """
    entropy = [int(seed) % 2**63, int(rank), int(epoch)]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> 1)


def loader_generator(seed: int, rank: int, epoch: int) -> torch.Generator:
    """A CPU generator seeded with :func:`loader_seed` (pass as ``DataLoader(generator=)``)."""
    return torch.Generator().manual_seed(loader_seed(seed, rank, epoch))


def _encode(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode()


def _decode(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def rng_state() -> dict[str, Any]:
    """This process's RNG states as JSON-ready values (python, numpy, torch, CUDA)."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "torch": _encode(torch.get_rng_state()),
    }
    if torch.cuda.is_available():  # the current device's generator
        state["cuda"] = _encode(torch.cuda.get_rng_state())
    return state


def is_rng_state(value: Any) -> bool:
    """Whether ``value`` has the shape :func:`rng_state` writes (its python, numpy and
    torch entries): checked before a resume's first collective, where restoring a damaged
    one later would fail on one rank alone."""
    return (isinstance(value, dict) and isinstance(value.get("python"), list)
            and isinstance(value.get("numpy"), list) and isinstance(value.get("torch"), str))


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_decode(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(_decode(state["cuda"]))


def warn_rng_not_restored(saved: int, world_size: int) -> None:
    """The warning of a resume whose checkpoint holds no random state for this run's ranks
    (``saved`` ranks' states, none when written before they were saved, for ``world_size``
    ranks now): training goes on from the seeded state, no longer an exact continuation."""
    log.warning("resume is not exact: the checkpoint holds the random state of %d rank(s), "
                "this run has %d; continuing from freshly seeded generators", saved,
                world_size)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """Seed of the augmentation of sample ``index`` of a map-style training set in
    ``epoch`` (:func:`seeded_host_rngs`): a function of the three numbers alone, so a
    sample is augmented alike whichever worker, rank or resumed run loads it, and the
    samples before it need not be loaded. The numbers are mixed by chained SplitMix64
    finalisers (Steele, Lea and Flood, "Fast splittable pseudorandom number generators",
    2014; ~2 us here, against ~60 us for numpy's ``SeedSequence``, per sample) into a
    63-bit seed that differs from its neighbours in about half its bits."""
    x = _splitmix64(int(seed) % 2**64 ^ _SAMPLE_TAG)
    x = _splitmix64(x ^ int(epoch) % 2**64)
    return _splitmix64(x ^ int(index) % 2**64) >> 1


_SAMPLE_TAG = 0x53414D50  # "SAMP": a sample's seed chain starts apart from the run seed
_M64 = 2**64 - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


class StartAt(Sampler):
    """``sampler``'s indices from position ``start`` on: a resumed epoch's sampler, whose
    first ``start`` samples the run that saved already trained on. The whole order is
    drawn as before (the same permutation), only the first ``start`` indices are dropped,
    so nothing is loaded for them. Exact only when each sample's augmentation is drawn
    from its own seed (:func:`sample_seed`); the sampler's draws stay lazy, as the
    wrapped sampler's are (a DataLoader draws its workers' base seed from the same
    generator when its iterator is made, before the first index)."""

    def __init__(self, sampler: Sampler, start: int):
        self.sampler, self.start = sampler, max(0, int(start))

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.start)

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(iter(self.sampler), self.start, None)
