"""An evaluation leaves torch's global RNG as it found it.

Starting a DataLoader's iterator draws its workers' base seed from the loader's
``generator``, or without one from torch's global RNG, even with ``num_workers=0`` (torch
docs, ``torch.utils.data.DataLoader``: "generator (torch.Generator, optional) - If not
None, this RNG will be used by RandomSampler to generate random indexes and
multiprocessing to generate base_seed for workers"). Training draws from that RNG too, so
an evaluation drawing there would make a run resumed after a stop at an evaluation step,
or a run with another ``eval_every``, train on other random numbers than the
uninterrupted one."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from runtime.dist import DistInfo


def _val_set(n: int = 6) -> list[tuple[torch.Tensor, int]]:
    return [(torch.full((3, 4, 4), float(i)), i % 3) for i in range(n)]


def _cfg() -> SimpleNamespace:
    return SimpleNamespace(run=SimpleNamespace(batch_size=2, num_workers=0))


def test_the_classification_validation_loader_leaves_the_global_rng_alone():
    from finetune.cls_data import build_val_loader

    loader = build_val_loader(_cfg(), DistInfo(), _val_set())
    torch.manual_seed(0)
    before = torch.get_rng_state()
    assert sum(len(labels) for _, labels in loader) == 6
    assert torch.equal(torch.get_rng_state(), before)


def test_a_classification_evaluation_leaves_the_global_rng_alone():
    from finetune.cls_data import build_val_loader
    from finetune.zero import evaluate

    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 3))
    loader = build_val_loader(_cfg(), DistInfo(), _val_set())
    before = torch.get_rng_state()
    metrics = evaluate(net, loader, DistInfo(), torch.float32, img_size=4)
    assert set(metrics) == {"top1", "top5", "val_loss"}
    assert torch.equal(torch.get_rng_state(), before)
    # the draw training makes next is the one it makes without the evaluation
    after_eval = torch.rand(3)
    torch.set_rng_state(before)
    assert torch.equal(torch.rand(3), after_eval)


def test_the_dense_evaluation_batches_leave_the_global_rng_alone():
    from finetune.eval_loader import share_batches

    torch.manual_seed(0)
    before = torch.get_rng_state()
    batches = list(share_batches(_val_set(5), DistInfo(), batch_size=2, num_workers=0))
    assert [len(b) for b in batches] == [2, 2, 1]
    assert torch.equal(torch.get_rng_state(), before)
