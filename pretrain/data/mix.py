"""Weighted mixing of source streams with a seeded RNG.

webdataset's RandomMix draws from the process-global ``random`` module, which would make
the mix depend on whatever else consumed that RNG; resume needs the mix to be a function
of the seed alone, hence this small equivalent.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from typing import TypeVar

T = TypeVar("T")


def mix_streams(streams: Sequence[Iterator[T]], weights: Sequence[float], rng: random.Random
                ) -> Iterator[tuple[int, T]]:
    """Yield ``(source index, item)``, picking the source of each item with probability
    proportional to its weight; an exhausted source drops out and the others go on."""
    active = list(range(len(streams)))
    while active:
        pick = active[0] if len(active) == 1 else rng.choices(
            active, weights=[weights[i] for i in active])[0]
        try:
            item = next(streams[pick])
        except StopIteration:
            active.remove(pick)
            continue
        yield pick, item
