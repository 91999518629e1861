"""The start's check of a source's ``s3://`` objects (data/preflight.py), on a real object
store: each part of a mix is checked on its own, a shard list listed by another is read
under the same guard, and the ranks of a run agree on the refusal so that every rank's log
names the rank(s) that failed.

(The check's basics, an unreachable store, refused credentials, a missing source, are in
test_data_auth.py.)
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from s3_server import CREDENTIALS, good_samples, running_server, write_tar

from data.config import S3Config
from data.preflight import check_source_readable, check_sources_readable
from data.shard_schedule import StorageAccessError

pytestmark = pytest.mark.s3


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from running_server(tmp_path_factory.mktemp("seaweedfs-preflight"))


@pytest.fixture(scope="module")
def shards(server, tmp_path_factory) -> list[str]:
    """Three good shards, ``s3://mix/a-shard-{00..02}.tar``."""
    d = tmp_path_factory.mktemp("preflight-shards")
    files = [write_tar(d / f"shard-{i:02d}.tar", good_samples(f"s{i}-", 2, size=8))
             for i in range(3)]
    return server.upload("mix", files, prefix="a-")


def _s3(server) -> S3Config:
    return S3Config(endpoint_url=server.endpoint, key=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                    secret=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
                    region=CREDENTIALS["AWS_DEFAULT_REGION"], retries=0, backoff=0.05,
                    max_backoff=0.2, connect_timeout=2, read_timeout=10, auth_grace_s=0.0)


def _put_list(server, key: str, lines: list[str]) -> str:
    server.client().put_object(Bucket="mix", Key=key, Body="\n".join(lines).encode())
    return f"s3://mix/{key}"


def test_each_part_of_a_mix_must_hold_shards(server, shards):
    # Before: a source passed when any part opened, so a typo in one part of a mix was
    # found only by the streams (its shards skipped and counted missing for ever).
    s3 = _s3(server)
    good, typo = "s3://mix/a-shard-{00..02}.tar", "s3://mix/typo-shard-{00..02}.tar"
    for urls in (f"{good}::{typo}", [good, typo], [f"{typo}::{good}"]):
        with pytest.raises(StorageAccessError) as err:
            check_source_readable("mix", urls, s3)
        assert str(err.value).startswith(
            f"data source 'mix': its shards in {typo} not found (s3://mix/typo-shard-00.tar"
        ), str(err.value)
    check_source_readable("mix", f"{good}::{shards[1]}", s3)  # every part holds a shard
    # shards named one by one form one part: a few of them missing is normal at scale
    check_source_readable("mix", ["s3://mix/gone-0.tar", shards[0], "s3://mix/gone-1.tar"], s3)


def test_a_shard_list_listed_by_another_is_read_under_the_same_guard(server, shards):
    # Before: the nested list was read outside the check, a missing one a FileNotFoundError
    # traceback, and a list listing itself recursed until Python's recursion limit.
    s3 = _s3(server)
    outer = _put_list(server, "lists/outer.txt", ["# parts", "s3://mix/lists/inner.txt"])
    with pytest.raises(StorageAccessError) as err:
        check_source_readable("nested", outer, s3)
    assert str(err.value).startswith(
        "data source 'nested': its shard list s3://mix/lists/inner.txt (listed in "
        "s3://mix/lists/outer.txt) not found"), str(err.value)
    # the inner list there: its shards are the source's (its typo'd line alone does not
    # refuse it: a list names shards one by one)
    _put_list(server, "lists/inner.txt", [*shards, "s3://mix/typo-shard-09.tar"])
    check_source_readable("nested", outer, s3)
    # but a list none of whose shards exists is refused, named
    bad = _put_list(server, "lists/bad.txt", ["s3://mix/typo-shard-{00..05}.tar"])
    with pytest.raises(StorageAccessError, match="data source 'nested': its first, middle "
                       r"and last shard \(of 6\) in s3://mix/lists/bad\.txt not found"):
        check_source_readable("nested", f"{outer}::{bad}", s3)
    loop = _put_list(server, "lists/loop.txt", [shards[0], "s3://mix/lists/loop2.txt"])
    _put_list(server, "lists/loop2.txt", [loop])
    with pytest.raises(StorageAccessError, match=r"its shard list s3://mix/lists/loop\.txt "
                       r"\(listed in s3://mix/lists/loop2\.txt\) lists itself"):
        check_source_readable("nested", loop, s3)


