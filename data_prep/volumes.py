"""One subject's volumes, prepared for the model and put back again: data_prep's public API for medgan.

Forward (``shard``, and ``synthesize`` on its inputs), each step recorded so it can be undone:

1. `load_volume`: read a NIfTI with nibabel and validate it (3D, finite, not all zero).
2. `to_canonical`: reorient to RAS by axis permutation and flips only (no resampling, exact inverse).
3. `register_rigid` + `resample_onto`: bring a modality acquired on another grid (IXI T1) onto the
   reference grid (IXI T2): rigid, Mattes mutual information, SimpleITK.
4. `brain_mask` (BraTS: nonzero, already skull-stripped) or `head_mask` (IXI: Otsu + morphology).
5. `fit_scaling` + `normalise`: the median within the mask onto 0.4 and 2.5 x the median onto 1 (clipped
   above, ``data_prep.intensity``), zero outside the mask.
6. `choose_crop` + `crop`: keep the axial slices with enough brain (shards) or every slice with any
   brain (inference: ``every_brain_slice=True``), crop or pad in-plane to a square.

``prepare_subject(..., scored=...)`` also carries files read only to score (the real target in
evaluation): put on the same grid and crop, each normalised by its own scale within the inputs' mask,
they choose nothing of what synthesis sees (reference grid, mask, crop, the inputs' scales).

Inverse (``synthesize``, ``evaluate --subjects``), nnU-Net style: `restore_volume` pastes slices back
at the crop box, undoes the normalisation and the reorientation, and returns a NIfTI with the
reference's original header; `resample_from` maps a reference-grid volume back onto a registered
modality's own grid. The geometric part of the round trip is exact (tested); registration
resampling interpolates, and values clipped by the normalisation cannot come back.

Modality names, aliases and subject discovery are owned by `data_prep.discovery` and re-exported here
(`MODALITIES`, `MODALITY_ALIASES`, `SEGMENTATION`, `canonical_modality`, `discover_nifti_subjects`,
...), so medgan imports data_prep from this one module and keeps no copy of its own.

Array conventions: canonical volumes are ``[X, Y, Z]`` in RAS voxel order; model slices are
``[H, W] = [x, y]`` of one axial (z) slice; a stack of slices is ``[Z, H, W]``.
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform
from scipy import ndimage

from data_prep.discovery import (
    DATASET_MODALITIES,
    MODALITIES,
    MODALITY_ALIASES,
    SEGMENTATION,
    Discovery,
    SubjectFiles,
    canonical_modality,
    discover,
    discover_nifti_subjects,
    normalise_modality,
    parse_name,
)
from data_prep.errors import VolumeError
from data_prep.intensity import (
    CEILING_MULTIPLE,
    NORMALISATION_METHOD,
    REFERENCE_LEVEL,
    IntensityScaling,
    denormalise,
    fit_scaling,
    normalisation_lookup,
    normalisation_method,
    normalise,
    normalise_by_lookup,
    normalise_in_place,
    uses_lookup,
)
from data_prep.manifest import FORMAT_VERSION  # the shard format medgan reads, re-exported for its checks

__all__ = [
    "CEILING_MULTIPLE",
    "DATASET_MODALITIES",
    "FORMAT_VERSION",
    "MODALITIES",
    "MODALITY_ALIASES",
    "NORMALISATION_METHOD",
    "REFERENCE_LEVEL",
    "SEGMENTATION",
    "SEG_LABELS",
    "CropBox",
    "Discovery",
    "IntensityScaling",
    "LoadedVolume",
    "PreparedSubject",
    "Reorientation",
    "RigidRegistration",
    "SubjectFiles",
    "SubjectGeometry",
    "VolumeError",
    "brain_mask",
    "canonical_modality",
    "choose_crop",
    "crop",
    "denormalise",
    "discover",
    "discover_nifti_subjects",
    "fit_scaling",
    "from_canonical",
    "grid_difference",
    "head_mask",
    "load_volume",
    "normalisation_method",
    "normalise",
    "normalise_modality",
    "parse_name",
    "prepare_subject",
    "register_rigid",
    "resample_from",
    "resample_onto",
    "restore_volume",
    "same_grid",
    "to_canonical",
    "uncrop",
]

SEG_LABELS = {1: "necrotic tumour core", 2: "peritumoural oedema", 4: "enhancing tumour"}
# BraTS 2023+ renumbered enhancing tumour from 4 to 3; shards always carry the BraTS 2021 labels.
_BRATS_2023_ENHANCING = 3
# Shards keep an axial slice when its mask covers at least this share of the largest axial cross-section
# (slivers at the top and bottom of the brain teach little); inference keeps every slice with any brain.
MIN_SLICE_BRAIN_SHARE = 0.1
# Axial slices are [..., H, W] with H the canonical (RAS) x axis, left to right, and W the y axis, posterior
# to anterior (the shard format): a left-right flip is along H.
LEFT_RIGHT_AXIS = -2
_AFFINE_TOLERANCE_MM = 1e-3
_REGISTRATION_SAMPLES = 20_000
# Axial slices cropped and normalised at a time: 4 x 256 x 256 float32 is 1 MiB, about an L2 cache.
_SLICES_PER_BLOCK = 4


@dataclass(slots=True)
class LoadedVolume:
    """A validated 3D volume. data: [X, Y, Z] in the file's voxel order and intensity units, float32
    (or the stored integer dtype, see `load_volume`'s keep_integers);
    affine: [4, 4] voxel -> RAS mm; header: the file's header (reused when writing back);
    repairs: one line per fix applied while loading (e.g. NaN voxels set to 0);
    nan_voxels, inf_voxels: how many voxels of the file were NaN / infinite (as float32) and are 0 in
    `data`, counted by value for callers that must refuse them rather than read the repair line."""

    path: Path
    data: np.ndarray
    affine: np.ndarray
    header: nib.Nifti1Header
    repairs: list[str] = field(default_factory=list)
    nan_voxels: int = 0
    inf_voxels: int = 0


def load_volume(path: Path, *, is_label: bool = False, keep_integers: bool = False) -> LoadedVolume:
    """Read and validate one NIfTI volume; raises VolumeError naming the file on any problem.

    A trailing length-1 fourth axis is dropped and NaN/Inf voxels are set to 0 (both reported in
    `repairs`); a truly 4D volume, an empty, truncated or non-NIfTI file, a singular affine and an
    all-zero image volume (not label map) are rejected.
    keep_integers: a file that stores 8- or 16-bit integers without scaling (slope 1, intercept 0: BraTS,
    IXI) keeps its integer dtype instead of becoming float32; the values are the same, the cast and its
    memory saved, and `data_prep.intensity`'s fast path applies.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise VolumeError(f"{path}: empty file (0 bytes)")
        image = nib.load(path)
    except FileNotFoundError:
        raise VolumeError(f"{path}: file not found") from None
    except (ImageFileError, gzip.BadGzipFile, zlib.error, EOFError, ValueError) as error:
        raise VolumeError(f"{path}: not a readable NIfTI file ({_first_line(error)})") from None
    keep = keep_integers and _stores_unscaled_small_integers(image)
    try:
        data = np.asarray(image.dataobj) if keep else np.asarray(image.dataobj, dtype=np.float32)
    except (gzip.BadGzipFile, zlib.error, EOFError, OSError, ValueError) as error:
        raise VolumeError(f"{path}: truncated or corrupt image data ({_first_line(error)})") from None
    repairs = []
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
        repairs.append(f"{path.name}: dropped a length-1 fourth dimension")
    if data.ndim != 3:
        raise VolumeError(f"{path}: {data.ndim}D volume of shape {data.shape}, expected 3D")
    affine = np.asarray(image.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise VolumeError(f"{path}: the header's affine is singular or not finite")
    nan_voxels = inf_voxels = 0
    if not _always_finite(image):
        non_finite = ~np.isfinite(data)
        if non_finite.any():
            nan_voxels = int(np.isnan(data).sum())
            inf_voxels = int(non_finite.sum()) - nan_voxels
            data[non_finite] = 0.0
            repairs.append(f"{path.name}: replaced {int(non_finite.sum())} NaN/Inf voxels with 0")
    if not is_label and not np.any(data):
        raise VolumeError(f"{path}: all-zero volume")
    header = image.header.copy()
    return LoadedVolume(path, data, affine, header, repairs, nan_voxels=nan_voxels, inf_voxels=inf_voxels)


def _stores_unscaled_small_integers(image) -> bool:
    """Whether the file holds 8- or 16-bit integers that nibabel returns as they are (no slope or
    intercept). Wider integers become float32 as before: they gain nothing from staying integers, and
    numpy's percentile interpolates integers in their own dtype, where a wide range overflows."""
    stored = image.get_data_dtype()
    slope, inter = float(image.dataobj.slope), float(image.dataobj.inter)
    return uses_lookup(stored) and slope == 1.0 and inter == 0.0


def _always_finite(image) -> bool:
    """Whether every voxel of `image` is finite in float32 by construction: integers stored, scaled by a
    finite slope and intercept that cannot overflow. Saves a full-volume scan on most real files."""
    stored = image.get_data_dtype()
    slope, inter = float(image.dataobj.slope), float(image.dataobj.inter)
    if not np.issubdtype(stored, np.integer) or not (np.isfinite(slope) and np.isfinite(inter)):
        return False
    limits = np.iinfo(stored)
    largest = max(abs(int(limits.min)), abs(int(limits.max))) * abs(slope) + abs(inter)
    return largest < float(np.finfo(np.float32).max)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


@dataclass(frozen=True, slots=True)
class Reorientation:
    """How a volume was turned into RAS voxel order: original shape and affine, and the nibabel
    orientation transform [3, 2] (axis, flip) from original to RAS. Exactly invertible."""

    original_shape: tuple[int, int, int]
    original_affine: np.ndarray
    transform: np.ndarray

    @property
    def original_axcodes(self) -> tuple[str, ...]:
        return nib.aff2axcodes(self.original_affine)

    def to_dict(self) -> dict:
        return {
            "original_shape": list(self.original_shape),
            "original_affine": self.original_affine.tolist(),
            "original_axcodes": "".join(self.original_axcodes),
            "to_ras": self.transform.astype(int).tolist(),
        }

    @classmethod
    def from_dict(cls, record: dict) -> Reorientation:
        return cls(
            original_shape=tuple(record["original_shape"]),
            original_affine=np.asarray(record["original_affine"], dtype=np.float64),
            transform=np.asarray(record["to_ras"], dtype=np.float64),
        )


def to_canonical(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, Reorientation]:
    """Reorient [X, Y, Z] data to RAS voxel order (permute and flip axes, no interpolation).

    Returns (canonical data, canonical affine [4, 4], the Reorientation that `from_canonical` undoes).
    Every voxel keeps its world position: canonical_affine @ new_index == affine @ old_index.
    """
    transform = io_orientation(affine)
    canonical = apply_orientation(data, transform)
    canonical_affine = affine @ inv_ornt_aff(transform, data.shape)
    return canonical, canonical_affine, Reorientation(tuple(data.shape), affine.copy(), transform)


def from_canonical(canonical: np.ndarray, reorientation: Reorientation) -> np.ndarray:
    """Inverse of `to_canonical`: RAS voxel order back to the original file's voxel order (exact)."""
    back = ornt_transform(axcodes2ornt(("R", "A", "S")), reorientation.transform)
    data = apply_orientation(canonical, back)
    if tuple(data.shape) != tuple(reorientation.original_shape):
        raise ValueError(f"volume of shape {canonical.shape} does not fit {reorientation.original_shape}")
    return data


@dataclass(frozen=True, slots=True)
class RigidRegistration:
    """A rigid transform found by `register_rigid`.

    fixed_to_moving: [4, 4] RAS mm -> RAS mm, maps a point of the fixed (reference) image onto the
    same anatomy in the moving image. metric: final Mattes mutual information (lower is better).
    """

    fixed_to_moving: np.ndarray
    metric: float
    euler_parameters: tuple[float, ...]

    def to_dict(self) -> dict:
        return {
            "method": "rigid (Euler3D), Mattes mutual information, SimpleITK",
            "fixed_to_moving_ras": self.fixed_to_moving.tolist(),
            "itk_euler3d_parameters": list(self.euler_parameters),
            "metric": self.metric,
        }

    @classmethod
    def from_dict(cls, record: dict) -> RigidRegistration:
        return cls(
            fixed_to_moving=np.asarray(record["fixed_to_moving_ras"], dtype=np.float64),
            metric=float(record["metric"]),
            euler_parameters=tuple(record["itk_euler3d_parameters"]),
        )


_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


def _to_sitk(data: np.ndarray, affine: np.ndarray):
    """A SimpleITK image (LPS physical space, as ITK uses) of [X, Y, Z] data with a RAS affine."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(2, 1, 0), dtype=np.float32))
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    image.SetSpacing(spacing.tolist())
    image.SetDirection((_RAS_TO_LPS @ affine[:3, :3] / spacing).flatten().tolist())
    image.SetOrigin((_RAS_TO_LPS @ affine[:3, 3]).tolist())
    return image


def register_rigid(
    moving: np.ndarray, moving_affine: np.ndarray, fixed: np.ndarray, fixed_affine: np.ndarray, seed: int = 0
) -> RigidRegistration:
    """Rigidly register `moving` [X, Y, Z] onto `fixed` [X', Y', Z'] (affines [4, 4] voxel -> RAS mm).

    Mattes mutual information (so T1 onto T2 works), 3-level pyramid, centre-of-mass start; seeded
    metric sampling and one thread, so the same input always gives the same transform.
    """
    import SimpleITK as sitk

    # One thread, also for the initializer's moment sums: threaded float sums vary with the thread count,
    # and the shards must not depend on --workers. Restored afterwards: the setting is process-global.
    threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    try:
        fixed_image = _to_sitk(fixed, fixed_affine)
        moving_image = _to_sitk(moving, moving_affine)
        initial = sitk.CenteredTransformInitializer(
            fixed_image,
            moving_image,
            sitk.Euler3DTransform(),
            sitk.CenteredTransformInitializerFilter.MOMENTS,
        )
        method = sitk.ImageRegistrationMethod()
        method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
        method.SetMetricSamplingStrategy(method.RANDOM)
        # A fixed sample count keeps the cost flat from phantom to full-size IXI volumes.
        # SimpleITK reads seed 0 as "seed from the wall clock", hence the offset.
        method.SetMetricSamplingPercentage(min(1.0, _REGISTRATION_SAMPLES / fixed.size), seed + 1)
        method.SetInterpolator(sitk.sitkLinear)
        method.SetOptimizerAsRegularStepGradientDescent(
            learningRate=2.0, minStep=1e-3, numberOfIterations=100, relaxationFactor=0.5
        )
        method.SetOptimizerScalesFromPhysicalShift()
        method.SetShrinkFactorsPerLevel([4, 2, 1])
        method.SetSmoothingSigmasPerLevel([2.0, 1.0, 0.0])
        method.SetInitialTransform(initial, inPlace=False)
        found = sitk.Euler3DTransform(initial)
        found.SetParameters(method.Execute(fixed_image, moving_image).GetParameters())
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    return RigidRegistration(
        fixed_to_moving=_lps_transform_to_ras(found),
        metric=float(method.GetMetricValue()),
        euler_parameters=tuple(found.GetParameters()),
    )


def _lps_transform_to_ras(transform) -> np.ndarray:
    """[4, 4] RAS matrix of an ITK Euler3D transform (ITK: p_moving = R (p - c) + c + t, in LPS)."""
    rotation = np.asarray(transform.GetMatrix()).reshape(3, 3)
    centre = np.asarray(transform.GetCenter())
    translation = np.asarray(transform.GetTranslation())
    lps = np.eye(4)
    lps[:3, :3] = rotation
    lps[:3, 3] = centre + translation - rotation @ centre
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    return flip @ lps @ flip


def resample_onto(
    moving: np.ndarray,
    moving_affine: np.ndarray,
    fixed_shape,
    fixed_affine: np.ndarray,
    fixed_to_moving: np.ndarray,
    order: int = 1,
) -> np.ndarray:
    """float32 [fixed_shape]: `moving` sampled at the fixed grid's voxels (zero beyond its field of view).

    order: spline order (1 for images, 0 for label maps).
    """
    voxel_map = np.linalg.inv(moving_affine) @ fixed_to_moving @ fixed_affine
    return ndimage.affine_transform(
        moving.astype(np.float32),
        voxel_map[:3, :3],
        voxel_map[:3, 3],
        output_shape=tuple(fixed_shape),
        order=order,
        mode="constant",
        cval=0.0,
    )


def resample_from(
    on_fixed: np.ndarray,
    fixed_affine: np.ndarray,
    moving_shape,
    moving_affine: np.ndarray,
    fixed_to_moving: np.ndarray,
    order: int = 1,
) -> np.ndarray:
    """Inverse of `resample_onto`: a fixed-grid volume back onto the moving modality's grid."""
    return resample_onto(
        on_fixed, fixed_affine, moving_shape, moving_affine, np.linalg.inv(fixed_to_moving), order
    )


def brain_mask(volumes: list[np.ndarray]) -> np.ndarray:
    """bool [X, Y, Z]: voxels nonzero in any of the (skull-stripped, same-grid) volumes."""
    # In place with one scratch array: these are full-size volumes and temporaries cost more than the test.
    mask = np.not_equal(volumes[0], 0)
    nonzero = np.empty_like(mask)
    for volume in volumes[1:]:
        np.not_equal(volume, 0, out=nonzero)
        mask |= nonzero
    return mask


def head_mask(volume: np.ndarray) -> np.ndarray:
    """bool [X, Y, Z]: the head of a non-skull-stripped image (Otsu threshold, closing, hole filling,
    largest connected component). Deterministic; no skull stripping, as IXI synthesis work does."""
    from skimage.filters import threshold_otsu

    smooth = ndimage.gaussian_filter(volume.astype(np.float32), sigma=1.0)
    foreground = smooth > threshold_otsu(smooth)
    foreground = ndimage.binary_closing(foreground, structure=np.ones((3, 3, 3)), iterations=2)
    # Axial slices are filled one by one too: the neck leaves the head open at the bottom in 3D.
    foreground = ndimage.binary_fill_holes(foreground)
    for z in range(foreground.shape[2]):
        foreground[:, :, z] = ndimage.binary_fill_holes(foreground[:, :, z])
    labels, count = ndimage.label(foreground)
    if count <= 1:
        return foreground
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


@dataclass(frozen=True, slots=True)
class CropBox:
    """Where the model's slices sit in the canonical (RAS) volume, in voxels, half-open [start, stop).

    x, y: the in-plane window of `size` voxels; it may reach outside the volume (those pixels are
    padding). z: the axial slices kept.
    """

    x: tuple[int, int]
    y: tuple[int, int]
    z: tuple[int, int]

    def to_dict(self) -> dict:
        return {"x": list(self.x), "y": list(self.y), "z": list(self.z)}

    @classmethod
    def from_dict(cls, record: dict) -> CropBox:
        return cls(x=tuple(record["x"]), y=tuple(record["y"]), z=tuple(record["z"]))


def choose_crop(
    mask: np.ndarray, size: int, min_slice_share: float = MIN_SLICE_BRAIN_SHARE
) -> tuple[CropBox, bool]:
    """Crop box for a canonical mask [X, Y, Z]: the axial slices from the first to the last whose mask
    area is > 0 and >= ``min_slice_share`` of the largest (0: every slice with any mask voxel), the
    in-plane window of `size` centred on the mask. Returns (box, whether the mask's in-plane extent is
    larger than `size`, i.e. the crop cuts into it)."""
    area = mask.sum(axis=(0, 1))
    kept = np.flatnonzero((area > 0) & (area >= min_slice_share * area.max()))
    z = (int(kept[0]), int(kept[-1]) + 1)
    in_plane = mask[:, :, z[0] : z[1]].any(axis=2)
    box = []
    cut = False
    for axis in (0, 1):
        extent = np.flatnonzero(in_plane.any(axis=1 - axis))
        lo, hi = int(extent[0]), int(extent[-1]) + 1
        cut |= hi - lo > size
        start = (lo + hi) // 2 - size // 2
        box.append((start, start + size))
    return CropBox(x=box[0], y=box[1], z=z), cut


def _overlap(window: tuple[int, int], length: int) -> tuple[slice, slice]:
    """(slice into the volume axis, slice into the window) where the window overlaps [0, length)."""
    start, stop = max(window[0], 0), min(window[1], length)
    return slice(start, stop), slice(start - window[0], stop - window[0])


def crop(volume: np.ndarray, box: CropBox) -> np.ndarray:
    """[Z, H, W] slices of a canonical volume [X, Y, Z] inside `box` (zero where the box is padding)."""
    size_x, size_y = box.x[1] - box.x[0], box.y[1] - box.y[0]
    slices = np.zeros((box.z[1] - box.z[0], size_x, size_y), dtype=volume.dtype)
    _crop_into(slices, volume, box, box.z[0])
    return slices


def _crop_into(slices: np.ndarray, volume: np.ndarray, box: CropBox, first_slice: int) -> None:
    """`crop` into zeroed `slices` [N, H, W]: canonical axial slices first_slice .. first_slice + N."""
    window, inside = _crop_view(volume, box, first_slice, len(slices))
    slices[window] = inside


def _crop_view(volume: np.ndarray, box: CropBox, first_slice: int, count: int):
    """(index of the window's part that lies inside the volume, a [count, h, w] view of those voxels)."""
    (vx, wx), (vy, wy) = _overlap(box.x, volume.shape[0]), _overlap(box.y, volume.shape[1])
    return (slice(None), wx, wy), volume[vx, vy, first_slice : first_slice + count].transpose(2, 0, 1)


def _bounding_box(mask: np.ndarray) -> tuple[slice, slice, slice]:
    """The smallest box (one slice per axis) that holds every True voxel of a non-empty mask."""
    box = []
    for axis in range(mask.ndim):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=others))
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)


