"""``medgan export``: a checkpoint folder to ``G.safetensors`` and its JSON description."""

from __future__ import annotations

from medgan.cli.common import say


def add_parser(commands) -> None:
    export = commands.add_parser("export", help="checkpoint folder -> .safetensors + .json")
    export.add_argument("--checkpoint", required=True, metavar="CKPT_DIR")
    export.add_argument(
        "--tag", metavar="T", help="checkpoint tag (default: best validation PSNR, else latest)"
    )
    export.add_argument("--out", required=True, metavar="G.safetensors")
    export.set_defaults(run=run)


def run(args, argv: list[str]) -> int:
    from medgan.inference.export import export_generator

    weights, description, loaded = export_generator(args.checkpoint, args.out, args.tag)
    say(f"wrote {weights} and {description}: {loaded.source}")
    return 0
