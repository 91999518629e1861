"""timm's generic model contract, held against the registered InternImage names.

The checks re-state those of timm's own tests/test_models.py (huggingface/pytorch-image-
models, the v1.0.x series this project pins, timm 1.0.31): ``test_model_default_cfgs``,
``test_model_forward``, ``test_model_backward``, ``test_model_forward_fx`` and
``test_model_backward_fx``. timm runs them on full models at 128..448 px; here they run
on a narrow, shallow build of each registered name (same class, head and pretrained cfg;
``channels``/``depths`` overridden) to stay fast on a CPU, and the full-size widths are
checked on the meta device.
"""

from __future__ import annotations

import math

import pytest
import timm
import torch
from timm.models import get_notrace_functions, get_notrace_modules
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

from models import VARIANTS, resolve_variant

# All registered names with their pretrained tags, as timm's test lists them
# (list_models(include_tags=True)).
TAGGED_NAMES = sorted(timm.list_models("internimage*", include_tags=True))
# Narrow and shallow; the drop-path rate stays each variant's default so that DropPath is
# part of the traced training graph, as in timm's test.
TINY_T = dict(channels=16, depths=(1, 1, 2, 1), groups=(1, 2, 4, 8))
TINY_H = dict(channels=32, depths=(1, 1, 6, 1), groups=(1, 2, 4, 8),
              level2_post_norm_block_ids=(1, 3))
MAX_FWD_OUT_SIZE = 448  # timm's test: larger default resolutions skip the forward checks


def test_every_variant_and_released_name_is_listed():
    assert {n.split(".")[0] for n in TAGGED_NAMES} >= {
        "internimage_t", "internimage_s", "internimage_b", "internimage_l", "internimage_xl",
        "internimage_h", "internimage_t_1k_224", "internimage_h_22kto1k_640"}


def _tiny(name: str) -> dict:
    """A small architecture of the name's variant (H keeps its projector head)."""
    return TINY_H if VARIANTS[resolve_variant(name.split(".")[0])].use_clip_projector else TINY_T


@pytest.mark.parametrize("name", TAGGED_NAMES)
@torch.no_grad()
def test_default_cfg_contract(name):
    """timm test_model_default_cfgs: attributes, unpooled features of pool_size and
    num_features, pre-logits of head_hidden_size, classifier removal and global_pool='',
    and the classifier / first-conv names of the pretrained cfg."""
    model = timm.create_model(name, pretrained=False, **_tiny(name)).eval()
    assert model.num_classes >= 0
    assert model.num_features > 0
    assert model.head_hidden_size > 0
    state_dict = model.state_dict()
    cfg = model.default_cfg
    for key in (cfg["classifier"], cfg["first_conv"]):
        assert f"{key}.weight" in state_dict, key
    pool_size = tuple(cfg["pool_size"])
    if max(cfg["input_size"]) > MAX_FWD_OUT_SIZE:
        return  # timm checks output sizes only up to 448 px (H's 640 px names: cfg only)
    x = torch.randn(1, *cfg["input_size"])

    feats = model.forward_features(x)
    pre = model.forward_head(feats, pre_logits=True)
    assert tuple(feats.shape[2:]) == pool_size
    assert feats.shape[1] == model.num_features
    assert pre.shape[1] == model.head_hidden_size

    model.reset_classifier(0)
    assert model.num_classes == 0
    out = model(x)
    assert out.ndim == 2 and out.shape[1] == model.head_hidden_size
    assert out.shape == pre.shape

    model.reset_classifier(0, "")  # no classifier, no global pooling
    out = model(x)
    assert out.ndim == 4 and tuple(out.shape[2:]) == pool_size

    bare = timm.create_model(name, pretrained=False, num_classes=0, global_pool="",
                             **_tiny(name)).eval()
    out = bare(x)
    assert out.ndim == 4 and tuple(out.shape[2:]) == pool_size


