"""The smallest training run the engine accepts, for the launch tests (multi-node, slurm): flags and ports."""

from __future__ import annotations

import os
import socket
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# A tiny model and batch so that a run's time is mostly DeepSpeed's start-up, not training. The SSM generator
# (demo.yaml's default is the U-Net since the second study): the model with the most kinds of parameters.
TINY_RUN_FLAGS = [
    "--model.generator.arch", "ssm",
    "--model.generator.base_channels", "8",
    "--model.generator.depth", "2",
    "--model.generator.ssm_levels", "1",
    "--model.discriminator.base_channels", "8",
    "--data.batch_size", "2",
    "--data.num_workers", "0",
    "--training.val_max_subjects", "2",
    "--logging.wandb", "disabled",
    "--logging.progress_bar", "false",
]  # fmt: skip

# Our own range, away from DeepSpeed's default 29500 that other tests running beside these may use.
MASTER_PORTS = range(29700, 29800)


def free_master_port() -> int:
    """A port of :data:`MASTER_PORTS` nothing listens on; the search starts at a per-process offset so that
    two test sessions side by side pick different ones."""
    start = os.getpid() % len(MASTER_PORTS)
    for offset in range(len(MASTER_PORTS)):
        port = MASTER_PORTS[(start + offset) % len(MASTER_PORTS)]
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {MASTER_PORTS.start}-{MASTER_PORTS.stop - 1}")
