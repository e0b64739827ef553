"""Step 1 of the default protocol: every subject synthesized for every task it serves and scored, the
model beside every input's copy and the baseline checkpoint, its views saved."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from medgan.evaluation.subjects import NiftiSubject, NiftiSubjects, ShardSubjects, SubjectSlices, serves_task
from medgan.evaluation.tasks import Task
from medgan.evaluation.views import write_views
from medgan.inference.loading import LoadedGenerator
from medgan.inference.spread import predict_with_spread
from medgan.scoring import (
    COPY,
    MODEL,
    UNET,
    SliceScore,
    VolumeScore,
    score_subject,
    spread_error_correlation,
)
from medgan.shards import ChannelMap

# Voxels per subject kept for the spread's deciles (a deterministic stride through the brain).
SPREAD_SAMPLE_VOXELS = 200_000

# Called with each subject's model prediction for a task, (masked, [Z, H, W]), as it is scored.
PredictionHandler = Callable[[NiftiSubject | SubjectSlices, Task, SubjectSlices, np.ndarray], None]


@dataclass(slots=True)
class Scores:
    """Rows scored by :func:`score_subjects`: the inputs' copies are scored as ``best_input_copy:NAME``
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


def in_generator_channels(
    generator: LoadedGenerator, images: np.ndarray, modalities: list[str]
) -> np.ndarray:
    """images float32 [Z, M, H, W] in ``modalities`` order -> [Z, M', H, W] in ``generator.modalities``
    order (contrasts it does not know left out, those ``modalities`` lacks zero), placed by the
    ``ChannelMap`` the training loader places shard channels with."""
    shared = tuple(m for m in modalities if m in generator.modalities)
    channel_map = ChannelMap(shared, generator.modalities, Path(generator.source))
    return channel_map.place(images[:, [modalities.index(m) for m in shared]])


def _score_task(
    scores: Scores,
    generator: LoadedGenerator,
    baseline: LoadedGenerator | None,
    task: Task,
    subject: SubjectSlices,
    batch_size: int,
    spread: list | None,
    copied: tuple[str, ...],
) -> tuple[np.ndarray, np.ndarray | None]:
    """Score the model, the ``copied`` inputs' copies and the baseline on one subject for ``task``;
    returns the model's prediction and spread (None without one), both [Z, H, W] and zero outside the
    mask."""
    modalities = generator.modalities
    target = subject.images[:, modalities.index(task.target)]
    mask = subject.mask.astype(np.float32)
    inputs = list(task.inputs)
    spread_map = None
    if spread:
        pred, spread_map = scores.predict_with_spread(spread, subject.images, inputs, task.target, batch_size)
        pred, spread_map = pred * mask, spread_map * mask
        scores.add_spread(task, subject, spread_map, np.abs(pred - target))
    else:
        pred = mask * scores.predict(MODEL, generator, subject.images, inputs, task.target, batch_size)
    scores.add(MODEL, task, subject, pred, target)
    for name in copied:
        scores.add(f"{COPY}:{name}", task, subject, subject.images[:, modalities.index(name)], target)
    if baseline is not None:
        images = in_generator_channels(baseline, subject.images, modalities)
        baseline_pred = scores.predict(UNET, baseline, images, inputs, task.target, batch_size)
        scores.add(UNET, task, subject, baseline_pred * mask, target)
    return pred, spread_map


def score_subjects(
    generator: LoadedGenerator,
    subjects: ShardSubjects | NiftiSubjects,
    tasks: list[Task],
    out: Path,
    baseline: LoadedGenerator | None,
    batch_size: int,
    spread: list | None = None,
    on_prediction: PredictionHandler | None = None,
    copy_choice: dict[str, str] | None = None,
) -> Scores:
    """Step 1: synthesize every task for every subject that serves it, score the model, the inputs'
    copies and the baseline, and save the views. ``spread``: the test-time variants
    (``medgan.inference.spread.spread_variants``) whose voxelwise SD is set against the model's error.
    ``on_prediction``: given each model prediction, so that later steps reuse it instead of predicting
    again. ``copy_choice``: task -> the input already chosen as its copied baseline (only that copy is
    scored); None scores every input's copy, to choose from."""
    modalities = generator.modalities
    scores = Scores(skipped={task.name: [] for task in tasks})
    for entry in tqdm(subjects, total=len(subjects), desc="evaluate", unit="subject", disable=None):
        scored_any = False
        for task in tasks:
            subject = entry.for_task(task) if serves_task(entry, task) else None
            if subject is None:
                scores.skipped[task.name].append(entry.subject)
                continue
            scored_any = True
            copied = (copy_choice[task.name],) if copy_choice is not None else task.inputs
            pred, spread_map = _score_task(
                scores, generator, baseline, task, subject, batch_size, spread, tuple(copied)
            )
            if on_prediction is not None:
                on_prediction(entry, task, subject, pred)
            target = subject.images[:, modalities.index(task.target)]
            mask = subject.mask.astype(np.float32)
            write_views(out, task, subject, modalities, pred, target, mask, spread_map)
        scores.evaluated += scored_any
    return scores