def test_a_list_that_lists_no_shard_is_refused_naming_it(server, shards, tmp_path):
    # Before: an empty or comments-only list part passed, and the loader trained without
    # that part of the mix, saying nothing.
    s3 = _s3(server)
    good = "s3://mix/a-shard-{00..02}.tar"
    empty = _put_list(server, "lists/empty.txt", [])
    comments = _put_list(server, "lists/comments.txt", ["# laion part 2 (to be filled)", ""])
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "comments.txt").write_text("# to be filled\n\n")
    local = [str(tmp_path / "empty.txt"), str(tmp_path / "comments.txt")]
    for part in (empty, comments, *local):
        for urls in (f"{good}::{part}", [part, good], part):  # in a mix, or alone
            with pytest.raises(StorageAccessError) as err:
                check_source_readable("mix", urls, s3)
            assert str(err.value).startswith(
                f"data source 'mix': its shard list {part} lists no shard"), str(err.value)
    outer = _put_list(server, "lists/outer-empty.txt", [shards[0], empty])  # nested too
    with pytest.raises(StorageAccessError, match=r"^data source 'mix': its shard list "
                       r"s3://mix/lists/empty\.txt \(listed in s3://mix/lists/outer-empty"
                       r"\.txt\) lists no shard"):
        check_source_readable("mix", outer, s3)


def test_a_missing_local_list_names_the_source_and_where_it_was_listed(tmp_path):
    # Before: a bare FileNotFoundError, naming neither the source nor the outer list.
    s3 = S3Config()
    outer, inner = tmp_path / "outer.txt", tmp_path / "not-mounted" / "inner.txt"
    outer.write_text(f"/data/shard-0.tar\n{inner}\n")
    for urls, where in ((str(outer), f" (listed in {outer})"), ([str(inner)], "")):
        with pytest.raises(StorageAccessError) as err:
            check_source_readable("loc", urls, s3)
        assert str(err.value).startswith(
            f"data source 'loc': its shard list {inner}{where} not found "
            "(FileNotFoundError: "), str(err.value)

def test_a_local_source_none_of_whose_probed_shards_exists_is_refused_naming_it(tmp_path):
    """Before: a mistyped local path started the run; every worker then found each of the
    source's shards missing, one by one (41,408 warnings and 13 minutes before step 1 in a
    reviewer's run), and trained on without the source. Now the start refuses it, as an
    ``s3://`` source that holds none of its probed shards; one existing probe is enough
    (a gap in a range is the loader's to skip and count)."""
    s3 = S3Config()
    good = tmp_path / "laion"
    good.mkdir()
    for i in (0, 9):  # first and last of {00..09} only
        write_tar(good / f"{i:02d}.tar", good_samples(f"l{i}-", 1, size=8))
    check_source_readable("laion", str(good / "{00..09}.tar"), s3)
    check_source_readable("laion", f"file:{good}/{{00..09}}.tar", s3)
    typo = str(tmp_path / "laoin" / "{000000..041407}.tar")
    with pytest.raises(StorageAccessError) as err:
        check_source_readable("laion", f"{good}/{{00..09}}.tar::{typo}", s3)
    assert str(err.value) == (
        f"data source 'laion': its first, middle and last shard (of 41408) in {typo} not "
        f"found (no file {tmp_path}/laoin/000000.tar). Check the source's urls (path, "
        "brace range), and that the file system holding them is mounted on this node")
    with pytest.raises(StorageAccessError, match=r"data source 'one': its shards not found"):
        check_source_readable("one", [str(tmp_path / "gone.tar")], s3, resumed=True)


