"""BraSyn's image score: the challenge's own SSIM in the tumour and outside it, on whole NIfTI volumes.

Upstream (what this module follows, operation for operation)
    Repository  https://github.com/hongweilibran/BraSyn (the BraSyn organisers; Hongwei Bran Li leads
                BraSyn at BraTS 2023-2025)
    Commit      890804083b446f3d6fa0b17a4ef09b174bcd0209 (HEAD, 2024-07-26); ``ssim.py`` last changed in
                ecdaf0020c42e5c301a69508656310bbdd2187ab (2024-07-03, "no prediction * 2")
    File        ``ssim.py``: ``__percentile_clip`` and ``compute_metrics``
    The 2025 tutorial (https://github.com/hongweilibran/BraSyn_tutorial, commit
    df9eb2af2904a1466faffc56f15f17d3714d6fe2) holds only the segmentation metrics (Dice, HD95); the image
    score is ``ssim.py`` above. Participants' copies of it keep its normalisation, regions and SSIM call
    unchanged: AImageLab-zip/BraSyn25 ``final_eval/get_ssim.py`` (commit
    ec02815257e6faeaa27ad4afbec6800bed45ee78; it also leaves NaN tumour scores out of its means) and
    duddns2048/ResViT ``metric_BRATS_3to1_real.py`` (commit 4a0d54a4fa9406fc99e0fead2d6e494015647545; it
    adds SSIM on the whole volume and a PSNR of the zeroed volumes over all voxels).

The computation, for one subject (``real`` the acquired contrast, ``pred`` the synthesized one, ``seg`` the
BraTS label map)
    1. Each volume is normalised by its *own* 0.5th and 99.5th percentiles (numpy's default linear
       interpolation) over the whole volume, background zeros included; a negative lower percentile is
       raised to 0; values are clipped to [lo, hi] and mapped to (v - lo) / (hi - lo), so into [0, 1].
       The prediction is not normalised with the reference's percentiles.
    2. tumour = seg > 0 (every label: necrosis, oedema, enhancing); non-tumour = everything else,
       background included.
    3. A region's volumes are the normalised volumes with the *other* region set to 0 (``x * mask`` and
       ``x * (1 - mask)``); nothing is cropped or masked out of the mean.
    4. SSIM is torchmetrics' ``StructuralSimilarityIndexMeasure()`` with its defaults, on the
       ``(1, 1, D, H, W)`` volumes, so 3D: Gaussian window sigma 1.5, 11 taps per axis, k1 0.01, k2 0.03,
       reflection padding, ``data_range=None`` (the range is max(pred.max() - pred.min(),
       real.max() - real.min()) of the two zeroed volumes, not a fixed 1), mean over the SSIM map.
    5. The challenge ranks ``ssim_tumour`` and ``ssim_non_tumour``. With an empty tumour both zeroed
       tumour volumes are all 0, the range is 0 and torchmetrics returns NaN; the upstream script keeps
       that NaN, and participants' copies leave such subjects out of the tumour mean. We return NaN too.

The torchmetrics version matters. torchmetrics before 1.4.2 (September 2024) averaged the SSIM map
without its 5-voxel border (``[5:-5]`` on every axis); 1.4.2 and later average the whole map. The
organisers' requirements do not pin a version, so which one scored a given year cannot be confirmed from
their code: BraSyn 2023 and most of BraSyn 2024 predate 1.4.2. ``legacy_border_crop=True`` gives the old
average from the current torchmetrics' full SSIM map (in float64 equal, to the last bit, to the upstream
script under torchmetrics 1.4.1 on our fixtures; 1.4.0 also began clamping negative rounding-error
variances to 0, which older versions did not, a difference at rounding level). :func:`brasyn_provenance`
records the version used.

Also returned, not ranked by the challenge: ``ssim_whole`` (the same SSIM on the normalised volumes,
nothing zeroed, as participants report it) and ``psnr_*`` / ``mse_*`` per region, computed on the
volumes normalised as above (each by its own percentiles, as ``ssim.py`` does for the ranked SSIM) over
the region's voxels only, with torchmetrics' ``PeakSignalNoiseRatio(data_range=1.0)`` and
``MeanSquaredError``. Checked against the organisers' ``evaluation_utils.py`` in the same repository
(``__percentile_clip`` and ``compute_metrics``, the BraTS inpainting score; added in commit
aa3ca3646d86646176954ca4c4be8709afce52b7, unchanged up to 890804083b44 above): it takes the same region
means with the same torchmetrics classes, but scales *both* volumes by the *reference's* percentiles,
taken with the scored region set to 0, so it scores a prediction's intensity units as well as its
structure. We do not follow that: MedGAN-SSM writes volumes on the ``[0, 1]`` healthy-median scale and
has no real target to borrow units from (a prediction on another scale would score near 0 dB there
whatever it shows), so our PSNR/MSE are scale-free like the ranked SSIM, and are **not** comparable with
numbers computed by ``evaluation_utils.py``. Participants' PSNRs differ too (see ResViT above): compare
PSNR/MSE only among numbers computed here.

Arithmetic: the normalisation runs in float64, as the upstream script does under NumPy 2 (``np.percentile``
returns float64 and ``np.clip`` of a tensor with float64 bounds returns a float64 tensor). The metrics run
in ``dtype``: torch.float64 reproduces the upstream script under NumPy 2 bit for bit (tested), but is
refused on the CPU for real volumes (see :func:`brasyn_scores`); torch.float32, the default, is within
1e-6 of it on our fixtures. Either way torchmetrics' metric object accumulates the SSIM in a float32
state, so SSIM values are float32 numbers. Files are read by ``data_prep.volumes.load_volume`` as float32:
exact for the integer and float32 files BraTS and most models write, rounded for float64 predictions.
The upstream script reads volumes with SimpleITK, whose arrays are nibabel's transposed (``[k, j, i]``);
we transpose the same way before the metrics, so that even their sums run in the same order.

Files: `score_brasyn_folder` scores one folder of predictions; `score_brasyn_methods` scores several
methods' volumes, loading, checking and normalising each subject's reference once (`load_reference`) and
scoring every method's volume against it (`score_prediction`), with the same numbers.

torchmetrics is not a runtime dependency of this package: it is imported only when a score is computed,
and its absence is a one-line :class:`UserError` saying how to install it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data_prep.errors import UserError, VolumeError
from data_prep.volumes import LoadedVolume, same_grid

UPSTREAM_REPOSITORY = "https://github.com/hongweilibran/BraSyn"
UPSTREAM_COMMIT = "890804083b446f3d6fa0b17a4ef09b174bcd0209"
UPSTREAM_FILE = "ssim.py"

PERCENTILES = (0.5, 99.5)
# The SSIM border torchmetrics < 1.4.2 left out of the mean: (11 - 1) // 2 voxels on every side.
LEGACY_BORDER = 5
RANKED_METRICS = ("ssim_tumour", "ssim_non_tumour")
METRICS = (
    "ssim_tumour",
    "ssim_non_tumour",
    "ssim_whole",
    "psnr_tumour",
    "psnr_non_tumour",
    "psnr_whole",
    "mse_tumour",
    "mse_non_tumour",
    "mse_whole",
)
_CPU_FLOAT64_LIMIT_BYTES = 4 * 2**30


def _torchmetrics():
    try:
        import torchmetrics
    except ImportError:
        raise UserError(
            "the BraSyn protocol scores with torchmetrics, which is not installed: pip install torchmetrics"
        ) from None
    return torchmetrics


def brasyn_provenance() -> dict[str, str]:
    """Where the protocol comes from and what computed it: upstream repository, commit and file, and the
    torchmetrics version (its SSIM changed in 1.4.2; see the module docstring)."""
    return {
        "protocol": "brasyn",
        "upstream_repository": UPSTREAM_REPOSITORY,
        "upstream_commit": UPSTREAM_COMMIT,
        "upstream_file": UPSTREAM_FILE,
        "torchmetrics": _torchmetrics().__version__,
    }


def brasyn_normalise(volume: np.ndarray) -> np.ndarray:
    """BraSyn's intensity normalisation of one volume, by its own percentiles.

    volume: any shape (a 3D ``[X, Y, Z]`` volume in practice), any real dtype, in scanner units; every
    voxel counts, background zeros included. Returns float64 of the same shape in ``[0, 1]``:
    ``(clip(v, lo, hi) - lo) / (hi - lo)`` with lo, hi the 0.5th and 99.5th percentiles (linear
    interpolation) and lo raised to 0 when negative. A volume whose two percentiles are equal has no
    defined normalisation (division by zero): NaN/Inf come out, as upstream.
    """
    data = np.asarray(volume, dtype=np.float64)
    lo, hi = np.percentile(data, PERCENTILES)
    if lo < 0:
        lo = 0.0
    with np.errstate(divide="ignore", invalid="ignore"):
        return (np.clip(data, lo, hi) - lo) / (hi - lo)


def _as_torch_volume(
    volume: np.ndarray, device: torch.device, dtype: torch.dtype | None = None
) -> torch.Tensor:
    # [X, Y, Z] (nibabel) -> [1, 1, Z, Y, X] (SimpleITK's order, which the upstream script reads)
    return torch.from_numpy(np.ascontiguousarray(volume.T))[None, None].to(device=device, dtype=dtype)


def _ssim(pred: torch.Tensor, real: torch.Tensor, legacy_border_crop: bool) -> float:
    image = _torchmetrics().image
    if not legacy_border_crop:
        # A fresh metric per call: forward() then returns this pair's value, as upstream's shared one does.
        return float(image.StructuralSimilarityIndexMeasure().to(pred.device)(preds=pred, target=real))
    metric = image.StructuralSimilarityIndexMeasure(return_full_image=True).to(pred.device)
    _, full_map = metric(preds=pred, target=real)
    b = LEGACY_BORDER
    inner = full_map[..., b:-b, b:-b, b:-b]
    # torchmetrics < 1.4.2 added the per-image means into a float32 state in place, as it still does
    state = torch.zeros((), dtype=torch.float32, device=inner.device)
    state += inner.reshape(1, -1).mean(-1).sum()
    return float(state)


def _psnr_mse(pred: torch.Tensor, real: torch.Tensor, region: torch.Tensor) -> tuple[float, float]:
    if not bool(region.any()):
        return math.nan, math.nan
    torchmetrics = _torchmetrics()
    p, r = pred[region], real[region]
    mse = torchmetrics.MeanSquaredError().to(p.device)(preds=p, target=r)
    psnr = torchmetrics.image.PeakSignalNoiseRatio(data_range=1.0).to(p.device)(preds=p, target=r)
    return float(psnr), float(mse)


@dataclass(frozen=True, slots=True)
class NormalisedReference:
    """One subject's acquired volume and tumour, ready to score any number of predictions against.

    real: the volume normalised by :func:`brasyn_normalise`, ``[1, 1, Z, Y, X]`` in ``dtype`` on the scoring
    device. tumour: int64 of the same shape, 1 where ``seg > 0``. shape: nibabel's ``[X, Y, Z]``.
    """

    real: torch.Tensor
    tumour: torch.Tensor
    shape: tuple[int, ...]
    dtype: torch.dtype


def normalised_reference(
    real: np.ndarray,
    seg: np.ndarray,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> NormalisedReference:
    """``real`` normalised and ``seg``'s tumour, once, for :func:`score_normalised` (arguments as for
    :func:`brasyn_scores`, whose checks of the grid, the size and the dtype are made here)."""
    shapes = {"real": np.shape(real), "seg": np.shape(seg)}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"BraSyn scoring needs one grid, got shapes {shapes}")
    if len(shapes["real"]) != 3 or min(shapes["real"]) <= LEGACY_BORDER:
        raise ValueError(
            f"BraSyn scoring needs 3D volumes longer than 5 voxels per axis, got {shapes['real']}"
        )
    device = torch.device(device)
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    # CPU conv3d in float64 unfolds the 11^3 window: 5 x 1331 x 8 bytes per voxel (475 GB for BraTS).
    unfolded = 5 * 1331 * 8 * int(np.prod(shapes["real"]))
    if dtype == torch.float64 and device.type == "cpu" and unfolded > _CPU_FLOAT64_LIMIT_BYTES:
        raise UserError(
            f"float64 BraSyn SSIM of a {shapes['real']} volume on the CPU needs {unfolded / 2**30:.0f} GiB;"
            " use float32 or a GPU"
        )
    return NormalisedReference(
        real=_as_torch_volume(brasyn_normalise(real), device, dtype),
        tumour=_as_torch_volume((np.asarray(seg) > 0).astype(np.int64), device),
        shape=tuple(shapes["real"]),
        dtype=dtype,
    )


def score_normalised(
    pred: np.ndarray, reference: NormalisedReference, *, legacy_border_crop: bool = False
) -> dict[str, float]:
    """:func:`brasyn_scores` of ``pred`` (``[X, Y, Z]``, scanner units, on the reference's grid) against a
    :func:`normalised_reference`; the same numbers, without normalising the reference again."""
    if np.shape(pred) != reference.shape:
        raise ValueError(
            f"BraSyn scoring needs one grid, got shapes pred {np.shape(pred)}, real {reference.shape}"
        )
    real_n, tumour = reference.real, reference.tumour
    pred_n = _as_torch_volume(brasyn_normalise(pred), real_n.device, reference.dtype)
    scores = {
        "ssim_tumour": _ssim(pred_n * tumour, real_n * tumour, legacy_border_crop),
        "ssim_non_tumour": _ssim(pred_n * (1 - tumour), real_n * (1 - tumour), legacy_border_crop),
        "ssim_whole": _ssim(pred_n, real_n, legacy_border_crop),
    }
    regions = {"tumour": tumour.bool(), "non_tumour": ~tumour.bool(), "whole": torch.ones_like(tumour).bool()}
    for name, region in regions.items():
        scores[f"psnr_{name}"], scores[f"mse_{name}"] = _psnr_mse(pred_n, real_n, region)
    return {key: scores[key] for key in METRICS}


def brasyn_scores(
    pred: np.ndarray,
    real: np.ndarray,
    seg: np.ndarray,
    *,
    legacy_border_crop: bool = False,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """BraSyn's scores for one subject.

    pred: the synthesized volume, real: the acquired one, both ``[X, Y, Z]`` as nibabel reads them, in
    their own scanner units (each is normalised here by :func:`brasyn_normalise`; do not pass our
    ``[0, 1]`` data_prep normalisation). seg: the BraTS label map ``[X, Y, Z]``, any integer labels; the
    tumour is ``seg > 0``. Every axis must be longer than 5 voxels (torchmetrics' reflection padding).
    legacy_border_crop: average the SSIM map without its 5-voxel border, as torchmetrics < 1.4.2 did.
    dtype: what the normalised volumes are cast to before torchmetrics. torch.float64 is the upstream
    script's arithmetic under NumPy 2 (bit for bit, tested), but the CPU's float64 conv3d unfolds the
    11^3 window (475 GB for a 240 x 240 x 155 BraTS volume), so it is refused on the CPU above 4 GiB.
    torch.float32 (default) runs anywhere and is within 1e-6 of float64 on our fixtures; under NumPy 1,
    whose casting kept float32 arrays float32, the upstream script also scored float32 files in float32.
    device: where torchmetrics runs ("cpu", "cuda"). One float32 SSIM of a BraTS volume takes about 35 s
    and 3.6 GB on two CPU cores; three are computed per subject.

    Returns a dict with the keys of :data:`METRICS`: ``ssim_*`` in [-1, 1] (1 for identical volumes;
    ``ssim_tumour`` and ``ssim_non_tumour`` are what the challenge ranks), ``psnr_*`` in dB
    (``+inf`` for identical voxels), ``mse_*`` in squared normalised units, in [0, 1]. A region without
    voxels (no tumour) gives NaN for its three metrics.
    """
    shapes = {"pred": np.shape(pred), "real": np.shape(real), "seg": np.shape(seg)}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"BraSyn scoring needs one grid, got shapes {shapes}")
    reference = normalised_reference(real, seg, dtype=dtype, device=device)
    return score_normalised(pred, reference, legacy_border_crop=legacy_border_crop)


def load_for_scoring(path: Path, *, is_label: bool = False) -> LoadedVolume:
    """A volume through data_prep's loader, refused (one-line VolumeError) if any voxel is NaN or Inf:
    the loader sets them to 0 and counts them by value (``nan_voxels``, ``inf_voxels``)."""
    # Looked up per call, so the tests can count and replace the loader's reads.
    from data_prep.volumes import load_volume

    volume = load_volume(path, is_label=is_label)
    if volume.nan_voxels or volume.inf_voxels:
        # Upstream would score NaN; a zeroed voxel would score as if the model had predicted 0.
        raise VolumeError(
            f"{path}: {volume.nan_voxels} NaN and {volume.inf_voxels} Inf voxels, "
            "the BraSyn score is undefined"
        )
    return volume


def check_on_reference_grid(volume: LoadedVolume, reference: LoadedVolume) -> None:
    """A one-line VolumeError naming both files unless ``volume`` is on ``reference``'s grid
    (``data_prep.volumes.same_grid``)."""
    if not same_grid(volume.data.shape, volume.affine, reference.data.shape, reference.affine):
        what = "shape" if volume.data.shape != reference.data.shape else "affine"
        raise VolumeError(f"{_describe(volume)}: {what} differs from the reference {_describe(reference)}")


def _describe(volume: LoadedVolume) -> str:
    return f"{volume.path} (shape {volume.data.shape})"


@dataclass(frozen=True, slots=True)
class BrasynReference:
    """A subject's acquired volume and segmentation, loaded from their files, checked and normalised once.

    real: the acquired volume as loaded (its grid and path name it in errors). tumour_voxels: count of
    ``seg > 0``. normalised: what predictions are scored against (:func:`score_normalised`).
    """

    real: LoadedVolume
    tumour_voxels: int
    normalised: NormalisedReference


def load_reference(
    real_path: str | Path,
    seg_path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> BrasynReference:
    """Load, check and normalise one subject's acquired volume and segmentation (one grid, no NaN/Inf
    voxels, else a one-line VolumeError naming the file)."""
    real = load_for_scoring(Path(real_path))
    seg = load_for_scoring(Path(seg_path), is_label=True)
    check_on_reference_grid(seg, real)
    return BrasynReference(
        real=real,
        tumour_voxels=int(np.count_nonzero(seg.data > 0)),
        normalised=normalised_reference(real.data, seg.data, dtype=dtype, device=device),
    )


def score_prediction(
    reference: BrasynReference, path: str | Path, *, legacy_border_crop: bool = False
) -> dict[str, str | int | float]:
    """One row: ``tumour_voxels`` and the :data:`METRICS` of the prediction in ``path`` against
    ``reference`` (a one-line VolumeError if the file is unreadable, has NaN/Inf voxels or is off the
    reference's grid)."""
    pred = load_for_scoring(Path(path))
    check_on_reference_grid(pred, reference.real)
    scores = score_normalised(pred.data, reference.normalised, legacy_border_crop=legacy_border_crop)
    return {"tumour_voxels": reference.tumour_voxels, **scores}


def score_brasyn_methods(
    predictions: Mapping[str, Mapping[str, str | Path]],
    references: Mapping[str, tuple[str | Path, str | Path]],
    *,
    legacy_border_crop: bool = False,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> dict[str, list[dict[str, str | int | float]]]:
    """Score several methods' predictions against references each loaded and normalised once per subject.

    predictions: method -> subject -> synthesized volume; a method may leave subjects out (they get no
    row), but every subject must have a reference, else a one-line :class:`UserError`. references: as
    for :func:`score_brasyn_folder`. Returns method -> its rows as :func:`score_brasyn_folder` returns
    them (sorted by subject), in the order of ``predictions``.
    """
    for files in predictions.values():
        extra = sorted(set(files) - set(references))
        if extra:
            raise UserError(f"{files[extra[0]]}: no reference volume for subject {extra[0]!r}")
    _torchmetrics()  # fail on a missing torchmetrics before loading any volume
    rows: dict[str, list[dict[str, str | int | float]]] = {method: [] for method in predictions}
    for subject in sorted(set().union(*predictions.values())):
        reference = load_reference(*references[subject], dtype=dtype, device=device)
        for method, files in predictions.items():
            if subject in files:
                row = score_prediction(reference, files[subject], legacy_border_crop=legacy_border_crop)
                rows[method].append({"subject": subject, **row})
    return rows


def score_brasyn_folder(
    predictions: Mapping[str, str | Path],
    references: Mapping[str, tuple[str | Path, str | Path]],
    *,
    legacy_border_crop: bool = False,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> list[dict[str, str | int | float]]:
    """Score synthesized NIfTI volumes against their references, one row per subject.

    predictions: subject -> synthesized volume (``.nii`` / ``.nii.gz``). references: subject ->
    (acquired volume of the same contrast, BraTS segmentation). Both must name the same subjects; every
    prediction, reference and segmentation of a subject must share one voxel grid (shape, and affine to
    1e-3 mm: ``data_prep.volumes.same_grid``), else a one-line :class:`VolumeError` names both files.
    Missing, unreadable, non-3D or all-zero image files are :class:`VolumeError` too
    (``data_prep.volumes.load_volume``), and so are NaN/Inf voxels.

    Returns rows sorted by subject: ``subject``, ``tumour_voxels`` (count of ``seg > 0``), and the
    :data:`METRICS` of :func:`brasyn_scores` (whose ``legacy_border_crop``, ``dtype`` and ``device`` these
    arguments are).
    """
    missing = sorted(set(references) - set(predictions))
    if missing:
        listed = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise UserError(f"no prediction for {len(missing)} subject(s) with a reference: {listed}")
    method = "predictions"
    return score_brasyn_methods(
        {method: predictions}, references, legacy_border_crop=legacy_border_crop, dtype=dtype, device=device
    )[method]
