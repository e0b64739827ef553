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

The steps live beside this module: ``tasks`` and ``subjects`` (what is scored), ``subject_scores``
(step 1), ``copied_input`` (steps 2 and 3), ``task_summary`` (step 4); this module runs them and writes
the files (step 5).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from medgan.evaluation.copied_input import (
    choose_copied_inputs_from,
    choose_copied_inputs_on,
    keep_chosen_copies,
)
from medgan.evaluation.definitions import method_descriptions, metric_definitions
from medgan.evaluation.downstream import DownstreamSegmentation
from medgan.evaluation.subject_scores import Scores, score_subjects
from medgan.evaluation.subjects import NiftiSubjects, ShardSubjects
from medgan.evaluation.summary_file import write_summary
from medgan.evaluation.task_summary import summarize_spread, summarize_task
from medgan.evaluation.tasks import EvaluationError, Task
from medgan.inference.loading import LoadedGenerator
from medgan.scoring import COPY, MODEL, UNET, SliceScore, VolumeScore


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


def _write_spread(out: Path, scores: Scores) -> None:
    """``spread.csv``: each subject's Spearman correlation of the spread and the model's |error|."""
    with open(out / "spread.csv", "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=["task", "subject", "spearman"])
        writer.writeheader()
        writer.writerows(scores.spread_rows)


def _check_baseline(baseline: LoadedGenerator | None, tasks: list[Task]) -> None:
    if baseline is None:
        return
    for task in tasks:
        reason = baseline.serves(list(task.inputs), task.target)
        if reason:
            raise EvaluationError(f"--baseline-checkpoint: {reason}")


def _check_scored(scores: Scores, subjects: ShardSubjects | NiftiSubjects) -> None:
    if scores.evaluated == 0 or not scores.volumes:
        failures = getattr(subjects, "failures", [])
        detail = f" ({failures[0]})" if failures else ""
        raise EvaluationError(f"no subject could be evaluated{detail}")


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
    segmentation: DownstreamSegmentation | None = None,
) -> dict[str, Any]:
    """Score ``generator`` and the baselines on ``subjects`` for each task; write the CSVs, views and
    ``summary.json`` into ``out`` and return the summary. ``selection_subjects``: where the copied
    input is chosen (the validation split), None to choose on ``subjects`` themselves. ``spread``:
    (kind, variants) of a test-time spread to set against the model's error (``spread.csv``).
    ``segmentation``: the segmenter run on the volumes synthesized here (the summary's ``segmentation``)."""
    out.mkdir(parents=True, exist_ok=True)
    _check_baseline(baseline, tasks)
    keep = segmentation.keep if segmentation is not None else None
    # chosen on the validation split first, only the chosen copy is scored; else every copy, to choose from
    copy_choice = None
    if selection_subjects is not None:
        copy_choice = choose_copied_inputs_on(selection_subjects, tasks, generator.modalities)
    scores = score_subjects(
        generator, subjects, tasks, out, baseline, batch_size, spread and spread[1], keep, copy_choice
    )
    _check_scored(scores, subjects)
    description = dict(description or {})
    if segmentation is not None:
        description["segmentation"] = segmentation.scores()
    chosen_on = "the validation split" if copy_choice is not None else "the evaluated subjects"
    if copy_choice is None:
        copy_choice = choose_copied_inputs_from(scores.volumes, tasks)
    slice_rows, volume_rows = keep_chosen_copies(scores, copy_choice)
    methods = [MODEL, COPY] + ([UNET] if baseline is not None else [])
    summary = {
        **description,
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
        _write_spread(out, scores)
    write_outputs(out, slice_rows, volume_rows, summary)
    return summary
