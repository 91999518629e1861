"""Before a run computes anything: can its sources be read? (``s3://`` objects; local
shards exist; on a fresh start, whether ``s3://``, ``pipe:`` and ``http(s)://`` shards
start like tars.)

Once a run is going, a store that does not answer is waited out (data/shard_schedule.py:
an outage pauses the streams, it never ends the run). At the start, the same wait hides a
configuration mistake for ever: a mistyped ``data.s3.endpoint_url``, a bucket name or
prefix that is not there, credentials the store rejects. Every GPU of the run would sit
idle behind "storage unavailable" warnings, and a SLURM job would requeue into the same.
So each rank opens its sources' ``.txt`` shard lists and a few shards of every remote
source once, before the model is built (:func:`check_sources_readable`), and a store that
cannot serve them ends the run with one message naming the source, the store's answer and
what to check. A run that continues a checkpoint, or a requeued job (:data:`REQUEUED_ENV`),
has been served by its store: one that does not answer then is an outage and is waited
for here, as the streams would; a missing source or refused credentials still end it.

Each part of a source is checked on its own: every brace pattern and every ``.txt`` list
among its URLs, as configured (a YAML list, or ``::``-joined as in webdataset), must hold a
shard, so a typo in one part of a mix is named here, not skipped by the streams for ever;
shards named one by one form one part. A list's own lines, nested lists included, are its
part's shards, walked by the loader's own walker (``data.sources.expand_urls``), every
list read here under the same rules as the top-level ones (:meth:`_Probe.read_list`): a
list that lists itself, or lists no shard (empty, or only comments), is refused there, as
the loader refuses it, here naming the source. A local or http(s) list that cannot be
read is named as an ``s3://`` one is (the source, and the list it was listed in).

The ranks agree (``gather``: an all-gather of each rank's outcome, e.g.
``runtime.dist.all_gather_objects``): a refusal on any rank is raised on every rank,
naming the failing ranks and their messages (any other error a check raises on a fresh
start too, as its type and message), so that every rank's log (rank 0's, which
``submit --wait`` shows) says why the run ended; :func:`check_sources_readable` reasons
why that adds neither a deadlock nor a collective timeout.

Cost, per rank: each shard list once (a HEAD and a GET; the loader reads it again), and
per part at most :data:`PROBES_PER_SOURCE` shard opens (a HEAD each, plus a LIST for a
missing key; through the shard reader and its ``s3.retries``), and on a fresh start, for
each shard that opens, one ranged GET of its first 512 bytes (:meth:`_Probe.head`); the
first shard that starts like a tar (a resumed run: that opens) ends the part's probes.
At 512 ranks x 3 sources of one brace pattern each: 1,536 HEADs and 1,536 ranged GETs of
512 bytes (768 KiB in all) when each part's first shard is a tar, at most 9,216 requests
(6 a part: three that open and are no tars, or two missing before the last; a resumed
run at most 5; a refused part ends the check), plus 1,024 per shard list; and one
all-gather of the outcomes, which torch runs as two collectives (the sizes, then the
pickled outcomes padded to the largest: a few bytes per rank when all pass, at most
:data:`MAX_MESSAGE` characters when some fail, so at most ~1 MB received per rank);
nothing afterwards. A shard missing here and there is normal at scale and is skipped and
counted by the streams; only a part none of whose probed shards exists is refused.

``pipe:`` and ``http(s)://`` shards (and gopen's other schemes: webdataset runs a command
for each, ``curl -f -s -L`` for http(s)) report nothing until read, and their failures
carry no code: a ``pipe:curl -f`` whose URL is wrong or whose token expired exits 22,
which the streams take for an outage and wait out for ever; ``curl -s`` without ``-f``
exits 0 with the server's HTML error page, which the streams set aside as damaged shard
after shard (then end the source's stream; the run stops at its first batch when no source
is left, trains on the others without it when one is). So on a fresh start each part's
first, middle and last such shard is read through the streams' reader until one starts
like a tar (:func:`_not_a_tar`: a tar header that passes its checksum, or gzip, bzip2 or xz
magic): its first 512 bytes, then its command is killed (with what it started: a
``pipe:`` runs under ``sh -c``), so a probe never reads a whole shard nor waits for a
command to end; a command that fails is run again (``s3.retries``, with backoff), one that
writes no block within :data:`PEEK_TIMEOUT_S` is stopped and counted unread. A part none
of whose probes passes is refused, each probe's outcome named (``exit status 22``, ``not a
tar: starts with b'<!DOCTYPE html>'``). A resumed run or requeued job does not probe them:
there a failing command may be an outage, which the streams wait out as before. Cost: per
rank and part, one command when its first probe passes (at 512 ranks x 3 sources: 1,536
``curl`` or ``aws`` processes started within seconds against the sources' hosts, fewer
than the streams' own first reads, one per worker and source); at most 3 x (1 +
``s3.retries``) when none does (27,648 at 512 x 3 with the default 5 retries, spread over
the backoff; up to 3 x :data:`PEEK_TIMEOUT_S` of waiting for a host that does not answer).
Each reads one block; what a killed command had fetched beyond it (its pipe's 64 KiB, its
socket buffers) is dropped.

``s3://`` shards that open can still be no tars: a pattern naming parquet files or a
folder of JPEGs, an HTML error page uploaded as ``.tar``; the streams would set every
shard aside as damaged. So on a fresh start each probed shard that opens is read too: its
first 512 bytes, in ONE ranged GET (s3fs's ``cat_file`` through the streams' filesystem:
their endpoint, credentials and refusal rules; a read of the open file would fetch
``s3.block_size`` more as read-ahead, 16 MiB by default: 24 GiB at 512 x 3), checked as a
command's block is (:func:`_not_a_tar`). A part whose probes open but none starts like a
tar is refused, each probe's outcome named (``first: not a tar: starts with b'PAR1...';
middle: not found; last: empty: not a byte``); a part none of whose probes opens is
refused as missing or refused, as before. A resumed run or requeued job only opens them.
(``.txt`` lists of any kind are read as the loader reads them; local shards are not
opened: one of a part's first, middle and last local shards must exist, a stat each.)
"""

