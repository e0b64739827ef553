"""`medgan-prep {phantom,shard,verify}` (or `python -m data_prep ...`): the command lines of DESIGN.md.

Problems the user can fix arrive here as `UserError` and leave as one line on stderr with exit status 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from data_prep.errors import exit_status


def progress_bar(description: str):
    """A tqdm wrapper for iterables; silent when stderr is not a terminal (logs, CI, tests)."""
    return lambda items, **kwargs: tqdm(items, desc=description, unit="subject", disable=None, **kwargs)


def _run_phantom(args) -> int:
    from data_prep.phantom import PhantomConfig, make_phantom

    config = PhantomConfig(
        layout=args.layout,
        subjects=args.subjects,
        seed=args.seed,
        shape=tuple(args.shape),
        missing_rate=args.missing_rate,
    )
    subjects = make_phantom(config, args.out, progress=progress_bar("phantom"), noise_free=args.noise_free)
    with_tumour = sum(subject.has_tumour for subject in subjects)
    print(
        f"wrote {len(subjects)} {config.layout} phantom subjects ({with_tumour} with a tumour) to {args.out}"
    )
    if args.noise_free is not None:
        print(
            f"and each without its bias field and noise to {args.noise_free / 'noise_free'}, and with the "
            f"noise's mean lift to {args.noise_free / 'expected'}"
        )
    return 0


def _run_shard(args) -> int:
    from data_prep.shard import ShardConfig, shard_dataset

    config = ShardConfig(
        dataset=args.format,
        source=args.src,
        out=args.out,
        size=args.size,
        split_fractions=tuple(args.split),
        split_file=args.split_file,
        seed=args.seed,
        workers=args.workers,
        strict=args.strict,
        modalities=tuple(args.modalities) if args.modalities else None,
        required=tuple(args.require),
    )
    return shard_dataset(config)


def _run_verify(args) -> int:
    from data_prep.verify import verify_shards

    summary = verify_shards(args.dir)
    print(summary)
    return 0


def build_parser(prog: str = "python -m data_prep") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    phantom = commands.add_parser("phantom", help="write a seeded synthetic BraTS- or IXI-style dataset")
    phantom.add_argument("--layout", choices=["brats", "ixi"], required=True)
    phantom.add_argument("--subjects", type=int, required=True, metavar="N")
    phantom.add_argument("--out", type=Path, required=True, metavar="DIR")
    phantom.add_argument("--seed", type=int, default=0, metavar="S")
    phantom.add_argument("--shape", type=int, nargs=3, default=[128, 128, 64], metavar=("X", "Y", "Z"))
    phantom.add_argument(
        "--missing-rate",
        type=float,
        default=0.0,
        metavar="P",
        help="probability a subject lacks one contrast",
    )
    phantom.add_argument(
        "--noise-free",
        type=Path,
        default=None,
        metavar="DIR",
        help="brats layout: also write every subject without its bias field and noise (DIR/noise_free) and "
        "with the noise's mean lift (DIR/expected), references no model can beat; the subjects are unchanged",
    )
    phantom.set_defaults(run=_run_phantom)

    shard = commands.add_parser("shard", help="BraTS / IXI NIfTI -> webdataset shards + manifest.json")
    shard.add_argument("--format", choices=["brats", "ixi"], required=True)
    shard.add_argument("--src", type=Path, required=True, metavar="DIR")
    shard.add_argument("--out", type=Path, required=True, metavar="DIR")
    shard.add_argument("--size", type=int, default=256, metavar="PIXELS", help="in-plane crop/pad size")
    shard.add_argument(
        "--split", type=float, nargs=3, default=[0.8, 0.1, 0.1], metavar=("TR", "VA", "TE"), help="fractions"
    )
    shard.add_argument("--split-file", type=Path, metavar="F", help="reuse a splits_final.json")
    shard.add_argument("--seed", type=int, default=0, metavar="S")
    shard.add_argument("--workers", type=int, default=1, metavar="N")
    shard.add_argument("--strict", action="store_true", help="exit non-zero if any subject fails")
    shard.add_argument("--modalities", nargs="+", metavar="MOD", help="channel order (default: the format's)")
    shard.add_argument("--require", nargs="+", default=[], metavar="MOD", help="drop subjects lacking these")
    shard.set_defaults(run=_run_shard)

    verify = commands.add_parser("verify", help="re-read and check a shard folder against its manifest")
    verify.add_argument("dir", type=Path, metavar="DIR")
    verify.set_defaults(run=_run_verify)
    return parser


def main(argv: list[str] | None = None, prog: str = "python -m data_prep") -> int:
    args = build_parser(prog).parse_args(argv)
    return exit_status(f"data_prep {args.command}", lambda: args.run(args))


def entry() -> int:
    """The installed ``medgan-prep`` console command."""
    return main(prog="medgan-prep")


if __name__ == "__main__":
    sys.exit(main())
