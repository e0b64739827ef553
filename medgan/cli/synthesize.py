"""``medgan synthesize``: NIfTI inputs to a synthesized NIfTI on their grid, one subject or a folder
(BraSyn mode without ``--target``)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from medgan.cli.common import (
    CHECKPOINT_OR_EXPORT,
    EXIT_INPUT_ERROR,
    EXIT_SOME_SUBJECTS_FAILED,
    add_checkpoint_options,
    choose_device,
    command_line,
    say,
)
from medgan.inference.errors import SynthesisError


def add_parser(commands) -> None:
    synthesize = commands.add_parser("synthesize", help="NIfTI inputs -> synthesized NIfTI on their grid")
    add_checkpoint_options(synthesize, CHECKPOINT_OR_EXPORT)
    synthesize.add_argument("--input", action="append", default=[], metavar="MOD=FILE")
    synthesize.add_argument("--subjects", metavar="DIR", help="synthesize every subject in a folder")
    synthesize.add_argument(
        "--target",
        metavar="M",
        help="contrast to synthesize; without it, --subjects is BraSyn mode (each subject's missing one)",
    )
    synthesize.add_argument(
        "--out", required=True, metavar="FILE|DIR", help="a .nii.gz, or a folder with --subjects"
    )
    synthesize.add_argument("--reference", metavar="MOD", help="input whose grid the output takes")
    synthesize.add_argument(
        "--spread",
        choices=["flip", "weights", "both"],
        help="also write OUT_spread.nii.gz: the voxelwise SD over flipped inputs and/or EMA and raw weights "
        "(a spread, not a calibrated uncertainty)",
    )
    synthesize.set_defaults(run=run)


def run(args, argv: list[str]) -> int:
    """One subject (``--input``) or a folder (``--subjects``, BraSyn mode without ``--target``)."""
    from medgan.inference.spread import load_for_synthesis

    if bool(args.subjects) == bool(args.input):
        raise SynthesisError("give either --input MODALITY=FILE (one subject) or --subjects DIR (a folder)")
    if args.input and not args.target:
        raise SynthesisError(
            "--target: needed with --input (only --subjects DIR works without it: BraSyn mode)"
        )
    generator, other_weights = load_for_synthesis(
        args.checkpoint, args.tag, choose_device(args.device), args.spread
    )
    command = command_line(args.prog, argv)
    if args.subjects:
        return _synthesize_folder(args, generator, other_weights, command)
    return _synthesize_one(args, generator, other_weights, command)


def _synthesize_folder(args, generator, other_weights, command: str) -> int:
    """Every subject of ``--subjects``; 0, or 1 when some failed (each named on stderr), or 2 when none
    was written."""
    from medgan.inference.folder_mode import synthesize_folder
    from medgan.inference.sidecars import provenance_folder

    started = time.perf_counter()
    written, failures = synthesize_folder(
        generator,
        Path(args.subjects),
        args.target,
        Path(args.out),
        reference=args.reference,
        batch_size=args.batch_size,
        spread=args.spread,
        other_weights=other_weights,
        command=command,
    )
    for line in failures:
        print(f"medgan synthesize: {line}", file=sys.stderr)
    mode = f"{args.target} for every subject" if args.target else "each subject's missing contrast (BraSyn)"
    spread = f", each with its spread ({args.spread})" if args.spread else ""
    sidecars = (
        "with JSON sidecars beside them"
        if args.target
        else f"(the folder to zip and submit; sidecars{' and spreads' if args.spread else ''} in "
        f"{provenance_folder(Path(args.out))})"
    )
    say(
        f"wrote {len(written)} synthesized volumes ({mode}{spread}) to {args.out} {sidecars} "
        f"in {time.perf_counter() - started:.0f} s"
    )
    if not written:
        return EXIT_INPUT_ERROR
    return EXIT_SOME_SUBJECTS_FAILED if failures else 0


def _synthesize_one(args, generator, other_weights, command: str) -> int:
    """One subject from its ``--input`` files to ``--out`` (and its spread beside it)."""
    from medgan.inference.sidecars import spread_path, write_synthesized
    from medgan.inference.synthesis import parse_input_flags, synthesize_volume

    started = time.perf_counter()
    result = synthesize_volume(
        generator,
        parse_input_flags(args.input),
        args.target,
        reference=args.reference,
        batch_size=args.batch_size,
        progress="synthesize",
        spread=args.spread,
        other_weights=other_weights,
    )
    out = Path(args.out)
    write_synthesized(result, out, command)
    say(
        f"wrote {out}: {result.target} from {' '.join(result.inputs)}, shape {result.image.shape} on the "
        f"{result.reference} grid, {result.synthesized.shape[0]} slices in "
        f"{time.perf_counter() - started:.1f} s"
    )
    if result.spread is not None:
        say(
            f"wrote {spread_path(out)}: SD over {len(result.variants)} variants ({args.spread}), "
            "a spread, not a calibrated uncertainty"
        )
    return 0
