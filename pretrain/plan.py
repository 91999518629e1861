"""``--dry-run``: what a run would do, from the config alone (no data access)."""

from __future__ import annotations

from typing import Any

import torch

from pretrain.config import PretrainConfig
from pretrain.engine import DTYPES, global_batch, total_steps
from pretrain.estimate import (
    build_bytes_per_rank,
    check_whole_nodes,
    largest_layer_params,
    measure_activation_bytes,
    measure_text_activation_bytes,
)
from runtime.ds_config import reduce_bytes
from runtime.memory import model_state_bytes, zero_buffer_bytes


def planned_tags(cfg: PretrainConfig) -> int | None:
    """The number of tags the trainer will read from ``data.tag_vocab`` (the built-in demo
    vocabulary's without writing the demo data), None where a dry run cannot read it (it
    plans without the data: pretrain/config.py warns then)."""
    from pretrain.data.decode import TagVocab
    from pretrain.demo import BUILTIN

    path = cfg.data.tag_vocab
    if path and path.startswith(BUILTIN):
        from data.demo import TAG_VOCAB  # what ensure_demo_shards writes as tags.txt

        return len(TAG_VOCAB)
    try:
        return len(TagVocab.load(path))
    except (OSError, UnicodeDecodeError):
        return None


def meta_model(cfg: PretrainConfig, num_tags: int = 1):
    """The run's M3I model on the meta device (no memory) with ``num_tags`` tag
    embeddings."""
    from pretrain.m3i_model import M3IModel

    with torch.device("meta"):
        return M3IModel(cfg.model.name, cfg.model.embed_dim, cfg.data.context_length,
                        cfg.text.width, cfg.text.heads, cfg.text.layers, cfg.text.vocab_size,
                        num_tags, decoder=cfg.objective.image.decoder_spec(),
                        text_arch=cfg.text.arch, **cfg.model.overrides())


def plan(cfg: PretrainConfig, gpus: int, gpus_per_node: int = 8) -> dict[str, Any]:
    """Parameters (model built on the meta device), steps, samples, per-GPU memory and
    what a rank holds while the model is built (zero.Init under ZeRO-3, as the trainer).
    A ``gpus`` count that fills no whole number of ``gpus_per_node`` nodes is refused
    (``ValueError``): DeepSpeed's estimators would count it as whole nodes."""
    check_whole_nodes(gpus, gpus_per_node)
    tags = planned_tags(cfg)
    model = meta_model(cfg, tags if tags is not None else 1)
    total = sum(p.numel() for p in model.parameters())
    batch = global_batch(cfg, gpus)
    steps = total_steps(cfg, gpus)  # what the trainer runs (a fresh start)
    memory = memory_bytes(cfg, model, gpus, gpus_per_node)
    weights = sum(s.weight for s in cfg.data.sources)
    gib = 2**30
    return {
        "model": cfg.model.name,
        "backbone_parameters": sum(p.numel() for p in model.visual.parameters()),
        "total_parameters": total,
        # an unreadable vocabulary: its tag embeddings are not in total_parameters
        "tag_vocabulary_size": tags if tags is not None else "unread: not counted",
        "gpus": gpus, "gpus_per_node": min(gpus, gpus_per_node), "global_batch": batch,
        "steps": steps,
        "epochs": cfg.run.epochs, "samples_per_epoch": cfg.run.samples_per_epoch,
        "samples_total": steps * batch, "warmup_steps": cfg.optim.warmup_steps,
        "sources": [{"name": s.name, "weight": s.weight, "share": round(s.weight / weights, 4)}
                    for s in cfg.data.sources],
        "zero_stage": cfg.engine.zero_stage, "precision": cfg.engine.precision,
        "activation_checkpointing": cfg.model.checkpointing(),
        "memory_per_gpu_gib": {k: round(v / gib, 2) for k, v in memory["gpu"].items()},
        "model_states_cpu_per_node_gib": round(memory["states_cpu_per_node"] / gib, 2),
        "model_build": {"zero_init": memory["zero_init"], "device": memory["build_device"],
                        "peak_per_rank_gib": round(memory["build_per_rank"] / gib, 2),
                        "host_per_node_gib": round(memory["build_host_per_node"] / gib, 2)},
        "checkpoint_every": cfg.run.checkpoint_every,
    }


