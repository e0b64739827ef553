"""Multi-node launch without ssh, as on a cluster: two single-rank "nodes" on this machine, one hostfile.

Each node runs the same ``deepspeed --hostfile H --no_ssh --node_rank R --master_addr A`` command that
``launch/slurm/train.sbatch`` starts on every node; together they form one 2-rank job (gloo on the CPU).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from tiny_run import REPO, TINY_RUN_FLAGS, free_master_port

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("deepspeed_ops_built")]

DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")
NODE_TIMEOUT_S = 400


def run_two_nodes(hostfile: Path, arguments: list[str], logs: Path) -> list[str]:
    """Start node 1, then node 0, wait for both; return each node's output, node 0 first."""
    port = free_master_port()
    logs.mkdir(parents=True, exist_ok=True)
    nodes = []
    for rank in (1, 0):
        log = (logs / f"node{rank}.log").open("w")
        command = [
            DEEPSPEED, "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(rank),
            "--master_addr", "127.0.0.1", "--master_port", str(port), "launch/train.py", *arguments,
        ]  # fmt: skip
        nodes.append((rank, log, subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)))
    try:
        for _, _, node in nodes:
            node.wait(NODE_TIMEOUT_S)
    finally:
        for _, log, node in nodes:
            if node.poll() is None:
                node.kill()
                node.wait()
            log.close()
    outputs = {rank: (logs / f"node{rank}.log").read_text() for rank, _, _ in nodes}
    for rank, _, node in nodes:
        assert node.returncode == 0, f"node {rank} exited {node.returncode}:\n{outputs[rank][-6000:]}"
    return [outputs[0], outputs[1]]


def test_two_nodes_train_to_one_checkpoint_and_a_rerun_resumes(phantom_shards, tmp_path):
    hostfile = tmp_path / "hostfile"
    # two names for this machine: with --no_ssh nothing connects to them, they only have to differ
    hostfile.write_text("localhost slots=1\n127.0.0.2 slots=1\n")
    checkpoints = tmp_path / "checkpoints"
    arguments = [
        "--config", "configs/demo.yaml", "--data_path", str(phantom_shards), "--checkpoint_dir",
        str(checkpoints), "--checkpoint.every_steps", "2", "--deepspeed.zero_stage", "2", *TINY_RUN_FLAGS,
    ]  # fmt: skip

    first, _ = run_two_nodes(hostfile, [*arguments, "--training.max_steps", "2"], tmp_path / "first")
    assert "2 rank(s)" in first
    assert "done: 2 steps" in first
    tag = checkpoints / "generator" / "step_000002"
    assert (checkpoints / "generator" / "latest").read_text().strip() == "step_000002"
    # ZeRO 2 shards the optimizer state per rank: both nodes wrote their share of the one checkpoint
    assert sorted(p.name for p in tag.glob("zero_pp_rank_*_optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]

    again, _ = run_two_nodes(hostfile, [*arguments, "--training.max_steps", "4"], tmp_path / "again")
    assert "resuming from step_000002 (step 2, epoch 0)" in again
    assert "done: 4 steps" in again
    assert (checkpoints / "generator" / "latest").read_text().strip() == "step_000004"
