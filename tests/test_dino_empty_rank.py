"""DINO on a rank whose micro-batch holds no ground-truth box (finetune/heads/dino.py).

transformers' contrastive-denoising builder returns nothing for a batch without boxes
before it embeds a label, so ``label_embed`` used to go unused on such a rank while the
others used it. DeepSpeed ZeRO 1-3 reduce only the gradients a rank has (and ZeRO-3
gathers only the modules a rank runs): the ranks' collectives then disagree (gloo aborts,
"Received data size doesn't match expected size"; NCCL hangs or sums the wrong
parameters). Empty batches are common (``data.filter_empty_gt=false`` and negative crops
are the defaults). The head now runs ``label_embed`` on every step and adds exactly zero.

Run as ranks (``run_file_function``), this file's ``_rank_main`` trains one step of a tiny
DINO under ZeRO-2 and ZeRO-3 (every parameter partitioned), rank 1 on an image without box.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TINY_TRUNK = {"channels": 16, "depths": (1, 1, 2, 1), "groups": (1, 2, 4, 8)}
TINY_HEAD = {"num_queries": 20, "d_model": 64, "encoder_layers": 1, "decoder_layers": 2,
             "num_heads": 4, "ffn_dim": 128, "train_sizes": (64,), "test_size": 64,
             "max_size": 64, "num_dn_queries": 10}
STAGES = (2, 3)  # ZeRO-3 with run.zero_persistence_threshold=0: every parameter partitioned


def _tiny():
    from finetune.heads.dino import build_dino

    torch.manual_seed(0)
    model = build_dino("internimage_t", 3, backbone_kwargs=TINY_TRUNK, **TINY_HEAD)
    return model.train()


def _batch(with_box: bool) -> tuple[list[torch.Tensor], list[dict]]:
    """One 64x64 image; its target holds one box, or none (an empty image)."""
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(1))
    if with_box:
        target = {"boxes": torch.tensor([[5.0, 5, 30, 40]]), "labels": torch.tensor([2])}
    else:
        target = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}
    return [image], [target]


def _params_with_grad(model, with_box: bool) -> tuple[set[str], dict[str, torch.Tensor]]:
    """The names of the parameters one backward gives a gradient, and the loss terms."""
    model.zero_grad(set_to_none=True)
    total, terms = model.loss(*_batch(with_box))
    total.backward()
    assert torch.equal(total, sum(terms.values()))
    return {n for n, p in model.named_parameters() if p.grad is not None}, terms


def test_batches_with_and_without_boxes_give_gradients_to_the_same_parameters():
    model = _tiny()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    with_box, _ = _params_with_grad(model, True)
    without, terms = _params_with_grad(model, False)
    assert with_box == trainable
    assert without == with_box, sorted(with_box ^ without)
    # the call that keeps label_embed in the graph adds exactly zero, loss and gradient
    assert terms["loss_dn"].item() == 0.0
    assert torch.count_nonzero(model.label_embed.weight.grad) == 0


def _rank_main(_unused: str = "") -> None:
    """One rank: for each ZeRO stage, one training step of the tiny DINO through a
    DeepSpeed engine built as fine-tuning builds it (runtime/ds_config.py), rank 0 on an
    image with a box, rank 1 on one without; then every rank's full weights must be equal,
    and ``label_embed`` must have moved (rank 0's gradient reached both ranks)."""
    sys.path.insert(0, str(REPO))
    import deepspeed
    import torch.distributed as dist

    from runtime.dist import init_distributed
    from runtime.ds_config import DeepSpeedSpec, deepspeed_config

    rank = init_distributed(timeout_min=0.5).rank  # a collective mismatch: fail, not hang
    for stage in STAGES:
        model = _tiny()
        before = model.label_embed.weight.detach().clone()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        config = deepspeed_config(DeepSpeedSpec(micro_batch=1, zero_stage=stage,
                                                param_persistence_threshold=0))
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config,
                                          dist_init_required=False)
        terms = engine(*_batch(with_box=rank == 0))  # the training loop's call: loss terms
        engine.backward(sum(terms.values()))
        engine.step()
        params = list(engine.module.parameters())
        with deepspeed.zero.GatheredParameters(params, enabled=stage == 3):
            flat = torch.cat([p.detach().float().flatten() for p in params])
            moved = not torch.equal(engine.module.label_embed.weight.detach(), before)
        gathered = [torch.empty_like(flat) for _ in range(2)]
        dist.all_gather(gathered, flat)
        assert torch.equal(gathered[0], gathered[1]), f"stage {stage}: ranks' weights differ"
        assert moved, f"stage {stage}: label_embed did not train on rank {rank}"
        print(f"stage {stage} rank {rank}: one step, weights equal across ranks", flush=True)
        engine.destroy()
    dist.barrier()


@pytest.mark.distributed
def test_zero_step_with_one_rank_without_boxes():
    from tests.rank_launcher import run_file_function

    output = run_file_function(__file__, "_rank_main", 2, "x", timeout=90)
    for rank in (0, 1):
        for stage in STAGES:
            assert f"stage {stage} rank {rank}: one step" in output[rank]
