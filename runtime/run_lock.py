"""One job at a time in a run directory: ``RUN/.run.lock``, held by rank 0 of the job
that trains the run, with a heartbeat.

Why: two jobs writing one run directory (a second submission to the same
``--output-dir``, a ``--resume auto`` while the first job still runs, workers left
running after their launcher was killed: torchrun starts each worker in its own session)
both save into ``checkpoints/``, both replace ``latest`` and both prune: each deletes the
other's checkpoints, and ``latest`` names whichever was saved last. The lock makes the
second job refuse at its start, in one line naming the holder, before any compute.

Never blocking a requeue. A lock outlives a job killed without warning (SIGKILL, a node
failure); a start takes it over, at once, when its holder is provably gone:

- the holder is an earlier attempt of this SLURM job: a requeue keeps ``SLURM_JOB_ID``
  and counts up ``SLURM_RESTART_COUNT`` (a time-limit or preemption requeue, a node
  failure, ``scontrol requeue``), and SLURM starts an attempt only once the last one has
  ended (COMPLETING until every step's tasks are gone). Two runs started by hand into one
  directory from steps of one allocation (``salloc``, an interactive shell) share the job
  id and the count: judged as any other holder below. A lock of a version that recorded
  no count is taken for an earlier attempt, as that version did;
- the holder ran on this machine (same host name, boot id and PID namespace) and its
  process is gone: no process with its PID, or one started at another time (a reused
  PID);
- the holder is this process (an earlier start in the same process that did not release).

Otherwise (the holder ran on another machine, outside this SLURM job) the start watches
the lock's heartbeat: the holder rewrites the lock every ``heartbeat_s`` (30 s), and a
count that moves means a live holder (refused); one that has not moved for ``stale_s``
(120 s, four heartbeats) means a dead one (taken over, with a warning). No clocks are
compared: machines' clocks differ, the watcher only sees whether the count changes.

A holder that finds the lock taken over (it stalled for longer than ``stale_s``, and
another job took the run) stops without saving: its heartbeat requests a stop (the
training loop's stop flag, agreed over the ranks at each step boundary), and the save
that follows, like every save, reads the lock again first (:func:`lost_message`, rank 0:
~300 bytes a checkpoint) and is refused on every rank. A read that fails (ESTALE, EIO)
is logged and retried at the next beat; it never ends the heartbeat. What no lock file
can exclude: a holder stalled inside its own heartbeat's write for longer than
``stale_s`` may replace the lock of the job that took over meanwhile; that job then finds
its lock taken at its next beat and stops. One writer either way.

Cost: rank 0 alone; one file of ~300 bytes created at start, rewritten every 30 s by a
daemon thread, removed at exit; the same at any world size. A start that must watch a
stale lock of another machine waits up to ``stale_s`` (the other ranks wait in the
start's refusal agreement, well inside the process group's timeout).
"""

from __future__ import annotations

import atexit
import functools
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import ParamSpec, TypeVar

from models.checkpoint import CheckpointError
from runtime import preemption

log = logging.getLogger(__name__)
P = ParamSpec("P")
R = TypeVar("R")

LOCK_NAME = ".run.lock"
HEARTBEAT_S = 30.0
STALE_S = 120.0


class RunLockError(CheckpointError):
    """The run directory is another live job's (a ``CheckpointError``: the command line
    reports it in one line, exit 2), or this job lost it to another one. A SLURM job
    refused so is requeued a bounded number of times (launch/slurm/after_exit.py: a
    refused attempt made no progress, whatever checkpoints the other job saves), which
    lets a job submitted right after ``scancel`` take over once the cancelled one is
    gone, and a lock file the file system failed to read (ESTALE) be read again."""


