"""Dice and HD95 of BraTS tumour regions: how a segmenter's label map is scored against the reference.

Regions (BraTS): whole tumour WT = necrotic core | oedema | enhancing tumour, tumour core TC = necrotic core
| enhancing tumour, enhancing tumour ET. BraTS 2021 labels are 1 necrotic core, 2 oedema, 4 enhancing;
BraTS 2023 renumbered enhancing tumour to 3 (`REGION_LABELS`). The segmenter's convention is given or
inferred from the labels it writes (`resolve_label_convention`); reference segmentations follow data_prep's
reading of a BraTS seg (3 and 4 both mean enhancing tumour).

Metrics per subject and region, over the whole volume (BraTS's "legacy" figures, not lesion-wise)
    Dice = 2 |P & R| / (|P| + |R|), in [0, 1].
    HD95 = the robust (95th percentile) Hausdorff distance, in mm: the larger of the two directed 95th
           percentiles, of the distances from each surface voxel of P to the nearest surface voxel of R and
           from each surface voxel of R to the nearest of P (as the BraTS 2023 code and MONAI take it; MedPy
           pools the two sets instead); a surface voxel is a mask voxel with a face neighbour outside the
           mask; distances use the voxel spacing (mm) from the reference's affine. In [0, inf).
    Empty regions, as BraTS scores them: both empty -> Dice 1, HD95 0; exactly one empty -> Dice 0 and
    HD95 = `HD95_MAX_PENALTY_MM` (374 mm).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from data_prep.errors import UserError
from medgan import metrics
from medgan.scoring import paired_statistics

LABEL_CONVENTIONS = ("brats2021", "brats2023")
REGIONS = ("WT", "TC", "ET")
REGION_NAMES = {"WT": "whole tumour", "TC": "tumour core", "ET": "enhancing tumour"}
# convention -> region -> the labels that make it up.
REGION_LABELS: dict[str, dict[str, frozenset[int]]] = {
    "brats2021": {"WT": frozenset({1, 2, 4}), "TC": frozenset({1, 4}), "ET": frozenset({4})},
    "brats2023": {"WT": frozenset({1, 2, 3}), "TC": frozenset({1, 3}), "ET": frozenset({3})},
}
# The BraTS 2023 evaluation replaces an infinite HD95 (a region empty in exactly one of prediction and
# reference) by 374 mm: rachitsaluja/BraTS-2023-Metrics eval.py, `replace(np.inf, 374)`, as announced in
# the organisers' "lesion-wise metrics" post (synapse.org/Synapse:syn51156910/discussion/threadId=10357).
HD95_MAX_PENALTY_MM = 374.0


class SegmenterError(UserError):
    """The segmenter command or what it wrote cannot be used; the one-line message names the command or
    file and what is wrong."""


@dataclass(frozen=True, slots=True)
class SegmentationScore:
    """One subject's scores over one region (``REGIONS``), for the real and the synthesized inputs.

    dice_*: in [0, 1]; dice_drop = dice_real - dice_synth (positive when synthesis hurts).
    hd95_*: mm in [0, inf); 0 when the region is empty in both, HD95_MAX_PENALTY_MM when in exactly one;
    hd95_increase = hd95_synth - hd95_real (positive when synthesis hurts).
    """

    subject: str
    region: str
    dice_real: float
    dice_synth: float
    dice_drop: float
    hd95_real: float
    hd95_synth: float
    hd95_increase: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SCORE_COLUMNS = ("dice_real", "dice_synth", "dice_drop", "hd95_real", "hd95_synth", "hd95_increase")


def infer_label_convention(label_values: Iterable[int], source: str = "the segmentations") -> str:
    """The label convention of label maps holding ``label_values``: label 4 -> "brats2021", label 3 ->
    "brats2023" (0 is background). source: where the labels come from, for the message.

    Raises SegmenterError (one line naming ``source`` and the labels found) when the labels are not BraTS
    tumour labels (outside 1-4), hold both 3 and 4, or neither (the two conventions cannot be told apart:
    the message asks for --segmenter-labels).
    """
    found = sorted({int(value) for value in label_values} - {0})
    shown = " ".join(map(str, found)) or "none"
    if any(label not in (1, 2, 3, 4) for label in found):
        raise SegmenterError(
            f"{source} has labels {shown}: not BraTS 2021 (1 2 4) or BraTS 2023 (1 2 3) tumour labels"
        )
    if 3 in found and 4 in found:
        raise SegmenterError(
            f"{source} has labels {shown}: both 3 and 4, so neither BraTS 2021 (1 2 4) nor BraTS 2023 "
            "(1 2 3) labels"
        )
    if 4 in found:
        return "brats2021"
    if 3 in found:
        return "brats2023"
    raise SegmenterError(
        f"{source} has labels {shown} (no 3 or 4), so its label convention cannot be inferred: "
        f"pass --segmenter-labels {' or '.join(LABEL_CONVENTIONS)}"
    )


def resolve_label_convention(
    label_values: Iterable[int], convention: str | None, source: str = "the segmentations"
) -> str:
    """``convention`` (the user's --segmenter-labels) checked against ``label_values``, or, when None,
    `infer_label_convention`. Raises SegmenterError naming the flag, ``source`` and the labels for an
    unknown convention or a label it does not use."""
    if convention is None:
        return infer_label_convention(label_values, source)
    if convention not in REGION_LABELS:
        raise SegmenterError(
            f"--segmenter-labels {convention}: expected one of {', '.join(LABEL_CONVENTIONS)}"
        )
    found = sorted({int(value) for value in label_values} - {0})
    allowed = REGION_LABELS[convention]["WT"]
    if any(label not in allowed for label in found):
        raise SegmenterError(
            f"--segmenter-labels {convention}: {source} has labels {' '.join(map(str, found))}, but "
            f"{convention} uses only {' '.join(map(str, sorted(allowed)))}"
        )
    return convention


def region_masks(labels: np.ndarray, convention: str) -> dict[str, np.ndarray]:
    """region -> bool mask (the shape of ``labels``) for each of ``REGIONS``, under ``convention``."""
    return {region: np.isin(labels, sorted(members)) for region, members in REGION_LABELS[convention].items()}


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice coefficient 2 |pred & ref| / (|pred| + |ref|) of two bool masks of one shape, in [0, 1].

    Both empty -> 1.0 (BraTS); exactly one empty -> 0.0.
    """
    pred, ref = _check_masks(pred, ref)
    total = int(pred.sum()) + int(ref.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(pred & ref)) / total


def hd95(pred: np.ndarray, ref: np.ndarray, spacing_mm) -> float:
    """Robust (95th percentile) Hausdorff distance between two bool masks of one shape, in mm.

    pred, ref: bool ``[X, Y, Z]`` (any number of axes). spacing_mm: voxel size per axis (mm), e.g.
    ``nibabel.affines.voxel_sizes(affine)``. The surface of a mask is its voxels with a face neighbour
    outside it (the array's border counts as outside). Returns the larger of the two directed 95th
    percentiles (numpy's linear interpolation) of the distances from each surface voxel of one mask to
    the nearest surface voxel of the other, as MONAI's ``compute_hausdorff_distance(percentile=95)`` and
    the BraTS 2023 code (which also weights each voxel by its surface area) do. Both empty -> 0.0;
    exactly one empty -> ``HD95_MAX_PENALTY_MM`` (BraTS). Identical masks -> 0.0.
    """
    pred, ref = _check_masks(pred, ref)
    spacing = np.asarray(spacing_mm, dtype=np.float64).ravel()
    if spacing.size != pred.ndim or not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise ValueError(f"spacing_mm {spacing.tolist()}: expected {pred.ndim} positive sizes in mm")
    pred_any, ref_any = bool(pred.any()), bool(ref.any())
    if not pred_any and not ref_any:
        return 0.0
    if not pred_any or not ref_any:
        return HD95_MAX_PENALTY_MM
    # Every surface voxel, and so every nearest one, lies in the bounding box of the union: Euclidean
    # distances computed inside it are exact, and the transforms run on a small box, not the whole head.
    box = _bounding_box(pred | ref)
    pred_surface, ref_surface = _surface(pred[box]), _surface(ref[box])
    pred_to_ref = _distances_to(ref_surface, spacing)[pred_surface]
    ref_to_pred = _distances_to(pred_surface, spacing)[ref_surface]
    return float(max(np.percentile(pred_to_ref, 95), np.percentile(ref_to_pred, 95)))


def _check_masks(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, ref = np.asarray(pred, dtype=bool), np.asarray(ref, dtype=bool)
    if pred.shape != ref.shape:
        raise ValueError(f"pred shape {pred.shape} != ref shape {ref.shape}")
    return pred, ref


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
    box = []
    for axis in range(mask.ndim):
        present = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(int(present[0]), int(present[-1]) + 1))
    return tuple(box)


def _surface(mask: np.ndarray) -> np.ndarray:
    """bool: the voxels of ``mask`` with a face neighbour outside it (border_value 0: the array's edge
    is outside)."""
    faces = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=faces, border_value=0)


