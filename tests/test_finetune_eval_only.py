"""`internimage finetune classification --eval-only`: one evaluation of a checkpoint, no
training (the original code's `main.py --eval --resume CKPT`).

One short ZeRO-3 run on two ranks (EMA on, evaluated and checkpointed at its last step) is
the checkpoint: evaluated again by `--eval-only --resume`, it must print exactly the
metrics that run logged for that step (the training loop's own evaluation function on the
same weights), on two ranks and on one; its `convert` output through `--init` gives the
same top-1; and a missing, doubled or mismatched weight source is one line, exit 2.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import pytest

from tests.pretrain_utils import free_port, run_forked

# whole DeepSpeed runs (the suite's long files run first, tests/conftest.py)
pytestmark = pytest.mark.slow

TINY = ["run.batch_size=32", "run.log_every=1", "run.num_workers=0", "run.progress=false",
        "run.tensorboard=false", "optim.warmup_steps=0", "ema.decay=0.9"]
METRICS = ("top1", "top5", "val_loss", "top1_ema", "top5_ema", "val_loss_ema")


def _cmd(ranks: int, *args: str) -> list[str]:
    cli = ["-m", "launch.cli", "finetune", "classification", *args]
    if ranks == 1:
        return [sys.executable, *cli]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
            "--master-addr", "127.0.0.1", "--master-port", str(free_port()), *cli]


def _tree(run: Path) -> dict[str, str]:
    """Every file of ``run`` but eval-*.json, with a hash of its bytes."""
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run.rglob("*")) if p.is_file() and not p.name.startswith("eval-")}


@pytest.fixture(scope="module")
def trained(cache, tmp_path_factory) -> tuple[Path, dict]:
    """(run dir, its last evaluation record): 2 steps of ZeRO-3 on 2 ranks, every
    parameter partitioned, evaluated and checkpointed at step 2."""
    out = tmp_path_factory.mktemp("eval_only") / "run"
    run_forked(_cmd(2, "--output-dir", str(out), *TINY, f"data.cache_dir={cache}",
                    "run.zero_stage=3", "run.zero_persistence_threshold=0",
                    "run.max_steps=2", "run.eval_every=2"), cache)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if "top1" in r][-1]
    assert last["step"] == 2 and set(METRICS) <= set(last)
    return out, last


def test_resume_prints_the_runs_own_last_evaluation_on_two_ranks_and_on_one(
        trained, cache, capsys):
    out, logged = trained
    before = _tree(out)
    # two ranks (each evaluates its unpadded share, the counts summed), the run's own dir:
    # no fresh --output-dir needed, nothing of the run touched
    proc = run_forked(_cmd(2, "--eval-only", "--resume", "auto", "--output-dir", str(out),
                           *TINY, f"data.cache_dir={cache}"), cache)
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("{")]  # rank 0's
    printed = json.loads(line)
    counts = ("top1", "top5", "top1_ema", "top5_ema")
    assert {k: printed[k] for k in counts} == {k: logged[k] for k in counts}
    # the ZeRO-3 run's cross-entropies may differ in the 8th-9th digit (6e-9 and 2.5e-8
    # relative seen on these CPUs, with other trained weights: the training evaluation
    # runs through ZeRO-3's gathered parameters and its own linear function, eval-only
    # through the plain module); its top-1/top-5 counts are equal
    for key in ("val_loss", "val_loss_ema"):
        assert printed[key] == pytest.approx(logged[key], rel=1e-7), key
    assert _tree(out) == before
    (record,) = out.glob("eval-*.json")
    assert json.loads(record.read_text())["top1_ema"] == logged["top1_ema"]

    # one rank, in this process, from the step directory itself: the same counts
    from launch.cli import main

    step_dir = out / "checkpoints" / "step_0000002"
    assert main(["finetune", "classification", "--eval-only", "--resume", str(step_dir),
                 *TINY, f"data.cache_dir={cache}"]) == 0
    alone = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("top1", "top5", "top1_ema", "top5_ema"):
        assert alone[key] == printed[key], key
    # summed over two ranks' shares instead of one: the same images, another float order
    assert alone["val_loss"] == pytest.approx(printed["val_loss"], rel=1e-6)
    assert alone["val_loss_ema"] == pytest.approx(printed["val_loss_ema"], rel=1e-6)


def test_the_converted_weights_through_init_score_the_same(trained, cache, tmp_path,
                                                            capsys):
    from launch.cli import main

    out, logged = trained
    dst = tmp_path / "cls.safetensors"
    assert main(["convert", str(out / "checkpoints"), str(dst)]) == 0  # the raw weights
    capsys.readouterr()
    assert main(["finetune", "classification", "--eval-only", "--init", str(dst),
                 *TINY, f"data.cache_dir={cache}"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["top1"] == logged["top1"] and printed["top5"] == logged["top5"]
    assert "top1_ema" not in printed  # convert exports the trained weights, not the EMA
    assert list(tmp_path.iterdir()) == [dst]  # nothing written beside the weights


@pytest.mark.parametrize("case", ["none", "both", "head", "run_head", "detection"])
def test_a_missing_doubled_or_mismatched_weight_source_is_one_line(
        case, trained, cache, tmp_path, capsys, monkeypatch):
    """Refused with exit 2 and one line, before any weight is loaded into a model: a head
    of another class count evaluated fresh would score chance."""
    import finetune.init
    from launch.cli import main

    out, _ = trained
    loaded = []
    monkeypatch.setattr(finetune.init, "load_backbone_state",
                        lambda *a, **k: loaded.append(a))
    step_dir = out / "checkpoints" / "step_0000002"
    args = {"none": [],
            "both": ["--init", str(step_dir), "--resume", str(step_dir)],
            "head": ["--init", str(step_dir), "data.num_classes=5"],
            "run_head": ["--resume", str(step_dir), "data.num_classes=5"],
            "detection": ["--init", str(step_dir)]}[case]
    task = "detection" if case == "detection" else "classification"
    code = main(["finetune", task, "--eval-only", *args, *TINY, f"data.cache_dir={cache}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and not loaded
    # one line of ours, the last (reading a ZeRO checkpoint, DeepSpeed logs its progress)
    assert "Traceback" not in err and err.splitlines()[-1].startswith("internimage finetune:")
    err = err.splitlines()[-1]
    expected = {"none": "--eval-only needs --init CKPT or --resume PATH",
                "both": "--eval-only needs --init CKPT or --resume PATH, not both",
                "head": "holds a 10-class head, data.num_classes is 5",
                "run_head": "data.num_classes differ",
                "detection": "--eval-only of detection evaluates a detection run's own checkpoint: "
                "--resume PATH|auto"}[case]
    assert expected in err, err


def test_a_checkpoint_of_another_tasks_run_is_named_with_the_command_for_it(
        trained, cache, tmp_path, capsys):
    """`--eval-only --resume` of a pre-training checkpoint said it was "saved for another
    model" and advised the run's own config, which cannot evaluate it either: it names the
    pre-training run and --init (a classifier must be fine-tuned first); a detection run's
    checkpoint names the detection command. A classification state saved before
    ``task`` was recorded is still evaluated."""
    from launch.cli import main

    out, _ = trained
    mine = json.loads((out / "checkpoints/step_0000002/trainer_state.json").read_text())
    assert mine["task"] == "classification" and "samples_seen" not in mine
    # pre-training records no task, but its samples_seen (pretrain/trainer.py's state)
    pretrain = {k: v for k, v in mine.items() if k != "task"} | {"samples_seen": {}}
    cases = {"pretrain": (pretrain, "is a checkpoint of a pre-training run, not a "
                          "classification run", "--init "),
             "detection": (mine | {"task": "detection"}, "is a checkpoint of a detection "
                           "run", "`internimage finetune detection --eval-only --resume ")}
    for name, (state, what, advice) in cases.items():
        step_dir = tmp_path / name / "checkpoints" / "step_0000002"
        shutil.copytree(out / "checkpoints/step_0000002", step_dir)
        (step_dir / "trainer_state.json").write_text(json.dumps(state))
        code = main(["finetune", "classification", "--eval-only", "--resume", str(step_dir),
                     *TINY, f"data.cache_dir={cache}"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and what in err[-1] and advice in err[-1], (name, err)
        assert "another model" not in err[-1]

    from finetune.eval_only import check_eval_task

    old = {k: v for k, v in mine.items() if k != "task"}
    check_eval_task(old, "classification", out)  # no refusal


def test_submit_passes_eval_only_through_without_a_resume(trained, capsys):
    """`submit` adds `--resume auto` to every fine-tuning job (and a requeue switches to
    it): with `--init`, an eval-only job would then hold two weight sources."""
    from launch.cli import main
    from launch.slurm.job import resume_argv

    out, _ = trained
    assert main(["submit", "--dry-run", "finetune", "classification", "--eval-only",
                 "--init", str(out), "--output-dir", str(out)]) == 0
    (line,) = [x for x in capsys.readouterr().out.splitlines() if "each task runs" in x]
    assert "--eval-only --init" in line and "--resume" not in line
    argv = line.split("internimage ", 1)[1].split()
    assert resume_argv(argv, out) == argv  # out holds checkpoints: a requeue keeps it


def test_every_rank_evaluates_rank_0s_choice_and_refuses_together(trained, cache, capsys,
                                                                    monkeypatch):
    """A run still training may publish or prune checkpoints between two ranks' reads of
    ``latest``: each rank used to pick its checkpoint (and whether an EMA is there) alone,
    so ranks could sum counts over different weights, or run different collectives. Rank
    0's choice now goes to every rank (here the broadcast's stand-in hands this rank rank
    0's: the same step, no EMA), and a read that fails on one rank (the step pruned under
    it) is refused on every rank in one line (``agree_on_refusal``)."""
    import finetune.convert
    import runtime.dist
    from launch.cli import main

    out, logged = trained
    step_dir = out / "checkpoints" / "step_0000002"
    monkeypatch.setattr(runtime.dist, "broadcast_object",
                        lambda obj, src=0: (obj[0], False))  # rank 0 saw no ema.pt
    assert main(["finetune", "classification", "--eval-only", "--resume", str(step_dir),
                 *TINY, f"data.cache_dir={cache}"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["top1"] == logged["top1"] and "top1_ema" not in printed

    def pruned(src):
        raise FileNotFoundError(f"{src}/mp_rank_00_model_states.pt")

    monkeypatch.setattr(finetune.convert, "read_backbone", pruned)
    code = main(["finetune", "classification", "--eval-only", "--resume", str(step_dir),
                 *TINY, f"data.cache_dir={cache}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "Traceback" not in err
    assert err.splitlines()[-1].startswith("internimage finetune: ") and "mp_rank_00" in err


def test_submit_refuses_weights_it_cannot_evaluate_before_queueing(trained, tmp_path,
                                                                    capsys):
    """Training jobs are checked at submit; an eval-only job's weights were not, so a
    missing --init file or a head of another class count failed only after the job's
    wait in the queue. Missing validation data only warns there (the compute nodes may
    see other data than the login node), as for training jobs."""
    from launch.cli import main

    out, _ = trained
    step_dir = out / "checkpoints" / "step_0000002"
    for args, why in ((["--init", str(tmp_path / "gone.pth")], "gone.pth"),
                      (["--resume", str(step_dir), "data.num_classes=5"],
                       "data.num_classes differ")):
        code = main(["submit", "--dry-run", "finetune", "classification", "--eval-only",
                     *args, "--output-dir", str(tmp_path / "x")])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and why in err[-1], err
    assert main(["submit", "--dry-run", "finetune", "classification", "--eval-only",
                 "--resume", str(step_dir), "data.kind=imagefolder",
                 f"data.root={tmp_path / 'nowhere'}", "--output-dir", str(out)]) == 0
    assert "warning: data.root" in capsys.readouterr().err
