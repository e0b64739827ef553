"""data_prep.volumes: validation, exact geometric round trip back onto the original grid, registration."""

from __future__ import annotations

import gzip
import json

import nibabel as nib
import numpy as np
import pytest

from data_prep.phantom import PhantomConfig, grid_affine, make_phantom
from data_prep.volumes import (
    CropBox,
    IntensityScaling,
    SubjectGeometry,
    VolumeError,
    crop,
    denormalise,
    from_canonical,
    head_mask,
    load_volume,
    normalise,
    prepare_subject,
    register_rigid,
    resample_onto,
    restore_volume,
    to_canonical,
    uncrop,
)


def _save(tmp_path, name, data, affine=None):
    path = tmp_path / name
    nib.save(nib.Nifti1Image(np.asarray(data), np.eye(4) if affine is None else affine), path)
    return path


def _blob_volume(shape, rng, centre_shift=(0, 0, 0)) -> np.ndarray:
    """float32 [X, Y, Z]: positive random texture inside an ellipsoid, zero outside (skull-stripped)."""
    grid = np.indices(shape, dtype=np.float64)
    centre = (np.asarray(shape) - 1) / 2 + np.asarray(centre_shift)
    radii = np.asarray(shape) * 0.35
    inside = (((grid - centre[:, None, None, None]) / radii[:, None, None, None]) ** 2).sum(0) < 1
    return np.where(inside, rng.uniform(10, 1000, size=shape), 0).astype(np.float32)


@pytest.mark.parametrize("axcodes", ["RAS", "LPS", "PIR", "ASL", "IPR"])
def test_reorientation_is_exact_and_keeps_world_positions(axcodes):
    rng = np.random.default_rng(0)
    shape = (7, 9, 11)
    affine = grid_affine(shape, (1.0, 1.5, 2.0), axcodes, (3.0, -4.0, 5.0))
    data = rng.standard_normal(shape).astype(np.float32)
    canonical, canonical_affine, reorientation = to_canonical(data, affine)
    assert nib.aff2axcodes(canonical_affine) == ("R", "A", "S")
    assert np.array_equal(from_canonical(canonical, reorientation), data)
    index = np.array([2, 5, 8, 1.0])
    world = affine @ index
    canonical_index = np.rint(np.linalg.inv(canonical_affine) @ world).astype(int)
    assert canonical[tuple(canonical_index[:3])] == data[2, 5, 8]


def test_crop_pads_and_uncrop_inverts_it():
    volume = np.arange(10 * 12 * 6, dtype=np.float32).reshape(10, 12, 6) + 1
    box = CropBox(x=(-3, 13), y=(2, 10), z=(1, 5))  # wider than the volume in x, narrower in y
    slices = crop(volume, box)
    assert slices.shape == (4, 16, 8)
    assert np.all(slices[:, :3] == 0) and np.all(slices[:, 13:] == 0)
    assert np.array_equal(slices[0, 3:13, :], volume[:, 2:10, 1])
    back = uncrop(slices, box, volume.shape)
    expected = np.zeros_like(volume)
    expected[:, 2:10, 1:5] = volume[:, 2:10, 1:5]
    assert np.array_equal(back, expected)


@pytest.mark.parametrize(("axcodes", "size"), [("LPS", 64), ("PIR", 32), ("RAS", 48)])
def test_slices_put_back_land_exactly_on_the_original_grid(tmp_path, axcodes, size):
    """nnU-Net style: crop box, reorientation and normalisation undone through the manifest's record."""
    rng = np.random.default_rng(1)
    shape = (40, 44, 30)
    affine = grid_affine(shape, (1.1, 0.9, 2.0), axcodes, (1.0, -2.0, 3.0))
    volume = _blob_volume(shape, rng, centre_shift=(3, -2, 1))
    path = _save(tmp_path, "BraTS2021_00001_t1.nii.gz", volume, affine)
    prepared = prepare_subject({"t1": path}, dataset="brats", modalities=("t1", "t2"), size=size)
    assert prepared.present == ["t1"] and not np.any(prepared.images[1])

    # What synthesize has: the manifest's JSON record, and the model's slices.
    geometry = SubjectGeometry.from_dict(json.loads(json.dumps(prepared.geometry.to_dict())))
    scaling = IntensityScaling.from_dict(json.loads(json.dumps(prepared.scaling["t1"].to_dict())))
    restored = restore_volume(prepared.images[0], geometry)
    assert restored.shape == shape and np.array_equal(restored.affine, nib.load(path).affine)

    mask = volume != 0
    expected = normalise(volume, scaling, mask)
    canonical_cover = uncrop(np.ones(prepared.images[0].shape, bool), geometry.crop, geometry.canonical_shape)
    covered = from_canonical(canonical_cover, geometry.reorientation)
    assert covered.any()
    assert np.array_equal(np.asarray(restored.dataobj)[covered], expected[covered])
    assert not np.any(np.asarray(restored.dataobj)[~covered])
    if size >= 48:  # the crop holds the whole blob: every brain voxel comes back
        assert covered[mask].mean() > 0.97

    in_units = np.asarray(restore_volume(prepared.images[0], geometry, scaling).dataobj)
    clipped = np.clip(volume, scaling.low, scaling.high)
    inside = covered & mask
    assert np.allclose(in_units[inside], clipped[inside], rtol=1e-5, atol=1e-3)


