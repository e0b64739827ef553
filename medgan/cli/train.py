"""``deepspeed launch/train.py --config X.yaml [overrides]``: the config tree from the command line, then
:func:`medgan.training.trainer.train` on every rank."""

from __future__ import annotations

import sys

from data_prep.errors import exit_status
from data_prep.shard_reader import ShardFolder
from medgan.config import config_from_cli
from medgan.distributed import init_distributed, set_thread_share
from medgan.training.trainer import train


def main(argv: list[str] | None = None) -> int:
    """``launch/train.py``: the config tree from the command line, then :func:`train`."""
    argv = sys.argv[1:] if argv is None else argv
    return exit_status("launch/train.py", lambda: _train_from(argv))


def _train_from(argv: list[str]) -> int:
    config = config_from_cli(argv)
    ShardFolder.open(config.data.data_path)  # a wrong --data_path fails before ranks start talking
    context = init_distributed()
    set_thread_share(context)
    train(config, context)
    return 0
