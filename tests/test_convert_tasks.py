"""Detection and segmentation runs as a `convert` source and as `--init` of another task:
their InternImage trunk comes out under the released keys, their head under
``task.<task>.*`` (and not at all in ``--format official``); a segmentation run passed to
segmentation still loads whole (stage 2)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

ARCH = {"channels": 16, "depths": [1, 1, 2, 1], "groups": [1, 2, 4, 8]}  # the demo configs'
STEP1 = ["run.max_steps=1", "run.eval_every=1", "run.num_workers=0", "run.progress=false",
         "optim.warmup_steps=0", "run.threads=1", "run.batch_size=2", "data.demo_train=4",
         "data.demo_val=1", "data.demo_size=64"]
SEG = [*STEP1, "data.scale_short=64", "data.crop_size=[48,48]", "data.test_short=64",
       "eval.crop=[48,48]", "eval.stride=[32,32]", "head_channels=16"]
M2F = [*SEG, "head.kind=mask2former", "head.num_queries=4", "head.hidden_dim=32",
       "head.feature_size=32", "head.mask_feature_size=32", "head.decoder_layers=2",
       "head.num_attention_heads=2", "head.dim_feedforward=32", "head.encoder_layers=1",
       "head.encoder_feedforward_dim=32", "head.train_num_points=64"]
DET = [*STEP1, "detector.train_sizes=[64]", "detector.test_size=64", "detector.max_size=64"]
DINO = [*DET, "head.kind=dino", "head.num_queries=8", "head.decoder_layers=1",
        "head.encoder_layers=1", "head.ffn_dim=32", "head.num_dn_queries=4",
        "head.train_sizes=[64]", "head.test_size=64", "head.max_size=64"]
# Each run's task, arguments and where its model keeps the trunk in the checkpoint's names
# (the engine wraps a segmenter in LossForward: ``model.``).
RUNS = {"upernet": ("segmentation", SEG, "model.backbone."),
        "mask2former": ("segmentation", M2F,
                        "model.model.model.pixel_level_module.encoder._backbone.model."),
        "mask_rcnn": ("detection", DET, "backbone.body."),
        "dino": ("detection", DINO, "detr.backbone.model.model.")}


@pytest.fixture(scope="module")
def runs(cache, tmp_path_factory) -> dict[str, Path]:
    """One optimizer step of each detection/segmentation model, through the CLI (so each
    run directory has its config.yaml, as a user's does)."""
    from launch.cli import main

    root = tmp_path_factory.mktemp("task_runs")
    out = {}
    for name, (task, args, _) in RUNS.items():
        torch.manual_seed(0)
        out[name] = root / name
        argv = ["finetune", task, "--output-dir", str(out[name]), *args,
                f"data.cache_dir={cache}"]
        assert main(argv) == 0, name
    return out


def _saved(run: Path) -> dict[str, torch.Tensor]:
    """The run's module state as DeepSpeed wrote it (ZeRO stage 0, fp32: the weights)."""
    tag = (run / "checkpoints" / "latest").read_text().strip()
    return torch.load(run / "checkpoints" / tag / "mp_rank_00_model_states.pt",
                      map_location="cpu", weights_only=False)["module"]


def _trunk(run: Path, prefix: str) -> dict[str, torch.Tensor]:
    """The run's trunk as it saved it, under the names inside the trunk."""
    return {k[len(prefix):]: v for k, v in _saved(run).items() if k.startswith(prefix)}


def _fresh_trunk():
    """The InternImage the dense tasks build for the demo configs (finetune/backbone.py)."""
    from finetune.backbone import build_trunk
    from finetune.config import BackboneConfig

    return build_trunk(BackboneConfig(**ARCH, dcn_backend="reference"))


def _assert_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str):
    """Same names, bit-identical tensors."""
    assert set(got) == set(want), (what, sorted(set(got) ^ set(want))[:6])
    for key, value in want.items():
        assert torch.equal(got[key], value), (what, key)


