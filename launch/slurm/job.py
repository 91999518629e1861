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

The handler itself only notes the signal; the main thread acts on it (submitit's handler,
the save and its wait) in its waiting loop, once. A Python handler runs between two
bytecodes of the main thread, wherever that thread is: inside a logging call holding its
handler's lock, say. Waiting there for the training thread to save, which logs through the
same handler, deadlocked until ``save_timeout_s`` when a second USR2 came during the first
one's save (SLURM's --signal and a manual one, several ``scancel --signal``): the save was
recorded as failed, and a training thread stuck before its save lost the steps since the
last periodic checkpoint. Further stop signals are ignored: the first one's save and
requeue happen once.

What ``--max-requeues`` limits. As submitit's ``slurm_max_num_timeout`` (to which the
same number is passed), only time-outs count: a signal is a time-out or a preemption by
submitit's rule (:func:`~launch.slurm.environment.is_timeout`), recorded with each
requeue request in ``slurm_jobs.jsonl``, and a job whose time limit comes once more than
``--max-requeues`` allows saves and stops. Preemptions are requeued however often they
come, and restarts SLURM makes by itself (preemption with PreemptMode=REQUEUE, a node
failure, ``scontrol requeue``) are not limited here either: each is the scheduler's or an
operator's decision, resumes from a checkpoint, and on a busy preemptible partition a
weeks-long run may meet dozens of them. A task's failure is requeued by the batch
script's exit trap, within its own bound (``failure_requeues``, launch/slurm/after_exit.py),
which reads the ``ended`` record rank 0 writes here.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit

from launch.commands.refusals import take_refusal
from launch.config import REFUSED_STATUS
from launch.slurm.environment import (
    TaskInfo,
    export_distributed_env,
    is_timeout,
    read_records,
    record,
    restart_count,
    submitted_time_limit_min,
    timeout_count,
)
from launch.slurm.jobspec import with_flag

log = logging.getLogger(__name__)

# The main thread waits in slices this long. CPython looks for a pending signal before it
# blocks, not atomically with it: a signal landing in between runs its handler only when
# the wait ends. Short waits bound that delay, and the delay of acting on a noted signal.
POLL_S = 0.5

# The line each task logs at every start, before it runs the command (job id, rank, world
# size, master, restarts, time-outs, allowed requeues, run dir): launch.slurm.wait finds
# the start of an attempt in a log by it (its ATTEMPT_START is built from this format)
START_LINE = ("job %s task %d/%d (master %s), restart %d (%d for the time limit, at most "
              "%d allowed; preemptions unlimited), run dir %s")


@dataclass
class _Runtime:
    """Per-process state of a running task (never pickled into a requeue)."""

    info: TaskInfo
    restarts: int  # every restart of this job so far (SLURM_RESTART_COUNT)
    timeouts: int  # of these, requeues for the time limit (what --max-requeues limits)
    time_limit_min: float | None  # submitit's, to tell a time-out from a preemption
    # time.monotonic() at the job's start: submitit judges from its own start, a moment
    # before it calls the job
    started: float = field(default_factory=time.monotonic)
    thread: threading.Thread | None = None
    # set by the training thread as it ends, after ``status`` or ``error``
    ended: threading.Event = field(default_factory=threading.Event)
    status: int | None = None
    error: BaseException | None = None
    # (signum, frame) of every stop signal, in order, appended by the handler only: one
    # append is one C call, which a handler nested in another cannot split. The first is
    # acted on; the others are ignored (see _note_signals).
    signals: list[tuple[int, Any]] = field(default_factory=list)
    # written by the main thread only: whether it has acted on the first signal, and how
    # many of the ignored ones it has logged
    stop_taken: bool = False
    ignored_logged: int = 0

    def failure(self) -> str | None:
        """Why the ended training thread failed (its exception or exit status); None if it
        returned 0."""
        if self.error is not None:
            return repr(self.error)
        return f"exit status {self.status}" if self.status else None

    def outcome(self) -> str:
        """How the ended training thread ended: ``completed`` or ``failed (why)``."""
        why = self.failure()
        return f"failed ({why})" if why else "completed"


def log_ignored(rt: _Runtime) -> None:
    """Log the stop signals after the first that came since the last such log (once per
    batch of repeats: a signal storm is one line)."""
    ignored = len(rt.signals) - 1 - rt.ignored_logged
    if ignored <= 0:
        return
    rt.ignored_logged += ignored
    log.warning("ignored %d further %s signal(s): only the first is acted on (one save, "
                "one requeue at most)", ignored, signal.Signals(rt.signals[0][0]).name)


