"""Synthesize a missing contrast for a subject given as NIfTI files, on the grid of the subject's own scans.

The forward path is data_prep's (``data_prep.volumes.prepare_subject``: load and validate, reorient to
RAS, register inputs acquired on another grid onto the reference grid, mask, normalise into ``[0, 1]``,
crop), so a subject is prepared exactly as the training shards were. The generator runs slice by slice
on the axial slices data_prep keeps, in batches. The way back is nnU-Net's: ``restore_volume`` pastes the
slices into the crop box and undoes the reorientation; when the chosen reference is a registered
contrast (IXI T1), ``resample_from`` maps the volume onto that contrast's own grid. The result has the
reference file's shape, affine and orientation, float32 values in the normalised ``[0, 1]`` scale inside
the brain (head for IXI) mask and 0 outside, as its header description says.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from tqdm import tqdm

from data_prep.errors import UserError
from data_prep.volumes import (
    MODALITIES,
    SEGMENTATION,
    PreparedSubject,
    VolumeError,
    canonical_modality,
    discover_nifti_subjects,
    from_canonical,
    load_volume,
    parse_name,
    prepare_subject,
    resample_from,
    restore_volume,
    to_canonical,
    uncrop,
)
from medgan.inference import LoadedGenerator

# NIfTI's descrip field holds 80 bytes.
DESCRIPTION = "MedGAN-SSM synthesized {target}: normalised [0,1] scale, 0 outside the mask"
_NIFTI_SUFFIXES = (".nii.gz", ".nii")


class SynthesisError(UserError):
    """An input a user gave cannot be synthesized from; the one-line message names it and why."""


@dataclass(slots=True)
class SynthesisResult:
    """One synthesized subject.

    image: the NIfTI on the reference input's grid (shape, affine, orientation), float32 in [0, 1].
    prepared: data_prep's prepared subject (model slices [M, Z, H, W], mask [Z, H, W], geometry).
    synthesized: float32 [Z, H, W] in [0, 1], the model's slices (zero outside the mask).
    reference: the contrast whose grid `image` is on. inputs: the contrasts the model was given.
    """

    image: nib.Nifti1Image
    prepared: PreparedSubject
    synthesized: np.ndarray
    reference: str
    inputs: list[str]
    target: str


def parse_input_flags(values: list[str]) -> dict[str, Path]:
    """``["t1=a.nii.gz", "T2=b.nii"]`` -> ``{"t1": Path("a.nii.gz"), "t2": Path("b.nii")}`` (checked)."""
    inputs: dict[str, Path] = {}
    for value in values:
        name, equals, path = value.partition("=")
        if not equals or not name or not path:
            raise SynthesisError(f"--input {value}: expected MODALITY=FILE, e.g. t1=sub01_t1.nii.gz")
        modality = canonical_modality(name)
        if modality not in MODALITIES:
            raise SynthesisError(
                f"--input {value}: unknown modality {name!r} (known: {' '.join(MODALITIES)})"
            )
        if modality in inputs:
            raise SynthesisError(f"--input {value}: {modality} is given twice")
        inputs[modality] = Path(path)
    return inputs


def default_reference(inputs: list[str]) -> str:
    """The first input that is not T1 (T1 is the contrast IXI acquires on its own grid), else T1."""
    return next((name for name in inputs if name != "t1"), inputs[0])


def _preparation(generator: LoadedGenerator, files: dict[str, Path]) -> str:
    """data_prep's preparation ("brats": skull-stripped, one grid; "ixi": head mask, registration): the
    one the training shards had, as the checkpoint records it. Checkpoints from before that record get
    what data_prep's name rules say of the files (IXI names, or a PD contrast, which only IXI has)."""
    if generator.dataset:
        return generator.dataset
    named = {match.dataset for path in files.values() if (match := parse_name(path))}
    return "ixi" if "ixi" in named or "pd" in files else "brats"


def _in_plane_size(path: Path) -> int:
    """Largest axis of the reference volume: a square crop of this size never cuts into the mask."""
    try:
        return int(max(nib.load(path).shape[:3]))
    except (ImageFileError, OSError, ValueError, EOFError):
        load_volume(path)  # raises VolumeError with the one-line reason
        raise


def _registered_grid_image(
    slices: np.ndarray, prepared: PreparedSubject, modality: str, header: nib.Nifti1Header
) -> nib.Nifti1Image:
    """Model slices [Z, H, W] mapped onto the own grid of a registered contrast (inverse registration)."""
    geometry = prepared.geometry
    registration, own = geometry.registered[modality]
    canonical = uncrop(slices, geometry.crop, geometry.canonical_shape)
    own_canonical, own_canonical_affine, _ = to_canonical(
        np.zeros(own.original_shape, np.uint8), own.original_affine
    )
    own_canonical_shape = own_canonical.shape
    on_own = resample_from(
        canonical,
        geometry.canonical_affine,
        own_canonical_shape,
        own_canonical_affine,
        registration.fixed_to_moving,
    )
    data = from_canonical(on_own, own)
    image = nib.Nifti1Image(data, own.original_affine, header=header)
    image.set_qform(own.original_affine, code=1)
    image.set_sform(own.original_affine, code=1)
    return image


