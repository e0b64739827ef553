"""PSNR / SSIM / MAE of a generator on held-out subjects, beside two baselines, with paired statistics.

For every (inputs -> target) task the generator serves, every subject that has the inputs and the target
is synthesized slice by slice and scored against its real target:

- per slice (2D, ``medgan.metrics`` with ``spatial_dims=2``) and per volume (3D over the subject's stack
  of slices, ``spatial_dims=3``: PSNR and MAE pool every voxel, SSIM uses a 3D Gaussian window), in
  the normalised ``[0, 1]`` scale (``data_range=1``);
- over the brain mask (``brain``) and, where a segmentation exists, inside (``tumour``: any label) and
  outside (``non_tumour``) the tumour within the mask.

Two baselines are scored on the same slices: the best single input copied as it is (the input whose
copy has the highest mean per-volume PSNR on the validation split, or on the evaluated subjects when
there is none) and, when given, another generator checkpoint (the plain U-Net). Against each, over
subjects, the paired difference (model minus baseline) of the per-volume brain figures: mean with a
95% t confidence interval, and the two-sided Wilcoxon signed-rank p-value (scipy).

Subjects come from a shard split (the slices data_prep kept) or a folder of NIfTI subjects (prepared
by data_prep, whole in-plane extent). Outputs in ``--out``: ``per_slice.csv``, ``per_volume.csv``,
``summary.json`` and ``views/`` (three orthogonal planes per subject, for the report).
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats
from tqdm import tqdm

from data_prep.errors import UserError
from medgan import metrics
from medgan.data import read_split
from medgan.export import LoadedGenerator
from medgan.models.conditioning import canonical_modality
from medgan.synthesis import (
    SEGMENTATION,
    SynthesisError,
    default_reference,
    find_subjects,
    predict_slices,
    prepare_nifti_subject,
)

METRICS = ("psnr", "ssim", "mae")
MODEL, COPY, UNET = "model", "best_input_copy", "baseline_checkpoint"
REGIONS = ("brain", "tumour", "non_tumour")
CONFIDENCE = 0.95


class EvaluationError(UserError):
    """The data or flags a user gave cannot be evaluated; the one-line message names them."""


@dataclass(frozen=True, slots=True)
class Task:
    """One synthesis task: the contrasts shown to the model and the one it synthesizes."""

    inputs: tuple[str, ...]
    target: str

    @property
    def name(self) -> str:
        return f"{'+'.join(self.inputs)}->{self.target}"

    @property
    def folder_name(self) -> str:
        """The name without characters some file systems refuse (``>``)."""
        return f"{'+'.join(self.inputs)}_to_{self.target}"


@dataclass(slots=True)
class SubjectSlices:
    """One subject, ready to score.

    images: float32 [Z, M, H, W] in [0, 1] in the generator's channel order (absent contrasts zero).
    present: the contrasts the subject has. mask: bool [Z, H, W] brain (or head) mask.
    seg: uint8 [Z, H, W] BraTS labels, or None. slices: int [Z] axial slice index of each slice.
    spacing: voxel size in mm along (Z, H, W), for displaying sagittal and coronal views.
    """

    subject: str
    images: np.ndarray
    present: list[str]
    mask: np.ndarray
    seg: np.ndarray | None
    slices: np.ndarray
    spacing: tuple[float, float, float]


def _decode_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def _spacing(geometry: dict[str, Any] | None) -> tuple[float, float, float]:
    """(z, x, y) mm of the canonical grid; slices are [Z, H = x, W = y]."""
    if not geometry:
        return (1.0, 1.0, 1.0)
    x, y, z = np.linalg.norm(np.asarray(geometry["canonical_affine"])[:3, :3], axis=0)
    return (float(z), float(x), float(y))


class ShardSubjects:
    """Subjects of one split of a shard folder, a whole subject at a time (shards keep subjects
    contiguous), in the generator's channel order."""

    def __init__(self, data_path: str | Path, split: str, modalities: list[str]) -> None:
        self.split = read_split(data_path, split)
        manifest = json.loads((Path(data_path) / "manifest.json").read_text())
        self.records = manifest.get("subjects", {})
        self.subjects = manifest["splits"][split].get("subjects", [])
        self.modalities = list(modalities)
        unknown = [m for m in self.split.modalities if m not in self.modalities]
        if unknown:
            raise EvaluationError(
                f"{data_path}: contrasts {' '.join(unknown)} are not among the checkpoint's "
                f"{' '.join(self.modalities)}"
            )
        self.scope = f"the axial slices in the {split!r} shards of {data_path}"

    @property
    def available_modalities(self) -> list[str]:
        return list(self.split.modalities)

    def __len__(self) -> int:
        return len(self.subjects)

    def __iter__(self) -> Iterator[SubjectSlices]:
        from webdataset.tariterators import tarfile_samples

        channels = [self.modalities.index(m) for m in self.split.modalities]
        current: str | None = None
        parts: list[dict[str, Any]] = []
        for raw in tarfile_samples([{"url": str(path)} for path in self.split.shards]):
            info = json.loads(raw["json"])
            if info["subject"] != current and parts:
                yield self._subject(current, parts, channels)
                parts = []
            current = info["subject"]
            parts.append(
                {"info": info, **{k: raw[k] for k in ("img.npy", "mask.npy", "seg.npy") if k in raw}}
            )
        if parts:
            yield self._subject(current, parts, channels)

    def _subject(self, subject: str, parts: list[dict[str, Any]], channels: list[int]) -> SubjectSlices:
        parts.sort(key=lambda part: part["info"]["slice"])
        stored = np.stack([_decode_npy(part["img.npy"]) for part in parts]).astype(np.float32)
        images = np.zeros((stored.shape[0], len(self.modalities), *stored.shape[2:]), dtype=np.float32)
        images[:, channels] = stored
        has_seg = all("seg.npy" in part for part in parts)
        record = self.records.get(subject, {})
        return SubjectSlices(
            subject=subject,
            images=images,
            present=[canonical_modality(m) for m in parts[0]["info"]["present"]],
            mask=np.stack([_decode_npy(part["mask.npy"]) for part in parts]).astype(bool),
            seg=np.stack([_decode_npy(part["seg.npy"]) for part in parts]) if has_seg else None,
            slices=np.array([part["info"]["slice"] for part in parts]),
            spacing=_spacing(record.get("geometry")),
        )


