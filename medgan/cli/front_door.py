"""The seed's front door, ``medgan --mode {train,test,both} --data_path DIR``: shard a raw folder once,
train on every rank, then evaluate the test split and write the report."""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

from data_prep.errors import DataError
from data_prep.shard_reader import is_shard_folder
from medgan.cli.common import command_line, say
from medgan.cli.evaluate import EvaluationRequest, evaluate_checkpoint

MODES = ("train", "test", "both")
# How long the other ranks wait for rank 0 to shard a raw folder: far longer than a BraTS shard takes.
SHARD_WAIT_SECONDS = 6 * 3600


def _raw_format(folder: Path) -> str:
    """``ixi`` when data_prep's name rules find only IXI subjects in the folder, else ``brats``."""
    from data_prep.volumes import discover_nifti_subjects

    datasets = {subject.dataset for subject in discover_nifti_subjects(folder, flag="--data_path").subjects}
    return "ixi" if datasets == {"ixi"} else "brats"


def shards_for(data_path: str, checkpoint_dir: Path) -> Path:
    """A shard folder for ``data_path``: itself when it has a manifest, else a raw BraTS/IXI folder
    sharded into ``checkpoint_dir/shards`` with ``python -m data_prep shard`` (rank 0 runs it)."""
    source = Path(data_path)
    if not data_path or not source.is_dir():
        raise DataError(f"--data_path {data_path or '(empty)'}: no such folder")
    if is_shard_folder(source):
        return source
    shards = checkpoint_dir / "shards"
    if is_shard_folder(shards):
        say(f"reusing the shards of {source} in {shards}")
        return shards
    command = [
        sys.executable, "-m", "data_prep", "shard", "--format", _raw_format(source),
        "--src", str(source), "--out", str(shards),
    ]  # fmt: skip
    say(f"{source} is a raw folder: {shlex.join(command)}")
    if subprocess.run(command).returncode != 0:
        raise DataError(f"--data_path {source}: python -m data_prep shard failed (see above)")
    return shards


def run(argv: list[str], prog: str) -> int:
    """The seed's ``--mode train|test|both``: shard a raw folder once (rank 0, the others wait, in every
    mode), train on every rank, then evaluate the test split and write the report on
    rank 0 (the other ranks return 0)."""
    from medgan.config import config_from_cli
    from medgan.distributed import init_distributed, read_context, run_on_main, set_thread_share

    mode_parser = argparse.ArgumentParser(prog=prog, add_help=False)
    mode_parser.add_argument("--mode", choices=MODES, required=True)
    known, rest = mode_parser.parse_known_args(argv)
    config = config_from_cli(rest)
    checkpoint_dir = Path(config.checkpoint.dir)
    trains = known.mode in ("train", "both")
    context = read_context()
    if trains or context.world_size > 1:
        # the other ranks need a process group to wait on rank 0's sharding
        context = init_distributed()
        set_thread_share(context)
    shards = run_on_main(
        lambda: shards_for(config.data.data_path, checkpoint_dir),
        timedelta(seconds=SHARD_WAIT_SECONDS),
        f"shard {config.data.data_path}",
    )
    if trains:
        from medgan.training.trainer import train

        config.data.data_path = str(shards)
        train(config, context)
    if known.mode == "train" or not context.is_main:
        return 0
    evaluation = checkpoint_dir / "eval"
    request = EvaluationRequest(
        checkpoint=config.checkpoint.file or str(checkpoint_dir),
        out=evaluation,
        data_path=str(shards),
        split="test",
        input_modalities=config.data.input_modalities or None,
        target_modality=None if config.data.target_modality == "any" else config.data.target_modality,
        report=str(evaluation / "report.html"),
        batch_size=config.data.batch_size,
        command=command_line(prog, argv),
    )
    evaluate_checkpoint(request)
    return 0
