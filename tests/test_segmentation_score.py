"""The downstream-segmentation score: Dice and HD95 with BraTS's rules, label conventions, the segmenter's
folder layout and command line, and an end-to-end run of a threshold segmenter on the phantom."""

from __future__ import annotations

import filecmp
import itertools
import shlex
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from data_prep.errors import UserError
from medgan.evaluation import segmentation_metrics as regions
from medgan.evaluation import segmenter as seg
from medgan.evaluation.segmenter import SegmenterError

SEGMENTER = Path(__file__).resolve().parent / "segmenter_threshold.py"
SPACING_MM = (0.5, 0.7, 2.0)
# Two phantom subjects with a tumour (of the 8 that `phantom_subjects` makes, subject 4 has none).
SUBJECTS = ("BraTS2021_00001", "BraTS2021_00003")


def surface_coordinates_mm(mask: np.ndarray, spacing) -> np.ndarray:
    """[N, 3] positions (mm) of the mask's voxels that have a face neighbour outside it or the array."""
    padded = np.pad(mask, 1)
    inside = np.ones_like(mask)
    for axis, step in itertools.product(range(3), (-1, 1)):
        inside &= np.roll(padded, step, axis=axis)[1:-1, 1:-1, 1:-1]
    return np.argwhere(mask & ~inside) * np.asarray(spacing)


def hd95_brute_force(pred: np.ndarray, ref: np.ndarray, spacing) -> float:
    """The definition, by all pairwise distances between the two surfaces."""
    a, b = surface_coordinates_mm(pred, spacing), surface_coordinates_mm(ref, spacing)
    pairwise = np.linalg.norm(a[:, None, :] - b[None, :, :], axis=-1)
    return float(max(np.percentile(pairwise.min(axis=1), 95), np.percentile(pairwise.min(axis=0), 95)))


def box(shape, corner, size) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(c, c + s) for c, s in zip(corner, size))] = True
    return mask


# Dice and HD95 on hand-made masks


def test_dice_of_overlapping_boxes():
    a = box((8, 8, 8), (0, 0, 0), (3, 3, 3))  # 27 voxels
    b = box((8, 8, 8), (2, 0, 0), (2, 3, 3))  # 18 voxels, 9 shared
    assert regions.dice(a, b) == pytest.approx(2 * 9 / 45)
    assert regions.dice(a, a) == 1.0
    assert regions.dice(a, box((8, 8, 8), (5, 5, 5), (2, 2, 2))) == 0.0


def test_empty_regions_follow_brats_rules():
    empty, full = np.zeros((6, 6, 6), bool), box((6, 6, 6), (1, 1, 1), (2, 2, 2))
    assert regions.dice(empty, empty) == 1.0
    assert regions.hd95(empty, empty, SPACING_MM) == 0.0
    assert regions.dice(full, empty) == 0.0 and regions.dice(empty, full) == 0.0
    assert regions.hd95(full, empty, SPACING_MM) == regions.hd95(empty, full, SPACING_MM) == 374.0
    assert regions.HD95_MAX_PENALTY_MM == 374.0


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_hd95_of_parallel_planes_uses_the_spacing_of_their_axis(axis):
    shape = (6, 7, 8)
    first, second = np.zeros(shape, bool), np.zeros(shape, bool)
    first[(slice(None),) * axis + (1,)] = True
    second[(slice(None),) * axis + (5,)] = True
    # Every voxel of a one-voxel-thick plane is on its surface, 4 voxels from the other plane.
    assert regions.hd95(first, second, SPACING_MM) == pytest.approx(4 * SPACING_MM[axis])


def test_hd95_of_two_voxels_is_their_distance_in_mm():
    a, b = np.zeros((4, 4, 4), bool), np.zeros((4, 4, 4), bool)
    a[0, 0, 0], b[1, 2, 3] = True, True
    expected = np.sqrt((1 * 0.5) ** 2 + (2 * 0.7) ** 2 + (3 * 2.0) ** 2)
    assert regions.hd95(a, b, SPACING_MM) == pytest.approx(expected)
    assert regions.hd95(a, b, (1.0, 1.0, 1.0)) == pytest.approx(np.sqrt(14))


