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

Subjects come from a shard split (the slices and the mask data_prep kept for training: every contrast
of the subject made that mask and its scales; out of scope for the rule below) or a folder of NIfTI
subjects, prepared per task from its inputs alone as ``synthesize`` prepares them (their mask, crop and
scales; every axial slice with brain; whole in-plane extent), with the real target read onto those
slices by its own scale only to score. Outputs in ``--out``: ``per_slice.csv``, ``per_volume.csv``,
``summary.json`` and ``views/`` (three orthogonal planes per subject, for the report).
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from data_prep.errors import UserError
from data_prep.volumes import canonical_modality, discover_nifti_subjects
from medgan import metrics
from medgan.evaluation.report import method_descriptions, metric_definitions
from medgan.evaluation.summary_file import write_summary
from medgan.inference.loading import LoadedGenerator
from medgan.inference.spread import predict_with_spread
from medgan.inference.synthesis import SEGMENTATION, SynthesisError, default_reference, prepare_nifti_subject
from medgan.scoring import (
    COPY,
    METRICS,
    MODEL,
    REGIONS,
    UNET,
    SliceScore,
    VolumeScore,
    error_by_spread_decile,
    paired_statistics,
    score_subject,
    spread_error_correlation,
    summarize_scores,
)
from medgan.shards import ChannelMap, ShardFolder, raw_samples

# Voxels per subject kept for the spread's deciles (a deterministic stride through the brain).
SPREAD_SAMPLE_VOXELS = 200_000


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

    def for_task(self, task: Task) -> SubjectSlices | None:
        """The slices to score ``task`` on: a shard subject is the same for every task (the shards' own
        mask and slices)."""
        return self


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
        self.folder = ShardFolder.open(data_path)
        self.split = self.folder.split(split)
        self.channels = ChannelMap(self.split.modalities, list(modalities), self.folder.directory)
        self.subjects = list(self.split.subjects)
        self.scope = f"the axial slices in the {split!r} shards of {data_path}"

    @property
    def available_modalities(self) -> list[str]:
        return list(self.split.modalities)

    def __len__(self) -> int:
        return len(self.subjects)

    def __iter__(self) -> Iterator[SubjectSlices]:
        current: list = []
        for raw in raw_samples(self.split.shards):
            sample = self.channels.decode(raw, with_seg=True)
            if current and sample.subject != current[0].subject:
                yield self._subject(current)
                current = []
            current.append(sample)
        if current:
            yield self._subject(current)

    def _subject(self, samples: list) -> SubjectSlices:
        samples.sort(key=lambda sample: sample.info["slice"])
        has_seg = all(sample.seg is not None for sample in samples)
        subject = samples[0].subject
        return SubjectSlices(
            subject=subject,
            images=np.stack([sample.images for sample in samples]),
            present=[self.channels.canonical[i] for i in samples[0].present],
            mask=np.stack([sample.mask for sample in samples]).astype(bool),
            seg=np.stack([sample.seg for sample in samples]) if has_seg else None,
            slices=np.array([sample.info["slice"] for sample in samples]),
            spacing=_spacing(self.folder.records.get(subject, {}).get("geometry")),
        )


@dataclass(slots=True)
class NiftiSubject:
    """One subject of a NIfTI folder, prepared anew for each task from that task's inputs alone (their
    mask, crop and scales, every axial slice with brain), with the real target read only to score.

    files: contrast (or "seg") -> path. present: the contrasts it has. failures: where a task that
    cannot be prepared is noted (one line per subject and reason).
    """

    subject: str
    files: dict[str, Path]
    present: list[str]
    generator: LoadedGenerator
    failures: list[str]

    def for_task(self, task: Task) -> SubjectSlices | None:
        """The subject prepared from ``task.inputs`` (images [Z, M, H, W] in the generator's channel order:
        the inputs, and the real target on its own scale in its channel, to score), or None after noting
        why it cannot be."""
        from data_prep.volumes import VolumeError

        inputs = {m: self.files[m] for m in task.inputs}
        if SEGMENTATION in self.files:
            inputs[SEGMENTATION] = self.files[SEGMENTATION]
        try:
            prepared = prepare_nifti_subject(
                self.generator,
                inputs,
                default_reference(list(task.inputs)),
                scored={task.target: self.files[task.target]},
            )
        except (SynthesisError, VolumeError) as error:
            line = f"{self.subject}: {error}"
            if line not in self.failures:
                self.failures.append(line)
            return None
        images = prepared.images
        images[self.generator.modalities.index(task.target)] = prepared.scored[task.target]
        first = prepared.geometry.crop.z[0]
        return SubjectSlices(
            subject=self.subject,
            images=images.transpose(1, 0, 2, 3),
            present=list(task.inputs) + [task.target],
            mask=prepared.mask.astype(bool),
            seg=prepared.seg,
            slices=np.arange(first, first + prepared.mask.shape[0]),
            spacing=_spacing(prepared.geometry.to_dict()),
        )