@pytest.mark.parametrize(("name", "num_features", "head_hidden_size"), [
    # Released classification/models/intern_image.py: num_features = channels * 2**3;
    # conv_head widens it to int(num_features * cls_scale), cls_scale = 1.5.
    ("internimage_t", 512, 768),
    ("internimage_xl", 1536, 2304),
    # InternImage-H: the projector pools pretrain_embed_dim = 1024 tokens into
    # clip_embed_dim = 768 (InternImage.__init__, use_clip_projector branch).
    ("internimage_h", 1024, 768),
])
def test_feature_widths_are_the_released_ones(name, num_features, head_hidden_size):
    with torch.device("meta"):
        model = timm.create_model(name)
    assert (model.num_features, model.head_hidden_size) == (num_features, head_hidden_size)


@pytest.mark.parametrize(("name", "arch"), [("internimage_t", TINY_T),
                                            ("internimage_h", TINY_H)])
@torch.no_grad()
def test_forward_intermediates_contract(name, arch):
    """timm test_model_forward_intermediates: one map per feature_info entry, of its
    channels and at most ceil(size / reduction) + 1 wide; the returned final map is
    forward_features' output."""
    model = timm.create_model(name, **arch).eval()
    info = timm.models.FeatureInfo(model.feature_info, len(model.feature_info))
    x = torch.randn(1, 3, 64, 96)
    final, intermediates = model.forward_intermediates(x, output_fmt="NCHW")
    assert len(intermediates) == len(info.channels()) >= 3
    for channels, reduction, feat in zip(info.channels(), info.reduction(), intermediates):
        assert feat.shape[1] == channels
        assert feat.shape[2] <= math.ceil(64 / reduction) + 1
        assert feat.shape[3] <= math.ceil(96 / reduction) + 1
    torch.testing.assert_close(final, model.forward_features(x))


def test_global_pool_choices_are_checked():
    with pytest.raises(ValueError, match="global_pool"):
        timm.create_model("internimage_t", global_pool="max", **TINY_T)
    with pytest.raises(ValueError, match="num_classes=0"):
        timm.create_model("internimage_t", num_classes=5, global_pool="", **TINY_T)


def _tracer_kwargs() -> dict:
    # The tracer set-up of timm's _create_fx_model: timm's leaf modules and autowrapped
    # functions, parameter shapes constant.
    return dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(),
                param_shapes_constant=True)


def _fx_model(model: torch.nn.Module) -> torch.nn.Module:
    """Symbolically traced copy of ``model`` returning its final output (train and eval
    graphs), built with torchvision's feature extractor as timm's test does."""
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=_tracer_kwargs())
    return create_feature_extractor(model, train_return_nodes=[train_nodes[-1]],
                                    eval_return_nodes=[eval_nodes[-1]],
                                    tracer_kwargs=_tracer_kwargs())


@pytest.mark.parametrize(("name", "arch"), [("internimage_t", TINY_T),
                                            ("internimage_h", TINY_H)])
@pytest.mark.parametrize("grad_checkpointing", [False, True])
def test_fx_forward_equals_eager(name, arch, grad_checkpointing):
    """timm test_model_forward_fx: the traced graph gives exactly the module's output."""
    torch.manual_seed(0)
    model = timm.create_model(name, **arch).eval()
    model.set_grad_checkpointing(grad_checkpointing)
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        eager = model(x)
        traced = torch.cat(tuple(_fx_model(model)(x).values()))
    assert torch.equal(traced, eager)
    assert eager.shape == (1, 1000) and not torch.isnan(eager).any()


@pytest.mark.parametrize("grad_checkpointing", [False, True])
def test_fx_backward_reaches_every_parameter(grad_checkpointing):
    """timm test_model_backward_fx: a training-mode trace with 42 classes back-propagates
    into every parameter."""
    torch.manual_seed(0)
    model = timm.create_model("internimage_t", num_classes=42, **TINY_T).train()
    model.set_grad_checkpointing(grad_checkpointing)
    num_params = sum(p.numel() for p in model.parameters())
    fx_model = _fx_model(model)
    out = torch.cat(tuple(fx_model(torch.randn(2, 3, 64, 64)).values()))
    out.mean().backward()
    for name, p in fx_model.named_parameters():
        assert p.grad is not None, f"no gradient for {name}"
    assert sum(p.grad.numel() for p in fx_model.parameters()) == num_params
    assert out.shape == (2, 42) and not torch.isnan(out).any()


