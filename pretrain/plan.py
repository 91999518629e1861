"""``--dry-run``: what a run would do, from the config alone (no data access)."""

from __future__ import annotations

from typing import Any

import torch

from pretrain.config import PretrainConfig


def plan(cfg: PretrainConfig, gpus: int | None = None) -> dict[str, Any]:
    """Parameters (model built on the meta device), steps, samples and per-GPU memory."""
    from pretrain.estimate import estimate
    from pretrain.m3i_model import M3IModel

    world = gpus or int(__import__("os").environ.get("WORLD_SIZE", "8"))
    with torch.device("meta"):
        model = M3IModel(cfg.model.name, cfg.model.embed_dim, cfg.data.context_length,
                         cfg.text.width, cfg.text.heads, cfg.text.layers, cfg.text.vocab_size,
                         1, **cfg.model.overrides())
    backbone = sum(p.numel() for p in model.visual.parameters())
    total = sum(p.numel() for p in model.parameters())
    global_batch = cfg.data.batch_size * cfg.engine.grad_accum * world
    if cfg.run.epochs > 0:
        steps = max(1, int(cfg.run.epochs * cfg.run.samples_per_epoch / global_batch))
    else:
        steps = cfg.run.max_steps
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    mem = estimate(cfg.model.name, gpus=world, zero_stage=cfg.engine.zero_stage,
                   image_size=cfg.data.image_size, batch_per_gpu=cfg.data.batch_size,
                   activation_checkpointing=cfg.model.checkpointing(),
                   offload=cfg.engine.offload_optimizer,
                   dtype=dtype[cfg.engine.precision], **cfg.model.overrides())
    return {
        "model": cfg.model.name, "backbone_parameters": backbone, "total_parameters": total,
        "gpus": world, "global_batch": global_batch, "steps": steps,
        "samples_per_epoch": cfg.run.samples_per_epoch, "epochs": cfg.run.epochs,
        "samples_total": steps * global_batch,
        "warmup_steps": cfg.optim.warmup_steps,
        "sources": [{"name": s.name, "weight": s.weight,
                     "share": s.weight / sum(x.weight for x in cfg.data.sources)}
                    for s in cfg.data.sources],
        "zero_stage": cfg.engine.zero_stage, "precision": cfg.engine.precision,
        "activation_checkpointing": cfg.model.checkpointing(),
        "memory_per_gpu_gib": {
            "model_states_backbone": round(mem.model_states_per_gpu / 2**30, 2),
            "activations_backbone": round(mem.activations_per_gpu / 2**30, 2),
            "total_backbone": round(mem.total_per_gpu / 2**30, 2)},
        "checkpoint_every": cfg.run.checkpoint_every,
    }