class NiftiSubjects:
    """Subjects in a folder of NIfTI files (data_prep's `discover_nifti_subjects`), each prepared by
    data_prep like the shards, but per task from its inputs alone, keeping the whole in-plane extent and
    every axial slice with brain (`NiftiSubject`). Subjects or tasks that cannot be prepared are listed
    in `failures` with the reason."""

    def __init__(self, folder: str | Path, generator: LoadedGenerator) -> None:
        self.found = {
            entry.subject: entry.files
            for entry in discover_nifti_subjects(folder, flag="--subjects").subjects
        }
        self.generator = generator
        self.failures: list[str] = []
        contrasts = {m for files in self.found.values() for m in files if m != SEGMENTATION}
        self._available = [m for m in generator.modalities if m in contrasts]
        self.subjects = list(self.found)
        self.scope = (
            f"the whole brain of each NIfTI subject in {folder}: every axial slice with any voxel of the "
            "mask of the task's inputs, which alone give the mask, crop and scales (the real target is "
            "read only to score)"
        )

    @property
    def available_modalities(self) -> list[str]:
        return self._available

    def __len__(self) -> int:
        return len(self.subjects)

    def __iter__(self) -> Iterator[NiftiSubject]:
        for subject, files in self.found.items():
            usable = {m: p for m, p in files.items() if m in self.generator.modalities or m == SEGMENTATION}
            contrasts = [m for m in usable if m != SEGMENTATION]
            if not contrasts:
                self.failures.append(f"{subject}: no contrast the checkpoint knows")
                continue
            yield NiftiSubject(subject, usable, contrasts, self.generator, self.failures)


def tasks_to_evaluate(
    generator: LoadedGenerator,
    available: list[str],
    inputs: list[str] | None = None,
    target: str | None = None,
    all_subsets: bool = False,
) -> list[Task]:
    """The tasks to score: the one the flags name; else the one the model was trained on; else (a model
    trained for every task) each contrast of the data as target from all the others.

    all_subsets: every non-empty subset of the other contrasts for every target (for BraTS's four
    contrasts 4 x 7 = 28 tasks); only for a model trained with ``target_modality: any``.
    """
    if all_subsets:
        return _every_subset_task(generator, available, target)
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


