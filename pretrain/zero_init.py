"""Building a model already partitioned across ranks (DeepSpeed ZeRO-3's ``zero.Init``).

Without it every rank builds the whole fp32 model before DeepSpeed partitions it: 4.5 GiB
per rank for the InternImage-H M3I model (4.06 GiB of it the backbone), about 39 GB of
host memory on an 8-GPU node. Inside
``partitioned_construction`` each module's parameters are split across the ranks as soon
as its ``__init__`` returns, so a rank only ever holds its 1/N share plus the module being
built.

zero.Init has one trap: code that re-initialises a *child's* parameters after the child
was built meets an empty partition (xavier fails: "Fan in and fan out can not be
computed"; ``normal_`` silently does nothing). ``module.apply(fn)`` is gathered by
DeepSpeed itself; every other such place gathers through ``gathered_for_init`` (the DCNv3
layer through the hook ``ops.dcnv3.module.INIT_GATHER``). With that, a build under
zero.Init draws the same random numbers as a plain build: same seed, same weights.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

from torch import nn


def gathered_for_init(params: Iterable[nn.Parameter]) -> AbstractContextManager:
    """A context in which ``params`` are whole tensors that may be re-initialised.

    Parameters partitioned by zero.Init are gathered from all ranks and, on exit, rank 0's
    values are kept everywhere and partitioned again (every rank draws the same values
    anyway: the build is seeded). Plain parameters: a no-op, DeepSpeed is not imported.
    """
    params = list(params)
    if not any(hasattr(p, "ds_id") for p in params):  # ds_id: set by zero.Init
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0)


@contextmanager
def partitioned_construction(ds_config: dict[str, Any]) -> Iterator[None]:
    """Modules constructed inside are partitioned across the ranks as they are built.

    ``ds_config`` is the run's DeepSpeed config: it sets the parameters' dtype (bf16/fp16
    runs build in 16 bits, buffers included) and where partitions live (the accelerator,
    or the host with parameter offload). Needs an initialised process group.
    """
    import deepspeed
    import open_clip  # noqa: F401

    # timm/torchvision (imported by models) must be imported before zero.Init patches
    # torch's tensor constructors, else dynamo fails with "Signature mismatch".
    import models  # noqa: F401
    from ops.dcnv3.module import INIT_GATHER

    token = INIT_GATHER.set(gathered_for_init)
    try:
        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            yield
    finally:
        INIT_GATHER.reset(token)
