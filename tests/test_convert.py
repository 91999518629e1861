"""Conversion from a REAL DeepSpeed ZeRO-3 checkpoint (2 gloo ranks on CPU) and --init.

Run as a script (``python tests/test_convert.py RUN_DIR``) this file is one rank of the
tiny pre-training job that writes the checkpoint; the fixture starts two of them.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
ARCH = {"channels": 16, "depths": [1, 1, 2, 1], "groups": [1, 2, 4, 8]}
DS_CONFIG = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
             "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True,
             "steps_per_print": 1000}


def _rank_main(run_dir: str) -> None:
    """One rank: tiny M3IModel under ZeRO-3, one AdamW step, save, record reference outputs."""
    sys.path.insert(0, str(REPO))
    import deepspeed

    from pretrain.m3i_model import M3IModel

    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    model = M3IModel("internimage_t", embed_dim=16, context_length=8, text_width=16,
                     text_heads=2, text_layers=1, vocab_size=64, num_tags=4,
                     dcn_backend="reference", **ARCH)
    # DeepSpeed 0.19 broadcasts parameters as uint8 views, impossible for a 0-dim tensor.
    model.logit_scale.data = model.logit_scale.data.reshape(1)
    # Partition after construction: InternImage re-initialises its DCN layers in __init__,
    # which zero.Init's construction-time partitioning does not allow.
    deepspeed.zero.Init(module=model, config_dict_or_path=DS_CONFIG)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=DS_CONFIG)
    torch.manual_seed(1 + engine.global_rank)
    images, tokens = torch.randn(2, 3, 32, 32), torch.randint(0, 64, (2, 8))
    img, txt, _, scale = engine(images, tokens)
    loss = -(scale * img @ txt.t()).log_softmax(-1).diag().mean()
    engine.backward(loss)
    engine.step()
    ckpt_dir = Path(run_dir) / "checkpoints"
    engine.save_checkpoint(str(ckpt_dir), tag="step_0000001")
    engine.eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():  # every rank joins: ZeRO-3 gathers parameters collectively
        pooled = engine.module.visual.forward_pooled(x)
    if engine.global_rank == 0:
        (ckpt_dir / "step_0000001" / "trainer_state.json").write_text(
            json.dumps({"step": 1, "config_hash": "abc123"}))
        torch.save({"x": x, "pooled": pooled}, Path(run_dir) / "reference_outputs.pt")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def zero_run(tmp_path_factory) -> Path:
    """A run dir with a real 2-rank ZeRO-3 checkpoint, config.yaml and reference outputs."""
    run = tmp_path_factory.mktemp("zero_run")
    (run / "config.yaml").write_text(json.dumps({"model": {"name": "internimage_t", **ARCH,
                                                           "dcn_backend": "reference"}}))
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = {**os.environ, "DS_ACCELERATOR": "cpu", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": port, "RANK": str(rank), "LOCAL_RANK": str(rank),
               "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, __file__, str(run)], env=env, cwd=REPO,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    outs = [p.communicate(timeout=300)[0].decode(errors="replace") for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    return run


def _tiny(**kw):
    from models import build_model

    return build_model("internimage_t", **{"num_classes": 0, "dcn_backend": "reference",
                                           **ARCH, **kw})


@pytest.mark.distributed
def test_zero3_round_trip(zero_run, tmp_path, capsys):
    from safetensors import safe_open

    from finetune.convert import convert
    from models import CheckpointError, load_pretrained

    dst = tmp_path / "m3i.safetensors"
    report = convert(zero_run / "checkpoints", dst)  # the dir with `latest`
    assert report.backbone_tensors > 0 and report.parameters > 0 and report.bytes > 0
    with safe_open(str(dst), framework="pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert "pretrain.image_proj.weight" in keys and "pretrain.logit_scale" in keys
    assert any(k.startswith("pretrain.text.") for k in keys)
    assert not any(k.startswith("visual.") for k in keys)
    assert meta["step"] == "1" and meta["config_hash"] == "abc123"
    assert meta["variant"] == "internimage_t" and json.loads(meta["arch"]) == ARCH

    model = _tiny().eval()
    # the safetensors loader of models/ accepts it once pretrain.* is set aside
    from finetune.convert import read_backbone
    from finetune.init import load_init

    report = load_init(model, dst, variant="internimage_t", arch=ARCH)
    assert not report.missing and not report.unexpected
    ref = torch.load(zero_run / "reference_outputs.pt")
    with torch.no_grad():
        torch.testing.assert_close(model.forward_pooled(ref["x"]), ref["pooled"])

    # official layout: the state dict under 'model', as the released classification code
    # reads it (classification/utils.py load_checkpoint: checkpoint['model'], then
    # model.load_state_dict; also export.py and huggingface/convert.py), and
    # models.load_pretrained takes it strictly
    official = tmp_path / "backbone.pth"
    convert(zero_run / "checkpoints" / "step_0000001", official, fmt="official", dtype="bf16")
    released_read = torch.load(official, map_location="cpu")["model"]
    assert set(released_read) == set(_tiny().state_dict())
    fresh = _tiny().eval()
    load_pretrained(fresh, official, strict=True)
    backbone, _ = read_backbone(official)
    assert set(backbone) == set(fresh.state_dict())
    assert all(v.dtype == torch.bfloat16 for v in backbone.values() if v.is_floating_point())

    # README's Models snippet, `load_pretrained(model, FILE)`, on both converted formats:
    # strict, the pre-training heads (pretrain.*) dropped and a classifier the file does
    # not hold left as built (both reported); before, each raised CheckpointError
    for path in (dst, official):
        classifier = _tiny(num_classes=10).eval()
        loaded = load_pretrained(classifier, path)
        assert loaded.fresh == ["head.weight", "head.bias"] and not loaded.missing
        assert all(k.startswith("pretrain.") for k in loaded.dropped)
        assert bool(loaded.dropped) == (path == dst)
        torch.testing.assert_close(classifier.forward_pooled(ref["x"]), ref["pooled"],
                                   atol=2e-2, rtol=2e-2)  # official: bf16 weights
    with pytest.raises(CheckpointError, match="missing"):  # a head cut short still fails
        partial = tmp_path / "partial.safetensors"
        from safetensors.torch import save_file

        save_file({**torch.load(official, map_location="cpu")["model"],
                   "head.weight": torch.zeros(10, 192)}, str(partial))
        load_pretrained(_tiny(num_classes=10), partial)

    # the ZeRO dir directly as --init, and the CLI's printed report
    load_init(_tiny(), zero_run / "checkpoints", variant="internimage_t", arch=ARCH)
    from launch.cli import main

    assert main(["convert", str(zero_run / "checkpoints"), str(tmp_path / "cli.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "parameters" in out and "bytes" in out


@pytest.mark.distributed
def test_wrong_variant_fails_clearly(zero_run, tmp_path):
    from finetune.convert import convert
    from finetune.init import load_init
    from models import CheckpointError, build_model

    dst = tmp_path / "m3i.safetensors"
    convert(zero_run / "checkpoints", dst)
    with pytest.raises(CheckpointError, match="internimage_t backbone but this run builds "
                                              "internimage_s"):
        load_init(build_model("internimage_s", num_classes=0, channels=16, depths=(1, 1, 2, 1),
                              groups=(1, 2, 4, 8)), dst, variant="internimage_s")
    with pytest.raises(CheckpointError, match="channels=16"):
        load_init(_tiny(), dst, variant="internimage_t", arch={**ARCH, "channels": 32})
    # a released-layout .pth carries no metadata: the shapes give the variant away
    official = tmp_path / "b.pth"
    convert(dst, official, fmt="official")
    wide = build_model("internimage_t", num_classes=0, channels=32, depths=(1, 1, 2, 1),
                       groups=(2, 4, 8, 16))
    with pytest.raises(CheckpointError, match="differ in shape"):
        load_init(wide, official, variant="internimage_t")


@pytest.mark.distributed
def test_incomplete_checkpoint_names_missing_files(zero_run, tmp_path):
    import shutil

    from finetune.convert import convert
    from models import CheckpointError

    broken = tmp_path / "checkpoints"
    shutil.copytree(zero_run / "checkpoints", broken)
    (broken / "step_0000001" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    (broken / "step_0000001" / "zero_pp_rank_1_mp_rank_00_model_states.pt").unlink()
    with pytest.raises(CheckpointError, match="zero_pp_rank_1_mp_rank_00_model_states.pt, "
                                              "zero_pp_rank_1_mp_rank_00_optim_states.pt"):
        convert(broken, tmp_path / "x.safetensors")
    (broken / "latest").write_text("step_0000009")
    with pytest.raises(CheckpointError, match="step_0000009"):
        convert(broken, tmp_path / "x.safetensors")
    with pytest.raises(CheckpointError, match="not found"):
        convert(tmp_path / "nothing.pth", tmp_path / "x.safetensors")


def test_a_checkpoint_pruned_while_it_is_read_is_said_so(zero_run, tmp_path, monkeypatch):
    """A live run prunes its older checkpoints as it saves (a rename, then a delete): a
    convert reading one then died of zero_to_fp32's FileNotFoundError, which read as if
    the run's checkpoint were lost. The reviewer's sequence: prune's rename right after
    convert's completeness check."""
    import shutil

    import finetune.convert as fc
    from models import CheckpointError

    run = tmp_path / "run"
    shutil.copytree(zero_run / "checkpoints", run / "checkpoints")
    step_dir = run / "checkpoints" / "step_0000001"
    real = fc.check_complete

    def pruned_after_the_check(folder):
        result = real(folder)
        folder.rename(folder.with_name("deleting.tmp-0badc0de-step_0000001"))
        return result

    monkeypatch.setattr(fc, "check_complete", pruned_after_the_check)
    with pytest.raises(CheckpointError) as err:
        fc.convert(step_dir, tmp_path / "x.safetensors")
    assert f"{step_dir} was removed while it was read" in str(err.value)
    assert "latest: " in str(err.value) and "copy the folder first" in str(err.value)
    assert not (tmp_path / "x.safetensors").exists()


