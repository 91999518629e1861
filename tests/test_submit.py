"""`internimage submit` without a scheduler: dry-run scripts, profiles, the clear message
where SLURM is missing, and the same job through submitit's local executor."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch.cli import main
from launch.config import ConfigError
from launch.slurm.environment import TaskInfo, record
from launch.slurm.job import own_checkpoint, resume_argv, same_checkpoint
from launch.slurm.profile import load_profile, parse_mem_gb
from tests.pretrain_utils import REPO, TINY, env, latest, losses


def test_dry_run_prints_the_resources_and_the_sbatch_script(capsys, tmp_path):
    status = main(["submit", "--dry-run", "--nodes", "4", "--gpus-per-node", "8",
                   "--cpus-per-task", "12", "--mem", "480G", "--partition", "gpu",
                   "--time", "2880", "--account", "vision", "--qos", "high",
                   "--constraint", "a100", "--exclude", "node[07-08]", "--job-name", "h-m3i",
                   "--folder", str(tmp_path / "%j"), "--max-requeues", "7",
                   "pretrain", "--output-dir", str(tmp_path / "run"), "optim.lr=1e-4"])
    out = capsys.readouterr().out
    assert status == 0
    for line in ("nodes: 4", "tasks_per_node: 8", "gpus_per_node: 8", "world_size: 32",
                 "partition: gpu", "time_min: 2880", "account: vision", "max_requeues: 7"):
        assert line in out, line
    for flag in ("--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=12",
                 "--mem=480GB", "--partition=gpu", "--time=2880", "--account=vision",
                 "--qos=high", "--constraint=a100", "--exclude='node[07-08]'",
                 "--job-name=h-m3i", "--signal=USR2@", f"--output={tmp_path}/%j/%j_0_log.out"):
        assert f"#SBATCH {flag}" in out, flag
    assert "srun" in out and "submitit.core._submit" in out
    # what every task runs: the same command line, pinned to its run dir, resuming
    assert f"pretrain --output-dir {tmp_path / 'run'} optim.lr=1e-4" not in out
    assert f"optim.lr=1e-4 --output-dir {tmp_path / 'run'} --resume auto" in out
    assert not list(tmp_path.iterdir())  # nothing submitted, nothing written


def test_tasks_default_to_one_per_gpu_or_one(capsys):
    main(["submit", "--dry-run", "--gpus-per-node", "4", "pretrain"])
    assert "#SBATCH --ntasks-per-node=4" in capsys.readouterr().out
    main(["submit", "--dry-run", "pretrain"])
    assert "#SBATCH --ntasks-per-node=1" in capsys.readouterr().out


def test_profiles_load_validate_and_yield_to_flags(tmp_path, capsys):
    gpu = load_profile("example_gpu_cluster", {})
    assert gpu.gpus_per_node == 8 and gpu.tasks == 8 and gpu.save_timeout_s < gpu.signal_delay_s
    assert load_profile("local_cpu", {"nodes": 2}).nodes == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("gpus: 8\n")
    assert main(["submit", "--profile", str(bad), "--dry-run", "pretrain"]) == 2
    assert "unknown key 'gpus'" in capsys.readouterr().err
    bad.write_text("signal_delay_s: 60\nsave_timeout_s: 90\n")
    with pytest.raises(ConfigError, match="save_timeout_s"):
        load_profile(str(bad), {})
    with pytest.raises(ConfigError, match="nodes"):
        load_profile(None, {"nodes": 0})
    assert load_profile(None, {}).result_grace_s == 15.0  # submitit's allowance
    assert load_profile("local_cpu", {}).result_grace_s == 2.0
    for grace in ("-1", ".inf", ".nan"):
        bad.write_text(f"result_grace_s: {grace}\n")
        with pytest.raises(ConfigError, match="result_grace_s"):
            load_profile(str(bad), {})
    with pytest.raises(ConfigError, match="profile not found"):
        load_profile("no_such_cluster", {})
    assert parse_mem_gb("512M") == 0.5 and parse_mem_gb("64G") == 64 and parse_mem_gb("2") == 2


def test_bad_jobs_fail_before_submission(capsys):
    assert main(["submit", "--dry-run", "convert", "a", "b"]) == 2
    assert "must be one of ['pretrain', 'finetune']" in capsys.readouterr().err
    assert main(["submit", "--dry-run", "pretrain", "optim.lrr=1"]) == 2
    assert "unknown key 'optim.lrr'" in capsys.readouterr().err


def _publish(run_dir: Path, tag: str) -> None:
    """Save ``tag`` and point the run's ``latest`` at it as runtime/checkpoint.py does:
    ``trainer_state.json`` with rank 0's clock (``saved_at``), then a new ``latest``
    renamed over the old one."""
    ckpts = run_dir / "checkpoints"
    (ckpts / tag).mkdir(parents=True, exist_ok=True)
    (ckpts / tag / "trainer_state.json").write_text(json.dumps({"saved_at": time.time()}))
    (ckpts / "latest.tmp").write_text(tag)
    os.replace(ckpts / "latest.tmp", ckpts / "latest")


def _first_start(run_dir: Path, job_id: str) -> None:
    """What rank 0 records at the job's first start (launch/slurm/job.py __call__)."""
    info = TaskInfo(job_id, 0, 0, 2, "node1", "slurm")
    record(run_dir, "start", info, requeue=0, timeouts=0, argv=[],
           checkpoint=own_checkpoint(run_dir))


