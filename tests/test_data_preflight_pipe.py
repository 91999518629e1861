"""The start's probe of a source's ``pipe:`` and ``http(s)://`` shards (data/preflight.py):
on a fresh start, a part none of whose probed shards (first, middle, last) starts like a tar
is refused, naming the source, the part and what each probe gave; the command is stopped
after the first block, or after :data:`data.preflight.PEEK_TIMEOUT_S` without one.

Before, these URLs were not probed: a ``pipe:curl -f`` source answering 404 or 403 (exit
22) built the model and then waited "storage unavailable" for ever, and ``pipe:curl -s``
(no ``-f``) handed the streams an HTML error page, each shard set aside as damaged. No
network: local commands stand in for curl (``sh -c 'exit 22'`` is what ``curl -f`` returns
for an HTTP status >= 400), and a local HTTP server for a web host (webdataset opens
``http(s)://`` with ``curl -f -s -L``).

The tar header the probe accepts is the format's: POSIX.1-2017, pax, "ustar Interchange
Format" (https://pubs.opengroup.org/onlinepubs/9699919799/utilities/pax.html#tag_20_92_13_06):
a 512-byte header whose ``chksum`` field (8 bytes at offset 148) holds, in octal, the sum of
the header's bytes as unsigned 8-bit values with the ``chksum`` field itself taken as eight
spaces; GNU tar writes the same (its manual, "Basic Tar Format"). :func:`_ustar_header`
builds one by hand from that text, not with Python's tarfile.
"""

from __future__ import annotations

import gzip
import http.server
import random
import shutil
import threading
import time
from pathlib import Path

import pytest
from s3_server import good_samples, write_tar

import data.preflight
from data.config import S3Config
from data.preflight import check_source_readable, check_sources_readable
from data.shard_schedule import StorageAccessError

pytestmark = pytest.mark.skipif(not Path("/proc/self/cmdline").exists(),
                                reason="finds the probes' commands in Linux's /proc")
S3 = S3Config(retries=0, backoff=0.01, max_backoff=0.01)
CHECK = "Check the command, the host, the path and any token it needs"


@pytest.fixture(autouse=True)
def _fresh_start(monkeypatch):
    """A fresh start (not a requeued job); no test leaves a probe's thread behind (each
    probe's command is killed, which ends its read)."""
    monkeypatch.delenv("INTERNIMAGE_REQUEUED", raising=False)
    yield
    for thread in threading.enumerate():
        if thread.name == "preflight-probe":
            thread.join(5)
            assert not thread.is_alive()


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """A folder of three good shards, ``shard-{0..2}.tar``."""
    d = tmp_path_factory.mktemp("pipe-shards")
    for i in range(3):
        write_tar(d / f"shard-{i}.tar", good_samples(f"s{i}-", 2, size=8))
    return d


def _refusal(urls, s3: S3Config = S3, **kw) -> str:
    with pytest.raises(StorageAccessError) as err:
        check_source_readable("laion", urls, s3, **kw)
    return str(err.value)