from __future__ import annotations

import dataclasses
import glob
import io
import logging
import os
import re
import signal
import tarfile
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from data.config import S3Config
from data.shard_schedule import COOLDOWN_CAP_S, REFUSAL_CAUSES, StorageAccessError
from data.sources import ShardListError, expand_urls, list_label, url_items
from data.storage import (
    RetryingReader,
    StorageSetupError,
    StoreRefusedError,
    config_fault,
    endpoint,
    is_missing,
    is_remote,
    local_path,
    refusal_code,
    refused_code,
    s3_filesystem,
    setup_failure,
    setup_fault,
)
from data.tar_stream import BLOCK, open_tar_stream, read_exact
from runtime.redact import redact_url

log = logging.getLogger(__name__)

PROBES_PER_SOURCE = 3
"""Shards of a source's part opened at most: its first, middle and last (a wrong prefix or
bucket misses all three; a few missing shards of a good list rarely do)."""
REQUEUED_ENV = "INTERNIMAGE_REQUEUED"
"""Set to ``1`` by the SLURM job wrapper (launch/slurm/job.py) in a requeued job: its run
may have no checkpoint yet, but its store has served it."""
MAX_MESSAGE = 2000
"""Characters of a rank's refusal sent to the others (the messages are a few hundred)."""
MAX_AGREED = 3
"""Distinct refusals an agreed error spells out; the ranks of the others are named."""
PEEK_TIMEOUT_S = 60.0
"""How long a ``pipe:`` or ``http(s)://`` probe waits for a shard's first block before it
stops the command and counts the shard unread (a host that does not answer: webdataset's
``curl`` for http(s) retries a connection timeout 30 times, 30 s each)."""
SHOWN_BYTES = 48
"""Bytes of a probed shard that is not a tar shown in the refusal (an HTML or XML error
page names itself there: ``<!DOCTYPE html>``, ``<Error><Code>AccessDenied``)."""
_EXIT = re.compile(r": exit (-?\d+) \(read\)")  # webdataset's Pipe: "...: exit 22 (read) {}"
_CURL_EXITS = {  # curl(1), EXIT CODES: what most shard commands are
    6: "curl: could not resolve the host",
    7: "curl: could not connect to the host",
    22: "curl -f: the server answered an HTTP error, >= 400",
    28: "curl: timed out",
}


def _spread(urls: Sequence[str], k: int) -> list[str]:
    """Up to ``k`` URLs spread over ``urls``: first, last and evenly between."""
    if len(urls) <= k:
        return list(urls)
    picks = {round(i * (len(urls) - 1) / (k - 1)) for i in range(k)}
    return [urls[i] for i in sorted(picks)]


def _describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {redact_url(str(err))[:300]}"


