"""Per-slice and per-volume scores and their summaries: the one place validation (during training) and
evaluation (after it) turn a synthesized stack and its real target into numbers.

All scores are in the normalised ``[0, 1]`` scale (``data_range = 1``) with ``medgan.metrics``: PSNR and
MAE over the region's voxels, SSIM as Wang et al. 2004 (the mean of the SSIM map over the region), per
slice in 2D and per volume in 3D.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

from medgan import metrics

METRICS = ("psnr", "ssim", "mae")
# Per volume only: the slice-to-slice change against the real one's, SSIM on sagittal and coronal planes.
THROUGH_PLANE_METRICS = ("through_plane_error", "ssim_sagittal", "ssim_coronal")
VOLUME_METRICS = (*METRICS, *THROUGH_PLANE_METRICS)
REGIONS = ("brain", "tumour", "non_tumour")
# The methods an evaluation scores: the generator, the best single input copied, another checkpoint.
MODEL, COPY, UNET = "model", "best_input_copy", "baseline_checkpoint"
CONFIDENCE = 0.95


@dataclass(frozen=True, slots=True)
class SliceScore:
    """One axial slice's scores over one region (NaN where the slice's region is empty)."""

    method: str
    task: str
    subject: str
    slice: int
    region: str
    psnr: float
    ssim: float
    mae: float
    voxels: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True, slots=True)
class VolumeScore:
    """One subject's scores over every voxel of one region in its stack of slices (3D SSIM: NaN when the
    stack has fewer slices than the SSIM window), and its through-plane consistency
    (``medgan.metrics.through_plane_error``, ``plane_ssim``; the SSIMs NaN below 11 slices)."""

    method: str
    task: str
    subject: str
    region: str
    psnr: float
    ssim: float
    mae: float
    through_plane_error: float
    ssim_sagittal: float
    ssim_coronal: float
    voxels: int
    slices: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def region_masks(mask: np.ndarray, seg: np.ndarray | None) -> dict[str, np.ndarray]:
    """bool [Z, H, W] per region: brain; tumour (any label, within the brain) and the rest, with a seg."""
    regions = {"brain": mask}
    if seg is not None:
        regions["tumour"] = mask & (seg > 0)
        regions["non_tumour"] = mask & (seg == 0)
    return regions


def slice_scores(pred, target, mask) -> dict[str, np.ndarray]:
    """metric -> float64 ``[Z]``: each slice of ``pred`` vs ``target`` ``[Z, H, W]`` (numpy or torch, in
    ``[0, 1]``) over the bool ``mask`` ``[Z, H, W]``; NaN where a slice's mask is empty."""
    return {name: np.asarray(getattr(metrics, name)(pred, target, mask=mask), np.float64) for name in METRICS}