def test_requeued_runs_resume_from_their_own_checkpoint(tmp_path):
    argv = ["pretrain", "--resume", "/elsewhere/step_0000100", "--max-steps", "9"]
    auto = ["pretrain", "--max-steps", "9", "--resume", "auto"]
    _first_start(tmp_path, "11")
    # no checkpoint of its own yet: keep starting from the given one
    assert resume_argv(argv, tmp_path, "11") == argv
    _publish(tmp_path, "step_0000004")
    assert resume_argv(argv, tmp_path, "11") == auto
    # a run started before the start records named the checkpoint: any is its own
    assert resume_argv(argv, tmp_path, "12") == auto
    assert resume_argv(["pretrain"], tmp_path, "11") == ["pretrain", "--resume", "auto"]


def test_a_rewound_job_restarted_before_its_first_save_stays_rewound(tmp_path):
    """Rewinding a run (``--resume RUN/checkpoints/step_0000500`` while ``latest`` names
    step_0001000) and being restarted by SLURM (node failure, ``scontrol requeue``) before
    the rewound branch saved: the restart must resume the rewind, not the abandoned
    step_0001000 that ``--resume auto`` resolves to; once the job has saved, its own."""
    _publish(tmp_path, "step_0000500")
    _publish(tmp_path, "step_0001000")
    rewind = ["pretrain", "--resume", str(tmp_path / "checkpoints" / "step_0000500")]
    _first_start(tmp_path, "21")
    assert resume_argv(rewind, tmp_path, "21") == rewind
    # the rewound branch saves the very tag it abandoned: still a save of this job
    _publish(tmp_path, "step_0001000")
    assert resume_argv(rewind, tmp_path, "21") == ["pretrain", "--resume", "auto"]


def test_the_same_checkpoint_seen_through_another_mount_is_the_same(tmp_path):
    """Every task tells whether its job saved (resume_argv), each on its own node, and a
    requeued job's exit trap may run on another node: a FUSE mount of object storage may
    number the same file with another inode and give it another mtime there. The save is
    told by the tag ``latest`` names and the ``saved_at`` its state holds."""
    _publish(tmp_path, "step_0000500")
    rewind = ["pretrain", "--resume", str(tmp_path / "checkpoints" / "step_0000500")]
    _first_start(tmp_path, "31")
    latest = tmp_path / "checkpoints" / "latest"
    before, key = latest.stat(), own_checkpoint(tmp_path)
    shutil.copy2(latest, latest.with_name("latest.copy"))  # another inode
    os.replace(latest.with_name("latest.copy"), latest)
    os.utime(latest, ns=(before.st_mtime_ns + 7_000_000_000,) * 2)  # another mtime
    assert latest.stat().st_ino != before.st_ino
    assert same_checkpoint(key, own_checkpoint(tmp_path))
    assert resume_argv(rewind, tmp_path, "31") == rewind


