"""Typed configuration of a pre-training run (loaded from YAML by the launcher).

Defaults are the CPU demo's where a default is true for everyone; presets in
configs/pretrain/ hold the real recipes.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import ClassVar, Literal

from data.config import (
    check_adamw,
    check_collective_timeout,
    check_dcn_backend,
    check_no_credentials,
)
from pretrain.data.config import DataConfig, check

# how a data.tag_vocab is made (launch/commands/shards.py), named where one is refused
TAGS_HINT = "build one with `internimage shards tags SHARDS --top N --out FILE`"


@dataclass
class ModelConfig:
    """The image tower: an InternImage variant plus architecture overrides."""

    name: str = "internimage_t"
    channels: int | None = None
    depths: list[int] | None = None
    groups: list[int] | None = None
    drop_path_rate: float | None = None
    with_cp: bool | None = None  # default: on for L/XL/H
    dcn_backend: str = "auto"
    embed_dim: int = 512  # joint image-text embedding width

    def __post_init__(self) -> None:
        from models import resolve_variant

        try:
            resolve_variant(self.name)
        except ValueError as err:
            raise ValueError(f"model.name: {err}") from None
        check(self.embed_dim >= 1, "model.embed_dim", "must be >= 1")
        # drop path keeps a block with probability 1 - rate (torch's bernoulli_ refuses a
        # rate outside [0, 1] only at the first forward, after the whole ZeRO-3 build; a
        # negative one switched drop path off); 1 would drop the last block always. The
        # range fine-tuning accepts (finetune/config.py)
        check(self.drop_path_rate is None or 0 <= self.drop_path_rate < 1,
              "model.drop_path_rate", f"must be in [0, 1), got {self.drop_path_rate}")
        check_dcn_backend(self.dcn_backend)
        if self.depths is not None and self.groups is not None:
            check(len(self.depths) == len(self.groups), "model.depths",
                   f"{len(self.depths)} stages but model.groups has {len(self.groups)}")

    def overrides(self) -> dict:
        """Keyword overrides for ``models.build_model``."""
        out = {"dcn_backend": self.dcn_backend}
        for key in ("channels", "depths", "groups", "drop_path_rate"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out

    def checkpointing(self) -> bool:
        """Activation checkpointing: explicit setting, else on for L/XL/H."""
        if self.with_cp is not None:
            return self.with_cp
        from models import resolve_variant

        return resolve_variant(self.name) in ("internimage_l", "internimage_xl", "internimage_h")


@dataclass
class TextConfig:
    """The text tower: ``arch`` ``clip`` (open_clip's TextTransformer: causal, pre-norm,
    pooled at the end-of-text token) or ``bert`` (BERT-Base's architecture, M3I's text
    target encoder: bidirectional, post-norm, pooled at the first token; see
    ``pretrain.m3i_model._BertTextTower``). Both read the CLIP BPE tokenizer's ids."""

    width: int = 512
    heads: int = 8
    layers: int = 12
    vocab_size: int = 49408
    arch: Literal["clip", "bert"] = "clip"

    def __post_init__(self) -> None:
        # the counts first: a zero made the modulo below a ZeroDivisionError traceback,
        # and a negative one passed it (both towers split the width into heads: open_clip's
        # nn.MultiheadAttention and BERT's self-attention need width % heads == 0)
        check(self.heads >= 1, "text.heads", f"must be >= 1, got {self.heads}")
        check(self.width >= 1, "text.width", f"must be >= 1, got {self.width}")
        check(self.width % self.heads == 0, "text.width",
               f"must be divisible by text.heads ({self.heads}), got {self.width}")
        check(self.layers >= 1, "text.layers", "must be >= 1")
        check(self.arch in ("clip", "bert"), "text.arch",
              f"must be clip or bert, got {self.arch!r}")

    def hashed(self) -> dict:
        """The fields a checkpoint's model hash covers (``pretrain.engine.model_hash``):
        all of them, ``arch`` only when not ``clip``: runs from before the switch existed
        (all clip) keep the hash their checkpoints carry, so they still resume."""
        out = asdict(self)
        if self.arch == "clip":
            del out["arch"]
        return out


# objective.image.loss: the forms pretrain/m3i/loss.py computes
ImageLoss = Literal["unigrad", "cosine"]


