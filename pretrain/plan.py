"""``--dry-run``: what a run would do, from the config alone (no data access)."""

from __future__ import annotations

from typing import Any

import torch

from pretrain.config import PretrainConfig
from pretrain.estimate import largest_layer_params, measure_activation_bytes, model_state_bytes

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def plan(cfg: PretrainConfig, gpus: int, gpus_per_node: int = 8) -> dict[str, Any]:
    """Parameters (model built on the meta device), steps, samples and per-GPU memory."""
    from pretrain.m3i_model import M3IModel

    with torch.device("meta"):
        model = M3IModel(cfg.model.name, cfg.model.embed_dim, cfg.data.context_length,
                         cfg.text.width, cfg.text.heads, cfg.text.layers, cfg.text.vocab_size,
                         1, **cfg.model.overrides())
    total = sum(p.numel() for p in model.parameters())
    global_batch = cfg.data.batch_size * cfg.engine.grad_accum * gpus
    if cfg.run.epochs > 0:
        steps = max(1, int(cfg.run.epochs * cfg.run.samples_per_epoch / global_batch))
    else:
        steps = cfg.run.max_steps
    states_gpu, states_cpu = model_state_bytes(total, largest_layer_params(model), gpus,
                                               gpus_per_node, cfg.engine.zero_stage,
                                               cfg.engine.offload_optimizer)
    plain, ckpt = measure_activation_bytes(model.visual, cfg.data.batch_size,
                                           cfg.data.image_size, DTYPES[cfg.engine.precision])
    activations = ckpt if cfg.model.checkpointing() else plain
    weights = sum(s.weight for s in cfg.data.sources)
    gib = 2**30
    return {
        "model": cfg.model.name,
        "backbone_parameters": sum(p.numel() for p in model.visual.parameters()),
        "total_parameters": total,
        "gpus": gpus, "global_batch": global_batch, "steps": steps,
        "epochs": cfg.run.epochs, "samples_per_epoch": cfg.run.samples_per_epoch,
        "samples_total": steps * global_batch, "warmup_steps": cfg.optim.warmup_steps,
        "sources": [{"name": s.name, "weight": s.weight, "share": round(s.weight / weights, 4)}
                    for s in cfg.data.sources],
        "zero_stage": cfg.engine.zero_stage, "precision": cfg.engine.precision,
        "activation_checkpointing": cfg.model.checkpointing(),
        "memory_per_gpu_gib": {
            "model_states": round(states_gpu / gib, 2),
            "image_tower_activations": round(activations / gib, 2),
            "total": round((states_gpu + activations) / gib, 2)},
        "model_states_cpu_per_node_gib": round(states_cpu / gib, 2),
        "checkpoint_every": cfg.run.checkpoint_every,
    }