def uncrop(slices: np.ndarray, box: CropBox, canonical_shape, fill: float = 0.0) -> np.ndarray:
    """Inverse of `crop`: paste [Z, H, W] slices into a canonical volume of `canonical_shape`.

    Voxels outside the box (and slices not kept) get `fill`; padding pixels are dropped.
    """
    expected = (box.z[1] - box.z[0], box.x[1] - box.x[0], box.y[1] - box.y[0])
    if tuple(slices.shape) != expected:
        raise ValueError(
            f"slices of shape {tuple(slices.shape)} do not fit the crop box (expected {expected})"
        )
    volume = np.full(tuple(canonical_shape), fill, dtype=slices.dtype)
    (vx, wx), (vy, wy) = _overlap(box.x, volume.shape[0]), _overlap(box.y, volume.shape[1])
    volume[vx, vy, box.z[0] : box.z[1]] = slices[:, wx, wy].transpose(1, 2, 0)
    return volume


@dataclass(frozen=True, slots=True)
class PreparationSettings:
    """How a dataset is prepared. mask: "nonzero" (skull-stripped) or "head" (Otsu).
    register: whether a modality on another grid is registered (True) or an error (False)."""

    mask: str
    register: bool
    reference_order: tuple[str, ...]


DATASET_SETTINGS = {
    "brats": PreparationSettings(
        mask="nonzero", register=False, reference_order=("t1", "t1ce", "t2", "flair")
    ),
    "ixi": PreparationSettings(mask="head", register=True, reference_order=("t2", "pd", "t1")),
}


