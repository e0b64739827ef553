"""bench/study.py: its receptive fields are the generator's, its paired statistics and Holm's adjustment
match numbers worked by hand, one run goes from launch/train.py's run record through evaluation to the scan
share, and a run is summarised from its record and best tag alone."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO
from torch import nn

from medgan.checkpointing import CheckpointManager
from medgan.config import config_from_cli
from medgan.distributed import DistributedContext
from medgan.models.generator import GeneratorConfig, build_generator


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("bench_study", REPO / "bench" / "study.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def _gradient_extent(model: nn.Module, feature_module: nn.Module, size: int) -> int:
    """Rows of the input that reach the centre pixel of ``feature_module``'s output."""
    captured = {}
    hook = feature_module.register_forward_hook(lambda _m, _i, output: captured.update(out=output))
    images = torch.rand(1, len(model.config.modalities), size, size, requires_grad=True)
    available = torch.ones(1, len(model.config.modalities), dtype=torch.bool)
    try:
        model(images, available, torch.tensor([0]))
    finally:
        hook.remove()
    feature = captured["out"]
    feature[0, :, feature.shape[2] // 2, feature.shape[3] // 2].sum().backward()
    rows = torch.nonzero(images.grad[0].abs().sum(dim=(0, 2)) > 0)
    return int(rows.max() - rows.min() + 1)


@pytest.mark.parametrize("depth", [2, 3])
def test_receptive_fields_are_the_generators_measured_by_the_gradient(study, depth):
    config = GeneratorConfig(
        base_channels=8, depth=depth, ssm_levels=[], use_ssm=False, use_attention=False,
        use_dynamic_gating=False, attention_heads=1, condition_dim=4,
    )  # fmt: skip
    model = build_generator(config).double()
    # group norm mixes statistics over the whole image: out of the way, so the gradient shows the convolutions
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.GroupNorm):
            parent = model.get_submodule(name.rsplit(".", 1)[0])
            setattr(parent, name.rsplit(".", 1)[1], nn.Identity())
    model = model.float()
    expected = study.receptive_fields(depth)
    size = 256
    for level in range(depth):
        assert _gradient_extent(model, model.encoder[level], size) == expected[f"level {level}"]
    assert _gradient_extent(model, model.bottleneck, size) == expected["bottleneck"]


def test_the_arms_are_the_declared_generators_whatever_demo_yaml_defaults_to(study):
    """The first study's arms name their generator: demo.yaml's default moved to the U-Net after it ran."""
    generators = {
        arm: config_from_cli(
            study.run_flags(study.Run("l1", arm, 0, 64), Path("s"), Path("r"), 60.0)
        ).model.generator
        for arm in study.ARMS
    }
    assert {arm: (g.arch, g.scan_off) for arm, g in generators.items()} == {
        "unet": ("unet", False), "ssm": ("ssm", False), "scanoff": ("ssm", True),
    }  # fmt: skip
    assert build_generator(generators["unet"]).stem.out_channels == 16, "the width matched to demo.yaml's SSM"


def test_ssm_levels_without_global_reach(study):
    # depth 3: level 1 sees 18 pixels, level 2 40; level 0 is never chosen
    assert study.ssm_levels_without_global_reach(128, 3) == [1, 2]
    assert study.ssm_levels_without_global_reach(32, 3) == [1]
    assert study.ssm_levels_without_global_reach(16, 3) == []