def _where(part: str | None, urls: Sequence[str], probes: Sequence[str]) -> str:
    """The probed shards of a part, in words (``its first, middle and last shard (of 40)
    in <part>``)."""
    where = ("its shards" if len(urls) <= len(probes) else
             f"its first, middle and last shard (of {len(urls)})")
    return where if part is None else f"{where} in {redact_url(part)}"


def _not_a_tar(head: bytes) -> str | None:
    """None when ``head``, a shard's first :data:`BLOCK` bytes (fewer: all it held), starts
    a tar as the streams read one (data.tar_stream): a header that passes the reader's own
    check, ``tarfile.TarInfo.frombuf`` (its checksum: the unsigned, or historically signed,
    sum of the block's bytes with the checksum field, 8 bytes at offset 148, counted as
    spaces, against that field's octal number, as POSIX ustar and GNU tar define it), or
    gzip, bzip2 or xz magic (the reader decompresses those; what they hold is not checked
    here). Else what the shard held instead, e.g. ``not a tar: starts with
    b'<!DOCTYPE html>'``."""
    if open_tar_stream(io.BytesIO(head))[1]:
        return None
    if not head:
        return "empty: not a byte"
    shown = redact_url(repr(head[:SHOWN_BYTES]))
    if len(head) < BLOCK:
        return f"not a tar: {len(head)} bytes in all, {shown}"
    if head.count(0) == BLOCK:
        return "an empty tar: its first block is the end-of-archive marker"
    try:
        tarfile.TarInfo.frombuf(head, "utf-8", "surrogateescape")
    except tarfile.HeaderError:
        return f"not a tar: starts with {shown}"
    return None


def _failure(url: str, err: BaseException) -> str:
    """A failed probe read in words: a command's exit status (what it means, for curl's
    common ones), or the error's type and message."""
    match = _EXIT.search(str(err))
    if match is None:
        return _describe(err)
    status = int(match.group(1))
    if status < 0:
        return f"killed by signal {-status}"
    meaning = _CURL_EXITS.get(status) if (not url.startswith("pipe:") or "curl" in url) else None
    meaning = meaning or ("the shell: command not found" if status == 127 else None)
    return f"exit status {status}" + (f" ({meaning})" if meaning else "")


def _unopened(err: BaseException) -> str:
    """A probed shard that did not open, in words, among other probes' outcomes."""
    if isinstance(err, StoreRefusedError):  # its text: "<code>: <message> (object ...)"
        return f"refused ({str(err).split(':', 1)[0]})"
    return "not found" if is_missing(err) else _describe(err)


def _outcomes(probes: Sequence[tuple[str, str]], spread: bool) -> str:
    """Each probe's outcome, ``first: <outcome>; middle: ...`` when ``spread`` (the
    first, middle and last shard of more), else by URL."""
    labels = (["first", "middle", "last"] if spread else
              [redact_url(url) for url, _ in probes])
    return "; ".join(f"{label}: {outcome}" for label, (_, outcome) in zip(labels, probes))


def _freeze(pid: int) -> None:
    """Stop ``pid`` (SIGSTOP) and wait, briefly, until the kernel shows it stopped: from
    then on it starts no process (a shell between two commands would fork the next one
    after its children were listed, and that one would outlive the kill)."""
    try:
        os.kill(pid, signal.SIGSTOP)
    except OSError:  # ended meanwhile
        return
    for _ in range(100):  # kill() only queues the signal
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):  # ended meanwhile, or no /proc
            return
        if state in ("T", "t", "Z", "X"):
            return
        time.sleep(0.001)


def _process_tree(pid: int) -> list[int]:
    """``pid`` and the processes below it, each stopped (:func:`_freeze`) before its
    children are listed, from Linux's ``/proc/<pid>/task/<tid>/children`` (elsewhere, or
    on a kernel without that file: ``pid`` alone)."""
    tree, i = [pid], 0
    while i < len(tree):
        _freeze(tree[i])
        for path in glob.glob(f"/proc/{tree[i]}/task/*/children"):
            try:
                with open(path) as f:
                    tree.extend(int(child) for child in f.read().split())
            except (OSError, ValueError):  # ended meanwhile
                pass
        i += 1
    return tree