def own_checkpoint(run_dir: Path) -> list[Any] | None:
    """Which save of the run its pointer to the newest checkpoint names right now:
    ``[tag, saved_at, mtime_ns]``, the tag ``checkpoints/latest`` holds, the time rank 0
    wrote into that save's ``trainer_state.json`` (``saved_at``) and the mtime of
    ``latest``; ``["last.pt", mtime_ns, mtime_ns]`` for a DDP fine-tuning run of an
    earlier version; None without either. Compare two with :func:`same_checkpoint`.

    Every task reads this (:func:`resume_argv`), each on its own node, as does the batch
    script's exit trap on the batch host, which a requeued job may have on another node:
    so the save is told by what it wrote, which reads the same everywhere, not by the
    file's inode or mtime, which a FUSE mount of object storage may give otherwise on
    each node. A save that re-saved the same tag (a rewound run reaching its old tag
    again) wrote another ``saved_at``. A checkpoint without one (saved before it was
    written, or its state file unreadable) falls back on the mtime of ``latest``."""
    from runtime.run_layout import (  # torch-free (the exit trap)
        CHECKPOINTS_DIR,
        LATEST,
        SAVED_AT,
        STAGING,
        TRAINER_STATE,
    )

    ckpts = run_dir / CHECKPOINTS_DIR
    try:
        with (ckpts / LATEST).open(encoding="utf-8", errors="replace") as f:
            tag = f.read(1024).strip()
            mtime = os.fstat(f.fileno()).st_mtime_ns
    except FileNotFoundError:
        try:
            mtime = (ckpts / "last.pt").stat().st_mtime_ns
        except FileNotFoundError:
            return None
        return ["last.pt", mtime, mtime]
    folder = ckpts / tag
    if STAGING in tag and not folder.is_dir():  # a swap's end (runtime.checkpoint_path)
        folder = ckpts / tag.split(STAGING)[0]
    try:
        saved_at = json.loads((folder / TRAINER_STATE).read_text()).get(SAVED_AT)
    except (OSError, ValueError, AttributeError):
        saved_at = None
    return [tag, saved_at if isinstance(saved_at, (int, float)) else mtime, mtime]


def same_checkpoint(recorded: Any, now: list[Any] | None) -> bool:
    """Whether ``recorded`` (an :func:`own_checkpoint` of a ``slurm_jobs.jsonl`` record)
    names the save ``now`` does. A record of an earlier version, ``[inode, mtime_ns]``,
    is told by the mtime alone (its inode is the one this key gave up)."""
    if recorded is None or now is None:
        return recorded is None and now is None
    if (isinstance(recorded, list) and len(recorded) == 2
            and all(isinstance(x, int) for x in recorded)):
        return recorded[1] == now[2]
    return isinstance(recorded, list) and recorded[:2] == now[:2]


def resume_argv(argv: list[str], run_dir: Path, job_id: str | None = None) -> list[str]:
    """The command line of a restart of job ``job_id``: continue the run from its latest
    checkpoint.

    An explicit ``--resume PATH`` (start from another run's checkpoint, or rewind this run
    to an earlier one of its own) is kept until this job has saved a checkpoint: until the
    run's ``latest`` is no longer the one it named when the job first started (recorded in
    that start's ``slurm_jobs.jsonl`` line, :func:`own_checkpoint`). Only then does the
    restart continue with ``--resume auto``: a rewound job that SLURM restarted before its
    first save (a node failure, ``scontrol requeue``, a save on the signal that failed)
    would otherwise go back to the later checkpoints the user abandoned. Without a record
    of the job's first start (``job_id`` None, or a run started by an earlier version), any
    checkpoint of the run counts as its own. An ``--eval-only`` command line is kept as it
    is.
    """
    if "--eval-only" in argv:  # an evaluation starts over from the weights it names
        return list(argv)
    explicit = any(a == "--resume" or a.startswith("--resume=") for a in argv)
    if not explicit:
        return set_resume_auto(argv)
    now = own_checkpoint(run_dir)
    if now is None:
        return list(argv)
    first = next((r for r in read_records(run_dir)
                  if r.get("job_id") == job_id and r.get("event") == "start"
                  and r.get("requeue") == 0 and "checkpoint" in r), None)
    saved_since = first is None or not same_checkpoint(first["checkpoint"], now)
    return set_resume_auto(argv) if saved_since else list(argv)