def test_comparisons_are_paired_over_seed_averaged_subjects_with_holm_and_a_bonferroni_interval(study):
    endpoint = ("tumour", "psnr")
    # Two seeds per arm. Seed-averaged, ssm is s1..s4 = 21 22 23 24; unet is 20 20 20 (s4 missing from
    # seed 1, so it drops out, and its 0.0 in seed 0 must not count); scanoff is s2..s4 = 21 20 19 (s1
    # missing from seed 1, its 50 must not count).
    arms = {
        "ssm": [
            {endpoint: {"s1": 20.5, "s2": 21.5, "s3": 22.5, "s4": 23.5}},
            {endpoint: {"s1": 21.5, "s2": 22.5, "s3": 23.5, "s4": 24.5}},
        ],
        "unet": [
            {endpoint: {"s1": 20.0, "s2": 20.0, "s3": 20.0, "s4": 0.0}},
            {endpoint: {"s1": 20.0, "s2": 20.0, "s3": 20.0}},
        ],
        "scanoff": [
            {endpoint: {"s1": 50.0, "s2": 20.0, "s3": 20.0, "s4": 18.0}},
            {endpoint: {"s2": 22.0, "s3": 20.0, "s4": 20.0}},
        ],
    }
    assert study.seed_averaged(arms["unet"], endpoint) == {"s1": 20.0, "s2": 20.0, "s3": 20.0}
    assert study.seed_averaged(arms["scanoff"], endpoint) == {"s2": 21.0, "s3": 20.0, "s4": 19.0}
    rows = study.comparison_rows(arms, [("ssm", "unet"), ("ssm", "scanoff")], endpoint)
    assert [row["pair"] for row in rows] == [("ssm", "unet"), ("ssm", "scanoff")]
    # Differences: ssm - unet = 1 2 3 (mean 2, sd 1); ssm - scanoff = 1 3 5 (mean 3, sd 2); n = 3 each.
    # With 2 degrees of freedom Student's t has a closed form: two-sided p = 1 - t / sqrt(2 + t^2), and the
    # quantile at 1/2 + c/2 is c sqrt(2 / (1 - c^2)). Bonferroni over 2 pairs: c = 1 - 0.05 / 2 = 0.975.
    t_quantile = 0.975 * math.sqrt(2 / (1 - 0.975**2))  # 6.2053
    expected = [
        # t = 2 / (1 / sqrt 3) = sqrt 12 -> p = 1 - sqrt(12 / 14) = 0.07418
        (2.0, 1.0 * t_quantile / math.sqrt(3), 1 - math.sqrt(12 / 14)),
        # t = 3 / (2 / sqrt 3) = sqrt 6.75 -> p = 1 - sqrt(6.75 / 8.75) = 0.12169
        (3.0, 2.0 * t_quantile / math.sqrt(3), 1 - math.sqrt(6.75 / 8.75)),
    ]
    for row, (mean, half_width, p_value) in zip(rows, expected):
        assert row["n"] == 3
        assert row["mean_difference"] == pytest.approx(mean, rel=1e-12)
        assert row["ci95"] == pytest.approx([mean - half_width, mean + half_width], rel=1e-9)
        assert row["ttest_p"] == pytest.approx(p_value, rel=1e-9)
    # Holm: the smaller p (0.07418) times 2 = 0.14836; the larger times 1 = 0.12169, raised to 0.14836 so
    # the adjusted p-values keep the raw ones' order.
    holm = 2 * (1 - math.sqrt(12 / 14))
    assert [row["holm_p"] for row in rows] == pytest.approx([holm, holm], rel=1e-9)


def test_the_claim_needs_every_comparison_won_with_its_interval_and_holm(study):
    won = {"ci95": [0.2, 1.0], "holm_p": 0.01}
    assert study.claim_met([won, won], "psnr")
    assert not study.claim_met([won, {"ci95": [-0.1, 1.0], "holm_p": 0.01}], "psnr")  # interval spans 0
    assert not study.claim_met([won, {"ci95": [0.1, 1.0], "holm_p": 0.06}], "psnr")  # Holm p too large
    assert not study.claim_met([won, {"ci95": [-1.0, -0.2], "holm_p": 0.01}], "psnr")  # the SSM is worse
    # for MAE lower is better
    assert study.claim_met([{"ci95": [-0.02, -0.01], "holm_p": 0.001}], "mae")
    assert not study.claim_met([won], "mae")
    assert not study.claim_met([], "psnr")


def test_tables_go_between_the_markers_and_nothing_else_moves(study, tmp_path):
    results = tmp_path / "results.md"
    results.write_text("# declared\n<!-- study:tables -->\nold\n<!-- study:end -->\n## reading\n")
    study.insert_tables(results, "| new |\n")
    assert results.read_text() == (
        "# declared\n<!-- study:tables -->\n\n| new |\n\n<!-- study:end -->\n## reading\n"
    )
    results.write_text("no markers\n")
    with pytest.raises(SystemExit, match="needs the markers"):
        study.insert_tables(results, "x")


