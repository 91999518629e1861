"""Bad input to `internimage finetune` is refused before any compute, in one line naming
what is wrong, and leaves nothing behind: a dataset path that is not there (the key, the
path and what belongs there; before, a FileNotFoundError traceback once the process group,
and for classification the run directory and its config.yaml, were set up), and an
``--init`` checkpoint of another backbone (before, classification refused it only after
building the model, leaving config.yaml in the new run directory).

The commands run in this process through the CLI's entry point (``launch.cli.main``): each
refusal comes before anything distributed is set up."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.pretrain_utils import run_forked


def _refusal(capsys, task: str, out: Path, *args: str) -> str:
    """The one line `internimage finetune TASK` writes to stderr when it refuses (exit 2),
    having written nothing at ``out``."""
    from launch.cli import main

    assert main(["finetune", task, "--output-dir", str(out), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert not out.exists(), sorted(p.name for p in out.iterdir())
    return err


def _imagenet(root: Path, train: str | None = None) -> Path:
    """An ImageNet-layout folder with val/ of class folders; ``train``: its train/ holds
    class folders (``classes``) or loose images (``flat``), absent with None."""
    (root / "val" / "n01440764").mkdir(parents=True)
    if train == "classes":
        (root / "train" / "n01440764").mkdir(parents=True)
    elif train == "flat":
        (root / "train").mkdir()
        (root / "train" / "a.JPEG").write_bytes(b"")
    return root


def test_classification_names_the_missing_imagenet_folder(tmp_path, capsys):
    out = tmp_path / "run"
    err = _refusal(capsys, "classification", out, "data.kind=imagefolder",
                   f"data.root={tmp_path / 'nowhere'}")
    assert err == (f"internimage finetune: config error: data.root: {tmp_path / 'nowhere'} "
                   "not found (expected an image folder holding train/ and val/, as "
                   "ImageNet's)")
    root = _imagenet(tmp_path / "imagenet")
    err = _refusal(capsys, "classification", out, "data.kind=imagefolder", f"data.root={root}")
    assert err.endswith(f"config error: data.root: {root / 'train'} not found (expected "
                        "ImageNet's train/ folder of class folders)")
    root = _imagenet(tmp_path / "flat", train="flat")
    err = _refusal(capsys, "classification", out, "data.kind=imagefolder", f"data.root={root}")
    assert err.endswith(f"data.root: {root / 'train'} holds no class folders (expected "
                        "ImageNet's train/ folder of class folders)")
    root = _imagenet(tmp_path / "ok", train="classes")  # past the data: the val split named
    err = _refusal(capsys, "classification", out, "data.kind=imagefolder", f"data.root={root}",
                   "data.val_split=val2")
    assert err.endswith(f"data.root: {root / 'val2'} not found (expected ImageNet's val2/ "
                        "folder of class folders)")


def test_classification_checks_local_shards_only(tmp_path, capsys):
    """A local shard pattern none of whose shards exists, or a local list file that does
    not, is refused; an s3:// URL is left to the pipeline (nothing is fetched here)."""
    out = tmp_path / "run"
    pattern = tmp_path / "shards" / "train-{000..003}.tar"
    err = _refusal(capsys, "classification", out, "data.kind=stream",
                   "data.train_samples=100", f'data.train_urls=["{pattern}"]',
                   'data.val_urls=["s3://bucket/val-{000..001}.tar"]')
    assert err.endswith(f"config error: data.train_urls: {pattern} not found (expected "
                        "local webdataset .tar shards; none of its 4 shards exists)")
    listing = tmp_path / "val.txt"
    err = _refusal(capsys, "classification", out, "data.kind=shards",
                   'data.train_urls=["s3://bucket/train-{000..003}.tar"]',
                   f'data.val_urls=["{listing}"]')
    assert err.endswith(f"config error: data.val_urls: {listing} not found (expected a "
                        "shard list file, one shard URL per line)")
    listing.write_text(f"# the val shards\n{tmp_path / 'val-{0..1}.tar'}\n")
    err = _refusal(capsys, "classification", out, "data.kind=shards",
                   'data.train_urls=["s3://bucket/train-{000..003}.tar"]',
                   f'data.val_urls=["{listing}"]')
    assert err.endswith(f"data.val_urls: {tmp_path / 'val-{0..1}.tar'} not found (expected "
                        "local webdataset .tar shards; none of its 2 shards exists)")