def test_a_re_save_of_the_same_tag_within_one_clock_tick_is_a_new_save(tmp_path):
    _publish(tmp_path, "step_0001000")
    first = own_checkpoint(tmp_path)
    mtime = (tmp_path / "checkpoints" / "latest").stat().st_mtime_ns
    _publish(tmp_path, "step_0001000")
    os.utime(tmp_path / "checkpoints" / "latest", ns=(mtime, mtime))  # the same mtime
    assert not same_checkpoint(first, own_checkpoint(tmp_path))


def test_saves_through_the_real_publish_are_told_apart_and_named_alike_everywhere(
        tmp_path):
    """runtime.checkpoint.save_checkpoint's own publish (an engine stand-in writing
    DeepSpeed's one file): a re-save of the same step (a rewound run reaching its old tag,
    swapped in under a staging name) is a new save; the key is the same read again."""
    from runtime.checkpoint import save_checkpoint, wait_for_deletions
    from runtime.dist import DistInfo
    from tests.test_best_checkpoint import Engine

    root = tmp_path / "checkpoints"
    keys = []
    for step in (4, 6, 6):
        save_checkpoint(Engine(), root, step, {}, {"step": step}, DistInfo(), keep_last=2)
        wait_for_deletions(timeout=60)
        keys.append(own_checkpoint(tmp_path))
        assert same_checkpoint(keys[-1], own_checkpoint(tmp_path))
    assert [k[0] for k in keys] == ["step_0000004", "step_0000006", "step_0000006"]
    assert not any(same_checkpoint(a, b) for a, b in zip(keys, keys[1:]))


def test_a_checkpoint_without_saved_at_is_told_by_the_mtime_of_latest(tmp_path):
    _publish(tmp_path, "step_0000002")
    (tmp_path / "checkpoints" / "step_0000002" / "trainer_state.json").write_text("{}")
    first = own_checkpoint(tmp_path)
    assert first[1] == first[2] == (tmp_path / "checkpoints" / "latest").stat().st_mtime_ns
    later = first[2] + 1_000_000_000
    os.utime(tmp_path / "checkpoints" / "latest", ns=(later, later))
    assert not same_checkpoint(first, own_checkpoint(tmp_path))
    # and an earlier version's start record, [inode, mtime_ns], by its mtime
    assert same_checkpoint([12345, later], own_checkpoint(tmp_path))


def test_without_slurm_submit_says_so_and_suggests_local(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch, no srun
    assert main(["submit", "pretrain", "--output-dir", str(tmp_path / "run")]) == 3
    err = capsys.readouterr().err
    assert "SLURM is not installed" in err and "sbatch" in err and "--local" in err
    assert not (tmp_path / "run").exists()


def _forgotten_job_scontrol(bin_dir, asked):
    """`scontrol` answering as SLURM does for a job it no longer holds (purged, or never
    had), having first touched ``asked``: the job is over from the first question on."""
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f"#!/bin/sh\n[ -e '{asked}' ] || touch '{asked}'\n"
                        "echo 'slurm_load_jobs error: Invalid job id specified' >&2\nexit 1\n")
    scontrol.chmod(0o755)