def _stop_command(reader: RetryingReader | None) -> None:
    """Kill the command a ``pipe:`` or ``http(s)://`` reader reads from, and what it
    started, so that closing the reader returns at once.

    Why: webdataset's ``Pipe.close`` closes the pipe and then waits for the command, up to
    two hours. A command that is writing ends at its next write (SIGPIPE, or curl's exit
    23), but one that does not write (a host that does not answer, a stalled download)
    would hold the probe that long, and a ``pipe:`` command runs under ``sh -c``, whose
    children keep the pipe open when only the shell is ended. The exit status of a killed
    command is never read: the reader's close swallows the error it raises. RetryingReader
    keeps its open stream in ``_f``: webdataset's ``Pipe`` for these URLs (its ``proc``:
    the command); another stream has no ``proc`` and is left to its close."""
    proc = getattr(getattr(reader, "_f", None), "proc", None)
    if proc is None or proc.poll() is not None:
        return
    for pid in _process_tree(proc.pid):  # all stopped: none starts anything more
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:  # ended meanwhile
            pass


def _first_block(url: str, s3: S3Config, timeout: float) -> tuple[bytes, BaseException | None]:
    """(the first :data:`BLOCK` bytes of ``url``, fewer where it ends; None), or (b"", the
    error that ended the read: ``TimeoutError`` when no block came within ``timeout`` s),
    read through the streams' reader (:class:`RetryingReader`: webdataset's ``gopen``) with
    ``s3``'s retries (the caller's are 0: a retry after the timeout would run the command
    again, unwatched), the command stopped after the block or the timeout."""
    box: dict[str, Any] = {}
    done = threading.Event()

    def read() -> None:
        try:
            with RetryingReader(url, s3) as reader:
                box["reader"] = reader
                try:
                    box["head"] = read_exact(reader, BLOCK)
                finally:
                    _stop_command(reader)  # not the whole shard: a block is all we need
        except Exception as err:  # noqa: BLE001 - the probe's outcome, whatever it is
            box["error"] = err
        finally:
            done.set()

    # A thread: a read from a command that writes nothing blocks until the command ends
    threading.Thread(target=read, name="preflight-probe", daemon=True).start()
    if done.wait(timeout):
        return box.get("head", b""), box.get("error")
    _stop_command(box.get("reader"))  # its pipe closes: the thread's read returns, and ends
    return b"", TimeoutError(f"no {BLOCK} bytes within {timeout:g} s (the command was stopped)")


