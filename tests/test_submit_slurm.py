"""`internimage submit` against a real single-node SLURM (munged, slurmctld, slurmd).

2-task CPU pre-training jobs (gloo ranks, the demo shrunk by TINY): a job that completes,
a job requeued by `scontrol requeue` mid-run whose tasks wrote error results (waited
through, not reported) and which ends with the same losses as the undisturbed one, and a
job whose tasks are killed (SIGKILL) without writing a result, which `--wait` must report
instead of waiting forever. A 2-task fine-tuning job (classification demo) sent USR2
(what SLURM sends before the time limit or on a preemption) saves at the next step, is
requeued by submitit and ends with the metrics of an undisturbed one. (Pre-training and
fine-tuning stop on a signal through the same loop, runtime/loop.py:
tests/test_runtime_loop_stop.py; one job type here is enough.) A job one of whose tasks
is SIGKILLed is requeued by its batch script's exit trap and ends as the undisturbed
one; a task that fails ends the whole job within seconds (srun --kill-on-bad-exit: the
other task would wait for its rendezvous until torch's timeout, holding the allocation).

One cluster, one file: the file's jobs run one after another on one xdist worker (a job
run beside another cluster's job took 3x as long).

The USR2 test sends the signal themselves (`scancel --signal=USR2`, to every task of the
job) once the job has logged a step, with a time limit far away: a signal timed by a short
limit (sbatch --signal=USR2@delay) races the save and requeue against that limit on a busy
machine, and SLURM may send it up to a minute early (sbatch(1), --signal).

SLURM holds a requeued batch job for about two minutes before it may start again
(EligibleTime); the tests skip that wait with `scontrol update StartTime=now`.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import submitit
from submitit.core.utils import pickle_load

from launch.slurm.wait import failure, wait_for
from tests.pretrain_utils import REPO, TINY, env, latest, losses, run_forked
from tests.slurm_cluster import SlurmCluster, running_cluster

pytestmark = [pytest.mark.slurm, pytest.mark.distributed]

# data.workers=1: the requeue test needs a loader worker for its SIGTERM to kill
STEPS = ["--max-steps", "10", "--checkpoint-every", "2", "data.workers=1"]


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    yield from running_cluster(tmp_path_factory)


def submit_cmd(folder: Path, run_dir: Path, *options: str, job: tuple[str, ...] = ()) -> list[str]:
    # the shipped profile of a one-machine cluster (its result_grace_s of 2 s: a task
    # killed without a result is reported 2 s after the job's end, not submitit's 15 s)
    return [sys.executable, "-m", "launch.cli", "submit", "--profile", "local_cpu",
            "--tasks-per-node", "2", "--cpus-per-task", "1", "--folder", str(folder / "%j"),
            *options,
            "pretrain", "--output-dir", str(run_dir), *TINY, *job]


def job_env(cluster: SlurmCluster, cache: Path) -> dict[str, str]:
    return env(cache) | {"SLURM_CONF": cluster.env["SLURM_CONF"], "PATH": cluster.env["PATH"]}


def records(run_dir: Path) -> list[dict]:
    path = run_dir / "slurm_jobs.jsonl"
    if not path.is_file():
        return []
    return [json.loads(x) for x in path.read_text().splitlines()]


def first_job_id(run_dir: Path, timeout: float = 120) -> str:
    """The job id, as soon as the job's rank 0 has recorded its start in the run dir."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        starts = [r for r in records(run_dir) if r["event"] == "start"]
        if starts:
            return starts[0]["job_id"]
        time.sleep(0.2)
    raise AssertionError(f"no job start recorded in {run_dir}")


def release(cluster: SlurmCluster, job_id: str, *updates: str) -> None:
    """Once requeued and pending, and once the node has cleaned up after its previous run,
    let the job start now (and apply ``updates``).

    Not within the second of the requeue: the requeue revokes the job's credential on the
    node, and slurmd refuses a launch whose credential is not newer than the revocation,
    compared in whole seconds ("Killing non-startable batch JobId=...: Job credential
    revoked", the job then FAILED: seen once, the trap's requeue at 17:22:27.456 released
    at .630 and started at .743). SLURM's own hold on a requeued job (about two minutes)
    never meets that."""
    cluster.wait_job(job_id, lambda j: int(j.get("Restarts", "0")) >= 1
                     and j.get("JobState") == "PENDING", 90, "the requeue")
    cluster.wait_node_idle(60)
    time.sleep(2.0)
    cluster.cmd("scontrol", "update", f"JobId={job_id}", "StartTime=now", *updates)


