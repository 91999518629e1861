"""`internimage pretrain`'s command line and config checks that a review found missing,
each refused before any compute in one line naming the flag or key (exit 2, nothing
written), and what a dry run plans:

- ``--max-steps N`` runs N steps also with an epoch config (it sets ``run.epochs=0``):
  with the H preset's 30 epochs it was ignored and a smoke test planned 50,039,062 steps;
  ``--max-steps 0``/``-5``, ``run.epochs=-1`` and ``run.max_steps`` as an override of an
  epoch run (where it is not used) were accepted;
- a tag vocabulary (``data.tag_vocab``) this machine cannot read: every rank of the start
  ended in a ``FileNotFoundError`` traceback, the dry run and `submit` accepted it (submit
  only warns: the compute nodes may see other files, as for fine-tuning's data);
- ``model.drop_path_rate`` outside [0, 1): 1.5 failed at the first forward (torch's
  ``bernoulli_`` takes p in [0, 1]: torch.Tensor.bernoulli_ docs), after the model build;
  fine-tuning's range (finetune/config.py);
- ``--dry-run --gpus 10`` planned the model states of 16 GPUs: DeepSpeed's ZeRO-3
  estimator counts ``num_gpus_per_node x num_nodes`` GPUs (deepspeed/runtime/zero/stage3.py
  ``estimate_zero3_model_states_mem_needs``), as `internimage estimate` refuses
  (pretrain/estimate.py ``check_whole_nodes``); the dry run takes ``--gpus-per-node``.

Every command runs in this process through the CLI's entry point (``launch.cli.main``),
on the demo config (an epoch plan given as overrides) unless the H preset is the point."""

from __future__ import annotations

import json

import pytest

from tests.pretrain_utils import REPO

H_PRESET = str(REPO / "configs" / "pretrain" / "internimage_h_m3i.yaml")
# the demo config with an epoch plan: 2 epochs of 320 samples
EPOCHS = ["run.epochs=2", "run.samples_per_epoch=320", "data.image_size=64"]


