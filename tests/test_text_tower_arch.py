"""``text.arch``: the CLIP text tower (default) and BERT-Base's architecture (M3I's text
target encoder, design REFERENCE.md §5: "a 12-layer Transformer with BERT-Base's
architecture"), held against what BERT is: bidirectional, post-LayerNorm, pooled at its
first ([CLS]) position, blind to padding, and the parameter count transformers gives
BERT-Base; plus a ZeRO-3 run on 2 ranks, and the hash existing checkpoints carry."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from tests.pretrain_utils import REPO, latest, losses, pretrain_cmd, run_forked

SOT, EOT = 49406, 49407  # the CLIP BPE tokenizer's <start_of_text> / <end_of_text>
# "<sot> a photo of one <eot>" then the tokenizer's 0 padding (0 is the BPE token '!')
CAPTION = [SOT, 320, 1125, 539, 637, 518, EOT, 0, 0, 0, 0, 0]


def _model(arch: str):
    from pretrain.m3i_model import M3IModel

    torch.manual_seed(0)
    model = M3IModel("internimage_t", embed_dim=16, context_length=len(CAPTION), text_width=32,
                     text_heads=2, text_layers=2, vocab_size=49408, num_tags=4,
                     text_arch=arch, channels=8, depths=[1, 1, 1, 1], groups=[1, 2, 4, 8])
    return model.eval()  # BERT's dropout off: same input, same output


def _states(model, tokens: torch.Tensor) -> torch.Tensor:
    """(B, L, width) final per-position states of either tower."""
    if hasattr(model.text, "token_states"):
        return model.text.token_states(tokens)
    out = model.text.forward_intermediates(tokens, intermediates_only=True, output_fmt="NLC")
    return out["text_intermediates"][-1]


def _changed(tokens: list[int], position: int, value: int = 2368) -> torch.Tensor:
    out = torch.tensor([tokens])
    out[0, position] = value
    return out


@torch.no_grad()
def test_bert_tower_is_bidirectional_where_the_clip_tower_is_causal():
    base = torch.tensor([CAPTION])
    later = _changed(CAPTION, 5)  # a word after position 1, before the end-of-text token
    bert, clip = _model("bert"), _model("clip")
    # BERT: every position attends to the whole caption, so position 1 sees the change
    assert (_states(bert, base)[0, 1] - _states(bert, later)[0, 1]).abs().max() > 1e-4
    # CLIP's causal mask: position 1 only sees positions 0..1
    assert torch.equal(_states(clip, base)[0, 1], _states(clip, later)[0, 1])


@torch.no_grad()
def test_bert_tower_is_post_norm_and_pools_the_first_position():
    from transformers.models.bert.modeling_bert import BertLayer

    model = _model("bert")
    tokens = torch.tensor([CAPTION, _changed(CAPTION, 3)[0].tolist()])
    layers = model.text.bert.encoder.layer
    assert len(layers) == 2 and all(isinstance(layer, BertLayer) for layer in layers)
    # Post-LN: each block ends with LayerNorm (at init weight 1, bias 0), so every output
    # position is standardised; a pre-norm stack's residual stream is not.
    states = _states(model, tokens)
    assert states.mean(-1).abs().max() < 1e-4
    assert torch.allclose(states.var(-1, unbiased=False), torch.ones(2, len(CAPTION)),
                          atol=1e-3)
    # the text embedding is the first ([CLS]) position's state, projected and normalised
    expected = F.normalize(states[:, 0] @ model.text.text_projection, dim=-1)
    assert torch.allclose(model.encode_text(tokens), expected, atol=1e-6)


@torch.no_grad()
def test_bert_tower_ignores_padding_after_end_of_text_but_not_token_zero_before_it():
    model = _model("bert")
    base = torch.tensor([CAPTION])
    padded = base.clone()
    padded[0, 7:] = torch.tensor([5, 49407, 77, 9, 0])  # anything after the end-of-text
    end = CAPTION.index(EOT) + 1
    assert torch.equal(model.encode_text(base), model.encode_text(padded))
    assert torch.allclose(_states(model, base)[:, :end], _states(model, padded)[:, :end],
                          atol=1e-6)
    # id 0 is the BPE token '!', a word of the caption when it comes before end-of-text
    bang = _changed(CAPTION, 4, 0)
    assert (model.encode_text(base) - model.encode_text(bang)).abs().max() > 1e-4
    assert model.text.bert.embeddings.word_embeddings.padding_idx is None


def test_bert_tower_at_base_size_has_bert_bases_parameters():
    """At width 768 / 12 layers / 12 heads, the tower is transformers' BERT-Base
    (``BertConfig()``'s defaults are BERT-Base's: 768 wide, 12 layers, 12 heads, FFN 3072,
    GELU) with only the vocabulary (CLIP BPE, 49408) and positions (context 77) changed,
    without the pooler, plus our 768 x embed_dim projection."""
    from transformers import BertConfig, BertModel

    from pretrain.m3i_model import M3IModel

    base = BertConfig()
    assert (base.hidden_size, base.num_hidden_layers, base.num_attention_heads,
            base.intermediate_size, base.hidden_act) == (768, 12, 12, 3072, "gelu")
    embed_dim = 640  # unlike the width, so the projection's shape shows in the count
    with torch.device("meta"):  # counts only: nothing is allocated
        text = M3IModel("internimage_t", embed_dim, 77, 768, 12, 12, 49408, 1,
                        text_arch="bert", channels=8, depths=[1, 1, 1, 1],
                        groups=[1, 2, 4, 8]).text
        reference = BertModel(BertConfig(vocab_size=49408, max_position_embeddings=77),
                              add_pooling_layer=False)
    count = sum(p.numel() for p in text.parameters())
    assert count == sum(p.numel() for p in reference.parameters()) + 768 * embed_dim
    assert text.text_projection.shape == (768, embed_dim)
    assert text.bert.config.intermediate_size == 3072


def test_default_config_keeps_the_hash_existing_checkpoints_carry():
    from launch.commands.pretrain import DEMO_CONFIG
    from launch.config import load_config
    from pretrain.config import PretrainConfig
    from pretrain.engine import model_hash

    cfg = load_config(PretrainConfig, DEMO_CONFIG)
    # The model hash the demo run's checkpoints carried before text.arch existed (the
    # demo's 14 tags; read from a demo run's trainer_state.json): a resume compares it
    # with this one, so it must not change for runs that keep the CLIP tower.
    assert model_hash(cfg, 14) == "c0733619ec95389f"
    assert model_hash(load_config(PretrainConfig, DEMO_CONFIG, ["text.arch=clip"]), 14) \
        == "c0733619ec95389f"
    # another tower is another model: its checkpoints must not resume a CLIP run
    bert = load_config(PretrainConfig, DEMO_CONFIG, ["text.arch=bert"])
    assert model_hash(bert, 14) != "c0733619ec95389f"


def test_h_preset_uses_bert_base_text_tower():
    from launch.config import load_config
    from pretrain.config import PretrainConfig

    cfg = load_config(PretrainConfig, REPO / "configs" / "pretrain" / "internimage_h_m3i.yaml")
    assert (cfg.text.arch, cfg.text.width, cfg.text.heads, cfg.text.layers) == (
        "bert", 768, 12, 12)
    # the memory plan (--dry-run, internimage estimate) builds the run's own text tower
    from transformers import BertModel

    from pretrain.plan import meta_model

    assert any(isinstance(m, BertModel) for m in meta_model(cfg).modules())


@pytest.mark.distributed
def test_bert_tower_trains_saves_resumes_and_evaluates_under_zero3(tmp_path, cache):
    out = tmp_path / "bert"
    args = ("text.arch=bert", "--max-steps", "4", "--checkpoint-every", "2",
            "zero_shot.every=2")
    run_forked(pretrain_cmd(2, out, *args), cache)
    assert latest(out) == "step_0000004"
    # another text tower: the CLIP default must not resume this run
    refused = run_forked(pretrain_cmd(2, out, "--max-steps", "6", "--resume", "auto"),
                         cache, check=False)
    assert refused.returncode != 0
    assert "different model/text-tower config" in refused.stderr + refused.stdout
    run_forked(pretrain_cmd(2, out, *args[:1], "--max-steps", "6", "--checkpoint-every", "2",
                            "zero_shot.every=2", "--resume", "auto"), cache)
    assert sorted(losses(out)) == list(range(1, 7))
    assert all(v == v and v > 0 for v in losses(out).values())  # finite, positive
    assert latest(out) == "step_0000006"
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum("zero_shot_top1" in r for r in rows) >= 3  # steps 2, 4, 6
    state = json.loads((out / "checkpoints" / "step_0000006" / "trainer_state.json")
                       .read_text())
    assert state["world_size"] == 2