class _Probe:
    """Opens objects of one source with the start's rules (see the module docstring)."""

    def __init__(self, name: str, s3: S3Config, resumed: bool,
                 clock: Callable[[], float], sleep: Callable[[float], None]):
        self.name, self.s3, self.resumed = name, s3, resumed
        self.clock, self.sleep = clock, sleep

    def open(self, url: str, read: bool = False, head: bool = False
             ) -> tuple[BaseException | None, bytes]:
        """(None, the object's bytes when ``read``, its first :data:`BLOCK` bytes when
        ``head`` (:meth:`head`), else b"") when ``url`` opens; (the refusal or the missing
        error, b"") when it does not. A store that does not answer through ``s3.retries``
        ends the run (a fresh start) or is waited for (a resumed run)."""
        waiting_since = last_warning = None
        while True:
            try:
                with RetryingReader(url, self.s3) as reader:  # opens at once, retrying
                    if head:
                        return None, self.head(url, reader.size)
                    return None, reader.read() if read else b""
            except StoreRefusedError as err:
                return err, b""
            except Exception as err:  # noqa: BLE001 - every failure is sorted here
                if is_missing(err):
                    return err, b""
                if isinstance(err, StorageSetupError) or setup_fault(err):
                    # no wait mends it, a resumed run's neither (it waited for ever)
                    failure = err if isinstance(err, StorageSetupError) else setup_failure(
                        url, err)
                    raise StorageSetupError(f"data source {self.name!r}: {failure}") from None
                if not self.resumed:
                    raise StorageAccessError(
                        f"data source {self.name!r}: cannot read from the object store at "
                        f"{redact_url(endpoint(self.s3) or 'the default AWS endpoint')}: "
                        f"opening {redact_url(url)} failed through s3.retries = "
                        f"{self.s3.retries} retries ({_describe(err)}). Check "
                        "data.s3.endpoint_url (or AWS_ENDPOINT_URL) and the network from "
                        "this node; if the store is down, start the run again once it is "
                        "back (a resumed run waits for its store)") from None
                now = self.clock()
                waiting_since = waiting_since if waiting_since is not None else now
                if last_warning is None or now - last_warning >= COOLDOWN_CAP_S:
                    last_warning = now
                    log.warning("data source %r: the object store does not answer (%s) for "
                                "%.0f s so far; a resumed run waits for it", self.name,
                                _describe(err), now - waiting_since)
                self.sleep(self.s3.max_backoff)

    def head(self, url: str, size: int | None) -> bytes:
        """The first :data:`BLOCK` bytes of the ``s3://`` object ``url`` (of ``size``
        bytes, when its open told), in ONE ranged GET through the streams' filesystem
        (their endpoint and credentials): s3fs's ``cat_file`` with a range fetches exactly
        those bytes, where a read of the open file would fetch ``s3.block_size`` (16 MiB)
        more as read-ahead. Transient errors are retried ``s3.retries`` times, with
        backoff; a refusal raises :class:`StoreRefusedError`, as the shard reader's does."""
        if size == 0:
            return b""  # a range of an empty object is answered 416: nothing to read
        end = BLOCK if size is None else min(BLOCK, size)
        failures = 0
        while True:
            try:
                return s3_filesystem(self.s3).cat_file(url, start=0, end=end)
            except Exception as err:  # noqa: BLE001 - sorted below
                code = refusal_code(url, err)
                if code is not None:
                    raise StoreRefusedError(f"{code}: {redact_url(str(err))[:200]} (object "
                                            f"{redact_url(url)})") from err
                if is_missing(err) or config_fault(err) or failures >= self.s3.retries:
                    raise
            self.sleep(min(self.s3.backoff * 2**failures, self.s3.max_backoff))
            failures += 1

    def first_open(self, urls: Sequence[str], read: bool, tar: bool = False
                   ) -> tuple[list[tuple[str, BaseException]], list[tuple[str, BaseException]],
                              list[tuple[str, str]], bytes]:
        """Open ``urls`` in turn until one opens (with ``tar``: and its first block starts
        like a tar, :func:`_not_a_tar`): ([], [], [], its bytes when ``read``) then; else
        (refusals, missing, the ones that opened but are not tars with what they held,
        b"")."""
        refusals: list[tuple[str, BaseException]] = []
        missing: list[tuple[str, BaseException]] = []
        not_tars: list[tuple[str, str]] = []
        for url in urls:
            err, data = self.open(url, read, head=tar)
            if err is None:
                failure = _not_a_tar(data) if tar else None
                if failure is None:
                    return [], [], [], data
                not_tars.append((url, failure))
                continue
            (refusals if isinstance(err, StoreRefusedError) else missing).append((url, err))
        return refusals, missing, not_tars, b""

    def require_one(self, urls: Sequence[str], what: str, read: bool = False,
                    tar: bool = False, spread: bool = False) -> bytes:
        """Raise :class:`StorageAccessError` unless one of ``urls`` opens (its bytes when
        ``read``); refusals are retried for ``s3.auth_grace_s`` (each retry reads the
        credentials again: a refresher may be about to rotate them), as a running
        stream's. With ``tar`` (``s3://`` shards on a fresh start), one of them must also
        start like a tar (:meth:`head`); when some open but none does, the refusal names
        each probe's outcome (``spread``: the first, middle and last of more, named so;
        else by URL), as :meth:`require_tar`'s does."""
        deadline = self.clock() + self.s3.auth_grace_s
        while True:
            refusals, missing, not_tars, data = self.first_open(urls, read, tar)
            if not refusals and not missing and not not_tars:
                return data
            # an object that opened: the credentials work, no refusal is waited out
            if not refusals or not_tars or self.clock() >= deadline:
                break
            log.warning("data source %r: the object store refuses to open %s (%s); trying "
                        "again for up to %.0f s more (s3.auth_grace_s): refresh the "
                        "credentials", self.name, what, refusals[0][1],
                        deadline - self.clock())
            self.sleep(max(0.0, min(self.s3.max_backoff, deadline - self.clock())))
        if not_tars:  # the store serves the part, but not tar shards
            outcomes = dict(not_tars)
            outcomes.update((url, _unopened(err)) for url, err in (*refusals, *missing))
            raise StorageAccessError(
                f"data source {self.name!r}: none of {what} could be read as a tar "
                f"({_outcomes([(u, outcomes[u]) for u in urls], spread)}). Check the "
                "source's urls: they must name webdataset tar shards (.tar, or .tar.gz)")
        if refusals:
            url, err = refusals[0]
            code = refused_code(f"{StoreRefusedError.__name__}: {err}") or "refused"
            cause, remedy = REFUSAL_CAUSES.get(code, REFUSAL_CAUSES["*"])
            raise StorageAccessError(
                f"data source {self.name!r}: the object store refuses to open {what} "
                f"({len(refusals)} of {len(urls)} tried, for s3.auth_grace_s = "
                f"{self.s3.auth_grace_s:g} s; e.g. {redact_url(url)}: {err}): {cause}. "
                f"{remedy}")
        url, err = missing[0]
        raise StorageAccessError(
            f"data source {self.name!r}: {what} not found ({redact_url(url)}: "
            f"{_describe(err)}). Check the source's urls (bucket, prefix, brace range)")

    def peek(self, url: str) -> str | None:
        """None when the ``pipe:`` or ``http(s)://`` shard ``url`` starts like a tar
        (:func:`_not_a_tar`); else what its probe gave (``exit status 22 (...)``, ``not a
        tar: starts with b'<!DOCTYPE html>'``). A command that fails is run again as a
        stream's read would be (``s3.retries``, with backoff: 512 ranks starting at once may
        be answered 429 or 503 by one host); what a command wrote is not read twice, nor is
        one that timed out run again (each attempt waits up to :data:`PEEK_TIMEOUT_S`)."""
        once = dataclasses.replace(self.s3, retries=0)
        failures = 0
        while True:
            head, err = _first_block(url, once, PEEK_TIMEOUT_S)
            if err is None:
                return _not_a_tar(head)
            if isinstance(err, TimeoutError) or failures >= self.s3.retries:
                return str(err) if isinstance(err, TimeoutError) else _failure(url, err)
            self.sleep(min(self.s3.backoff * 2**failures, self.s3.max_backoff))
            failures += 1

    def require_tar(self, urls: Sequence[str], what: str, spread: bool) -> None:
        """Raise :class:`StorageAccessError` unless one of the ``pipe:`` or ``http(s)://``
        shards ``urls`` starts like a tar (:meth:`peek`, in turn: the first that does ends
        the probes). ``what``: the shards, in words (:func:`_where`); ``spread``: they are
        the first, middle and last of more (each outcome is named so; else by its URL)."""
        failed: list[tuple[str, str]] = []
        for url in urls:
            failure = self.peek(url)
            if failure is None:
                return
            failed.append((url, failure))
        raise StorageAccessError(
            f"data source {self.name!r}: none of {what} could be read as a tar "
            f"({_outcomes(failed, spread)}). Check the command, the host, the path and any "
            "token it needs")

    def expand(self, item: str) -> list[str]:
        """The shard URLs of one item of a source's urls (a brace pattern, or a ``.txt``
        list), as the loader reads them: through ``data.sources.expand_urls``, the one
        walker of lists, each list read by :meth:`read_list`; a list that lists itself or
        lists no shard (:class:`~data.sources.ShardListError`) is refused, naming the
        source."""
        try:
            return expand_urls(item, self.s3, read_list=self.read_list)
        except ShardListError as err:
            raise StorageAccessError(f"data source {self.name!r}: its {err}") from None

    def read_list(self, url: str, parents: tuple[str, ...]) -> bytes:
        """The bytes of the ``.txt`` shard list ``url`` (``parents``: the lists that led
        to it; a ``data.sources.ListReader``): an ``s3://`` list opened under
        :meth:`require_one`'s rules, a local or http(s) one read as the loader reads it (not
        probed). One that cannot be read raises :class:`StorageAccessError` naming the
        source and where the list was listed, as an ``s3://`` one does (a bare
        FileNotFoundError named neither, and escaped the ranks' agreement)."""
        what = f"its {list_label(url, parents)}"
        if url.startswith("s3://"):
            return self.require_one([url], what, read=True)
        try:
            with RetryingReader(url, self.s3) as reader:
                return reader.read()
        except Exception as err:  # noqa: BLE001 - any failure: the list is named
            if is_missing(err):
                raise StorageAccessError(
                    f"data source {self.name!r}: {what} not found ({_describe(err)}). Check "
                    "the source's urls, and that the list's filesystem is mounted on this "
                    "node") from None
            raise StorageAccessError(f"data source {self.name!r}: {what} cannot be read: "
                                     f"{_describe(err)}") from err

    def parts(self, urls: list[str] | str) -> list[tuple[str | None, list[str]]]:
        """(part, its shard URLs) of a source as configured: each brace pattern and each
        list is a part of its own; the shards named one by one form one part (None)."""
        parts: list[tuple[str | None, list[str]]] = []
        single: list[str] = []
        for item in url_items(urls):
            shards = self.expand(item)
            if item.endswith(".txt") or len(shards) > 1:
                parts.append((item, shards))
            else:
                single.extend(shards)
        return ([(None, single)] if single else []) + parts