def finish(proc: subprocess.Popen, timeout: float, cluster: SlurmCluster | None = None,
           job_id: str | None = None) -> tuple[str, str]:
    """submit --wait's output, once it returned 0; on a failure, the job's state in SLURM
    and the daemons' logs too (what a rare failure needs to be told apart)."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(
            f"submit --wait did not return in {timeout}s:\n{err[-3000:]}") from None
    # the head too: submit's failure message starts with the SLURM state the wait ended on
    shown = err if len(err) <= 5000 else f"{err[:1500]}\n[...]\n{err[-3500:]}"
    if proc.returncode != 0 and cluster is not None:
        if job_id is not None:
            shown += f"\n--- scontrol show job {job_id}\n{cluster.job(job_id)}"
        shown += f"\n{cluster.logs_tail(80)}"
    assert proc.returncode == 0, f"submit --wait failed ({proc.returncode}):\n{shown}"
    return out, err


@pytest.fixture(scope="module")
def undisturbed(cluster, cache, tmp_path_factory):
    """A 2-task job of 10 steps, submitted with --wait and left alone."""
    root = tmp_path_factory.mktemp("undisturbed")
    run_dir = root / "run"
    proc = subprocess.run(submit_cmd(root / "logs", run_dir, "--wait", job=tuple(STEPS)),
                          env=job_env(cluster, cache), cwd=REPO, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root, run_dir, proc.stdout.strip().splitlines()[-1]


def test_two_task_job_completes_with_metrics_checkpoints_and_job_record(undisturbed, cluster):
    root, run_dir, job_id = undisturbed
    assert job_id.isdigit()  # the job id is the last line printed
    assert cluster.job(job_id)["JobState"] == "COMPLETED"
    assert sorted(losses(run_dir)) == list(range(1, 11))
    assert latest(run_dir) == "step_0000010"
    state = json.loads((run_dir / "checkpoints/step_0000010/trainer_state.json").read_text())
    assert state["world_size"] == 2
    start, ended = records(run_dir)
    assert start["event"] == "start" and start["job_id"] == job_id
    assert (ended["event"], ended["status"], ended["refused"]) == ("ended", 0, False)
    assert start["requeue"] == 0 and start["world_size"] == 2 and start["cluster"] == "slurm"
    # submitit's per-job, per-task logs under the job folder
    logs = root / "logs" / job_id
    for task in (0, 1):
        assert (logs / f"{job_id}_{task}_log.out").is_file()
        assert (logs / f"{job_id}_{task}_log.err").is_file()
    assert "task 1/2" in (logs / f"{job_id}_1_log.err").read_text()


# The requeue tests: its exit grace, short so that the job pending after its requeue
# outlasts it in seconds (the waiter's default is EXIT_GRACE_S, a minute)
REQUEUE_EXIT_GRACE_S = 15.0


def wait_for_mid_run_checkpoint(run_dir: Path, timeout: float = 120) -> None:
    """Until the 10-step job (STEPS: a checkpoint every 2 steps) has published its step 4
    or step 6 checkpoint: mid-run, with steps left to resume."""
    deadline = time.time() + timeout
    while latest(run_dir) not in ("step_0000004", "step_0000006") and time.time() < deadline:
        time.sleep(0.05)
    assert latest(run_dir) in ("step_0000004", "step_0000006"), latest(run_dir)


def test_scontrol_requeue_mid_run_is_waited_through_and_resumes_with_identical_losses(
        undisturbed, cluster, cache, tmp_path):
    """`scontrol requeue` mid-run (SIGTERM, then SIGKILL: no time to save; likewise a
    preemption with PreemptMode=REQUEUE or a node failure): the job restarts under the same
    id from its last checkpoint and ends with the undisturbed job's losses. With
    --max-requeues 0 too: a restart by SLURM is no time-out and is not limited.

    The SIGTERM kills the data-loader worker (data.workers=1), the training raises and
    submitit writes an ("error", ...) result for every task before SLURM requeues the job.
    Those results are the requeued run's, not the job's: the wait (launch.slurm.wait, as
    `submit --wait` calls it; here in a thread with a short exit grace, which an earlier
    wait gave up after, returning PENDING) must go on through the requeue and report how
    the restarted run ends."""
    logs, run_dir = tmp_path / "logs", tmp_path / "run"
    proc = subprocess.run(submit_cmd(logs, run_dir, "--max-requeues", "0", job=tuple(STEPS)),
                          env=job_env(cluster, cache), cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    job_id = proc.stdout.strip().splitlines()[-1]
    job = submitit.SlurmJob(folder=logs / job_id, job_id=job_id, tasks=(0, 1))
    waited: dict = {}

    def wait() -> None:
        waited["state"] = wait_for(job, poll_s=0.5, exit_grace_s=REQUEUE_EXIT_GRACE_S)

    waiter = threading.Thread(target=wait, daemon=True)
    waiter.start()
    try:
        assert first_job_id(run_dir) == job_id
        wait_for_mid_run_checkpoint(run_dir)
        cluster.cmd("scontrol", "requeue", job_id)
        requeued = time.time()
        cluster.wait_job(job_id, lambda j: int(j.get("Restarts", "0")) >= 1
                         and j.get("JobState") == "PENDING", 90, "the requeue")
        for task in (0, 1):  # the case at hand: every task of the requeued run wrote an error
            assert pickle_load(job.task(task).paths.result_pickle)[0] == "error"
        time.sleep(max(0.0, requeued + REQUEUE_EXIT_GRACE_S + 2 - time.time()))
        assert waiter.is_alive(), f"the wait returned during the requeue: {waited}"
        release(cluster, job_id)
        waiter.join(timeout=240)
        assert not waiter.is_alive(), "the wait did not end with the restarted job"
    finally:
        cluster.cmd("scancel", job_id, check=False)
    assert waited["state"] == "COMPLETED" and failure(job, waited["state"]) is None
    assert cluster.job(job_id)["JobState"] == "COMPLETED"
    starts = [r for r in records(run_dir) if r["event"] == "start"]
    assert [(r["job_id"], r["requeue"], r["timeouts"]) for r in starts] == [
        (job_id, 0, 0), (job_id, 1, 0)]
    resumed, reference = losses(run_dir), losses(undisturbed[1])
    assert sorted(resumed) == list(range(1, 11))
    for step in range(1, 11):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-6, abs=1e-7), step
    assert latest(run_dir) == "step_0000010"


def signal_after_first_step(cluster: SlurmCluster, run_dir: Path, timeout: float = 180) -> str:
    """Once the job has logged a training step, send USR2 to its tasks; the job id."""
    job_id = first_job_id(run_dir)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + timeout
    while not (metrics.is_file() and '"loss"' in metrics.read_text()):
        assert time.time() < deadline, f"job {job_id} logged no step in {timeout}s"
        time.sleep(0.1)
    # scancel(1): with --signal and without --batch/--full the job's steps (the tasks of
    # submitit's srun) are signalled, as SLURM's time-limit --signal does
    cluster.cmd("scancel", "--signal=USR2", job_id)
    return job_id


def latest_before_requeue(log: Path) -> str:
    """The step the requeued run resumed from (the trainer logs 'resumed from ... at step N')."""
    for line in log.read_text().splitlines():
        if "resumed from" in line and "at step" in line:
            return line.rsplit("at step", 1)[1].strip()
    raise AssertionError(f"no resume in {log}")


def task_pids(cluster: SlurmCluster, job_id: str, tasks: int, timeout: float = 60) -> list[int]:
    """The pids of the job's task processes (step 0) from `scontrol listpids` (scontrol(1):
    the processes of every step of the job on this node). It prints the columns PID JOBID
    STEPID LOCALID GLOBALID, with a LOCALID on a task's own process, "-" on others."""
    deadline = time.time() + timeout
    pids: list[int] = []
    while time.time() < deadline:
        out = cluster.cmd("scontrol", "listpids", job_id, check=False)
        rows = [line.split() for line in out.splitlines()[1:]]
        pids = [int(r[0]) for r in rows if len(r) == 5 and r[2] == "0" and r[3] != "-"]
        if len(pids) == tasks:
            return pids
        time.sleep(0.2)
    raise AssertionError(f"job {job_id}: {tasks} task pids not listed, got {pids}")


