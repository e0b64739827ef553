"""evaluate: per-volume figures equal a direct 3D computation, paired statistics equal scipy's, outputs."""

from __future__ import annotations

import csv
import io
import json
import re
import sys
import tarfile

import nibabel as nib
import numpy as np
import pytest
from conftest import REPO, write_checkpoint, write_format_1_shards
from scipy import stats
from skimage.metrics import structural_similarity

from medgan.evaluation.default_protocol import evaluate
from medgan.evaluation.subjects import NiftiSubjects, ShardSubjects
from medgan.evaluation.tasks import Task, tasks_to_evaluate
from medgan.inference.loading import LoadedGenerator, load_generator
from medgan.scoring import COPY, holm_adjusted, paired_statistics, volume_scores


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
    assert result["ttest_p"] == pytest.approx(stats.ttest_rel(model[keep], baseline[keep]).pvalue)
    wider = paired_statistics(model, baseline, confidence=0.975)
    assert wider["ci95"] == pytest.approx(
        list(stats.ttest_rel(model[keep], baseline[keep]).confidence_interval(0.975))
    )
    same = paired_statistics(baseline, baseline)
    assert np.isnan(same["wilcoxon_p"]) and same["mean_difference"] == 0


def test_holm_adjusts_step_down_in_the_given_order():
    # sorted 0.01, 0.02, 0.04, 0.30 (m = 4): x4, x3, x2, x1 = 0.04, 0.06, 0.08, 0.30, already monotone
    assert holm_adjusted([0.04, 0.01, 0.30, 0.02]) == pytest.approx([0.08, 0.04, 0.30, 0.06])
    # a later step smaller than an earlier one is raised to it (monotone), and nothing exceeds 1
    assert holm_adjusted([0.03, 0.031]) == pytest.approx([0.06, 0.06])
    assert holm_adjusted([0.6, 0.7]) == pytest.approx([1.0, 1.0])
    assert holm_adjusted([]) == []
    with pytest.raises(ValueError, match="needs every p-value"):
        holm_adjusted([0.01, float("nan")])


def test_per_volume_figures_equal_a_direct_3d_computation():
    rng = np.random.default_rng(1)
    target = rng.random((14, 32, 32))
    pred = np.clip(target + rng.normal(0, 0.1, target.shape), 0, 1)
    mask = np.zeros(target.shape, dtype=bool)
    mask[2:12, 5:28, 6:25] = True
    volume = volume_scores(pred, target, mask)
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


def _subject_folder(phantom_subjects, folder, subjects):
    for subject in subjects:
        (folder / subject).mkdir(parents=True)
        for path in (phantom_subjects / subject).iterdir():
            (folder / subject / path.name).symlink_to(path)
    return folder


@pytest.mark.slow
def test_segmenter_scores_real_and_synthesized_from_the_command_line(phantom_subjects, tmp_path):
    from medgan.__main__ import main

    folder = _subject_folder(phantom_subjects, tmp_path / "subjects", ("BraTS2021_00001", "BraTS2021_00003"))
    checkpoint = write_checkpoint(tmp_path / "model", arch="unet")
    segmenter = f"{sys.executable} {REPO / 'tests' / 'segmenter_threshold.py'} {{input}} {{output}}"
    out = tmp_path / "eval"
    argv = [
        "evaluate", "--checkpoint", str(checkpoint), "--subjects", str(folder), "--out", str(out),
        "--target_modality", "flair", "--segmenter", segmenter, "--report", str(tmp_path / "r.html"),
    ]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    segmentation = summary["segmentation"]
    assert segmentation["subjects"] == 2 and segmentation["task"] == "t1+t1ce+t2->flair"
    assert segmentation["label_convention"] == "brats2023" and segmentation["labels_inferred"]
    with open(out / "segmentation.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert sorted((r["subject"], r["region"]) for r in rows) == sorted(
        (s, r) for s in ("BraTS2021_00001", "BraTS2021_00003") for r in ("WT", "TC", "ET")
    )
    # the untrained generator's FLAIR misleads the FLAIR-driven whole-tumour segmentation; T1c is untouched
    wt = segmentation["regions"]["WT"]
    assert wt["dice_drop"]["mean"] > 0
    assert all(float(r["dice_drop"]) == 0 for r in rows if r["region"] == "ET")
    page = (tmp_path / "r.html").read_text()
    assert "Downstream segmentation: t1+t1ce+t2-&gt;flair" in page and "alt='segmentation scores'" in page


