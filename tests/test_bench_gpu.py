"""bench/gpu.py is ready before anyone spends GPU time: its dry run passes on the CPU, its device check
catches a wrong scan, and its FLOP count adds the scan it cannot see."""

from __future__ import annotations

import os
import subprocess
import sys

import torch
from conftest import REPO, load_script

from medgan.models import ssm, ssm_triton
from medgan.models.generator import GeneratorConfig, build_generator


def load_bench():
    return load_script(REPO / "bench" / "gpu.py", "bench_gpu")


def test_dry_run_runs_every_part_on_the_cpu():
    result = subprocess.run(
        [sys.executable, "bench/gpu.py", "--dry-run"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    output = result.stdout
    assert output.count(": ok") == 4 and "MISMATCH" not in output
    verdicts = [line for line in output.splitlines() if line.startswith("triton scan vs reference on ")]
    assert len(verdicts) == 1, output
    if ssm_triton.interpreting():  # tests/conftest.py set TRITON_INTERPRET=1, which the child inherits
        assert "forward max err" in verdicts[0] and "MATCH in Triton's interpreter" in verdicts[0]
    assert "bf16 matmul peak: measured" in output
    for row in (
        "| chunked | 256 |",
        "| ssm | 2 |",
        "| ssm, checkpoint_stages | 2 |",
        "| unet (matched) | 2 |",
    ):
        assert row in output, row


def test_device_check_fails_on_a_wrong_scan(monkeypatch):
    bench = load_bench()

    def slightly_wrong(u, delta, A, *rest, **options):
        return ssm.selective_scan_ref(u, delta, A * 1.01, *rest, **options)

    assert bench.check_on_device(torch.device("cpu"))
    monkeypatch.setattr(ssm, "selective_scan_chunked", slightly_wrong)
    assert not bench.check_on_device(torch.device("cpu"))


def test_triton_verdict_is_one_line_that_catches_a_wrong_kernel(monkeypatch):
    """The line a user reads before setting scan_backend: triton. On a GPU (here: the chunked path standing in
    for compiled kernels) it says MATCH and what to set; a kernel 1% off in A gets MISMATCH."""
    bench = load_bench()
    cpu = torch.device("cpu")
    monkeypatch.setattr(bench, "triton_on", lambda device: True)
    monkeypatch.setattr(bench, "triton_interpreted", lambda device: False)
    monkeypatch.setattr(ssm_triton, "selective_scan_triton", ssm.selective_scan_chunked)
    line = bench.triton_verdict(cpu, "NVIDIA H200")
    assert "\n" not in line
    assert line.startswith("triton scan vs reference on NVIDIA H200: forward max err ")
    assert line.endswith(": MATCH — safe to set model.generator.scan_backend: triton"), line

    def slightly_wrong(u, delta, A, *rest, **options):
        return ssm.selective_scan_ref(u, delta, A * 1.01, *rest, **options)

    monkeypatch.setattr(ssm_triton, "selective_scan_triton", slightly_wrong)
    assert bench.triton_verdict(cpu, "NVIDIA H200").endswith(
        ": MISMATCH — keep model.generator.scan_backend: auto"
    )


def test_flop_count_adds_the_scan_analytically():
    bench = load_bench()
    small = dict(
        base_channels=8,
        depth=2,
        ssm_levels=[1],
        ssm_state=4,
        scales=[1, 2],
        attention_heads=2,
        condition_dim=8,
    )
    counts = {}
    for arch in ("ssm", "unet"):
        model = build_generator(GeneratorConfig(arch=arch, **small))
        counts[arch] = bench.model_flops_per_image(model, 16, 5, torch.device("cpu"))
    total, scan = counts["ssm"]
    # 4 directions x n=4; level 1 (8 x 8, inner width 32) at scales 1 and 2, bottleneck (4 x 4, 64) too
    assert scan == 21 * 4 * 4 * (32 * 64 + 32 * 16 + 64 * 16 + 64 * 4)
    assert total > scan
    assert counts["unet"][1] == 0 and counts["unet"][0] > 0


def test_the_gpu_bench_reads_a_config_over_its_base_as_the_config_tree_does():
    from medgan.config import read_yaml

    path = REPO / "configs" / "brats_hybrid.yaml"
    settings = load_bench().generator_settings(path)
    assert settings == read_yaml(path)["model"]["generator"] and settings["arch"] == "hybrid"
    assert settings["unet_base_channels"] == 72, "the base's widths are kept"