class NiftiSubjects:
    """Subjects in a folder of NIfTI files (see `medgan.synthesis.find_subjects`), each prepared by
    data_prep like the shards but keeping the whole in-plane extent. Subjects that cannot be prepared
    are listed in `failures` with the reason."""

    def __init__(self, folder: str | Path, generator: LoadedGenerator) -> None:
        self.found = find_subjects(folder)
        self.generator = generator
        self.failures: list[str] = []
        contrasts = {m for files in self.found.subjects.values() for m in files if m != SEGMENTATION}
        self._available = [m for m in generator.modalities if m in contrasts]
        self.subjects = list(self.found.subjects)
        self.scope = (
            f"the whole brain (mask) of each NIfTI subject in {folder}, over the axial slices data_prep "
            "keeps (at least 10% of the largest axial mask area)"
        )

    @property
    def available_modalities(self) -> list[str]:
        return self._available

    def __len__(self) -> int:
        return len(self.subjects)

    def __iter__(self) -> Iterator[SubjectSlices]:
        from data_prep.volumes import VolumeError

        for subject, files in self.found.subjects.items():
            usable = {m: p for m, p in files.items() if m in self.generator.modalities or m == SEGMENTATION}
            contrasts = [m for m in usable if m != SEGMENTATION]
            if not contrasts:
                self.failures.append(f"{subject}: no contrast the checkpoint knows")
                continue
            try:
                prepared = prepare_nifti_subject(self.generator, usable, default_reference(contrasts))
            except (SynthesisError, VolumeError) as error:
                self.failures.append(f"{subject}: {error}")
                continue
            first = prepared.geometry.crop.z[0]
            yield SubjectSlices(
                subject=subject,
                images=prepared.images.transpose(1, 0, 2, 3),
                present=list(prepared.present),
                mask=prepared.mask.astype(bool),
                seg=prepared.seg,
                slices=np.arange(first, first + prepared.mask.shape[0]),
                spacing=_spacing(prepared.geometry.to_dict()),
            )