def image_branch_bytes(cfg: PretrainConfig, model, gpus: int, dtype: torch.dtype
                       ) -> dict[str, int]:
    """Per-GPU bytes of M3I's image branch beyond the online model's states: the fp32 EMA
    target encoder (partitioned over the GPUs under ZeRO-3, with the run's 16-bit slices
    beside it in bf16/fp16 runs; whole and fp32 only otherwise), an upper
    bound of its no-gradient forward on the 2B target views (the block inputs checkpointing
    would keep: a no-grad forward frees each block's tensors as it goes), and what autograd
    keeps for the decoder's backward. ``model``: the M3I model on the meta device."""
    from models.memory import measure_saved_bytes

    visual_params = sum(p.numel() for p in model.visual.parameters())
    shards = gpus if cfg.engine.zero_stage == 3 else 1
    batch, size = cfg.data.batch_size, cfg.data.image_size
    _, teacher_forward = measure_activation_bytes(model.visual, 2 * batch, size, torch.float32)
    # the unpooled map's grid: the stride of the map the decoder reads (16 for H, 32 else)
    stride = 16 if model.visual.use_clip_projector else 32
    grid = size // stride
    decoder = model.decoder

    def decode():
        fmap = torch.empty(batch, model.visual.num_features, grid, grid, device="meta",
                           dtype=dtype)
        mix = torch.zeros(batch, grid, grid, dtype=torch.bool, device="meta")
        pos = torch.zeros(batch, grid * grid, 2, device="meta")
        return decoder(fmap, mix, pos, pos)

    decoder_plain, _ = measure_saved_bytes(decoder, decode, dtype)
    model.visual.to(dtype=dtype)  # leave the model in the run's dtype, as the other probes
    # ZeRO-3 in 16 bits: fp32 average + the engine's 16-bit slices (pretrain/m3i/ema.py)
    per_param = 4 + (dtype.itemsize if cfg.engine.zero_stage == 3 and dtype.itemsize < 4 else 0)
    return {"target_encoder_states": per_param * -(-visual_params // shards),
            "target_encoder_forward_upper_bound": teacher_forward,
            "decoder_activations": decoder_plain}


def memory_bytes(cfg: PretrainConfig, model, gpus: int, gpus_per_node: int = 8) -> dict[str, Any]:
    """The run's memory plan in bytes: per-GPU terms (``gpu``, with their ``total``), model
    states in host memory per node, and the peak one rank holds while the model is built
    (where, and per node when on the host). ``model``: the M3I model on the meta device;
    the activation probes leave it in the run's dtype."""
    from pretrain.ds_config import deepspeed_config

    eng, dtype = cfg.engine, DTYPES[cfg.engine.precision]
    params, largest = sum(p.numel() for p in model.parameters()), largest_layer_params(model)
    zero_init = eng.zero_stage == 3  # the trainer builds under deepspeed.zero.Init then
    states_gpu, states_cpu = model_state_bytes(params, largest, gpus, gpus_per_node,
                                               eng.zero_stage, eng.offload_optimizer, zero_init,
                                               offload_param=eng.offload_param)
    ds = deepspeed_config(cfg, cfg.data.batch_size)
    buffers = zero_buffer_bytes(params, ds["zero_optimization"], dtype.itemsize,
                                reduce_bytes(eng.precision, ds))
    # the probes move the model to dtype on the meta device: after the counts above
    plain, ckpt = measure_activation_bytes(model.visual, cfg.data.batch_size,
                                           cfg.data.image_size, dtype)
    text = measure_text_activation_bytes(model.text, cfg.data.batch_size,
                                         cfg.data.context_length, dtype)
    gpu = {"model_states": states_gpu,
           "image_tower_activations": ckpt if cfg.model.checkpointing() else plain,
           "text_tower_activations": text, **buffers}
    if cfg.objective.image.enabled:
        gpu |= image_branch_bytes(cfg, model, gpus, dtype)
    on_host = not zero_init or eng.offload_param
    peak = build_bytes_per_rank(params, largest, gpus, zero_init, dtype.itemsize)
    return {"gpu": gpu | {"total": sum(gpu.values())}, "states_cpu_per_node": states_cpu,
            "zero_init": zero_init, "build_device": "host" if on_host else "gpu",
            "build_per_rank": peak,
            "build_host_per_node": peak * min(gpus, gpus_per_node) if on_host else 0}
