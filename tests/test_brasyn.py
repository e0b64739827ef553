"""brasyn_scores against the BraSyn challenge's own computation, transcribed here with torchmetrics.

The reference below (`challenge_scores`) follows the organisers' ``ssim.py``
(https://github.com/hongweilibran/BraSyn, commit 890804083b446f3d6fa0b17a4ef09b174bcd0209) operation for
operation: it reads the NIfTI files with SimpleITK, normalises torch tensors with ``np.percentile`` /
``np.clip`` by each volume's own 0.5 / 99.5 percentiles, zeroes the other region and calls one shared
``StructuralSimilarityIndexMeasure()``; PSNR/MSE are the region means of those same normalised volumes
(not ``evaluation_utils.py``'s reference-scaled ones: docs/evaluation.md says why). It shares no code
with brasyn_scores (which reads with data_prep's nibabel loader and normalises in numpy), so the test
checks the challenge's definition, not our reading of it. Fixtures: tests/fixtures/brasyn (written by
make_fixtures.py there).
"""

import functools
import importlib.util
import math
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from torchmetrics import MeanSquaredError
from torchmetrics.functional.image import structural_similarity_index_measure
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from data_prep.errors import UserError
from medgan.evaluation import brasyn_scores as brasyn

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "brasyn"
_spec = importlib.util.spec_from_file_location("make_brasyn_fixtures", FIXTURES / "make_fixtures.py")
make_fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_fixtures)
SUBJECTS = ("subject-a", "subject-b")

# The challenge's metric object: one instance for every call, as in the upstream script.
challenge_ssim = StructuralSimilarityIndexMeasure()


def read_like_challenge(path) -> torch.Tensor:
    """sitk.ReadImage -> GetArrayFromImage ([k, j, i], stored dtype) -> tensor [1, 1, k, j, i]."""
    return torch.from_numpy(sitk.GetArrayFromImage(sitk.ReadImage(str(path))))[None, None]


def challenge_percentile_clip(tensor: torch.Tensor) -> torch.Tensor:
    """Upstream ``__percentile_clip(t, p_min=0.5, p_max=99.5, strictlyPositive=True)``, numpy on a tensor."""
    v_min, v_max = np.percentile(tensor, [0.5, 99.5])
    if v_min < 0:
        v_min = 0
    clipped = np.clip(tensor, v_min, v_max)
    return (clipped - v_min) / (v_max - v_min)


@functools.cache
def challenge_scores(subject: str) -> dict[str, float]:
    """Upstream ``compute_metrics(gt, prediction, seg, normalize=True)``, plus the unranked extras: PSNR and
    MSE over the region's voxels of the per-volume normalised volumes, SSIM_full as participants do."""
    files = make_fixtures.paths(subject)
    gt = challenge_percentile_clip(read_like_challenge(files["real"]))
    prediction = challenge_percentile_clip(read_like_challenge(files["pred"]))
    mask = read_like_challenge(files["seg"])
    mask[mask > 0] = 1
    mask = mask.type(torch.int64)
    scores = {
        "ssim_tumour": float(challenge_ssim(preds=prediction * mask, target=gt * mask)),
        "ssim_non_tumour": float(challenge_ssim(preds=prediction * (1 - mask), target=gt * (1 - mask))),
        "ssim_whole": float(challenge_ssim(preds=prediction, target=gt)),
    }
    for name, region in (("tumour", mask > 0), ("non_tumour", mask == 0), ("whole", mask >= 0)):
        if region.any():
            p, t = prediction[region], gt[region]
            scores[f"psnr_{name}"] = float(PeakSignalNoiseRatio(data_range=1.0)(preds=p, target=t))
            scores[f"mse_{name}"] = float(MeanSquaredError()(preds=p, target=t))
        else:
            scores[f"psnr_{name}"] = scores[f"mse_{name}"] = math.nan
    return scores


def fixture_inputs():
    predictions = {s: make_fixtures.paths(s)["pred"] for s in SUBJECTS}
    references = {s: (make_fixtures.paths(s)["real"], make_fixtures.paths(s)["seg"]) for s in SUBJECTS}
    return predictions, references


def same(a: float, b: float, rel: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=rel, abs_tol=0.0)


