"""``evaluate --segmenter``: what synthesis does to a tumour segmentation.

For every subject of a NIfTI folder that has the four BraTS contrasts and a reference segmentation, the
task's target as the evaluation synthesized and scored it (from its inputs alone: their mask, crop and
scales; each subject is predicted once) is put back on the subject's grid as ``synthesize`` puts it, on
the model's ``[0, 1]`` healthy-median scale (0.4 = the median tissue). The real target never enters it
(the evaluation reads it only to score) but the segmenter's own "real" run: a deployed system has no
real target to borrow a scale from, and BraTS segmenters (nnU-Net among them) z-score each MR channel
within the brain, so a linear scale cancels. The user's segmenter then runs on the real and on the
synthesized inputs (``medgan.evaluation.segmenter``), and Dice and HD95 per region are scored against the
reference, with the drop caused by synthesis.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from data_prep.volumes import SEGMENTATION
from medgan.evaluation.segmenter import (
    BRATS2023_SUFFIXES,
    SegmenterError,
    format_segmenter_command,
    score_with_segmenter,
)
from medgan.evaluation.subjects import NiftiSubject, NiftiSubjects, SubjectSlices
from medgan.evaluation.tasks import Task

BRATS_CONTRASTS = tuple(BRATS2023_SUFFIXES)


class DownstreamSegmentation:
    """``evaluate --segmenter`` for one task on a NIfTI folder: `keep` takes each subject's synthesized
    target as the evaluation scores it, `scores` then runs the segmenter on the real and synthesized
    contrasts. out: where ``segmentation.csv`` and the segmenter's folders (``segmentation/``) go."""

    def __init__(self, subjects: NiftiSubjects, task: Task, command: str, labels: str | None, out: Path):
        if task.target not in BRATS_CONTRASTS:
            raise SegmenterError(f"--segmenter: a BraTS segmenter cannot score a synthesized {task.target}")
        format_segmenter_command(command, "input", "output")  # a bad template fails before any synthesis
        self.subjects, self.task, self.command, self.labels, self.out = subjects, task, command, labels, out
        self.synthesized: dict[str, nib.Nifti1Image] = {}

    def _usable_files(self, subject: str) -> tuple[dict[str, Path], list[str]]:
        """(the subject's files, the ones of the four contrasts and the seg it lacks)."""
        files = self.subjects.found[subject]
        return files, [m for m in (*BRATS_CONTRASTS, SEGMENTATION) if m not in files]

    def keep(self, entry: NiftiSubject, task: Task, subject: SubjectSlices, prediction: np.ndarray) -> None:
        """Keep ``prediction`` (``score_subjects``'s, [Z, H, W]) on the subject's grid, for the one task
        and a subject the segmenter can read."""
        if task == self.task and not self._usable_files(entry.subject)[1]:
            self.synthesized[entry.subject] = entry.synthesized_image(task, subject, prediction)

    def _left_out_reason(self, subject: str) -> str:
        """Why the evaluation kept no synthesized target of ``subject`` (its line in the failures)."""
        prefix = f"{subject}: "
        return next(
            (line for line in self.subjects.failures if line.startswith(prefix)),
            f"{subject}: not evaluated for {self.task.name}",
        )

    def scores(self) -> dict[str, Any]:
        """Run the segmenter on the real and on the kept synthesized contrasts, write
        ``out/segmentation.csv`` and return the summary (``score_with_segmenter``'s, plus the task and the
        subjects left out and why)."""
        contrasts, references, left_out = {}, {}, []
        for subject in self.subjects.found:
            files, missing = self._usable_files(subject)
            if missing:
                left_out.append(f"{subject}: no {' '.join(missing)} file")
            elif subject not in self.synthesized:
                left_out.append(self._left_out_reason(subject))
            else:
                contrasts[subject] = {m: files[m] for m in BRATS_CONTRASTS}
                references[subject] = files[SEGMENTATION]
        if not contrasts:
            detail = f" ({left_out[0]})" if left_out else ""
            raise SegmenterError(
                f"--segmenter: no subject of {self.subjects.folder} has all four contrasts and a seg{detail}"
            )
        rows, summary = score_with_segmenter(
            self.command,
            contrasts,
            self.task.target,
            self.synthesized,
            references,
            self.labels,
            self.out / "segmentation",
        )
        with open(self.out / "segmentation.csv", "w", newline="") as stream:
            writer = csv.DictWriter(stream, fieldnames=list(rows[0].to_dict()))
            writer.writeheader()
            writer.writerows(row.to_dict() for row in rows)
        return {**summary, "task": self.task.name, "left_out": left_out}