def test_the_output_is_on_disk_before_it_takes_its_name(zero_run, tmp_path, monkeypatch):
    """A node crash soon after a convert must not leave an empty or truncated file under
    the final name: the temporary file is fsynced before its rename, the folder after."""
    import finetune.convert as fc

    events = []
    real_replace = fc.os.replace
    monkeypatch.setattr(fc, "fsync_path", lambda path: events.append(("fsync", Path(path))))
    monkeypatch.setattr(fc.os, "replace", lambda a, b: (events.append(("replace", Path(b))),
                                                        real_replace(a, b)))
    dst = tmp_path / "out" / "x.safetensors"
    fc.convert(zero_run, dst)
    monkeypatch.undo()
    kinds = [(kind, path == dst, path == dst.parent) for kind, path in events]
    assert kinds == [("fsync", False, False), ("replace", True, False),
                     ("fsync", False, True)], events
    assert events[0][1].parent == dst.parent  # the temporary file, beside it


# What `internimage convert` / `--init` / `--resume` accept, worded as in issue #12 item 6.
ACCEPTED = ("a run directory, its checkpoints/ directory, checkpoints/latest, a step_* "
            "directory")


def _accepted_forms(run: Path, tmp_path: Path) -> dict[str, Path]:
    """Every path form a user may pass, for the run the fixture wrote."""
    from finetune.convert import convert

    converted, official = tmp_path / "m3i.safetensors", tmp_path / "released.pth"
    convert(run / "checkpoints" / "step_0000001", converted)
    convert(converted, official, fmt="official")  # the released InternImage .pth layout
    return {"run dir": run, "checkpoints dir": run / "checkpoints",
            "checkpoints/latest": run / "checkpoints" / "latest",
            "step dir": run / "checkpoints" / "step_0000001",
            ".safetensors": converted, "released .pth": official}


