"""Steps 2 and 3 of the default protocol: the input whose copy is the baseline of each task (the best mean
per-volume brain PSNR, on the validation split or on the evaluated subjects), and only its rows kept."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from tqdm import tqdm

from medgan import metrics
from medgan.evaluation.subject_scores import Scores
from medgan.evaluation.subjects import serves_task
from medgan.evaluation.tasks import Task
from medgan.scoring import COPY, SliceScore, VolumeScore


def choose_copied_inputs_on(subjects, tasks: list[Task], modalities: list[str]) -> dict[str, str]:
    """Step 2 (with a validation split): per task, the input whose copy has the highest mean per-volume
    brain PSNR on ``subjects``."""
    psnrs: dict[str, dict[str, list[float]]] = {task.name: {m: [] for m in task.inputs} for task in tasks}
    for entry in tqdm(subjects, desc="choose copied input", unit="subject", disable=None):
        for task in tasks:
            subject = entry.for_task(task) if serves_task(entry, task) else None
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
