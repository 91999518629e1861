"""Configs that loaded, planned (``--dry-run``) and submitted cleanly but failed at the
start with a traceback (or ran without a word), now refused in one line naming the key and
its value, exit 2, before any model, data or compute: a pre-training data section without
sources, zero (or negative) head counts of the text tower and the image decoder (a
ZeroDivisionError even on ``--dry-run``), a fine-tuning epoch count that is infinite, NaN
or negative, zero-shot URLs without class names (evaluation skipped silently), and a SLURM
time limit no longer than the time-limit signal's delay (the signal came at once, and the
job spent its requeues without training)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from launch.cli import main


def _refused(argv: list[str], capsys) -> str:
    """The one line ``argv`` is refused with (exit 2, no traceback)."""
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("overrides, message", [
    (["data.sources=[]"], "data.sources: needs at least one source"),
    (["text.heads=0"], "text.heads: must be >= 1, got 0"),
    # passed width % heads (64 % -4 == 0); nn.MultiheadAttention refused it at the build
    (["text.heads=-4"], "text.heads: must be >= 1, got -4"),
    (["text.width=0"], "text.width: must be >= 1, got 0"),
    (["text.width=66"], "text.width: must be divisible by text.heads (4), got 66"),
    (["objective.image.decoder_heads=0"], "objective.image.decoder_heads: must be >= 1, got 0"),
    (["objective.image.decoder_width=0"], "objective.image.decoder_width: must be >= 1, got 0"),
    (["objective.image.decoder_width=520"],
     "objective.image.decoder_width: must be divisible by 4 and by decoder_heads (16), got 520"),
    (["zero_shot.class_names=[]"], "zero_shot.class_names: is empty while zero_shot.urls is set"),
])
def test_pretrain_dry_run_refuses_in_one_line(overrides, message, tmp_path, capsys):
    out = tmp_path / "run"
    line = _refused(["pretrain", "--dry-run", "--output-dir", str(out), *overrides], capsys)
    assert line.startswith("internimage pretrain: config error: "), line
    assert message in line, line
    assert not out.exists()


def test_a_pretrain_start_without_sources_is_refused_before_it_starts(tmp_path, capsys):
    # it failed in the loader, after the distributed set-up: a traceback, exit 1
    out = tmp_path / "run"
    line = _refused(["pretrain", "--max-steps", "1", "--output-dir", str(out),
                     "data.sources=[]"], capsys)
    assert "config error: data.sources: needs at least one source" in line, line
    assert not out.exists()


def test_a_data_section_without_sources_is_refused(tmp_path, capsys):
    config = tmp_path / "no_sources.yaml"
    config.write_text("data:\n  image_size: 32\n  batch_size: 4\n")
    out = tmp_path / "run"
    line = _refused(["pretrain", "--config", str(config), "--dry-run", "--output-dir",
                     str(out)], capsys)
    assert "config error: data.sources: needs at least one source" in line, line
    assert not out.exists()


def test_submit_refuses_a_pretrain_config_the_job_would_fail_on(tmp_path, capsys):
    line = _refused(["submit", "--dry-run", "pretrain", "--output-dir", str(tmp_path / "run"),
                     "text.heads=0"], capsys)
    assert "text.heads: must be >= 1, got 0" in line, line


def test_zero_shot_off_and_named_class_sets_still_load():
    from launch.commands.pretrain import DEMO_CONFIG
    from launch.config import load_config
    from pretrain.config import PretrainConfig

    # evaluation off: URLs cleared, the demo's class names kept (how tests and users do it)
    assert load_config(PretrainConfig, DEMO_CONFIG, ["zero_shot.urls=[]"]).zero_shot.urls == []
    cfg = load_config(PretrainConfig, DEMO_CONFIG, ["zero_shot.class_names=imagenet"])
    assert cfg.zero_shot.class_names == "imagenet"


@pytest.mark.parametrize("overrides, shown", [
    (["run.epochs=.inf"], "inf"),  # planned as "inf epochs"; the start: OverflowError
    (["run.epochs=.nan", "run.max_steps=5"], "nan"),  # passed: max_steps > 0
    (["run.epochs=-1", "run.max_steps=5"], "-1.0"),  # passed: max_steps > 0
])
def test_finetune_refuses_an_epoch_count_that_is_not_finite_and_non_negative(
        overrides, shown, tmp_path, capsys):
    out = tmp_path / "run"
    line = _refused(["finetune", "classification", "--dry-run", "--output-dir", str(out),
                     *overrides], capsys)
    assert line.startswith("internimage finetune: config error: run.epochs: must be a finite "
                           f"number >= 0, got {shown}"), line
    assert not out.exists()


def test_a_finetune_start_with_infinite_epochs_is_refused_before_it_starts(tmp_path, capsys):
    out = tmp_path / "run"
    line = _refused(["finetune", "classification", "--output-dir", str(out),
                     "run.epochs=.inf"], capsys)
    assert "config error: run.epochs: must be a finite number >= 0, got inf" in line, line
    assert not out.exists()


def test_finetune_refuses_an_infinite_warmup_in_epochs(tmp_path, capsys):
    line = _refused(["finetune", "classification", "--dry-run", "--output-dir",
                     str(tmp_path / "run"), "optim.warmup_epochs=.inf"], capsys)
    assert "optim.warmup_epochs: must be a finite number >= 0" in line and "got inf" in line


@pytest.mark.parametrize("profile, time_min, delay", [
    (None, "1", 120),  # the default profile's signal_delay_s
    (None, "3", 120),  # SLURM may signal up to 60 s early: 180 s is not enough
    ("example_gpu_cluster", "10", 600),  # a smoke test on the GPU profile
])
def test_submit_refuses_a_time_limit_within_the_signal_delay(profile, time_min, delay,
                                                             tmp_path, capsys):
    line = _refused(["submit", *(["--profile", profile] if profile else []), "--dry-run",
                     "--time", time_min, "pretrain", "--output-dir", str(tmp_path / "run")],
                    capsys)
    assert line.startswith("internimage submit: config error: "), line
    assert f"time_min (--time) {time_min} min" in line and f"signal_delay_s ({delay} s)" in line


def test_a_profile_time_limit_within_its_signal_delay_is_refused(tmp_path, capsys):
    profile = tmp_path / "short.yaml"
    profile.write_text("time_min: 2\nsignal_delay_s: 120\nsave_timeout_s: 60\n")
    line = _refused(["submit", "--profile", str(profile), "--dry-run", "pretrain"], capsys)
    assert "time_min (--time) 2 min" in line and "signal_delay_s (120 s)" in line, line


def test_time_limits_past_the_signal_delay_are_accepted(tmp_path, capsys):
    run = str(tmp_path / "run")
    assert main(["submit", "--dry-run", "--time", "4", "pretrain", "--output-dir", run]) == 0
    # a --time fixes a profile whose own time_min is too short: flags and file checked
    # together
    profile = tmp_path / "short.yaml"
    profile.write_text("time_min: 2\nsignal_delay_s: 120\nsave_timeout_s: 60\n")
    assert main(["submit", "--profile", str(profile), "--dry-run", "--time", "60",
                 "pretrain", "--output-dir", run]) == 0
    assert "time_min: 60" in capsys.readouterr().out


def test_a_check_that_divides_by_a_bad_value_is_still_one_config_error():
    from launch.config import ConfigError, build

    @dataclass
    class Section:
        width: int = 8
        heads: int = 2

        def __post_init__(self) -> None:
            if self.width % self.heads:  # no range check first
                raise ValueError("width: must be divisible by heads")

    with pytest.raises(ConfigError, match=r"^text: a value out of range \(ZeroDivisionError"):
        build(Section, {"heads": 0}, prefix="text")


@pytest.mark.parametrize("command", [["pretrain"], ["finetune", "classification"]])
def test_flag_values_are_taken_as_given_and_an_empty_output_dir_is_refused(
        command, tmp_path, capsys):
    """``--output-dir`` and ``--init`` went through the override parser's YAML: ``#`` cut
    the path (``runs/exp #3`` continued ``runs/exp``, another run), ``2024-06-01`` became a
    date. An empty ``--output-dir`` (an unset variable) ran pre-training in the current
    directory and was ignored by fine-tuning (the config's default run directory)."""
    from launch.cli import build_parser
    from launch.commands.finetune import load as finetune_load
    from launch.commands.pretrain import load as pretrain_load

    load = pretrain_load if command == ["pretrain"] else finetune_load
    for given in (f"{tmp_path}/exp #3", "2024-06-01", "12:30"):
        args, extra = build_parser().parse_known_args([*command, "--output-dir", given])
        args.overrides += extra
        assert load(args).run.output_dir == given
    line = _refused([*command, "--dry-run", "--output-dir", ""], capsys)
    assert line.endswith("config error: --output-dir: empty; give the run's directory "
                         "(an unset variable?)"), line


def test_abbreviated_flags_are_refused_not_taken_for_the_full_ones(capsys):
    """argparse took ``--res PATH`` for ``--resume PATH``; a SLURM job finds its flags by
    their full names when it reruns its command, so a restart before the first save
    resumed ``auto`` instead of PATH (launch/slurm/job.py resume_argv)."""
    with pytest.raises(SystemExit) as stop:
        main(["pretrain", "--dry-run", "--res", "/elsewhere/step_0000010"])
    assert stop.value.code == 2
    assert "unrecognized arguments: --res" in capsys.readouterr().err