@pytest.mark.distributed
def test_every_accepted_form_converts_and_inits(zero_run, tmp_path, capsys):
    """Issue #12 item 6: `convert RUN/checkpoints/latest OUT` failed ('pop from empty list').
    Each form gives the backbone the ZeRO-3 engine itself computed with (reference_outputs)."""
    from finetune.init import load_init
    from launch.cli import main
    from runtime.checkpoint import resolve_resume

    ref = torch.load(zero_run / "reference_outputs.pt")
    for name, src in _accepted_forms(zero_run, tmp_path).items():
        dst = tmp_path / f"{name.replace('/', '_').replace(' ', '_')}.safetensors"
        assert main(["convert", str(src), str(dst)]) == 0, (name, capsys.readouterr().err)
        for init in (src, dst):  # --init takes the same forms, and the convert output
            model = _tiny().eval()
            load_init(model, init, variant="internimage_t", arch=ARCH)
            with torch.no_grad():
                torch.testing.assert_close(model.forward_pooled(ref["x"]), ref["pooled"],
                                           msg=name)
    step = zero_run / "checkpoints" / "step_0000001"
    for src in (zero_run, zero_run / "checkpoints", step.parent / "latest", step):
        assert resolve_resume(str(src), tmp_path) == step  # --resume resolves alike


