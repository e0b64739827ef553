"""Image-quality metrics for synthesized MRI contrasts: PSNR, SSIM and MAE, per image.

Users publish tables made with these functions, so each follows the field's standard definition and
states it here. ``pred`` is the synthesized image, ``target`` the acquired one.

Data range
    ``data_range`` is the width of the intensity range the images live in (maximum possible value minus
    minimum possible value), not the range observed in one image. Our images are normalised into
    ``[0, 1]`` before they reach the model and the metrics, so ``data_range=1.0`` (the default). Pass
    255 for 8-bit images, 2 for ``[-1, 1]`` images. The seed project computed PSNR with range 2 on
    ``[-1, 1]`` images but SSIM with range 1, so neither matched the papers it was compared with:
    rescale to ``[0, 1]`` and use 1 for both.

Definitions (``R = data_range``; a sum or mean "over the image" runs over the last ``spatial_dims``
axes, and over only the pixels where ``mask`` is true when a mask is given)
    MAE   = mean |pred - target|, in intensity units (a fraction of ``R`` for our images).
    PSNR  = 10 log10(R^2 / MSE) in dB, MSE = mean (pred - target)^2, exactly as scikit-image's
            ``peak_signal_noise_ratio(target, pred, data_range=R)``. MSE == 0 (identical images) gives
            ``+inf``.
    SSIM  = Wang et al. 2004, IEEE TIP 13:600-612, exactly as scikit-image's
            ``structural_similarity(pred, target, data_range=R, gaussian_weights=True, sigma=1.5,
            use_sample_covariance=False)``: local means, variances and covariance weighted by a
            normalised Gaussian window (sigma 1.5 pixels, truncated at 3.5 sigma: 11 taps per axis,
            separable), population (1/N) covariance, C1 = (0.01 R)^2, C2 = (0.03 R)^2, image borders
            extended by half-sample symmetric reflection (scipy.ndimage mode "reflect": d c b a | a b c d).
            Without a mask the value is the mean of the SSIM map after cropping (11 - 1) // 2 = 5 pixels
            from every border (the pixels whose window reaches past the image), as scikit-image does.
            With a mask it is the mean of the full, uncropped SSIM map over the mask (the brain, or a
            tumour region, may touch the crop band). Every spatial axis must be at least 11 pixels.
            Range [-1, 1], 1 for identical images.

Through-plane consistency of an axial stack ``[Z, H, W]`` (z the slice index; H the x axis, left to
right, and W the y axis, posterior to anterior: data_prep's slice layout), numpy only
    through-plane error = mean |(p[z+1] - p[z]) - (r[z+1] - r[z])| over the pairs of voxels on adjacent
            slices that are both inside the mask: how much the synthesized stack's slice-to-slice change
            departs from the real one's (0 for a perfect stack; slice-by-slice flicker raises it).
    sagittal / coronal SSIM = the SSIM map above computed on each sagittal plane ``[Z, W]`` (fixed x) or
            coronal plane ``[Z, H]`` (fixed y), averaged over every mask voxel of the stack; needs at
            least 11 slices.

Shapes and types
    ``pred`` and ``target`` have the same shape ``(*batch, *image)`` where ``image`` is the last
    ``spatial_dims`` axes (2 for slices ``(H, W)``, 3 for volumes ``(D, H, W)``) and ``batch`` is any
    number of leading axes (e.g. ``(B, C)``). The result has shape ``batch``: one value per image, as in
    MONAI; aggregating over images is :func:`summarize`'s job.
    ``mask`` (bool, or numbers that are all 0 or 1) broadcasts to ``pred.shape`` without adding axes:
    ``(H, W)`` for one mask shared by the batch, ``(B, 1, H, W)`` for one per sample. An image whose mask
    is empty gets NaN, which :func:`summarize` skips and counts.
    numpy inputs (any real dtype) are computed in float64 and give a float64 array, or an ``np.float64``
    scalar when there is no batch axis. torch inputs stay on their device (CPU or CUDA, no trip through
    numpy) and give a detached tensor (these are metrics, not losses): float64 inputs are computed in
    float64, every other dtype in float32.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

# Wang et al. 2004 constants, and the window scikit-image uses with gaussian_weights=True.
SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5
SSIM_RADIUS = int(SSIM_TRUNCATE * SSIM_SIGMA + 0.5)  # 5: scipy.ndimage's rounding of the radius
SSIM_WIN_SIZE = 2 * SSIM_RADIUS + 1  # 11 taps
SSIM_K1 = 0.01
SSIM_K2 = 0.03

Array = Any  # np.ndarray or torch.Tensor; the kind of ``pred`` decides the kind of the result


def psnr(
    pred: Array, target: Array, data_range: float = 1.0, mask: Array | None = None, spatial_dims: int = 2
):
    """Peak signal-to-noise ratio in dB, one value per image: ``10 log10(data_range^2 / MSE)``.

    pred, target: ``(*batch, *image)``, same shape, intensities in ``[0, data_range]`` (``[0, 1]`` for
    our images). mask: broadcastable to ``pred.shape``; the MSE runs over the masked pixels only.
    Returns shape ``batch``; ``+inf`` where the images are identical (MSE == 0), NaN where the mask is
    empty. Typical values for synthesized MRI: 20-35 dB.
    """
    pred, target, mask, r, is_torch = _prepare(pred, target, data_range, mask, spatial_dims)
    diff = pred - target
    mse = _image_mean(diff * diff, mask, spatial_dims, is_torch)
    if is_torch:
        return 10 * torch.log10(r**2 / mse)
    with np.errstate(divide="ignore"):  # MSE == 0 is a legitimate +inf, not a warning
        return _scalar_if_0d(10 * np.log10(r**2 / mse))


def mae(
    pred: Array, target: Array, data_range: float = 1.0, mask: Array | None = None, spatial_dims: int = 2
):
    """Mean absolute error ``mean |pred - target|``, one value per image, in intensity units.

    Same shapes as :func:`psnr`. ``data_range`` does not scale the result (MAE of ``[0, 1]`` images is
    a fraction of the range already); it is checked and accepted so the three metrics share one
    signature. Returns shape ``batch``, in ``[0, data_range]`` for in-range images; NaN where the mask
    is empty.
    """
    pred, target, mask, _, is_torch = _prepare(pred, target, data_range, mask, spatial_dims)
    diff = (pred - target).abs() if is_torch else np.abs(pred - target)
    result = _image_mean(diff, mask, spatial_dims, is_torch)
    return result if is_torch else _scalar_if_0d(result)


def ssim(
    pred: Array, target: Array, data_range: float = 1.0, mask: Array | None = None, spatial_dims: int = 2
):
    """Structural similarity (Wang et al. 2004, Gaussian window sigma 1.5), one value per image.

    Same shapes as :func:`psnr`; every image axis must be at least 11 pixels (the window). Without a
    mask: mean of the SSIM map with a 5-pixel border cropped (scikit-image's value). With a mask: mean
    of the full SSIM map over the mask. Returns shape ``batch``, in ``[-1, 1]``; NaN where the mask is
    empty.
    """
    pred, target, mask, r, is_torch = _prepare(pred, target, data_range, mask, spatial_dims)
    image_shape = tuple(pred.shape[-spatial_dims:])
    if min(image_shape) < SSIM_WIN_SIZE:
        raise ValueError(
            f"ssim needs every image axis to be at least {SSIM_WIN_SIZE} pixels (the Gaussian window); "
            f"got image shape {image_shape} (pred shape {tuple(pred.shape)}, spatial_dims={spatial_dims})"
        )
    ssim_map = (
        _ssim_map_torch(pred, target, r, spatial_dims)
        if is_torch
        else _ssim_map_numpy(pred, target, r, spatial_dims)
    )
    if mask is not None:
        result = _image_mean(ssim_map, mask, spatial_dims, is_torch)
        return result if is_torch else _scalar_if_0d(result)
    # Crop the band whose windows reach past the border, as scikit-image does, before averaging.
    pad = (SSIM_WIN_SIZE - 1) // 2
    cropped = ssim_map[(...,) + tuple(slice(pad, n - pad) for n in image_shape)]
    axes = tuple(range(-spatial_dims, 0))
    if is_torch:
        return cropped.mean(dim=axes)
    return _scalar_if_0d(cropped.mean(axis=axes, dtype=np.float64))


PLANES = {"sagittal": 1, "coronal": 2}  # the axis of an axial stack [Z, H, W] a plane holds fixed


def through_plane_error(pred: np.ndarray, target: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Mean |(p[z+1] - p[z]) - (r[z+1] - r[z])| over the voxel pairs of adjacent axial slices that are both
    inside ``mask``, in intensity units. pred, target: ``[Z, H, W]`` in ``[0, 1]``; mask: bool
    ``[Z, H, W]`` (None: every voxel). NaN when no pair is inside the mask (fewer than 2 slices)."""
    pred, target = np.asarray(pred, np.float64), np.asarray(target, np.float64)
    _check_stack(pred, target, mask, "through_plane_error")
    pairs = np.ones(pred.shape, bool) if mask is None else np.asarray(mask, bool)
    pairs = pairs[1:] & pairs[:-1]
    if not pairs.any():
        return math.nan
    change_error = np.abs(np.diff(pred, axis=0) - np.diff(target, axis=0))
    return float(change_error[pairs].mean())


def plane_ssim(
    pred: np.ndarray, target: np.ndarray, plane: str, mask: np.ndarray | None = None, data_range: float = 1.0
) -> float:
    """SSIM (as :func:`ssim`) on the sagittal or coronal planes of an axial stack: each plane's full SSIM
    map, averaged over every voxel of ``mask`` (None: every voxel). pred, target: ``[Z, H, W]``; plane:
    ``sagittal`` (planes ``[Z, W]`` at each x) or ``coronal`` (``[Z, H]`` at each y). NaN when the mask is
    empty or the stack has fewer than 11 slices (the window)."""
    if plane not in PLANES:
        raise ValueError(f"plane {plane!r}: expected one of {', '.join(PLANES)}")
    pred, target = np.asarray(pred, np.float64), np.asarray(target, np.float64)
    _check_stack(pred, target, mask, "plane_ssim")
    fixed = PLANES[plane]
    if min(pred.shape[0], pred.shape[3 - fixed]) < SSIM_WIN_SIZE:
        return math.nan
    inside = np.ones(pred.shape, bool) if mask is None else np.asarray(mask, bool)
    if not inside.any():
        return math.nan
    planes = [np.moveaxis(array, fixed, 0) for array in (pred, target)]  # [planes, Z, other]
    ssim_map = _ssim_map_numpy(*planes, _check_data_range(data_range), 2)
    return float(ssim_map[np.moveaxis(inside, fixed, 0)].mean())


def _check_stack(pred: np.ndarray, target: np.ndarray, mask, name: str) -> None:
    if pred.ndim != 3 or pred.shape != target.shape:
        raise ValueError(
            f"{name} takes two axial stacks [Z, H, W] of one shape; got {pred.shape} and {target.shape}"
        )
    if mask is not None and np.shape(mask) != pred.shape:
        raise ValueError(f"{name}: mask shape {np.shape(mask)} is not the stack's {pred.shape}")


def summarize(values: Array) -> dict[str, float | int]:
    """Aggregate per-image metric values into ``{mean, std, median, n, n_nan}``.

    values: any shape, numpy or torch (flattened). NaNs (empty masks) are skipped and counted in
    ``n_nan``; ``n`` counts the values used. ``std`` is the sample standard deviation (ddof=1), what
    "mean ± SD" in a paper usually means; NaN when ``n < 2``. All three statistics are NaN when
    ``n == 0``. ``+inf`` (PSNR of an identical pair) is a value, not skipped: it makes the mean inf.
    """
    if isinstance(values, torch.Tensor):
        values = values.detach().to(device="cpu", dtype=torch.float64).numpy()
    flat = np.asarray(values, dtype=np.float64).ravel()
    is_nan = np.isnan(flat)
    kept = flat[~is_nan]
    n = int(kept.size)
    with np.errstate(invalid="ignore"):  # inf - inf inside std when several values are +inf
        return {
            "mean": float(np.mean(kept)) if n else math.nan,
            "std": float(np.std(kept, ddof=1)) if n > 1 else math.nan,
            "median": float(np.median(kept)) if n else math.nan,
            "n": n,
            "n_nan": int(is_nan.sum()),
        }


def _prepare(pred, target, data_range, mask, spatial_dims):
    """Check the arguments shared by the metrics and bring them to one kind, dtype and device.

    Returns ``(pred, target, mask, data_range, is_torch)`` with ``mask`` None or a bool array/tensor of
    ``pred.shape``.
    """
    if not isinstance(spatial_dims, int) or isinstance(spatial_dims, bool) or spatial_dims not in (1, 2, 3):
        raise ValueError(
            f"spatial_dims must be 1, 2 or 3 (2 for slices, 3 for volumes); got {spatial_dims!r}"
        )
    r = _check_data_range(data_range)
    is_torch = isinstance(pred, torch.Tensor)
    if is_torch != isinstance(target, torch.Tensor):
        raise TypeError(
            f"pred and target must both be torch tensors or both numpy arrays; "
            f"got pred {type(pred).__name__}, target {type(target).__name__}"
        )
    if is_torch:
        # float32 is enough for metrics on GPU batches; float64 keeps float64 to match the numpy path.
        dtype = torch.float64 if torch.float64 in (pred.dtype, target.dtype) else torch.float32
        pred, target = pred.detach().to(dtype), target.detach().to(dtype)
    else:
        pred, target = np.asarray(pred, dtype=np.float64), np.asarray(target, dtype=np.float64)
    if tuple(pred.shape) != tuple(target.shape):
        raise ValueError(
            f"pred and target shapes differ: pred {tuple(pred.shape)}, target {tuple(target.shape)}"
        )
    if pred.ndim < spatial_dims:
        raise ValueError(
            f"pred has {pred.ndim} axes but spatial_dims={spatial_dims} image axes are needed; "
            f"pred shape {tuple(pred.shape)}"
        )
    if mask is not None:
        mask = _check_mask(mask, pred, is_torch)
    return pred, target, mask, r, is_torch


def _check_data_range(data_range) -> float:
    """``data_range`` as a positive finite float, or a ValueError naming the value."""
    # Only a real scalar: a string or bool that float() would accept is a mistake, not a range.
    is_scalar = isinstance(data_range, numbers.Real) and not isinstance(data_range, bool)
    is_0d = isinstance(data_range, (np.ndarray, torch.Tensor)) and data_range.ndim == 0
    r = float(data_range) if is_scalar or is_0d else math.nan
    if not (math.isfinite(r) and r > 0):
        raise ValueError(
            f"data_range must be a positive finite number (the width of the intensity range: "
            f"1.0 for our [0, 1] images); got {data_range!r}"
        )
    return r


def _check_mask(mask, pred, is_torch):
    """The mask as bool, broadcast to ``pred.shape``; ValueError naming both shapes or the bad values."""
    if is_torch:
        mask = torch.as_tensor(mask, device=pred.device)
    else:
        if isinstance(mask, torch.Tensor):
            raise TypeError("mask is a torch tensor but pred and target are numpy arrays; pass one kind")
        mask = np.asarray(mask)
    shape, image_shape = tuple(mask.shape), tuple(pred.shape)
    try:
        fits = np.broadcast_shapes(shape, image_shape) == image_shape
    except ValueError:
        fits = False
    if not fits:
        raise ValueError(
            f"mask shape {shape} does not broadcast to the image batch shape {image_shape} "
            f"(pred and target shape); give (H, W)-like or per-sample (B, ..., H, W) masks"
        )
    if mask.dtype != (torch.bool if is_torch else np.bool_):
        # A soft or label mask silently changes the metric's meaning, so only 0/1 is accepted.
        binary = ((mask == 0) | (mask == 1)).all()
        if not bool(binary):
            raise ValueError(
                f"mask must be bool or contain only 0 and 1; got dtype {mask.dtype} with other values"
            )
        mask = mask != 0
    return mask.expand(image_shape) if is_torch else np.broadcast_to(mask, image_shape)


def _image_mean(values, mask, spatial_dims, is_torch):
    """Mean of ``values`` over the image axes, or over the masked pixels; NaN for an empty mask."""
    axes = tuple(range(-spatial_dims, 0))
    if is_torch:
        if mask is None:
            return values.mean(dim=axes)
        # where(), not values * mask: a NaN or inf outside the mask must not leak into the mean.
        total = torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device)).sum(
            dim=axes
        )
        return total / mask.sum(dim=axes)  # 0 / 0 = NaN for an empty mask
    if mask is None:
        # Flattening the image axes makes this the same pairwise sum as scikit-image's whole-array mean.
        flat = values.reshape(values.shape[: values.ndim - spatial_dims] + (-1,))
        return flat.mean(axis=-1, dtype=np.float64)
    total = np.where(mask, values, 0.0).sum(axis=axes)
    count = mask.sum(axis=axes)
    with np.errstate(invalid="ignore"):  # 0 / 0 = NaN for an empty mask is the documented result
        return total / count


