"""``synthesize --subjects``: every subject of a NIfTI folder, for a given target or, without one, in
BraSyn mode (each subject misses exactly one of its dataset's contrasts, and that one is synthesized,
named as the subject's files spell contrasts, into a folder that can be zipped and submitted as is).
"""

from __future__ import annotations

import re
from pathlib import Path

from tqdm import tqdm

from data_prep.volumes import (
    DATASET_MODALITIES,
    MODALITIES,
    MODALITY_ALIASES,
    SEGMENTATION,
    VolumeError,
    canonical_modality,
    discover_nifti_subjects,
)
from medgan.inference.errors import SynthesisError
from medgan.inference.loading import LoadedGenerator
from medgan.inference.provenance import split_nifti_name
from medgan.inference.sidecars import provenance_folder, write_synthesized
from medgan.inference.spread import spread_variants
from medgan.inference.synthesis import check_reference, data_preparation, synthesize_volume

# BraTS 2023+ file names of the canonical contrasts (data_prep's aliases, read backwards).
BRATS_2023_NAMES = {MODALITY_ALIASES[name]: name for name in ("t1n", "t1c", "t2w", "t2f")}


def folder_inputs(generator: LoadedGenerator, files: dict[str, Path], target: str) -> dict[str, Path]:
    """The inputs to use for a subject found by `discover_nifti_subjects`: the training inputs when the model
    has fixed ones, else every contrast the subject has except the target."""
    if generator.trained_inputs:
        missing = [name for name in generator.trained_inputs if name not in files]
        if missing:
            raise SynthesisError(f"has no {' '.join(missing)} file, which the checkpoint needs as input")
        return {name: files[name] for name in generator.trained_inputs}
    return {
        name: path
        for name, path in files.items()
        if name not in (target, SEGMENTATION) and name in generator.modalities
    }


def contrast_spelling(files: dict[str, Path]) -> dict[str, str]:
    """How a subject's files spell the contrasts: canonical name -> name. BraTS 2023+ names when the
    last word of one of its image files' names is t1n, t1c, t2w or t2f (``t2f`` for flair), else the
    canonical names themselves."""
    canonical = {name: name for name in MODALITIES}
    for name, path in files.items():
        word = re.split(r"[-_.]", split_nifti_name(path)[0])[-1].lower()
        if name != SEGMENTATION and word in BRATS_2023_NAMES.values():
            return {**canonical, **BRATS_2023_NAMES}
    return canonical


def missing_contrast(generator: LoadedGenerator, files: dict[str, Path]) -> str:
    """BraSyn mode: the one contrast of the subject's dataset (BraTS: t1 t1ce t2 flair) that the
    subject has no file for and the generator can synthesize; a one-line SynthesisError when it misses
    none, several, or one the generator was not trained to fill."""
    style = contrast_spelling(files)
    expected = [
        name
        for name in DATASET_MODALITIES[data_preparation(generator, files)]
        if name in generator.modalities
    ]
    missing = [name for name in expected if name not in files]
    spelled = " ".join(style[name] for name in expected)
    if not missing:
        raise SynthesisError(
            f"has all of {spelled}: BraSyn mode fills exactly one missing contrast (--target picks one)"
        )
    if len(missing) > 1:
        listed = " ".join(style[name] for name in missing)
        raise SynthesisError(
            f"misses {len(missing)} of {spelled} ({listed}): BraSyn mode fills exactly one missing contrast"
        )
    target = missing[0]
    if generator.trained_target not in ("any", target):
        trained = style[generator.trained_target]
        raise SynthesisError(
            f"misses {style[target]}, but the checkpoint was trained to synthesize {trained} only"
        )
    return target


def synthesize_folder(
    generator: LoadedGenerator,
    folder: Path,
    target: str | None,
    out: Path,
    *,
    reference: str | None = None,
    batch_size: int = 8,
    spread: str | None = None,
    other_weights: LoadedGenerator | None = None,
    command: str = "",
) -> tuple[list[Path], list[str]]:
    """Synthesize a contrast for every subject under ``folder`` into ``out``, with JSON sidecars.

    target: that contrast, written as ``out/SUBJECT_TARGET.nii.gz`` with its sidecar beside it; None for
    BraSyn mode: each subject's one missing contrast (`missing_contrast`) as ``out/SUBJECT-MOD.nii.gz``,
    MOD spelled as the subject's files are (``t2f`` for BraTS 2023+ names, ``flair`` otherwise), on the
    subject's grid, and ``out`` holds those volumes only: the sidecars go to `provenance_folder`.
    reference: the input whose grid each output takes (canonicalised; a subject without it as an input
    takes `default_reference`). spread / other_weights: as for `synthesize_volume`; the spread goes to
    ``..._spread.nii.gz``. command: the command line, for the sidecars. Returns (synthesized volumes
    written, one line per subject that failed, subject folders without images included); a bad subject
    never stops the others.
    """
    target = canonical_modality(target) if target else None
    reference = check_reference(reference) if reference else None
    spread_variants(generator, spread, other_weights)  # a bad spread fails once, before any subject
    found = discover_nifti_subjects(folder, flag="--subjects")
    out.mkdir(parents=True, exist_ok=True)
    sidecar_folder = None if target else provenance_folder(out)
    written = []
    failures = [f"{path.name}: {reason}" for path, reason in found.ignored if path.is_dir()]
    for entry in tqdm(found.subjects, desc="synthesize", unit="subject", disable=None):
        subject, files = entry.subject, entry.files
        try:
            wanted = target or missing_contrast(generator, files)
            inputs = folder_inputs(generator, files, wanted)
            chosen = reference if reference in inputs else None
            result = synthesize_volume(
                generator,
                inputs,
                wanted,
                reference=chosen,
                batch_size=batch_size,
                spread=spread,
                other_weights=other_weights,
            )
        except (SynthesisError, VolumeError) as error:
            failures.append(f"{subject}: {error}")
            continue
        if target:
            path = out / f"{subject}_{target}.nii.gz"
        else:
            path = out / f"{subject}-{contrast_spelling(files)[wanted]}.nii.gz"
        write_synthesized(result, path, command, sidecar_folder)
        written.append(path)
    return written, failures