@pytest.mark.parametrize("name", list(RUNS))
def test_a_dense_run_converts_to_the_released_backbone_and_its_head(runs, name, tmp_path,
                                                                    capsys):
    """The audit's repro: a segmentation run converted to "backbone 199, other 0" under
    model.backbone.*, which the released loader missed."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from launch.cli import main
    from models import load_pretrained

    task, _, prefix = RUNS[name]
    run, saved = runs[name], _saved(runs[name])
    trunk = _trunk(run, prefix)
    head = {k: v for k, v in saved.items() if not k.startswith(prefix)}
    assert trunk and head

    dst = tmp_path / "run.safetensors"
    assert main(["convert", str(run), str(dst)]) == 0
    out = capsys.readouterr().out
    assert f"backbone {len(trunk)}, other {len(head)}" in out, out
    assert f"task        {task} (backbone from {prefix}*, head under task.{task}.*)" in out
    written = load_file(str(dst))
    with safe_open(str(dst), framework="pt") as f:
        meta = f.metadata()
    assert meta["task"] == task and meta["task_backbone_prefix"] == prefix
    assert meta["variant"] == "internimage_t" and json.loads(meta["arch"]) == ARCH
    # the backbone under the released keys, the head under task.<task>.<the run's name>
    _assert_equal({k: v for k, v in written.items() if not k.startswith("task.")}, trunk,
                  "backbone")
    _assert_equal(written, {**trunk, **{f"task.{task}.{k}": v for k, v in head.items()}},
                  "safetensors")

    official = tmp_path / "backbone.pth"
    assert main(["convert", str(run), str(official), "--format", "official"]) == 0
    assert "head left out" in capsys.readouterr().out
    _assert_equal(torch.load(official, weights_only=True)["model"], trunk, "official")
    fresh = _fresh_trunk()
    load_pretrained(fresh, official, strict=True)  # as other InternImage code loads it
    _assert_equal(fresh.state_dict(), trunk, "loaded")


def _classifier():
    """The classification demo's model (the same architecture as the dense demos')."""
    from finetune.classification import ClassificationConfig
    from finetune.cls_build import build_classifier
    from launch.config import load_config

    cfg = load_config(ClassificationConfig, None, ["model.dcn_backend=reference"])
    assert cfg.model.arch() == ARCH
    return build_classifier(cfg), cfg


def test_a_dense_run_inits_another_dense_task(runs, caplog):
    """The trunk goes into the other task's model, the run's head is left out (and the
    init line says so)."""
    from finetune.detection import DetectionConfig, build_model
    from finetune.segmentation import SegmentationConfig, build_segmentor
    from launch.config import load_config

    caplog.set_level(logging.INFO, logger="finetune.init")
    # a segmentation run's trunk into Mask R-CNN, a Mask2Former run's into DINO
    for src, args, trunk_of in (("upernet", DET, lambda m: m.backbone.body),
                                ("mask2former", DINO, lambda m: m.backbone)):
        cfg = load_config(DetectionConfig, None, [*args, f"init={runs[src]}"])
        model = build_model(cfg, 3, cfg.init)
        _assert_equal(trunk_of(model).state_dict(), _trunk(runs[src], RUNS[src][2]), src)
        assert "segmentation run's backbone, its head left out" in caplog.text
    # a DINO run's trunk into UperNet: a backbone init, not a whole segmenter
    cfg = load_config(SegmentationConfig, None, [*SEG, f"init={runs['dino']}"])
    model = build_segmentor(cfg, cfg.init)
    _assert_equal(model.backbone.state_dict(), _trunk(runs["dino"], RUNS["dino"][2]), "dino")


def test_a_detection_run_inits_a_classifier(runs, caplog, tmp_path):
    """A dense trunk has no conv_head (finetune/backbone.py removes it): the classifier's
    starts fresh, as its new head does, and the report says so."""
    from finetune.init import load_init
    from models import CheckpointError

    caplog.set_level(logging.INFO, logger="finetune.init")
    model, cfg = _classifier()
    report = load_init(model, runs["mask_rcnn"], variant=cfg.model.name, arch=cfg.model.arch())
    trunk = _trunk(runs["mask_rcnn"], RUNS["mask_rcnn"][2])
    assert report.loaded == len(trunk) and not report.missing and not report.unexpected
    own = model.state_dict()
    _assert_equal({k: own[k] for k in trunk}, trunk, "classifier")
    assert "detection run's backbone" in caplog.text
    assert "initialised fresh: conv_head.*, head.*" in caplog.text, caplog.text
    # a checkpoint holding part of conv_head is no dense trunk: what it lacks is an error
    partial = tmp_path / "partial.pth"
    torch.save({**trunk, "conv_head.0.weight": own["conv_head.0.weight"]}, partial)
    with pytest.raises(CheckpointError, match="4 missing: conv_head.1.0.weight"):
        load_init(_classifier()[0], partial, variant=cfg.model.name, arch=cfg.model.arch())


def test_a_segmentation_run_still_loads_whole_into_segmentation(runs):
    """Stage 2 (finetune/seg_model.py): the whole segmenter, head included."""
    from finetune.segmentation import SegmentationConfig, build_segmentor
    from launch.config import load_config

    cfg = load_config(SegmentationConfig, None, [*SEG, f"init={runs['upernet']}"])
    model = build_segmentor(cfg, cfg.init)
    saved = {k.removeprefix("model."): v for k, v in _saved(runs["upernet"]).items()}
    _assert_equal(model.state_dict(), saved, "whole")


def test_a_converted_task_file_keeps_its_head_aside_and_inits_the_trunk(runs, tmp_path):
    """A convert output of a segmentation run converts again to itself, to a backbone-only
    .pth, and as --init of segmentation gives the trunk (the head starts fresh)."""
    from safetensors.torch import load_file

    from finetune.convert import convert
    from finetune.segmentation import SegmentationConfig, build_segmentor
    from launch.config import load_config

    first, again = tmp_path / "seg.safetensors", tmp_path / "again.safetensors"
    convert(runs["upernet"], first)
    report = convert(first, again)  # a converted file converts to itself
    assert report.metadata["task"] == "segmentation"
    _assert_equal(load_file(str(again)), load_file(str(first)), "reconverted")
    official = tmp_path / "backbone.pth"
    convert(first, official, fmt="official")
    trunk = _trunk(runs["upernet"], "model.backbone.")
    _assert_equal(torch.load(official, weights_only=True)["model"], trunk, "official")
    # the converted file is a backbone: --init of segmentation takes the trunk only
    cfg = load_config(SegmentationConfig, None, [*SEG, f"init={first}"])
    model = build_segmentor(cfg, cfg.init)
    _assert_equal(model.backbone.state_dict(), trunk, "trunk")
    head = model.decode_head.classifier.weight
    assert not torch.equal(head, _saved(runs["upernet"])["model.decode_head.classifier.weight"])


def test_a_task_state_without_a_recorded_task_is_told_by_its_names(tmp_path):
    """An earlier version's last.pt (no trainer_state.json, no engine wrapper) or a
    consolidated file: the task model's trunk prefix says which task it is."""
    from finetune.convert import convert
    from finetune.detection import DetectionConfig, build_model
    from finetune.segmentation import SegmentationConfig, build_segmentor
    from launch.config import load_config
    from models import CheckpointError

    models = {"segmentation": build_segmentor(load_config(SegmentationConfig, None, SEG)),
              "detection": build_model(load_config(DetectionConfig, None, DET), 3)}
    for task, model in models.items():
        state = model.state_dict()
        src = tmp_path / f"{task}.pt"
        torch.save({"model": state, "step": 1}, src)
        report = convert(src, tmp_path / f"{task}.pth", fmt="official")
        assert report.metadata["task"] == task
        _assert_equal(torch.load(tmp_path / f"{task}.pth", weights_only=True)["model"],
                      model.backbone.state_dict() if task == "segmentation"
                      else model.backbone.body.state_dict(), task)
    # two trunks in one state: which is meant is refused, not guessed
    two = {**{f"a.{k}": v for k, v in models["segmentation"].backbone.state_dict().items()},
           **{f"b.{k}": v for k, v in models["segmentation"].backbone.state_dict().items()}}
    torch.save(two, tmp_path / "two.pth")
    with pytest.raises(CheckpointError, match="2 InternImage trunks, under 'a.', 'b.'"):
        convert(tmp_path / "two.pth", tmp_path / "x.safetensors")