@dataclass(slots=True)
class SubjectGeometry:
    """Everything needed to put a slice back on the reference's original grid.

    reference: the modality whose grid the slices live on. reorientation: that grid's original ->
    RAS. canonical_affine: [4, 4] RAS-grid voxel -> mm. crop: CropBox in canonical voxels.
    registered: modality -> (RigidRegistration, that modality's own Reorientation).
    """

    reference: str
    reorientation: Reorientation
    canonical_affine: np.ndarray
    crop: CropBox
    registered: dict[str, tuple[RigidRegistration, Reorientation]] = field(default_factory=dict)

    @property
    def canonical_shape(self) -> tuple[int, int, int]:
        return tuple(
            apply_orientation(
                np.empty(self.reorientation.original_shape, bool), self.reorientation.transform
            ).shape
        )

    def to_dict(self) -> dict:
        return {
            "reference": self.reference,
            "reorientation": self.reorientation.to_dict(),
            "canonical_shape": list(self.canonical_shape),
            "canonical_affine": self.canonical_affine.tolist(),
            "crop_box": self.crop.to_dict(),
            "registration": {
                modality: {
                    "fixed": self.reference,
                    **registration.to_dict(),
                    "moving_grid": reorientation.to_dict(),
                }
                for modality, (registration, reorientation) in self.registered.items()
            },
        }

    @classmethod
    def from_dict(cls, record: dict) -> SubjectGeometry:
        return cls(
            reference=record["reference"],
            reorientation=Reorientation.from_dict(record["reorientation"]),
            canonical_affine=np.asarray(record["canonical_affine"], dtype=np.float64),
            crop=CropBox.from_dict(record["crop_box"]),
            registered={
                modality: (RigidRegistration.from_dict(entry), Reorientation.from_dict(entry["moving_grid"]))
                for modality, entry in record.get("registration", {}).items()
            },
        )