def _every_subset_task(generator: LoadedGenerator, available: list[str], target: str | None) -> list[Task]:
    """Every (non-empty subset of the others -> target) task, targets in the data's order, subsets by
    size then in the data's order (``--target_modality`` keeps one target's row of the matrix)."""
    if generator.trained_target != "any" or generator.trained_inputs:
        trained = (
            f"{' '.join(generator.trained_inputs) or 'every other contrast'} -> {generator.trained_target}"
        )
        raise EvaluationError(
            f"--all-subsets needs a model trained with target_modality: any (this one: {trained})"
        )
    contrasts = [m for m in available if m in generator.modalities]
    targets = [canonical_modality(target)] if target and target != "any" else contrasts
    tasks = []
    for name in targets:
        if name not in contrasts:
            raise EvaluationError(f"--target_modality {name}: the data has no {name} ({' '.join(contrasts)})")
        others = [m for m in contrasts if m != name]
        for size in range(1, len(others) + 1):
            tasks.extend(Task(subset, name) for subset in itertools.combinations(others, size))
    if not tasks:
        raise EvaluationError(
            f"no task to evaluate: the data has only {' '.join(contrasts) or 'no contrast'}"
        )
    return tasks


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
class Scores:
    """Rows scored by :func:`score_subjects`: every input's copy is scored (``best_input_copy:NAME``)
    until :func:`keep_chosen_copies` keeps the one chosen per task."""

    slices: list[SliceScore] = field(default_factory=list)
    volumes: list[VolumeScore] = field(default_factory=list)
    skipped: dict[str, list[str]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=lambda: {MODEL: 0.0, UNET: 0.0})
    evaluated: int = 0
    # with a test-time spread: per task, (subject, Spearman of spread and |error|) and pooled voxel samples
    spread_rows: list[dict[str, Any]] = field(default_factory=list)
    spread_samples: dict[str, list[tuple[np.ndarray, np.ndarray]]] = field(default_factory=dict)

    def add_spread(self, task: Task, subject: SubjectSlices, spread: np.ndarray, error: np.ndarray) -> None:
        """How well the spread ranks this subject's errors, and a deterministic sample of its voxels."""
        rho = spread_error_correlation(spread, error, subject.mask)
        self.spread_rows.append({"task": task.name, "subject": subject.subject, "spearman": rho})
        values, errors = spread[subject.mask], error[subject.mask]
        stride = max(1, values.size // SPREAD_SAMPLE_VOXELS)
        self.spread_samples.setdefault(task.name, []).append((values[::stride], errors[::stride]))

    def add(self, method: str, task: Task, subject: SubjectSlices, pred: np.ndarray, target: np.ndarray):
        slices, volumes = score_subject(
            method, task.name, subject.subject, subject.slices, pred, target, subject.mask, subject.seg
        )
        self.slices.extend(slices)
        self.volumes.extend(volumes)

    def predict(
        self, method: str, generator: LoadedGenerator, images, inputs, target, batch_size
    ) -> np.ndarray:
        """``generator.predict``, its time added to ``seconds[method]``."""
        started = time.perf_counter()
        result = generator.predict(images, inputs, target, batch_size)
        self.seconds[method] += time.perf_counter() - started
        return result

    def predict_with_spread(self, variants, images, inputs, target, batch_size):
        """(prediction, spread) over the spread's variants, timed as the model's."""
        started = time.perf_counter()
        result = predict_with_spread(variants, images, inputs, target, batch_size=batch_size)
        self.seconds[MODEL] += time.perf_counter() - started
        return result


def _channels(generator: LoadedGenerator, images: np.ndarray, modalities: list[str]) -> np.ndarray:
    """images [Z, M, H, W] in ``modalities`` order -> the same in ``generator.modalities`` order."""
    if generator.modalities == modalities:
        return images
    mapped = np.zeros((images.shape[0], len(generator.modalities), *images.shape[2:]), dtype=np.float32)
    for channel, name in enumerate(generator.modalities):
        if name in modalities:
            mapped[:, channel] = images[:, modalities.index(name)]
    return mapped


def _serves(subject: SubjectSlices | NiftiSubject, task: Task) -> bool:
    return task.target in subject.present and all(m in subject.present for m in task.inputs)


def _write_views(
    out: Path, task: Task, subject: SubjectSlices, modalities, pred, target, mask, spread=None
) -> None:
    """Three orthogonal planes of inputs, synthesized, real, mask (and spread), for the report's montages."""
    volumes = {
        "inputs": subject.images[:, [modalities.index(m) for m in task.inputs]].transpose(1, 0, 2, 3),
        "synthesized": pred,
        "real": target,
        "mask": mask,
    }
    if spread is not None:
        volumes["spread"] = spread
    views = orthogonal_views(volumes, subject.mask, subject.seg)
    view_dir = out / "views" / task.folder_name
    view_dir.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        view_dir / f"{subject.subject}.npz",
        **{key: value.astype(np.float16) for key, value in views.items()},
        input_names=np.array(task.inputs),
        spacing=np.array(subject.spacing),
    )


def score_subjects(
    generator: LoadedGenerator,
    subjects: ShardSubjects | NiftiSubjects,
    tasks: list[Task],
    out: Path,
    baseline: LoadedGenerator | None,
    batch_size: int,
    spread: list | None = None,
) -> Scores:
    """Step 1: synthesize every task for every subject that serves it, score the model, every input's
    copy and the baseline, and save the views. ``spread``: the test-time variants
    (``medgan.inference.synthesis.spread_variants``) whose voxelwise SD is set against the model's error."""
    modalities = generator.modalities
    scores = Scores(skipped={task.name: [] for task in tasks})
    for entry in tqdm(subjects, total=len(subjects), desc="evaluate", unit="subject", disable=None):
        scored_any = False
        for task in tasks:
            subject = entry.for_task(task) if _serves(entry, task) else None
            if subject is None:
                scores.skipped[task.name].append(entry.subject)
                continue
            scored_any = True
            target = subject.images[:, modalities.index(task.target)]
            mask = subject.mask.astype(np.float32)
            inputs = list(task.inputs)
            spread_map = None
            if spread:
                pred, spread_map = scores.predict_with_spread(
                    spread, subject.images, inputs, task.target, batch_size
                )
                pred, spread_map = pred * mask, spread_map * mask
                scores.add_spread(task, subject, spread_map, np.abs(pred - target))
            else:
                pred = mask * scores.predict(
                    MODEL, generator, subject.images, inputs, task.target, batch_size
                )
            scores.add(MODEL, task, subject, pred, target)
            for name in task.inputs:
                scores.add(f"{COPY}:{name}", task, subject, subject.images[:, modalities.index(name)], target)
            if baseline is not None:
                images = _channels(baseline, subject.images, modalities)
                baseline_pred = scores.predict(UNET, baseline, images, inputs, task.target, batch_size)
                scores.add(UNET, task, subject, baseline_pred * mask, target)
            _write_views(out, task, subject, modalities, pred, target, mask, spread_map)
        scores.evaluated += scored_any
    return scores


