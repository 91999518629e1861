"""Which GPU a task drives (runtime/dist.py): GPU LOCAL_RANK where every task of a node sees
all of the node's GPUs, its only GPU where the scheduler binds one GPU per task
(``--gpus-per-task=1``, ``--gpu-bind``, cgroup ConstrainDevices), a clear error before any
process group otherwise; and DeepSpeed uses that same GPU.

No GPU is needed: torch.cuda's view of the machine is replaced (availability, device
count, set_device), and so is DeepSpeed's process-group start, which on a GPU would be
NCCL's. The DeepSpeed test runs a real ZeRO-3 engine on the CPU accelerator in a child
process, with an accelerator that records every device ordinal DeepSpeed asks for.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("local_rank", "local_world_size", "visible", "expected"), [
    (3, 4, 4, 3),      # --gpus-per-node 4, no binding: GPU LOCAL_RANK, as under torchrun
    (3, 4, 8, 3),      # more GPUs than tasks: still GPU LOCAL_RANK
    (3, 4, 1, 0),      # one GPU bound per task: the task's only GPU
    (0, 1, 1, 0),      # a lone task
    (2, None, 4, 2),   # tasks per node unknown (a hand-made launch): LOCAL_RANK if it exists
    (2, None, 1, 0),
])
def test_rule_picks_the_tasks_own_gpu(local_rank, local_world_size, visible, expected):
    from runtime.dist import cuda_device_for_task

    assert cuda_device_for_task(local_rank, local_world_size, visible) == expected


@pytest.mark.parametrize(("local_rank", "local_world_size", "visible"), [
    (1, 4, 2),     # 2 GPUs for 4 tasks: tasks would share GPUs or ask for missing ones
    (0, 4, 0),     # a GPU job whose task sees none
    (3, None, 2),  # GPU 3 does not exist and the task is not bound to one GPU
])
def test_rule_refuses_what_gives_no_task_a_gpu_of_its_own(local_rank, local_world_size,
                                                          visible):
    from runtime.dist import cuda_device_for_task

    with pytest.raises(RuntimeError, match=f"LOCAL_RANK={local_rank} .* sees {visible} GPU"):
        cuda_device_for_task(local_rank, local_world_size, visible)


def test_torchrun_processes_sharing_one_gpu_are_refused():
    """torchrun gives its workers one environment (no per-process CUDA_VISIBLE_DEVICES), so
    `--nproc_per_node 2` on a one-GPU node is two ranks on that GPU (NCCL then refuses the
    duplicate GPU at the first collective, or they compete for its memory), not a GPU bound
    to each task as under srun --gpus-per-task=1."""
    from runtime.dist import DeviceBindingError, cuda_device_for_task

    with pytest.raises(DeviceBindingError, match="LOCAL_RANK=1 of 2 started by torchrun "
                                                 "sees 1 GPU.*--nproc_per_node"):
        cuda_device_for_task(1, 2, 1, unbound=True)
    assert cuda_device_for_task(1, 2, 2, unbound=True) == 1  # one GPU each: GPU LOCAL_RANK
    assert cuda_device_for_task(0, 1, 1, unbound=True) == 0  # a lone process
    with pytest.raises(DeviceBindingError) as err:  # none at all: not a launcher matter
        cuda_device_for_task(0, 1, 0, unbound=True)
    assert "sees 0 GPU" in str(err.value) and "--nproc_per_node" not in str(err.value)


class _FakeNode:
    """torch.cuda and DeepSpeed's process-group start as a task of a GPU node sees them.

    ``init_calls`` records, for each process-group start, LOCAL_RANK at that moment (what
    DeepSpeed's NCCL start takes as ``device_id``) and the devices made current before it.
    """

    def __init__(self, monkeypatch, *, visible: int, local_rank: int, local_world_size: int,
                 cuda_visible_devices: str | None, slurm_gpus: int | None = None,
                 accelerator: str | None = None):
        import deepspeed
        import torch.distributed as dist

        import runtime.dist

        self.set_device_calls: list[int] = []
        self.init_calls: list[dict] = []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: visible > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
        monkeypatch.setattr(torch.cuda, "set_device", self.set_device_calls.append)
        monkeypatch.setattr(deepspeed, "init_distributed", self._init_distributed)
        # init_distributed sets torch's default timeout of later groups: restored after
        from torch.distributed import distributed_c10d

        for name in ("default_pg_timeout", "default_pg_nccl_timeout"):
            monkeypatch.setattr(distributed_c10d, name, getattr(distributed_c10d, name))
        monkeypatch.setattr(dist, "is_initialized", lambda: bool(self.init_calls))
        monkeypatch.setattr(dist, "get_rank", lambda: 5)
        monkeypatch.setattr(dist, "get_world_size", lambda: 8)
        # the remembered task index of an earlier call in this process (absent before)
        monkeypatch.setattr(runtime.dist, "_rebound_local_rank", None, raising=False)
        monkeypatch.setattr(runtime.dist, "_group_timeout", None, raising=False)
        monkeypatch.setenv("RANK", "5")
        monkeypatch.setenv("WORLD_SIZE", "8")
        monkeypatch.setenv("LOCAL_RANK", str(local_rank))
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_world_size))
        monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
        monkeypatch.setenv("MASTER_PORT", "29500")
        monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)  # not under torchrun
        for name, value in (("CUDA_VISIBLE_DEVICES", cuda_visible_devices),
                            ("SLURM_GPUS_ON_NODE", slurm_gpus),
                            ("DS_ACCELERATOR", accelerator)):  # `make test` sets cpu
            if value is None:
                monkeypatch.delenv(name, raising=False)
            else:
                monkeypatch.setenv(name, str(value))

    def _init_distributed(self, **kwargs):
        self.init_calls.append({"LOCAL_RANK": os.environ.get("LOCAL_RANK"),
                                "current": list(self.set_device_calls), **kwargs})


@pytest.mark.parametrize(("visible", "cuda_visible_devices", "expected"), [
    (1, "3", 0),        # --gpus-per-task=1 / --gpu-bind: one GPU, renumbered 0
    (4, "0,1,2,3", 3),  # --gpus-per-node=4, no binding: every task sees all four
])
def test_a_task_drives_its_own_gpu_from_before_the_process_group(
        monkeypatch, visible, cuda_visible_devices, expected):
    from runtime.dist import init_distributed

    node = _FakeNode(monkeypatch, visible=visible, local_rank=3, local_world_size=4,
                     cuda_visible_devices=cuda_visible_devices)
    info = init_distributed()
    assert node.set_device_calls == [expected]
    assert info.device == torch.device("cuda", expected)
    assert (info.rank, info.local_rank, info.world_size, info.backend) == (5, 3, 8, "nccl")
    # DeepSpeed starts NCCL on the same GPU: current already, and named by LOCAL_RANK
    # with the collective timeout of an unset run.collective_timeout_min: DeepSpeed's own
    from deepspeed.constants import default_pg_timeout

    assert node.init_calls == [{"LOCAL_RANK": str(expected), "current": [expected],
                                "dist_backend": "nccl", "auto_mpi_discovery": False,
                                "timeout": default_pg_timeout}]
    # a second call (the process group is up) still knows the task's index on its node
    again = init_distributed()
    assert (again.local_rank, again.device) == (3, torch.device("cuda", expected))
    assert len(node.init_calls) == 1


def test_too_few_gpus_for_the_tasks_fail_before_the_process_group(monkeypatch):
    from runtime.dist import init_distributed

    node = _FakeNode(monkeypatch, visible=2, local_rank=1, local_world_size=4,
                     cuda_visible_devices="0,1")
    with pytest.raises(RuntimeError) as err:
        init_distributed()
    message = str(err.value)
    for part in ("LOCAL_RANK=1", "LOCAL_WORLD_SIZE=4", "sees 2 GPU",
                 "CUDA_VISIBLE_DEVICES='0,1'", "--gpus-per-node", "--gpus-per-task=1"):
        assert part in message, (part, message)
    assert node.init_calls == [] and node.set_device_calls == []


def test_torchrun_on_a_one_gpu_node_fails_before_the_process_group(monkeypatch):
    from runtime.dist import init_distributed

    node = _FakeNode(monkeypatch, visible=1, local_rank=1, local_world_size=2,
                     cuda_visible_devices=None)
    # what torchrun sets for its workers (torch/distributed/elastic/agent/server/
    # local_elastic_agent.py, the workers' environment: TORCHELASTIC_RUN_ID)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    with pytest.raises(RuntimeError, match="started by torchrun sees 1 GPU"):
        init_distributed()
    assert node.init_calls == [] and node.set_device_calls == []


def test_a_gpu_job_whose_task_sees_no_gpu_fails_instead_of_training_on_cpu(monkeypatch):
    from runtime.dist import init_distributed

    # SLURM gave the step 4 GPUs on this node, but this task sees none of them
    node = _FakeNode(monkeypatch, visible=0, local_rank=0, local_world_size=4,
                     cuda_visible_devices="", slurm_gpus=4)
    with pytest.raises(RuntimeError, match="LOCAL_RANK=0 .* sees 0 GPU.*CUDA_VISIBLE_DEVICES=''"):
        init_distributed()
    assert node.init_calls == []


@pytest.mark.parametrize(("visible", "slurm_gpus"), [(0, 4), (4, 4), (4, None)])
def test_an_explicit_cpu_accelerator_runs_on_the_cpu(monkeypatch, visible, slurm_gpus):
    """DS_ACCELERATOR=cpu (DeepSpeed's accelerator switch) is a deliberate CPU run, inside a
    GPU allocation too: gloo on the CPU, no GPU touched, no binding error."""
    from runtime.dist import init_distributed

    node = _FakeNode(monkeypatch, visible=visible, local_rank=0, local_world_size=4,
                     cuda_visible_devices="", slurm_gpus=slurm_gpus, accelerator="cpu")
    info = init_distributed()
    assert (info.device, info.backend) == (torch.device("cpu"), "gloo")
    assert node.set_device_calls == []
    assert [c["dist_backend"] for c in node.init_calls] == ["gloo"]


def test_deepspeed_zero3_uses_the_gpu_init_distributed_chose(tmp_path):
    """A real ZeRO-3 engine (deepspeed.initialize, forward, backward, step) in a task bound
    to one GPU (LOCAL_RANK=3 of 4): every device ordinal DeepSpeed asks its accelerator for
    is the one init_distributed picked, 0 (the engine's device, zero.Init's local device,
    stage 3's first-step cross-rank checks), never the node index 3."""
    from tests.pretrain_utils import free_port

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                            "CUDA_VISIBLE_DEVICES")}
    env |= {"DS_ACCELERATOR": "cpu", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
            "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "4",
            "OMP_NUM_THREADS": "1"}
    out = tmp_path / "ordinals.json"
    proc = subprocess.run([sys.executable, __file__, str(out)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    seen = json.loads(out.read_text())
    assert seen["local_rank"] == 3
    assert {"set_device", "device_name"} <= {call for call, _ in seen["ordinals"]}
    assert {ordinal for _, ordinal in seen["ordinals"]} == {0}, seen["ordinals"]


def _bound_task_with_zero3(out: Path) -> None:
    """The child of the DeepSpeed test: a task that sees one GPU, then a ZeRO-3 step."""
    import deepspeed
    import torch.distributed as dist
    from deepspeed.accelerator import set_accelerator
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

    from runtime.dist import init_distributed

    class RecordingAccelerator(CPU_Accelerator):
        """The CPU accelerator ignores device ordinals; this one writes them down."""

        def __init__(self):
            super().__init__()
            self.ordinals: list[tuple[str, int]] = []

        def set_device(self, device_index):
            # zero.Init passes the torch.device its device_name() made: 'cpu' has no index,
            # and that device_name() call recorded the ordinal already
            if isinstance(device_index, torch.device):
                device_index = device_index.index
            if device_index is not None:
                self.ordinals.append(("set_device", int(device_index)))

        def device_name(self, device_index=None):
            if device_index is not None:
                self.ordinals.append(("device_name", int(device_index)))
            return super().device_name(device_index)

    accelerator = RecordingAccelerator()
    set_accelerator(accelerator)
    # The gloo group stands in for NCCL, which needs the GPU; init_distributed then only
    # picks the device, as it would on a node where each task sees its one GPU.
    dist.init_process_group("gloo", rank=0, world_size=1)
    real = torch.cuda.is_available, torch.cuda.device_count, torch.cuda.set_device
    torch.cuda.is_available, torch.cuda.device_count = (lambda: True), (lambda: 1)
    torch.cuda.set_device = lambda index: None
    # the accelerator is set explicitly above; DS_ACCELERATOR=cpu would ask for a CPU run
    os.environ.pop("DS_ACCELERATOR", None)
    info = init_distributed()
    torch.cuda.is_available, torch.cuda.device_count, torch.cuda.set_device = real

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True}
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), config=config)
    for _ in range(2):  # stage 3 checks its recorded parameter order across ranks
        loss = engine(torch.randn(2, 8)).square().mean()
        engine.backward(loss)
        engine.step()
    Path(out).write_text(json.dumps({"local_rank": info.local_rank,
                                     "ordinals": accelerator.ordinals}))


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    _bound_task_with_zero3(Path(sys.argv[1]))
