"""bench/generator.py runs end to end on a tiny config and reports ratios against the U-Net row."""

import subprocess
import sys

import pytest
import yaml
from conftest import REPO


@pytest.mark.slow  # end to end: two fresh interpreters, about 6-11 s on 2 cores
def test_generator_bench_prints_ratios_against_the_unet(tmp_path):
    generator = {
        "base_channels": 8, "depth": 2, "ssm_levels": [1], "ssm_state": 4, "ssm_expand": 1,
        "condition_dim": 8, "attention_heads": 2,
    }  # fmt: skip
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({"model": {"generator": generator}}))
    command = [sys.executable, str(REPO / "bench" / "generator.py"), "--config", str(config), "--quick"]
    command += ["--unet-width", "8", "--variant", "two directions", '{"ssm_directions": 2}']
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ")][1:]
    assert [row.split(" | ")[0] for row in rows] == ["| two directions", "| unet, width 8"]
    assert rows[-1].endswith("| 1.00x | 1.00x |")