def _plan(capsys, argv: list[str]) -> dict:
    """The plan `internimage pretrain --dry-run <argv>` prints (exit 0)."""
    from launch.cli import main

    assert main(["pretrain", "--dry-run", *argv]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def _refusal(capsys, argv: list[str], command: str = "pretrain") -> str:
    """The one line `internimage <argv>` writes to stderr when it refuses (exit 2)."""
    from launch.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith(f"internimage {command}: config error: "), err
    return err


# -- 1. --max-steps -------------------------------------------------------------------------

def test_max_steps_runs_n_steps_of_the_h_preset(tmp_path, capsys):
    # the review's command: it printed "steps": 50039062 (30 x 427M / 256 per step)
    vocab = tmp_path / "tags.txt"
    vocab.write_text("dog\ncat\n")
    plan = _plan(capsys, ["--config", H_PRESET, "--max-steps", "100", "--gpus", "8",
                          f"data.tag_vocab={vocab}"])
    assert plan["steps"] == 100 and plan["epochs"] == 0
    assert plan["samples_total"] == 100 * 32 * 8


def test_max_steps_wins_over_an_epoch_plan_and_the_config_records_it(capsys):
    from launch.cli import build_parser
    from launch.commands.pretrain import load

    # the plan: 2 epochs x 320 samples at the demo's batch of 64
    assert _plan(capsys, [*EPOCHS, "--gpus", "1"])["steps"] == 2 * 320 // 64
    assert _plan(capsys, [*EPOCHS, "--gpus", "1", "--max-steps", "3"])["steps"] == 3
    # what the run's config.yaml then records: the run it is
    cfg = load(build_parser().parse_args(["pretrain", "--max-steps", "3", *EPOCHS]))
    assert (cfg.run.max_steps, cfg.run.epochs) == (3, 0)


@pytest.mark.parametrize("argv, message", [
    (["--max-steps", "0"], "--max-steps: must be >= 1, got 0"),
    (["--max-steps", "-5"], "--max-steps: must be >= 1, got -5"),
    # fell back to run.max_steps (200) without a word
    (["run.epochs=-1"], "run.epochs: must be >= 0 (0: run.max_steps steps), got -1"),
    (["run.epochs=.inf"], "run.epochs: must be >= 0"),
    # not used by an epoch run: the smoke test ran the whole plan
    (["run.max_steps=5"], "run.max_steps: not used by an epoch run (run.epochs=2); give "
                          "--max-steps N to run N steps"),
    (["run={max_steps: 5, epochs: 2, samples_per_epoch: 320}"],
     "run.max_steps: not used by an epoch run"),
])
def test_a_length_that_cannot_run_is_refused_in_one_line(argv, message, tmp_path, capsys):
    out = tmp_path / "run"
    err = _refusal(capsys, ["pretrain", "--dry-run", "--output-dir", str(out), *EPOCHS,
                            *argv])
    assert message in err
    # the same refused at a start, before anything is written
    err = _refusal(capsys, ["pretrain", "--output-dir", str(out), *EPOCHS, *argv])
    assert message in err
    assert not out.exists()


def test_run_max_steps_with_run_epochs_zero_still_loads(capsys):
    assert _plan(capsys, [*EPOCHS, "run.max_steps=4", "run.epochs=0", "--gpus", "1"])[
        "steps"] == 4


def test_submit_hands_max_steps_to_the_job(tmp_path):
    # the job parses its own argv again (launch/slurm/jobspec.py): it must run N steps too
    from launch.cli import build_parser
    from launch.commands.pretrain import load
    from launch.slurm.jobspec import job_spec

    spec = job_spec(["pretrain", "--output-dir", str(tmp_path / "run"), "--max-steps", "3",
                     *EPOCHS], build_parser())
    assert spec.argv[spec.argv.index("--max-steps") + 1] == "3"
    args, extra = build_parser().parse_known_args(spec.argv)
    args.overrides += extra
    cfg = load(args)
    assert (cfg.run.max_steps, cfg.run.epochs) == (3, 0)


# -- 2. data.tag_vocab ----------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["missing", "folder", "binary", "url"])
def test_a_tag_vocab_that_cannot_be_read_is_refused_before_any_compute(kind, tmp_path,
                                                                       capsys):
    path = {"missing": tmp_path / "tags" / "yfcc15m_tags.txt", "folder": tmp_path,
            "binary": tmp_path / "tags.bin", "url": "s3://yfcc15m/tags.txt"}[kind]
    if kind == "binary":
        path.write_bytes(b"\xff\xfe\x00tag\n")
    reason = {"missing": "not found", "folder": "is a folder, not a file",
              "binary": "is not UTF-8 text", "url": "must be a local file"}[kind]
    out = tmp_path / "run"
    argv = ["--output-dir", str(out), f"data.tag_vocab={path}"]
    err = _refusal(capsys, ["pretrain", *argv])
    assert err.startswith(f"internimage pretrain: config error: data.tag_vocab: {path}")
    assert reason in err
    assert "internimage shards tags" in err and "--out" in err
    assert not out.exists()  # a refused start leaves no run directory
    # a URL never works (read from the file system): refused by the config itself
    if kind == "url":
        assert _refusal(capsys, ["pretrain", "--dry-run", *argv]) == err
        return
    # a dry run plans without the data (a laptop, a login node): it warns, naming the key
    from launch.cli import main

    assert main(["pretrain", "--dry-run", *argv]) == 0
    warning = capsys.readouterr().err
    assert f"internimage pretrain: warning: data.tag_vocab: {path}" in warning
    assert reason in warning


def test_a_relative_tag_vocab_names_the_folder_it_is_looked_up_from(tmp_path, capsys,
                                                                    monkeypatch):
    monkeypatch.chdir(tmp_path)
    err = _refusal(capsys, ["pretrain", "--config", H_PRESET, "--output-dir",
                            str(tmp_path / "run")])
    assert (f"data.tag_vocab: tags/yfcc15m_tags.txt (from {tmp_path}) not found; build one "
            "with `internimage shards tags") in err


def test_submit_warns_of_a_tag_vocab_this_machine_does_not_see(tmp_path, capsys):
    # as a fine-tuning dataset path: the compute nodes may see it, the job refuses it
    from launch.cli import main

    missing = tmp_path / "tags.txt"
    assert main(["submit", "--dry-run", "pretrain", "--output-dir", str(tmp_path / "run"),
                 f"data.tag_vocab={missing}"]) == 0
    err = capsys.readouterr().err
    assert (f"internimage submit: warning: data.tag_vocab: {missing} not found; build one with"
            in err)
    # a URL is never read (the vocabulary is read from the file system): refused there too
    err = _refusal(capsys, ["submit", "--dry-run", "pretrain", "--output-dir",
                            str(tmp_path / "run"), "data.tag_vocab=s3://b/tags.txt"],
                   command="submit")
    assert "data.tag_vocab: s3://b/tags.txt: must be a local file" in err


def test_a_readable_tag_vocab_passes(tmp_path, capsys):
    vocab = tmp_path / "tags.txt"
    vocab.write_text("# comment\ndog\ncat\n", encoding="utf-8")
    assert _plan(capsys, ["--gpus", "1", f"data.tag_vocab={vocab}"])["steps"] == 300


@pytest.mark.parametrize("vocab", ["unset", "no tags"])
def test_the_tag_term_without_tags_is_refused_before_any_compute(vocab, tmp_path, capsys):
    # objective.tag_weight 0.5 (the demo's and the H preset's) with no vocabulary scored the
    # images against zero tags: loss_tag exactly 0, nothing trained, nothing said
    from launch.cli import main

    path = tmp_path / "tags.txt"
    path.write_text("# built later\n\n", encoding="utf-8")
    key = "data.tag_vocab=null" if vocab == "unset" else f"data.tag_vocab={path}"
    out = tmp_path / "run"
    err = _refusal(capsys, ["pretrain", "--output-dir", str(out), key])
    assert "data.tag_vocab: " in err and "objective.tag_weight is 0.5" in err, err
    assert "internimage shards tags" in err
    assert not out.exists()
    # a plan is made before the vocabulary exists: it warns
    assert main(["pretrain", "--dry-run", "--output-dir", str(out), key]) == 0
    assert "internimage pretrain: warning: data.tag_vocab: " in capsys.readouterr().err
    # without the tag term no vocabulary is needed: no refusal, no warning
    assert main(["pretrain", "--dry-run", "--output-dir", str(out), key,
                 "objective.tag_weight=0"]) == 0
    assert "warning" not in capsys.readouterr().err


# -- 3. model.drop_path_rate ----------------------------------------------------------------

@pytest.mark.parametrize("rate", ["1.5", "1.0", "-0.1", ".nan"])
def test_a_drop_path_rate_outside_0_1_is_refused(rate, capsys):
    err = _refusal(capsys, ["pretrain", "--dry-run", f"model.drop_path_rate={rate}"])
    assert "model.drop_path_rate: must be in [0, 1)" in err


@pytest.mark.parametrize("rate", [0.0, 0.2, 0.99])
def test_a_drop_path_rate_in_0_1_loads(rate):
    from launch.commands.pretrain import DEMO_CONFIG
    from launch.config import load_config
    from pretrain.config import PretrainConfig

    cfg = load_config(PretrainConfig, DEMO_CONFIG, [f"model.drop_path_rate={rate}"])
    assert cfg.model.overrides()["drop_path_rate"] == rate


# -- 4. whole nodes -------------------------------------------------------------------------

def test_a_dry_run_for_gpus_that_fill_no_whole_node_is_refused(capsys):
    err = _refusal(capsys, ["pretrain", "--dry-run", "--gpus", "10"])
    assert ("--gpus 10 is not a whole number of nodes of --gpus-per-node 8: give the GPUs "
            "per node the job uses (e.g. --gpus-per-node 5)") in err
    err = _refusal(capsys, ["pretrain", "--dry-run", "--gpus-per-node", "0"])
    assert "--gpus-per-node: must be >= 1, got 0" in err


@pytest.mark.parametrize("flag", ["--gpus", "--gpus-per-node"])
def test_the_dry_run_gpu_flags_are_refused_by_a_start(flag, tmp_path, capsys):
    """A start trains on the processes its launcher started: ``--gpus 64`` there was
    accepted and ignored (a user expecting 64 GPUs got one process)."""
    err = _refusal(capsys, ["pretrain", flag, "8", "--output-dir", str(tmp_path / "run")])
    assert err.endswith(f"{flag} is for --dry-run: a start trains on the processes its "
                        "launcher starts (WORLD_SIZE)")
    assert not (tmp_path / "run").exists()


def test_a_dry_run_plans_the_model_states_of_its_nodes(capsys):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    from launch.commands.pretrain import DEMO_CONFIG
    from launch.config import load_config
    from pretrain.config import PretrainConfig
    from pretrain.estimate import largest_layer_params
    from pretrain.plan import meta_model

    # the full-size InternImage-B (the demo config shrinks it): ~0.2 GiB of states a GPU
    big = ["model.name=internimage_b", "model.channels=null", "model.depths=null",
           "model.groups=null", "data.image_size=64"]
    plan = _plan(capsys, ["--gpus", "10", "--gpus-per-node", "5", *big])
    assert plan["gpus"] == 10 and plan["gpus_per_node"] == 5
    model = meta_model(load_config(PretrainConfig, DEMO_CONFIG, big))
    params = sum(p.numel() for p in model.parameters())

    def states_gib(per_node: int, nodes: int) -> float:
        # DeepSpeed's estimator: it counts num_gpus_per_node x num_nodes GPUs
        _, gpu, _ = estimate_zero3_model_states_mem_needs(
            params, largest_layer_params(model), num_gpus_per_node=per_node,
            num_nodes=nodes, cpu_offload=False, cpu_offload_params=False, zero_init=True)
        return round(gpu / 2**30, 2)

    assert plan["memory_per_gpu_gib"]["model_states"] == states_gib(5, 2)
    assert states_gib(5, 2) > states_gib(8, 2)  # what 10 GPUs at 8 a node were planned as


def test_a_dry_runs_parameter_count_is_the_trained_models(capsys, tmp_path):
    """The plan counted one tag embedding (the demo trains 14: 832 parameters short; for a
    vocabulary of 10k tags at width 1024, ~10M); now it counts the vocabulary the trainer
    reads, and says so where the dry run cannot read it."""
    from launch.commands.pretrain import DEMO_CONFIG
    from launch.config import load_config
    from pretrain.config import PretrainConfig
    from pretrain.data.decode import TagVocab
    from pretrain.demo import resolve_builtin
    from pretrain.engine import build_model

    plan = _plan(capsys, [])
    # as the trainer builds it (ZeRO-2 here: no zero.Init, so no process group; the
    # parameters are the same)
    cfg = resolve_builtin(load_config(PretrainConfig, DEMO_CONFIG, ["engine.zero_stage=2"]))
    trained = build_model(cfg, len(TagVocab.load(cfg.data.tag_vocab)))
    assert plan["tag_vocabulary_size"] == len(TagVocab.load(cfg.data.tag_vocab)) == 14
    assert plan["total_parameters"] == sum(p.numel() for p in trained.parameters())
    unread = _plan(capsys, [f"data.tag_vocab={tmp_path / 'none.txt'}"])
    assert unread["tag_vocabulary_size"] == "unread: not counted"


def test_a_run_that_ends_inside_its_warm_up_is_warned_of(capsys):
    """The README's smoke test of the H preset (100 steps) trains inside the preset's
    10,000 warm-up steps, at <= 1% of optim.lr, and nothing said so; the full recipe, and
    a run as long as its warm-up, are not warned of."""
    from launch.cli import main
    from pretrain.engine import warmup_warning

    assert main(["pretrain", "--dry-run", "--config", H_PRESET, "--max-steps", "100",
                 "--gpus", "64"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["warmup_steps"] == 10_000
    assert ("internimage pretrain: warning: optim.warmup_steps=10000 exceeds the run's 100 "
            "steps: it ends inside its warm-up, at most 1.0% of optim.lr; set "
            "optim.warmup_steps lower for a short run") in err, err
    assert main(["pretrain", "--dry-run", "--config", H_PRESET, "--gpus", "64"]) == 0
    assert "warm-up" not in capsys.readouterr().err
    # a run exactly as long as its warm-up reaches optim.lr at its last step
    assert warmup_warning(100, 100) is None and warmup_warning(101, 100) is not None
