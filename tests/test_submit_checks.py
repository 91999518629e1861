"""`internimage submit` refuses on the login node what could only fail inside the job, and
keeps credentials out of everything a job writes, however they are spelled.

- Credentials given in any override spelling (a dotted key, a mapping at any depth) reach
  the job only through its environment: never the pickled job, `slurm_jobs.jsonl`, the
  dry-run output or the logs.
- `submit finetune` validates the task's config and `--init` before sbatch, as
  `submit pretrain` does, and runs in the output dir its config chooses (no --output-dir
  needed).
- A `--resume` the job would refuse (no checkpoint, a weights file, `auto` over a legacy
  last.pt) is refused before sbatch, with the job's own message.
- More tasks per node than GPUs is refused.
- srun ends the other tasks when one exits non-zero (--kill-on-bad-exit).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from launch.cli import build_parser, main
from launch.config import ConfigError
from launch.slurm.jobspec import credentials_to_env, job_spec
from runtime.redact import public_dict
from tests.pretrain_utils import REPO, TINY, env
from tests.test_secrets import AWS_ENV, KEY, SECRET, TOKEN, _fake_slurm, _leaks

# Every way an override can carry the credentials (the config loader reads the value of
# `key=value` as YAML, so a mapping is as good as a dotted key).
SPELLINGS = {
    "dotted keys": [f"data.s3.key={KEY}", f"data.s3.secret={SECRET}",
                    f"data.s3.token={TOKEN}"],
    "s3 mapping": [f"data.s3={{key: {KEY}, secret: '{SECRET}', token: {TOKEN}, retries: 7}}"],
    "data mapping": [f"data={{s3: {{key: {KEY}, secret: {SECRET}, token: {TOKEN}, "
                     "retries: 7}}"],
    "mixed": [f"data={{s3: {{token: {TOKEN}, retries: 7}}}}", f"data.s3.key={KEY}",
              f"data.s3={{secret: {SECRET}, token: {TOKEN}, retries: 7, key: {KEY}}}"],
    # a later mapping replaces an earlier dotted credential (as the config loader does)
    "replaced": ["data.s3.secret=EARLIERSECRETNEVERUSED",
                 f"data.s3={{key: {KEY}, secret: {SECRET}, token: {TOKEN}}}"],
}
JOBS = {"pretrain": ["pretrain"], "finetune": ["finetune", "classification"]}


def _load(argv: list[str]):
    """The config `internimage <argv>` runs with (the job's loader, not submit's)."""
    from launch.commands.finetune import task_entry
    from launch.commands.pretrain import load
    from launch.config import load_config

    args, extra = build_parser().parse_known_args(argv)
    args.overrides += extra
    if args.command == "pretrain":
        return load(args)
    overrides = [*args.overrides, f"run.output_dir={args.output_dir}"]
    return load_config(task_entry(args.task)[0], args.config, overrides)


@pytest.mark.parametrize("job", JOBS)
@pytest.mark.parametrize("spelling", SPELLINGS)
def test_credentials_in_any_spelling_travel_only_in_the_environment(job, spelling, tmp_path,
                                                                    monkeypatch, capsys):
    run_dir = tmp_path / "run"
    argv = [*JOBS[job], "--output-dir", str(run_dir), *SPELLINGS[spelling]]

    # what every task runs: the same config, but the credentials come from the environment
    spec = job_spec(argv, build_parser())
    # (the legacy token variable blanked: botocore would take a shell's before ours)
    assert spec.env == AWS_ENV | {"AWS_SECURITY_TOKEN": ""}
    given, in_job = _load(argv), _load(spec.argv)
    assert (given.data.s3.key, given.data.s3.secret, given.data.s3.token) == (KEY, SECRET, TOKEN)
    assert (in_job.data.s3.key, in_job.data.s3.secret, in_job.data.s3.token) == (None,) * 3
    assert public_dict(in_job) == public_dict(given)  # nothing else changed (retries too)
    if "retries: 7" in " ".join(SPELLINGS[spelling]):
        assert in_job.data.s3.retries == 7

    assert main(["submit", "--dry-run", *argv]) == 0
    out = capsys.readouterr()
    assert "# each task runs: internimage" in out.out
    for value in (KEY, SECRET, TOKEN, "EARLIERSECRETNEVERUSED"):
        assert value not in out.out and value not in out.err

    # a submission: the pickled job holds none; sbatch is given them (exported to the job)
    for name in AWS_ENV:  # set first so that monkeypatch restores them after `submit`
        monkeypatch.setenv(name, "unset")
    env_file = tmp_path / "sbatch_env.txt"
    _fake_slurm(tmp_path / "bin", env_file)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{Path(sys.executable).parent}:/usr/bin:/bin")
    logs = tmp_path / "logs"
    assert main(["submit", "--folder", str(logs), *argv]) == 0
    pickles = list(logs.rglob("*.pkl"))
    assert pickles and not _leaks(logs) and not (run_dir.exists() and _leaks(run_dir))
    assert not any(b"EARLIERSECRETNEVERUSED" in p.read_bytes() for p in pickles)
    sbatch_env = dict(line.split("=", 1) for line in env_file.read_text().splitlines()
                      if "=" in line)
    assert {k: sbatch_env.get(k) for k in AWS_ENV} == AWS_ENV


def test_an_override_that_would_not_parse_back_the_same_is_refused(monkeypatch):
    """The rewritten override is checked to mean what was given, credentials aside. YAML
    reads back what it writes, so this stands for a value a future loader or dumper could
    not reproduce: the job is refused, naming the variables to use, never run changed."""
    import yaml

    from pretrain.config import PretrainConfig
    from runtime.redact import secret_keys

    def lossy(value, **kw):  # drops the rest of the mapping
        return yaml.dump({k: v for k, v in value.items() if v is None}, **kw)

    monkeypatch.setattr("launch.slurm.jobspec.yaml.safe_dump", lossy)
    with pytest.raises(ConfigError) as err:
        credentials_to_env(["pretrain", f"data.s3={{secret: {SECRET}, retries: 7}}"],
                           secret_keys(PretrainConfig))
    message = str(err.value)
    assert "data.s3.secret (AWS_SECRET_ACCESS_KEY)" in message and "\n" not in message
    assert SECRET not in message


@pytest.mark.slow
def test_local_job_records_and_logs_hold_no_credentials_given_as_a_mapping(tmp_path, cache):
    """The same job through submitit's local executor: it runs, and its run directory
    (`slurm_jobs.jsonl`, config, checkpoints), its folder (pickles, logs) and what submit
    printed hold none of the credentials."""
    run_dir, logs = tmp_path / "run", tmp_path / "logs"
    proc = subprocess.run(
        [sys.executable, "-m", "launch.cli", "submit", "--local", "--folder",
         str(logs / "%j"), "pretrain", "--output-dir", str(run_dir), "--max-steps", "1",
         *TINY, *SPELLINGS["data mapping"]],
        env=env(cache), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    start, _ = [json.loads(x) for x in (run_dir / "slurm_jobs.jsonl").read_text().splitlines()]
    assert any(a.startswith("data={s3: {key: null, secret: null") for a in start["argv"])
    assert (run_dir / "checkpoints" / "latest").is_file()
    assert not _leaks(run_dir, logs)
    for value in (KEY, SECRET, TOKEN):
        assert value not in proc.stdout and value not in proc.stderr


# ------------------------------------------------------------- finetune before sbatch
@pytest.mark.parametrize("extra, message", [
    (["no_such.key=1"], "unknown key 'no_such'"),
    (["run.batch_size=notanint"], "run.batch_size: expected an integer, got 'notanint'"),
    (["--init", "/nonexistent/ckpt.pt"], "init: /nonexistent/ckpt.pt: not found; give"),
    (["init=/nonexistent/ckpt.pt"], "init: /nonexistent/ckpt.pt: not found; give"),
])
def test_finetune_config_and_init_are_checked_before_sbatch(extra, message, no_sbatch,
                                                           tmp_path, capsys):
    status = main(["submit", "--folder", str(tmp_path / "logs"), "finetune", "classification",
                   "--output-dir", str(tmp_path / "ft"), *extra])
    err = capsys.readouterr().err
    assert status == 2, err
    assert err.startswith("internimage submit: config error:") and message in err
    assert err.count("\n") == 1  # one line
    assert not no_sbatch.exists() and not (tmp_path / "logs").exists()


def test_finetune_init_is_not_needed_when_the_job_resumes_its_own_run(no_sbatch, tmp_path,
                                                                      capsys):
    """As `internimage finetune`: a run with its own checkpoint resumes from it and does
    not read --init (the pre-training step may be pruned since); a weights file is fine."""
    run_dir = tmp_path / "ft"
    step = run_dir / "checkpoints" / "step_0000004"
    step.mkdir(parents=True)
    (step / "mp_rank_00_model_states.pt").write_bytes(b"")
    (run_dir / "checkpoints" / "latest").write_text("step_0000004")
    assert main(["submit", "--dry-run", "finetune", "classification", "--output-dir",
                 str(run_dir), "--init", "/pruned/step_0000100"]) == 0
    weights = tmp_path / "backbone.safetensors"
    weights.write_bytes(b"")
    assert main(["submit", "--dry-run", "finetune", "classification", "--output-dir",
                 str(tmp_path / "fresh"), "--init", str(weights)]) == 0
    assert "# each task runs: internimage finetune" in capsys.readouterr().out


def test_finetune_init_of_another_backbone_is_refused_and_missing_data_warned_at_submit(
        no_sbatch, tmp_path, capsys):
    """What the job would refuse at its start: an --init recording another backbone is
    refused before sbatch; a dataset the login node does not see is only a warning (the
    compute nodes may see it, e.g. staged by the profile's setup), naming key and path."""
    import torch
    from safetensors.torch import save_file

    init = tmp_path / "internimage_s.safetensors"
    save_file({"patch_embed.conv1.weight": torch.zeros(1)}, str(init),
              metadata={"variant": "internimage_s"})
    status = main(["submit", "--folder", str(tmp_path / "logs"), "finetune", "classification",
                   "--output-dir", str(tmp_path / "ft"), "--init", str(init),
                   "data.kind=imagefolder", f"data.root={tmp_path / 'nowhere'}"])
    err = capsys.readouterr().err
    assert status == 2 and not no_sbatch.exists(), err
    assert err.startswith(f"internimage submit: config error: init: {init} holds an "
                          "internimage_s backbone but this run builds internimage_t")
    assert main(["submit", "--dry-run", "finetune", "classification", "--output-dir",
                 str(tmp_path / "ft"), "data.kind=imagefolder",
                 f"data.root={tmp_path / 'nowhere'}"]) == 0
    err = capsys.readouterr().err
    assert (f"internimage submit: warning: data.root: {tmp_path / 'nowhere'} not found "
            "(expected an image folder holding train/ and val/") in err
    assert "unless its nodes see it" in err


def test_a_data_path_the_login_node_cannot_look_into_is_a_warning_at_submit(
        monkeypatch, tmp_path, capsys):
    """A folder the login node may not read (stat raises PermissionError there, not on the
    compute nodes): a warning, as for a path it does not see, not a traceback."""
    import finetune.cls_data

    def unreadable(cfg, thorough=True):
        raise PermissionError(13, "Permission denied", "/datasets/imagenet/train")

    monkeypatch.setattr(finetune.cls_data, "check_data", unreadable)
    assert main(["submit", "--dry-run", "finetune", "classification", "--output-dir",
                 str(tmp_path / "ft")]) == 0
    err = capsys.readouterr().err
    assert "internimage submit: warning: [Errno 13] Permission denied: " in err
    assert "unless its nodes see it" in err


# --------------------------------------------------------------------- resources
def test_more_tasks_per_node_than_gpus_is_refused_naming_both(tmp_path, capsys):
    assert main(["submit", "--dry-run", "--nodes", "2", "--gpus-per-node", "4",
                 "--tasks-per-node", "8", "pretrain"]) == 2
    err = capsys.readouterr().err
    assert "tasks_per_node (8)" in err and "gpus_per_node (4)" in err
    profile = tmp_path / "p.yaml"
    profile.write_text("gpus_per_node: 2\ntasks_per_node: 4\n")
    assert main(["submit", "--profile", str(profile), "--dry-run", "pretrain"]) == 2
    assert "tasks_per_node (4)" in capsys.readouterr().err
    # fewer tasks than GPUs, and any number without GPUs, stay allowed
    assert main(["submit", "--dry-run", "--gpus-per-node", "8", "--tasks-per-node", "4",
                 "pretrain"]) == 0
    assert main(["submit", "--dry-run", "--tasks-per-node", "8", "pretrain"]) == 0


def _srun_line(script: str) -> str:
    [line] = [x for x in script.splitlines() if x.startswith("srun ")]
    return line


def test_srun_ends_every_task_when_one_fails(no_sbatch, tmp_path, capsys):
    assert main(["submit", "--dry-run", "pretrain"]) == 0
    assert "--kill-on-bad-exit=1" in _srun_line(capsys.readouterr().out)
    # the script submitit really hands to sbatch
    logs = tmp_path / "logs"
    assert main(["submit", "--folder", str(logs), "pretrain", "--output-dir",
                 str(tmp_path / "run")]) == 0
    [script] = logs.rglob("*_submission.sh")
    assert "--kill-on-bad-exit=1" in _srun_line(script.read_text())


def test_srun_asks_for_the_tasks_cpus_again(capsys):
    """Slurm 22.05 to 23.02: srun does not inherit sbatch's --cpus-per-task (22.05 release
    notes, "srun will no longer read in SLURM_CPUS_PER_TASK"): each task ran on one CPU
    while OMP_NUM_THREADS and the data workers counted on cpus_per_task."""
    assert main(["submit", "--dry-run", "--cpus-per-task", "12", "pretrain"]) == 0
    script = capsys.readouterr().out
    assert "#SBATCH --cpus-per-task=12" in script
    assert "--cpus-per-task=12" in _srun_line(script).split()


@pytest.mark.parametrize("local", [False, True])
def test_the_time_out_allowance_is_max_requeues_on_slurm_and_locally(local, tmp_path,
                                                                      monkeypatch):
    """submitit counts time-outs itself (``max_num_timeout``, default 3 for both of its
    executors) and refuses a requeue past it: it must be --max-requeues on SLURM and with
    --local alike (locally it stayed 3)."""
    from launch.slurm import executor as executor_module
    from launch.slurm.profile import ClusterProfile

    monkeypatch.setattr(executor_module, "slurm_available", lambda: True)
    profile = ClusterProfile(folder=str(tmp_path), max_requeues=7)
    executor = executor_module.make_executor(profile, tmp_path / "run", local=local)
    assert executor._executor.max_num_timeout == 7


# ------------------------------------------------------ run dir and resume before sbatch
TASKS = ("classification", "detection", "segmentation")


def _job_line(out: str) -> str:
    """The command line every task of a `submit --dry-run` runs."""
    [line] = [x for x in out.splitlines() if x.startswith("# each task runs: internimage ")]
    return line.removeprefix("# each task runs: internimage ")


@pytest.mark.parametrize("task", TASKS)
def test_finetune_runs_in_the_output_dir_its_config_chooses(task, tmp_path, monkeypatch,
                                                            capsys):
    """As `submit pretrain`: no --output-dir is needed; the job is pinned to the run dir
    its config sets (the --config YAML's, else the task's default), made absolute."""
    monkeypatch.chdir(tmp_path)  # the relative run dirs resolve here
    demo = REPO / "configs" / "finetune" / f"{task}_demo.yaml"  # sets runs/<task>_demo
    assert main(["submit", "--dry-run", "finetune", task, "--config", str(demo)]) == 0
    from_yaml = tmp_path / "runs" / f"{task}_demo"
    assert _job_line(capsys.readouterr().out).endswith(
        f"--output-dir {from_yaml} --resume auto")

    spec = job_spec(["finetune", task], build_parser())  # no output dir anywhere
    assert spec.run_dir == tmp_path / "runs" / task
    assert spec.argv == ["finetune", task, "--output-dir", str(tmp_path / "runs" / task),
                         "--resume", "auto"]


def _fake_checkpoint(run_dir: Path) -> Path:
    """``run_dir`` laid out as a run with one training checkpoint (what resolving a
    ``--resume`` looks at; nothing here is loaded)."""
    step = run_dir / "checkpoints" / "step_0000004"
    step.mkdir(parents=True)
    (step / "mp_rank_00_model_states.pt").write_bytes(b"")
    (run_dir / "checkpoints" / "latest").write_text("step_0000004")
    return step


@pytest.mark.parametrize("job", JOBS)
@pytest.mark.parametrize("resume, message", [
    ("/nonexistent/step_0000100", "--resume /nonexistent/step_0000100: not found; give"),
    ("WEIGHTS", "a weights file holds no optimizer, schedule or data state"),
])
def test_a_resume_the_job_would_refuse_is_refused_before_sbatch(job, resume, message,
                                                               no_sbatch, tmp_path, capsys):
    if resume == "WEIGHTS":
        weights = tmp_path / "backbone.safetensors"
        weights.write_bytes(b"")
        resume = str(weights)
    status = main(["submit", "--folder", str(tmp_path / "logs"), *JOBS[job], "--output-dir",
                   str(tmp_path / "run"), "--resume", resume])
    err = capsys.readouterr().err
    assert status == 2, err
    assert err.startswith("internimage submit: config error:") and message in err
    assert resume in err and err.count("\n") == 1  # one line, naming what was given
    # --init, for weights, only where the command has it: pretrain has none
    assert ("--init" in err) == (job == "finetune")
    assert not no_sbatch.exists() and not (tmp_path / "logs").exists()
    assert not (tmp_path / "run").exists()


def test_finetune_resume_auto_over_a_legacy_checkpoint_is_refused_before_sbatch(
        no_sbatch, tmp_path, capsys):
    """`--resume auto` (submit's default) where only a pre-DeepSpeed last.pt is: the job
    would refuse to start afresh over it, so submit does."""
    run_dir = tmp_path / "ft"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.pt").write_bytes(b"")
    status = main(["submit", "--folder", str(tmp_path / "logs"), "finetune", "classification",
                   "--output-dir", str(run_dir)])
    err = capsys.readouterr().err
    assert status == 2 and err.startswith("internimage submit: config error:"), err
    assert "last.pt" in err and err.count("\n") == 1
    assert not no_sbatch.exists()


@pytest.mark.parametrize("job", JOBS)
def test_resumes_the_job_would_accept_are_submitted(job, tmp_path):
    parser = build_parser()
    # a fresh run dir (new or empty): --resume auto starts afresh
    (tmp_path / "empty").mkdir()
    for fresh in (tmp_path / "new", tmp_path / "empty"):
        spec = job_spec([*JOBS[job], "--output-dir", str(fresh)], parser)
        assert spec.argv[-2:] == ["--resume", "auto"]
    # the run's own checkpoint, through auto
    own = tmp_path / "own"
    _fake_checkpoint(own)
    assert job_spec([*JOBS[job], "--output-dir", str(own)], parser).argv[-2:] == [
        "--resume", "auto"]
    # another run's checkpoint, given as its run dir or its step dir: kept as given
    other = tmp_path / "other"
    step = _fake_checkpoint(other)
    for given in (str(other), str(step)):
        spec = job_spec([*JOBS[job], "--output-dir", str(tmp_path / "next"), "--resume",
                         given], parser)
        assert spec.argv[-4:] == ["--resume", given, "--output-dir", str(tmp_path / "next")]


@pytest.mark.parametrize("job", list(JOBS))
def test_a_submission_over_an_existing_run_says_it_continues_it(job, tmp_path, monkeypatch,
                                                                capsys):
    """Submitting into a run directory that holds a checkpoint continues that run (the
    documented way to resume by hand), which two submissions of one preset without
    --output-dir share: submit says so before anything is submitted, naming the
    checkpoint; into a new directory it says nothing of the kind."""
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    assert main(["submit", "--dry-run", *JOBS[job], "--output-dir", str(run)]) == 0
    assert "holds a run" not in capsys.readouterr().err
    step = _fake_checkpoint(run)
    assert main(["submit", "--dry-run", *JOBS[job], "--output-dir", str(run)]) == 0
    err = capsys.readouterr().err
    assert f"{run} holds a run: the job continues it from {step.name}" in err


def _two_runs(tmp_path: Path) -> tuple[Path, Path, list[str]]:
    """Run A with checkpoints 4, 8, 12 (latest 12) and run B with checkpoint 4."""
    run_a = tmp_path / "runA"
    _fake_checkpoint(run_a)
    for step in ("step_0000008", "step_0000012"):
        (run_a / "checkpoints" / step).mkdir()
        (run_a / "checkpoints" / step / "mp_rank_00_model_states.pt").write_bytes(b"")
    (run_a / "checkpoints" / "latest").write_text("step_0000012")
    other = _fake_checkpoint(tmp_path / "runB")
    return run_a, other, sorted(p.name for p in (run_a / "checkpoints").iterdir())


@pytest.mark.parametrize("job", list(JOBS))
def test_another_runs_checkpoint_into_a_run_directory_is_refused(job, no_sbatch, tmp_path,
                                                                 capsys):
    """Run A in the output dir, --resume naming run B's checkpoint: the job's first save
    would become A's ``latest`` and pruning would delete all of A's checkpoints (README:
    a run is never overwritten). Before: submitted, with "A holds a run: the job continues
    it from step_0000004". Refused before sbatch, and A untouched."""
    run_a, other, before = _two_runs(tmp_path)
    status = main(["submit", "--folder", str(tmp_path / "logs"), *JOBS[job], "--output-dir",
                   str(run_a), "--resume", str(other)])
    err = capsys.readouterr().err
    assert status == 2, err
    assert "another run's checkpoint" in err and "step_0000012" in err, err
    assert not no_sbatch.exists()
    assert sorted(p.name for p in (run_a / "checkpoints").iterdir()) == before


def test_the_runtime_refuses_another_runs_checkpoint_and_allows_a_rewind(tmp_path):
    """The check every training start runs (pretrain.trainer, finetune.engine): this run's
    own checkpoints (auto, or a rewind) continue it; another run's checkpoint does not."""
    from runtime.checkpoint import ResumeError, refuse_fresh_start, resolve_resume

    run_a, other, _ = _two_runs(tmp_path)
    root = run_a / "checkpoints"
    for resume in ("auto", str(root / "step_0000008")):
        refuse_fresh_start(resolve_resume(resume, root, warn=False), root, run_a)
    for resume in (None, str(other)):
        with pytest.raises(ResumeError, match="already holds a run"):
            refuse_fresh_start(resolve_resume(resume, root, warn=False), root, run_a)
    # a new directory may start from another run's checkpoint
    fresh = tmp_path / "runC" / "checkpoints"
    refuse_fresh_start(resolve_resume(str(other), fresh, warn=False), fresh, fresh.parent)


@pytest.mark.parametrize("job", list(JOBS))
def test_submit_says_what_a_resume_does(job, tmp_path, capsys):
    """Into a new directory from another run: a new run (before: "holds a run", telling
    the user to change a directory that was fine); a rewind names what it deletes."""
    run_a, other, _ = _two_runs(tmp_path)
    new = tmp_path / "new"
    assert main(["submit", "--dry-run", *JOBS[job], "--output-dir", str(new), "--resume",
                 str(other)]) == 0
    err = capsys.readouterr().err
    assert f"{new}: the job starts a new run from {other}" in err and "holds a run" not in err
    assert main(["submit", "--dry-run", *JOBS[job], "--output-dir", str(run_a), "--resume",
                 str(run_a / "checkpoints" / "step_0000004")]) == 0
    err = capsys.readouterr().err
    assert "continues it from step_0000004" in err
    assert "step_0000008, step_0000012 deleted at the job's first save" in err


@pytest.mark.parametrize("export, refused", [
    ("NONE", True), ("AWS_ACCESS_KEY_ID", True), ("ALL", False),
    ("PATH,AWS_ACCESS_KEY_ID,AWS_SECRET_ACCESS_KEY,AWS_SESSION_TOKEN", False)])
@pytest.mark.parametrize("where", ["shell", "profile"])
def test_credentials_sbatch_would_not_export_are_refused(export, refused, where, no_sbatch,
                                                         tmp_path, monkeypatch, capsys):
    """Credentials given as overrides reach the job through the environment sbatch passes
    on (--export, default ALL). With --export=NONE (the profile's sbatch_extra, or the
    shell's SBATCH_EXPORT, which sbatch reads when the option is absent: sbatch(1)) or a
    list without them, the job started without them and failed at its first S3 read after
    its wait in the queue. Refused before sbatch, naming what would be missing."""
    from tests.test_secrets import AWS_ENV, CREDS

    for name in AWS_ENV:  # set first so that monkeypatch restores them after `submit`
        monkeypatch.setenv(name, "unset")
    extra = []
    if where == "shell":
        monkeypatch.setenv("SBATCH_EXPORT", export)
    else:
        monkeypatch.delenv("SBATCH_EXPORT", raising=False)
        profile = tmp_path / "profile.yaml"
        profile.write_text(f"sbatch_extra: {{export: '{export}'}}\n")
        extra = ["--profile", str(profile)]
    status = main(["submit", "--folder", str(tmp_path / "logs"), *extra, "pretrain",
                   "--output-dir", str(tmp_path / "run"), *CREDS])
    err = capsys.readouterr().err
    if refused:
        assert status == 2 and "AWS_SECRET_ACCESS_KEY" in err and "--export" in err, err
        assert not no_sbatch.exists() and SECRET not in err
    else:
        assert status == 0, err
        assert no_sbatch.exists()


def test_a_pretrain_resume_over_another_model_config_is_refused_before_sbatch(
        no_sbatch, tmp_path, capsys):
    """A changed model config over an existing run: the job's start refuses the resume
    (pretrain.trainer: check_compatible's model hash) and the exit trap requeued it twice
    more. submit runs the same check first, naming the hashes; the run's own config still
    goes through."""
    import json

    from pretrain.data.decode import TagVocab
    from pretrain.engine import model_hash
    from runtime.checkpoint import engine_layout

    run_dir, vocab = tmp_path / "run", tmp_path / "tags.txt"
    vocab.write_text("cat\ndog\nbird\n")
    job = ["pretrain", "--output-dir", str(run_dir), f"data.tag_vocab={vocab}"]
    step = _fake_checkpoint(run_dir)
    cfg = _load(job)
    saved = model_hash(cfg, len(TagVocab.load(cfg.data.tag_vocab)))
    (step / "trainer_state.json").write_text(json.dumps({
        "step": 4, "world_size": 8, "model_hash": saved, "samples_seen": {},
        "engine": engine_layout(cfg.engine.zero_stage, cfg.engine.precision)}))
    # the run's own config, on another node count: accepted (pre-training re-deals)
    spec = job_spec(job, build_parser(), world_size=2)
    assert spec.argv[-2:] == ["--resume", "auto"]
    status = main(["submit", "--folder", str(tmp_path / "logs"), *job,
                   f"model.embed_dim={cfg.model.embed_dim * 2}"])
    err = capsys.readouterr().err
    assert status == 2 and err.startswith("internimage submit: config error:"), err
    assert "was saved for a different model/text-tower config" in err and saved in err
    assert err.count("\n") == 1 and not no_sbatch.exists()


@pytest.mark.parametrize("given, blanked", [
    ([f"data.s3.key={KEY}", f"data.s3.secret={SECRET}"], True),
    ([f"data.s3.key={KEY}", f"data.s3.secret={SECRET}", f"data.s3.token={TOKEN}"], False),
    ([], False),  # no credential given: the shell's own (a whole session) stays the job's
])
def test_a_key_given_without_a_token_does_not_pair_with_the_shells_session_token(
        given, blanked):
    """Run by hand, data.s3.key/secret without a token reach s3fs alone (token None). In
    the job they come from the environment, where botocore's EnvProvider pairs them with
    the first non-empty AWS_SECURITY_TOKEN / AWS_SESSION_TOKEN, e.g. the SSO session the
    submitting shell exported: the store refused the pair after the queue wait. The job's
    environment blanks both (botocore reads an empty one as none)."""
    spec = job_spec(["pretrain", "--output-dir", "/tmp/x", *given], build_parser())
    tokens = {k: v for k, v in spec.env.items() if k in ("AWS_SESSION_TOKEN",
                                                          "AWS_SECURITY_TOKEN")}
    if blanked:
        assert tokens == {"AWS_SESSION_TOKEN": "", "AWS_SECURITY_TOKEN": ""}
    elif given:  # botocore takes AWS_SECURITY_TOKEN first: a shell's would win over ours
        assert tokens == {"AWS_SESSION_TOKEN": TOKEN, "AWS_SECURITY_TOKEN": ""}
    else:
        assert spec.env == {}


def test_credentials_split_between_the_config_file_and_overrides_are_refused(tmp_path):
    """The overrides' credentials travel in the environment, the file's stay in the job's
    config: s3fs then got a token without its key (botocore ignores it) or a key without
    its secret, and the job failed after the queue wait where the command worked by hand.
    Refused in one line that shows no value; all one way is accepted."""
    import yaml

    from tests.test_secrets import DEMO

    base = ["pretrain", "--config", str(DEMO), "--output-dir", str(tmp_path / "r")]
    with_token = tmp_path / "with_token.yaml"  # a session token in the file
    tree = yaml.safe_load(DEMO.read_text())
    tree.setdefault("data", {}).setdefault("s3", {})["token"] = TOKEN
    with_token.write_text(yaml.safe_dump(tree))
    split = ["pretrain", "--config", str(with_token), "--output-dir", str(tmp_path / "r"),
             f"data.s3.key={KEY}", f"data.s3.secret={SECRET}"]
    with pytest.raises(ConfigError, match="data.s3.token comes from the --config file") as err:
        job_spec(split, build_parser())
    assert TOKEN not in str(err.value) and KEY not in str(err.value)
    job_spec([*base, f"data.s3.key={KEY}", f"data.s3.secret={SECRET}"], build_parser())
    job_spec(["pretrain", "--config", str(with_token), "--output-dir", str(tmp_path / "r")],
             build_parser())
