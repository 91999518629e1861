"""`internimage shards demo|write|verify`: build and check webdataset shards."""

import argparse

from launch.commands._pending import not_implemented


def register(sub, name: str) -> None:
    p = sub.add_parser(name, help="write and verify webdataset shards",
                       description="Shard tools: built-in demo data, image folders to "
                       "shards, verification through the training decode path.")
    p.add_argument("action", choices=["demo", "write", "verify"])
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments of the action")
    p.set_defaults(func=not_implemented("shards", 4))
