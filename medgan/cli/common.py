"""What every ``medgan`` subcommand shares: exit statuses, the device, the one-line console output and the
checkpoint options."""

from __future__ import annotations

import argparse
import shlex

# every command line exits with these (data_prep.errors owns them)
from data_prep.errors import EXIT_INPUT_ERROR, EXIT_INTERRUPTED  # noqa: F401

EXIT_SOME_SUBJECTS_FAILED = 1


def choose_device(name: str | None) -> str:
    """``name``, or ``cuda`` when a GPU is visible, else ``cpu``."""
    import torch

    return name or ("cuda" if torch.cuda.is_available() else "cpu")


def say(line: str) -> None:
    print(line, flush=True)


def command_line(prog: str, argv: list[str]) -> str:
    """The command as the user typed it, recorded in evaluation summaries and provenance sidecars."""
    return f"{prog} {shlex.join(argv)}"


def add_checkpoint_options(
    parser: argparse.ArgumentParser, checkpoint_help: str, required: bool = True
) -> None:
    parser.add_argument("--checkpoint", required=required, metavar="C", help=checkpoint_help)
    parser.add_argument(
        "--tag", metavar="T", help="checkpoint tag (default: best validation PSNR, else latest)"
    )
    parser.add_argument("--batch_size", type=int, default=8, metavar="N", help="slices per forward pass")
    parser.add_argument("--device", metavar="D", help="cpu, cuda, cuda:1 (default: cuda when available)")


CHECKPOINT_OR_EXPORT = "a checkpoint folder or an exported .safetensors file"
