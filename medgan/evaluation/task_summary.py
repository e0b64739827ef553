"""Step 4 of the default protocol: one task's summaries per method and region, the paired statistics
against each baseline, the example subjects, and how well a test-time spread predicts the error."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from medgan import metrics
from medgan.evaluation.subject_scores import Scores
from medgan.evaluation.tasks import Task
from medgan.scoring import (
    MODEL,
    REGIONS,
    VOLUME_METRICS,
    SliceScore,
    VolumeScore,
    error_by_spread_decile,
    paired_statistics,
    summarize_scores,
)


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
                    (r for r in task_volumes if r.method == method and r.region == region), VOLUME_METRICS
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
            for name in VOLUME_METRICS
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
