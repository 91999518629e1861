"""Logged training losses are means over the ranks, on 2 real gloo ranks.

mmdet 2.x and mmseg (the released detection and segmentation code's frameworks) log each
loss all-reduced and divided by the world size (``BaseDetector._parse_losses``,
``BaseSegmentor._parse_losses``: ``dist.all_reduce(loss_value.div_(world_size))``). The
loop wrote rank 0's own values: the curves in metrics.jsonl were one rank's noisy sample.
Run as a script (``python tests/test_runtime_loop_rank_mean.py OUT_DIR``) this file is
one rank.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# rank r's losses at step s (named as a detection task's): each differs between ranks
PER_RANK = {0: {"loss_ce": 1.0, "loss_bbox": 0.25}, 1: {"loss_ce": 3.0, "loss_bbox": 0.5}}


def _rank_main(out_dir: str) -> None:
    sys.path.insert(0, str(REPO))
    import torch

    from runtime.dist import init_distributed
    from runtime.loop import LoopPosition, LoopSpec, TaskHooks, run_loop
    from runtime.metrics import MetricsLogger

    d = init_distributed()

    def train_step(batch):
        return {k: torch.tensor(v * batch) for k, v in PER_RANK[d.rank].items()}

    hooks = TaskHooks(batches=lambda epoch, skip: range(1, 4), train_step=train_step,
                      evaluate=dict, save=lambda pos: None)
    spec = LoopSpec(name="t", total_steps=3, eval_every=0, checkpoint_every=0, log_every=1)
    metrics = MetricsLogger(Path(out_dir), d.is_main, 3, 0, tensorboard=False,
                            progress=False)
    run_loop(spec, hooks, LoopPosition(), metrics=metrics, d=d)
    metrics.close()


def test_logged_losses_are_the_mean_over_ranks(tmp_path):
    from tests.rank_launcher import run_file_function

    run_file_function(__file__, "_rank_main", 2, str(tmp_path), timeout=120)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
    losses = [r for r in records if "loss" in r]
    assert [r["step"] for r in losses] == [1, 2, 3]
    for r in losses:
        s = r["step"]  # batch s scales every loss by s
        assert r["loss_ce"] == (1.0 + 3.0) / 2 * s  # rank 0 alone wrote 1.0 * s
        assert r["loss_bbox"] == (0.25 + 0.5) / 2 * s
        assert r["loss"] == (1.0 + 3.0 + 0.25 + 0.5) / 2 * s


if __name__ == "__main__":
    _rank_main(sys.argv[1])
