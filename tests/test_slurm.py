"""``launch/slurm/*.sbatch`` on a real (one-node, local) slurm: a plain job trains to a checkpoint; a
preemptible job, sent USR1 as slurm does before a time limit, saves, requeues itself, resumes and finishes.

Skips, saying why, without slurm or root; ``.ci/run`` installs slurm so that in CI it runs.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest
from slurm_cluster import LocalSlurmCluster, unavailable_reason
from tiny_run import REPO, TINY_RUN_FLAGS, free_master_port

JOB_TIMEOUT_S = 300
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"}


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    cluster = LocalSlurmCluster(tmp_path_factory.mktemp("slurm"))
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.cancel_jobs_and_wait()
        cluster.stop()


def training_arguments(shards: Path, checkpoints: Path, max_steps: int) -> list[str]:
    return [
        "--config", "configs/demo.yaml", "--data_path", str(shards), "--checkpoint_dir", str(checkpoints),
        "--training.max_steps", str(max_steps), "--training.val_every_steps", "1000",
        "--checkpoint.every_steps", "1000", "--logging.log_every_steps", "1", *TINY_RUN_FLAGS,
    ]  # fmt: skip


def submit(cluster: LocalSlurmCluster, script: str, output: Path, arguments: list[str]) -> str:
    """sbatch from the repository root on one node; the job id."""
    result = cluster.run(
        "sbatch", "--parsable", "--nodes=1", f"--output={output}", script, *arguments,
        cwd=REPO, env=cluster.env(MASTER_PORT=str(free_master_port())),
    )  # fmt: skip
    return result.stdout.strip().split(";")[0]


def wait_for(condition, what: str, cluster: LocalSlurmCluster, output: Path, timeout: float = JOB_TIMEOUT_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(1)
    log = output.read_text() if output.exists() else "(no job output yet)"
    controller = (cluster.root / "log" / "slurmctld.log").read_text()[-3000:]
    pytest.fail(f"{what}: not after {timeout:.0f} s\n--- job\n{log[-8000:]}\n--- slurmctld\n{controller}")


def finished_state(cluster: LocalSlurmCluster, job_id: str) -> str | None:
    state = cluster.job_fields(job_id).get("JobState")
    return state if state in FINISHED else None


def test_train_sbatch_refuses_a_command_without_config():
    result = subprocess.run(
        ["bash", "launch/slurm/train.sbatch", "--data_path", "shards"],
        cwd=REPO, capture_output=True, text=True, env={**os.environ, "SLURM_JOB_ID": "1"},
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "missing --config FILE" in result.stderr


@pytest.mark.slow
@pytest.mark.usefixtures("deepspeed_ops_built")
def test_train_sbatch_trains_to_a_checkpoint(slurm, phantom_shards, tmp_path):
    output = tmp_path / "job.out"
    checkpoints = tmp_path / "checkpoints"
    arguments = training_arguments(phantom_shards, checkpoints, 2)
    job = submit(slurm, "launch/slurm/train.sbatch", output, arguments)

    state = wait_for(lambda: finished_state(slurm, job), f"job {job} finished", slurm, output)
    log = output.read_text()
    assert state == "COMPLETED", log
    assert "1 node(s) x 1 rank(s)" in log
    assert "done: 2 steps" in log
    assert (checkpoints / "generator" / "latest").read_text().strip() == "step_000002"
    assert not (REPO / "runs" / "slurm" / f"hostfile.{job}").exists(), "the job's hostfile is left behind"


@pytest.mark.slow
@pytest.mark.usefixtures("deepspeed_ops_built")
def test_preempted_job_saves_requeues_and_resumes(slurm, phantom_shards, tmp_path):
    output = tmp_path / "job.out"
    checkpoints = tmp_path / "checkpoints"
    # USR1 goes slurmctld -> slurmd -> the batch shell's trap -> SIGTERM to the ranks, which took longer
    # than 9 of these tiny steps once (the ranks stopped at the last step): enough steps to land inside
    steps = 40
    arguments = training_arguments(phantom_shards, checkpoints, steps)
    job = submit(slurm, "launch/slurm/train_preemptible.sbatch", output, arguments)

    wait_for(lambda: output.exists() and f"step 1/{steps}:" in output.read_text(), "training", slurm, output)
    # what slurm does 120 s before the time limit (--signal=B:USR1@120), now
    slurm.run("scancel", "--batch", "--signal=USR1", job)
    state = wait_for(lambda: finished_state(slurm, job), f"job {job} finished", slurm, output)
    log = output.read_text()
    assert state == "COMPLETED", log

    first_run, _, restart = log.partition("restart 1:")
    assert restart, f"the job was not restarted:\n{log}"
    stop = re.search(r"SIGTERM: stopping at step (\d+)", first_run)
    assert stop, f"the ranks did not stop on USR1:\n{log}"
    tag = f"step_{int(stop.group(1)):06d}"
    assert 1 <= int(stop.group(1)) < steps
    # the checkpoint was complete before the ranks exited and the job requeued itself
    saved = first_run.index(f"saved checkpoint {checkpoints / 'generator' / tag}")
    assert saved < first_run.index("training exited with status 0") < first_run.index("requeueing job")
    assert (checkpoints / "generator" / tag / "ema.safetensors").is_file()
    assert slurm.job_fields(job)["Restarts"] == "1"

    assert f"resuming from {tag}" in restart
    assert f"done: {steps} steps" in restart
    assert (checkpoints / "generator" / "latest").read_text().strip() == f"step_{steps:06d}"