def _pid_namespace() -> str:
    """This process's PID namespace (Linux): two containers may share a host name, not
    a PID namespace; '' where there is none to read."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _process_start(pid: int) -> str | None:
    """When process ``pid`` started (field 22 of ``/proc/PID/stat``, in clock ticks since
    boot), None when there is no such process; '' where ``/proc`` cannot tell (then a
    live PID counts as the holder's)."""
    if not Path("/proc/self/stat").is_file():  # no /proc (macOS): cannot tell
        return ""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return ""
    # the command name (field 2) may hold spaces and parentheses: split after its ')'
    return stat.rsplit(")", 1)[1].split()[19]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    return True


@dataclass
class Holder:
    """Who holds a lock, as its file records it."""

    token: str
    host: str
    pid: int
    pid_namespace: str
    process_start: str
    slurm_job: str | None
    started: str
    beat: int = 0
    boot_id: str = ""  # this boot of this machine: two hosts may share a name
    # the SLURM job's restarts before this attempt (None: recorded by an earlier version)
    slurm_restart: int | None = None

    def describe(self) -> str:
        job = ""
        if self.slurm_job:
            job = f", SLURM job {self.slurm_job}" + (
                f" (restart {self.slurm_restart})" if self.slurm_restart else "")
        return f"process {self.pid} on {self.host}{job}, started {self.started}"


def _boot_id() -> str:
    """This boot of this machine (Linux): containers given one ``--hostname`` on two
    machines share a name and the initial PID namespace's inode, never a boot id."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _this_holder() -> Holder:
    pid = os.getpid()
    job = os.environ.get("SLURM_JOB_ID")
    # SLURM sets the count from the first restart on (absent: the first attempt)
    restart = int(os.environ.get("SLURM_RESTART_COUNT") or 0) if job else None
    return Holder(token=secrets.token_hex(8), host=socket.gethostname(), pid=pid,
                  pid_namespace=_pid_namespace(), process_start=_process_start(pid) or "",
                  slurm_job=job, started=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  boot_id=_boot_id(), slurm_restart=restart)


_UNKNOWN = dict(host="?", pid=-1, pid_namespace="", process_start="", slurm_job=None,
                started="?")


def read_holder(path: Path) -> Holder | None:
    """The holder ``path`` records; None when there is no lock file. A file that does
    not parse (a holder killed while creating it) reads as a holder nothing is known of,
    which never beats: a watcher finds it stale."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        record = json.loads(text)
        # fields another version added are left out, fields it lacks take their defaults
        known = {f.name for f in fields(Holder)}
        return Holder(**{k: v for k, v in record.items() if k in known})
    except (ValueError, TypeError, AttributeError):
        # the token is the text itself: a holder whose file changes is seen to beat
        return Holder(token=f"unreadable:{text[:64]}", **_UNKNOWN)


def _record(holder: Holder) -> str:
    return json.dumps(asdict(holder)) + "\n"


def _staged(path: Path, holder: Holder) -> Path:
    """``holder``'s record in a temporary file beside ``path`` (named by its token)."""
    tmp = path.with_name(f"{path.name}.{holder.token}.tmp")
    tmp.write_text(_record(holder))
    return tmp


def _write(path: Path, holder: Holder) -> None:
    """Replace ``path`` with ``holder`` atomically (a reader never sees half a file)."""
    os.replace(_staged(path, holder), path)


class RunLock:
    """The lock of ``run_dir`` for this process: :meth:`acquire`, then a heartbeat thread
    until :meth:`release`. Use :func:`acquire` (one lock per process)."""

    def __init__(self, run_dir: Path, heartbeat_s: float = HEARTBEAT_S,
                 stale_s: float = STALE_S):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
        self.me = _this_holder()
        self.lost: Holder | None = None  # who took the run from this process, once found
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- taking the lock --------------------------------------------------------------

    def acquire(self) -> None:
        """Hold the lock, or raise :class:`RunLockError` naming the live holder (or what
        the filesystem refused: a one-line refusal every rank agrees on, not an
        ``OSError`` on rank 0 alone while the others wait in the start's agreement)."""
        try:
            self._acquire()
        except OSError as err:
            raise RunLockError(f"{self.path}: cannot take the run directory's lock "
                               f"({err})") from None
        self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat",
                                        daemon=True)
        self._thread.start()

    def _acquire(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        while not self._create():
            holder = read_holder(self.path)
            if holder is None:  # released meanwhile: try again
                continue
            reason = self._gone(holder)
            if reason is None:
                reason = self._watch(holder)
                if reason is _CHANGED:  # released or taken meanwhile: judge it afresh
                    continue
            if not reason:
                raise RunLockError(
                    f"{self.run_dir} is in use by {holder.describe()}, whose lock "
                    f"({self.path.name}) is alive; two jobs in one run directory delete "
                    f"each other's checkpoints. Wait for it or stop it (workers of a killed "
                    f"torchrun may still run), or pass another --output-dir")
            log.warning("%s: taking over the lock of %s (%s)", self.run_dir,
                        holder.describe(), reason)
            self._take_over(holder)

    def _create(self) -> bool:
        """Create the lock file holding this process; False when one exists."""
        tmp = _staged(self.path, self.me)
        try:  # a hard link fails on an existing name: creation and content in one step
            os.link(tmp, self.path)
        except FileExistsError:
            return False
        except OSError:  # a filesystem without hard links: exclusive create, then write
            return self._create_exclusive()
        finally:
            tmp.unlink(missing_ok=True)
        return True

    def _create_exclusive(self) -> bool:
        """:meth:`_create` where hard links are refused. A reader may meet the file
        empty for a moment: it reads as an unknown holder whose content then changes,
        which a watcher takes for a live one (refused, never taken over)."""
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(_record(self.me))
        return True

    def _gone(self, holder: Holder) -> str | None:
        """Why ``holder`` is provably not training any more; '' when it provably is (a
        live process on this machine); None when that cannot be told from here."""
        if (holder.slurm_job and holder.slurm_job == self.me.slurm_job
                and holder.slurm_restart != self.me.slurm_restart):
            before = ("" if holder.slurm_restart is None
                      else f" from restart {holder.slurm_restart}")
            return (f"this SLURM job ({holder.slurm_job}), requeued{before} to restart "
                    f"{self.me.slurm_restart}")
        if (holder.host, holder.pid_namespace, holder.boot_id) != (
                self.me.host, self.me.pid_namespace, self.me.boot_id):
            return None
        if holder.pid == self.me.pid and holder.process_start == self.me.process_start:
            return "this process's earlier start"
        if not _pid_alive(holder.pid):
            return f"process {holder.pid} is gone"
        start = _process_start(holder.pid)
        if start is None:
            return f"process {holder.pid} is gone"
        if start and holder.process_start and start != holder.process_start:
            return f"process {holder.pid} is another process now"
        return ""

    def _watch(self, holder: Holder) -> str | None:
        """Watch ``holder``'s heartbeat for up to ``stale_s``: None when it moves,
        :data:`_CHANGED` when the lock is released or changes hands meanwhile (judged
        afresh), the reason to take over when it does not move."""
        log.warning("%s is locked by %s; watching its heartbeat for up to %.0f s",
                    self.run_dir, holder.describe(), self.stale_s)
        deadline = time.monotonic() + self.stale_s
        poll = min(5.0, self.heartbeat_s / 3)
        while time.monotonic() < deadline:
            time.sleep(poll)
            now = read_holder(self.path)
            if now is None or now.token != holder.token:
                return _CHANGED
            if now.beat != holder.beat:
                return None
        return f"no heartbeat for {self.stale_s:.0f} s"

    def _take_over(self, holder: Holder) -> None:
        """Remove ``holder``'s lock (the caller creates its own next). Two starts taking
        over the same dead holder at once: each removes only a lock still naming it."""
        aside = self.path.with_name(f"{self.path.name}.{self.me.token}.stale")
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return
        taken = read_holder(aside)
        if taken is not None and taken.token != holder.token:
            # another start took over first and created its own: put that one back
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
        aside.unlink(missing_ok=True)

    # -- holding it ---------------------------------------------------------------------

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                if not self.still_held():
                    return
                self.me.beat += 1
                _write(self.path, self.me)
            except OSError as err:
                # a filesystem hiccup (ESTALE, EIO on NFS/Lustre): the next beat tries
                # again; a thread that died here would stop beating, and another job
                # would take the run over while this one saves on
                log.warning("%s: heartbeat not written (%s)", self.path, err)

    def still_held(self) -> bool:
        """Whether the lock file still names this process (re-read; OSError propagates).
        The first time it does not: logged, :attr:`lost` set, and a stop requested, so
        the training loop ends at its next step, where its save is refused
        (:func:`lost_message`): a job that lost its run writes nothing more to it."""
        if self.lost is not None:
            return False
        now = read_holder(self.path)
        if now is not None and now.token == self.me.token:
            return True
        self.lost = now or Holder(token="", **_UNKNOWN)
        log.error("%s: this job's lock was taken over by %s; it stops at its next step "
                  "without saving", self.run_dir, self.lost.describe())
        preemption.request_stop()
        return False

    def release(self) -> None:
        """Stop the heartbeat and remove the lock when it is still this process's. Never
        raises and never waits long: it runs in the ``finally`` of a run that may be
        ending on another error, and at exit. A lock left behind (a filesystem error
        here) is taken over by the next start as any dead holder's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)  # a beat stuck in a hung filesystem
        try:
            holder = read_holder(self.path)
            if holder is not None and holder.token == self.me.token:
                self.path.unlink(missing_ok=True)
        except OSError as err:
            log.warning("%s: lock not removed (%s); the next start takes it over", self.path,
                        err)


_CHANGED = "changed"  # _watch: the lock was released or changed hands while watched
_HELD: RunLock | None = None
_GUARD = threading.Lock()


def acquire(run_dir: Path, heartbeat_s: float = HEARTBEAT_S,
            stale_s: float = STALE_S) -> RunLock:
    """This process holds ``run_dir``'s lock from now until :func:`release` or exit (a
    lock this process held before is released first: a process trains one run at a
    time). Raises :class:`RunLockError` when another live job holds it."""
    global _HELD
    with _GUARD:
        if _HELD is not None:
            _HELD.release()
            _HELD = None
        lock = RunLock(run_dir, heartbeat_s, stale_s)
        lock.acquire()
        _HELD = lock
        return lock


def release() -> None:
    """Release this process's lock (nothing when it holds none)."""
    global _HELD
    with _GUARD:
        if _HELD is not None:
            _HELD.release()
            _HELD = None