def test_wait_reports_tasks_killed_without_a_result_within_a_bound(cluster, cache, tmp_path):
    """kill -9 both tasks of a running 2-task job (as the OOM killer would): no task writes
    a result and SLURM has no accounting here (no sacct), yet `submit --wait` must return
    soon with a non-zero exit naming the job, its final state and the log tail."""
    run_dir = tmp_path / "run"
    # --failure-requeues 0: the exit trap would requeue the job (the next test)
    cmd = submit_cmd(tmp_path / "logs", run_dir, "--wait", "--failure-requeues", "0",
                     job=("--max-steps", "100000", "--checkpoint-every", "100000"))
    proc = subprocess.Popen(cmd, env=job_env(cluster, cache), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    job_id = None
    try:
        job_id = first_job_id(run_dir)
        for pid in task_pids(cluster, job_id, tasks=2):
            os.kill(pid, signal.SIGKILL)
        killed_at = time.time()
        try:
            # local_cpu's result grace is 2 s: the job's end (seconds after the kill)
            # plus that grace; 30 s leaves room for a loaded machine (it was 60 s while
            # the grace was submitit's 15 s)
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            raise AssertionError("submit --wait still waiting 30 s after its tasks were "
                                 "killed") from None
        waited = time.time() - killed_at
    finally:
        cluster.end_submission(proc, job_id)
    print(f"submit --wait returned {waited:.1f} s after the kill")
    assert proc.returncode != 0, err[-4000:]
    # SLURM: a batch job whose script exits non-zero ends FAILED (squeue(1), JOB STATE
    # CODES: "FAILED: Job terminated with non-zero exit code or other failure condition");
    # submitit's script ends with the srun of the tasks, which fails when they are killed.
    state = cluster.job(job_id)["JobState"]
    assert state == "FAILED"
    assert f"job {job_id}" in err and state in err, err[-4000:]
    assert "killed without writing a result" in err, err[-4000:]
    # the log tail: submitit logs "Starting with JobEnvironment(...)" first in every task
    # (submitit 1.5.4, core/submission.py, process_job)
    task_log = tmp_path / "logs" / job_id / f"{job_id}_0_log.err"
    assert str(task_log) in err and "Starting with JobEnvironment" in err, err[-4000:]
    assert out.strip().splitlines()[-1] == job_id


def test_a_killed_task_is_requeued_by_the_exit_trap_and_ends_as_the_undisturbed_job(
        undisturbed, cluster, cache, tmp_path):
    """kill -9 one task mid-run (what the OOM killer or a GPU error does to a rank): srun
    ends the other, the batch script's exit trap (launch/slurm/after_exit.py) finds a
    failure of the running attempt and requeues the job, which resumes from its latest
    checkpoint and ends with the undisturbed job's losses; `submit --wait` waits through
    the requeue and returns 0. Before, the job ended FAILED and the run waited for a
    person to submit it again."""
    logs, run_dir = tmp_path / "logs", tmp_path / "run"
    proc = subprocess.Popen(submit_cmd(logs, run_dir, "--wait", job=tuple(STEPS)),
                            env=job_env(cluster, cache), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    job_id = None
    try:
        job_id = first_job_id(run_dir)
        wait_for_mid_run_checkpoint(run_dir)
        os.kill(task_pids(cluster, job_id, tasks=2)[-1], signal.SIGKILL)
        release(cluster, job_id)  # the trap's requeue, and SLURM's hold on it skipped
        out, _ = finish(proc, 300, cluster, job_id)
    finally:
        cluster.end_submission(proc, job_id)
    assert out.strip().splitlines()[-1] == job_id
    assert cluster.job(job_id)["JobState"] == "COMPLETED"
    rows = records(run_dir)
    failed = [r for r in rows if r["event"] == "failure_requeue"]
    assert len(failed) == 1 and failed[0]["status"] != 0 and failed[0]["requeue"] == 1
    starts = [r["requeue"] for r in rows if r["event"] == "start"]
    assert starts == [0, 1]
    assert rows[-1]["event"] == "ended" and rows[-1]["status"] == 0
    resumed, reference = losses(run_dir), losses(undisturbed[1])
    assert sorted(resumed) == list(range(1, 11))
    for step in range(1, 11):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-6, abs=1e-7), step
    assert latest(run_dir) == "step_0000010"
    # rank 0, killed by srun, left its lock: the requeued attempt took it over at once as
    # its own job's earlier attempt, told by SLURM_RESTART_COUNT (set by SLURM in the
    # requeued batch script and passed on to its srun tasks: seen here, Slurm 22.05)
    rank0 = (logs / job_id / f"{job_id}_0_log.err").read_text(errors="replace")
    assert (f"this SLURM job ({job_id}), requeued from restart 0 to restart 1"
            in rank0), [line for line in rank0.splitlines() if "lock" in line]


def test_wait_on_a_job_slurm_no_longer_knows_is_bounded_and_reads_the_results(cluster,
                                                                                tmp_path):
    """A job purged from the controller (after MinJobAge) whose task 1 left no result:
    `scontrol` answers "Invalid job id specified" and sacct has nothing (no accounting).
    The wait ends after the grace period and reports task 1 only, from the result files."""
    from submitit.core.utils import cloudpickle_dump

    job_id = "67000000"  # below SLURM's default MaxJobId (67043328), never reached here
    assert "Invalid job id" in subprocess.run(
        ["scontrol", "show", "job", job_id], env=cluster.env, capture_output=True,
        text=True).stderr
    job = submitit.SlurmJob(folder=tmp_path, job_id=job_id, tasks=(0, 1))
    # what submitit's task writes when its function returns (core/submission.py)
    cloudpickle_dump(("success", {"rank": 0}), job.task(0).paths.result_pickle)
    start = time.time()
    state = wait_for(job, poll_s=0.2, grace_s=2)
    why = failure(job, state)
    assert time.time() - start < 10
    assert why is not None and f"job {job_id}" in why and "no longer known to SLURM" in why
    assert "task 1: killed without writing a result" in why and "task 0:" not in why


# The classification demo on 2 tasks, shrunk: only the last step evaluates and checkpoints,
# so a checkpoint before it can only come from the signal.
FT_STEPS = 24
FT_TINY = ["run.batch_size=16", f"run.max_steps={FT_STEPS}", f"run.eval_every={FT_STEPS}",
           f"run.checkpoint_every={FT_STEPS}", "run.log_every=1", "run.num_workers=0",
           "run.progress=false", "optim.warmup_steps=0"]


def finetune_argv(run_dir: Path, cache: Path) -> list[str]:
    return ["finetune", "classification", "--output-dir", str(run_dir), *FT_TINY,
            f"data.cache_dir={cache}"]


def finetune_submit_cmd(folder: Path, run_dir: Path, cache: Path) -> list[str]:
    return [sys.executable, "-m", "launch.cli", "submit", "--profile", "local_cpu",
            "--tasks-per-node", "2", "--cpus-per-task", "1", "--folder", str(folder / "%j"),
            "--time", "30",
            "--max-requeues", "0", "--wait", *finetune_argv(run_dir, cache)]


def finetune_forked_cmd(run_dir: Path, cache: Path) -> list[str]:
    """The same 2-rank fine-tuning run outside SLURM, as torchrun would start it (its ranks
    forked by tests/pretrain_utils.run_forked: torchrun's environment, no fresh imports)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
            "-m", "launch.cli", *finetune_argv(run_dir, cache)]


def metric_records(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock stamps."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "time"} for r in rows]


def test_usr2_saves_a_finetune_job_which_requeues_and_ends_as_an_undisturbed_one(
        cluster, cache, tmp_path):
    """USR2 mid-run: rank 0 saves at the next step boundary, submitit requeues the job, and
    the requeued run resumes from that checkpoint and ends with the undisturbed run's
    metrics. With --max-requeues 0 (submitit's slurm_max_num_timeout 0): a signal far from
    the time limit is a preemption, which neither this job nor submitit counts.

    The undisturbed run is the same 2-rank run with its ranks forked outside SLURM (no
    submission, no fresh interpreters of a second SLURM job). It is the same computation:
    when this was written its metrics.jsonl matched that of the same job submitted to
    SLURM and left alone, row for row within the tolerance below."""
    quiet = tmp_path / "undisturbed"
    run_forked(finetune_forked_cmd(quiet, cache), cache, timeout=240)

    run_dir = tmp_path / "run"
    proc = subprocess.Popen(finetune_submit_cmd(tmp_path / "logs", run_dir, cache),
                            env=job_env(cluster, cache), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    job_id = None
    try:
        job_id = signal_after_first_step(cluster, run_dir)
        release(cluster, job_id)
    finally:
        finish(proc, 300, cluster, job_id)
    events = [r["event"] for r in records(run_dir)]
    # each attempt's end is recorded; the exit trap, which finds SLURM requeueing the
    # attempt itself, records nothing (launch/slurm/after_exit.py)
    assert events == ["start", "requeue_requested", "ended", "start", "ended"], events
    assert records(run_dir)[-1]["status"] == 0
    request = records(run_dir)[1]
    assert (request["timed_out"], request["timeouts"], request["saved"]) == (False, 0, True)
    logs = tmp_path / "logs" / job_id
    log = "".join((logs / f"{job_id}_0_log.{ext}").read_text() for ext in ("out", "err"))
    # submitit 1.5.4 (core/job_environment.py): "Caught signal USR2 ...: this job is
    # preempted." when the job is far from its time limit; our job logs the save, which
    # the training loop made and returned from in time
    assert "this job is preempted" in log and "stopped cleanly at a checkpoint" in log
    assert "cannot read the job's time limit" not in log  # judged on submitit's limit
    saved_at = int(latest_before_requeue(logs / f"{job_id}_0_log.err"))
    assert 0 < saved_at < FT_STEPS  # resumed from the checkpoint written on the signal
    got, want = metric_records(run_dir), metric_records(quiet)
    assert [r["step"] for r in got if "loss" in r] == list(range(1, FT_STEPS + 1))
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for mine, theirs in zip(got, want, strict=True):
        assert mine == pytest.approx(theirs, rel=1e-6, abs=1e-7), mine["step"]


# From task 0's exit to the job's end: srun's kill (SIGTERM, then SIGKILL after the test
# cluster's KillWait=3) and slurmctld's bookkeeping take seconds.
BOUND_S = 45


def _job_id(logs: Path, proc: subprocess.Popen, timeout: float = 60) -> str:
    """The job id: the name of the job's folder under ``logs`` (``--folder logs/%j``)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        ids = [p.name for p in logs.iterdir() if p.name.isdigit()] if logs.is_dir() else []
        if ids:
            return ids[0]
        assert proc.poll() is None, proc.communicate()[1][-4000:]
        time.sleep(0.2)
    raise AssertionError(f"no job folder under {logs} after {timeout}s")


def _wait_for_task0_exit(log: Path, timeout: float = 120) -> None:
    """Until srun reports task 0's non-zero exit in the job's log (srun(1) prints
    "<node>: task 0: Exited with exit code N", or a range "tasks 0-1: ...")."""
    pattern = re.compile(r"tasks? 0(-\d+)?: Exited with exit code [1-9]")
    deadline = time.time() + timeout
    while time.time() < deadline:
        if log.is_file() and pattern.search(log.read_text(errors="replace")):
            return
        time.sleep(0.2)
    raise AssertionError(f"task 0 did not exit non-zero within {timeout}s: {log}")


def test_a_failed_task_ends_the_job_promptly(cluster: SlurmCluster, cache, tmp_path):
    """Task 0 cannot open the rendezvous (its port is taken by another process) and exits
    non-zero; task 1 has reached that port and would wait for a rendezvous that never
    comes. The job must end, FAILED, within seconds of task 0's exit."""
    logs, run_dir = tmp_path / "logs", tmp_path / "run"
    with socket.socket() as holder:  # the rendezvous port, taken (listening, never answering)
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("0.0.0.0", 0))
        holder.listen()
        port = holder.getsockname()[1]
        job_env = env(cache) | {"SLURM_CONF": cluster.env["SLURM_CONF"],
                                "PATH": cluster.env["PATH"]}
        # local_cpu (this one machine's result_grace_s, 2 s: task 1, killed by srun, writes
        # no result, and --wait reports it 2 s after the job's end, not 15 s) with the taken
        # port as the profile's master_port
        profile = tmp_path / "profile.yaml"
        # (failure_requeues 0: the job's exit trap would requeue this failure, which the
        # killed-task test above checks; here the job must end)
        profile.write_text((REPO / "configs/launch/local_cpu.yaml").read_text()
                           + f"master_port: {port}\nfailure_requeues: 0\n")
        cmd = [sys.executable, "-m", "launch.cli", "submit", "--profile", str(profile),
               "--tasks-per-node", "2", "--cpus-per-task", "1", "--time", "10",
               "--folder", str(logs / "%j"), "--wait",
               "pretrain", "--output-dir", str(run_dir), "--max-steps", "5", *TINY]
        proc = subprocess.Popen(cmd, env=job_env, cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        job_id = None
        try:
            job_id = _job_id(logs, proc)
            _wait_for_task0_exit(logs / job_id / f"{job_id}_0_log.err")
            exited = time.time()
            info = cluster.wait_job(job_id, lambda j: j.get("JobState") not in (
                "PENDING", "CONFIGURING", "RUNNING", "COMPLETING"), BOUND_S,
                f"the job to end within {BOUND_S} s of task 0's exit")
            print(f"job {job_id} ended {time.time() - exited:.1f} s after task 0 exited")
            out, err = proc.communicate(timeout=60)
        finally:
            cluster.end_submission(proc, job_id)
    assert info["JobState"] == "FAILED"
    assert proc.returncode == 1 and f"job {job_id}" in err, err[-4000:]
    assert out.strip().splitlines()[-1] == job_id
