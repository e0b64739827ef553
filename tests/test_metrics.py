"""medgan.metrics against scikit-image and direct numpy, over sizes, ranges, dtypes, batches and masks."""

import math
import re

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from medgan import metrics

SIZES_2D = [(11, 13), (33, 47), (64, 64)]  # SSIM needs >= 11 pixels per axis, like scikit-image
SIZES_ANY = [(7, 9), *SIZES_2D]
RANGES = [1.0, 2.0, 255.0]
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")),
]
# (dtype, atol for SSIM/MAE, rtol for PSNR): float32 computes in float32, float64 in float64.
TORCH_TOLERANCES = [(torch.float32, 1e-5, 1e-5), (torch.float64, 1e-10, 1e-12)]


def make_pair(shape, data_range, seed=0):
    """A target in [0, R] and a noisy, clipped prediction of it: the metrics' intended input."""
    rng = np.random.default_rng(seed)
    target = rng.random(shape) * data_range
    pred = np.clip(target + rng.normal(0.0, 0.1 * data_range, shape), 0.0, data_range)
    return pred, target


def make_mask(shape, seed=1):
    """A bool mask with about half the pixels set and at least one in every image."""
    mask = np.random.default_rng(seed).random(shape) < 0.5
    mask[..., 0, 0] = True
    return mask


def skimage_ssim(pred, target, data_range, full=False):
    """The field's reference: Wang et al. 2004 settings of scikit-image."""
    return structural_similarity(
        pred,
        target,
        data_range=data_range,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        full=full,
    )


@pytest.mark.parametrize("data_range", RANGES)
@pytest.mark.parametrize("shape", SIZES_2D + [(12, 13, 14)])
def test_numpy_float64_equals_skimage_exactly(shape, data_range):
    pred, target = make_pair(shape, data_range)
    spatial_dims = len(shape)
    assert metrics.ssim(pred, target, data_range, spatial_dims=spatial_dims) == skimage_ssim(
        pred, target, data_range
    )
    assert metrics.psnr(pred, target, data_range, spatial_dims=spatial_dims) == peak_signal_noise_ratio(
        target, pred, data_range=data_range
    )


@pytest.mark.parametrize("data_range", RANGES)
@pytest.mark.parametrize("shape", SIZES_ANY)
def test_psnr_and_mae_equal_direct_numpy(shape, data_range):
    pred, target = make_pair(shape, data_range)
    mse = np.mean((pred - target) ** 2)
    np.testing.assert_allclose(
        metrics.psnr(pred, target, data_range), 10 * np.log10(data_range**2 / mse), rtol=1e-13
    )
    np.testing.assert_allclose(
        metrics.mae(pred, target, data_range), np.mean(np.abs(pred - target)), rtol=1e-13
    )


@pytest.mark.parametrize("data_range", RANGES)
@pytest.mark.parametrize("shape", SIZES_2D)
def test_numpy_float32_is_computed_in_float64(shape, data_range):
    pred, target = (a.astype(np.float32) for a in make_pair(shape, data_range))
    got = metrics.ssim(pred, target, data_range)
    assert isinstance(got, np.float64)
    assert got == skimage_ssim(pred.astype(np.float64), target.astype(np.float64), data_range)
    # scikit-image itself stays in float32, so it agrees only to float32 rounding.
    np.testing.assert_allclose(got, skimage_ssim(pred, target, data_range), atol=1e-5)
    np.testing.assert_allclose(
        metrics.psnr(pred, target, data_range),
        peak_signal_noise_ratio(target, pred, data_range=data_range),
        rtol=1e-5,
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("dtype", "atol", "rtol"), TORCH_TOLERANCES)
@pytest.mark.parametrize("data_range", RANGES)
@pytest.mark.parametrize("shape", SIZES_2D + [(12, 13, 14)])
def test_torch_equals_numpy_reference(shape, data_range, dtype, atol, rtol, device):
    pred, target = make_pair(shape, data_range)
    mask = make_mask(shape)
    spatial_dims = len(shape)
    tp, tt = (torch.tensor(a, dtype=dtype, device=device) for a in (pred, target))
    for fn in (metrics.ssim, metrics.psnr, metrics.mae):
        for m in (None, mask):
            tm = None if m is None else torch.tensor(m, device=device)
            got = fn(tp, tt, data_range, mask=tm, spatial_dims=spatial_dims)
            assert isinstance(got, torch.Tensor)
            assert got.dtype == dtype and got.device.type == device and got.shape == ()
            want = fn(pred, target, data_range, mask=m, spatial_dims=spatial_dims)
            if fn is metrics.psnr:
                np.testing.assert_allclose(got.item(), want, rtol=rtol)
            else:
                # MAE scales with the range; SSIM does not.
                scale = data_range if fn is metrics.mae else 1.0
                np.testing.assert_allclose(got.item(), want, rtol=0, atol=atol * scale)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_torch_low_precision_is_computed_in_float32(dtype):
    pred, target = make_pair((33, 47), 1.0)
    got = metrics.ssim(torch.tensor(pred, dtype=dtype), torch.tensor(target, dtype=dtype))
    assert got.dtype == torch.float32
    rounded = [torch.tensor(a, dtype=dtype).double().numpy() for a in (pred, target)]
    np.testing.assert_allclose(got.item(), metrics.ssim(*rounded), atol=1e-5)


