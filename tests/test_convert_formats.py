"""`internimage convert` writes only what it, ``--init`` and ``models.load_pretrained`` read
back: every reader picks the format by the file's suffix, so a destination whose suffix
contradicts ``--format`` (before: ``convert RUN y.pth`` wrote safetensors bytes into a
``.pth``, ``--format official`` to ``o.safetensors`` a torch zip, neither readable) or that
no reader takes is refused in one line before the source is read."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

ARCH = {"channels": 16, "depths": [1, 1, 2, 1], "groups": [1, 2, 4, 8]}


def _tiny():
    from models import build_model

    return build_model("internimage_t", num_classes=0, dcn_backend="reference", **ARCH)


@pytest.fixture(scope="module")
def released(tmp_path_factory) -> Path:
    """A tiny backbone in the released .pth layout."""
    src = tmp_path_factory.mktemp("src") / "released.pth"
    torch.manual_seed(0)
    torch.save(_tiny().state_dict(), src)
    return src


def _refused(capsys, *argv: str) -> str:
    """The one line `internimage convert ARGV` writes to stderr when it refuses (exit 2)."""
    from launch.cli import main

    assert main(["convert", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


def test_a_destination_suffix_against_the_format_is_refused(released, tmp_path, capsys):
    err = _refused(capsys, str(released), str(tmp_path / "y.pth"))  # default: safetensors
    assert "--format safetensors" in err and ".pth" in err and "--format official" in err
    err = _refused(capsys, str(released), str(tmp_path / "o.safetensors"),
                   "--format", "official")
    assert "--format official" in err and ".safetensors" in err, err
    for no_reader in ("out", "out.ckpt"):  # no reader takes it: the accepted suffixes named
        err = _refused(capsys, str(released), str(tmp_path / no_reader))
        assert "writes a .safetensors file" in err, err
        err = _refused(capsys, str(released), str(tmp_path / no_reader), "--format",
                       "official")
        assert "writes a .pth/.pt/.bin file" in err, err
    # refused before the source is read: a missing source is not what is reported
    err = _refused(capsys, str(tmp_path / "missing.pth"), str(tmp_path / "y.pth"))
    assert "not found" not in err and "y.pth" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_every_accepted_destination_reads_back(released, tmp_path, capsys):
    from finetune.convert import read_source
    from launch.cli import main
    from models import load_pretrained

    expected = torch.load(released, weights_only=True)
    outputs = [(tmp_path / "b.safetensors", "safetensors")] + [
        (tmp_path / f"b{suffix}", "official") for suffix in (".pth", ".pt", ".bin")]
    for dst, fmt in outputs:
        assert main(["convert", str(released), str(dst), "--format", fmt]) == 0, \
            capsys.readouterr().err
        state, _ = read_source(dst)  # what convert and --init read
        assert set(state) == set(expected), dst
        assert all(torch.equal(state[k], v.float() if v.is_floating_point() else v)
                   for k, v in expected.items()), dst
        load_pretrained(_tiny(), dst, strict=True)
    capsys.readouterr()
