"""`internimage convert SRC DST`: ZeRO checkpoint -> safetensors / released layout."""

from launch.commands._pending import not_implemented


def register(sub, name: str) -> None:
    p = sub.add_parser(name, help="convert a checkpoint for fine-tuning",
                       description="Consolidate a DeepSpeed ZeRO checkpoint (or convert a "
                       "released .pth) into one safetensors file or the released layout.")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--format", choices=["safetensors", "official"], default="safetensors")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.set_defaults(func=not_implemented("convert", 7))