def test_detection_names_the_missing_coco_file(tmp_path, capsys):
    out, root = tmp_path / "run", tmp_path / "coco"
    err = _refusal(capsys, "detection", out, "data.kind=coco", f"data.root={root}")
    assert err.endswith(f"config error: data.root: {root} not found (expected the COCO "
                        "folder holding train2017/, val2017/ and annotations/)")
    (root / "train2017").mkdir(parents=True)
    err = _refusal(capsys, "detection", out, "data.kind=coco", f"data.root={root}")
    ann = root / "annotations" / "instances_train2017.json"
    assert err.endswith(f"config error: data.train_ann: {ann} not found (expected COCO's "
                        "instance annotation JSON of the training images)")
    ann.parent.mkdir()
    ann.write_text("{}")
    (root / "annotations" / "instances_val2017.json").write_text("{}")
    err = _refusal(capsys, "detection", out, "data.kind=coco", f"data.root={root}")
    assert err.endswith(f"config error: data.val_images: {root / 'val2017'} not found "
                        "(expected the folder of the validation images its annotation file "
                        "names)")


def test_segmentation_names_the_missing_dataset_folder(tmp_path, capsys):
    out, ade = tmp_path / "run", tmp_path / "ADEChallengeData2016"
    err = _refusal(capsys, "segmentation", out, "data.kind=ade20k", f"data.root={ade}",
                   "data.num_classes=150")
    assert err.endswith(f"config error: data.root: {ade} not found (expected the ADE20K "
                        "folder holding annotations/, images/)")
    (ade / "images" / "training").mkdir(parents=True)
    err = _refusal(capsys, "segmentation", out, "data.kind=ade20k", f"data.root={ade}",
                   "data.num_classes=150")
    assert err.endswith(f"data.root: {ade / 'images' / 'training'} holds no *.jpg images "
                        "(expected the training images of ADE20K, *.jpg)")
    # the Mapillary stage is evaluated on Cityscapes val: its own key is named
    vistas, cityscapes = tmp_path / "vistas", tmp_path / "cityscapes"
    for split in ("training", "validation"):
        (vistas / split / "images").mkdir(parents=True)
        (vistas / split / "images" / "a.jpg").write_bytes(b"")
        (vistas / split / "v1.2" / "labels").mkdir(parents=True)  # a v2.0 release's layout
    err = _refusal(capsys, "segmentation", out, "data.kind=mapillary", f"data.root={vistas}",
                   "data.num_classes=19", "data.reduce_zero_label=false",
                   "data.train_splits=[training,validation]", "data.val_kind=cityscapes",
                   f"data.val_root={cityscapes}")
    assert err.endswith(f"config error: data.val_root: {cityscapes} not found (expected the "
                        "Cityscapes folder holding gtFine/, leftImg8bit/)")


def _files(root: Path, *names: str) -> Path:
    """Empty files under ``root`` (the data checks list folders, they open no file)."""
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).touch()
    return root


def test_segmentation_names_images_without_their_label_file(tmp_path, capsys):
    """Images whose label file is missing (a partial copy, a cut download) are refused
    when the dataset is listed, before the model is built: the key, how many of how many,
    the label path expected and the first ones. Before, ADE20K trained until a DataLoader
    worker met the image, the other layouts ended in a FileNotFoundError traceback."""
    out = tmp_path / "run"
    ade = _files(tmp_path / "ade", "images/training/a.jpg", "annotations/training/a.png",
                 "images/training/b.jpg", "images/training/c.jpg",
                 "annotations/training/c.png", "images/validation/v.jpg",
                 "annotations/validation/v.png")
    err = _refusal(capsys, "segmentation", out, "data.kind=ade20k", f"data.root={ade}",
                   "data.num_classes=150")
    assert err == (f"internimage finetune: config error: data.root: 1 of 3 images in "
                   f"{ade / 'images' / 'training'} have no label file (expected "
                   "annotations/training/<name>.png; first: b.jpg)")
    # the Mapillary stage's evaluation set, Cityscapes val: its own key is named
    vistas = _files(tmp_path / "vistas", "training/images/m.jpg", "training/labels/m.png",
                    "validation/images/n.jpg", "validation/labels/n.png")
    cityscapes = _files(tmp_path / "cityscapes",
                        "leftImg8bit/val/ulm/ulm_000000_000019_leftImg8bit.png",
                        "gtFine/val/ulm/ulm_000000_000019_gtFine_labelIds.png",
                        "leftImg8bit/val/ulm/ulm_000001_000019_leftImg8bit.png")
    err = _refusal(capsys, "segmentation", out, "data.kind=mapillary", f"data.root={vistas}",
                   "data.num_classes=19", "data.reduce_zero_label=false",
                   "data.train_splits=[training,validation]", "data.val_kind=cityscapes",
                   f"data.val_root={cityscapes}")
    assert err == (f"internimage finetune: config error: data.val_root: 1 of 2 images in "
                   f"{cityscapes / 'leftImg8bit' / 'val'} have no label file (expected "
                   "gtFine/val/<city>/<name>_gtFine_labelTrainIds.png, or _gtFine_labelIds.png; "
                   "first: ulm/ulm_000001_000019_leftImg8bit.png)")


