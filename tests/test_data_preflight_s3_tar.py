"""The start's probe of a source's ``s3://`` shards (data/preflight.py), on a real object
store: on a fresh start, a part whose probed shards (first, middle, last) open but none of
which starts like a tar is refused, naming each probe's outcome; the probe reads each
shard's first block in one ranged GET; a resumed run only opens them, as before.

Before, an ``s3://`` shard was only opened (a HEAD): a pattern naming objects that are not
tars (parquet files, a folder of JPEGs, an HTML error page stored as ``.tar``) passed the
check, and the streams then set every shard aside as damaged.
"""

from __future__ import annotations

import gzip

import pytest
from s3_server import CREDENTIALS, good_samples, jpeg_bytes, running_server, write_tar

from data.config import S3Config
from data.preflight import check_source_readable
from data.shard_schedule import StorageAccessError

pytestmark = pytest.mark.s3

HTML = b"<!DOCTYPE html><html><body>404 Not Found</body></html>\n"
PARQUET = b"PAR1" + bytes(range(256)) * 16  # parquet's magic, then anything
CHECK = "Check the source's urls: they must name webdataset tar shards (.tar, or .tar.gz)"


@pytest.fixture(autouse=True)
def _fresh_start(monkeypatch):
    monkeypatch.delenv("INTERNIMAGE_REQUEUED", raising=False)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from running_server(tmp_path_factory.mktemp("seaweedfs-preflight-tar"))


@pytest.fixture(scope="module")
def store(server, tmp_path_factory):
    """Bucket ``tars``: good tars (``good/shard-{00..04}.tar``, each far larger than the
    probe's read), gzipped tars, and parts that are not tars."""
    d = tmp_path_factory.mktemp("preflight-tars")
    tars = [write_tar(d / f"shard-{i:02d}.tar", good_samples(f"s{i}-", 4, size=96))
            for i in range(5)]
    server.upload("tars", tars, prefix="good/")
    client = server.client()

    def put(key: str, body: bytes) -> None:
        client.put_object(Bucket="tars", Key=key, Body=body)

    for i, tar in enumerate(tars[:3]):
        put(f"gz/shard-{i}.tar.gz", gzip.compress(tar.read_bytes()))
    for i in range(5):
        put(f"parquet/part-{i:02d}.parquet", PARQUET)
        put(f"jpg/{i:03d}.jpg", jpeg_bytes(i, 32))
    for i in range(3):
        put(f"html/shard-{i}.tar", HTML)
    # a part whose middle shard alone is a tar; one whose first is missing and last empty
    for i in range(5):
        put(f"mixed/shard-{i}.tar", tars[i].read_bytes() if i == 2 else HTML)
    put("holes/shard-2.tar", PARQUET)
    put("holes/shard-4.tar", b"")
    return tars


def _s3(server) -> S3Config:
    return S3Config(endpoint_url=server.endpoint, key=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                    secret=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
                    region=CREDENTIALS["AWS_DEFAULT_REGION"], retries=0, backoff=0.05,
                    max_backoff=0.2, connect_timeout=2, read_timeout=10, auth_grace_s=0.0)


def _refusal(urls, s3: S3Config, **kw) -> str:
    with pytest.raises(StorageAccessError) as err:
        check_source_readable("laion", urls, s3, **kw)
    return str(err.value)