def _distances_to(surface: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """float64, shape of ``surface``: each voxel's Euclidean distance (mm) to the nearest surface voxel."""
    return ndimage.distance_transform_edt(~surface, sampling=spacing)


def score_segmentations(
    real: Mapping[str, np.ndarray],
    synthesized: Mapping[str, np.ndarray],
    references: Mapping[str, np.ndarray],
    spacings_mm: Mapping[str, np.ndarray],
    convention: str,
) -> list[SegmentationScore]:
    """Rows subject x region (subjects sorted, regions in ``REGIONS`` order) scoring both runs.

    real, synthesized: id -> the segmenter's labels ``[X, Y, Z]`` in ``convention``; references: id ->
    BraTS 2021 labels ``[X, Y, Z]``; spacings_mm: id -> voxel size per axis (mm).
    """
    rows = []
    for subject in sorted(references):
        truth = region_masks(references[subject], "brats2021")
        from_real = region_masks(real[subject], convention)
        from_synth = region_masks(synthesized[subject], convention)
        for region in REGIONS:
            dice_real, dice_synth = (
                dice(from_real[region], truth[region]),
                dice(from_synth[region], truth[region]),
            )
            spacing = spacings_mm[subject]
            hd95_real = hd95(from_real[region], truth[region], spacing)
            hd95_synth = hd95(from_synth[region], truth[region], spacing)
            rows.append(
                SegmentationScore(
                    subject=subject,
                    region=region,
                    dice_real=dice_real,
                    dice_synth=dice_synth,
                    dice_drop=dice_real - dice_synth,
                    hd95_real=hd95_real,
                    hd95_synth=hd95_synth,
                    hd95_increase=hd95_synth - hd95_real,
                )
            )
    return rows


def summarize_segmentation(rows: Iterable[SegmentationScore]) -> dict[str, dict[str, Any]]:
    """region -> {each score column: ``metrics.summarize`` (mean, std, median, n, n_nan) over subjects,
    ``dice_drop_paired``: ``scoring.paired_statistics(dice_real, dice_synth)`` (mean_difference is the
    mean drop, with its 95% t interval and Wilcoxon p), ``hd95_increase_paired``:
    ``paired_statistics(hd95_synth, hd95_real)``}."""
    rows = list(rows)
    summary = {}
    for region in REGIONS:
        values = {
            column: np.array([getattr(row, column) for row in rows if row.region == region], dtype=np.float64)
            for column in SCORE_COLUMNS
        }
        summary[region] = {column: metrics.summarize(values[column]) for column in SCORE_COLUMNS}
        summary[region]["dice_drop_paired"] = paired_statistics(values["dice_real"], values["dice_synth"])
        summary[region]["hd95_increase_paired"] = paired_statistics(values["hd95_synth"], values["hd95_real"])
    return summary
