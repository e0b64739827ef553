"""bench/generator.py, the one CPU benchmark of the generator: it measures activation memory, runs end to
end on a tiny config, reports ratios against the U-Net row and can time the scan of an older commit."""

import subprocess
import sys

import pytest
import yaml
from conftest import REPO, load_script

from medgan.models.generator import GeneratorConfig


def load_bench():
    return load_script(REPO / "bench" / "generator.py", "bench_generator")


def test_one_measurement_sees_time_and_activation_memory():
    bench = load_bench()
    config = GeneratorConfig(
        base_channels=8, depth=2, ssm_levels=[1], ssm_state=4, condition_dim=8, attention_heads=2
    )
    size = 32
    row = bench.measure_here(config, size)
    assert row["parameters"] > 0 and row["wall"] > 0 and row["cpu"] > 0
    # the backward keeps, at full resolution alone, the encoder's and decoder's convolution, norm and
    # activation outputs and the skip: well over 16 fp32 maps of [8, 32, 32]; a peak read after the step,
    # or never reset, would miss them
    full_resolution_map = config.base_channels * size * size * 4
    assert row["peak_bytes"] >= 16 * full_resolution_map, row
    assert 0 < row["scan_share"] < 1, "the scans took some, not all, of the step"


def test_the_hybrid_is_measured_on_a_slab_against_its_trunk():
    bench = load_bench()
    tiny = dict(base_channels=8, depth=2, ssm_levels=[1], ssm_state=4, unet_base_channels=8)
    hybrid = bench.measure_here(GeneratorConfig(arch="hybrid", **tiny), 32, slab_slices=4)
    trunk = bench.measure_here(GeneratorConfig(arch="unet", **tiny), 32, slab_slices=4)
    assert hybrid["parameters"] > trunk["parameters"] and 0 < hybrid["scan_share"] < 1
    assert trunk["scan_share"] == 0


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
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    command += ["--old-commit", head.stdout.strip()]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180, check=True)
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ")][1:]
    names = [row.split(" | ")[0] for row in rows]
    assert names == ["| two directions", f"| two directions, scan at {head.stdout[:7]}", "| unet, width 8"]
    assert rows[-1].endswith("| 1.00x | 1.00x | 0% |")
