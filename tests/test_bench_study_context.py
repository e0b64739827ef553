"""bench/study_context.py, the second study: its arms are the declared ones and differ only where declared,
its comparisons carry each seed's own difference into the claim rule, and one run goes from the phantom and
its noise-free references through training to the three scores and the floor."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO

from medgan.config import config_from_cli


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("bench_study_context", REPO / "bench" / "study_context.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_the_arms_share_trunk_batch_and_recipe_and_differ_only_where_declared(study):
    configs = {}
    for recipe in ("l1", "gan"):
        for arm in study.ARMS:
            run = study.Run(recipe, arm, 1)
            flags = study.run_flags(run, Path("shards"), Path("runs") / run.name, 360.0)
            configs[recipe, arm] = config_from_cli(flags)
    for (recipe, arm), config in configs.items():
        generator, data, training = config.model.generator, config.data, config.training
        assert (data.batch_size, data.shuffle_buffer, data.num_workers) == (8, 512, 0)
        assert generator.unet_base_channels == 16 and generator.depth == 3
        assert (training.cpu_budget_seconds, training.seed, training.lr_schedule) == (360.0, 1, "constant")
        assert training.adversarial_weight == (1.0 if recipe == "gan" else 0.0)
        assert (data.input_modalities, data.target_modality) == (["t1", "t1ce", "t2"], "flair")
        assert generator.arch == ("hybrid" if arm.startswith("hybrid") else "unet")
        assert generator.context_slices == (2 if arm == "unet25d" else 0)
        assert data.slab_slices == (8 if arm == "hybridslab" else 1)
        if generator.arch == "hybrid":
            assert generator.ssm_levels == [], "the branch beside the bottleneck alone (measured at width 16)"


def test_demo_config_generator_is_the_arm_the_declared_rule_chose(study):
    """The study chose the 2D U-Net for configs/demo.yaml (docs/results.md): its generator is that arm's,
    setting for setting, so the demo trains what the study measured."""
    run = study.Run("l1", "unet2d", 0)
    measured = config_from_cli(study.run_flags(run, Path("shards"), Path("runs"), 360.0)).model.generator
    assert config_from_cli(["--config", study.CONFIG]).model.generator == measured


def _arms(shift_seed: float = 0.0) -> dict[str, list[dict]]:
    """Three seeds, four subjects: the slab hybrid 1 dB above every arm in every seed, except that seed 2's
    advantage over the 2D hybrid is ``1 - shift_seed``."""
    endpoint = ("tumour", "psnr")
    base = {"s1": 20.0, "s2": 22.0, "s3": 21.0, "s4": 23.0}
    noise = [{"s1": 0.1, "s2": -0.1, "s3": 0.05, "s4": 0.0}, {"s1": -0.05, "s2": 0.1, "s3": 0.0, "s4": 0.05},
             {"s1": 0.0, "s2": 0.05, "s3": -0.1, "s4": 0.1}]  # fmt: skip
    arms = {
        arm: [{endpoint: {s: base[s] + noise[seed][s] for s in base}} for seed in range(3)]
        for arm in ("unet2d", "unet25d", "hybrid2d")
    }
    arms["hybridslab"] = [
        {endpoint: {s: base[s] + 1.0 + noise[seed][s] * 0.5 for s in base}} for seed in range(3)
    ]
    arms["hybrid2d"][2] = {endpoint: {s: v + shift_seed for s, v in arms["hybrid2d"][2][endpoint].items()}}
    return arms


def test_each_seed_must_agree_for_a_claim(study):
    rows = study.comparison_rows(_arms(), study.PAIRS, study.PRIMARY)
    assert [row["pair"] for row in rows] == study.PAIRS
    for row in rows:
        assert row["n"] == 4 and row["mean_difference"] == pytest.approx(1.0, abs=0.05)
        assert len(row["per_seed"]) == 3 and all(d > 0.9 for d in row["per_seed"])
    assert study.claims(rows) == (True, True)
    # seed 2's 2D hybrid now beats the slab hybrid: the pooled interval may still exclude 0, the claim
    # about the scan may not
    rows = study.comparison_rows(_arms(shift_seed=1.5), study.PAIRS, study.PRIMARY)
    assert rows[2]["per_seed"][2] < 0 < min(rows[2]["per_seed"][:2])
    assert study.claims(rows) == (True, False)
    # a lower-is-better endpoint is won by a negative difference
    assert study.won(
        {"ci95": [-0.02, -0.01], "holm_p": 0.01, "per_seed": [-0.01, -0.02]}, "through_plane_error"
    )
    assert not study.won({"ci95": [-0.02, -0.01], "holm_p": 0.01, "per_seed": [-0.01, 0.001]}, "mae")
    assert not study.won({"ci95": [0.1, 0.2], "holm_p": 0.2, "per_seed": [0.1, 0.2]}, "psnr")
    assert not math.isnan(rows[0]["holm_p"])


@pytest.mark.slow
def test_one_run_goes_from_the_phantom_to_its_three_scores_and_the_floor(study, tmp_path):
    out = tmp_path / "study"
    study.make_data(out, subjects=6, shape=(64, 64, 24))
    for kind in ("noise_free", "expected"):
        assert (out / f"shards_{kind}" / "manifest.json").is_file()
    test_subjects = sorted(p.name for p in (out / "test_subjects").iterdir())
    assert test_subjects == sorted(json_subjects(out / "shards", "test"))
    run = study.Run("l1", "hybridslab", 0)
    record = study.train_and_evaluate(out, run, budget_seconds=2.0, core=None)
    assert record["steps"] >= 1 and record["best_step"] in [step for step, _ in record["validations"]]
    values = {**study.volume_values(out, run.name), **study.extra_values(out, run.name)}
    assert set(values[("brain", "through_plane_error")]) == set(test_subjects)
    assert set(values[("segmenter WT", "dice_drop")]) <= set(test_subjects)
    assert values[("brasyn non_tumour", "ssim")]
    study.floor_scores(out)
    floor = study.volume_values(out, "floor", "noise_free")
    expected = study.volume_values(out, "floor", "expected")
    model = study.volume_values(out, run.name)
    for subject in test_subjects:
        # the noise-free FLAIR is far nearer the real one than a model trained for 2 s
        assert floor[("brain", "psnr")][subject] > model[("brain", "psnr")][subject] + 3
        assert np.isfinite(expected[("brain", "psnr")][subject])


def json_subjects(shards: Path, split: str) -> list[str]:
    import json

    return json.loads((shards / "manifest.json").read_text())["splits"][split]["subjects"]


def test_the_command_runs_each_part_with_its_budget_through_the_shared_scheduler(
    study, tmp_path, monkeypatch
):
    out = tmp_path / "study"
    out.mkdir()
    (out / "data.json").write_text("{}")  # the data part is done
    calls = []
    monkeypatch.setattr(study.study, "run_all", lambda *a: calls.append(a))
    monkeypatch.setattr(study, "gan_arms", lambda _out, seeds: ["unet2d", "hybridslab"])
    parts = ["--parts", "calibration", "l1", "gan"]
    study.main(["--out", str(out), "--budget-minutes", "9", "--seeds", "0", "1", *parts])
    (calibration, *_), (l1, *_), (gan, *_) = ((a[1], a[2], a[4]) for a in calls)
    assert [c[1:] for c in ((a[1], a[2], a[4]) for a in calls)] == [
        (study.CALIBRATION_MINUTES * 60, study.train_and_evaluate),
        (540.0, study.train_and_evaluate),
        (540.0, study.train_and_evaluate),
    ]
    assert [r.name for r in calibration] == ["calibration_unet2d_seed100"]
    assert len(l1) == 8 and {r.arm for r in l1} == set(study.ARMS) and {r.seed for r in l1} == {0, 1}
    assert sorted(r.name for r in gan) == ["gan_hybridslab_seed0", "gan_hybridslab_seed1", "gan_unet2d_seed0",
                                           "gan_unet2d_seed1"]  # fmt: skip
    with pytest.raises(SystemExit):
        study.main(["--out", str(out), "--parts", "l1"])  # no budget


def _fake_study(study, out: Path, advantage: float) -> None:
    """Scored runs without training: every L1 run's per-volume values are a subject's base value, the slab
    hybrid's raised by ``advantage`` dB of tumour PSNR in every seed; the data, floor and load records a
    finished study leaves."""
    import csv
    import json

    rng = np.random.default_rng(0)
    subjects = [f"s{i:02d}" for i in range(8)]
    (out / "shards").mkdir(parents=True)
    splits = {"train": {"samples": 100, "subjects": ["a"]}, "val": {"samples": 10, "subjects": ["b"]},
              "test": {"samples": 80, "subjects": subjects}}  # fmt: skip
    (out / "shards" / "manifest.json").write_text(json.dumps({"splits": splits}))
    (out / "data.json").write_text(json.dumps({"subjects": 10, "shape": [64, 64, 24]}))
    (out / "load.csv").write_text("1,1.0\n2,2.0\n")
    fields = ["method", "task", "subject", "region", *study.DIGITS, "voxels", "slices"]

    def write_volumes(folder: Path, shifts: dict[str, float]) -> None:
        """per_volume.csv with a row per method (its tumour PSNR raised by ``shifts[method]``), subject and
        region; every other subject has a tumour."""
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "per_volume.csv", "w", newline="") as stream:
            writer = csv.DictWriter(stream, fieldnames=fields)
            writer.writeheader()
            for method, shift in shifts.items():
                for index, subject in enumerate(subjects):
                    for region in ("brain", "tumour") if index % 2 == 0 else ("brain",):
                        values = {m: 0.5 + 0.01 * index for m in study.DIGITS}
                        values["psnr"] = (
                            20 + index + rng.normal(0, 0.01) + (shift if region == "tumour" else 0)
                        )
                        writer.writerow({"method": method, "task": "t", "subject": subject, "region": region,
                                         **values, "voxels": 10, "slices": 24})  # fmt: skip

    write_volumes(out / "eval" / "floor", {"noise_free": 10.0, "expected": 10.01})
    record = {"steps": 1000, "train_cpu_seconds": 540, "parameters": 1, "best_step": 1000,
              "validations": [[200, 20.0], [1000, 25.0]], "budget_seconds": 540, "process_wall_seconds": 600,
              "code": None}  # fmt: skip
    runs = [study.Run("l1", arm, seed) for arm in study.ARMS for seed in (0, 1, 2)]
    runs.append(study.Run("calibration", "unet2d", study.CALIBRATION_SEED))
    for run in runs:
        (out / "runs" / run.name).mkdir(parents=True)
        # the U-Nets take fewer CPU seconds a step than the hybrids
        steps = {"unet2d": 1200, "unet25d": 1100, "hybrid2d": 1000, "hybridslab": 900}[run.arm]
        train = {**record, "name": run.name, "command": "c", "steps": steps}
        (out / "runs" / run.name / "train.json").write_text(json.dumps(train))
        if run.recipe == "calibration":
            continue
        for name in study.evaluations(out, run):
            (out / "eval" / name).mkdir(parents=True, exist_ok=True)
            (out / "eval" / name / "summary.json").write_text("{}")
        model = advantage if run.arm == "hybridslab" else 0.0
        write_volumes(out / "eval" / run.name, {"model": model, "best_input_copy": -5.0})
        (out / "eval" / f"{run.name}_brasyn" / "brasyn.csv").write_text(
            "method,subject,ssim_tumour,ssim_non_tumour\n" + "".join(f"model,{s},0.9,0.8\n" for s in subjects)
        )
        (out / "eval" / f"{run.name}_segmenter" / "segmentation.csv").write_text(
            "subject,region,dice_drop\n" + "".join(f"{s},WT,{rng.uniform(0, 0.3)}\n" for s in subjects)
        )


@pytest.mark.parametrize("advantage", [1.0, 0.0])
def test_the_report_reads_the_runs_applies_the_claim_rule_and_says_what_has_not_run(
    study, tmp_path, advantage
):
    import argparse

    out = tmp_path / "study"
    _fake_study(study, out, advantage)
    results = tmp_path / "docs" / "results.md"
    results.parent.mkdir()
    results.write_text("# declared\n<!-- study-context:tables -->\n<!-- study-context:end -->\n## reading\n")
    args = argparse.Namespace(out=out, seeds=[0, 1, 2], results=results, budget_minutes=9.0, subjects=10)
    tables = study.write_report(args, "python bench/study_context.py --parts report")
    claim = "yes" if advantage else "no"
    assert f"every seed the same way): **{claim}**" in tables
    assert "| slab hybrid | " in tables and "| floor: noise-free FLAIR | " in tables
    assert (
        "Not run yet (2D U-Net, slab hybrid" in tables if advantage else "Not run yet (2D U-Net, " in tables
    )
    assert (results.parent / "images" / "study_context_validation.png").is_file()
    assert "| 1000 | " in tables, "the calibration run's curve"
    # the defaults: the best arm, unless a cheaper one ties with it
    chosen = "slab hybrid" if advantage else "2D U-Net"
    assert f"So configs/demo.yaml's generator follows the **{chosen}**." in tables