def test_committed_fixtures_are_what_the_script_writes():
    for subject, volumes in make_fixtures.build().items():
        for kind, path in make_fixtures.paths(subject).items():
            image = nib.load(path)
            assert image.get_data_dtype() == volumes[kind].dtype, path
            np.testing.assert_array_equal(np.asarray(image.dataobj), volumes[kind], err_msg=str(path))


@functools.cache
def float64_rows():
    return brasyn.score_brasyn_folder(*fixture_inputs(), dtype=torch.float64)


def test_float64_equals_the_challenge_computation():
    # float64 is the upstream script's arithmetic under NumPy 2: the same numbers, to the last bit
    rows = float64_rows()
    assert [row["subject"] for row in rows] == list(SUBJECTS)
    for row in rows:
        expected = challenge_scores(row["subject"])
        assert set(expected) == set(brasyn.METRICS)
        for key, value in expected.items():
            assert same(row[key], value, rel=1e-12), (row["subject"], key, row[key], value)


@functools.cache
def float32_rows():
    return brasyn.score_brasyn_folder(*fixture_inputs())


def test_float32_default_is_within_a_millionth_of_the_challenge():
    for row in float32_rows():
        expected = challenge_scores(row["subject"])
        for key in ("ssim_tumour", "ssim_non_tumour", "ssim_whole"):
            assert same(row[key], expected[key], rel=1e-6), (row["subject"], key, row[key], expected[key])
        for key in (
            "psnr_tumour",
            "psnr_non_tumour",
            "psnr_whole",
            "mse_tumour",
            "mse_non_tumour",
            "mse_whole",
        ):
            assert same(row[key], expected[key], rel=1e-5), (row["subject"], key, row[key], expected[key])


def test_normalisation_is_per_volume_over_every_voxel_with_a_floor_at_zero():
    volumes = make_fixtures.build()["subject-a"]
    for kind in ("real", "pred"):
        ours = brasyn.brasyn_normalise(volumes[kind])
        # sitk's [k, j, i] order is nibabel's transposed
        expected = challenge_percentile_clip(read_like_challenge(make_fixtures.paths("subject-a")[kind]))
        np.testing.assert_array_equal(ours.T, expected[0, 0].numpy())
        assert ours.dtype == np.float64 and ours.min() == 0.0 and ours.max() == 1.0
    # The fixture exercises each clause: the prediction's 0.5th percentile is negative (raised to 0), ...
    pred, real, seg = volumes["pred"], volumes["real"], volumes["seg"]
    assert np.percentile(pred, 0.5) < 0
    np.testing.assert_array_equal(brasyn.brasyn_normalise(pred)[pred <= 0], 0.0)
    # ... and percentiles over the brain alone (background left out) would give other numbers.
    brain = real > 0
    lo, hi = np.percentile(real[brain], [0.5, 99.5])
    brain_only = (np.clip(real, lo, hi) - lo) / (hi - lo)
    assert np.abs(brain_only - brasyn.brasyn_normalise(real)).max() > 0.05
    # The prediction is scaled by its own percentiles, not the reference's.
    assert np.abs(brasyn.brasyn_normalise(pred) - brasyn.brasyn_normalise(real)).max() < 0.5
    assert not np.allclose(np.percentile(pred, 99.5), np.percentile(real, 99.5))
    assert seg.any()


def test_regions_are_the_other_region_zeroed_and_tumour_is_every_label():
    volumes = make_fixtures.build()["subject-a"]
    pred, real, seg = volumes["pred"], volumes["real"], volumes["seg"]
    assert set(np.unique(seg)) == {0, 1, 2, 3}
    scores = brasyn.brasyn_scores(pred, real, seg)
    p = torch.from_numpy(brasyn.brasyn_normalise(pred))[None, None]
    r = torch.from_numpy(brasyn.brasyn_normalise(real))[None, None]
    tumour = torch.from_numpy(seg > 0)[None, None]
    # The other reading, "SSIM map of the whole volume averaged over the region", gives other numbers:
    _, full_map = structural_similarity_index_measure(p, r, return_full_image=True)
    assert abs(scores["ssim_tumour"] - float(full_map[tumour].mean())) > 1e-3
    assert abs(scores["ssim_non_tumour"] - float(full_map[~tumour].mean())) > 1e-3
    # ... and so does a tumour of the enhancing label alone.
    enhancing_only = brasyn.brasyn_scores(pred, real, (seg == 3).astype(np.uint8))
    assert abs(enhancing_only["ssim_non_tumour"] - scores["ssim_non_tumour"]) > 1e-4