def _as_synthesized_image(image: nib.Nifti1Image, target: str) -> nib.Nifti1Image:
    """Float32 data with no intensity scaling, display range [0, 1] and a description saying so."""
    data = np.clip(np.asarray(image.dataobj, dtype=np.float32), 0.0, 1.0)
    result = nib.Nifti1Image(data, image.affine, header=image.header)
    # The reference's header may say int16 with a slope: writing [0, 1] floats through it would quantise.
    result.set_data_dtype(np.float32)
    result.header.set_slope_inter(1.0, 0.0)
    result.header["cal_min"], result.header["cal_max"] = 0.0, 1.0
    result.header["descrip"] = DESCRIPTION.format(target=target.upper()).encode()[:80]
    return result


def prepare_nifti_subject(
    generator: LoadedGenerator, files: dict[str, Path], reference: str, seed: int = 0
) -> PreparedSubject:
    """data_prep's preparation of one subject's files (modality or "seg" -> path) for ``generator``:
    images [M, Z, H, W] in the generator's channel order, in-plane size covering the whole volume."""
    size = _in_plane_size(files[reference])
    try:
        return prepare_subject(
            files,
            dataset=_preparation(generator, files),
            modalities=tuple(generator.modalities),
            size=size,
            seed=seed,
        )
    except RuntimeError as error:
        # SimpleITK reports a registration that cannot start or converge as a RuntimeError.
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        others = " ".join(str(path) for name, path in files.items() if name not in (reference, SEGMENTATION))
        detail = lines[-1][:200] if lines else "ITK error"
        raise SynthesisError(f"could not register {others} onto {files[reference]}: {detail}") from None


def synthesize_volume(
    generator: LoadedGenerator,
    inputs: dict[str, Path],
    target: str,
    *,
    reference: str | None = None,
    batch_size: int = 8,
    extra_files: dict[str, Path] | None = None,
    seed: int = 0,
    progress: str | None = None,
) -> SynthesisResult:
    """Synthesize ``target`` for one subject from its NIfTI ``inputs`` (modality -> file).

    reference: the input whose grid the output takes (default `default_reference`). extra_files: more
    files prepared with the subject but not shown to the model (the real target and ``seg`` for
    evaluation). Raises SynthesisError or data_prep's VolumeError with a one-line reason.
    """
    target = canonical_modality(target)
    names = [canonical_modality(name) for name in inputs]
    if not names:
        raise SynthesisError("no input contrast given (use --input MODALITY=FILE)")
    if target in names:
        raise SynthesisError(f"--target {target}: is also an input")
    reason = generator.serves(names, target)
    if reason:
        raise SynthesisError(reason)
    reference = canonical_modality(reference) if reference else default_reference(names)
    if reference not in names:
        raise SynthesisError(f"--reference {reference}: not among the inputs {' '.join(names)}")
    files = {canonical_modality(name): Path(path) for name, path in inputs.items()}
    files.update(extra_files or {})
    prepared = prepare_nifti_subject(generator, files, reference, seed)
    synthesized = generator.predict(
        prepared.images.transpose(1, 0, 2, 3), names, target, batch_size, progress
    )
    synthesized *= prepared.mask.astype(np.float32)
    header = nib.load(files[reference]).header.copy()
    if reference in prepared.geometry.registered:
        image = _registered_grid_image(synthesized, prepared, reference, header)
    else:
        image = restore_volume(synthesized, prepared.geometry, header=header, fill=0.0)
    return SynthesisResult(
        image=_as_synthesized_image(image, target),
        prepared=prepared,
        synthesized=synthesized,
        reference=reference,
        inputs=names,
        target=target,
    )


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


def synthesize_folder(
    generator: LoadedGenerator,
    folder: Path,
    target: str,
    out: Path,
    *,
    reference: str | None = None,
    batch_size: int = 8,
) -> tuple[list[Path], list[str]]:
    """Synthesize ``target`` for every subject under ``folder`` into ``out/SUBJECT_TARGET.nii.gz``.

    Returns (files written, one line per subject that failed); a bad subject never stops the others.
    """
    target = canonical_modality(target)
    found = discover_nifti_subjects(folder, flag="--subjects")
    out.mkdir(parents=True, exist_ok=True)
    written, failures = [], []
    for entry in tqdm(found.subjects, desc="synthesize", unit="subject", disable=None):
        subject, files = entry.subject, entry.files
        try:
            inputs = folder_inputs(generator, files, target)
            chosen = reference if reference in inputs else None
            result = synthesize_volume(generator, inputs, target, reference=chosen, batch_size=batch_size)
        except (SynthesisError, VolumeError) as error:
            failures.append(f"{subject}: {error}")
            continue
        path = out / f"{subject}_{target}.nii.gz"
        nib.save(result.image, path)
        written.append(path)
    return written, failures