def test_eager_forward_and_backward_contract():
    """timm test_model_forward (grad checkpointing changes no output) and
    test_model_backward (42 classes, every parameter gets a gradient)."""
    torch.manual_seed(0)
    model = timm.create_model("internimage_t", **TINY_T).eval()
    x = torch.randn(1, 3, 64, 64)
    out = model(x)
    assert out.shape[0] == 1 and not torch.isnan(out).any()
    model.set_grad_checkpointing()
    torch.testing.assert_close(model(x), out, rtol=1e-4, atol=1e-5)

    model = timm.create_model("internimage_t", num_classes=42, **TINY_T).train()
    out = model(torch.randn(2, 3, 64, 64))
    out.mean().backward()
    assert out.shape == (2, 42)
    assert all(p.grad is not None for p in model.parameters())


def test_timm_layer_decay_follows_the_released_classification_rule():
    """timm's optimizer factory (``train.py --layer-decay``) groups by the model's
    ``group_matcher``; without one it grouped by module order (InternImage-T: 108 groups,
    the stem at 0.9**53). It must give the released classification optimizer's scales
    (runtime/param_groups.py, checked against classification/optimizer.py there): the
    last block and the head at the full rate, the stem with level 0's first block."""
    from timm.optim import create_optimizer_v2

    from runtime.param_groups import param_groups

    model = timm.create_model("internimage_t", **TINY_T)
    names = {id(p): n for n, p in model.named_parameters()}
    optimizer = create_optimizer_v2(model, "adamw", lr=1.0, weight_decay=0.05, layer_decay=0.9)
    timm_scale = {names[id(p)]: g["lr_scale"] for g in optimizer.param_groups for p in g["params"]}
    ours = param_groups(model, 0.05, depths=model.depths, backbone_prefix="", layer_decay=0.9,
                        rule="classification")
    our_scale = {n: g["lr_scale"] for g in ours for n in g["names"]}
    assert timm_scale.keys() == our_scale.keys()
    for name, scale in our_scale.items():
        assert timm_scale[name] == pytest.approx(scale), name
    blocks = sum(TINY_T["depths"])
    assert timm_scale["patch_embed.conv1.weight"] == pytest.approx(0.9 ** (blocks - 1))
    assert timm_scale["head.weight"] == 1.0
    coarse = model.group_matcher(coarse=True)
    assert [coarse(n) for n in ("patch_embed.conv1.weight", "levels.0.blocks.0.mlp.fc1.weight",
                                "levels.3.norm.0.weight", "head.weight")] == [0, 1, 4, 5]


def test_get_classifier_is_what_reset_classifier_replaces():
    """timm's contract (90 of timm 1.0.31's 118 model files define it; its fine-tuning
    and model-surgery helpers read it)."""
    model = timm.create_model("internimage_t", **TINY_T)
    assert model.get_classifier() is model.head
    model.reset_classifier(10)
    assert model.get_classifier() is model.head and model.head.out_features == 10


@pytest.mark.parametrize("size", [224, 240, 336, 560, (100, 130)])
def test_internimage_h_takes_sizes_whose_stride_16_side_is_odd(size):
    """InternImage-H adds its 2x-upsampled stage 4 to stage 3; where stage 3's side is odd
    (240, 336, 560 px: 15, 21, 35) the upsampled map is one larger and the released add
    fails ("Attempting to broadcast a dimension of length 21"). The extra row/column lies
    past stage 3's grid and is cropped."""
    h, w = (size, size) if isinstance(size, int) else size
    with torch.device("meta"):  # the full H at once; no memory
        model = timm.create_model("internimage_h")
        assert model(torch.empty(2, 3, h, w)).shape == (2, 1000)
    if max(h, w) > 240:  # the full H on the meta device is the check; real numbers below
        return
    tiny = timm.create_model("internimage_h", **TINY_H).eval()
    x = torch.randn(1, 3, h, w)
    stages = tiny.forward_stages(x)
    x4, x3 = tiny.dcnv3_head_x4(stages[-1]), tiny.dcnv3_head_x3(stages[-2])
    assert x4.shape[-2] == 2 * stages[-1].shape[-2] and x3.shape[-2] == stages[-2].shape[-2]
    torch.testing.assert_close(tiny.head_input(stages),
                               x4[:, :, :x3.shape[-2], :x3.shape[-1]] + x3, rtol=0, atol=0)