def tasks_to_evaluate(
    generator: LoadedGenerator,
    available: list[str],
    inputs: list[str] | None = None,
    target: str | None = None,
) -> list[Task]:
    """The tasks to score: the one the flags name; else the one the model was trained on; else (a model
    trained for every task) each contrast of the data as target from all the others."""
    inputs = [canonical_modality(m) for m in inputs or []]
    target = canonical_modality(target) if target and target != "any" else None
    if inputs and not target:
        raise EvaluationError("--input_modalities needs --target_modality")
    if target is None and generator.trained_target != "any":
        target = generator.trained_target
    targets = [target] if target else [m for m in available if m in generator.modalities]
    tasks = []
    for name in targets:
        chosen = inputs or generator.trained_inputs or [m for m in available if m != name]
        reason = generator.serves(chosen, name)
        if reason:
            raise EvaluationError(reason)
        if name not in available:
            raise EvaluationError(f"--target_modality {name}: the data has no {name} ({' '.join(available)})")
        missing = [m for m in chosen if m not in available]
        if missing:
            raise EvaluationError(f"input {' '.join(missing)}: the data has no such contrast")
        if chosen:
            tasks.append(Task(tuple(chosen), name))
    if not tasks:
        raise EvaluationError(
            f"no task to evaluate: the data has only {' '.join(available) or 'no contrast'}"
        )
    return tasks


def region_masks(mask: np.ndarray, seg: np.ndarray | None) -> dict[str, np.ndarray]:
    """bool [Z, H, W] per region: brain; tumour (any label, within the brain) and the rest, with a seg."""
    regions = {"brain": mask}
    if seg is not None:
        regions["tumour"] = mask & (seg > 0)
        regions["non_tumour"] = mask & (seg == 0)
    return regions


def score_volume(pred: np.ndarray, target: np.ndarray, mask: np.ndarray) -> tuple[dict, dict]:
    """(per-slice, per-volume) metrics of ``pred`` vs ``target`` [Z, H, W] in [0, 1] over ``mask``.

    per-slice: metric -> float64 [Z] (NaN where the slice's mask is empty); per-volume: metric ->
    float over every masked voxel of the stack (3D SSIM; NaN when Z < 11, the 3D window's length).
    """
    per_slice = {name: getattr(metrics, name)(pred, target, mask=mask) for name in METRICS}
    per_volume = {}
    for name in METRICS:
        if name == "ssim" and min(pred.shape) < metrics.SSIM_WIN_SIZE:
            per_volume[name] = math.nan
            continue
        per_volume[name] = float(getattr(metrics, name)(pred, target, mask=mask, spatial_dims=3))
    return per_slice, per_volume