@pytest.mark.parametrize("late", [False, True])
def test_submit_wait_gives_result_files_the_profiles_grace(late, no_sbatch, tmp_path,
                                                           capsys):
    """`submit --wait` on a job SLURM says is over: a result file that arrives within the
    profile's result_grace_s is read (the job completed); a missing one is reported as a
    task killed without a result once that grace has passed, not before, and not only
    after the 15 s default."""
    import threading
    import time

    import submitit
    from submitit.core.utils import cloudpickle_dump

    asked = tmp_path / "scontrol_asked"
    _forgotten_job_scontrol(no_sbatch.parent / "bin", asked)
    grace = 3.0 if late else 1.0
    profile = tmp_path / "cluster.yaml"
    profile.write_text(f"result_grace_s: {grace}\n")
    logs = tmp_path / "logs"
    result = submitit.SlurmJob(folder=logs / "4242", job_id="4242",
                               tasks=(0,)).task(0).paths.result_pickle

    def write_late() -> None:  # 0.5 s after the wait first asked SLURM: within the grace
        deadline = time.time() + 60
        while not asked.exists() and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        cloudpickle_dump(("success", None), result)  # as submitit's task writes it

    writer = threading.Thread(target=write_late, daemon=True)
    if late:
        writer.start()
    status = main(["submit", "--profile", str(profile), "--folder", str(logs / "%j"),
                   "--wait", "pretrain", "--output-dir", str(tmp_path / "run")])
    returned = time.time()
    err = capsys.readouterr().err
    assert no_sbatch.exists()
    if late:
        writer.join(timeout=60)
        assert status == 0 and "job 4242 completed" in err, err
        return
    waited = returned - asked.stat().st_mtime
    assert status == 1, err
    assert "job 4242 is no longer known to SLURM" in err
    assert "task 0: killed without writing a result" in err
    assert grace <= waited < 10, waited


@pytest.mark.distributed
def test_local_executor_runs_the_same_two_task_job(tmp_path, cache):
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "launch.cli", "submit", "--local", "--tasks-per-node", "2",
         "--folder", str(tmp_path / "logs" / "%j"), "pretrain", "--output-dir", str(run_dir),
         "--max-steps", "3", *TINY],
        env=env(cache), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    job_id = proc.stdout.strip().splitlines()[-1]
    assert sorted(losses(run_dir)) == [1, 2, 3] and latest(run_dir) == "step_0000003"
    start, ended = [json.loads(x) for x in
                    (run_dir / "slurm_jobs.jsonl").read_text().splitlines()]
    assert start["cluster"] == "local" and start["job_id"] == job_id
    # how rank 0's command ended, for the batch script's exit trap (after_exit.py)
    assert (ended["event"], ended["status"], ended["refused"]) == ("ended", 0, False)
    assert start["world_size"] == 2
    assert (tmp_path / "logs" / job_id / f"{job_id}_1_log.err").is_file()


def test_local_tasks_agree_on_the_restart_count_whichever_reads_first(tmp_path):
    # submitit's local executor starts every task of a job again under the same job id and
    # exports no restart counter (submitit/local/local.py, the controller's run loop); rank 0
    # appends the job's start record. A task that looked only after that append used to
    # count one restart more than rank 0: it alone ran with --resume auto and took its
    # store for one that had served it.
    from launch.slurm.environment import TaskInfo, record, restart_count

    tasks = [TaskInfo("4242", rank, rank, 2, "127.0.0.1:29500", "local") for rank in (0, 1)]
    first = [restart_count(tmp_path, tasks[0])]
    record(tmp_path, "start", tasks[0])
    first.append(restart_count(tmp_path, tasks[1]))
    assert first == [0, 0]
    again = [restart_count(tmp_path, tasks[1]), restart_count(tmp_path, tasks[0])]
    record(tmp_path, "start", tasks[0])
    assert again == [1, 1]  # the second start of the same job, in either order
    other = TaskInfo("4343", 1, 1, 2, "127.0.0.1:29500", "local")
    assert restart_count(tmp_path, other) == 0  # another job of the run starts afresh