def check_source_readable(name: str, urls: list[str] | str, s3: S3Config,
                          resumed: bool = False,
                          clock: Callable[[], float] = time.monotonic,
                          sleep: Callable[[float], None] = time.sleep) -> None:
    """Raise :class:`StorageAccessError` when a source's ``s3://`` objects cannot be read:
    one of its ``.txt`` shard lists (nested ones too), or, for any of its parts (each brace
    pattern or list; the shards named one by one together), all of a few of its shards
    (first, middle, last), because the store cannot be reached, does not hold them, or
    refuses them; when any of its ``.txt`` lists (local, http(s) or ``s3://``) cannot be
    read, lists itself or lists no shard; when none of a few local shards of a part
    (first, middle, last) exists; and, on a fresh start, when none of a few
    ``s3://``, ``pipe:`` or ``http(s)://`` shards of a part starts like a tar (the module's
    docstring). ``urls``: the source's URL items as configured (brace patterns, ``::``
    joins, ``.txt`` lists). ``resumed``: the run continues a checkpoint (a requeued job
    counts too): a store that does not answer is waited for instead, and shards are only
    opened, not read (commands not run)."""
    probe = _Probe(name, s3, resumed or os.environ.get(REQUEUED_ENV) == "1", clock, sleep)
    for part, shards in probe.parts(urls):  # the lists first: parts() reads them
        # local shards: one of a few must exist (a stat each; a list part holds one at
        # least: the walker refuses an empty list). Unchecked, a mistyped path started
        # the run, each worker then found every shard of the source missing, one by one,
        # before it trained on without the source (a wrong mix, nothing refused)
        local = [u for u in shards if not is_remote(u)]
        if local:
            probes = _spread(local, PROBES_PER_SOURCE)
            if not any(os.path.isfile(local_path(u)) for u in probes):
                raise StorageAccessError(
                    f"data source {name!r}: {_where(part, local, probes)} not found (no "
                    f"file {probes[0]}). Check the source's urls (path, brace range), and "
                    "that the file system holding them is mounted on this node")
        stored = [u for u in shards if u.startswith("s3://")]
        if stored:
            probes = _spread(stored, PROBES_PER_SOURCE)
            # on a fresh start, one of them must start like a tar too (one ranged GET of
            # its first block): objects that are not tars would each be set aside damaged
            probe.require_one(probes, _where(part, stored, probes), tar=not probe.resumed,
                              spread=len(stored) > len(probes))
        # pipe: and http(s):// (all that webdataset's gopen opens): only on a fresh start;
        # their failures carry no code to tell an outage from a mistake (the module's
        # docstring), and a resumed run's streams wait an outage out
        commands = [u for u in shards if is_remote(u) and not u.startswith("s3://")]
        if commands and not probe.resumed:
            probes = _spread(commands, PROBES_PER_SOURCE)
            probe.require_tar(probes, _where(part, commands, probes),
                              spread=len(commands) > len(probes))