@dataclass(slots=True)
class PreparedSubject:
    """A subject ready for sharding or for the model.

    images: [M, Z, H, W] in [0, 1] (float32 unless asked otherwise), in `modalities` order, all zero for
    absent modalities.
    mask: uint8 [Z, H, W] in {0, 1}. seg: uint8 [Z, H, W] BraTS 2021 labels {0, 1, 2, 4}, or None.
    scaling: modality -> IntensityScaling (present modalities only). repairs: one line per fix.
    scored: the files given as ``scored`` (e.g. the real target in evaluation): modality -> [Z, H, W] in
    [0, 1] on the same slices, each by its own scale (`scored_scaling`) fitted within `mask`, 0 outside.
    """

    modalities: tuple[str, ...]
    present: list[str]
    images: np.ndarray
    mask: np.ndarray
    seg: np.ndarray | None
    geometry: SubjectGeometry
    scaling: dict[str, IntensityScaling]
    repairs: list[str]
    scored: dict[str, np.ndarray] = field(default_factory=dict)
    scored_scaling: dict[str, IntensityScaling] = field(default_factory=dict)


def _all_oriented_alike(volumes) -> bool:
    """Whether `to_canonical` reorders the voxels of all these volumes in the same way."""
    transforms = [io_orientation(volume.affine) for volume in volumes]
    return all(np.array_equal(transform, transforms[0]) for transform in transforms)


