"""``python -c CODE ARGS`` on several ranks, each rank forked from tests/rank_launcher.py's
forkserver as tests/pretrain_utils.py forks a command's ranks (``run_forked`` takes code on
one rank only): a real process per rank, joined through torch.distributed's ``env://``
rendezvous, without a fresh interpreter's imports of torch and DeepSpeed (~5 s a rank)."""

from __future__ import annotations

from pathlib import Path


def start_code_ranks(code: str, ranks: int, args: list[str], environ: dict[str, str],
                     logs: Path) -> list:
    """Start ``code`` on ``ranks`` ranks (``sys.argv[1:]`` = ``args``, environment
    ``environ`` plus RANK, WORLD_SIZE and MASTER_* as torchrun sets them); rank r's
    stdout and stderr go to ``logs/rank<r>.out`` / ``.err``. The started processes, in
    rank order: the caller joins (and, if need be, kills) them."""
    from tests.pretrain_utils import _forked_rank, free_port
    from tests.rank_launcher import _CTX

    port = free_port()
    procs = [_CTX.Process(target=_forked_rank, name=f"rank{r}", args=(
        r, ranks, port, code, list(args), environ, str(logs / f"rank{r}.out"),
        str(logs / f"rank{r}.err"))) for r in range(ranks)]
    for p in procs:
        p.start()
    return procs