def test_segmenter_errors_are_one_line(phantom_subjects, phantom_shards, tmp_path, capsys):
    from medgan.__main__ import main

    checkpoint = str(write_checkpoint(tmp_path / "model", arch="unet"))
    common = [
        "evaluate",
        "--checkpoint",
        checkpoint,
        "--out",
        str(tmp_path / "e"),
        "--target_modality",
        "flair",
    ]
    assert main([*common, "--data_path", str(phantom_shards), "--segmenter", "seg {input} {output}"]) == 2
    assert "--segmenter needs --subjects DIR" in capsys.readouterr().err
    failing = f"{sys.executable} -c 'import sys; sys.exit(3)' {{input}} {{output}}"
    folder = _subject_folder(phantom_subjects, tmp_path / "one", ("BraTS2021_00001",))
    assert main([*common, "--subjects", str(folder), "--segmenter", failing]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "exited with status 3" in error and "sys.exit(3)" in error, error


@pytest.mark.slow
def test_brasyn_protocol_from_a_checkpoint_and_from_predictions(phantom_subjects, tmp_path, capsys):
    from medgan.__main__ import main
    from medgan.evaluation.brasyn_scores import score_brasyn_folder

    folder = _subject_folder(phantom_subjects, tmp_path / "subjects", ("BraTS2021_00001", "BraTS2021_00002"))
    checkpoint = str(write_checkpoint(tmp_path / "model", arch="unet"))
    common = ["evaluate", "--protocol", "brasyn", "--subjects", str(folder), "--target_modality", "flair"]
    out = tmp_path / "from_checkpoint"
    assert (
        main([*common, "--checkpoint", checkpoint, "--out", str(out), "--report", str(tmp_path / "r.html")])
        == 0
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["protocol"] == "brasyn" and summary["subjects_evaluated"] == 2
    assert summary["brasyn"]["provenance"]["upstream_commit"] == "890804083b446f3d6fa0b17a4ef09b174bcd0209"
    assert set(summary["brasyn"]["methods"]) == {"model", COPY} and set(summary["brasyn"]["paired"]) == {COPY}
    with open(out / "brasyn.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    model_rows = {r["subject"]: r for r in rows if r["method"] == "model"}
    predictions = sorted((out / "predictions").glob("*_flair.nii.gz"))
    assert len(predictions) == 2 == len(model_rows)
    # the model's rows are BraSyn's score of the files it wrote, against the real FLAIR and seg
    references = {s: (folder / s / f"{s}_flair.nii.gz", folder / s / f"{s}_seg.nii.gz") for s in model_rows}
    direct = score_brasyn_folder({p.name.removesuffix("_flair.nii.gz"): p for p in predictions}, references)
    for row in direct:
        assert float(model_rows[row["subject"]]["ssim_non_tumour"]) == pytest.approx(row["ssim_non_tumour"])
    assert "BraSyn protocol: flair" in (tmp_path / "r.html").read_text()

    # someone else's volumes: the same numbers without a checkpoint
    again = tmp_path / "from_predictions"
    assert main([*common, "--predictions", str(out / "predictions"), "--out", str(again)]) == 0
    with open(again / "brasyn.csv", newline="") as stream:
        rerun = {r["subject"]: r for r in csv.DictReader(stream) if r["method"] == "model"}
    assert {s: r["ssim_tumour"] for s, r in rerun.items()} == {
        s: r["ssim_tumour"] for s, r in model_rows.items()
    }
    capsys.readouterr()

    shards = ["evaluate", "--protocol", "brasyn", "--data_path", str(tmp_path), "--checkpoint", checkpoint]
    assert main([*shards, "--out", str(again)]) == 2
    assert "--protocol brasyn needs --subjects DIR" in capsys.readouterr().err
    assert main(["evaluate", "--checkpoint", checkpoint, "--subjects", str(folder), "--predictions", str(out),
                 "--out", str(again)]) == 2  # fmt: skip
    assert "--predictions goes with --protocol brasyn" in capsys.readouterr().err


def test_spread_is_set_against_the_error(phantom_shards, tmp_path):
    from medgan.evaluation.report import write_report
    from medgan.inference.spread import spread_variants

    generator = load_generator(write_checkpoint(tmp_path / "model", arch="unet"))
    subjects = ShardSubjects(phantom_shards, "test", generator.modalities)
    task = Task(("t1", "t2"), "flair")
    variants = spread_variants(generator, "flip")
    summary = evaluate(generator, subjects, [task], tmp_path / "eval", spread=("flip", variants))
    spread = summary["tasks"][task.name]["spread"]
    assert spread["kind"] == "flip" and len(spread["error_by_decile"]) == 10
    with open(tmp_path / "eval" / "spread.csv", newline="") as stream:
        (row,) = list(csv.DictReader(stream))
    # by hand: the prediction and its left-right mirror; two variants' SD is half their difference
    subject = next(iter(subjects))
    order = generator.modalities
    plain = generator.predict(subject.images, ["t1", "t2"], "flair")
    mirrored = generator.predict(subject.images[..., ::-1, :].copy(), ["t1", "t2"], "flair")[..., ::-1, :]
    error = np.abs(plain * subject.mask - subject.images[:, order.index("flair")])
    rho = stats.spearmanr(np.abs(plain - mirrored)[subject.mask] / 2, error[subject.mask]).statistic
    assert float(row["spearman"]) == pytest.approx(rho, abs=1e-6)
    assert spread["spearman"]["median"] == pytest.approx(rho, abs=1e-6)
    assert sum(d["voxels"] for d in spread["error_by_decile"]) == int(subject.mask.sum())
    page = write_report(tmp_path / "eval", tmp_path / "r.html").read_text()
    assert "Test-time spread (flip; a spread, not a calibrated uncertainty)" in page
    assert "alt='error per spread decile'" in page


def _one_line_error(capsys, argv: list[str]) -> str:
    from medgan.__main__ import main

    assert main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "Traceback" not in error, error
    return error


def test_evaluate_refuses_shards_or_a_checkpoint_of_another_normalisation(capsys, tmp_path, phantom_shards):
    """A checkpoint and shards scaled differently must not be scored against each other: one line each."""
    current = str(write_checkpoint(tmp_path / "current", arch="unet"))
    old_shards = write_format_1_shards(phantom_shards, tmp_path / "old_shards")
    out = str(tmp_path / "eval")
    error = _one_line_error(
        capsys, ["evaluate", "--checkpoint", current, "--data_path", str(old_shards), "--out", out]
    )
    assert error.startswith(
        f"medgan evaluate: error: {old_shards}: shard format 1 (percentile normalisation), but this "
        "version reads shard format 2 (healthy-median normalisation): re-shard with python -m data_prep "
        "shard --format brats"
    )
    old = write_checkpoint(tmp_path / "old", arch="unet", training_data=None)
    error = _one_line_error(
        capsys, ["evaluate", "--checkpoint", str(old), "--data_path", str(phantom_shards), "--out", out]
    )
    assert error.startswith(
        f"medgan evaluate: error: {old}: trained on unrecorded shards (older than format 2)"
    )
    assert error.endswith(
        "retrain on shards made by python -m data_prep shard, or use the medgan version it was trained with"
    )
    assert not (tmp_path / "eval" / "summary.json").exists()


def _with_another_real_target(phantom_subjects, folder, subject, target="flair"):
    """``folder/subject``: the subject's files, its real ``target`` replaced by other voxels (rescaled,
    noisy, and bright where the inputs have no brain, as a target with another extent would be)."""
    _subject_folder(phantom_subjects, folder, (subject,))
    path = folder / subject / f"{subject}_{target}.nii.gz"
    real = nib.load(path)
    data = np.asarray(real.dataobj, dtype=np.float32)
    other = data * 2.5 + np.random.default_rng(0).uniform(0, 30, data.shape).astype(np.float32) * (data > 0)
    other[:, :, 0] = other[:, :, -1] = 400.0
    path.unlink()
    nib.save(nib.Nifti1Image(other, real.affine), path)
    return folder


def _views(evaluation, task, subject):
    with np.load(evaluation / "views" / task / f"{subject}.npz") as views:
        return {key: views[key] for key in views.files}


def test_the_real_target_changes_the_scores_and_nothing_synthesis_gives(phantom_subjects, tmp_path):
    """evaluate --subjects: each task is prepared from its inputs alone (own mask, crop, scales); the
    real target is read only to score, so replacing its voxels moves the scores and nothing else."""
    subject = "BraTS2021_00004"
    same = _subject_folder(phantom_subjects, tmp_path / "same", (subject,))
    other = _with_another_real_target(phantom_subjects, tmp_path / "other", subject)
    generator = load_generator(write_checkpoint(tmp_path / "model", arch="unet"))
    tasks = [Task(("t1",), "flair"), Task(("t1", "t2"), "flair")]
    for folder in (same, other):
        evaluate(generator, NiftiSubjects(folder, generator), tasks, tmp_path / f"eval_{folder.name}")
    for task in ("t1_to_flair", "t1+t2_to_flair"):
        before = _views(tmp_path / "eval_same", task, subject)
        after = _views(tmp_path / "eval_other", task, subject)
        for key in before:
            if "real" not in key:
                np.testing.assert_array_equal(before[key], after[key], err_msg=f"{task} {key}")
        assert not np.array_equal(before["axial_real"], after["axial_real"])
    rows = {}
    for folder in ("same", "other"):
        with open(tmp_path / f"eval_{folder}" / "per_volume.csv", newline="") as stream:
            rows[folder] = {
                (r["task"], r["method"]): float(r["psnr"])
                for r in csv.DictReader(stream)
                if r["region"] == "brain"
            }
    assert rows["same"].keys() == rows["other"].keys()
    assert all(rows["same"][key] != rows["other"][key] for key in rows["same"])
    # each input subset has its own mask: the mask of t1 alone, not the union with t2 or the target
    t1_alone = next(iter(NiftiSubjects(same, generator))).for_task(tasks[0])
    t1_file = np.asarray(nib.load(same / subject / f"{subject}_t1.nii.gz").dataobj)
    assert t1_alone.mask.sum() == np.count_nonzero(t1_file)


def test_the_segmenter_is_given_what_synthesis_makes_from_the_inputs_alone(
    phantom_subjects, tmp_path, monkeypatch
):
    """evaluate --segmenter: the synthesized contrast the segmenter reads is the model's [0, 1] output,
    the same whatever the real target holds."""
    import medgan.evaluation.downstream as downstream

    given = {}

    class Handed(Exception):
        pass

    def capture(command, subjects, target, synthesized, references, labels, out):
        given[out.parent.name] = {s: np.asarray(image.dataobj) for s, image in synthesized.items()}
        raise Handed

    monkeypatch.setattr(downstream, "score_with_segmenter", capture)
    subject = "BraTS2021_00001"
    generator = load_generator(write_checkpoint(tmp_path / "model", arch="unet"))
    task = Task(("t1", "t1ce", "t2"), "flair")
    for name, folder in (
        ("same", _subject_folder(phantom_subjects, tmp_path / "same", (subject,))),
        ("other", _with_another_real_target(phantom_subjects, tmp_path / "other", subject)),
    ):
        subjects = NiftiSubjects(folder, generator)
        segmentation = downstream.DownstreamSegmentation(
            subjects, task, "seg {input} {output}", None, tmp_path / name
        )
        with pytest.raises(Handed):
            evaluate(generator, subjects, [task], tmp_path / name, segmentation=segmentation)
    np.testing.assert_array_equal(given["same"][subject], given["other"][subject])
    assert given["same"][subject].min() >= 0.0 and given["same"][subject].max() <= 1.0


def test_evaluate_with_a_segmenter_predicts_each_subject_once(phantom_subjects, tmp_path, monkeypatch):
    """evaluate --segmenter hands the segmenter the volume it scored: one prediction per subject, and
    the segmenter reads exactly what ``synthesize`` makes of the subject's inputs."""
    from medgan.__main__ import main
    from medgan.inference.synthesis import synthesize_volume

    subject = "BraTS2021_00001"
    folder = _subject_folder(phantom_subjects, tmp_path / "subjects", (subject,))
    checkpoint = write_checkpoint(tmp_path / "model", arch="unet")
    predicted = []
    predict = LoadedGenerator.predict

    def counted(generator, images, *args, **kwargs):
        predicted.append(images.shape[0])
        return predict(generator, images, *args, **kwargs)

    monkeypatch.setattr(LoadedGenerator, "predict", counted)
    segmenter = f"{sys.executable} {REPO / 'tests' / 'segmenter_threshold.py'} {{input}} {{output}}"
    out = tmp_path / "eval"
    argv = [
        "evaluate", "--checkpoint", str(checkpoint), "--subjects", str(folder), "--out", str(out),
        "--target_modality", "flair", "--segmenter", segmenter,
    ]  # fmt: skip
    assert main(argv) == 0
    assert len(predicted) == 1, predicted
    monkeypatch.undo()
    inputs = {m: folder / subject / f"{subject}_{m}.nii.gz" for m in ("t1", "t1ce", "t2")}
    expected = synthesize_volume(load_generator(checkpoint), inputs, "flair").image
    given = nib.load(out / "segmentation" / "synthesized" / "input" / subject / f"{subject}-t2f.nii.gz")
    np.testing.assert_array_equal(np.asarray(given.dataobj), np.asarray(expected.dataobj))
    np.testing.assert_array_equal(given.affine, expected.affine)
    assert json.loads((out / "summary.json").read_text())["segmentation"]["subjects"] == 1


def test_the_baseline_gets_its_own_channel_order():
    """A baseline checkpoint with other contrasts, in another order: each channel by name, the contrast
    it knows but the data lacks zero, the one it does not know left out."""
    from types import SimpleNamespace

    from medgan.evaluation.subject_scores import in_generator_channels

    images = np.random.default_rng(0).random((3, 4, 8, 8), dtype=np.float32)
    baseline = SimpleNamespace(modalities=["flair", "t1", "pd"], source="baseline")
    mapped = in_generator_channels(baseline, images, ["t1", "t1ce", "t2", "flair"])
    assert mapped.shape == (3, 3, 8, 8) and mapped.dtype == np.float32
    np.testing.assert_array_equal(mapped[:, 0], images[:, 3])
    np.testing.assert_array_equal(mapped[:, 1], images[:, 0])
    assert not mapped[:, 2].any()


def test_evaluate_reports_the_through_plane_metrics(capsys, tmp_path, phantom_shards):
    from medgan.__main__ import main

    checkpoint = str(write_checkpoint(tmp_path / "model", arch="unet"))
    out = tmp_path / "eval"
    argv = ["evaluate", "--checkpoint", checkpoint, "--data_path", str(phantom_shards), "--out", str(out)]
    assert main([*argv, "--target_modality", "flair"]) == 0
    headline = capsys.readouterr().out.splitlines()[0]
    assert re.search(r"MAE [0-9.]+, through-plane error [0-9.]+ \(copied", headline), headline
    with open(out / "per_volume.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert {"through_plane_error", "ssim_sagittal", "ssim_coronal"} <= set(rows[0])
    assert all(float(row["through_plane_error"]) >= 0 for row in rows if row["region"] == "brain")


@pytest.mark.parametrize("with_validation_split", [True, False])
def test_only_the_chosen_copy_is_scored_once_the_validation_split_chose_it(
    phantom_shards, tmp_path, monkeypatch, with_validation_split
):
    from medgan.evaluation.subject_scores import Scores

    scored, add = [], Scores.add
    monkeypatch.setattr(
        Scores, "add", lambda self, method, *rest: scored.append(method) or add(self, method, *rest)
    )
    generator = load_generator(write_checkpoint(tmp_path / "model", arch="unet"))
    subjects = ShardSubjects(phantom_shards, "test", generator.modalities)
    tasks = tasks_to_evaluate(generator, subjects.available_modalities, target="flair")
    selection = ShardSubjects(phantom_shards, "val", generator.modalities) if with_validation_split else None
    summary = evaluate(generator, subjects, tasks, tmp_path / "eval", selection_subjects=selection)
    chosen = summary["tasks"]["t1+t1ce+t2->flair"]["best_input_copy"]["input"]
    copies = {method for method in scored if method.startswith(COPY)}
    # without a validation split every copy is scored to choose from; with one, the choice comes first
    assert copies == (
        {f"{COPY}:{chosen}"} if with_validation_split else {f"{COPY}:{m}" for m in tasks[0].inputs}
    )
