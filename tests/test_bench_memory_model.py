"""bench/memory_model.py: the per-stage activation bytes add up, bf16 halves fp32, checkpointing saves."""

from __future__ import annotations

import re
import subprocess
import sys

from conftest import REPO


def test_memory_model_adds_up_on_the_demo_config():
    # the SSM generator: its stages are what checkpoint_stages recomputes (demo.yaml's default is the U-Net)
    command = [sys.executable, "bench/memory_model.py", "--config", "configs/demo.yaml", "--size", "64"]
    command += ["--arch", "ssm"]
    result = subprocess.run([*command, "--batch", "2"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = re.findall(r"^\| ([\w.() ]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$", result.stdout, re.MULTILINE)
    stages = [row for row in rows if not row[0].startswith("**")]
    total = next(row for row in re.findall(r"^\| \*\*generator total\*\* \| (\d+) \| (\d+) \| (\d+) \|$",
                                            result.stdout, re.MULTILINE))  # fmt: skip
    fp32, bf16, checkpointed = (float(value) for value in total)
    assert abs(sum(float(row[1]) for row in stages) - fp32) <= 1 + 0.06 * len(stages)
    assert 0.4 * fp32 < bf16 < 0.65 * fp32, "bf16 activations are about half of fp32's"
    assert checkpointed < bf16, "checkpoint_stages keeps less"
    assert "## Per GPU at batch 2 (bf16), against 80 GiB" in result.stdout
    assert "configs/demo.yaml generator (ssm)" in result.stdout


def test_memory_model_measures_the_hybrid_on_a_slab_per_slice():
    command = [sys.executable, "bench/memory_model.py", "--config", "configs/brats_hybrid.yaml"]
    command += ["--size", "32", "--slab-slices", "2"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    title = (
        "per slice, configs/brats_hybrid.yaml generator (hybrid) at 32 x 32, one forward, measured on a slab"
    )
    assert f"{title} of 2 slices" in result.stdout
    row = r"^\| (encoder_branches\.3|bottleneck_branch) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$"
    branches = re.findall(row, result.stdout, re.MULTILINE)
    assert [name for name, *_ in branches] == ["encoder_branches.3", "bottleneck_branch"]
    assert all(float(fp32) > 0 and float(checkpointed) == 0 for _, fp32, _, checkpointed in branches)
    assert "## Per GPU at batch 32 (bf16), against 80 GiB" in result.stdout, "brats_hybrid.yaml's batch"
