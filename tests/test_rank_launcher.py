"""The test suite's rank starter (tests/rank_launcher.py) gives each rank what a launched
rank gets: its launcher's environment at launch time, not the forkserver's from when it
started (a variable a test had set then, e.g. INTERNIMAGE_KILL_AFTER_STEP, made every
later rank SIGKILL itself), torchrun's rank variables, and its output at the descriptors."""

from __future__ import annotations

import os

from tests.rank_launcher import Code, launcher_env, start_ranks, wait_ranks

REPORT = ("import os, sys\n"
          "print(os.environ.get('SET_WHEN_THE_SERVER_STARTED'), os.environ['RANK'],"
          " os.environ['WORLD_SIZE'], flush=True)\n")


def test_ranks_get_the_launchers_environment_now_not_the_servers(tmp_path, monkeypatch):
    monkeypatch.setenv("SET_WHEN_THE_SERVER_STARTED", "stale")
    first = start_ranks(Code("pass"), 1, launcher_env())  # the server starts (if not yet)
    assert wait_ranks(first, 120) == [] and first[0].exitcode == 0
    monkeypatch.delenv("SET_WHEN_THE_SERVER_STARTED")
    procs = start_ranks(Code(REPORT), 2, launcher_env(), stdout_dir=tmp_path)
    assert wait_ranks(procs, 120) == [] and [p.exitcode for p in procs] == [0, 0]
    assert [(tmp_path / f"rank{r}.out").read_text().split() for r in range(2)] == [
        ["None", "0", "2"], ["None", "1", "2"]]
    assert "SET_WHEN_THE_SERVER_STARTED" not in os.environ