# -- the ranks agree ----------------------------------------------------------------------

def test_the_ranks_agree_and_a_failing_rank_of_a_resumed_run_raises_alone(monkeypatch,
                                                                          tmp_path):
    """The agreement's rules, with a stand-in for the all-gather: every rank gathers its
    outcome once; a rank that fails in a resumed run (where another rank may be waiting
    for its store) raises alone, at once, as before."""
    import data.preflight

    monkeypatch.delenv("INTERNIMAGE_REQUEUED", raising=False)
    s3, sent = S3Config(), []

    def gather_as(rank: int, others: list):
        """The all-gather seen from ``rank``, the other ranks having sent ``others``."""
        def gather(outcome):
            sent.append(outcome)
            return [*others[:rank], outcome, *others[rank:]]
        return gather

    (tmp_path / "shard-0.tar").touch()
    local = [("local", f"{tmp_path}/shard-{{0..3}}.tar")]  # a local shard exists: passes
    check_sources_readable(local, s3, gather=gather_as(0, [None, None]))
    assert sent == [None]
    with pytest.raises(StorageAccessError) as err:  # this rank passed, two others did not
        check_sources_readable(local, s3, gather=gather_as(0, [None, "data source 'x': bad",
                                                             "data source 'x': bad"]))
    assert str(err.value) == "ranks 2-3 of 4: data source 'x': bad"

    def fail(*_args, **_kw):
        raise StorageAccessError("data source 'x': not found")

    monkeypatch.setattr(data.preflight, "check_source_readable", fail)
    failing, sent[:] = [("x", "s3://mix/typo-{0..3}.tar")], []
    with pytest.raises(StorageAccessError) as err:  # a fresh start: agreed
        check_sources_readable(failing, s3, gather=gather_as(1, [None, "other"]))
    assert sent == ["data source 'x': not found"]
    assert str(err.value) == "rank 1 of 3: data source 'x': not found; rank 2 of 3: other"
    with pytest.raises(StorageAccessError, match="^data source 'x': not found$"):
        check_sources_readable(failing, s3, gather=gather_as(0, []))  # alone: as it is
    sent[:] = []
    for resumed, requeued in ((True, "0"), (False, "1")):
        monkeypatch.setenv("INTERNIMAGE_REQUEUED", requeued)
        with pytest.raises(StorageAccessError, match="^data source 'x': not found$"):
            check_sources_readable(failing, s3, resumed, gather=gather_as(0, [None]))
    assert sent == []  # a resumed run's failing rank did not wait for the others
    monkeypatch.delenv("INTERNIMAGE_REQUEUED")

    def broken(_outcome):
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] "
                           "Connection closed by peer")

    with pytest.raises(StorageAccessError, match="^data source 'x': not found$"):
        check_sources_readable(failing, s3, gather=broken)  # its own error, not gloo's