@pytest.mark.parametrize(("length", "pad"), [(4, 2), (11, 5), (2, 5), (1, 3)])
def test_torch_padding_is_half_sample_symmetric(length, pad):
    # scipy's "reflect" repeats the edge pixel (numpy's "symmetric"); torch's "reflect" padding does not.
    index = metrics._symmetric_index(length, pad, torch.device("cpu"))
    np.testing.assert_array_equal(index.numpy(), np.pad(np.arange(length), pad, mode="symmetric"))


@pytest.mark.parametrize("data_range", RANGES)
@pytest.mark.parametrize("shape", SIZES_2D)
def test_masked_ssim_is_mean_of_full_map_over_mask(shape, data_range):
    pred, target = make_pair(shape, data_range)
    mask = make_mask(shape)
    _, full_map = skimage_ssim(pred, target, data_range, full=True)
    np.testing.assert_allclose(
        metrics.ssim(pred, target, data_range, mask=mask), full_map[mask].mean(), rtol=1e-13
    )
    # A 0/1 float mask means the same as the bool one.
    assert metrics.ssim(pred, target, data_range, mask=mask.astype(np.float32)) == metrics.ssim(
        pred, target, data_range, mask=mask
    )


@pytest.mark.parametrize("data_range", RANGES)
@pytest.mark.parametrize("shape", SIZES_ANY)
def test_masked_mae_and_psnr_equal_direct_numpy(shape, data_range):
    pred, target = make_pair(shape, data_range)
    mask = make_mask(shape)
    diff = (pred - target)[mask]
    np.testing.assert_allclose(
        metrics.mae(pred, target, data_range, mask=mask), np.abs(diff).mean(), rtol=1e-13
    )
    np.testing.assert_allclose(
        metrics.psnr(pred, target, data_range, mask=mask),
        10 * np.log10(data_range**2 / np.mean(diff**2)),
        rtol=1e-13,
    )


def test_mask_ignores_nonfinite_values_outside_it():
    pred, target = make_pair((33, 47), 1.0)
    mask = make_mask((33, 47))
    spoiled = pred.copy()
    spoiled[~mask] = np.nan
    for fn in (metrics.mae, metrics.psnr):
        assert fn(spoiled, target, mask=mask) == fn(pred, target, mask=mask)
        assert fn(
            torch.tensor(spoiled), torch.tensor(target), mask=torch.tensor(mask)
        ).item() == pytest.approx(fn(pred, target, mask=mask), rel=1e-12)


@pytest.mark.parametrize("use_torch", [False, True])
@pytest.mark.parametrize("per_sample_mask", [None, False, True])
@pytest.mark.parametrize(("batch", "image", "spatial_dims"), [((3, 2), (33, 47), 2), ((2,), (12, 13, 14), 3)])
def test_batch_equals_loop_over_images(batch, image, spatial_dims, per_sample_mask, use_torch):
    pred, target = make_pair(batch + image, 1.0)
    mask = None if per_sample_mask is None else make_mask(batch + image if per_sample_mask else image)
    kind = torch.tensor if use_torch else np.asarray
    for fn in (metrics.ssim, metrics.psnr, metrics.mae):
        got = fn(
            kind(pred), kind(target), mask=None if mask is None else kind(mask), spatial_dims=spatial_dims
        )
        assert tuple(got.shape) == batch
        for index in np.ndindex(*batch):
            image_mask = None if mask is None else (mask[index] if per_sample_mask else mask)
            want = fn(pred[index], target[index], mask=image_mask, spatial_dims=spatial_dims)
            np.testing.assert_allclose(float(got[index]), want, rtol=1e-12)