def _running(token: str) -> list[int]:
    """Processes whose command line holds ``token`` (a zombie's is empty: not counted)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if token.encode() in cmdline.read_bytes().replace(b"\0", b" "):
                found.append(int(cmdline.parent.name))
        except OSError:  # ended meanwhile
            pass
    return found


def _token() -> str:
    """A ``sleep`` duration no other process uses, to find the command again in /proc."""
    return f"{random.randint(300, 900)}.{random.randint(10**5, 10**6 - 1)}"


def test_a_source_of_failing_commands_is_refused_naming_the_part(shards, tmp_path):
    # The case seen this session: every command of a source fails as curl -f does for an
    # HTTP status >= 400; before, the run built its model and waited for ever.
    good = f"pipe:cat {shards}/shard-{{0..2}}.tar"
    bad = "pipe:sh -c 'exit 22' shard-{000..005}.tar"
    for urls in (bad, f"{good}::{bad}", [bad, good]):  # alone, or one part of a mix
        assert _refusal(urls) == (
            f"data source 'laion': none of its first, middle and last shard (of 6) in {bad} "
            "could be read as a tar (first: exit status 22; middle: exit status 22; last: "
            f"exit status 22). {CHECK}")
    # shards named one by one are one part: named by their URL
    assert _refusal(["pipe:exit 3", "pipe:no-such-command-here"]) == (
        "data source 'laion': none of its shards could be read as a tar (pipe:exit 3: exit "
        "status 3; pipe:no-such-command-here: exit status 127 (the shell: command not "
        f"found)). {CHECK}")
    # a failing command is run again as a stream's read would be (s3.retries), then the
    # next probe; the ranks agree on the refusal (a stand-in for the all-gather)
    log = tmp_path / "runs"
    counted = f"pipe:echo run >> {log}; exit 22 # shard-{{0..9}}"
    slept = []
    retried = S3Config(retries=2, backoff=0.5, max_backoff=0.7)
    assert "exit status 22" in _refusal(counted, retried, sleep=slept.append)
    assert len(log.read_text().split()) == 3 * 3 and slept == [0.5, 0.7] * 3
    with pytest.raises(StorageAccessError) as err:
        check_sources_readable([("laion", bad)], S3, gather=lambda mine: [None, mine])
    assert str(err.value).startswith("rank 1 of 2: data source 'laion': none of its first")


def test_a_command_that_writes_no_tar_is_refused_as_not_a_tar():
    # curl -s without -f: exit 0 and the server's error page, which the streams would set
    # aside as damaged, shard after shard
    page = "<!DOCTYPE html><html><head><title>404 Not Found</title></head>"
    long = f"pipe:printf '{page}%600s</html>' '' # shard-{{00..11}}"
    assert _refusal(long) == (
        "data source 'laion': none of its first, middle and last shard (of 12) in "
        f"{long} could be read as a tar (first: not a tar: starts with "
        f"{page[:48].encode()!r}; middle: not a tar: starts with {page[:48].encode()!r}; "
        f"last: not a tar: starts with {page[:48].encode()!r}). {CHECK}")
    assert ("pipe:printf 'Forbidden': not a tar: 9 bytes in all, b'Forbidden'"
            in _refusal("pipe:printf 'Forbidden'"))
    assert "pipe:true: empty: not a byte" in _refusal("pipe:true")
    # an archive that ends at once holds no sample (tar's end-of-archive marker)
    assert ("an empty tar: its first block is the end-of-archive marker"
            in _refusal("pipe:head -c 1024 /dev/zero"))
    # a credential in the command is not repeated in the message
    said = _refusal("pipe:curl -s -L https://user:hunter2@127.0.0.1:9/x.tar?token=hunter2")
    assert "hunter2" not in said and "https://***@127.0.0.1:9/x.tar?token=***" in said


def _ustar_header(name: str, size: int) -> bytes:
    """One ustar header block, laid out and summed as the POSIX text (module docstring)
    says: name[100] mode[8] uid[8] gid[8] size[12] mtime[12] chksum[8] typeflag[1]
    linkname[100] magic[6] version[2] ..., numbers in octal."""
    block = bytearray(512)
    block[0:len(name)] = name.encode()
    block[100:108] = b"0000644\0"
    block[108:116] = b"0000000\0"
    block[116:124] = b"0000000\0"
    block[124:136] = f"{size:011o}\0".encode()
    block[136:148] = b"00000000000\0"
    block[156:157] = b"0"  # a regular file
    block[257:263] = b"ustar\0"
    block[263:265] = b"00"
    block[148:156] = b" " * 8  # summed as spaces
    block[148:156] = f"{sum(block):06o}\0 ".encode()
    return bytes(block)


def test_a_tar_or_compressed_tar_passes_and_its_command_is_stopped(shards, tmp_path):
    check_source_readable("laion", f"pipe:cat {shards}/shard-{{0..2}}.tar", S3)
    runs = tmp_path / "runs"  # the part's first probe passes: no other command is run
    check_source_readable("laion", f"pipe:echo run >> {runs}; cat {shards}/shard-0.tar # "
                          "shard-{0..9}", S3)
    assert runs.read_text().split() == ["run"]
    (tmp_path / "shard.tar.gz").write_bytes(gzip.compress((shards / "shard-0.tar").read_bytes()))
    check_source_readable("laion", f"pipe:cat {tmp_path}/shard.tar.gz", S3)  # 1f 8b
    # a header built from the format's text passes; one whose checksum is off by one is not
    # a tar (the reader would reject it as damaged)
    header = _ustar_header("0001.txt", 5)
    (tmp_path / "spec.tar").write_bytes(header + b"hello".ljust(512, b"\0") + bytes(1024))
    check_source_readable("laion", f"pipe:cat {tmp_path}/spec.tar", S3)
    bad = header[:150] + bytes([header[150] ^ 1]) + header[151:]  # a checksum digit
    (tmp_path / "bad.tar").write_bytes(bad + bytes(1536))
    assert "not a tar: starts with b'0001.txt" in _refusal(f"pipe:cat {tmp_path}/bad.tar")
    # the probe reads one block, then stops the command: not the rest of a 1 GB shard, nor
    # a command that would go on for ever (here a sleep after the shard, under sh -c)
    token = _token()
    started = time.monotonic()
    check_source_readable("laion", f"pipe:cat {shards}/shard-0.tar; sleep {token}", S3)
    assert time.monotonic() - started < 10 and _running(f"sleep {token}") == []
    started = time.monotonic()
    assert "pipe:yes: not a tar: starts with b'y\\ny\\n" in _refusal("pipe:yes")
    assert time.monotonic() - started < 10


def test_a_command_that_writes_nothing_is_stopped_after_the_timeout(monkeypatch):
    # e.g. a host that does not answer: webdataset's curl retries a connection timeout 30
    # times, 30 s each; the probe gives each shard PEEK_TIMEOUT_S, then kills the command
    # and what it started (here sleep, a child of sh -c)
    monkeypatch.setattr(data.preflight, "PEEK_TIMEOUT_S", 0.5)
    token = _token()
    started = time.monotonic()
    assert _refusal(f"pipe:sleep {token}; true") == (
        f"data source 'laion': none of its shards could be read as a tar (pipe:sleep {token}; "
        f"true: no 512 bytes within 0.5 s (the command was stopped)). {CHECK}")
    assert time.monotonic() - started < 10
    for _ in range(50):  # the kill is sent; /proc may show the process a moment longer
        if not _running(f"sleep {token}"):
            break
        time.sleep(0.1)
    assert _running(f"sleep {token}") == []


class _Host(http.server.BaseHTTPRequestHandler):
    """Serves ``/shard-<i>.tar`` from the class's ``files``; anything else: 404, HTML."""

    files: dict[str, bytes] = {}

    def do_GET(self):  # noqa: N802 - http.server's name
        body = self.files.get(self.path)
        status = 200 if body is not None else 404
        if body is None:
            body = b"<!DOCTYPE html><html><body>404 Not Found</body></html>" + b" " * 600
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args):
        pass