def test_an_empty_tumour_scores_nan_as_the_challenge_does():
    expected = challenge_scores("subject-b")
    assert math.isnan(expected["ssim_tumour"])  # 0/0: both zeroed volumes are all 0, so data_range is 0
    (row,) = [r for r in float32_rows() if r["subject"] == "subject-b"]
    assert row["tumour_voxels"] == 0
    for key in ("ssim_tumour", "psnr_tumour", "mse_tumour"):
        assert math.isnan(row[key]), key
    for metric in ("ssim", "psnr", "mse"):
        assert row[f"{metric}_non_tumour"] == row[f"{metric}_whole"]
        assert math.isfinite(row[f"{metric}_non_tumour"])


def test_legacy_border_crop_is_torchmetrics_before_1_4_2():
    volumes = make_fixtures.build()["subject-a"]
    pred, real, seg = volumes["pred"], volumes["real"], volumes["seg"]
    legacy = brasyn.brasyn_scores(pred, real, seg, legacy_border_crop=True)
    current = brasyn.brasyn_scores(pred, real, seg)
    # torchmetrics 1.4.1: ssim_idx = ssim_idx_full_image[..., 5:-5, 5:-5, 5:-5], then its mean
    p = torch.from_numpy(brasyn.brasyn_normalise(pred).T.copy())[None, None].float()
    r = torch.from_numpy(brasyn.brasyn_normalise(real).T.copy())[None, None].float()
    _, full_map = structural_similarity_index_measure(p, r, return_full_image=True)
    cropped = float(full_map[..., 5:-5, 5:-5, 5:-5].mean())
    assert math.isclose(legacy["ssim_whole"], cropped, rel_tol=1e-6)
    assert abs(legacy["ssim_whole"] - current["ssim_whole"]) > 1e-3
    for key in ("psnr_whole", "mse_tumour"):
        assert legacy[key] == current[key]


def write_like(path, data, affine):
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def test_mismatched_grids_raise_one_line_naming_both_files(tmp_path):
    predictions, references = fixture_inputs()
    real_path = references["subject-a"][0]
    image = nib.load(predictions["subject-a"])
    cropped = write_like(tmp_path / "cropped.nii.gz", np.asarray(image.dataobj)[:-1], image.affine)
    with pytest.raises(UserError) as error:
        brasyn.score_brasyn_folder({**predictions, "subject-a": cropped}, references)
    message = str(error.value)
    assert "\n" not in message and str(cropped) in message and str(real_path) in message
    assert "shape" in message

    shifted_affine = image.affine.copy()
    shifted_affine[0, 3] += 1.5
    shifted = write_like(tmp_path / "shifted.nii.gz", np.asarray(image.dataobj), shifted_affine)
    with pytest.raises(UserError, match="affine") as error:
        brasyn.score_brasyn_folder({**predictions, "subject-a": shifted}, references)
    assert str(shifted) in str(error.value) and str(real_path) in str(error.value)

    with pytest.raises(ValueError, match="one grid"):
        brasyn.brasyn_scores(np.zeros((8, 8, 8)), np.zeros((8, 8, 9)), np.zeros((8, 8, 8)))