def test_hd95_ignores_a_few_far_voxels_that_the_maximum_would_not():
    ref = box((20, 20, 20), (2, 2, 2), (6, 6, 6))  # 152 surface voxels
    pred = ref.copy()
    pred[18, 18, 18] = True  # one stray voxel: 1 of pred's 153 distances to ref
    assert regions.hd95(pred, ref, SPACING_MM) == 0.0
    assert regions.hd95(ref, ref, SPACING_MM) == 0.0


@pytest.mark.parametrize("seed", range(4))
def test_hd95_equals_the_brute_force_definition(seed):
    rng = np.random.default_rng(seed)
    spacing = rng.uniform(0.4, 3.0, size=3)
    shape = (14, 12, 9)
    # Smoothed noise gives irregular blobs, some touching the array's border.
    pred = ndimage.gaussian_filter(rng.standard_normal(shape), 1.5) > 0.1
    ref = ndimage.gaussian_filter(rng.standard_normal(shape), 1.5) > 0.1
    assert pred.any() and ref.any()
    assert regions.hd95(pred, ref, spacing) == pytest.approx(hd95_brute_force(pred, ref, spacing), rel=1e-12)


def test_hd95_rejects_mismatched_shapes_and_spacings():
    with pytest.raises(ValueError, match="shape"):
        regions.hd95(np.ones((3, 3, 3), bool), np.ones((3, 3, 4), bool), SPACING_MM)
    with pytest.raises(ValueError, match="spacing_mm"):
        regions.hd95(np.ones((3, 3, 3), bool), np.ones((3, 3, 3), bool), (1.0, 0.0, 1.0))


# Label conventions


def test_regions_of_both_label_conventions():
    brats2021 = regions.region_masks(np.array([0, 1, 2, 4]), "brats2021")
    brats2023 = regions.region_masks(np.array([0, 1, 2, 3]), "brats2023")
    for masks in (brats2021, brats2023):
        assert masks["WT"].tolist() == [False, True, True, True]
        assert masks["TC"].tolist() == [False, True, False, True]
        assert masks["ET"].tolist() == [False, False, False, True]


@pytest.mark.parametrize(("labels", "convention"), [({0, 1, 2, 4}, "brats2021"), ({0, 2, 3}, "brats2023")])
def test_label_convention_is_inferred_from_the_enhancing_label(labels, convention):
    assert regions.infer_label_convention(labels) == convention
    assert regions.resolve_label_convention(labels, None) == convention


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (
            {0, 1, 2},
            "labels 1 2 (no 3 or 4), so its label convention cannot be inferred: pass --segmenter-labels",
        ),
        ({0}, "labels none (no 3 or 4)"),
        ({0, 1, 3, 4}, "labels 1 3 4: both 3 and 4"),
        ({0, 1, 5}, "labels 1 5: not BraTS 2021"),
    ],
)
def test_label_convention_that_cannot_be_inferred_is_one_line_naming_the_labels(labels, message):
    with pytest.raises(UserError) as error:
        regions.infer_label_convention(labels, source="out/")
    assert str(error.value).startswith("out/ has ")
    assert message in str(error.value) and "\n" not in str(error.value)


def test_given_label_convention_is_checked_against_the_labels():
    assert regions.resolve_label_convention({0, 1, 2}, "brats2023") == "brats2023"
    with pytest.raises(UserError, match=r"--segmenter-labels brats2021: out/ has labels 1 3, but brats2021"):
        regions.resolve_label_convention({0, 1, 3}, "brats2021", "out/")
    with pytest.raises(UserError, match="--segmenter-labels brats2024: expected one of brats2021, brats2023"):
        regions.resolve_label_convention({0, 1}, "brats2024")


# The segmenter's command line and folders


def test_command_template_quotes_the_folders_and_leaves_other_braces():
    command = seg.format_segmenter_command("awk '{print}' {input} -o {output}", "/in dir", "/out")
    assert command == "awk '{print}' '/in dir' -o /out"
    with pytest.raises(UserError, match=r"--segmenter 'seg.sh \{input\}': no \{output\}"):
        seg.format_segmenter_command("seg.sh {input}", "/in", "/out")