@dataclass
class ImageTargetConfig:
    """M3I's image branch (issue #16): mixed views, EMA target encoder, decoder.

    Published by M3I (Su et al. 2023, Figure 2): two views of different images mixed into
    one input; the first image predicts its own view (intra-view), the second another view
    (cross-view); mask tokens with position embeddings relative to the input views' top-left
    origin. Not published by M3I, so taken from Siamese Image Modeling (Tao et al. 2022):
    the EMA target encoder with momentum 0.995 rising to 1 on a cosine, a 4-block decoder,
    block-wise masks, normalised-feature regression, 16 decoder heads, each view flipped
    with probability 0.5. Our own choices: the decoder width (MAE's and SiamIM's code
    default, 512; SiamIM's published ViT-B recipe uses 768), the mixing share, the view
    crop range (the loaded image is already a random resized crop; SiamIM crops each view
    from the whole image). The image loss is SiamIM's UniGrad form and weight
    (``loss: unigrad``; its target is the encoder's map, without SiamIM's EMA projector);
    ``loss: cosine`` is our earlier form (pretrain/m3i/loss.py). Sources: configs/pretrain/
    internimage_h_m3i.yaml names each.
    """

    weight: float = 0.0  # 0: branch off (the CLIP + tags objective)
    momentum: float = 0.995  # SiamIM's base EMA momentum (published)
    momentum_final: float = 1.0  # cosine to 1 (SiamIM, after BYOL; published)
    decoder_depth: int = 4  # SiamIM's decoder depth (published)
    decoder_width: int = 512  # ours (MAE's, SiamIM's code default; its recipe: 768)
    decoder_heads: int = 16  # SiamIM's decoder heads (published code)
    mix_share: float = 0.5  # share of patches showing the second image (assumption)
    view_scale: tuple[float, float] = (0.4, 1.0)  # crop area of each view (assumption)
    view_flip: float = 0.5  # horizontal flip probability of each view (SiamIM's)
    # SiamIM's UniGrad loss (published code), or our earlier cosine form
    # (pretrain/m3i/loss.py); the weight: SiamIM's --neg_weight default
    loss: ImageLoss = "unigrad"
    decorrelation_weight: float = 0.02

    def __post_init__(self) -> None:
        check(self.weight >= 0, "objective.image.weight", "must be >= 0 (0: branch off)")
        check(0 <= self.momentum <= self.momentum_final <= 1, "objective.image.momentum",
              "needs 0 <= momentum <= momentum_final <= 1")
        check(self.decoder_depth >= 1, "objective.image.decoder_depth", "must be >= 1")
        # the counts first (a zero was a ZeroDivisionError traceback below); the decoder's
        # attention splits its width into decoder_heads heads and its 2-D sine-cosine
        # position embedding into quarters (pretrain/m3i/decoder.py, pos_embed.py)
        check(self.decoder_heads >= 1, "objective.image.decoder_heads",
              f"must be >= 1, got {self.decoder_heads}")
        check(self.decoder_width >= 1, "objective.image.decoder_width",
              f"must be >= 1, got {self.decoder_width}")
        check(self.decoder_width % self.decoder_heads == 0 and self.decoder_width % 4 == 0,
              "objective.image.decoder_width",
              f"must be divisible by 4 and by decoder_heads ({self.decoder_heads}), got "
              f"{self.decoder_width}")
        check(0 < self.mix_share < 1, "objective.image.mix_share", "must be in (0, 1)")
        check(0 < self.view_scale[0] <= self.view_scale[1] <= 1, "objective.image.view_scale",
              "needs 0 < min <= max <= 1")
        check(0 <= self.view_flip <= 1, "objective.image.view_flip", "must be in [0, 1]")
        check(self.decorrelation_weight >= 0, "objective.image.decorrelation_weight",
              "must be >= 0")

    @property
    def enabled(self) -> bool:
        """Whether the run mixes views and trains the image branch."""
        return self.weight > 0

    def decoder_spec(self) -> dict[str, int] | None:
        """The decoder's shape for ``M3IModel(decoder=...)`` (None: branch off, no decoder)."""
        if not self.enabled:
            return None
        return {"width": self.decoder_width, "depth": self.decoder_depth,
                "heads": self.decoder_heads}