def check_sources_readable(sources: Sequence[tuple[str, list[str] | str]], s3: S3Config,
                           resumed: bool = False,
                           gather: Callable[[str | None], list] | None = None) -> None:
    """:func:`check_source_readable` for every ``(name, urls as configured)`` source.

    ``gather``: None, each rank decides alone; else the ranks agree: a callable that every
    rank calls once with its outcome (None; its refusal's message; or, for any other error
    the checks raised, its type and message, e.g. ``FileNotFoundError: ...``) and that
    returns every rank's, in rank order (``runtime.dist.all_gather_objects``): a failure on
    any rank is then raised on every rank, as one :class:`StorageAccessError` naming the
    failing ranks (e.g. ``rank 1 of 2: data source 'laion': ...``), except that a rank whose
    own error is not a refusal raises that error, chained from the agreed one (its
    traceback: an unexpected error's only trace); alone (one rank), a failure is raised as
    it is. Collective: every rank calls it with such a ``gather``, which each calls once,
    except a rank that fails in a resumed run: it raises at once, alone, as without
    ``gather`` (another rank may be waiting for its store; see below).
    """
    # Why the agreement neither deadlocks nor adds a collective timeout (the process
    # group's: DeepSpeed's default 10 min), reasoned for each outcome of a rank:
    # - it passes: it gathers, waiting for the slowest rank; without the agreement it went
    #   on to build the model and waited as long in the first collective of the DeepSpeed
    #   engine's set-up (the callers run nothing collective in between). A rank waiting out
    #   its store (a resumed run) holds the others in the gather as it held them there,
    #   under the same timeout.
    # - it fails on a fresh start (a refusal, or any other Exception the checks raised):
    #   it gathers. No rank of a fresh start waits for its store (an unreachable store is
    #   refused after s3.retries, refusals after s3.auth_grace_s), so the gather ends once
    #   every rank's bounded probes have; a failure of the gather itself (a rank killed;
    #   the timeout, were another rank to take the run for resumed and wait) raises this
    #   rank's own error. (Before, an error that was not a refusal ended its rank alone:
    #   the others, in the gather, failed there, rank 0's log not saying why.)
    # - it fails in a resumed run: it raises at once, without gathering, as before the
    #   agreement. Another rank may be waiting there for its store for as long as the
    #   outage lasts; gathering would hold this rank's refusal that long, up to a
    #   collective timeout that did not exist before. The ranks that gather then wait, as
    #   they would have waited in the model's first collective, until the launcher ends
    #   them (torchrun, srun --kill-on-bad-exit) when this rank exits. A refusal in a
    #   resumed run (credentials, a source gone) is met by every rank alike in practice,
    #   and then each log has it anyway.
    # - anything else (a signal, KeyboardInterrupt, SystemExit: not an Exception): it ends
    #   its rank alone, the others waiting as in the previous case.
    # Every rank that goes on gathers exactly once, whatever it decided alone, so a rank
    # that takes the run for resumed while another does not still meets it in the gather.
    resumed = resumed or os.environ.get(REQUEUED_ENV) == "1"
    failure: Exception | None = None
    try:
        for name, urls in sources:
            check_source_readable(name, urls, s3, resumed)
    except Exception as err:  # noqa: BLE001 - a refusal or not, the other ranks hear of it
        if gather is None or resumed:
            raise
        failure = err
    if gather is None:
        return
    outcome = None if failure is None else _outcome(failure)
    try:
        outcomes = gather(outcome)
    except Exception:
        if failure is None:
            raise  # as the model's first collective would have failed
        outcomes = None
    if outcomes is None:  # the gather failed (a rank ended, the timeout): this rank's own
        raise failure  # error says more than the gather's
    failed = [(rank, message) for rank, message in enumerate(outcomes) if message is not None]
    if not failed:
        return
    if len(outcomes) == 1 and failure is not None:
        raise failure
    agreed = StorageAccessError(_agreed(failed, len(outcomes)))
    if failure is None or isinstance(failure, StorageAccessError):
        raise agreed from None
    # not a refusal (a bug, an error no check names): its traceback is what this rank's
    # log needs, the agreed error (the others' failures too) its cause
    raise failure from agreed


