"""Forward passes in lock-step across ranks: how every evaluation runs a (ZeRO-3) model.

A ZeRO-3 module holds 1/N of each parameter on each rank and all-gathers a submodule's
parameters, collectively, when that submodule runs: every forward pass is a sequence of
collectives that every rank must join. An evaluation gives each rank its own share of the
data, and the shares differ (3 images on 2 ranks, a sliding window over images of other
sizes, a batch whose images are all corrupt on one rank). A rank that finished its share
and went on to its next collective (the metric's all-reduce) would wait there while the
other rank waits in an all-gather of its next forward pass: a deadlock.

So every forward pass of an evaluation goes through :func:`lockstep`. Before each one, all
ranks agree (one all-reduce of a flag) whether any rank still has a forward pass of its
own; a rank with none left runs a dummy one (same model, a small zero input, output
discarded) so that the other ranks' pass is matched, and once no rank has one left all
ranks leave together. The number of forward passes is thus agreed before each one, however
many inputs each rank holds and however many passes an input costs (windows, scales,
flips), and no rank needs to know it in advance. Each input is still seen by exactly one
rank: the caller combines the per-rank results afterwards (a sum or a gather).

Users: pre-training's zero-shot evaluation (pretrain/zeroshot.py) and the classification
(finetune/zero.py), detection (finetune/det_eval.py) and segmentation
(finetune/seg_eval.py) evaluations. Alone (no process group, or one rank) it adds nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from runtime.dist import any_rank


class LockstepForward:
    """``model`` called in lock-step with the other ranks (see the module docstring).

    Call it instead of ``model`` for each of this rank's own forward passes; then
    :meth:`finish` runs the dummy passes that the other ranks' remaining ones need.
    ``dummy_args()``: the positional arguments of one dummy pass (a small valid input).
    """

    def __init__(self, model: Callable[..., Any], dummy_args: Callable[[], tuple],
                 device: torch.device):
        self.model = model
        self.dummy_args = dummy_args
        self.device = device
        self.dummies = 0  # dummy passes this rank ran

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        any_rank(True, self.device)  # "I have a pass": every rank joins this one
        return self.model(*args, **kwargs)

    def finish(self) -> int:
        """Dummy passes until no rank has a pass of its own left; returns how many ran."""
        while any_rank(False, self.device):
            self.model(*self.dummy_args())  # its output is discarded
            self.dummies += 1
        return self.dummies


@contextmanager
def lockstep(model: Callable[..., Any], dummy_args: Callable[[], tuple],
             device: torch.device) -> Iterator[LockstepForward]:
    """``with lockstep(model, dummy_args, device) as forward:`` run this rank's passes as
    ``forward(x)``; leaving the block runs dummy passes until every rank has left it.

    An exception inside the block leaves at once (no dummy pass): the other ranks then
    fail in, or wait on, their next collective, as with any rank that dies.
    """
    forward = LockstepForward(model, dummy_args, device)
    yield forward
    forward.finish()