def choose_copied_inputs_on(subjects, tasks: list[Task], modalities: list[str]) -> dict[str, str]:
    """Step 2 (with a validation split): per task, the input whose copy has the highest mean per-volume
    brain PSNR on ``subjects``."""
    psnrs: dict[str, dict[str, list[float]]] = {task.name: {m: [] for m in task.inputs} for task in tasks}
    for entry in tqdm(subjects, desc="choose copied input", unit="subject", disable=None):
        for task in tasks:
            subject = entry.for_task(task) if _serves(entry, task) else None
            if subject is None:
                continue
            target = subject.images[:, modalities.index(task.target)]
            for name in task.inputs:
                copy = subject.images[:, modalities.index(name)]
                value = metrics.psnr(copy, target, mask=subject.mask, spatial_dims=3)
                psnrs[task.name][name].append(float(value))
    return {
        task: _best_input({m: v or [math.nan] for m, v in by_input.items()})
        for task, by_input in psnrs.items()
    }


def choose_copied_inputs_from(volumes: list[VolumeScore], tasks: list[Task]) -> dict[str, str]:
    """Step 2 (without one): the same choice, on the evaluated subjects' own scores."""
    return {
        task.name: _best_input(
            {
                name: [
                    row.psnr
                    for row in volumes
                    if row.task == task.name and row.region == "brain" and row.method == f"{COPY}:{name}"
                ]
                or [math.nan]
                for name in task.inputs
            }
        )
        for task in tasks
    }


def _best_input(psnrs: dict[str, list[float]]) -> str:
    """The input with the highest mean PSNR (all-NaN inputs rank last)."""
    means = {
        name: np.nanmean(values) if not np.all(np.isnan(values)) else -math.inf
        for name, values in psnrs.items()
    }
    return max(means, key=means.__getitem__)


def keep_chosen_copies(scores: Scores, choice: dict[str, str]) -> tuple[list[SliceScore], list[VolumeScore]]:
    """Step 3: the per-slice and per-volume rows with only each task's chosen copy, renamed
    ``best_input_copy``."""

    def kept(rows):
        for row in rows:
            if not row.method.startswith(COPY):
                yield row
            elif row.method == f"{COPY}:{choice[row.task]}":
                yield dataclasses.replace(row, method=COPY)

    return list(kept(scores.slices)), list(kept(scores.volumes))


