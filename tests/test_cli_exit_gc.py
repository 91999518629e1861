"""The command line freezes what is alive before the interpreter's exit (launch/cli.py
``main`` registers ``gc.freeze`` with atexit): CPython's last collection at exit would
otherwise walk the ~570k objects of torch, DeepSpeed and timm (2 s per process here, 0.4 s
frozen). CPython's ``gc.freeze`` docs: frozen objects are ignored by every later
collection."""

from __future__ import annotations

import subprocess
import sys

from tests.pretrain_utils import REPO


def test_the_command_line_freezes_what_is_alive_before_the_process_exits():
    # registered before main: atexit runs it after main's own callback (last in, first out)
    code = ("import atexit, gc, sys\n"
            "atexit.register(lambda: print('frozen at exit', gc.get_freeze_count()))\n"
            "from launch.cli import main\n"
            "print('frozen before', gc.get_freeze_count())\n"
            # a config error: main returns (2) without a run; any way out exits alike
            "sys.exit(main(['pretrain', 'no_such.key=1']))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "no_such" in proc.stderr, proc.stderr[-2000:]
    before, at_exit = (int(line.split()[-1]) for line in proc.stdout.strip().splitlines())
    assert before == 0 and at_exit > 1000, proc.stdout[-500:]
