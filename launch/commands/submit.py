"""`internimage submit`: run pretrain/finetune as a SLURM job through submitit."""

from launch.commands._pending import not_implemented


def register(sub, name: str) -> None:
    p = sub.add_parser(name, help="submit a job to SLURM (submitit)",
                       description="Submit `pretrain` or `finetune` to SLURM with requeue on "
                       "preemption and time-out.")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=0)
    p.add_argument("--partition")
    p.add_argument("--time", type=int, help="minutes")
    p.add_argument("--account")
    p.add_argument("--qos")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("job", nargs="*", help="pretrain|finetune and its arguments")
    p.set_defaults(func=not_implemented("submit", 6))