def _examples(volume_rows: list[VolumeScore]) -> dict[str, str]:
    """best / median / worst subject by the model's per-volume brain PSNR."""
    ranked = sorted(
        (row for row in volume_rows if row.method == MODEL and row.region == "brain"),
        key=lambda row: -math.inf if math.isnan(row.psnr) else row.psnr,
        reverse=True,
    )
    if not ranked:
        return {}
    return {
        "best": ranked[0].subject,
        "median": ranked[len(ranked) // 2].subject,
        "worst": ranked[-1].subject,
    }


def summarize_task(
    task: Task,
    slice_rows: list[SliceScore],
    volume_rows: list[VolumeScore],
    methods: list[str],
    skipped: list[str],
    copy: dict[str, str],
) -> dict[str, Any]:
    """Step 4: one task's summaries per method and region, paired statistics against each baseline
    (per-volume brain values over subjects) and the example subjects."""
    task_volumes = [r for r in volume_rows if r.task == task.name]
    task_slices = [r for r in slice_rows if r.task == task.name]
    by_method = {
        method: {
            region: {
                "per_volume": summarize_scores(
                    r for r in task_volumes if r.method == method and r.region == region
                ),
                "per_slice": summarize_scores(
                    r for r in task_slices if r.method == method and r.region == region
                ),
            }
            for region in REGIONS
            if any(r.region == region for r in task_volumes)
        }
        for method in methods
    }
    brain = {
        method: {r.subject: r for r in task_volumes if r.method == method and r.region == "brain"}
        for method in methods
    }
    order = sorted(brain[MODEL])
    paired = {
        method: {
            name: paired_statistics(
                np.array([getattr(brain[MODEL][s], name) for s in order]),
                np.array([getattr(brain[method][s], name) for s in order]),
            )
            for name in METRICS
        }
        for method in methods[1:]
    }
    return {
        "inputs": list(task.inputs),
        "target": task.target,
        "subjects": len(order),
        "skipped_subjects": skipped,
        "best_input_copy": copy,
        "methods": by_method,
        "paired": paired,
        "examples": _examples(task_volumes),
        "views": f"views/{task.folder_name}",
    }


def write_outputs(
    out: Path, slice_rows: list[SliceScore], volume_rows: list[VolumeScore], summary: dict
) -> None:
    """Step 5: ``per_slice.csv``, ``per_volume.csv`` and ``summary.json``."""
    for name, rows in (("per_slice.csv", slice_rows), ("per_volume.csv", volume_rows)):
        with open(out / name, "w", newline="") as stream:
            writer = csv.DictWriter(stream, fieldnames=list(rows[0].to_dict()))
            writer.writeheader()
            writer.writerows(row.to_dict() for row in rows)
    write_summary(out, summary)


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
    spread: tuple[str, list] | None = None,
) -> dict[str, Any]:
    """Score ``generator`` and the baselines on ``subjects`` for each task; write the CSVs, views and
    ``summary.json`` into ``out`` and return the summary. ``selection_subjects``: where the copied
    input is chosen (the validation split), None to choose on ``subjects`` themselves. ``spread``:
    (kind, variants) of a test-time spread to set against the model's error (``spread.csv``)."""
    out.mkdir(parents=True, exist_ok=True)
    if baseline is not None:
        for task in tasks:
            reason = baseline.serves(list(task.inputs), task.target)
            if reason:
                raise EvaluationError(f"--baseline-checkpoint: {reason}")
    scores = score_subjects(generator, subjects, tasks, out, baseline, batch_size, spread and spread[1])
    if scores.evaluated == 0 or not scores.volumes:
        failures = getattr(subjects, "failures", [])
        detail = f" ({failures[0]})" if failures else ""
        raise EvaluationError(f"no subject could be evaluated{detail}")
    if selection_subjects is not None:
        chosen_on = "the validation split"
        copy_choice = choose_copied_inputs_on(selection_subjects, tasks, generator.modalities)
    else:
        chosen_on = "the evaluated subjects"
        copy_choice = choose_copied_inputs_from(scores.volumes, tasks)
    slice_rows, volume_rows = keep_chosen_copies(scores, copy_choice)
    methods = [MODEL, COPY] + ([UNET] if baseline is not None else [])
    summary = {
        **(description or {}),
        "scope": subjects.scope,
        "checkpoint": generator.source,
        "baseline_checkpoint": baseline.source if baseline is not None else None,
        "subjects_evaluated": scores.evaluated,
        "failed_subjects": getattr(subjects, "failures", []),
        "data_range": 1.0,
        "methods": method_descriptions(chosen_on, baseline is not None),
        "definitions": metric_definitions(),
        "inference_seconds": {key: round(value, 3) for key, value in scores.seconds.items() if value},
        "tasks": {
            task.name: summarize_task(
                task,
                slice_rows,
                volume_rows,
                methods,
                scores.skipped[task.name],
                {"input": copy_choice[task.name], "chosen_on": chosen_on},
            )
            for task in tasks
        },
    }
    if spread:
        for task in tasks:
            summary["tasks"][task.name]["spread"] = summarize_spread(scores, task, spread[0])
        with open(out / "spread.csv", "w", newline="") as stream:
            writer = csv.DictWriter(stream, fieldnames=["task", "subject", "spearman"])
            writer.writeheader()
            writer.writerows(scores.spread_rows)
    write_outputs(out, slice_rows, volume_rows, summary)
    return summary


def summarize_spread(scores: Scores, task: Task, kind: str) -> dict[str, Any]:
    """How well the spread predicts the model's error for ``task``: per-subject Spearman correlations
    (summarized) and the mean absolute error per spread decile over the pooled voxels."""
    rows = [row for row in scores.spread_rows if row["task"] == task.name]
    samples = scores.spread_samples.get(task.name, [])
    deciles = (
        error_by_spread_decile(
            np.concatenate([s for s, _ in samples]), np.concatenate([e for _, e in samples])
        )
        if samples
        else []
    )
    return {
        "kind": kind,
        "spearman": metrics.summarize([row["spearman"] for row in rows]),
        "error_by_decile": deciles,
    }
