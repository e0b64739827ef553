"""``evaluate --segmenter``: what synthesis does to a tumour segmentation.

For every subject of a NIfTI folder that has the four BraTS contrasts and a reference segmentation, the
task's target is synthesized from its inputs (``medgan.synthesis``), put back on the subject's grid and
into the original intensity units of the real target (the inverse of data_prep's normalisation of that
subject's real target: a segmenter expects a scanner-like volume, and in evaluation the real target is
there to give the scale; the structure comes from the model alone). The user's segmenter then runs on the
real and on the synthesized inputs (``medgan.segmentation_score``), and Dice and HD95 per region are
scored against the reference, with the drop caused by synthesis.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from tqdm import tqdm

from data_prep.volumes import (
    SEGMENTATION,
    IntensityScaling,
    VolumeError,
    denormalise,
    discover_nifti_subjects,
)
from medgan.inference import LoadedGenerator
from medgan.segmentation_score import BRATS2023_SUFFIXES, SegmenterError, score_with_segmenter
from medgan.synthesis import SynthesisError, synthesize_volume

BRATS_CONTRASTS = tuple(BRATS2023_SUFFIXES)
ORIGINAL_UNITS_DESCRIPTION = "MedGAN-SSM synthesized, mapped into the real target's intensity units"


def in_original_units(image: nib.Nifti1Image, scaling: IntensityScaling) -> nib.Nifti1Image:
    """A synthesized volume in ``[0, 1]`` (0 outside the mask) mapped back by data_prep's inverse
    (``denormalise``: ``x = low + y (high - low)``) inside the mask; outside stays 0. With the
    healthy-median scaling (low 0, high 2.5 x the real target's median) 0.4 comes back as that median;
    values the normalisation clipped (above high) cannot come back."""
    data = np.asarray(image.dataobj, dtype=np.float32)
    restored = np.where(data > 0, denormalise(data, scaling), 0.0).astype(np.float32)
    result = nib.Nifti1Image(restored, image.affine, header=image.header)
    result.header["cal_min"], result.header["cal_max"] = 0.0, float(restored.max())
    # The synthesized header described the [0, 1] scale; these values are in the real target's units.
    result.header["descrip"] = ORIGINAL_UNITS_DESCRIPTION.encode()[:80]
    return result


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
    summary (``medgan.segmentation_score.score_with_segmenter``'s, plus subjects left out and why)."""
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
                extra_files={target: entry.files[target]},
            )
        except (SynthesisError, VolumeError) as error:
            left_out.append(f"{entry.subject}: {error}")
            continue
        subjects[entry.subject] = {m: entry.files[m] for m in BRATS_CONTRASTS}
        synthesized[entry.subject] = in_original_units(result.image, result.prepared.scaling[target])
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