def same_grid(shape_a, affine_a: np.ndarray, shape_b, affine_b: np.ndarray) -> bool:
    """Whether two voxel grids are one: the same shape and affines equal within 1e-3 mm (numpy's
    default relative tolerance on top), so a header another tool rewrote in float32 stays on its grid.
    `grid_difference` says what tells two grids apart when they are not."""
    return tuple(shape_a) == tuple(shape_b) and np.allclose(affine_a, affine_b, atol=_AFFINE_TOLERANCE_MM)


def grid_difference(shape_a, affine_a: np.ndarray, shape_b, affine_b: np.ndarray) -> str:
    """What tells two voxel grids apart, for an error message: their shapes when those differ, else how
    far apart (mm) the same voxel index lies on the two, at worst over the volume's corners."""
    if tuple(shape_a) != tuple(shape_b):
        return f"shape {tuple(shape_a)} vs {tuple(shape_b)}"
    corners = np.array(np.meshgrid(*[(0, n - 1) for n in shape_a[:3]], indexing="ij")).reshape(3, -1)
    corners = np.vstack([corners, np.ones(corners.shape[1])])
    apart = np.linalg.norm((np.asarray(affine_a) @ corners - np.asarray(affine_b) @ corners)[:3], axis=0)
    return f"same shape {tuple(shape_a)}, but the affines place voxels up to {apart.max():.3g} mm apart"


