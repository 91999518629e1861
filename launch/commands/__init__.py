"""Subcommands of `internimage`; each module has ``register(subparsers, name)``."""

from launch.commands import convert, estimate, finetune, pretrain, shards, submit

COMMANDS = {
    "pretrain": pretrain,
    "finetune": finetune,
    "convert": convert,
    "shards": shards,
    "submit": submit,
    "estimate": estimate,
}
