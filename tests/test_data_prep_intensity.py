"""data_prep.intensity: the healthy-median scaling is what docs/data.md defines (median -> 0.4, 2.5 x median
-> 1, the clipped share counted), and the fast integer path (histogram median and clipped count, lookup
normalisation) equals the reference (np.percentile, a comparison, float32 normalise) bit for bit, end to
end through prepare_subject too."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from data_prep.intensity import (
    CEILING_MULTIPLE,
    REFERENCE_LEVEL,
    IntensityScaling,
    fit_scaling,
    histogram_percentiles,
    normalisation_lookup,
    normalise,
    normalise_by_lookup,
    uses_lookup,
)
from data_prep.volumes import VolumeError, load_volume, prepare_subject

INTEGER_DTYPES = [np.int8, np.uint8, np.int16, np.uint16]
PERCENTILES = [0.0, 0.5, 13.7, 50.0, 99.5, 100.0]


def _random_integers(rng, dtype, size) -> np.ndarray:
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, size=size, endpoint=True, dtype=dtype)


@pytest.mark.parametrize("dtype", INTEGER_DTYPES)
@pytest.mark.parametrize("size", [1, 2, 3, 1000, 100_001])
def test_histogram_percentiles_equal_numpy(dtype, size):
    rng = np.random.default_rng(size)
    values = _random_integers(rng, dtype, size)
    expected = np.percentile(values.astype(np.float64), PERCENTILES)
    assert histogram_percentiles(values, PERCENTILES) == expected.tolist()


def test_histogram_percentiles_with_many_repeats_and_narrow_range():
    """MRI-like: a few hundred distinct values, each repeated thousands of times."""
    values = np.random.default_rng(0).poisson(300, size=200_000).astype(np.int16)
    expected = np.percentile(values.astype(np.float64), PERCENTILES)
    assert histogram_percentiles(values, PERCENTILES) == expected.tolist()


def test_histogram_percentiles_refuse_percentiles_outside_0_100():
    with pytest.raises(ValueError, match=r"within \[0, 100\]"):
        histogram_percentiles(np.arange(10, dtype=np.int16), [-1.0])
    with pytest.raises(ValueError, match=r"within \[0, 100\]"):
        histogram_percentiles(np.arange(10, dtype=np.int16), [50.0, 101.0])


def test_histogram_percentiles_refuse_other_dtypes():
    with pytest.raises(TypeError, match="int32"):
        histogram_percentiles(np.arange(10, dtype=np.int32), [50.0])
    assert not uses_lookup(np.int32) and not uses_lookup(np.float32) and uses_lookup(np.uint16)


@pytest.mark.parametrize("dtype", [np.int16, np.uint16, np.uint8])
def test_fit_scaling_on_integers_equals_the_float_reference(dtype):
    rng = np.random.default_rng(3)
    volume = rng.integers(0, 200 if dtype == np.uint8 else 3000, size=(30, 20, 10)).astype(dtype)
    mask = rng.random(volume.shape) > 0.3
    fast = fit_scaling(volume, mask)
    reference = fit_scaling(volume.astype(np.float32), mask)
    assert fast == reference


def test_fit_scaling_does_not_depend_on_memory_layout():
    """The selection walks views in memory order: flipped and transposed views give the same scaling."""
    rng = np.random.default_rng(4)
    volume = np.asfortranarray(rng.integers(-50, 900, size=(16, 12, 8)).astype(np.int16))
    mask = np.asfortranarray(rng.random(volume.shape) > 0.5)
    expected = fit_scaling(np.ascontiguousarray(volume), np.ascontiguousarray(mask))
    for view in (
        lambda a: a[::-1, :, ::-1],
        lambda a: a.transpose(2, 0, 1),
        lambda a: a[:, ::-1].transpose(1, 2, 0)[2:, 1:],
    ):
        assert fit_scaling(view(volume), view(mask)) == fit_scaling(
            np.ascontiguousarray(view(volume)), np.ascontiguousarray(view(mask))
        )
    assert fit_scaling(volume.T, mask.T) == expected


def test_fit_scaling_errors_name_the_problem():
    volume = np.full((4, 4, 4), 7, dtype=np.int16)
    with pytest.raises(VolumeError, match="constant intensity 7"):
        fit_scaling(volume, np.ones(volume.shape, bool))
    with pytest.raises(VolumeError, match="constant intensity 7"):
        fit_scaling(volume.astype(np.float32), np.ones(volume.shape, bool))
    with pytest.raises(VolumeError, match="empty mask"):
        fit_scaling(volume, np.zeros(volume.shape, bool))
    signed = np.arange(-40, 24, dtype=np.int16).reshape(4, 4, 4)  # median -8.5
    for stored in (signed, signed.astype(np.float32)):
        with pytest.raises(VolumeError, match="median intensity -8.5 within the mask is not positive"):
            fit_scaling(stored, np.ones(signed.shape, bool))


def _skewed_volume(rng, dtype, shape) -> np.ndarray:
    """MRI-like: a healthy bulk around 300 and a bright tail (a lesion) reaching past 2.5 x the median."""
    bulk = rng.poisson(300, size=shape)
    tail = rng.random(shape) < 0.05
    values = np.where(tail, rng.integers(300, 3000, size=shape), bulk)
    if dtype in (np.int8, np.uint8):
        values = values * 40 // 300  # a bulk around 40: the tail still passes 2.5 x 40 within 8 bits
    return np.clip(values, 1, np.iinfo(dtype).max).astype(dtype)


@pytest.mark.parametrize("dtype", INTEGER_DTYPES)
def test_fit_scaling_is_the_healthy_median_definition(dtype):
    """Against numpy's own median and a count, not the code under test: low 0, high 2.5 x the median,
    the share of masked voxels above high, and the median maps onto 0.4 (1 for 2.5 x median)."""
    rng = np.random.default_rng(8)
    volume = _skewed_volume(rng, dtype, (24, 20, 12))
    mask = rng.random(volume.shape) > 0.25
    inside = volume[mask].astype(np.float64)
    median = float(np.median(inside))
    scaling = fit_scaling(volume, mask)
    assert scaling.low == 0.0 and scaling.median == median
    assert scaling.high == CEILING_MULTIPLE * median
    assert scaling.clipped_fraction == np.count_nonzero(inside > CEILING_MULTIPLE * median) / inside.size
    assert 0.0 < scaling.clipped_fraction < 0.05
    probe = np.array([[[median, CEILING_MULTIPLE * median, 10 * median]]], dtype=np.float64)
    mapped = normalise(probe, scaling, np.ones(probe.shape, bool))
    assert mapped.ravel() == pytest.approx([REFERENCE_LEVEL, 1.0, 1.0], abs=1e-6)
    assert IntensityScaling.from_dict(scaling.to_dict()) == scaling


def test_clipped_fraction_counts_values_strictly_above_the_ceiling():
    """Median exactly 200: a value of 500 (= 2.5 x 200) maps onto 1 unclipped, 501 is clipped."""
    values = np.array([100] * 5 + [200] + [300] * 3 + [500, 501], dtype=np.int16).reshape(1, 1, -1)
    mask = np.ones(values.shape, bool)
    for stored in (values, values.astype(np.float32), values.astype(np.float64)):
        scaling = fit_scaling(stored, mask)
        assert (scaling.median, scaling.high, scaling.clipped_fraction) == (200.0, 500.0, 1 / 11)


@pytest.mark.parametrize("dtype", INTEGER_DTYPES)
def test_fit_scaling_fast_path_equals_the_reference_with_a_clipped_tail(dtype):
    rng = np.random.default_rng(9)
    volume = _skewed_volume(rng, dtype, (30, 20, 10))
    mask = rng.random(volume.shape) > 0.3
    fast = fit_scaling(volume, mask)
    assert fast.clipped_fraction > 0
    for reference_dtype in (np.float32, np.float64):
        assert fast == fit_scaling(volume.astype(reference_dtype), mask)


@pytest.mark.parametrize("dtype", INTEGER_DTYPES)
@pytest.mark.parametrize("out_dtype", [np.float16, np.float32])
def test_lookup_normalisation_is_bit_identical_to_the_reference(dtype, out_dtype):
    rng = np.random.default_rng(5)
    volume = _random_integers(rng, dtype, (20, 18, 6))
    mask = rng.random(volume.shape) > 0.2
    low, high = (-30.0, 90.0) if np.iinfo(dtype).min < 0 else (20.0, 180.0)
    scaling = IntensityScaling(low=low, high=high + 0.37)  # a scale that is not a power of two
    expected = normalise(volume, scaling, mask).astype(out_dtype)
    fast = normalise_by_lookup(volume, normalisation_lookup(dtype, scaling, out_dtype))
    fast[~mask] = 0
    assert fast.dtype == out_dtype
    assert np.array_equal(fast.view(f"u{fast.itemsize}"), expected.view(f"u{expected.itemsize}"))
    # Into a strided output, from a reoriented view, as prepare_subject uses it.
    out = np.zeros((6, 24, 20), out_dtype)
    normalise_by_lookup(
        volume[::-1].transpose(2, 0, 1),
        normalisation_lookup(dtype, scaling, out_dtype),
        out=out[:, 2:22, 1:19],
    )
    unmasked = normalise(volume, scaling, np.ones(volume.shape, bool)).astype(out_dtype)
    assert np.array_equal(out[:, 2:22, 1:19], unmasked[::-1].transpose(2, 0, 1))
    assert not out[:, :2].any() and not out[:, :, :1].any()


def test_lookup_refuses_wide_dtypes():
    with pytest.raises(TypeError, match="float32"):
        normalisation_lookup(np.float32, IntensityScaling(0.0, 1.0))


def test_integer_and_float_files_prepare_to_identical_shards(tmp_path):
    """The same intensities stored as int16 (fast path) and as float32 (reference path) give the same
    float16 slices bit for bit, the same scaling (median, clipped share) and the same label map."""
    rng = np.random.default_rng(6)
    shape = (36, 40, 20)
    grid = np.indices(shape).astype(np.float64)
    inside = (((grid - (np.asarray(shape) / 2)[:, None, None, None]) / 14.0) ** 2).sum(0) < 1
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])  # LPS: prepare_subject works on flipped views
    files = {"int16": {}, "float32": {}}
    # FLAIR has negative values (clipped to 0) and a third of its voxels above 2.5 x its median (clipped
    # to 1): both paths must count the same clipped share.
    for modality, (lowest, highest) in {"t1": (1, 400), "t2": (1, 800), "flair": (-200, 300)}.items():
        data = np.where(inside, rng.integers(lowest, highest, size=shape), 0).astype(np.int16)
        for stored in files:
            path = tmp_path / stored / f"BraTS2021_00001_{modality}.nii.gz"
            path.parent.mkdir(exist_ok=True)
            nib.save(nib.Nifti1Image(data.astype(stored), affine), path)
            files[stored][modality] = path
    seg = np.where(inside, rng.choice([0, 1, 2, 4], size=shape), 0).astype(np.uint8)
    for stored in files:
        files[stored]["seg"] = tmp_path / stored / "BraTS2021_00001_seg.nii.gz"
        nib.save(nib.Nifti1Image(seg.astype(stored), affine), files[stored]["seg"])
    assert load_volume(files["int16"]["t1"], keep_integers=True).data.dtype == np.int16
    assert load_volume(files["float32"]["t1"], keep_integers=True).data.dtype == np.float32

    prepared = {
        stored: prepare_subject(
            paths, dataset="brats", modalities=("t1", "t1ce", "t2", "flair"), size=32, dtype=np.float16
        )
        for stored, paths in files.items()
    }
    fast, reference = prepared["int16"], prepared["float32"]
    assert fast.scaling == reference.scaling and fast.scaling["flair"].low == 0
    assert 0.2 < fast.scaling["flair"].clipped_fraction < 0.5 and fast.scaling["t1"].clipped_fraction == 0
    assert np.array_equal(fast.images.view(np.uint16), reference.images.view(np.uint16))
    assert np.array_equal(fast.mask, reference.mask) and np.array_equal(fast.seg, reference.seg)
    assert fast.images[:, fast.mask == 0].max() == 0 and fast.images[2].max() > 0


def test_wide_integer_files_are_loaded_as_float(tmp_path):
    """int32 gains nothing from staying integer, and numpy interpolates integers in their own dtype."""
    data = np.array([-2_000_000_000, 5, 2_000_000_000, 7], dtype=np.int32).reshape(1, 2, 2)
    path = tmp_path / "wide.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    loaded = load_volume(path, keep_integers=True)
    assert loaded.data.dtype == np.float32
    scaling = fit_scaling(loaded.data, np.ones(data.shape, bool))
    assert (scaling.low, scaling.median, scaling.high, scaling.clipped_fraction) == (0.0, 6.0, 15.0, 0.25)


def test_scaled_integer_files_are_loaded_as_float(tmp_path):
    """A slope or intercept in the header means the stored integers are not the intensities."""
    data = np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4) + 1
    image = nib.Nifti1Image(data, np.eye(4))
    image.header.set_slope_inter(0.5, 10.0)
    path = tmp_path / "scaled.nii.gz"
    nib.save(image, path)
    loaded = load_volume(path, keep_integers=True)
    assert loaded.data.dtype == np.float32
    assert np.allclose(loaded.data, data * 0.5 + 10.0)


@pytest.mark.parametrize("dtype", [">i2", ">u2", "<i2"])
def test_fast_path_reads_either_byte_order(dtype):
    """NIfTI files may be big-endian; the tables are indexed by the bytes as they are, so both agree."""
    rng = np.random.default_rng(7)
    native = rng.integers(-300 if "i" in dtype else 0, 3000, size=(12, 10, 8)).astype(
        np.dtype(dtype).newbyteorder("=")
    )
    volume = native.astype(dtype)
    mask = rng.random(volume.shape) > 0.3
    assert fit_scaling(volume, mask) == fit_scaling(native.astype(np.float64), mask)
    scaling = fit_scaling(native, mask)
    fast = normalise_by_lookup(volume, normalisation_lookup(volume.dtype, scaling, np.float16))
    expected = normalise(native, scaling, np.ones(volume.shape, bool)).astype(np.float16)
    assert np.array_equal(fast.view(np.uint16), expected.view(np.uint16))
