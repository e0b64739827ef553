"""evaluate: per-volume figures equal a direct 3D computation, paired statistics equal scipy's, outputs."""

from __future__ import annotations

import csv
import io
import json
import tarfile

import numpy as np
import pytest
from conftest import write_checkpoint
from scipy import stats
from skimage.metrics import structural_similarity

from medgan.evaluation import NiftiSubjects, ShardSubjects, Task, evaluate, tasks_to_evaluate
from medgan.inference import load_generator
from medgan.scoring import COPY, paired_statistics, score_volume


def test_paired_statistics_equal_scipy():
    rng = np.random.default_rng(0)
    baseline = rng.normal(25, 2, size=12)
    model = baseline + rng.normal(0.5, 1, size=12)
    model[3] = np.nan  # a subject without a value drops out of both
    result = paired_statistics(model, baseline)
    keep = np.isfinite(model)
    interval = stats.ttest_rel(model[keep], baseline[keep]).confidence_interval(0.95)
    assert result["n"] == 11
    assert result["mean_difference"] == pytest.approx(np.mean(model[keep] - baseline[keep]))
    assert result["ci95"] == pytest.approx([interval.low, interval.high])
    assert result["wilcoxon_p"] == pytest.approx(stats.wilcoxon(model[keep], baseline[keep]).pvalue)
    same = paired_statistics(baseline, baseline)
    assert np.isnan(same["wilcoxon_p"]) and same["mean_difference"] == 0


def test_per_volume_figures_equal_a_direct_3d_computation():
    rng = np.random.default_rng(1)
    target = rng.random((14, 32, 32))
    pred = np.clip(target + rng.normal(0, 0.1, target.shape), 0, 1)
    mask = np.zeros(target.shape, dtype=bool)
    mask[2:12, 5:28, 6:25] = True
    _, volume = score_volume(pred, target, mask)
    error = (pred - target)[mask]
    assert volume["psnr"] == pytest.approx(10 * np.log10(1 / np.mean(error**2)))
    assert volume["mae"] == pytest.approx(np.mean(np.abs(error)))
    _, ssim_map = structural_similarity(
        pred, target, data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, full=True
    )
    assert volume["ssim"] == pytest.approx(ssim_map[mask].mean(), abs=1e-6)


def _shard_volume(shards, split, subject):
    """(images [Z, M, H, W], mask [Z, H, W]) of one subject, read straight from the tar files."""
    slices = {}
    for path in sorted(shards.glob(f"{split}-*.tar")):
        with tarfile.open(path) as archive:
            for member in archive.getmembers():
                key, _, field = member.name.partition(".")
                if key.startswith(subject) and field in ("img.npy", "mask.npy"):
                    data = np.load(io.BytesIO(archive.extractfile(member).read()))
                    slices.setdefault(key, {})[field] = data
    keys = sorted(slices)
    return (
        np.stack([slices[k]["img.npy"] for k in keys]).astype(np.float64),
        np.stack([slices[k]["mask.npy"] for k in keys]).astype(bool),
    )


@pytest.fixture(scope="module")
def shard_evaluation(phantom_shards, tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluation")
    generator = load_generator(write_checkpoint(root / "model", arch="unet"))
    baseline = load_generator(write_checkpoint(root / "unet", arch="unet", seed=1))
    subjects = ShardSubjects(phantom_shards, "test", generator.modalities)
    tasks = tasks_to_evaluate(generator, subjects.available_modalities, target="flair")
    out = root / "eval"
    evaluate(
        generator,
        subjects,
        tasks,
        out,
        baseline=baseline,
        selection_subjects=ShardSubjects(phantom_shards, "val", generator.modalities),
    )
    return out


def test_evaluate_writes_tables_whose_copy_baseline_equals_a_direct_computation(
    shard_evaluation, phantom_shards
):
    summary = json.loads((shard_evaluation / "summary.json").read_text())
    task = summary["tasks"]["t1+t1ce+t2->flair"]
    assert set(task["methods"]) == {"model", COPY, "baseline_checkpoint"}
    assert set(task["methods"]["model"]) == {"brain", "tumour", "non_tumour"}
    assert set(task["paired"]) == {COPY, "baseline_checkpoint"}
    assert task["best_input_copy"]["chosen_on"] == "the validation split"
    with open(shard_evaluation / "per_volume.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    copy_row = next(r for r in rows if r["method"] == COPY and r["region"] == "brain")
    manifest = json.loads((phantom_shards / "manifest.json").read_text())
    order = manifest["modalities"]
    images, mask = _shard_volume(phantom_shards, "test", copy_row["subject"])
    copied = images[:, order.index(task["best_input_copy"]["input"])]
    real = images[:, order.index("flair")]
    error = (copied - real)[mask]
    assert float(copy_row["psnr"]) == pytest.approx(10 * np.log10(1 / np.mean(error**2)), rel=1e-9)
    assert float(copy_row["mae"]) == pytest.approx(np.mean(np.abs(error)), rel=1e-9)
    with open(shard_evaluation / "per_slice.csv", newline="") as stream:
        slice_rows = [r for r in csv.DictReader(stream) if r["method"] == "model" and r["region"] == "brain"]
    assert len(slice_rows) == manifest["splits"]["test"]["samples"]
    assert sorted((shard_evaluation / "views" / "t1+t1ce+t2_to_flair").glob("*.npz"))


def test_evaluate_a_folder_of_nifti_subjects(phantom_subjects, tmp_path):
    folder = tmp_path / "subjects"
    (folder / "BraTS2021_00004").mkdir(parents=True)
    for path in (phantom_subjects / "BraTS2021_00004").iterdir():
        (folder / "BraTS2021_00004" / path.name).symlink_to(path)
    generator = load_generator(write_checkpoint(tmp_path / "model", arch="unet"))
    subjects = NiftiSubjects(folder, generator)
    summary = evaluate(generator, subjects, [Task(("t1", "t2"), "flair")], tmp_path / "eval")
    assert "whole brain" in summary["scope"]
    assert summary["tasks"]["t1+t2->flair"]["best_input_copy"]["chosen_on"] == "the evaluated subjects"
    assert summary["tasks"]["t1+t2->flair"]["subjects"] == 1