def test_one_run_trains_to_its_budget_then_is_scored_and_skipped_when_done(study, phantom_shards, tmp_path):
    out = tmp_path / "study"
    out.mkdir()
    (out / "shards64").symlink_to(phantom_shards)
    run = study.Run("l1", "ssm", 0, 64)
    record = study.train_and_evaluate(out, run, budget_seconds=2.0, core=None)
    assert record["steps"] >= 1 and record["train_cpu_seconds"] >= 2
    assert record["best_step"] in [step for step, _ in record["validations"]]
    assert record["validations"][-1][0] == record["steps"], "the budget's last step validates"
    head_medgan = subprocess.run(
        ["git", "rev-parse", "HEAD:medgan"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    assert record["code"]["medgan"] == head_medgan and "dirty" in record["code"]
    summary = json.loads((out / "eval" / run.name / "summary.json").read_text())
    assert summary["tasks"]
    values = study.volume_values(out, run.name)
    assert set(values[("brain", "psnr")]) and all(np.isfinite(list(values[("brain", "psnr")].values())))
    shares = study.scan_shares(out, run.name, 64, batches=1)
    assert shares and all(0 < share < 10 for share in shares.values())
    # done runs are read back, not trained again
    (out / "runs" / run.name / "train.log").unlink()
    assert study.train_and_evaluate(out, run, budget_seconds=2.0, core=None) == record


def _write_run_folder(folder, stopped_by: str) -> None:
    """A checkpoint folder holding only the trainer's record and the best tag (no train.log)."""
    manager = CheckpointManager(folder, keep_last=1, context=DistributedContext(0, 0, 1, 1))
    manager.write_run_record(
        {
            "steps": 455, "epochs": 3.5, "train_cpu_seconds": 360.5, "generator_parameters": 123_456,
            "discriminator_parameters": 7, "best_step": 400, "best_tag": "step_000400",
            "best_val_psnr": 21.123456, "validations": [[200, 20.5], [400, 21.123456], [455, 21.0]],
            "stopped_by": stopped_by,
        }
    )  # fmt: skip
    manager.mark_best("step_000400")


def test_a_run_is_summarised_from_its_record_and_best_tag_without_a_log(study, tmp_path):
    _write_run_folder(tmp_path / "run", "cpu_budget")
    assert study.training_summary(tmp_path / "run") == {
        "steps": 455,
        "train_cpu_seconds": 360,
        "parameters": 123_456,
        "validations": [[200, 20.5], [400, 21.123456], [455, 21.0]],
        "best_step": 400,
        "best_val_psnr": 21.123456,
    }
    _write_run_folder(tmp_path / "finished", "total_steps")
    with pytest.raises(RuntimeError, match="stopped by total_steps, not by its CPU budget"):
        study.training_summary(tmp_path / "finished")


def test_the_per_step_view_takes_the_last_step_every_run_validated(study):
    runs = {arm: [study.Run("l1", arm, seed, 64) for seed in (0, 1)] for arm in ("unet", "ssm")}
    records = {
        "l1_unet_seed0": {"validations": [[200, 20.0], [400, 22.0], [600, 23.0]]},
        "l1_unet_seed1": {"validations": [[200, 21.0], [400, 24.0], [600, 25.0]]},
        "l1_ssm_seed0": {"validations": [[200, 19.0], [400, 21.0], [455, 21.5]]},
        "l1_ssm_seed1": {"validations": [[200, 18.0], [400, 20.0]]},
    }
    lines = study.equal_step_lines(records, runs)
    assert "at step 400" in lines[0]
    assert lines[-1] == "| 23.00 (22.00, 24.00) | 20.50 (21.00, 20.00) |"
    records["l1_ssm_seed1"]["validations"] = [[50, 10.0]]
    assert "No validated step" in study.equal_step_lines(records, runs)[0]