@pytest.mark.distributed
def test_wrong_paths_give_one_line_naming_the_accepted_forms(zero_run, tmp_path, capsys):
    import shutil

    from launch.cli import main

    no_latest = tmp_path / "crashed_run"
    shutil.copytree(zero_run / "checkpoints", no_latest / "checkpoints")
    (no_latest / "checkpoints" / "latest").unlink()  # written only once a save completes
    garbage = tmp_path / "weights.pth"
    garbage.write_bytes(bytes(range(256)) * 4)
    cases = {tmp_path / "missing": "not found",
             zero_run / "config.yaml": "not a checkpoint file",  # a file of the run, not weights
             tmp_path: "a directory without a checkpoint",
             no_latest: "no complete checkpoint",
             garbage: f"cannot read {garbage} as a torch weights file"}
    for bad, why in cases.items():
        assert main(["convert", str(bad), str(tmp_path / "out.safetensors")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and why in err, err
        if bad in (garbage, no_latest):  # a checkpoint by its form: why it cannot be read
            continue
        assert ACCEPTED in err, err  # no checkpoint at all: say what is accepted
        # --init checks the path before any compute (a dry run reads no weights)
        assert main(["finetune", "classification", "--init", str(bad), "--dry-run"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "init:" in err and ACCEPTED in err, err
    assert not (tmp_path / "out.safetensors").exists()


if __name__ == "__main__":
    _rank_main(sys.argv[1])


def test_only_shared_or_partial_tensors_are_copied_for_safetensors(tmp_path):
    """safetensors refuses tensors that share a storage or fill part of one; everything
    else goes out as it is (a conversion holds one copy of the weights, not two)."""
    from safetensors.torch import load_file, save_file

    from finetune.convert import _own_storages

    whole = torch.arange(6.0)
    base = torch.arange(12.0).reshape(3, 4)
    state = {"whole": whole, "tied_a": base, "tied_b": base, "transposed": base.t(),
             "row": base[1]}
    out = _own_storages(state)
    assert out["whole"] is whole and out["tied_a"] is base  # not copied
    ptrs = [t.untyped_storage().data_ptr() for t in out.values()]
    assert len(set(ptrs)) == len(ptrs)
    save_file(out, str(tmp_path / "w.safetensors"))
    back = load_file(str(tmp_path / "w.safetensors"))
    for key, value in state.items():
        assert torch.equal(back[key], value), key