def test_failing_segmenter_is_one_line_with_its_command_and_exit_status(tmp_path):
    code = "import sys; sys.stderr.write('loading\\nweights.pt not found\\n'); sys.exit(3)"
    template = f"{shlex.quote(sys.executable)} -c {shlex.quote(code)} {{input}} {{output}}"
    with pytest.raises(SegmenterError) as error:
        seg.run_segmenter(template, tmp_path / "in", tmp_path / "out")
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(
        f"segmenter command {seg.format_segmenter_command(template, tmp_path / 'in', tmp_path / 'out')!r}"
    )
    assert "exited with status 3: weights.pt not found" in message
    assert (tmp_path / "out.stderr.log").read_text() == "loading\nweights.pt not found\n"

    with pytest.raises(
        SegmenterError, match=r"^segmenter command 'false .*' exited with status 1 \(full output"
    ):
        seg.run_segmenter("false {input} {output}", tmp_path / "in", tmp_path / "out")


def test_segmenter_past_its_timeout_is_stopped_with_its_children(tmp_path):
    pid_file = tmp_path / "pid"
    code = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    # "; true" keeps the shell from exec-ing python, so the segmenter is the shell's child.
    template = f"{shlex.quote(sys.executable)} -c {shlex.quote(code)} {{input}} {{output}}; true"
    with pytest.raises(SegmenterError, match=r"ran longer than 1 s and was stopped$"):
        seg.run_segmenter(template, tmp_path / "in", tmp_path / "out", timeout_s=1.0)
    status = Path(f"/proc/{pid_file.read_text()}/status")
    deadline = time.monotonic() + 5
    while status.exists() and "State:\tZ" not in status.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not status.exists() or "State:\tZ" in status.read_text()  # gone, or dead awaiting its reaper


def phantom_inputs(folder: Path, subjects=SUBJECTS):
    """(subjects: id -> contrast -> path, references: id -> seg path) from the BraTS 2021 phantom."""
    contrasts = {
        subject: {
            name: folder / subject / f"{subject}_{name}.nii.gz" for name in ("t1", "t1ce", "t2", "flair")
        }
        for subject in subjects
    }
    references = {subject: folder / subject / f"{subject}_seg.nii.gz" for subject in subjects}
    return contrasts, references


def blurred_flair(path: Path) -> nib.Nifti1Image:
    """A poor "synthesized" FLAIR: the real one blurred (sigma 2 voxels) inside the brain."""
    image = nib.load(path)
    flair = np.asarray(image.dataobj, dtype=np.float32)
    return nib.Nifti1Image(ndimage.gaussian_filter(flair, 2.0) * (flair > 0), image.affine)


def test_brats2023_folder_layout_and_its_errors(phantom_subjects, tmp_path):
    contrasts, _ = phantom_inputs(phantom_subjects, SUBJECTS[:1])
    subject = SUBJECTS[0]
    synthesized = blurred_flair(contrasts[subject]["flair"])
    seg.write_brats2023_folder({subject: {**contrasts[subject], "t2f": synthesized}}, tmp_path / "in")
    written = sorted(path.name for path in (tmp_path / "in" / subject).iterdir())
    assert written == [f"{subject}-{suffix}.nii.gz" for suffix in ("t1c", "t1n", "t2f", "t2w")]
    assert filecmp.cmp(tmp_path / "in" / subject / f"{subject}-t1c.nii.gz", contrasts[subject]["t1ce"], False)
    flair = nib.load(tmp_path / "in" / subject / f"{subject}-t2f.nii.gz")
    np.testing.assert_array_equal(flair.get_fdata(dtype=np.float32), synthesized.get_fdata(dtype=np.float32))

    without_t2 = {name: path for name, path in contrasts[subject].items() if name != "t2"}
    with pytest.raises(UserError, match=f"^subject {subject}: no t2 for the segmenter"):
        seg.write_brats2023_folder({subject: without_t2}, tmp_path / "bad")
    small = nib.Nifti1Image(np.ones((8, 8, 8), np.float32), np.eye(4))
    with pytest.raises(UserError, match=f"^subject {subject}: flair \\(an image in memory\\) has shape"):
        seg.write_brats2023_folder({subject: {**contrasts[subject], "flair": small}}, tmp_path / "bad")
    with pytest.raises(UserError, match="subject id '../x' cannot name a folder"):
        seg.write_brats2023_folder({"../x": contrasts[subject]}, tmp_path / "bad")


def score(phantom_subjects, work_dir, command, labels=None, subjects=SUBJECTS):
    contrasts, references = phantom_inputs(phantom_subjects, subjects)
    synthesized = {subject: blurred_flair(contrasts[subject]["flair"]) for subject in subjects}
    return seg.score_with_segmenter(command, contrasts, "flair", synthesized, references, labels, work_dir)