@dataclass
class ObjectiveConfig:
    """M3I-style loss: image-text InfoNCE, an image-tag term and the image branch, weighted."""

    image_text_weight: float = 1.0
    tag_weight: float = 0.5
    init_temperature: float = 0.07
    max_logit_scale: float = 100.0
    # Only true is correct, so only true is accepted (the key stays so that configs naming
    # it load): see __post_init__.
    gather_with_grad: bool = True
    image: ImageTargetConfig = field(default_factory=ImageTargetConfig)

    def __post_init__(self) -> None:
        check(self.image_text_weight >= 0 and self.tag_weight >= 0, "objective",
               "term weights must be >= 0")
        # Each rank scores its own rows against every rank's embeddings
        # (pretrain/objectives.py): without gradients through the all-gather, the other
        # ranks' rows send nothing back to this rank's embeddings, and the image-text
        # gradient is wrong (with a full matrix per rank it was 1/world_size of the true
        # one while the tag and image terms kept their scale).
        check(self.gather_with_grad, "objective.gather_with_grad",
              "false is not supported: the image-text loss needs gradients through the "
              "all-gather of embeddings; without them its gradient is wrong (1/world_size "
              "of the true one at best, while the other terms keep their scale). Remove "
              "the key")
        check(self.image_text_weight + self.tag_weight + self.image.weight > 0, "objective",
               "at least one term must have a positive weight")
        check(0 < self.init_temperature < 1, "objective.init_temperature", "must be in (0, 1)")
        # the learnable logit scale is clamped to [0, ln max_logit_scale] after every step
        # (pretrain.engine.clamp_logit_scale); it must start inside
        check(self.max_logit_scale > 1, "objective.max_logit_scale", "must be > 1")
        check(1 / self.init_temperature <= self.max_logit_scale, "objective.init_temperature",
              f"1 / init_temperature ({1 / self.init_temperature:.4g}) exceeds "
              f"objective.max_logit_scale ({self.max_logit_scale:g}), the bound the logit "
              f"scale is clamped to")


