"""`internimage estimate`: parameters and per-GPU memory of a model under ZeRO."""

from launch.commands._pending import not_implemented


def register(sub, name: str) -> None:
    p = sub.add_parser(name, help="estimate parameters and per-GPU memory")
    p.add_argument("--model", required=True)
    p.set_defaults(func=not_implemented("estimate", 2))