@pytest.fixture
def requests(monkeypatch) -> list[tuple[str, str | None]]:
    """Every S3 API call s3fs makes from here on: (operation, its Range header)."""
    import s3fs

    calls: list[tuple[str, str | None]] = []
    real = s3fs.S3FileSystem._call_s3

    async def recorded(self, method, *args, **kwargs):
        calls.append((method, kwargs.get("Range")))
        return await real(self, method, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", recorded)
    return calls


def test_a_part_of_objects_that_are_not_tars_is_refused_naming_each_probe(server, store):
    s3 = _s3(server)
    parquet = "s3://tars/parquet/part-{00..04}.parquet"
    text = _refusal(parquet, s3)
    shown = repr(PARQUET[:48])
    assert text == (
        f"data source 'laion': none of its first, middle and last shard (of 5) in {parquet} "
        f"could be read as a tar (first: not a tar: starts with {shown}; middle: not a tar: "
        f"starts with {shown}; last: not a tar: starts with {shown}). {CHECK}"), text
    jpgs = "s3://tars/jpg/{000..004}.jpg"
    assert "could be read as a tar (first: not a tar: starts with b'\\xff\\xd8\\xff" in (
        _refusal(jpgs, s3))
    # an HTML error page stored as .tar, three shards (named by URL), smaller than a block
    html = "s3://tars/html/shard-{0..2}.tar"
    assert _refusal(html, s3).startswith(
        f"data source 'laion': none of its shards in {html} could be read as a tar "
        f"(s3://tars/html/shard-0.tar: not a tar: {len(HTML)} bytes in all, "
        "b'<!DOCTYPE html>"), _refusal(html, s3)
    # one part of a mix: named, the good part passing does not hide it
    good = "s3://tars/good/shard-{00..04}.tar"
    for urls in (f"{good}::{parquet}", [parquet, good]):
        assert _refusal(urls, s3).startswith(
            f"data source 'laion': none of its first, middle and last shard (of 5) in "
            f"{parquet} could be read"), urls
    # probes that did not open are named among the outcomes; an empty object too
    holes = "s3://tars/holes/shard-{0..4}.tar"
    assert _refusal(holes, s3) == (
        f"data source 'laion': none of its first, middle and last shard (of 5) in {holes} "
        f"could be read as a tar (first: not found; middle: not a tar: starts with {shown}; "
        f"last: empty: not a byte). {CHECK}")


def test_tars_and_gzipped_tars_pass_and_one_tar_among_the_probes_is_enough(server, store):
    s3 = _s3(server)
    check_source_readable("laion", "s3://tars/good/shard-{00..04}.tar", s3)
    check_source_readable("laion", "s3://tars/gz/shard-{0..2}.tar.gz", s3)
    check_source_readable("laion", "s3://tars/mixed/shard-{0..4}.tar", s3)  # its middle
    # shards named one by one: one part, probed as before
    check_source_readable("laion", ["s3://tars/html/shard-0.tar", "s3://tars/gz/shard-1.tar.gz"],
                          s3)
    # missing everywhere: refused as before, not as "not a tar"
    text = _refusal("s3://tars/typo/shard-{00..04}.tar", s3)
    assert text.startswith("data source 'laion': its first, middle and last shard (of 5) in "
                           "s3://tars/typo/shard-{00..04}.tar not found"), text


def test_the_probe_reads_one_block_in_one_ranged_get(server, store, requests):
    # a shard's first block is one GET of 512 bytes: at the default 16 MiB s3.block_size,
    # a read of the open file would have fetched the whole of these shards
    s3 = _s3(server)
    assert min(t.stat().st_size for t in store) > 4 * 512  # more than the probe reads
    check_source_readable("laion", "s3://tars/good/shard-{00..04}.tar", s3)
    assert requests == [("head_object", None), ("get_object", "bytes=0-511")]
    requests[:] = []
    with pytest.raises(StorageAccessError):
        check_source_readable("laion", "s3://tars/parquet/part-{00..04}.parquet", s3)
    assert requests == [("head_object", None), ("get_object", "bytes=0-511")] * 3


def test_a_resumed_run_or_requeued_job_only_opens_the_shards(server, store, requests,
                                                             monkeypatch):
    # there the store has served the run: objects are opened (HEAD), not read
    s3 = _s3(server)
    parquet = "s3://tars/parquet/part-{00..04}.parquet"
    check_source_readable("laion", parquet, s3, resumed=True)
    assert requests == [("head_object", None)]
    requests[:] = []
    monkeypatch.setenv("INTERNIMAGE_REQUEUED", "1")
    check_source_readable("laion", parquet, s3)
    assert requests == [("head_object", None)]
    # a missing part is still refused
    assert "not found" in _refusal("s3://tars/typo/shard-{00..04}.tar", s3, resumed=True)

