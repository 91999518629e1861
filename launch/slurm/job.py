"""The callable that submitit runs in every task: `internimage pretrain|finetune`, requeueable.

Signal semantics (why training runs in a thread). SLURM sends USR2 to every task
``signal_delay_s`` before the time limit (sbatch ``--signal``), and a preemption that is
configured to signal does the same. submitit's handler runs in the *main thread* of each
task, and only on global rank 0 does it call :meth:`TrainingJob.checkpoint`, then
``scontrol requeue`` and exit. A Python signal handler can only run while the main thread
executes Python, and training must keep stepping to reach the next step boundary where
the checkpoint is written; so the training runs in a worker thread and the main thread
only waits on it. ``checkpoint`` sets the one stop flag, ``runtime.preemption`` (rank 0
only is enough: every training loop, pre-training and each fine-tuning task, agrees on it
over all ranks at each step boundary, and every rank saves its part and returns), waits a
bounded ``save_timeout_s`` for that, then hands submitit a copy of itself to requeue. A
plain ``scontrol requeue`` or a SIGTERM/SIGKILL preemption gives no chance to save: the
requeued job resumes from the last periodic checkpoint.
"""

from __future__ import annotations

import copy
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit

from launch.slurm.environment import TaskInfo, export_distributed_env, record, requeue_count
from launch.slurm.jobspec import with_flag

log = logging.getLogger(__name__)


class RequeueLimitError(RuntimeError):
    """The job has been requeued ``max_requeues`` times and will not run again."""


@dataclass
class _Runtime:
    """Per-process state of a running task (never pickled into a requeue)."""

    info: TaskInfo
    requeues: int
    thread: threading.Thread | None = None
    signalled: threading.Event = field(default_factory=threading.Event)


def resume_argv(argv: list[str], run_dir: Path) -> list[str]:
    """The command line of a restart: continue the run from its latest checkpoint.

    An explicit ``--resume PATH`` (start from another run's checkpoint) is kept only while
    this run has no checkpoint of its own yet: ``checkpoints/latest`` (pre-training and ZeRO
    fine-tuning) or ``checkpoints/last.pt`` (DDP fine-tuning).
    """
    ckpts = run_dir / "checkpoints"
    has_own = (ckpts / "latest").is_file() or (ckpts / "last.pt").is_file()
    explicit = any(a == "--resume" or a.startswith("--resume=") for a in argv)
    return set_resume_auto(argv) if has_own or not explicit else list(argv)


def set_resume_auto(argv: list[str]) -> list[str]:
    """``argv`` with ``--resume auto`` (replacing any other --resume)."""
    return with_flag(argv, "--resume", "auto")