def test_subjects_and_voxels_must_be_scoreable(tmp_path):
    predictions, references = fixture_inputs()
    with pytest.raises(UserError, match="no prediction for 1 subject.*subject-b"):
        brasyn.score_brasyn_folder({"subject-a": predictions["subject-a"]}, references)
    with pytest.raises(UserError, match="no reference volume for subject 'stray'"):
        brasyn.score_brasyn_folder({**predictions, "stray": predictions["subject-a"]}, references)
    image = nib.load(predictions["subject-a"])
    data = np.asarray(image.dataobj).copy()
    data[3, 3, 3] = np.nan
    with_nan = write_like(tmp_path / "nan.nii.gz", data, image.affine)
    with pytest.raises(UserError, match="NaN"):
        brasyn.score_brasyn_folder({**predictions, "subject-a": with_nan}, references)
    # float64 SSIM of a full BraTS volume would need ~475 GB on the CPU: refused before any work
    big = np.zeros((240, 240, 155), dtype=np.float32)
    with pytest.raises(UserError, match="GiB"):
        brasyn.brasyn_scores(big, big, big, dtype=torch.float64)


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("loader_says", ["nothing", "other words"])
def test_non_finite_voxels_are_found_by_value_whatever_the_loader_reports(
    tmp_path, monkeypatch, bad_value, loader_says
):
    # The loader zeroes NaN/Inf voxels; only the file's values say they were there, not a message's wording.
    from data_prep import volumes

    real_loader = volumes.load_volume

    def loader_with_other_repair_lines(path, **kwargs):
        volume = real_loader(path, **kwargs)
        volume.repairs = [] if loader_says == "nothing" else [f"{Path(path).name}: set 1 voxel to 0"]
        return volume

    monkeypatch.setattr(volumes, "load_volume", loader_with_other_repair_lines)
    predictions, references = fixture_inputs()
    image = nib.load(predictions["subject-a"])
    data = np.asarray(image.dataobj).copy()
    data[3, 3, 3] = bad_value
    broken = write_like(tmp_path / "broken.nii.gz", data, image.affine)
    expected = "1 NaN and 0 Inf" if np.isnan(bad_value) else "0 NaN and 1 Inf"
    with pytest.raises(UserError, match=expected) as error:
        brasyn.score_brasyn_folder({**predictions, "subject-a": broken}, references)
    assert str(broken) in str(error.value) and "\n" not in str(error.value)


def test_missing_torchmetrics_is_a_one_line_user_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchmetrics", None)  # makes `import torchmetrics` raise ImportError
    with pytest.raises(UserError, match="pip install torchmetrics"):
        brasyn.score_brasyn_folder(*fixture_inputs())
    with pytest.raises(UserError, match="pip install torchmetrics"):
        brasyn.brasyn_provenance()


def test_provenance_names_the_upstream_commit_and_torchmetrics_version():
    import torchmetrics

    record = brasyn.brasyn_provenance()
    assert record["upstream_repository"] == "https://github.com/hongweilibran/BraSyn"
    assert len(record["upstream_commit"]) == 40 and record["torchmetrics"] == torchmetrics.__version__


def brasyn_folders(tmp_path):
    """(subjects folder, predictions folder) from the fixtures: each subject's real volume as its flair,
    its seg, the fixture prediction as a t1 input, and the real volume plus a little noise as a t2 input
    (the better copy by any measure); the prediction as the flair to score."""
    subjects, predictions = tmp_path / "subjects", tmp_path / "predictions"
    rng = np.random.default_rng(0)
    for subject in SUBJECTS:
        files = make_fixtures.paths(subject)
        (subjects / subject).mkdir(parents=True)
        predictions.mkdir(exist_ok=True)
        (subjects / subject / f"{subject}_flair.nii.gz").symlink_to(files["real"])
        (subjects / subject / f"{subject}_seg.nii.gz").symlink_to(files["seg"])
        (subjects / subject / f"{subject}_t1.nii.gz").symlink_to(files["pred"])
        (predictions / f"{subject}_flair.nii.gz").symlink_to(files["pred"])
        real = nib.load(files["real"])
        noisy = np.asarray(real.dataobj, dtype=np.float32) + rng.normal(0, 5, real.shape).astype(np.float32)
        write_like(subjects / subject / f"{subject}_t2.nii.gz", noisy, real.affine)
    return subjects, predictions


def test_brasyn_protocol_loads_each_reference_once_for_every_method(tmp_path, monkeypatch):
    from data_prep import volumes
    from medgan.evaluation.brasyn_protocol import evaluate_brasyn

    subjects, predictions = brasyn_folders(tmp_path)
    real_loader, loads = volumes.load_volume, {}

    def counting_loader(path, **kwargs):
        name = str(Path(path).relative_to(tmp_path))
        loads[name] = loads.get(name, 0) + 1
        return real_loader(path, **kwargs)

    monkeypatch.setattr(volumes, "load_volume", counting_loader)
    evaluate_brasyn(subjects, "flair", ["t1", "t2"], tmp_path / "out", predictions_folder=predictions)
    for s in SUBJECTS:
        # the seg once; the real target once to score every method, once to choose the copied input
        assert loads[f"subjects/{s}/{s}_seg.nii.gz"] == 1, loads
        assert loads[f"subjects/{s}/{s}_flair.nii.gz"] == 2, loads
        assert loads[f"predictions/{s}_flair.nii.gz"] == 1, loads
        # both inputs to choose the copy, the chosen one (t2) again to score it
        assert loads[f"subjects/{s}/{s}_t1.nii.gz"] == 1 and loads[f"subjects/{s}/{s}_t2.nii.gz"] == 2, loads


