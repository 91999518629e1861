"""The `internimage` command line: every subcommand answers --help; estimate works."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from launch.cli import main

SUBCOMMANDS = ["pretrain", "finetune", "convert", "shards", "submit", "estimate"]


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_help_of_every_subcommand(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: internimage " + command in capsys.readouterr().out


def test_console_script_is_installed():
    out = subprocess.run(["internimage", "--help"], capture_output=True, text=True,
                         env=os.environ | {"PATH": os.path.dirname(sys.executable) + ":"
                                           + os.environ.get("PATH", "")})
    assert out.returncode == 0 and "estimate" in out.stdout


def test_estimate_h_on_64_gpus_json(capsys):
    assert main(["estimate", "--model", "internimage_h", "--gpus", "64", "--json"]) == 0
    est = json.loads(capsys.readouterr().out)
    assert est["params"] == 1_089_636_760
    assert est["gpus"] == 64 and est["gpus_per_node"] == 8 and est["image_size"] == 640
    # ZeRO-3 divides the 18 bytes/parameter of model states over all 64 GPUs.
    assert 18 * est["params"] / 64 < est["model_states_per_gpu"] < 18 * est["params"] / 8
    # Checkpointing keeps block inputs only: far below the full activations.
    assert 0 < est["activations_per_gpu"] < est["activations_per_gpu_without_checkpointing"] / 4


def test_estimate_table_and_more_gpus_means_less_state(capsys):
    assert main(["estimate", "--model", "internimage_t", "--gpus", "8", "--batch", "2"]) == 0
    table = capsys.readouterr().out
    assert "parameters" in table and "29,918,424" in table and "GiB" in table
    main(["estimate", "--model", "internimage_t", "--gpus", "1", "--batch", "2", "--json"])
    one = json.loads(capsys.readouterr().out)
    main(["estimate", "--model", "internimage_t", "--gpus", "16", "--batch", "2", "--json"])
    sixteen = json.loads(capsys.readouterr().out)
    assert sixteen["model_states_per_gpu"] < one["model_states_per_gpu"]
    assert sixteen["activations_per_gpu"] == one["activations_per_gpu"]


def test_estimate_rejects_bad_input(capsys):
    assert main(["estimate", "--model", "internimage_q", "--json"]) == 2
    out = capsys.readouterr()  # on stderr: --json's stdout is for the JSON alone
    assert "unknown InternImage model" in out.err and out.out == ""
    assert main(["estimate", "--model", "internimage_t", "--batch", "0"]) == 2


def test_estimate_refuses_gpus_that_fill_no_whole_nodes(capsys):
    """DeepSpeed's estimators count GPUs per node x nodes: --gpus 10 at 8 a node was
    estimated (and shown) as 16 GPUs, understating each GPU's share of the states."""
    assert main(["estimate", "--model", "internimage_t", "--gpus", "10",
                 "--gpus-per-node", "8"]) == 2
    out = capsys.readouterr().err.strip()
    assert "--gpus 10 is not a whole number of nodes" in out and "--gpus-per-node 5" in out
    assert main(["estimate", "--model", "internimage_t", "--gpus", "10", "--gpus-per-node",
                 "5", "--batch", "2", "--json"]) == 0
    est = json.loads(capsys.readouterr().out)
    assert est["gpus"] == 10 and est["gpus_per_node"] == 5