class TrainingJob(submitit.helpers.Checkpointable):
    """Runs ``internimage <argv>`` in this task; on time-out/preemption, saves and requeues.

    ``argv`` is a full `internimage` command line (``["pretrain", "--output-dir", ...]``),
    run by ``entry`` (the console script's ``main``), whose run directory is ``run_dir``;
    rank 0 appends each start, requeue request and give-up to ``run_dir/slurm_jobs.jsonl``.
    """

    def __init__(self, argv: list[str], run_dir: str | Path, max_requeues: int = 3,
                 save_on_signal: bool = True, save_timeout_s: float = 60,
                 cpus_per_task: int = 1, *, entry: Callable[[list[str]], int]) -> None:
        # ``entry`` (`internimage`'s main, pickled by reference) is handed in rather than
        # imported here: launch.cli -> commands -> slurm.job must not lead back to launch.cli.
        self.entry = entry
        self.argv = list(argv)
        self.run_dir = str(Path(run_dir).resolve())
        self.max_requeues = max_requeues
        self.save_on_signal = save_on_signal
        self.save_timeout_s = save_timeout_s
        self.cpus_per_task = cpus_per_task
        self._rt: _Runtime | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_rt"] = None  # threads and events stay in this process
        return state

    # ------------------------------------------------------------------------ the job
    def __call__(self) -> dict[str, Any]:
        logging.basicConfig(level=logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        info = export_distributed_env(self.cpus_per_task)
        run_dir = Path(self.run_dir)
        requeues = requeue_count(run_dir, info)
        self._rt = _Runtime(info, requeues)
        log.info("job %s task %d/%d (master %s), requeue %d of at most %d, run dir %s",
                 info.job_id, info.rank, info.world_size, info.master, requeues,
                 self.max_requeues, run_dir)
        if info.is_main:
            record(run_dir, "start", info, requeue=requeues, argv=self.argv)
        if requeues > self.max_requeues:
            raise RequeueLimitError(
                f"job {info.job_id} was requeued {requeues} times, more than --max-requeues "
                f"{self.max_requeues}: giving up. Resume by hand with `--resume auto` on the "
                f"same run directory ({run_dir}).")
        self._forget_previous_result()
        self._watch_signal()
        argv = resume_argv(self.argv, run_dir) if requeues else self.argv
        status = self._run_in_thread(argv)
        if status != 0:
            raise RuntimeError(f"`internimage {' '.join(argv)}` exited with status {status} "
                               f"(job {info.job_id}, task {info.rank})")
        return {"job_id": info.job_id, "rank": info.rank, "run_dir": str(run_dir),
                "requeues": requeues}

    def _run_in_thread(self, argv: list[str]) -> int:
        """Run the command in a worker thread; the main thread stays free for signals."""
        main = self.entry
        outcome: dict[str, Any] = {}

        def target() -> None:
            try:
                outcome["status"] = main(argv)
            except BaseException as err:  # re-raised in the main thread below
                outcome["error"] = err

        assert self._rt is not None
        # daemon: when submitit exits after requeueing, a save that overran its bound
        # must not keep the process alive.
        thread = threading.Thread(target=target, name="internimage-train", daemon=True)
        self._rt.thread = thread
        thread.start()
        while thread.is_alive():
            thread.join(timeout=0.5)  # short waits: signal handlers run between them
        if "error" in outcome:
            raise outcome["error"]
        return int(outcome.get("status") or 0)

    def _watch_signal(self) -> None:
        """Note the time-out/preemption signal on every rank, then let submitit handle it."""
        assert self._rt is not None
        sig = submitit.JobEnvironment._usr_sig()
        previous = signal.getsignal(sig)
        main_pid = os.getpid()
        rt = self._rt

        def on_signal(signum: int, frame: Any) -> None:
            if os.getpid() != main_pid:
                return  # a forked data-loader worker: its task's main process handles this
            rt.signalled.set()
            log.warning("task %d got %s (time limit near or preempted)", rt.info.rank,
                        signal.Signals(signum).name)
            if callable(previous):
                previous(signum, frame)

        signal.signal(sig, on_signal)

    def _forget_previous_result(self) -> None:
        """Remove this task's result file left by the job's previous run (before a requeue).

        A rank other than 0 returns normally after a save-on-signal and writes a result;
        left in place, it would count as this run's result for whoever waits on the job.
        """
        try:
            submitit.JobEnvironment().paths.result_pickle.unlink(missing_ok=True)
        except (KeyError, OSError):
            pass

    # -------------------------------------------------------------------- requeueing
    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission | None:
        """Save (optionally), then return the requeue of this job with ``--resume auto``.

        Called by submitit inside its USR2 handler, in the main thread of global rank 0
        only. Returning None makes submitit end the job as failed (no requeue).
        """
        rt = self._rt
        if rt is None:  # not started by __call__ (e.g. a signal before the job began)
            return submitit.helpers.DelayedSubmission(self._requeued(), *args, **kwargs)
        run_dir = Path(self.run_dir)
        if self.save_on_signal:
            self._save_now(rt)
        if rt.requeues >= self.max_requeues:
            message = (f"not requeueing job {rt.info.job_id}: already requeued {rt.requeues} "
                       f"times (--max-requeues {self.max_requeues}). Resume by hand with "
                       f"`--resume auto` on {run_dir}")
            log.error(message)
            print(message, file=sys.stderr, flush=True)
            record(run_dir, "gave_up", rt.info, requeue=rt.requeues)
            return None
        record(run_dir, "requeue_requested", rt.info, requeue=rt.requeues + 1,
               saved=bool(self.save_on_signal))
        log.warning("requeueing job %s (requeue %d of at most %d)", rt.info.job_id,
                    rt.requeues + 1, self.max_requeues)
        return submitit.helpers.DelayedSubmission(self._requeued(), *args, **kwargs)

    def _requeued(self) -> TrainingJob:
        nxt = copy.copy(self)
        nxt._rt = None
        nxt.argv = resume_argv(self.argv, Path(self.run_dir))
        return nxt

    def _save_now(self, rt: _Runtime) -> None:
        """Ask the training loop to checkpoint at the next step boundary; wait a bounded time."""
        from runtime.preemption import request_stop

        request_stop()
        thread = rt.thread
        if thread is None:
            return
        log.warning("saving a checkpoint before the requeue (waiting up to %ss)",
                    self.save_timeout_s)
        thread.join(timeout=self.save_timeout_s)
        if thread.is_alive():
            log.error("the save did not finish within %ss; requeueing anyway (the job resumes "
                      "from the last complete checkpoint)", self.save_timeout_s)
        else:
            log.warning("checkpoint saved; training stopped cleanly")