def test_spatial_dims_3_is_not_a_stack_of_slices():
    pred, target = make_pair((12, 13, 14), 1.0)
    volume = metrics.ssim(pred, target, spatial_dims=3)
    slices = metrics.ssim(pred, target, spatial_dims=2)
    assert np.ndim(volume) == 0 and slices.shape == (12,)
    assert volume != pytest.approx(slices.mean())


@pytest.mark.parametrize("use_torch", [False, True])
def test_identical_images(use_torch):
    image = make_pair((2, 33, 47), 1.0)[1]
    image = torch.tensor(image) if use_torch else image
    np.testing.assert_array_equal(np.asarray(metrics.ssim(image, image)), [1.0, 1.0])
    np.testing.assert_array_equal(np.asarray(metrics.psnr(image, image)), [math.inf, math.inf])
    np.testing.assert_array_equal(np.asarray(metrics.mae(image, image)), [0.0, 0.0])


def test_identical_images_give_inf_psnr_without_warning():
    image = make_pair((33, 47), 1.0)[1]
    with np.errstate(all="raise"):
        assert metrics.psnr(image, image) == math.inf


@pytest.mark.parametrize("use_torch", [False, True])
def test_empty_mask_gives_nan_for_that_image_only(use_torch):
    pred, target = make_pair((2, 33, 47), 1.0)
    mask = make_mask((2, 33, 47))
    mask[1] = False
    kind = torch.tensor if use_torch else np.asarray
    for fn in (metrics.ssim, metrics.psnr, metrics.mae):
        got = np.asarray(fn(kind(pred), kind(target), mask=kind(mask)))
        assert np.isfinite(got[0]) and np.isnan(got[1])


def test_numpy_result_kinds():
    pred, target = make_pair((2, 33, 47), 1.0)
    assert isinstance(metrics.psnr(pred[0], target[0]), float)
    batched = metrics.mae(pred, target)
    assert isinstance(batched, np.ndarray) and batched.dtype == np.float64 and batched.shape == (2,)


@pytest.mark.parametrize("use_torch", [False, True])
def test_shape_mismatch_names_both_shapes(use_torch):
    kind = torch.zeros if use_torch else np.zeros
    for fn in (metrics.ssim, metrics.psnr, metrics.mae):
        with pytest.raises(ValueError, match=r"pred \(2, 33, 47\), target \(2, 47, 33\)"):
            fn(kind((2, 33, 47)), kind((2, 47, 33)))


@pytest.mark.parametrize("use_torch", [False, True])
@pytest.mark.parametrize("mask_shape", [(47, 33), (3, 33, 47), (1, 2, 33, 47)])
def test_mask_that_does_not_broadcast_names_both_shapes(mask_shape, use_torch):
    kind = torch.zeros if use_torch else np.zeros
    pattern = rf"mask shape \({', '.join(map(str, mask_shape))}\) .*\(2, 33, 47\)"
    for fn in (metrics.ssim, metrics.psnr, metrics.mae):
        with pytest.raises(ValueError, match=pattern):
            fn(
                kind((2, 33, 47)),
                kind((2, 33, 47)),
                mask=kind(mask_shape, dtype=torch.bool if use_torch else bool),
            )


@pytest.mark.parametrize("use_torch", [False, True])
def test_non_binary_mask_is_refused(use_torch):
    mask = np.full((33, 47), 0.5)
    kind = torch.tensor if use_torch else np.asarray
    with pytest.raises(ValueError, match="only 0 and 1"):
        metrics.mae(kind(np.zeros((33, 47))), kind(np.zeros((33, 47))), mask=kind(mask))


@pytest.mark.parametrize("data_range", [0, -1.0, math.nan, math.inf, None, "1", True])
def test_bad_data_range_is_named(data_range):
    pred, target = make_pair((33, 47), 1.0)
    for fn in (metrics.ssim, metrics.psnr, metrics.mae):
        with pytest.raises(
            ValueError, match=rf"data_range must be a positive .*got {re.escape(repr(data_range))}"
        ):
            fn(pred, target, data_range=data_range)