def set_resume_auto(argv: list[str]) -> list[str]:
    """``argv`` with ``--resume auto`` (replacing any other --resume)."""
    return with_flag(argv, "--resume", "auto")


class TrainingJob(submitit.helpers.Checkpointable):
    """Runs ``internimage <argv>`` in this task; on time-out/preemption, saves and requeues.

    ``argv`` is a full `internimage` command line (``["pretrain", "--output-dir", ...]``),
    run by ``entry`` (the console script's ``main``), whose run directory is ``run_dir``;
    rank 0 appends each start, end, requeue request and give-up to
    ``run_dir/slurm_jobs.jsonl``.
    ``max_requeues`` limits requeues for the time limit only (see the module docstring).
    """

    def __init__(self, argv: list[str], run_dir: str | Path, max_requeues: int = 3,
                 save_on_signal: bool = True, save_timeout_s: float = 60,
                 cpus_per_task: int = 1, *, entry: Callable[[list[str]], int],
                 master_port: int | None = None) -> None:
        # ``entry`` (`internimage`'s main, pickled by reference) is handed in rather than
        # imported here: launch.cli -> commands -> slurm.job must not lead back to launch.cli.
        self.entry = entry
        self.argv = list(argv)
        self.run_dir = str(Path(run_dir).resolve())
        self.max_requeues = max_requeues
        self.save_on_signal = save_on_signal
        self.save_timeout_s = save_timeout_s
        self.cpus_per_task = cpus_per_task
        self.master_port = master_port  # None: derived from the job id (submitit)
        self._rt: _Runtime | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_rt"] = None  # threads and events stay in this process
        return state

    # ------------------------------------------------------------------------ the job
    def __call__(self) -> dict[str, Any]:
        started = time.monotonic()  # as close to submitit's own start as this gets
        # First: from here on a stop signal is only noted (submitit's handler, installed
        # before this call, would run nested in whatever the main thread is doing)
        signals, submitit_handler = self._note_signals()
        logging.basicConfig(level=logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        # getattr: a job pickled by an earlier version, requeued, has no such attribute
        info = export_distributed_env(self.cpus_per_task, getattr(self, "master_port", None))
        run_dir = Path(self.run_dir)
        restarts = restart_count(run_dir, info)
        # only rank 0 handles the signal, so only it judges and counts time-outs
        timeouts = timeout_count(run_dir, info.job_id) if info.is_main else 0
        limit = submitted_time_limit_min() if info.is_main else None
        self._rt = _Runtime(info, restarts, timeouts, limit, started, signals=signals)
        log.info(START_LINE, info.job_id, info.rank, info.world_size, info.master, restarts,
                 timeouts, self.max_requeues, run_dir)
        if info.is_main:  # ``checkpoint``: what a restart's resume_argv compares with
            record(run_dir, "start", info, requeue=restarts, timeouts=timeouts,
                   argv=self.argv, checkpoint=own_checkpoint(run_dir))
        self._forget_previous_result()
        act_on_signal = self._signal_action(submitit_handler)
        argv = resume_argv(self.argv, run_dir, info.job_id) if restarts else self.argv
        take_refusal()  # (none of this run's yet)
        from runtime.checkpoint import published_here

        published_here(run_dir, forget=True)  # (nor a passed start)
        if restarts:  # served by its store before, even without a checkpoint yet: a store
            # that does not answer at the start is an outage to wait for (data/preflight.py)
            from data.preflight import REQUEUED_ENV

            os.environ[REQUEUED_ENV] = "1"
        try:
            status = self._run_in_thread(argv, act_on_signal)
        except BaseException as err:
            self._record_end(run_dir, info, restarts, None, err)
            raise
        # a refusal is reported and returned (exit 2), not raised: its record says whether
        # a retry can help (a run directory another job trains: no)
        self._record_end(run_dir, info, restarts, status,
                         take_refusal() if status == REFUSED_STATUS else None)
        if status != 0:
            raise RuntimeError(f"`internimage {' '.join(argv)}` exited with status {status} "
                               f"(job {info.job_id}, task {info.rank})")
        return {"job_id": info.job_id, "rank": info.rank, "run_dir": str(run_dir),
                "requeues": restarts}

    @staticmethod
    def _record_end(run_dir: Path, info: TaskInfo, restarts: int, status: int | None,
                    error: BaseException | None) -> None:
        """Rank 0 records how the command ended (``ended``: its exit status, or the error
        it raised; ``refused``: exit status 2, a refusal; ``started``: whether the run had
        passed its start checks, published its config: a refusal after it (a save that
        hit a full disk, a store refusing reads) came from a run that trained; ``retry``:
        False for an error that says a retry cannot help, ``retry_helps = False``), read
        by the batch script's exit trap: a run that completed or stopped so is not
        requeued, refused starts are bounded apart (after_exit.py)."""
        if not info.is_main:
            return
        from runtime.checkpoint import published_here

        code = error.code if isinstance(error, SystemExit) else status  # argparse: 2
        extra: dict[str, Any] = {"status": status, "refused": code == REFUSED_STATUS,
                                 "started": published_here(run_dir)}
        if error is not None:
            extra["error"] = repr(error)[:1000]
            if getattr(error, "retry_helps", True) is False:  # the exit trap's requeue
                extra["retry"] = False
        try:
            record(run_dir, "ended", info, requeue=restarts, **extra)
        except OSError as err:  # the run's own outcome matters more than its record
            log.warning("could not record the run's end in %s: %s", run_dir, err)

    def _run_in_thread(self, argv: list[str], act_on_signal: Callable[[], None]) -> int:
        """Run the command in a worker thread; the main thread stays free for signals.

        The main thread acts on a stop signal its handler noted (``act_on_signal``) between
        short waits, and once more after the run ended (to say it is ignored). The outcome
        stays in the task's runtime state: acting on the signal must know whether the run
        had already ended, and whether the save it asked for raised.
        """
        main = self.entry
        rt = self._rt
        assert rt is not None

        def target() -> None:
            try:
                rt.status = int(main(argv) or 0)
            except BaseException as err:  # re-raised in the main thread below
                rt.error = err
            finally:
                rt.ended.set()

        # daemon: when submitit exits after requeueing, a save that overran its bound
        # must not keep the process alive.
        thread = threading.Thread(target=target, name="internimage-train", daemon=True)
        act_on_signal()  # a signal before the training started: nothing to wait for
        rt.thread = thread
        thread.start()
        while thread.is_alive():
            # Short waits: the handler interrupts one and only notes the signal; acting on
            # it here, outside the handler, it may log, wait and exit (submitit's requeue)
            thread.join(timeout=POLL_S)
            act_on_signal()
        act_on_signal()  # noted as the run ended: ignored, and said so
        log_ignored(rt)  # repeats noted since (one landing after this goes unsaid: the
        # run has ended, and the task with it)
        if rt.error is not None:
            raise rt.error
        return rt.status

    def _note_signals(self) -> tuple[list[tuple[int, Any]], Any]:
        """Install a handler that only notes the time-out/preemption signal (every rank);
        return the list it appends to and the handler it replaced (submitit's).

        The handler takes no lock, logs nothing and waits on nothing: it may run while the
        main thread holds any lock (logging's, a stream buffer's, the import lock), and
        while it handles an earlier signal. ``_signal_action`` acts on the first signal.
        """
        sig = submitit.JobEnvironment._usr_sig()
        previous = signal.getsignal(sig)
        main_pid = os.getpid()
        signals: list[tuple[int, Any]] = []

        def on_signal(signum: int, frame: Any) -> None:
            if os.getpid() == main_pid:  # not a forked data-loader worker: its task's
                # main process handles the signal; only the first one's frame is used
                signals.append((signum, None if signals else frame))

        signal.signal(sig, on_signal)
        return signals, previous

    def _signal_action(self, previous: Any) -> Callable[[], None]:
        """The function the main thread calls between its waits, outside the handler: it
        lets submitit's handler (``previous``) act on the first noted signal, once."""
        assert self._rt is not None
        rt = self._rt

        def act_on_signal() -> None:
            if not rt.signals or rt.stop_taken:
                return
            rt.stop_taken = True  # once: the handler never writes it, so this cannot race
            signum, frame = rt.signals[0]
            name = signal.Signals(signum).name
            if rt.ended.is_set():
                # The run finished (its last step fell within signal_delay_s of the limit)
                # or failed by itself, before the signal or in the moment before this
                # call: nothing to save, and a requeue would run a finished job again or
                # hide its error. Not handing the signal to submitit lets the task end as
                # it would have without it (submitit would make even a refused requeue an
                # error of the job).
                log.warning("task %d got %s; its run has %s: nothing to save, not "
                            "requeueing", rt.info.rank, name, rt.outcome())
                return
            log.warning("task %d got %s (time limit near or preempted)", rt.info.rank, name)
            if callable(previous):
                previous(signum, frame)

        return act_on_signal

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
        """Save (optionally), then return the requeue of this job (resuming as
        :func:`resume_argv` says: ``--resume auto`` once the job has saved).

        Called by submitit's USR2 handler, in the main thread of global rank 0 only, once
        (that handler is called outside the signal handler: see ``_note_signals``).
        Returning None makes submitit end the job as failed (no requeue): done when the run
        had already ended before the signal, and when the job reaches its time limit more
        often than ``max_requeues`` allows. A preemption is always requeued.

        A save that raises (disk full, a lost rank) or overruns ``save_timeout_s`` is
        recorded (``saved: false``, the error), and the job is still requeued: the next
        run resumes from the last complete checkpoint (``checkpoints/latest`` only ever
        names complete ones), losing the steps since. Such failures are mostly transient
        or tied to this allocation, and the alternative, ending a weeks-long run, loses
        more; a failure that is not transient comes back without any signal in the next
        run, which then fails by itself.
        """
        rt = self._rt
        if rt is None:  # not started by __call__ (e.g. a signal before the job began)
            return submitit.helpers.DelayedSubmission(self._requeued(), *args, **kwargs)
        run_dir = Path(self.run_dir)
        if rt.ended.is_set():
            # checked before the stop request: a run that ends after it may have stopped
            # for it, and is requeued (a run stopped at its very last step resumes there
            # and ends at once)
            log.warning("the run had %s before the signal: not requeueing", rt.outcome())
            return None
        timed_out = is_timeout(time.monotonic() - rt.started, rt.time_limit_min)
        saved, save_error = self._save_now(rt) if self.save_on_signal else (False, None)
        log_ignored(rt)
        extra: dict[str, Any] = {"timed_out": timed_out, "saved": saved}
        if save_error is not None:
            extra["save_error"] = save_error
        if timed_out and rt.timeouts >= self.max_requeues:
            message = (f"not requeueing job {rt.info.job_id}: it reached its time limit "
                       f"{rt.timeouts + 1} times, more than --max-requeues "
                       f"{self.max_requeues} allows (preemptions do not count). Resume by "
                       f"hand with `--resume auto` on {run_dir}")
            log.error(message)
            print(message, file=sys.stderr, flush=True)
            record(run_dir, "gave_up", rt.info, requeue=rt.restarts,
                   timeouts=rt.timeouts + 1, **extra)
            return None
        timeouts = rt.timeouts + int(timed_out)
        record(run_dir, "requeue_requested", rt.info, requeue=rt.restarts + 1,
               timeouts=timeouts, **extra)
        log.warning("requeueing job %s after a %s (%d of at most %d time-out requeues used)",
                    rt.info.job_id, "time-out" if timed_out else "preemption", timeouts,
                    self.max_requeues)
        return submitit.helpers.DelayedSubmission(self._requeued(), *args, **kwargs)

    def _requeued(self) -> TrainingJob:
        job_id = self._rt.info.job_id if self._rt is not None else None
        nxt = copy.copy(self)
        nxt._rt = None
        nxt.argv = resume_argv(self.argv, Path(self.run_dir), job_id)
        return nxt

    def _save_now(self, rt: _Runtime) -> tuple[bool, str | None]:
        """Ask the training loop to checkpoint at the next step boundary; wait a bounded
        time. Whether it saved, and why not."""
        from runtime.preemption import request_stop

        request_stop()
        thread = rt.thread
        if thread is None:
            return False, "training had not started"
        log.warning("saving a checkpoint on the signal (waiting up to %ss)",
                    self.save_timeout_s)
        deadline = time.monotonic() + self.save_timeout_s
        while thread.is_alive() and (left := deadline - time.monotonic()) > 0:
            thread.join(timeout=min(left, POLL_S))  # short waits: see POLL_S
        if thread.is_alive():
            log.error("the save did not finish within %ss (the job resumes from the last "
                      "complete checkpoint)", self.save_timeout_s)
            return False, f"not finished within save_timeout_s={self.save_timeout_s}"
        why = rt.failure()
        if why is not None:
            log.error("the save on the signal failed: %s (the job resumes from the last "
                      "complete checkpoint)", why)
            return False, why
        # (saved now, or the step's checkpoint existed already: a stop during a resume's
        # set-up or its owed evaluation returns at the checkpoint it resumed from)
        log.warning("training stopped cleanly at a checkpoint")
        return True, None