def test_normalise_into_unit_range_and_back():
    rng = np.random.default_rng(2)
    volume = rng.uniform(100, 900, size=(8, 8, 8)).astype(np.float32)
    mask = np.ones(volume.shape, bool)
    mask[0] = False
    scaling = IntensityScaling(low=200.0, high=800.0)
    unit = normalise(volume, scaling, mask)
    assert unit.min() >= 0 and unit.max() <= 1 and not np.any(unit[0])
    inside = mask & (volume >= 200) & (volume <= 800)
    assert np.allclose(denormalise(unit, scaling)[inside], volume[inside], atol=1e-3)


@pytest.fixture(scope="module")
def ixi_subject(tmp_path_factory):
    out = tmp_path_factory.mktemp("ixi")
    (subject,) = make_phantom(PhantomConfig(layout="ixi", subjects=1, seed=5, shape=(96, 96, 48)), out)
    return subject


def test_head_mask_covers_the_head_and_not_the_background(ixi_subject):
    t2 = load_volume(ixi_subject.files["t2"])
    mask = head_mask(t2.data)
    middle = t2.data.shape[2] // 2
    assert 0.3 < mask[:, :, middle].mean() < 0.9
    assert not mask[0, 0, middle] and mask[48, 48, middle]
    assert np.mean(t2.data[mask]) > 5 * np.mean(t2.data[~mask])