def paired_statistics(
    model: np.ndarray, baseline: np.ndarray, confidence: float = CONFIDENCE
) -> dict[str, Any]:
    """Paired comparison over subjects of per-volume values (pairs with a NaN are dropped).

    Returns n, mean_difference (model - baseline), the ``confidence`` t interval of the mean difference
    (as ``scipy.stats.ttest_rel(...).confidence_interval``) and the two-sided Wilcoxon signed-rank p
    (``scipy.stats.wilcoxon``); NaN where too few pairs (n < 2 for the interval, all differences zero
    or n < 1 for the test).
    """
    model, baseline = np.asarray(model, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    keep = np.isfinite(model) & np.isfinite(baseline)
    differences = model[keep] - baseline[keep]
    n = int(differences.size)
    result: dict[str, Any] = {"n": n, "mean_difference": float(differences.mean()) if n else math.nan}
    if n >= 2:
        spread = stats.t.ppf(0.5 + confidence / 2, n - 1) * differences.std(ddof=1) / math.sqrt(n)
        result["ci95"] = [result["mean_difference"] - spread, result["mean_difference"] + spread]
    else:
        result["ci95"] = [math.nan, math.nan]
    if n >= 1 and np.any(differences != 0):
        result["wilcoxon_p"] = float(stats.wilcoxon(model[keep], baseline[keep]).pvalue)
    else:
        result["wilcoxon_p"] = math.nan
    return result


def _plane_indices(mask: np.ndarray, seg: np.ndarray | None) -> tuple[int, int, int]:
    """(z, x, y) planes to show: through the tumour's centre when there is one, else the brain's."""
    focus = seg > 0 if seg is not None and np.any(seg > 0) else mask
    if not np.any(focus):
        return tuple(n // 2 for n in mask.shape)
    z = int(np.argmax(focus.sum(axis=(1, 2))))
    centre = np.argwhere(focus).mean(axis=0)
    return z, int(round(centre[1])), int(round(centre[2]))


def orthogonal_views(volumes: dict[str, np.ndarray], mask: np.ndarray, seg: np.ndarray | None) -> dict:
    """Axial [H, W], sagittal [Z, W] and coronal [Z, H] planes of each [..., Z, H, W] volume."""
    z, x, y = _plane_indices(mask, seg)
    views = {}
    for name, volume in volumes.items():
        views[f"axial_{name}"] = volume[..., z, :, :]
        views[f"sagittal_{name}"] = volume[..., :, x, :]
        views[f"coronal_{name}"] = volume[..., :, :, y]
    return views


@dataclass(slots=True)
class _Collected:
    """Rows gathered during the pass; the copy baseline's rows are filtered once its input is chosen."""

    slice_rows: list[dict[str, Any]] = field(default_factory=list)
    volume_rows: list[dict[str, Any]] = field(default_factory=list)


def _channels(generator: LoadedGenerator, images: np.ndarray, modalities: list[str]) -> np.ndarray:
    """images [Z, M, H, W] in ``modalities`` order -> the same in ``generator.modalities`` order."""
    if generator.modalities == modalities:
        return images
    mapped = np.zeros((images.shape[0], len(generator.modalities), *images.shape[2:]), dtype=np.float32)
    for channel, name in enumerate(generator.modalities):
        if name in modalities:
            mapped[:, channel] = images[:, modalities.index(name)]
    return mapped


def _score_rows(
    collected: _Collected,
    method: str,
    task: Task,
    subject: SubjectSlices,
    pred: np.ndarray,
    target: np.ndarray,
) -> None:
    for region, mask in region_masks(subject.mask, subject.seg).items():
        per_slice, per_volume = score_volume(pred, target, mask)
        voxels = mask.sum(axis=(1, 2))
        for index, slice_index in enumerate(subject.slices):
            collected.slice_rows.append(
                {
                    "method": method,
                    "task": task.name,
                    "subject": subject.subject,
                    "slice": int(slice_index),
                    "region": region,
                    **{name: float(per_slice[name][index]) for name in METRICS},
                    "voxels": int(voxels[index]),
                }
            )
        collected.volume_rows.append(
            {
                "method": method,
                "task": task.name,
                "subject": subject.subject,
                "region": region,
                **per_volume,
                "voxels": int(mask.sum()),
                "slices": int(mask.shape[0]),
            }
        )


def _copy_choice_on(subjects, tasks: list[Task], modalities: list[str]) -> dict[str, str]:
    """Per task, the input whose copy has the highest mean per-volume brain PSNR on ``subjects``."""
    scores: dict[str, dict[str, list[float]]] = {task.name: {m: [] for m in task.inputs} for task in tasks}
    for subject in tqdm(subjects, desc="choose copied input", unit="subject", disable=None):
        for task in tasks:
            if not _serves(subject, task):
                continue
            target = subject.images[:, modalities.index(task.target)]
            for name in task.inputs:
                copy = subject.images[:, modalities.index(name)]
                value = metrics.psnr(copy, target, mask=subject.mask, spatial_dims=3)
                scores[task.name][name].append(float(value))
    return {
        task: max(by_input, key=lambda m: np.nanmean(by_input[m]) if by_input[m] else -math.inf)
        for task, by_input in scores.items()
    }


def _copy_choice_from_rows(volume_rows: list[dict[str, Any]], tasks: list[Task]) -> dict[str, str]:
    """Per task, the input whose copy has the highest mean per-volume brain PSNR in the rows scored."""
    choice = {}
    for task in tasks:
        means = {
            name: np.nanmean(
                [
                    r["psnr"]
                    for r in volume_rows
                    if r["task"] == task.name and r["region"] == "brain" and r["method"] == f"{COPY}:{name}"
                ]
                or [math.nan]
            )
            for name in task.inputs
        }
        choice[task.name] = max(means, key=lambda name: -math.inf if math.isnan(means[name]) else means[name])
    return choice


def _serves(subject: SubjectSlices, task: Task) -> bool:
    return task.target in subject.present and all(m in subject.present for m in task.inputs)


def _json_safe(value: Any) -> Any:
    """NaN and infinities become null: JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return value


def _write_csv(path: Path, rows: list[dict[str, Any]], columns: list[str]) -> None:
    with open(path, "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def _summaries(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        name: metrics.summarize(np.array([row[name] for row in rows], dtype=np.float64)) for name in METRICS
    }


def _examples(volume_rows: list[dict[str, Any]]) -> dict[str, str]:
    """best / median / worst subject by the model's per-volume brain PSNR."""
    ranked = sorted(
        (row for row in volume_rows if row["method"] == MODEL and row["region"] == "brain"),
        key=lambda row: -math.inf if math.isnan(row["psnr"]) else row["psnr"],
        reverse=True,
    )
    if not ranked:
        return {}
    return {
        "best": ranked[0]["subject"],
        "median": ranked[len(ranked) // 2]["subject"],
        "worst": ranked[-1]["subject"],
    }


def evaluate(
    generator: LoadedGenerator,
    subjects: ShardSubjects | NiftiSubjects,
    tasks: list[Task],
    out: Path,
    *,
    baseline: LoadedGenerator | None = None,
    selection_subjects: ShardSubjects | None = None,
    batch_size: int = 8,
    description: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Score ``generator`` and the baselines on ``subjects`` for each task; write the CSVs, views and
    ``summary.json`` into ``out`` and return the summary. ``selection_subjects``: where the copied
    input is chosen (the validation split), None to choose on ``subjects`` themselves."""
    out.mkdir(parents=True, exist_ok=True)
    if baseline is not None:
        for task in tasks:
            reason = baseline.serves(list(task.inputs), task.target)
            if reason:
                raise EvaluationError(f"--baseline-checkpoint: {reason}")
    modalities = generator.modalities
    collected = _Collected()
    skipped: dict[str, list[str]] = {task.name: [] for task in tasks}
    seconds = {MODEL: 0.0, UNET: 0.0}
    evaluated = 0
    for subject in tqdm(subjects, total=len(subjects), desc="evaluate", unit="subject", disable=None):
        evaluated += 1
        for task in tasks:
            if not _serves(subject, task):
                skipped[task.name].append(subject.subject)
                continue
            target = subject.images[:, modalities.index(task.target)]
            mask = subject.mask.astype(np.float32)
            started = time.perf_counter()
            pred = (
                predict_slices(generator, subject.images, list(task.inputs), task.target, batch_size) * mask
            )
            seconds[MODEL] += time.perf_counter() - started
            _score_rows(collected, MODEL, task, subject, pred, target)
            for name in task.inputs:
                copy = subject.images[:, modalities.index(name)]
                _score_rows(collected, f"{COPY}:{name}", task, subject, copy, target)
            if baseline is not None:
                started = time.perf_counter()
                images = _channels(baseline, subject.images, modalities)
                baseline_pred = predict_slices(baseline, images, list(task.inputs), task.target, batch_size)
                seconds[UNET] += time.perf_counter() - started
                _score_rows(collected, UNET, task, subject, baseline_pred * mask, target)
            views = orthogonal_views(
                {
                    "inputs": subject.images[:, [modalities.index(m) for m in task.inputs]].transpose(
                        1, 0, 2, 3
                    ),
                    "synthesized": pred,
                    "real": target,
                    "mask": mask,
                },
                subject.mask,
                subject.seg,
            )
            view_dir = out / "views" / task.folder_name
            view_dir.mkdir(parents=True, exist_ok=True)
            np.savez_compressed(
                view_dir / f"{subject.subject}.npz",
                **{key: value.astype(np.float16) for key, value in views.items()},
                input_names=np.array(task.inputs),
                spacing=np.array(subject.spacing),
            )
    if evaluated == 0 or not collected.volume_rows:
        failures = getattr(subjects, "failures", [])
        detail = f" ({failures[0]})" if failures else ""
        raise EvaluationError(f"no subject could be evaluated{detail}")

    chosen_on = "the validation split" if selection_subjects is not None else "the evaluated subjects"
    if selection_subjects is not None:
        copy_choice = _copy_choice_on(selection_subjects, tasks, modalities)
    else:
        copy_choice = _copy_choice_from_rows(collected.volume_rows, tasks)

    def rename(row: dict[str, Any]) -> dict[str, Any] | None:
        if not row["method"].startswith(COPY):
            return row
        if row["method"] != f"{COPY}:{copy_choice[row['task']]}":
            return None
        return {**row, "method": COPY}

    slice_rows = [r for r in map(rename, collected.slice_rows) if r is not None]
    volume_rows = [r for r in map(rename, collected.volume_rows) if r is not None]
    _write_csv(out / "per_slice.csv", slice_rows, list(slice_rows[0]))
    _write_csv(out / "per_volume.csv", volume_rows, list(volume_rows[0]))

    methods = [MODEL, COPY] + ([UNET] if baseline is not None else [])
    task_summaries = {}
    for task in tasks:
        task_volumes = [r for r in volume_rows if r["task"] == task.name]
        task_slices = [r for r in slice_rows if r["task"] == task.name]
        by_method = {}
        for method in methods:
            by_method[method] = {
                region: {
                    "per_volume": _summaries(
                        [r for r in task_volumes if r["method"] == method and r["region"] == region]
                    ),
                    "per_slice": _summaries(
                        [r for r in task_slices if r["method"] == method and r["region"] == region]
                    ),
                }
                for region in REGIONS
                if any(r["region"] == region for r in task_volumes)
            }
        brain = {
            method: {
                r["subject"]: r for r in task_volumes if r["method"] == method and r["region"] == "brain"
            }
            for method in methods
        }
        order = sorted(brain[MODEL])
        paired = {
            method: {
                name: paired_statistics(
                    np.array([brain[MODEL][s][name] for s in order]),
                    np.array([brain[method][s][name] for s in order]),
                )
                for name in METRICS
            }
            for method in methods[1:]
        }
        task_summaries[task.name] = {
            "inputs": list(task.inputs),
            "target": task.target,
            "subjects": len(order),
            "skipped_subjects": skipped[task.name],
            "best_input_copy": {"input": copy_choice[task.name], "chosen_on": chosen_on},
            "methods": by_method,
            "paired": paired,
            "examples": _examples(task_volumes),
            "views": f"views/{task.folder_name}",
        }
    summary = {
        **(description or {}),
        "scope": subjects.scope,
        "checkpoint": generator.source,
        "baseline_checkpoint": baseline.source if baseline is not None else None,
        "subjects_evaluated": evaluated,
        "failed_subjects": getattr(subjects, "failures", []),
        "data_range": 1.0,
        "methods": {
            MODEL: "the generator under evaluation",
            COPY: f"the input contrast with the best mean per-volume brain PSNR on {chosen_on}, copied as is",
            **({UNET: "the generator of --baseline-checkpoint (e.g. the plain U-Net)"} if baseline else {}),
        },
        "definitions": {
            "intensities": "each contrast normalised into [0, 1] by data_prep (0.5-99.5 percentile in the "
            "mask, clipped); predictions multiplied by the mask; data_range = 1",
            "psnr": "10 log10(1 / MSE) dB, MSE over the region's voxels",
            "ssim": "Wang et al. 2004, Gaussian window sigma 1.5 (11 taps per axis), population covariance, "
            "K1 0.01, K2 0.03; mean of the full SSIM map over the region; per slice 2D, per volume 3D "
            "(NaN when a subject has fewer than 11 slices)",
            "mae": "mean |synthesized - real| over the region's voxels, in the [0, 1] scale",
            "per_slice": "one value per axial slice (slices with an empty region are NaN and skipped)",
            "per_volume": "one value per subject over every voxel of the region in its stack of slices",
            "regions": "brain: the mask; tumour: seg > 0 within the mask; non_tumour: seg == 0 within the "
            "mask (tumour regions only for subjects with a segmentation)",
            "summary": "mean, sample std (ddof 1), median over subjects (per volume) or slices (per slice)",
            "paired": "over subjects, per-volume brain values, model minus baseline: mean with a 95% t "
            "confidence interval and the two-sided Wilcoxon signed-rank p (scipy.stats.wilcoxon); for "
            "MAE a negative difference favours the model",
        },
        "inference_seconds": {key: round(value, 3) for key, value in seconds.items() if value},
        "tasks": task_summaries,
    }
    (out / "summary.json").write_text(json.dumps(_json_safe(summary), indent=2) + "\n")
    return summary