def test_brasyn_copied_input_is_chosen_by_brain_psnr_and_only_it_is_scored(tmp_path, monkeypatch):
    import csv

    from medgan.evaluation.brasyn_protocol import copy_brain_psnr, evaluate_brasyn
    from medgan.scoring import COPY, MODEL

    subjects, predictions = brasyn_folders(tmp_path)
    ssim, calls = brasyn._ssim, []
    monkeypatch.setattr(brasyn, "_ssim", lambda *args: calls.append(1) or ssim(*args))
    summary = evaluate_brasyn(
        subjects, "flair", ["t1", "t2"], tmp_path / "out", predictions_folder=predictions
    )
    assert len(calls) == 3 * 2 * len(SUBJECTS)  # three SSIMs per subject for the model and one copy only

    expected = {}
    for name in ("t1", "t2"):
        values = [
            copy_brain_psnr(
                np.asarray(nib.load(subjects / s / f"{s}_{name}.nii.gz").dataobj, dtype=np.float32),
                np.asarray(nib.load(subjects / s / f"{s}_flair.nii.gz").dataobj, dtype=np.float32),
            )
            for s in SUBJECTS
        ]
        expected[name] = float(np.mean(values))
    assert summary["brasyn"]["copy_brain_psnr"] == pytest.approx(expected)
    assert summary["brasyn"]["copy_input"] == "t2" == max(expected, key=expected.__getitem__)
    assert "on the evaluated subjects" in summary["methods"][COPY]

    # the rows are the scores each method would get alone: loading the reference once changes no number
    with open(tmp_path / "out" / "brasyn.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert [row["method"] for row in rows] == [MODEL] * 2 + [COPY] * 2
    references = {s: (subjects / s / f"{s}_flair.nii.gz", subjects / s / f"{s}_seg.nii.gz") for s in SUBJECTS}
    for method, name in ((MODEL, "flair"), (COPY, "t2")):
        files = predictions if method == MODEL else subjects
        alone = brasyn.score_brasyn_folder(
            {s: next(files.rglob(f"{s}_{name}.nii.gz")) for s in SUBJECTS}, references
        )
        written = [row for row in rows if row["method"] == method]
        for row, direct in zip(written, alone, strict=True):
            assert {key: str(value) for key, value in direct.items()} == {key: row[key] for key in direct}


def test_one_grid_tolerance_for_the_brasyn_score_and_the_segmenter(tmp_path):
    from medgan.evaluation.segmenter import SegmenterError, write_brats2023_folder

    predictions, references = fixture_inputs()
    image = nib.load(predictions["subject-a"])
    data = np.asarray(image.dataobj)
    for shift_mm, same in ((5e-4, True), (1e-2, False)):
        affine = image.affine.copy()
        affine[0, 3] += shift_mm
        shifted = write_like(tmp_path / f"shifted_{shift_mm}.nii.gz", data, affine)
        contrasts = {"t1": predictions["subject-a"], "t1ce": shifted, "t2": shifted, "flair": shifted}
        if same:
            brasyn.score_brasyn_folder({"subject-a": shifted}, {"subject-a": references["subject-a"]})
            write_brats2023_folder({"subject-a": contrasts}, tmp_path / f"segmenter_{shift_mm}")
        else:
            with pytest.raises(UserError, match="affine differs"):
                brasyn.score_brasyn_folder({"subject-a": shifted}, {"subject-a": references["subject-a"]})
            with pytest.raises(SegmenterError, match="on one grid"):
                write_brats2023_folder({"subject-a": contrasts}, tmp_path / f"segmenter_{shift_mm}")