def test_rigid_registration_recovers_a_known_transform(ixi_subject):
    """Across contrasts (inverted intensities) and grids (sagittal, other spacing): mutual information."""
    t2 = load_volume(ixi_subject.files["t2"])
    fixed, fixed_affine, _ = to_canonical(t2.data, t2.affine)
    angle = np.deg2rad(6.0)
    known = np.eye(4)
    known[:3, :3] = [[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]
    known[:3, 3] = [4.0, -3.0, 2.5]
    moving_shape = (90, 70, 80)
    moving_affine = grid_affine(
        moving_shape, (2.2, 2.2, 2.6), "PIR", fixed_affine[:3, 3] + fixed_affine[:3, :3] @ [48, 48, 24]
    )
    # The moving scan sees at q the anatomy the fixed one sees at known^-1 q; then a T1-like inversion.
    moving = resample_onto(fixed, fixed_affine, moving_shape, moving_affine, np.linalg.inv(known))
    moving = np.where(moving > 0, fixed.max() - moving, 0).astype(np.float32)

    found = register_rigid(moving, moving_affine, fixed, fixed_affine).fixed_to_moving
    rotation_error = np.rad2deg(
        np.arccos(np.clip((np.trace(found[:3, :3].T @ known[:3, :3]) - 1) / 2, -1, 1))
    )
    brain = np.argwhere(head_mask(fixed))[::50]
    points = fixed_affine[:3, :3] @ brain.T + fixed_affine[:3, 3:4]
    displacement = np.linalg.norm(
        found[:3, :3] @ points + found[:3, 3:4] - (known[:3, :3] @ points + known[:3, 3:4]), axis=0
    )
    assert rotation_error < 1.0
    assert np.percentile(displacement, 95) < 1.5  # mm; voxels are 2 mm


def test_prepare_registers_ixi_t1_onto_t2(ixi_subject):
    prepared = prepare_subject(
        ixi_subject.files, dataset="ixi", modalities=("t1", "t2", "pd"), size=96, seed=0
    )
    assert prepared.geometry.reference == "t2"
    assert list(prepared.geometry.registered) == ["t1"]
    t1, t2 = prepared.images[0], prepared.images[1]
    inside = prepared.mask.astype(bool)
    # Registered T1 and T2 of one head: strongly (anti)correlated inside the head, unlike a shifted copy.
    aligned = abs(np.corrcoef(t1[inside], t2[inside])[0, 1])
    shifted = abs(np.corrcoef(np.roll(t1, 4, axis=1)[inside], t2[inside])[0, 1])
    assert aligned > shifted + 0.1


def test_bad_volumes_give_one_line_naming_the_file(tmp_path):
    good = _blob_volume((16, 16, 8), np.random.default_rng(3))
    cases = {}
    truncated = _save(tmp_path, "truncated.nii.gz", good)
    truncated.write_bytes(truncated.read_bytes()[:300])
    cases[truncated] = "truncated or corrupt|not a readable NIfTI"
    not_nifti = tmp_path / "text.nii.gz"
    not_nifti.write_bytes(gzip.compress(b"this is not an image"))
    cases[not_nifti] = "not a readable NIfTI"
    plain_text = tmp_path / "plain.nii"
    plain_text.write_text("hello")
    cases[plain_text] = "not a readable NIfTI"
    empty = tmp_path / "empty.nii.gz"
    empty.touch()
    cases[empty] = r"empty file \(0 bytes\)"
    cases[_save(tmp_path, "four_d.nii.gz", np.stack([good, good], -1))] = (
        r"4D volume of shape \(16, 16, 8, 2\)"
    )
    cases[_save(tmp_path, "zeros.nii.gz", np.zeros((8, 8, 8), np.float32))] = "all-zero volume"
    for path, message in cases.items():
        with pytest.raises(VolumeError, match=message) as error:
            load_volume(path)
        assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_an_empty_head_mask_is_a_clear_failure(tmp_path):
    """A constant, non-zero IXI image has no foreground for Otsu: one line naming the file."""
    path = _save(tmp_path, "IXI002-Guys-0828-T2.nii.gz", np.full((20, 20, 12), 100, dtype=np.int16))
    with pytest.raises(VolumeError, match=r"IXI002-Guys-0828-T2.nii.gz: the head mask is empty"):
        prepare_subject({"t2": path}, dataset="ixi", modalities=("t1", "t2", "pd"), size=32)


def test_nan_voxels_and_singleton_fourth_axis_are_repaired_and_reported(tmp_path):
    data = _blob_volume((16, 16, 8), np.random.default_rng(4))
    data[1, 1, 1] = np.nan
    data[2, 2, 2] = np.inf
    volume = load_volume(_save(tmp_path, "repair.nii.gz", data[..., None]))
    assert volume.data.shape == (16, 16, 8) and np.all(np.isfinite(volume.data))
    assert volume.repairs == [
        "repair.nii.gz: dropped a length-1 fourth dimension",
        "repair.nii.gz: replaced 2 NaN/Inf voxels with 0",
    ]


def test_a_grid_mismatch_says_what_differs(tmp_path):
    """Two files of one shape on grids 25 mm apart: the message names the distance, not two equal shapes;
    different shapes are named as shapes."""
    data = _blob_volume((16, 16, 8), np.random.default_rng(5))
    t1 = _save(tmp_path, "s_t1.nii.gz", data)
    shifted = np.eye(4)
    shifted[:3, 3] = (25.0, 0.0, 0.0)
    t2 = tmp_path / "s_t2.nii.gz"
    nib.save(nib.Nifti1Image(data, shifted), t2)
    with pytest.raises(VolumeError) as error:
        prepare_subject({"t1": t1, "t2": t2}, dataset="brats", modalities=("t1", "t2"), size=16)
    message = str(error.value)
    assert "up to 25 mm apart" in message and str(t2) in message and "\n" not in message, message
    other_shape = _save(tmp_path, "o_t2.nii.gz", data[:, :, :6])
    with pytest.raises(VolumeError, match=r"shape \(16, 16, 8\) vs \(16, 16, 6\)"):
        prepare_subject({"t1": t1, "t2": other_shape}, dataset="brats", modalities=("t1", "t2"), size=16)


def test_every_brain_slice_keeps_the_slivers_shards_drop_and_scored_files_choose_nothing(tmp_path):
    """Inference keeps every axial slice with any brain (shards drop slices under 10% of the largest);
    a file given as `scored` neither grows the mask nor moves any input's scale."""
    data = np.zeros((16, 16, 10), np.float32)
    data[2:14, 2:14, 2:8] = np.random.default_rng(6).uniform(50, 150, (12, 12, 6))
    data[7, 7, 1] = data[7, 7, 8] = 100.0  # a one-voxel sliver below and above the brain
    t1 = _save(tmp_path, "s_t1.nii.gz", data)
    target = data * 3.0
    target[0, 0, :] = 500.0  # bright voxels outside the inputs' brain
    real = _save(tmp_path, "s_flair.nii.gz", target)
    shards = prepare_subject({"t1": t1}, dataset="brats", modalities=("t1", "flair"), size=16)
    whole = prepare_subject(
        {"t1": t1}, dataset="brats", modalities=("t1", "flair"), size=16, every_brain_slice=True,
        scored={"flair": real},
    )  # fmt: skip
    assert shards.geometry.crop.z == (2, 8) and whole.geometry.crop.z == (1, 9)
    together = prepare_subject(
        {"t1": t1, "flair": real},
        dataset="brats",
        modalities=("t1", "flair"),
        size=16,
        every_brain_slice=True,
    )
    assert together.geometry.crop.z == (0, 10)  # given as an input, the target would choose the slices
    alone = prepare_subject(
        {"t1": t1}, dataset="brats", modalities=("t1", "flair"), size=16, every_brain_slice=True
    )
    np.testing.assert_array_equal(whole.images, alone.images)
    np.testing.assert_array_equal(whole.mask, alone.mask)
    assert whole.scaling == alone.scaling and whole.present == ["t1"]
    # the real target, on its own scale within the inputs' mask: 3x the input's values, the same normalised
    np.testing.assert_allclose(whole.scored["flair"], whole.images[0], atol=1e-6)
    assert np.all(whole.scored["flair"][whole.mask == 0] == 0)