@dataclass
class OptimConfig:
    """AdamW with cosine schedule and linear warm-up (in steps)."""

    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_steps: int = 20
    grad_clip: float = 1.0
    # lr multiplier of the DCN offset layers (0.1 in the released classification
    # fine-tuning recipes); one name with fine-tuning's optim.dcn_lr_mult
    dcn_lr_mult: float = 1.0
    # keys since renamed (old -> new): loading an old one fails and names the new one
    RENAMED_KEYS: ClassVar[dict[str, str]] = {"dcn_offset_lr_mult": "dcn_lr_mult"}

    def __post_init__(self) -> None:
        # torch's AdamW would refuse bad betas or eps only after the model is built, and an
        # infinite lr trains until the loss is non-finite (one check for every task's AdamW)
        check_adamw(self.lr, self.betas, self.eps)
        check(0 <= self.min_lr <= self.lr, "optim.min_lr", "must be in [0, optim.lr]")
        check(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
        check(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        check(self.dcn_lr_mult > 0, "optim.dcn_lr_mult", "must be > 0")
        check(self.grad_clip >= 0, "optim.grad_clip",
              f"must be >= 0 (max gradient norm; 0: off), got {self.grad_clip}")


@dataclass
class EngineConfig:
    """DeepSpeed settings that matter; anything else through ``deepspeed_config``."""

    zero_stage: int = 3
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    grad_accum: int = 1
    overlap_comm: bool = True
    contiguous_gradients: bool = True
    prefetch_bucket_size: int = 50_000_000
    param_persistence_threshold: int = 100_000
    offload_optimizer: bool = False
    offload_param: bool = False
    deepspeed_config: str | None = None  # JSON file merged over the generated config

    def __post_init__(self) -> None:
        check(self.zero_stage in (0, 1, 2, 3), "engine.zero_stage",
               f"must be 0..3, got {self.zero_stage}")
        check(self.grad_accum >= 1, "engine.grad_accum", "must be >= 1")
        check(not self.offload_param or self.zero_stage == 3, "engine.offload_param",
               "parameter offload needs engine.zero_stage=3")
        # DeepSpeed's CPU Adam steps host parameters: stage 0 keeps them on the GPU
        # (deepspeed/ops/adam/cpu_adam.py asserts at the first step)
        check(not self.offload_optimizer or self.zero_stage >= 1, "engine.offload_optimizer",
               "optimizer offload needs engine.zero_stage 1, 2 or 3")


# Named sets from open_clip (open_clip/zero_shot_metadata.py): CLIP's ImageNet class names
# (IMAGENET_CLASSNAMES, in the ILSVRC-2012 class-id order: sorted WordNet ids) and prompt
# templates (OPENAI_IMAGENET_TEMPLATES: CLIP's 80, Radford et al. 2021, whose ensemble the
# published ImageNet zero-shot numbers use; SIMPLE_IMAGENET_TEMPLATES: its 7 short ones).
CLASS_NAME_SETS = {"imagenet": "IMAGENET_CLASSNAMES"}
TEMPLATE_SETS = {"openai_imagenet": "OPENAI_IMAGENET_TEMPLATES",
                 "simple_imagenet": "SIMPLE_IMAGENET_TEMPLATES"}


def _open_clip_set(name: str) -> list:
    from open_clip import zero_shot_metadata

    return list(getattr(zero_shot_metadata, name))


@dataclass
class ZeroShotConfig:
    """Held-out classification set for zero-shot evaluation (class names + prompts).

    ``class_names``: a list (index = the label id in the held-out shards) or the name of
    one of open_clip's sets (``imagenet``); ``templates``: format strings with one ``{}``
    or a set name (``openai_imagenet``: CLIP's 80, ``simple_imagenet``). Read them through
    :meth:`names` and :meth:`prompt_templates`."""

    urls: list[str] = field(default_factory=list)
    class_names: list[str] | str = field(default_factory=list)
    templates: list[str] | str = field(default_factory=lambda: ["a photo of a {}."])
    label_key: str = "cls"  # tar member holding the integer class id
    every: int = 0  # steps; 0: only at the end
    max_batches: int = 0  # 0: the whole set
    # prompts per text-tower forward (80 templates x 1000 classes do not fit in one)
    prompt_batch: int = 256

    def __post_init__(self) -> None:
        for key, value, sets in (("class_names", self.class_names, CLASS_NAME_SETS),
                                 ("templates", self.templates, TEMPLATE_SETS)):
            check(not isinstance(value, str) or value in sets, f"zero_shot.{key}",
                  f"must be a list or one of {sorted(sets)}, got {value!r}")
        if not isinstance(self.templates, str):
            check(bool(self.templates), "zero_shot.templates", "needs at least one template")
            for i, template in enumerate(self.templates):
                # without exactly one {} every class gets the same prompt (or format fails)
                check(template.count("{}") == 1 and template.count("{") == 1,
                      f"zero_shot.templates[{i}]",
                      f"must hold the class name's place as one {{}}, got {template!r}")
        check_no_credentials(self.urls, "zero_shot.urls")
        check(self.prompt_batch >= 1, "zero_shot.prompt_batch", "must be >= 1")
        check(self.max_batches >= 0, "zero_shot.max_batches", "must be >= 0 (0: the whole set)")

    def names(self) -> list[str]:
        """The class names, by label id."""
        if isinstance(self.class_names, str):
            return _open_clip_set(CLASS_NAME_SETS[self.class_names])
        return list(self.class_names)

    def prompt_templates(self) -> list[str]:
        """The prompt templates, as format strings with one ``{}``."""
        if isinstance(self.templates, str):  # open_clip's are functions of the class name
            return [t("{}") for t in _open_clip_set(TEMPLATE_SETS[self.templates])]
        return list(self.templates)


@dataclass
class RunConfig:
    """Length, logging, checkpoints and failure handling."""

    output_dir: str = "runs/pretrain"
    max_steps: int = 200  # the run's length when epochs is 0; not used when epochs > 0
    epochs: float = 0.0  # if > 0 (with samples_per_epoch): the steps derived from it
    samples_per_epoch: int = 0
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 100
    keep_last: int = 2
    on_nonfinite: Literal["stop", "skip"] = "stop"
    tensorboard: bool = True
    progress: bool = True
    # Minutes one collective may wait for the other ranks before the job fails (a rank
    # that hangs rather than dies: a stalled file read, a GPU in a bad state, a stopped
    # process). None: DeepSpeed's default, DEEPSPEED_TIMEOUT minutes else 10. Longer than
    # any wait a healthy rank imposes (rank 0 writing a checkpoint or evaluating while the
    # others wait). Fixed when the process group is created (runtime/dist.py).
    collective_timeout_min: float | None = None

    def __post_init__(self) -> None:
        # a negative epochs count fell back to max_steps without a word, an infinite one
        # failed at the first int() of the plan
        check(math.isfinite(self.epochs) and self.epochs >= 0, "run.epochs",
              f"must be >= 0 (0: run.max_steps steps), got {self.epochs}")
        check(self.max_steps >= 1 or self.epochs > 0, "run.max_steps",
              f"must be >= 1, got {self.max_steps}")
        check(self.log_every >= 1, "run.log_every", "must be >= 1")
        check(self.checkpoint_every >= 0, "run.checkpoint_every", "must be >= 0")
        check(self.keep_last >= 1, "run.keep_last", "must be >= 1")
        check(self.epochs == 0 or self.samples_per_epoch > 0, "run.samples_per_epoch",
               "is required when run.epochs is set")
        check_collective_timeout(self.collective_timeout_min)


@dataclass
class PretrainConfig:
    """A whole pre-training run. ``data`` unset means the built-in demo shards."""

    model: ModelConfig = field(default_factory=ModelConfig)
    text: TextConfig = field(default_factory=TextConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    data: DataConfig | None = None
    zero_shot: ZeroShotConfig = field(default_factory=ZeroShotConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        # Skipping a step after some micro-batches already added their gradients would
        # still apply those; only whole single-micro-batch steps can be skipped cleanly.
        check(self.run.on_nonfinite == "stop" or self.engine.grad_accum == 1,
               "run.on_nonfinite", "'skip' needs engine.grad_accum=1")
        # a data section trains on its sources: without any (an empty list, or a section
        # without the key, whose default is []) the start failed in the loader, after the
        # distributed set-up, with a traceback (DataConfig itself may be empty: the data
        # tools build one to fill in)
        check(self.data is None or bool(self.data.sources), "data.sources",
              "needs at least one source (a list of {name, urls, ...}; the demo config, "
              "configs/pretrain/demo.yaml, has one)")
        # the trainer evaluates only with both: held-out shards without class names were
        # skipped without a word (class names without URLs is how evaluation is turned
        # off: zero_shot.urls=[])
        check(not self.zero_shot.urls or bool(self.zero_shot.class_names),
              "zero_shot.class_names",
              f"is empty while zero_shot.urls is set ({len(self.zero_shot.urls)} URL(s)): "
              "zero-shot evaluation needs the class names, by label id (a list, or "
              "imagenet); set them, or zero_shot.urls=[] to run no evaluation")
        if self.objective.image.enabled and self.data is not None:
            # the image branch mixes at the grid of the map its decoder reads: stride 16
            # for InternImage-H's fused map, 32 for T..XL's last stage
            from models import resolve_variant

            stride = 16 if resolve_variant(self.model.name) == "internimage_h" else 32
            size = self.data.image_size
            check(size % stride == 0 and size // stride >= 2, "data.image_size",
                  f"objective.image mixes two images on the backbone's {stride}-pixel patch "
                  f"grid: needs a multiple of {stride} of at least {2 * stride}, got {size}")
            check(self.data.batch_size >= 2, "data.batch_size",
                  "objective.image mixes two images of a rank's batch: needs >= 2")
        if self.data is not None and self.data.tag_vocab is not None:
            # read from the file system (pretrain.data.decode.TagVocab.load): a URL failed
            # at the start, on every rank, as a file not found
            check("://" not in self.data.tag_vocab, "data.tag_vocab",
                  f"{self.data.tag_vocab}: must be a local file (the vocabulary is read from "
                  f"the file system, not from object storage; copy it to a path every node "
                  f"sees, or {TAGS_HINT})")


def check_tag_vocab(data: DataConfig | None, tag_weight: float = 0.0) -> None:
    """Refuse (``ValueError`` naming ``data.tag_vocab``) a tag vocabulary this machine cannot
    read: missing, a folder, unreadable, not UTF-8, and, while the tag term is on
    (``tag_weight`` > 0), none at all or one without a tag: the term then scores images
    against zero tags, a loss of exactly 0 that trains nothing, and a run went on for days
    without a sign. The trainer and every data worker load the file (one tag a line) once
    the run has started; a missing one ended every rank with a ``FileNotFoundError``
    traceback. Called before any compute (`internimage pretrain`, its dry run, and
    `internimage submit`, which only warn: the file may be built after the plan, and the
    compute nodes may see other files). The built-in demo's (``builtin:``, written on first
    use) is not checked."""
    path = None if data is None else data.tag_vocab
    if path is None:
        if tag_weight > 0:
            raise ValueError(
                f"data.tag_vocab: not set, while objective.tag_weight is {tag_weight:g}: "
                f"the tag term would score images against no tags (a loss of 0 that trains "
                f"nothing); set data.tag_vocab ({TAGS_HINT}) or objective.tag_weight=0")
        return
    if path.startswith("builtin:"):
        return
    where = path if os.path.isabs(path) else f"{path} (from {os.getcwd()})"
    try:
        with open(path, encoding="utf-8") as f:
            # the vocabulary's own reading rule (pretrain.data.decode.TagVocab.load)
            tags = [ln for ln in f.read().splitlines()
                    if ln.strip() and not ln.startswith("#")]
    except FileNotFoundError:
        reason = "not found"
    except IsADirectoryError:
        reason = "is a folder, not a file"
    except OSError as err:
        reason = f"cannot be read ({err.strerror or err})"
    except UnicodeDecodeError:
        reason = "is not UTF-8 text (one tag a line)"
    else:
        if tags or tag_weight <= 0:
            return
        reason = (f"holds no tag (one a line; '#' starts a comment), while "
                  f"objective.tag_weight is {tag_weight:g}")
    raise ValueError(f"data.tag_vocab: {where} {reason}; {TAGS_HINT}")
