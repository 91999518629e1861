"""Where a command is told to write is checked before any compute, and a start that fails
leaves nothing of its own behind:

- a run directory (``--output-dir`` / ``run.output_dir``) that is a file, or lies under
  one, is refused when the config is loaded (pretrain, every fine-tuning task, their dry
  runs and `internimage submit`); before, the start failed after its setup with a
  ``FileExistsError``/``NotADirectoryError`` traceback, and a dry run accepted it;
- a `convert` destination that is a directory, or lies under a file, is refused before the
  source is read; before, the whole conversion ran and then ended in a traceback;
- a start that crashes (not one of the one-line refusals) removes rank 0's staged config
  (``.config.yaml.pending-<host>-<pid>``); a demo of no images is refused at load;
- only rank 0 prints a fine-tuning run's final metrics.

Every command runs in this process through the CLI's entry point (``launch.cli.main``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from runtime.checkpoint import PENDING_CONFIG
from tests.test_finetune_bad_input import _refusal

COMMANDS = {"classification": ["finetune", "classification"],
            "detection": ["finetune", "detection"],
            "segmentation": ["finetune", "segmentation"],
            "pretrain": ["pretrain"]}


def _one_line(capsys, argv: list[str]) -> str:
    """The one line `internimage <argv>` writes to stderr when it refuses (exit 2)."""
    from launch.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


def _tree(root: Path) -> list[str]:
    """Every path under ``root`` (what a command left there)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("command", COMMANDS)
def test_an_output_dir_that_is_a_file_is_refused_when_the_config_is_loaded(command, tmp_path,
                                                                          capsys):
    blocker = tmp_path / "ofile"
    blocker.write_text("hi\n")
    argv, cmd = COMMANDS[command], COMMANDS[command][0]
    # the file itself, a path under it, with the flag or the key, a dry run or a start
    err = _one_line(capsys, [*argv, "--output-dir", str(blocker), "--dry-run"])
    assert err == (f"internimage {cmd}: config error: --output-dir: {blocker} is a file, "
                   "not a directory")
    err = _one_line(capsys, [*argv, "--output-dir", str(blocker / "sub"), "run.max_steps=1"])
    assert err == (f"internimage {cmd}: config error: --output-dir: {blocker / 'sub'} cannot "
                   f"be created: {blocker} is a file")
    err = _one_line(capsys, [*argv, f"run.output_dir={blocker}", "run.max_steps=1"])
    assert err == (f"internimage {cmd}: config error: run.output_dir: {blocker} is a file, "
                   "not a directory")
    # submit checks the job's config with the job's own loader, before sbatch
    err = _one_line(capsys, ["submit", "--dry-run", *argv, "--output-dir", str(blocker)])
    assert err == (f"internimage submit: config error: --output-dir: {blocker} is a file, "
                   "not a directory")
    assert _tree(tmp_path) == ["ofile"] and blocker.read_text() == "hi\n"


@pytest.mark.parametrize("dst", ["dd.safetensors", "ofile/out.safetensors",
                                 "ofile/sub/out.pth"])
def test_a_convert_destination_that_cannot_be_written_is_refused_before_the_source_is_read(
        dst, tmp_path, capsys, monkeypatch):
    import finetune.convert

    read = []

    def recorded(src):  # the conversion's first step: must not be reached
        read.append(src)
        raise AssertionError("the source was read")

    monkeypatch.setattr(finetune.convert, "read_source", recorded)
    (tmp_path / "dd.safetensors").mkdir()
    (tmp_path / "ofile").write_text("hi\n")
    src, target = tmp_path / "released.pth", tmp_path / dst
    src.write_bytes(b"")
    fmt = ["--format", "official"] if dst.endswith(".pth") else []
    err = _one_line(capsys, ["convert", str(src), str(target), *fmt])
    if dst == "dd.safetensors":
        assert err == f"internimage convert: {target} is a directory: name the file to write in it"
    else:
        assert err == (f"internimage convert: {target} cannot be written: {tmp_path / 'ofile'} "
                       "is not a directory")
    assert read == []
    assert _tree(tmp_path) == ["dd.safetensors", "ofile", "released.pth"]


@pytest.mark.parametrize("task", ["detection", "segmentation"])
@pytest.mark.parametrize("key", ["data.demo_train", "data.demo_val"])
def test_a_demo_of_no_images_is_refused_when_the_config_is_loaded(task, key, tmp_path, capsys):
    err = _refusal(capsys, task, tmp_path / "run", f"{key}=0", "run.max_steps=2")
    assert err == (f"internimage finetune: config error: {key}: must be >= 1 (images the demo "
                   "writes), got 0")
    assert _tree(tmp_path) == []


def _crash(*_args, **_kwargs):
    raise FileNotFoundError("data: no demo images found under demo")


@pytest.mark.parametrize("existing", [False, True])
def test_a_finetune_start_that_crashes_removes_its_staged_config(existing, tmp_path,
                                                                 monkeypatch):
    """Any exception of the start (not only the one-line refusals): rank 0's staged config
    goes, and a fresh start's empty run folder with it; a folder that was there stays."""
    import finetune.segmentation
    from launch.cli import main

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(finetune.segmentation, "train", _crash)
    out = tmp_path / "nest" / "run"
    if existing:
        out.mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no demo images"):
        main(["finetune", "segmentation", "--output-dir", str(out), "run.max_steps=2",
              f"data.cache_dir={tmp_path / 'cache'}"])
    assert not list(tmp_path.rglob(f"{PENDING_CONFIG}*"))
    assert _tree(tmp_path) == (["nest", "nest/run"] if existing else [])


def test_a_pretrain_start_that_crashes_removes_its_staged_config(tmp_path, monkeypatch):
    import pretrain.demo
    import pretrain.trainer
    from launch.cli import main

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(pretrain.demo, "resolve_builtin", lambda cfg: cfg)  # no demo shards
    monkeypatch.setattr(pretrain.trainer, "pretrain", _crash)
    out = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match="no demo images"):
        main(["pretrain", "--output-dir", str(out), "--max-steps", "1"])
    assert not list(tmp_path.rglob(f"{PENDING_CONFIG}*"))