def _scalar_if_0d(result: np.ndarray):
    """An unbatched numpy result as an ``np.float64`` scalar (a Python float), else the array."""
    return np.float64(result) if np.ndim(result) == 0 else result


def _ssim_components(ux, uy, uxx, uyy, uxy, r):
    """SSIM map from the Gaussian-weighted moments; same operation order as scikit-image, for equal bits."""
    vx = uxx - ux * ux
    vy = uyy - uy * uy
    vxy = uxy - ux * uy
    c1 = (SSIM_K1 * r) ** 2
    c2 = (SSIM_K2 * r) ** 2
    a1 = 2 * ux * uy + c1
    a2 = 2 * vxy + c2
    b1 = ux**2 + uy**2 + c1
    b2 = vx + vy + c2
    return (a1 * a2) / (b1 * b2)


def _ssim_map_numpy(x: np.ndarray, y: np.ndarray, r: float, spatial_dims: int) -> np.ndarray:
    """Full SSIM map, shape of ``x``; the reference path (float64, scipy.ndimage like scikit-image)."""
    axes = tuple(range(x.ndim - spatial_dims, x.ndim))

    def window(a):
        return ndimage.gaussian_filter(a, sigma=SSIM_SIGMA, mode="reflect", truncate=SSIM_TRUNCATE, axes=axes)

    return _ssim_components(window(x), window(y), window(x * x), window(y * y), window(x * y), r)