def test_other_argument_errors():
    pred, target = make_pair((7, 9), 1.0)
    with pytest.raises(ValueError, match=r"at least 11 pixels.*\(7, 9\)"):
        metrics.ssim(pred, target)
    with pytest.raises(ValueError, match="spatial_dims must be 1, 2 or 3"):
        metrics.psnr(pred, target, spatial_dims=4)
    with pytest.raises(ValueError, match="spatial_dims=3"):
        metrics.psnr(pred, target, spatial_dims=3)
    with pytest.raises(TypeError, match="both be torch tensors or both numpy"):
        metrics.psnr(torch.tensor(pred), target)


def test_summarize_skips_and_counts_nans():
    values = np.array([1.0, np.nan, 3.0, 2.0, np.nan])
    summary = metrics.summarize(values)
    assert summary == {"mean": 2.0, "std": 1.0, "median": 2.0, "n": 3, "n_nan": 2}
    assert metrics.summarize(torch.tensor(values)) == summary
    empty = metrics.summarize([math.nan])
    assert empty["n"] == 0 and empty["n_nan"] == 1 and math.isnan(empty["mean"]) and math.isnan(empty["std"])
    single = metrics.summarize([0.5])
    assert single["mean"] == 0.5 and math.isnan(single["std"])


def test_through_plane_error_by_hand():
    # one row of two voxels, three slices: the synthesized change from slice to slice against the real one
    pred = np.array([[[0.0, 0.0]], [[1.0, 0.0]], [[1.0, 1.0]]])
    real = np.array([[[0.0, 0.0]], [[0.0, 0.0]], [[1.0, 1.0]]])
    # |(p1 - p0) - (r1 - r0)| = |1 - 0|, |0 - 0|; |(p2 - p1) - (r2 - r1)| = |0 - 1|, |1 - 1|
    assert metrics.through_plane_error(pred, real) == 0.5
    # without voxel (z 1, x 0) neither pair of the first column is inside: only the second column's zeros
    mask = np.ones(pred.shape, bool)
    mask[1, 0, 0] = False
    assert metrics.through_plane_error(pred, real, mask) == 0.0
    assert np.isnan(metrics.through_plane_error(pred[:1], real[:1]))


def test_through_plane_error_sees_flicker_that_each_slice_hides():
    rng = np.random.default_rng(0)
    real = rng.random((8, 16, 16)) * 0.5
    flicker = real + np.where(np.arange(8) % 2, 0.1, -0.1)[:, None, None]
    # every slice is off by 0.1 (what a per-slice MAE sees); the change between slices is off by 0.2
    assert np.isclose(float(metrics.mae(flicker, real, spatial_dims=3)), 0.1)
    assert np.isclose(metrics.through_plane_error(flicker, real), 0.2)
    assert metrics.through_plane_error(real + 0.1, real) < 1e-12


@pytest.mark.parametrize(("plane", "fixed_axis"), [("sagittal", 1), ("coronal", 2)])
def test_plane_ssim_is_scikit_images_map_over_the_mask(plane, fixed_axis):
    rng = np.random.default_rng(1)
    real = rng.random((12, 14, 13))
    pred = np.clip(real + rng.normal(0, 0.1, real.shape), 0, 1)
    mask = np.zeros(real.shape, bool)
    mask[2:10, 3:12, 1:11] = True
    values = []
    for index in range(real.shape[fixed_axis]):
        take = [slice(None)] * 3
        take[fixed_axis] = index
        _, ssim_map = structural_similarity(
            pred[tuple(take)], real[tuple(take)], data_range=1.0, gaussian_weights=True, sigma=1.5,
            use_sample_covariance=False, full=True,
        )  # fmt: skip
        values.append(ssim_map[mask[tuple(take)]])
    expected = np.concatenate(values).mean()
    assert abs(metrics.plane_ssim(pred, real, plane, mask) - expected) < 1e-10
    assert metrics.plane_ssim(real, real, plane, mask) == pytest.approx(1.0)
    assert np.isnan(metrics.plane_ssim(pred[:10], real[:10], plane, mask[:10]))
    assert np.isnan(metrics.plane_ssim(pred, real, plane, np.zeros_like(mask)))
