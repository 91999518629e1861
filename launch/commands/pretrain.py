"""`internimage pretrain`: the main job (DeepSpeed ZeRO-3, M3I-style objectives)."""

from launch.commands._pending import not_implemented


def register(sub, name: str) -> None:
    p = sub.add_parser(name, help="pre-train InternImage (no config: the CPU demo)",
                       description="Pre-train InternImage with DeepSpeed ZeRO-3 on streamed "
                       "webdataset shards. With no --config it runs the built-in CPU demo.")
    p.add_argument("--config", help="YAML config (configs/pretrain/*.yaml)")
    p.add_argument("--output-dir", help="run directory")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--checkpoint-every", type=int)
    p.add_argument("--resume", help="auto | PATH")
    p.add_argument("--dry-run", action="store_true", help="validate and print the plan only")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=not_implemented("pretrain", 5))