def _describe_grids(reference: str, fixed: LoadedVolume, modality: str, volume: LoadedVolume) -> str:
    """``t1 vs t2 (path): shape (..) vs (..)``, or the affines' distance in mm."""
    difference = grid_difference(fixed.data.shape, fixed.affine, volume.data.shape, volume.affine)
    return f"{reference} vs {modality} ({volume.path}): {difference}"


def prepare_subject(
    files: dict[str, Path],
    *,
    dataset: str,
    modalities: tuple[str, ...],
    size: int,
    seed: int = 0,
    dtype=np.float32,
    every_brain_slice: bool = False,
    scored: dict[str, Path] | None = None,
) -> PreparedSubject:
    """Load, validate, reorient, register, mask, normalise and crop one subject.

    files: modality -> path, optionally "seg" -> path; modalities: the channel order of `images`
    (modalities without a file are absent: all zero). dataset: "brats" or "ixi" (see DATASET_SETTINGS).
    dtype: of `images`; computed in float32 either way, so float16 equals float32 images cast afterwards.
    every_brain_slice: keep every axial slice with any mask voxel (inference: nothing of the brain left
    blank) instead of shards' `MIN_SLICE_BRAIN_SHARE` rule.
    scored: modality -> path of files read only to score (`PreparedSubject.scored`): put on the
    reference grid (registered when the dataset registers) and cropped alike, normalised within the mask
    of `files`; they choose nothing: not the reference, the mask, the crop nor any scale of `files`.
    Raises VolumeError with a one-line reason when the subject cannot be used.
    """
    settings = DATASET_SETTINGS[dataset]
    present, loaded = _load_inputs(files, modalities)
    repairs = [line for volume in loaded.values() for line in volume.repairs]
    reference = next(m for m in (*settings.reference_order, *present) if m in loaded)
    grid = _ReferenceGrid.of(reference, loaded[reference], register=settings.register, seed=seed)
    on_reference, registered = grid.place_all(loaded)
    mask = _subject_mask(settings.mask, loaded, on_reference, grid, registered, files[reference])
    box, cut = choose_crop(mask, size, 0.0 if every_brain_slice else MIN_SLICE_BRAIN_SHARE)
    if cut:
        repairs.append(f"mask wider than --size {size}: the in-plane crop cuts into it")
    masked_crop = _MaskedCrop.of(mask, box)
    images, scaling = _normalised_inputs(masked_crop, on_reference, files, modalities, dtype)
    scored_images, scored_scaling, scored_repairs = _scored_on_crop(scored or {}, grid, masked_crop, dtype)
    seg = _segmentation_on_crop(files["seg"], grid.fixed, box) if "seg" in files else None
    return PreparedSubject(
        modalities=tuple(modalities),
        present=present,
        images=images,
        mask=masked_crop.cropped_mask.astype(np.uint8),
        seg=seg,
        geometry=grid.geometry(box, registered),
        scaling=scaling,
        repairs=repairs + scored_repairs,
        scored=scored_images,
        scored_scaling=scored_scaling,
    )


def _load_inputs(files: dict[str, Path], modalities: tuple[str, ...]):
    """(the modalities of `modalities` that have a file, in that order; modality -> LoadedVolume, integer
    voxels kept as stored). Raises VolumeError when none of `modalities` has a file."""
    present = [modality for modality in modalities if modality in files]
    if not present:
        raise VolumeError(f"none of the modalities {' '.join(modalities)} is present")
    return present, {modality: load_volume(files[modality], keep_integers=True) for modality in present}