def test_an_error_that_is_not_a_refusal_is_agreed_on_too(monkeypatch):
    """Any error of the checks on a fresh start is gathered as its type and message: every
    rank raises the agreed error, the failing rank its own error chained from it (its
    traceback kept); a resumed run's failing rank, or a broken gather, raises it alone."""
    import data.preflight

    monkeypatch.delenv("INTERNIMAGE_REQUEUED", raising=False)
    s3, sent = S3Config(), []

    def bug(*_args, **_kw):
        raise RuntimeError("unexpected on this node")

    def gather(outcome):
        sent.append(outcome)
        return [None, outcome]

    monkeypatch.setattr(data.preflight, "check_source_readable", bug)
    sources = [("x", "/data/list.txt")]
    with pytest.raises(RuntimeError, match="^unexpected on this node$") as err:
        check_sources_readable(sources, s3, gather=gather)
    assert sent == ["RuntimeError: unexpected on this node"]
    assert isinstance(err.value.__cause__, StorageAccessError)
    assert str(err.value.__cause__) == "rank 1 of 2: RuntimeError: unexpected on this node"
    sent[:] = []
    with pytest.raises(RuntimeError, match="^unexpected on this node$") as err:
        check_sources_readable(sources, s3, resumed=True, gather=gather)
    assert sent == [] and err.value.__cause__ is None  # resumed: at once, alone

    def broken(_outcome):
        raise RuntimeError("Connection closed by peer")

    with pytest.raises(RuntimeError, match="^unexpected on this node$"):
        check_sources_readable(sources, s3, gather=broken)  # its own error, not gloo's

def _rank_checks(rank: int, world: int, port: int, checks: list, s3: S3Config,
                 out: str) -> None:
    """One rank of a 2-rank gloo group: runs each of ``checks`` in turn, ``(urls, error)``:
    checks its source, or, where ``error`` is set, fails the checks with it (an error on
    this node only); writes what each raised to ``out`` (a JSON list)."""
    import json
    from datetime import timedelta

    import torch.distributed as dist

    import data.preflight
    from runtime.dist import all_gather_objects

    def failing(*_args, **_kw):
        raise error

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    os.environ.pop("INTERNIMAGE_REQUEUED", None)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    outcomes = []
    real = data.preflight.check_source_readable
    for urls, error in checks:
        data.preflight.check_source_readable = real if error is None else failing
        try:
            check_sources_readable([("laion", urls)], s3, gather=all_gather_objects)
            outcome = "passed"
        except Exception as err:  # noqa: BLE001 - reported to the test
            outcome = f"{type(err).__name__}: {err}"
            if err.__cause__ is not None:
                outcome += f" <- {type(err.__cause__).__name__}: {err.__cause__}"
        outcomes.append(outcome)
        Path(out).write_text(json.dumps(outcomes))
    dist.destroy_process_group()


def test_every_rank_raises_the_same_error_naming_the_failing_rank(server, shards, tmp_path):
    # Before: rank 1 alone raised (its message only in its own log, the launcher ending
    # rank 0, whose log said nothing of it); then for a refusal only: an error that was not
    # one (e.g. a FileNotFoundError) still ended rank 1 alone, rank 0 failing in the gather
    # ("Connection closed by peer"), its log not saying why.
    import json

    from s3_server import free_port

    from tests.rank_launcher import _CTX

    port, s3 = free_port(), _s3(server)
    good, wrong = "s3://mix/a-shard-{00..02}.tar", "s3://mix/wrong-prefix/shard-{00..02}.tar"
    bug = RuntimeError("unexpected on this node")
    checks = [[(good, None), (good, None)],  # rank 0's checks, in turn
              [(wrong, None), (good, bug)]]  # rank 1's
    procs = [_CTX.Process(target=_rank_checks, args=(r, 2, port, checks[r], s3,
                                                     str(tmp_path / f"rank{r}")))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(90)
    alive = [p.pid for p in procs if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert not alive, "a rank still checking after 90 s"
    said = [json.loads((tmp_path / f"rank{r}").read_text()) for r in range(2)]
    assert len(said[0]) == len(said[1]) == 2, said
    refused, failed = zip(*said)  # each check's outcome on rank 0 and rank 1
    assert refused[0] == refused[1], refused
    assert refused[0].startswith(
        "StorageAccessError: rank 1 of 2: data source 'laion': its shards in "
        "s3://mix/wrong-prefix/shard-{00..02}.tar not found"), refused[0]
    agreed = "StorageAccessError: rank 1 of 2: RuntimeError: unexpected on this node"
    assert failed == (agreed, f"RuntimeError: unexpected on this node <- {agreed}"), failed