def volume_scores(pred: np.ndarray, target: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """metric (``VOLUME_METRICS``) -> float: ``pred`` vs ``target`` [Z, H, W] in [0, 1] over every voxel
    of ``mask`` (3D SSIM; NaN when Z < 11, the 3D window's length), and the through-plane metrics over it:
    the slice-to-slice change's error and SSIM on sagittal and coronal planes."""
    per_volume = {}
    for name in METRICS:
        if name == "ssim" and min(pred.shape) < metrics.SSIM_WIN_SIZE:
            per_volume[name] = math.nan
            continue
        per_volume[name] = float(getattr(metrics, name)(pred, target, mask=mask, spatial_dims=3))
    per_volume["through_plane_error"] = metrics.through_plane_error(pred, target, mask)
    for plane in metrics.PLANES:
        per_volume[f"ssim_{plane}"] = metrics.plane_ssim(pred, target, plane, mask)
    return per_volume


def score_slices(
    method: str,
    tasks: Sequence[str],
    subjects: Sequence[str],
    slices: np.ndarray,
    pred: np.ndarray,
    target: np.ndarray,
    mask: np.ndarray,
    seg: np.ndarray | None = None,
) -> list[SliceScore]:
    """Every region's per-slice scores of a stack of slices that may mix subjects and tasks (a batch).

    tasks, subjects: each slice's. slices: int ``[Z]`` axial index of each slice. pred, target: float
    ``[Z, H, W]`` in ``[0, 1]``. mask: bool ``[Z, H, W]`` brain mask. seg: BraTS labels ``[Z, H, W]`` or None.
    """
    rows = []
    for region, region_mask in region_masks(mask, seg).items():
        per_slice = slice_scores(pred, target, region_mask)
        voxels = region_mask.sum(axis=(1, 2))
        for index, slice_index in enumerate(slices):
            rows.append(
                SliceScore(
                    method,
                    tasks[index],
                    subjects[index],
                    int(slice_index),
                    region,
                    *(float(per_slice[name][index]) for name in METRICS),
                    int(voxels[index]),
                )  # fmt: skip
            )
    return rows


def score_subject(
    method: str,
    task: str,
    subject: str,
    slices: np.ndarray,
    pred: np.ndarray,
    target: np.ndarray,
    mask: np.ndarray,
    seg: np.ndarray | None,
) -> tuple[list[SliceScore], list[VolumeScore]]:
    """Every region's per-slice (:func:`score_slices`) and per-volume scores of one subject's synthesized
    stack; arguments as there, with one task and subject."""
    count = len(slices)
    slice_rows = score_slices(method, [task] * count, [subject] * count, slices, pred, target, mask, seg)
    return slice_rows, score_volume(method, task, subject, pred, target, mask, seg)


def score_volume(
    method: str,
    task: str,
    subject: str,
    pred: np.ndarray,
    target: np.ndarray,
    mask: np.ndarray,
    seg: np.ndarray | None,
) -> list[VolumeScore]:
    """Every region's per-volume scores (:func:`volume_scores`) of one subject's synthesized stack, without
    the per-slice ones (validation); arguments as :func:`score_subject`."""
    volume_rows = []
    for region, region_mask in region_masks(mask, seg).items():
        per_volume = volume_scores(pred, target, region_mask)
        volume_rows.append(
            VolumeScore(
                method,
                task,
                subject,
                region,
                *(per_volume[name] for name in VOLUME_METRICS),
                int(region_mask.sum()),
                int(region_mask.shape[0]),
            )  # fmt: skip
        )
    return volume_rows


def summarize_scores(
    rows: Iterable[SliceScore | VolumeScore], names: tuple[str, ...] = METRICS
) -> dict[str, dict[str, Any]]:
    """metric (of ``names``: ``VOLUME_METRICS`` for volume rows) -> ``metrics.summarize`` (mean, std,
    median, n, NaNs skipped and counted) over ``rows``."""
    rows = list(rows)
    return {
        name: metrics.summarize(np.array([getattr(row, name) for row in rows], dtype=np.float64))
        for name in names
    }


def paired_statistics(
    model: np.ndarray, baseline: np.ndarray, confidence: float = CONFIDENCE
) -> dict[str, Any]:
    """Paired comparison over subjects of per-volume values (pairs with a NaN are dropped).

    Returns n, mean_difference (model - baseline), the ``confidence`` t interval of the mean difference
    (as ``scipy.stats.ttest_rel(...).confidence_interval``; the key stays ``ci95`` whatever the level),
    the paired t test's two-sided p (``ttest_p``) and the two-sided Wilcoxon signed-rank p
    (``scipy.stats.wilcoxon``); NaN where too few pairs (n < 2 for the interval and the t test, all
    differences zero or n < 1 for the Wilcoxon test).
    """
    model, baseline = np.asarray(model, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    keep = np.isfinite(model) & np.isfinite(baseline)
    differences = model[keep] - baseline[keep]
    n = int(differences.size)
    result: dict[str, Any] = {"n": n, "mean_difference": float(differences.mean()) if n else math.nan}
    if n >= 2:
        spread = stats.t.ppf(0.5 + confidence / 2, n - 1) * differences.std(ddof=1) / math.sqrt(n)
        result["ci95"] = [result["mean_difference"] - spread, result["mean_difference"] + spread]
        result["ttest_p"] = float(stats.ttest_rel(model[keep], baseline[keep]).pvalue)
    else:
        result["ci95"] = [math.nan, math.nan]
        result["ttest_p"] = math.nan
    if n >= 1 and np.any(differences != 0):
        result["wilcoxon_p"] = float(stats.wilcoxon(model[keep], baseline[keep]).pvalue)
    else:
        result["wilcoxon_p"] = math.nan
    return result


def holm_adjusted(p_values: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the order given: sorted ascending, the i-th smallest (from
    0) is multiplied by ``m - i``, made non-decreasing, capped at 1. Rejecting where the adjusted p is
    below alpha controls the family-wise error rate at alpha (Holm 1979)."""
    if any(math.isnan(p) for p in p_values):
        raise ValueError(f"Holm's correction needs every p-value; got {p_values}")
    m = len(p_values)
    adjusted = [math.nan] * m
    running = 0.0
    for rank, index in enumerate(sorted(range(m), key=lambda i: p_values[i])):
        running = max(running, min(1.0, (m - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted


def spread_error_correlation(spread: np.ndarray, error: np.ndarray, mask: np.ndarray) -> float:
    """Spearman's rank correlation of a voxelwise spread and the absolute error over ``mask`` (one
    subject); NaN when either is constant there."""
    values, errors = spread[mask], error[mask]
    if values.size < 3 or np.ptp(values) == 0 or np.ptp(errors) == 0:
        return math.nan
    return float(stats.spearmanr(values, errors).statistic)


def error_by_spread_decile(spread: np.ndarray, error: np.ndarray) -> list[dict[str, float]]:
    """Mean absolute error in each decile of the spread (voxels pooled over subjects, 1-D arrays):
    ``[{"decile": 1..10, "spread_low", "spread_high", "mean_abs_error", "voxels"}]``; a spread that
    predicts the error has errors rising with the decile."""
    edges = np.quantile(spread, np.linspace(0, 1, 11))
    index = np.clip(np.searchsorted(edges, spread, side="right") - 1, 0, 9)
    return [
        {
            "decile": decile + 1,
            "spread_low": float(edges[decile]),
            "spread_high": float(edges[decile + 1]),
            "mean_abs_error": float(error[index == decile].mean()) if np.any(index == decile) else math.nan,
            "voxels": int(np.sum(index == decile)),
        }
        for decile in range(10)
    ]
