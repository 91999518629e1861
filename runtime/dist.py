"""Process-group set-up and rank info, the same for pre-training and every fine-tuning task.

One function, :func:`init_distributed`, joins (or creates) the process group whether the
process was started alone, by torchrun, by our rank launcher or by SLURM through submitit:
the backend is detected (NCCL with CUDA, gloo otherwise), never hard-coded, and a lone
process gets the rendezvous variables DeepSpeed needs (else DeepSpeed falls back to MPI
discovery). It returns a :class:`DistInfo`, the one type every loop passes around.

How long a collective may wait for the other ranks before it fails (a rank that hangs
rather than dies: a stalled NFS read, a GPU in a bad state, a stopped process) is the
run's ``run.collective_timeout_min`` (:func:`collective_timeout`), given to the process
group and to every group created after it (DeepSpeed's ZeRO group included).

Which GPU a task drives is decided once, here (:func:`cuda_device_for_task`): the GPU
``LOCAL_RANK`` when the task sees one GPU per task of its node (``--gpus-per-node``, no
binding, as under torchrun), its only GPU when the scheduler binds one GPU per task
(``--gpus-per-task=1``, ``--gpu-bind``, cgroup ``ConstrainDevices``), and an error before
any compute otherwise.

The collectives below are no-ops without a process group, so code that calls them runs
unchanged in a plain single-process test.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TypeVar

import torch

log = logging.getLogger(__name__)

T = TypeVar("T")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: ranks, world size, device and communication backend.

    ``local_rank`` is the task's index on its node; ``device`` the GPU it drives, which is
    ``cuda:local_rank`` only where every task sees all of its node's GPUs.

    The defaults describe a lone CPU process (rank 0 of 1), which is what evaluation
    helpers and tests get without any set-up.
    """

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str = "gloo"

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs, shows progress and writes shared files."""
        return self.rank == 0


def _process_group_up() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


class DeviceBindingError(RuntimeError):
    """The GPUs this task sees do not give it a GPU of its own."""


def cuda_device_for_task(local_rank: int, local_world_size: int | None, visible: int,
                         unbound: bool = False) -> int:
    """The index, among the ``visible`` CUDA devices, of the GPU this task drives.

    ``local_rank`` is the task's index on its node and ``local_world_size`` the number of
    tasks on the node (None: unknown, then at least ``local_rank + 1``). ``unbound``: the
    launcher binds no GPU to a task (torchrun: its processes share one environment), so
    one visible GPU is every task's, not this task's own.

    - Every task sees at least one GPU per task of the node (no binding): GPU
      ``local_rank``, as under torchrun.
    - The task sees exactly one GPU (the scheduler bound one per task; SLURM then renumbers
      it 0, or hides the others by cgroup): that GPU, 0.
    - Anything else (2 visible for 4 tasks, none at all) would put two tasks on one GPU or
      ask for a device that is not there ("invalid device ordinal") after the job's wait in
      the queue: :class:`DeviceBindingError` now, naming the fix.
    """
    tasks = max(local_world_size or 0, local_rank + 1)
    if visible >= tasks:
        return local_rank
    if unbound and visible:  # (none visible: the general message below)
        raise DeviceBindingError(
            f"task LOCAL_RANK={local_rank} of {tasks} started by torchrun sees {visible} "
            f"GPU(s) (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}), "
            "shared by all of its processes: use --nproc_per_node at most the GPUs this "
            "node has, one process per GPU")
    if visible == 1:
        return 0
    raise DeviceBindingError(
        f"task LOCAL_RANK={local_rank} (LOCAL_WORLD_SIZE={local_world_size}) sees {visible} "
        f"GPU(s) (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}): a task "
        "needs either one visible GPU per task of its node or exactly one GPU of its own. "
        "Use --gpus-per-node with one task per GPU (no GPU binding), or bind one GPU per "
        "task (--gpus-per-task=1, or --gpu-bind=single:1)")


def _slurm_gpus_on_node() -> int:
    """GPUs SLURM gave this step on this node (``SLURM_GPUS_ON_NODE``, man srun); 0 outside
    a GPU job."""
    try:
        return int(os.environ.get("SLURM_GPUS_ON_NODE", "0"))
    except ValueError:
        return 0


# The task's index on its node, kept here once init_distributed has set LOCAL_RANK to a
# different device index (see there), so that a second call still reports it.
_rebound_local_rank: int | None = None


TIMEOUT_KEY = "run.collective_timeout_min"
# the timeout this process's group was created with (None: not by init_distributed)
_group_timeout: timedelta | None = None


def collective_timeout(minutes: float | None) -> tuple[timedelta, str]:
    """How long one collective may wait for the other ranks, and the setting that says so.

    ``minutes`` is the run's ``run.collective_timeout_min``; None keeps what runs got before
    that setting existed, DeepSpeed's default: ``DEEPSPEED_TIMEOUT`` minutes, else 10
    (``default_pg_timeout``, deepspeed/constants.py, 0.19.8). Imports DeepSpeed: call it
    once ``DS_ACCELERATOR`` is settled (as :func:`init_distributed` does).
    """
    if minutes is not None:
        return timedelta(minutes=minutes), TIMEOUT_KEY
    from deepspeed.constants import default_pg_timeout

    if "DEEPSPEED_TIMEOUT" in os.environ:
        return default_pg_timeout, f"DEEPSPEED_TIMEOUT={os.environ['DEEPSPEED_TIMEOUT']} " \
            f"({TIMEOUT_KEY} unset)"
    return default_pg_timeout, f"DeepSpeed's default ({TIMEOUT_KEY} unset)"


def _later_groups_default_to(timeout: timedelta) -> None:
    """Give the groups created after the world group the same timeout.

    torch gives a group created without a timeout (``dist.new_group(ranks)``, which is how
    DeepSpeed creates the data-parallel group every ZeRO collective runs on:
    deepspeed/utils/groups.py ``_clone_world_group``) its backend's default, not the world
    group's: 30 minutes for gloo, 10 for NCCL (torch/distributed/distributed_c10d.py
    ``_get_default_timeout`` reads the module's ``default_pg_timeout`` and
    ``default_pg_nccl_timeout``, torch 2.14). Those two are set here.
    """
    from torch.distributed import distributed_c10d

    for name in ("default_pg_timeout", "default_pg_nccl_timeout"):
        if hasattr(distributed_c10d, name):
            setattr(distributed_c10d, name, timeout)
    # private names: a torch that renames them or stops reading them would leave ZeRO's
    # group at the backend default without a word
    for backend in ("gloo", "nccl"):
        if distributed_c10d._get_default_timeout(backend) != timeout:
            log.warning("the %s groups created after the world group keep torch's default "
                        "timeout, not %s: this torch no longer reads the defaults set here "
                        "(runtime/dist.py _later_groups_default_to)", backend, timeout)


def init_distributed(timeout_min: float | None = None) -> DistInfo:
    """Initialise torch.distributed through DeepSpeed (idempotent); return where we are.

    ``timeout_min`` (the run's ``run.collective_timeout_min``; None: DeepSpeed's default,
    see :func:`collective_timeout`) bounds every collective: a rank that waits longer for
    the others fails (gloo: a ``RuntimeError`` "Timed out waiting ...ms"; NCCL: the
    watchdog aborts the process) instead of waiting on a hung rank. It applies to the
    world group and to every group created after it. Rank 0 logs it once, when the group
    is created. Idempotent: when the process group already exists (a second call, or a
    group created by someone else) it is joined as it is and its timeout does not change.

    On CUDA, the task's GPU (:func:`cuda_device_for_task`) is made current before the
    process group exists, and ``LOCAL_RANK`` is set to that GPU's index when the two
    differ (one GPU bound per task, ``LOCAL_RANK`` > 0). DeepSpeed (0.19.8) takes
    ``LOCAL_RANK`` as the device ordinal in more places than its engine's ``device_rank``
    argument reaches: the NCCL process group's ``device_id`` (comm/torch.py), ZeRO-3's
    ``zero.Init`` (partition_parameters.py, also run inside ``deepspeed.initialize``) and
    stage 3's cross-rank checks on the first steps (zero/utils.py), so only ``LOCAL_RANK``
    makes all of DeepSpeed use our GPU. ``DistInfo.local_rank`` stays the task's index on
    its node; nothing of ours reads ``LOCAL_RANK`` afterwards, and the DeepSpeed features
    that read it as a node index (``use_node_local_storage``,
    ``pipeline_loading_checkpoint``) are not in our configs.
    """
    global _rebound_local_rank, _group_timeout
    # a GPU job whose task sees no GPU would otherwise train on CPU over gloo; an explicit
    # DS_ACCELERATOR=cpu (DeepSpeed's own switch) asks for the CPU whatever is visible
    use_cuda = os.environ.get("DS_ACCELERATOR") != "cpu" and (
        torch.cuda.is_available() or _slurm_gpus_on_node() > 0)
    if not use_cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # must precede importing deepspeed
    import torch.distributed as dist

    if "WORLD_SIZE" not in os.environ:  # a plain `python`/`internimage` process
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                           "MASTER_ADDR": os.environ.get("MASTER_ADDR", "127.0.0.1"),
                           "MASTER_PORT": os.environ.get("MASTER_PORT", str(_free_port()))})
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_initialized() and _rebound_local_rank is not None:
        local_rank = _rebound_local_rank  # LOCAL_RANK holds the device index by now
    device = torch.device("cpu")
    if use_cuda:  # before the process group: NCCL binds to the current device
        local_world_size = os.environ.get("LOCAL_WORLD_SIZE")  # torchrun, submitit's export
        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = cuda_device_for_task(
            local_rank, int(local_world_size) if local_world_size else None, visible,
            unbound="TORCHELASTIC_RUN_ID" in os.environ)  # set by torchrun for its workers
        if index != local_rank:
            _rebound_local_rank = local_rank
            os.environ["LOCAL_RANK"] = str(index)
        torch.cuda.set_device(index)
        device = torch.device("cuda", index)
    import deepspeed

    backend = "nccl" if use_cuda else "gloo"
    if not dist.is_initialized():
        timeout, source = collective_timeout(timeout_min)
        _later_groups_default_to(timeout)
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                                   timeout=timeout)
        _group_timeout = timeout
        if dist.get_rank() == 0:
            log.info("collective timeout: %g min (%s): a rank that waits this long for the "
                     "others in one collective fails the job (one hung rank stops them all)",
                     timeout.total_seconds() / 60, source)
    elif (timeout_min is not None and _group_timeout is not None
          and timedelta(minutes=timeout_min) != _group_timeout):
        log.warning("%s=%g is not applied: this process's group already exists with a %g "
                    "min timeout", TIMEOUT_KEY, timeout_min,
                    _group_timeout.total_seconds() / 60)
    return DistInfo(dist.get_rank(), local_rank, dist.get_world_size(), device, backend)


def group_timeout() -> timedelta | None:
    """The timeout this process's ranks wait in a collective before failing (set by
    :func:`init_distributed`); None when no group was created there (one process)."""
    return _group_timeout


class MainRankLostError(RuntimeError):
    """Rank 0 went away, or did not finish within the bound, while this rank waited for
    it in :func:`wait_for_main`."""


def mark_done(key: str) -> None:
    """Rank 0: let the ranks waiting in :func:`wait_for_main` for ``key`` go on."""
    import torch.distributed as dist

    if _process_group_up():
        dist.distributed_c10d._get_default_store().set(key, "1")


def wait_for_main(key: str, what: str, bound_s: float, poll_s: float = 2.0,
                  log_every_s: float = 60.0) -> None:
    """Ranks other than 0: wait until rank 0 has called :func:`mark_done` for ``key``, up
    to ``bound_s`` seconds (a hung rank 0 then ends the wait, as the collective timeout
    would have), logging every ``log_every_s`` seconds.

    For work of rank 0 alone that may outlast the collective timeout (a universal
    checkpoint conversion at InternImage-H size): the others ask the process group's
    key-value store (hosted with the rendezvous) every ``poll_s`` seconds instead of
    waiting in a collective, which would fail them once the timeout passed. A store that
    stops answering (rank 0, or the launcher hosting it, gone) ends the wait at once with
    :class:`MainRankLostError`. Cost: one small request per rank per ``poll_s`` (at most a
    quarter of the collective timeout)."""
    import time

    import torch.distributed as dist

    if not _process_group_up():
        return
    store = dist.distributed_c10d._get_default_store()
    # rank 0 waits for the others in the next collective, bounded by the timeout: a rank
    # that noticed the key only a whole poll later would fail it
    timeout = _group_timeout.total_seconds() if _group_timeout is not None else None
    poll_s = poll_s if timeout is None else min(poll_s, timeout / 4)
    start = last_log = time.monotonic()
    while True:
        try:
            if store.check([key]):
                return
        except (RuntimeError, OSError) as err:  # DistStoreError, a reset connection
            raise MainRankLostError(f"rank 0 went away during {what}: its store stopped "
                                    f"answering ({err})") from None
        if time.monotonic() - start >= bound_s:
            raise MainRankLostError(f"rank 0 did not finish {what} within {bound_s:g} s")
        time.sleep(poll_s)
        if time.monotonic() - last_log >= log_every_s:
            last_log = time.monotonic()
            log.info("still waiting for rank 0: %s (%.0f s so far)", what,
                     last_log - start)


def rank_share(n: int, info: DistInfo) -> range:
    """This rank's indices of an ``n``-item evaluation set: the shares are disjoint and
    cover every item exactly once. (``DistributedSampler`` instead pads the shares to equal
    length by repeating items, which a metric would count twice: 176 of ImageNet's 50,000
    validation images on 512 ranks. Uneven shares are what runtime/lockstep.py is for.)"""
    return range(info.rank, n, info.world_size)


def barrier() -> None:
    """A barrier when a process group exists (no-op otherwise)."""
    import torch.distributed as dist

    if _process_group_up():
        dist.barrier()


def all_gather_objects(obj) -> list:
    """Every rank's ``obj`` in rank order (a one-element list without a process group)."""
    import torch.distributed as dist

    if not _process_group_up():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s ``obj`` on every rank (``obj`` itself without a process group).
    Collective: every rank calls it; the ``obj`` the other ranks pass is ignored.

    For one value every rank must agree on (a name chosen by rank 0): each rank receives
    one object, where :func:`all_gather_objects` hands each rank all ``N``. Under NCCL the
    object travels through the current CUDA device, as for :func:`all_gather_objects`.
    """
    import torch.distributed as dist

    if not _process_group_up():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def decided_on_rank0(decide: Callable[[], T], error: type[Exception], context: str) -> T:
    """``decide()`` run on rank 0 alone (the lone process without a process group), its
    (picklable) result broadcast to every rank. Collective: every rank calls it.

    For a look at shared storage every rank must agree on (which checkpoint ``--init``
    names, what it holds): each rank looking alone could find different answers while a
    live run writes there, and take different collective paths, then hang. A failure on
    rank 0 fails every rank with an ``error`` reading ``context: <rank 0's error>`` (rank 0
    re-raises its own when it is an ``error`` already), so no rank waits in a collective
    for a rank that gave up, and callers see one kind of error on every rank, and at any
    world size: a lone process raises the same ``error`` (a one-line refusal of the
    command, not a traceback).
    """
    lone = group_size() == 1
    outcome: tuple[bool, object] = (True, None)
    failure: Exception | None = None
    if lone or global_rank() == 0:
        try:
            outcome = (True, decide())
        except Exception as err:  # noqa: BLE001 - every rank raises it, below
            failure, outcome = err, (False, f"{type(err).__name__}: {err}")
    ok, value = outcome if lone else broadcast_object(outcome)
    if ok:
        return value
    if isinstance(failure, error):
        raise failure
    raise error(f"{context}: {value}") from failure


def broadcast_tensors(tensors: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """Rank 0's named CPU tensors on every rank, as CPU tensors (``tensors`` itself without
    a process group or alone; rank 0 keeps its own). Collective: every rank calls it, the
    others with None.

    For weights one rank read from storage that every rank needs (``--init`` of a
    fine-tuning run): one storage read instead of one per rank. One broadcast per tensor,
    in rank 0's order; under NCCL each travels through the current CUDA device, so the
    device holds one tensor more at a time, never the whole dict.
    """
    import torch.distributed as dist

    if group_size() == 1:
        return dict(tensors or {})
    main = dist.get_rank() == 0
    specs = broadcast_object([(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
                             if main else None)
    device = (torch.device("cuda", torch.cuda.current_device())
              if dist.get_backend() == "nccl" else torch.device("cpu"))
    out = {}
    for key, shape, dtype in specs:
        if main:
            t = tensors[key].contiguous().to(device)
        else:
            t = torch.empty(shape, dtype=dtype, device=device)
        if t.numel():  # nothing to send (and gloo refuses an empty buffer)
            dist.broadcast(t, src=0)
        out[key] = tensors[key] if main else t.cpu()
    return out


def gather_objects(obj, dst: int = 0) -> list | None:
    """Every rank's ``obj`` in rank order on rank ``dst``, None on the other ranks (a
    one-element list without a process group). Collective: every rank calls it.

    For what one rank alone consumes (rank 0 writing a file): :func:`all_gather_objects`
    hands each of ``N`` ranks all ``N`` objects, ``N`` x the bytes that matter (a log
    step's data statistics, ~750 B a rank: 0.2 GB across the job at 512 ranks); here
    ``dst`` receives them once, the others only the ``N`` sizes (8 bytes each, all-gathered
    by torch so that every rank pads to the largest). ``dst`` returns only
    once every rank has sent its object. Under NCCL the objects travel through the current
    CUDA device, as for :func:`all_gather_objects`: :func:`init_distributed` sets it to the
    rank's own.
    """
    import torch.distributed as dist

    if not _process_group_up():
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == dst else None
    dist.gather_object(obj, out, dst=dst)
    return out


def launcher_world_size() -> int | None:
    """``WORLD_SIZE`` as a launcher exported it (a dry run plans for that many GPUs), None
    when unset; a ValueError naming it when it is not a whole number >= 1."""
    value = os.environ.get("WORLD_SIZE")
    if value is None:
        return None
    try:
        count = int(value)
    except ValueError:
        raise ValueError(f"WORLD_SIZE={value!r}: not a GPU count") from None
    if count < 1:
        raise ValueError(f"WORLD_SIZE={count}: must be >= 1")
    return count


def global_rank() -> int:
    """This process's rank in the default process group (0 without one)."""
    import torch.distributed as dist

    return dist.get_rank() if _process_group_up() else 0


def group_size() -> int:
    """The default process group's world size (1 without one)."""
    import torch.distributed as dist

    return dist.get_world_size() if _process_group_up() else 1


def sum_over_ranks(values: Sequence[float] | None, length: int) -> list[float] | None:
    """Each rank's ``length`` numbers summed over the ranks (float64), on every rank: one
    all-reduce of ``length + 1`` numbers (under NCCL on the current CUDA device, as
    :func:`init_distributed` sets it). None on every rank when any rank passed None
    (it holds a count the caller's fixed slots lack: the caller then gathers instead).

    For counts rank 0 logs or saves: a :func:`gather_objects` of each rank's dict is,
    under NCCL, point-to-point, and connects rank 0 to every other rank, with GPU buffers
    kept per peer (NVIDIA/nccl#1685), at each logged step and checkpoint."""
    import torch.distributed as dist

    if values is not None and len(values) != length:
        raise ValueError(f"sum_over_ranks: {len(values)} values for {length} slots")
    vector = torch.tensor([*(values if values is not None else [0.0] * length),
                           float(values is None)], dtype=torch.float64)
    if _process_group_up():
        if dist.get_backend() == "nccl":
            vector = vector.cuda()
        dist.all_reduce(vector)
    summed = vector.tolist()
    return None if summed[-1] else summed[:-1]


def mean_over_ranks(values: Sequence[float]) -> list[float]:
    """Each rank's ``values`` averaged over the ranks (float64), on every rank: one
    :func:`sum_over_ranks` (the values themselves without a process group). Collective:
    every rank calls it with as many values."""
    summed = sum_over_ranks(list(values), len(values))
    return [v / group_size() for v in summed]


def mean_by_name(values: Mapping[str, float]) -> dict[str, float]:
    """Named values averaged over the ranks (:func:`mean_over_ranks`), reduced in sorted
    name order so ranks that built their dicts in different orders still agree, returned in
    ``values``' order. Collective: every rank calls it with the same names."""
    names = sorted(values)
    means = dict(zip(names, mean_over_ranks([float(values[n]) for n in names])))
    return {name: means[name] for name in values}


def sum_counts(counts: Mapping[Hashable, float],
               keys: Sequence[Hashable]) -> dict[Hashable, float] | None:
    """``counts`` summed over the ranks, on rank 0 (every key of ``keys``, zeros
    included); None on the others. Collective: every rank calls it.

    One :func:`sum_over_ranks` of the values at ``keys``, the fixed list every rank
    shares. A rank holding a key outside it makes every rank :func:`gather_objects` its
    counts to rank 0 instead, summed there: nothing is dropped, at the cost of the
    point-to-point gather."""
    listed = None if set(counts) - set(keys) else [float(counts.get(k, 0)) for k in keys]
    summed = sum_over_ranks(listed, len(keys))
    if summed is not None:
        return dict(zip(keys, summed)) if global_rank() == 0 else None
    per_rank = gather_objects(dict(counts))
    if per_rank is None:
        return None
    total: dict[Hashable, float] = dict.fromkeys(keys, 0.0)
    for rank_counts in per_rank:
        for key, n in rank_counts.items():
            total[key] = total.get(key, 0.0) + n
    return total


def any_rank(flag: bool, device: torch.device) -> bool:
    """True when ``flag`` is true on at least one rank (all ranks get the same answer)."""
    return max_over_ranks(1 if flag else 0, device) > 0


def max_over_ranks(value: int, device: torch.device) -> int:
    """The largest ``value`` of all ranks (all ranks get the same answer; alone: itself).
    Small integers only: it travels as a float32."""
    import torch.distributed as dist

    if not _process_group_up() or dist.get_world_size() == 1:
        return value
    t = torch.tensor([float(value)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def tensor_mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """The mean of ``t`` over the ranks of the process group (alone: ``t`` itself), in
    place and without gradient: every rank must call it, with a tensor of the same shape."""
    import torch.distributed as dist

    if _process_group_up() and dist.get_world_size() > 1:
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum of ``t`` over ranks, in place (identity alone)."""
    import torch.distributed as dist

    if info.world_size > 1:
        dist.all_reduce(t)
    return t


def broadcast_buffers(module: torch.nn.Module, info: DistInfo) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank.

    A DeepSpeed engine leaves buffers rank-local and saves rank 0's only. Called after
    each training micro-step (its forward is the only thing that changes them; not
    between forward and backward, where BatchNorm's autograd refuses a changed buffer),
    it keeps every rank holding rank 0's statistics at all other times: the next forward
    starts from them, as under DDP (``broadcast_buffers=True``, before each forward), and
    an evaluation, an EMA update and a checkpoint see on every rank the statistics the
    checkpoint holds.

    One broadcast per dtype (the buffers flattened together), not one per buffer: a
    UperNet head holds about 50 BatchNorm buffers, and each collective costs its latency
    on every micro-step across all ranks.
    """
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    if info.world_size == 1:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for buf in module.buffers():
        by_dtype.setdefault(buf.dtype, []).append(buf)
    for bufs in by_dtype.values():
        flat = _flatten_dense_tensors(bufs)
        dist.broadcast(flat, src=0)
        for buf, synced in zip(bufs, _unflatten_dense_tensors(flat, bufs), strict=True):
            buf.copy_(synced)