@pytest.mark.parametrize("task", ["classification", "detection", "segmentation"])
def test_an_init_of_another_variant_is_refused_before_the_run_dir_is_made(task, tmp_path,
                                                                         capsys):
    """A convert output records its variant: a start with another model.name is refused
    from that record alone, nothing built and nothing written."""
    import torch
    from safetensors.torch import save_file

    init = tmp_path / "internimage_s.safetensors"
    save_file({"patch_embed.conv1.weight": torch.zeros(1)}, str(init),
              metadata={"variant": "internimage_s"})
    err = _refusal(capsys, task, tmp_path / "run", "--init", str(init))
    assert err == (f"internimage finetune: config error: init: {init} holds an internimage_s "
                   "backbone but this run builds internimage_t; set model.name to the "
                   "checkpoint's variant")


def test_an_init_whose_own_record_is_unreadable_is_named_as_the_fault(tmp_path, capsys):
    """A run dir given as --init whose config.yaml names a model we do not know: the
    refusal names the init source (the user's own model.name is fine)."""
    init = tmp_path / "initrun"
    (init / "checkpoints" / "step_0000001").mkdir(parents=True)
    (init / "checkpoints" / "step_0000001" / "mp_rank_00_model_states.pt").write_bytes(b"")
    (init / "checkpoints" / "latest").write_text("step_0000001")
    (init / "config.yaml").write_text("model:\n  name: internimage_t_custom\n")
    err = _refusal(capsys, "classification", tmp_path / "run", "--init", str(init))
    assert err.startswith(f"internimage finetune: config error: init: {init}")
    assert "cannot tell which backbone it holds" in err and "internimage_t_custom" in err


def test_a_refused_start_removes_the_folders_it_made_and_keeps_the_users():
    """What a refused fresh start removes: the run folder and the parents the start made
    (--output-dir nest/a/run), while they are empty; never a folder that was there."""
    import tempfile

    from launch.commands.refusals import first_missing as _first_missing
    from launch.commands.refusals import remove_empty_up_to as _remove_empty_up_to

    with tempfile.TemporaryDirectory() as tmp:
        keep = Path(tmp) / "keep"
        keep.mkdir()
        out = keep / "a" / "run"
        top = _first_missing(out)
        assert top == keep / "a" and _first_missing(keep) is None
        out.mkdir(parents=True)
        _remove_empty_up_to(out, top)
        assert keep.is_dir() and not (keep / "a").exists()
        out.mkdir(parents=True)
        (keep / "a" / "user.txt").write_text("x")  # a file appeared beside it: kept
        _remove_empty_up_to(out, top)
        assert not out.exists() and (keep / "a" / "user.txt").is_file()


@pytest.mark.slow
def test_an_init_that_does_not_fit_leaves_no_config(cache, tmp_path):
    """A released-layout .pth records no variant: its shapes refuse it once the model is
    built, still before config.yaml is written (before: config.yaml was left in the new
    run directory)."""
    import torch

    from models import build_model

    init = tmp_path / "wide.pth"
    torch.save(build_model("internimage_t", num_classes=0, channels=32, depths=(1, 1, 2, 1),
                           groups=(2, 4, 8, 16)).state_dict(), init)
    out = tmp_path / "nest" / "a" / "run"  # folders the start makes, parents too
    proc = run_forked([sys.executable, "-m", "launch.cli", "finetune", "classification",
                       "--output-dir", str(out), "--init", str(init), "run.num_workers=0",
                       "run.threads=1", "run.progress=false", "run.tensorboard=false",
                       f"data.cache_dir={cache}"], cache, check=False)
    assert proc.returncode == 2 and "does not fit internimage_t" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "nest").exists()


def test_a_streamed_set_on_an_unreachable_store_ends_in_one_line_before_the_model(
        cache, tmp_path):
    """Shards on an object store nothing answers for (a mistyped endpoint): the start is
    refused before the model is built (data/preflight.py; before, the readers waited for
    the store for ever), exit 2, one line naming the set, and no run directory left."""
    from s3_server import free_port

    out = tmp_path / "run"
    endpoint = f"http://127.0.0.1:{free_port()}"
    proc = run_forked([sys.executable, "-m", "launch.cli", "finetune", "classification",
                       "--output-dir", str(out), "data.kind=stream",
                       'data.train_urls=["s3://imagenet/train-{0000..0099}.tar"]',
                       'data.val_urls=["s3://imagenet/val-{0000..0009}.tar"]',
                       "data.train_samples=64", f"data.s3.endpoint_url={endpoint}",
                       "data.s3.retries=0", "data.s3.key=k", "data.s3.secret=s",
                       "run.num_workers=0", "run.progress=false",
                       "run.tensorboard=false"], cache, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("internimage finetune: data source 'train': cannot read from the "
                           f"object store at {endpoint}"), last
    assert "Traceback" not in proc.stderr
    assert not out.exists()