def threshold_command(*options: str) -> str:
    return " ".join(
        [shlex.quote(sys.executable), shlex.quote(str(SEGMENTER)), "{input}", "{output}", *options]
    )


def test_blurred_flair_lowers_the_whole_tumour_score_end_to_end(phantom_subjects, tmp_path):
    rows, summary = score(phantom_subjects, tmp_path / "work", threshold_command())
    assert [(row.subject, row.region) for row in rows] == list(itertools.product(SUBJECTS, regions.REGIONS))
    assert summary["label_convention"] == "brats2023" and summary["labels_inferred"]
    assert summary["subjects"] == 2 and summary["target"] == "flair"
    by_region = {region: [row for row in rows if row.region == region] for region in regions.REGIONS}
    for row in by_region["WT"]:
        assert row.dice_real > 0.85  # the threshold segmenter finds the phantom's tumours
        assert row.dice_drop > 0.1 and row.hd95_increase > 0
        assert row.dice_drop == pytest.approx(row.dice_real - row.dice_synth)
    # TC and ET come from T1c alone, which both runs share: synthesizing FLAIR cannot change them.
    for row in by_region["TC"] + by_region["ET"]:
        assert row.dice_drop == 0.0 and row.hd95_increase == 0.0 and row.dice_real > 0.8
    wt = summary["regions"]["WT"]
    assert wt["dice_drop"]["mean"] == pytest.approx(np.mean([row.dice_drop for row in by_region["WT"]]))
    assert wt["dice_drop"]["n"] == 2
    assert wt["dice_drop_paired"]["mean_difference"] == pytest.approx(wt["dice_drop"]["mean"])
    assert wt["hd95_increase_paired"]["mean_difference"] == pytest.approx(wt["hd95_increase"]["mean"])
    real_flair = tmp_path / "work" / "real" / "input" / SUBJECTS[0] / f"{SUBJECTS[0]}-t2f.nii.gz"
    assert filecmp.cmp(real_flair, phantom_subjects / SUBJECTS[0] / f"{SUBJECTS[0]}_flair.nii.gz", False)

    # The same segmentation in BraTS 2021 labels is read as such and scores the same.
    rows_2021, summary_2021 = score(
        phantom_subjects, tmp_path / "work", threshold_command("--labels brats2021")
    )
    assert summary_2021["label_convention"] == "brats2021"
    assert [row.to_dict() for row in rows_2021] == [row.to_dict() for row in rows]


def test_segmenter_that_writes_nothing_names_the_missing_file(phantom_subjects, tmp_path):
    with pytest.raises(SegmenterError) as error:
        score(phantom_subjects, tmp_path, "true {input} {output}")
    expected = tmp_path / "real" / "output" / f"{SUBJECTS[0]}.nii.gz"
    assert str(error.value) == (
        f"segmenter command 'true {tmp_path}/real/input {tmp_path}/real/output' wrote no segmentation for "
        f"subject {SUBJECTS[0]}: expected {expected} (and 1 more subjects)"
    )


def test_segmentation_off_the_reference_grid_is_refused(tmp_path):
    (tmp_path / "out").mkdir()
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.eye(4)), tmp_path / "out" / "s1.nii.gz")
    with pytest.raises(UserError, match=r"s1.nii.gz: segmentation of shape \(4, 4, 4\) is not on the grid"):
        seg.read_segmentations(tmp_path / "out", {"s1": ((4, 4, 5), np.eye(4))}, "cmd")


def test_reference_off_the_subjects_grid_is_refused_before_the_segmenter_runs(phantom_subjects, tmp_path):
    contrasts, _ = phantom_inputs(phantom_subjects, SUBJECTS[:1])
    reference = tmp_path / "seg.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.eye(4)), reference)
    with pytest.raises(UserError, match=r"seg.nii.gz: reference segmentation of shape \(4, 4, 4\) is not on"):
        seg.score_with_segmenter(
            "exit 9 {input} {output}", contrasts, "flair", {SUBJECTS[0]: reference}, {SUBJECTS[0]: reference},
            None, tmp_path / "work",
        )  # fmt: skip
    assert not (tmp_path / "work").exists()
