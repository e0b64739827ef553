"""``evaluate --segmenter``: what synthesis does to a tumour segmentation.

For every subject of a NIfTI folder that has the four BraTS contrasts and a reference segmentation, the
task's target is synthesized from its inputs alone (synthesis: their mask, crop and scales)
and put back on the subject's grid, on the model's ``[0, 1]`` healthy-median scale (0.4 = the median
tissue). The real target is never read here but by the segmenter's own "real" run: a deployed system has
no real target to borrow a scale from, and BraTS segmenters (nnU-Net among them) z-score each MR channel
within the brain, so a linear scale cancels. The user's segmenter then runs on the real and on the
synthesized inputs (``medgan.evaluation.segmenter``), and Dice and HD95 per region are scored against the
reference, with the drop caused by synthesis.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from tqdm import tqdm

from data_prep.volumes import (
    SEGMENTATION,
    VolumeError,
    discover_nifti_subjects,
)
from medgan.evaluation.segmenter import BRATS2023_SUFFIXES, SegmenterError, score_with_segmenter
from medgan.inference.loading import LoadedGenerator
from medgan.inference.synthesis import SynthesisError, synthesize_volume

BRATS_CONTRASTS = tuple(BRATS2023_SUFFIXES)


def segmentation_scores(
    generator: LoadedGenerator,
    folder: str | Path,
    inputs: list[str],
    target: str,
    command: str,
    labels: str | None,
    out: Path,
    batch_size: int = 8,
) -> dict[str, Any]:
    """Synthesize ``target`` from ``inputs`` for every usable subject of ``folder``, run the segmenter
    ``command`` on the real and synthesized contrasts, write ``out/segmentation.csv`` and return the
    summary (``medgan.evaluation.segmenter.score_with_segmenter``'s, plus subjects left out and why)."""
    if target not in BRATS_CONTRASTS:
        raise SegmenterError(f"--segmenter: a BraTS segmenter cannot score a synthesized {target}")
    found = discover_nifti_subjects(folder, flag="--subjects")
    subjects, synthesized, references, left_out = {}, {}, {}, []
    for entry in tqdm(found.subjects, desc="synthesize for the segmenter", unit="subject", disable=None):
        missing = [m for m in (*BRATS_CONTRASTS, SEGMENTATION) if m not in entry.files]
        if missing:
            left_out.append(f"{entry.subject}: no {' '.join(missing)} file")
            continue
        try:
            result = synthesize_volume(
                generator,
                {m: entry.files[m] for m in inputs},
                target,
                batch_size=batch_size,
            )
        except (SynthesisError, VolumeError) as error:
            left_out.append(f"{entry.subject}: {error}")
            continue
        subjects[entry.subject] = {m: entry.files[m] for m in BRATS_CONTRASTS}
        synthesized[entry.subject] = result.image
        references[entry.subject] = entry.files[SEGMENTATION]
    if not subjects:
        detail = f" ({left_out[0]})" if left_out else ""
        raise SegmenterError(f"--segmenter: no subject of {folder} has all four contrasts and a seg{detail}")
    rows, summary = score_with_segmenter(
        command, subjects, target, synthesized, references, labels, out / "segmentation"
    )
    with open(out / "segmentation.csv", "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(rows[0].to_dict()))
        writer.writeheader()
        writer.writerows(row.to_dict() for row in rows)
    return {**summary, "task": f"{'+'.join(inputs)}->{target}", "left_out": left_out}