def releasing(entry: Callable[P, R]) -> Callable[P, R]:
    """``entry`` (a run's entry point: pre-training, a fine-tuning task's ``train``) with
    this process's lock released when it returns or raises. A run started from Python
    outlives its entry point: its lock stayed held, its heartbeat thread beating, and
    once the run directory went (a notebook's temporary folder) that thread took the
    missing file for a takeover and asked whatever the process trained next to stop."""

    @functools.wraps(entry)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return entry(*args, **kwargs)
        finally:
            release()

    return run


def lost_message(run_dir: Path) -> str | None:
    """Why this process may not write ``run_dir`` any more (another job took its lock
    over); None when it holds the lock, or holds none for ``run_dir`` (nothing to check:
    a caller that never locked)."""
    held = _HELD
    if held is None or Path(run_dir).resolve() != held.run_dir.resolve():
        return None
    try:  # read again at each save (rank 0, ~300 bytes): not only the heartbeat's view
        if held.still_held():
            return None
    except OSError as err:  # unreadable now: the heartbeat goes on checking
        log.warning("%s: lock not readable at this save (%s)", held.path, err)
        return None
    assert held.lost is not None
    return (f"{run_dir} was taken over by {held.lost.describe()} while this job stalled "
            f"(no heartbeat for {held.stale_s:.0f} s); this job stops without saving so "
            f"that the two never write one run")


atexit.register(release)