@dataclass(frozen=True, slots=True)
class _ReferenceGrid:
    """The grid a subject's slices live on: the reference modality's own, reoriented to RAS.

    fixed: the reference volume as loaded. canonical: its voxels [X, Y, Z] in RAS order, in the file's
    units. canonical_affine: [4, 4] canonical voxel -> mm. reorientation: the file's grid -> RAS.
    register: whether a volume on another grid is registered onto this one (else refused); seed: the
    registration's sampling seed.
    """

    reference: str
    fixed: LoadedVolume
    canonical: np.ndarray
    canonical_affine: np.ndarray
    reorientation: Reorientation
    register: bool
    seed: int

    @classmethod
    def of(cls, reference: str, fixed: LoadedVolume, *, register: bool, seed: int) -> _ReferenceGrid:
        canonical, canonical_affine, reorientation = to_canonical(fixed.data, fixed.affine)
        return cls(reference, fixed, canonical, canonical_affine, reorientation, register, seed)

    def place(self, modality: str, volume: LoadedVolume):
        """(`volume` on this grid: [X, Y, Z] in RAS order, in its file's units; (RigidRegistration, the
        volume's own Reorientation), or None when it lay on the reference's grid already).

        Raises VolumeError naming both grids when `volume` lies on another grid and `register` is False.
        """
        if same_grid(volume.data.shape, volume.affine, self.fixed.data.shape, self.fixed.affine):
            return to_canonical(volume.data, volume.affine)[0], None
        if not self.register:
            difference = _describe_grids(self.reference, self.fixed, modality, volume)
            raise VolumeError(f"modalities on different grids: {difference}")
        moving, moving_affine, moving_reorientation = to_canonical(volume.data, volume.affine)
        registration = register_rigid(
            moving, moving_affine, self.canonical, self.canonical_affine, seed=self.seed
        )
        resampled = resample_onto(
            moving, moving_affine, self.canonical.shape, self.canonical_affine, registration.fixed_to_moving
        )
        return resampled, (registration, moving_reorientation)

    def place_all(self, loaded: dict[str, LoadedVolume]):
        """(modality -> its volume on this grid [X, Y, Z]; modality -> (RigidRegistration, Reorientation)
        for those registered onto it), each as `place` puts it."""
        on_reference, registered = {}, {}
        for modality, volume in loaded.items():
            on_reference[modality], registration = self.place(modality, volume)
            if registration is not None:
                registered[modality] = registration
        return on_reference, registered

    def geometry(self, box: CropBox, registered: dict) -> SubjectGeometry:
        """What puts slices cropped at `box` back on the reference's original grid."""
        return SubjectGeometry(
            reference=self.reference,
            reorientation=self.reorientation,
            canonical_affine=self.canonical_affine,
            crop=box,
            registered=registered,
        )


def _subject_mask(
    kind: str, loaded: dict, on_reference: dict, grid: _ReferenceGrid, registered: dict, reference_path: Path
) -> np.ndarray:
    """bool [X, Y, Z] on `grid`: "nonzero" (skull-stripped BraTS: nonzero in any input) or "head" (IXI:
    Otsu on the reference). Raises VolumeError naming `reference_path` when the mask is empty."""
    if kind == "nonzero" and _all_oriented_alike(loaded.values()) and not registered:
        # The mask does not depend on voxel order: made in the files' contiguous order and reoriented
        # once, it costs a fraction of the same test on flipped canonical views.
        mask = to_canonical(brain_mask([volume.data for volume in loaded.values()]), grid.fixed.affine)[0]
    elif kind == "nonzero":
        mask = brain_mask(list(on_reference.values()))
    else:
        mask = head_mask(on_reference[grid.reference])
    if not mask.any():
        raise VolumeError(f"{reference_path}: the {kind} mask is empty (no voxel to keep)")
    return mask


@dataclass(frozen=True, slots=True)
class _MaskedCrop:
    """A subject's mask and crop box, and what normalising a volume within them needs.

    mask: bool [X, Y, Z] on the reference grid, not empty. cropped_mask: bool [Z, H, W], its slices at
    `box`; outside: its negation. within: the mask's bounding box, where scales are fitted.
    """

    mask: np.ndarray
    box: CropBox
    cropped_mask: np.ndarray
    outside: np.ndarray
    within: tuple[slice, slice, slice]

    @classmethod
    def of(cls, mask: np.ndarray, box: CropBox) -> _MaskedCrop:
        cropped_mask = crop(mask, box)
        # Median over the mask's bounding box only: the same voxels, a fraction of the volume to scan.
        return cls(mask, box, cropped_mask, ~cropped_mask, _bounding_box(mask))

    def normalise_into(self, volume: np.ndarray, path: Path, out: np.ndarray) -> IntensityScaling:
        """Fit `volume`'s scale within the mask, then crop and normalise it into zeroed `out` [Z, H, W]
        (a float dtype): [0, 1] inside the mask, 0 outside. `path` names the file in a VolumeError."""
        try:
            scaling = fit_scaling(volume[self.within], self.mask[self.within])
        except VolumeError as error:
            raise VolumeError(f"{path}: {error}") from None
        if uses_lookup(volume.dtype):
            # 8/16-bit integers (BraTS, IXI files): one gather through a table of every value's result.
            lookup = normalisation_lookup(volume.dtype, scaling, out.dtype)
            window, inside = _crop_view(volume, self.box, self.box.z[0], len(self.cropped_mask))
            normalise_by_lookup(inside, lookup, out=out[window])
            np.copyto(out, 0, where=self.outside)
        else:
            _normalise_into(out, volume, self.box, scaling, self.cropped_mask)
        return scaling


