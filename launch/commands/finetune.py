"""`internimage finetune classification|detection|segmentation`."""

from launch.commands._pending import not_implemented


def register(sub, name: str) -> None:
    p = sub.add_parser(name, help="fine-tune on ImageNet / COCO / ADE20K",
                       description="Fine-tune a pre-trained InternImage downstream.")
    p.add_argument("task", choices=["classification", "detection", "segmentation"])
    p.add_argument("--config", help="YAML config (configs/finetune/*.yaml); none: the demo")
    p.add_argument("--init", help="checkpoint: convert output, ZeRO dir or released .pth")
    p.add_argument("--output-dir", help="run directory")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=not_implemented("finetune", 7))