@pytest.fixture(scope="module")
def host(shards):
    _Host.files = {f"/shard-{i}.tar": (shards / f"shard-{i}.tar").read_bytes()
                   for i in range(3)}
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Host)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.skipif(shutil.which("curl") is None, reason="webdataset opens http with curl")
def test_http_sources_are_probed_through_curl(host, monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    check_source_readable("laion", f"{host}/shard-{{0..2}}.tar", S3)
    check_source_readable("laion", f"pipe:curl -f -s -L {host}/shard-{{0..2}}.tar", S3)
    missing = f"{host}/typo/shard-{{0..2}}.tar"  # gopen's curl -f: exit 22
    assert _refusal(missing) == (
        f"data source 'laion': none of its shards in {missing} could be read as a tar "
        f"({host}/typo/shard-0.tar: exit status 22 (curl -f: the server answered an HTTP "
        f"error, >= 400); {host}/typo/shard-1.tar: exit status 22 (curl -f: the server "
        f"answered an HTTP error, >= 400); {host}/typo/shard-2.tar: exit status 22 (curl -f: "
        f"the server answered an HTTP error, >= 400)). {CHECK}")
    assert "not a tar: starts with b'<!DOCTYPE html>" in _refusal(
        f"pipe:curl -s -L {host}/typo/shard-{{0..2}}.tar")  # no -f: the error page


def test_a_resumed_run_does_not_probe_commands(tmp_path, monkeypatch):
    # A resumed run (or a requeued job) was served by its commands: one that fails now may
    # be an outage, which the streams wait out; nothing is run here
    ran = tmp_path / "ran"
    failing = f"pipe:touch {ran}; exit 22 # shard-{{0..5}}"
    check_source_readable("laion", failing, S3, resumed=True)
    monkeypatch.setenv("INTERNIMAGE_REQUEUED", "1")
    check_source_readable("laion", failing, S3)
    check_sources_readable([("laion", failing)], S3, gather=lambda mine: [mine, None])
    assert not ran.exists()
    monkeypatch.delenv("INTERNIMAGE_REQUEUED")
    assert "exit status 22" in _refusal(failing) and ran.exists()  # a fresh start: refused