def _gaussian_taps(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The 11 normalised Gaussian taps, built as scipy.ndimage builds them (in float64, then cast)."""
    offsets = torch.arange(-SSIM_RADIUS, SSIM_RADIUS + 1, dtype=torch.float64, device=device)
    taps = torch.exp(-0.5 / (SSIM_SIGMA * SSIM_SIGMA) * offsets**2)
    return (taps / taps.sum()).to(dtype)


def _symmetric_index(n: int, pad: int, device: torch.device) -> torch.Tensor:
    """Indices that extend an axis of length ``n`` by ``pad`` on each side, half-sample symmetric.

    scipy.ndimage's "reflect" repeats the edge pixel (d c b a | a b c d); torch's "reflect" padding does
    not (c b | a b c d), so the padding is done by indexing. Period 2n, so any ``pad`` works.
    """
    j = torch.arange(-pad, n + pad, device=device).remainder(2 * n)
    return torch.where(j < n, j, 2 * n - 1 - j)


def _ssim_map_torch(x: torch.Tensor, y: torch.Tensor, r: float, spatial_dims: int) -> torch.Tensor:
    """Full SSIM map, shape of ``x``, with separable 1D Gaussian convolutions on ``x``'s device."""
    batch_shape, image_shape = tuple(x.shape[:-spatial_dims]), tuple(x.shape[-spatial_dims:])
    x = x.reshape(-1, *image_shape)
    y = y.reshape(-1, *image_shape)
    n = x.shape[0]
    # The five moments go through the filter together, as one batch of single-channel images.
    moments = torch.stack([x, y, x * x, y * y, x * y], dim=1).reshape(n * 5, 1, *image_shape)
    taps = _gaussian_taps(x.dtype, x.device)
    conv = (F.conv1d, F.conv2d, F.conv3d)[spatial_dims - 1]
    for axis, length in enumerate(image_shape):
        dim = 2 + axis
        moments = moments.index_select(dim, _symmetric_index(length, SSIM_RADIUS, x.device))
        kernel_shape = [1] * spatial_dims
        kernel_shape[axis] = SSIM_WIN_SIZE
        moments = conv(moments, taps.view(1, 1, *kernel_shape))
    ux, uy, uxx, uyy, uxy = moments.reshape(n, 5, *image_shape).unbind(dim=1)
    return _ssim_components(ux, uy, uxx, uyy, uxy, r).reshape(*batch_shape, *image_shape)