def _outcome(failure: Exception) -> str:
    """What a failing rank sends the others: a refusal's message, or any other error's
    type and message (``FileNotFoundError: ...``)."""
    if isinstance(failure, StorageAccessError):
        return str(failure)[:MAX_MESSAGE]
    return f"{type(failure).__name__}: {redact_url(str(failure))}"[:MAX_MESSAGE]


def _agreed(failed: list[tuple[int, str]], world: int) -> str:
    """One message for the refusals of ``failed`` ranks: the ranks of each distinct message
    (the first :data:`MAX_AGREED` in full), e.g. ``ranks 0-3, 7 of 8: <message>``."""
    by_message: dict[str, list[int]] = {}
    for rank, message in failed:
        by_message.setdefault(message, []).append(rank)
    shown = [f"{_ranks(ranks)} of {world}: {message}"
             for message, ranks in list(by_message.items())[:MAX_AGREED]]
    rest = sorted(r for ranks in list(by_message.values())[MAX_AGREED:] for r in ranks)
    if rest:
        shown.append(f"other refusals on {_ranks(rest)} (see their logs)")
    return "; ".join(shown)


def _ranks(ranks: list[int]) -> str:
    """``rank 3``, or ``ranks 0-3, 7`` (sorted ranks)."""
    spans: list[list[int]] = []
    for rank in ranks:
        if spans and rank == spans[-1][1] + 1:
            spans[-1][1] = rank
        else:
            spans.append([rank, rank])
    text = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)
    return f"rank {text}" if len(ranks) == 1 else f"ranks {text}"