def _normalised_inputs(masked_crop: _MaskedCrop, on_reference: dict, files: dict, modalities, dtype):
    """(images [M, Z, H, W] of `dtype` in [0, 1], channels in `modalities` order, all zero for those not
    in `on_reference`; modality -> IntensityScaling of each present one)."""
    scaling = {}
    images = np.zeros((len(modalities), *masked_crop.cropped_mask.shape), dtype=dtype)
    for channel, modality in enumerate(modalities):
        if modality in on_reference:
            scaling[modality] = masked_crop.normalise_into(
                on_reference[modality], files[modality], images[channel]
            )
    return images, scaling


def _scored_on_crop(scored: dict[str, Path], grid: _ReferenceGrid, masked_crop: _MaskedCrop, dtype):
    """For files read only to score: (modality -> [Z, H, W] of `dtype` in [0, 1]; modality -> its own
    IntensityScaling; repair lines). Each is put on `grid` (registered where the dataset registers) and
    normalised within the inputs' mask at their crop box; none changes the grid, mask or box."""
    images, scaling, repairs = {}, {}, []
    for modality, path in scored.items():
        volume = load_volume(path, keep_integers=True)
        repairs.extend(volume.repairs)
        on_grid, _ = grid.place(modality, volume)
        images[modality] = np.zeros(masked_crop.cropped_mask.shape, dtype=dtype)
        scaling[modality] = masked_crop.normalise_into(on_grid, path, images[modality])
    return images, scaling, repairs


def _segmentation_on_crop(path: Path, reference: LoadedVolume, box: CropBox) -> np.ndarray:
    """uint8 [Z, H, W] BraTS 2021 labels at `box` of the reference's canonical grid."""
    seg = _load_segmentation(path, reference)
    return crop(to_canonical(seg, reference.affine)[0], box)


def _normalise_into(
    slices: np.ndarray, volume: np.ndarray, box: CropBox, scaling: IntensityScaling, cropped_mask: np.ndarray
) -> None:
    """Crop, normalise and cast `volume` into zeroed `slices` [Z, H, W] (any dtype, the reference path).

    A few slices at a time through a scratch that stays in the CPU cache instead of full-size float32
    intermediates: the same operations per voxel, a fraction of the memory traffic. Padding pixels stay
    zero: the scratch starts zeroed and the mask's zeros multiply them.
    """
    scratch = np.zeros((_SLICES_PER_BLOCK, *slices.shape[1:]), dtype=np.float32)
    for start in range(0, len(slices), _SLICES_PER_BLOCK):
        stop = min(start + _SLICES_PER_BLOCK, len(slices))
        block = scratch[: stop - start]
        _crop_into(block, volume, box, box.z[0] + start)
        normalise_in_place(block, scaling, cropped_mask[start:stop])
        slices[start:stop] = block


def _load_segmentation(path: Path, reference: LoadedVolume) -> np.ndarray:
    """uint8 label map on the reference grid, in BraTS 2021 labels (2023+ label 3 becomes 4)."""
    volume = load_volume(path, is_label=True, keep_integers=True)
    if not same_grid(volume.data.shape, volume.affine, reference.data.shape, reference.affine):
        difference = grid_difference(volume.data.shape, volume.affine, reference.data.shape, reference.affine)
        raise VolumeError(f"{path}: the seg is not on the grid of the images ({difference})")
    # In place: the loaded float32 copy is ours, and a full-size label map is mostly passes over memory.
    rounded = volume.data if volume.data.dtype.kind in "iu" else np.rint(volume.data, out=volume.data)
    # min/max first: np.unique on a full-size volume is slow, and only needed to name bad labels.
    if rounded.min() < 0 or rounded.max() > 4:
        unexpected = sorted(
            set(np.unique(rounded.astype(np.int16)).tolist()) - {0, 1, 2, _BRATS_2023_ENHANCING, 4}
        )
        raise VolumeError(f"{path}: seg has labels {unexpected}, expected BraTS labels 0 1 2 4 (or 3)")
    labels = rounded.astype(np.uint8)
    labels[labels == _BRATS_2023_ENHANCING] = 4
    return labels


def restore_volume(
    slices: np.ndarray,
    geometry: SubjectGeometry,
    scaling: IntensityScaling | None = None,
    header: nib.Nifti1Header | None = None,
    fill: float = 0.0,
) -> nib.Nifti1Image:
    """Put model slices back on the reference's original grid (nnU-Net style, each step undone).

    slices: [Z, H, W] for the crop box's axial range, normalised in [0, 1] when `scaling` is given
    (then denormalised into that modality's original units), else written as they are.
    fill: value for voxels outside the crop box or the kept slices. header: the reference file's
    header to keep (data type, units, descriptions); its geometry is reset to the original affine.
    Returns a NIfTI image with the original shape and affine of the reference volume.
    """
    values = denormalise(slices, scaling) if scaling is not None else np.asarray(slices)
    canonical = uncrop(values, geometry.crop, geometry.canonical_shape, fill=fill)
    original = from_canonical(canonical, geometry.reorientation)
    image = nib.Nifti1Image(original, geometry.reorientation.original_affine, header=header)
    image.set_qform(geometry.reorientation.original_affine, code=1)
    image.set_sform(geometry.reorientation.original_affine, code=1)
    return image
