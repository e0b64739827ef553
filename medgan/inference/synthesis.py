"""Synthesize a missing contrast for a subject given as NIfTI files, on the grid of the subject's own scans.

The forward path is data_prep's (``data_prep.volumes.prepare_subject``: load and validate, reorient to
RAS, register inputs acquired on another grid onto the reference grid, mask, normalise into ``[0, 1]``,
crop), so a subject is prepared exactly as the training shards were. The generator runs slice by slice
on the axial slices data_prep keeps, in batches. The way back is nnU-Net's: ``restore_volume`` pastes the
slices into the crop box and undoes the reorientation; when the chosen reference is a registered
contrast (IXI T1), ``resample_from`` maps the volume onto that contrast's own grid. The result has the
reference file's shape, affine and orientation, float32 values on the training data's healthy-median
scale inside the brain (head for IXI) mask and 0 outside, as its header description says: 0.4 is the
subject's median of that contrast within the mask, 1 is 2.5 times it (brighter tissue is clipped at 1),
so value / 0.4 is intensity relative to the subject's typical tissue (docs/synthesis.md).

Beside this module: the test-time spread (``spread=``, `medgan.inference.spread`), writing a result with
its JSON sidecars (`medgan.inference.sidecars`), and a whole folder, by a given target or in BraSyn mode
(`medgan.inference.folder_mode`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError

from data_prep.volumes import (
    MODALITIES,
    REFERENCE_LEVEL,
    SEGMENTATION,
    PreparedSubject,
    canonical_modality,
    from_canonical,
    load_volume,
    parse_name,
    prepare_subject,
    resample_from,
    restore_volume,
    to_canonical,
    uncrop,
)
from medgan.inference.errors import SynthesisError
from medgan.inference.loading import LoadedGenerator
from medgan.inference.spread import Variant, predict_with_spread, spread_variants

# NIfTI's descrip field holds 80 bytes. The scale is data_prep's healthy-median normalisation.
DESCRIPTION = "MedGAN-SSM synthesized {target}: {level:g} = {region} median, clipped at 1, 0 outside"
# Which mask the median is over, by data_prep's preparation (BraTS: skull-stripped brain; IXI: head).
MEDIAN_REGION = {"brats": "brain", "ixi": "head"}
SPREAD_DESCRIPTION = "MedGAN-SSM spread of {target}: SD over {count} variants, not calibrated"


@dataclass(slots=True)
class SynthesisResult:
    """One synthesized subject.

    image: the NIfTI on the reference input's grid (shape, affine, orientation), float32 in [0, 1].
    prepared: data_prep's prepared subject (model slices [M, Z, H, W], mask [Z, H, W], geometry).
    synthesized: float32 [Z, H, W] in [0, 1], the model's slices (zero outside the mask).
    reference: the contrast whose grid `image` is on. inputs: the contrasts the model was given.
    input_files: those contrasts' files (and the reference's among them).
    variants: the predictions made; ``variants[0]`` (the generator as given, unflipped) made
    `synthesized`, the others only enter the spread.
    spread: float32 [Z, H, W] >= 0 (at most 0.5), the voxelwise standard deviation over `variants` on
    the model slices, 0 outside the mask; None unless a spread was asked for.
    spread_image: `spread` on the same grid as `image`, float32; None unless a spread was asked for.
    """

    image: nib.Nifti1Image
    prepared: PreparedSubject
    synthesized: np.ndarray
    reference: str
    inputs: list[str]
    target: str
    input_files: dict[str, Path] = field(default_factory=dict)
    variants: list[Variant] = field(default_factory=list)
    spread: np.ndarray | None = None
    spread_image: nib.Nifti1Image | None = None


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


def data_preparation(generator: LoadedGenerator, files: dict[str, Path]) -> str:
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


def _as_float_image(image: nib.Nifti1Image, description: str, high: float) -> nib.Nifti1Image:
    """Float32 data clipped to [0, high], no intensity scaling, display range [0, high], ``description``."""
    data = np.clip(np.asarray(image.dataobj, dtype=np.float32), 0.0, high)
    result = nib.Nifti1Image(data, image.affine, header=image.header)
    # The reference's header may say int16 with a slope: writing [0, 1] floats through it would quantise.
    result.set_data_dtype(np.float32)
    result.header.set_slope_inter(1.0, 0.0)
    result.header["cal_min"], result.header["cal_max"] = 0.0, high
    result.header["descrip"] = description.encode()[:80]
    return result


def synthesized_description(target: str, preparation: str) -> str:
    """The header description of a synthesized ``target``: which value is the median, over which mask."""
    return DESCRIPTION.format(target=target.upper(), level=REFERENCE_LEVEL, region=MEDIAN_REGION[preparation])


def _as_synthesized_image(image: nib.Nifti1Image, target: str, preparation: str) -> nib.Nifti1Image:
    """Float32 data with no intensity scaling, display range (cal_min, cal_max) = (0, 1), the scale's
    bounds, and a description naming the scale."""
    return _as_float_image(image, synthesized_description(target, preparation), 1.0)


def _on_reference_grid(
    slices: np.ndarray, prepared: PreparedSubject, reference: str, header: nib.Nifti1Header
) -> nib.Nifti1Image:
    """Model slices [Z, H, W] put back on the reference input's own grid (0 outside the crop box)."""
    if reference in prepared.geometry.registered:
        return _registered_grid_image(slices, prepared, reference, header)
    return restore_volume(slices, prepared.geometry, header=header, fill=0.0)


def synthesized_image(
    generator: LoadedGenerator,
    synthesized: np.ndarray,
    prepared: PreparedSubject,
    files: dict[str, Path],
    reference: str,
    target: str,
) -> nib.Nifti1Image:
    """``synthesized`` (float32 [Z, H, W] in [0, 1] on ``prepared``'s slices, 0 outside the mask) as the
    NIfTI image synthesis writes: on the grid of the input ``files[reference]``, float32 on the [0, 1]
    scale with a description naming it."""
    header = nib.load(files[reference]).header.copy()
    image = _on_reference_grid(synthesized, prepared, reference, header)
    return _as_synthesized_image(image, target, data_preparation(generator, files))


def prepare_nifti_subject(
    generator: LoadedGenerator,
    files: dict[str, Path],
    reference: str,
    seed: int = 0,
    scored: dict[str, Path] | None = None,
) -> PreparedSubject:
    """data_prep's preparation of one subject's inputs (modality or "seg" -> path) for ``generator``:
    images [M, Z, H, W] in the generator's channel order, in-plane size covering the whole volume, every
    axial slice with any voxel of the inputs' mask. scored: files read only to score (the real target),
    prepared onto the same slices without changing anything the inputs give (`prepare_subject`)."""
    size = _in_plane_size(files[reference])
    try:
        return prepare_subject(
            files,
            dataset=data_preparation(generator, files),
            modalities=tuple(generator.modalities),
            size=size,
            seed=seed,
            every_brain_slice=True,
            scored=scored,
        )
    except RuntimeError as error:
        # SimpleITK reports a registration that cannot start or converge as a RuntimeError.
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        others = [
            str(path)
            for name, path in {**files, **(scored or {})}.items()
            if name not in (reference, SEGMENTATION)
        ]
        detail = lines[-1][:200] if lines else "ITK error"
        raise SynthesisError(
            f"could not register {' '.join(others)} onto {files[reference]}: {detail}"
        ) from None


def check_reference(reference: str) -> str:
    """``--reference`` as a canonical modality name (``t2w`` -> t2); a one-line SynthesisError for a name
    that is no contrast."""
    name = canonical_modality(reference)
    if name not in MODALITIES:
        raise SynthesisError(f"--reference {reference}: unknown modality (known: {' '.join(MODALITIES)})")
    return name


def synthesize_volume(
    generator: LoadedGenerator,
    inputs: dict[str, Path],
    target: str,
    *,
    reference: str | None = None,
    batch_size: int = 8,
    seed: int = 0,
    progress: str | None = None,
    spread: str | None = None,
    other_weights: LoadedGenerator | None = None,
) -> SynthesisResult:
    """Synthesize ``target`` for one subject from its NIfTI ``inputs`` (modality -> file) and nothing else:
    the mask, the crop and every scale come from the inputs, and every axial slice with any voxel of
    their mask is predicted.

    reference: the input whose grid the output takes (default `default_reference`). spread: None,
    "flip", "weights" or "both" (see `spread_variants`; "weights" and "both" need ``other_weights``,
    e.g. ``load_generator(C, weights="raw")`` beside the EMA ``generator``): the result then has
    ``spread`` [Z, H, W] and ``spread_image``, while ``synthesized`` stays the generator's own
    prediction. Raises SynthesisError or data_prep's VolumeError with a one-line reason.
    """
    variants = spread_variants(generator, spread, other_weights)
    target = canonical_modality(target)
    names = [canonical_modality(name) for name in inputs]
    if not names:
        raise SynthesisError("no input contrast given (use --input MODALITY=FILE)")
    if target in names:
        raise SynthesisError(f"--target {target}: is also an input")
    reason = generator.serves(names, target)
    if reason:
        raise SynthesisError(reason)
    reference = check_reference(reference) if reference else default_reference(names)
    if reference not in names:
        raise SynthesisError(f"--reference {reference}: not among the inputs {' '.join(names)}")
    files = {canonical_modality(name): Path(path) for name, path in inputs.items()}
    prepared = prepare_nifti_subject(generator, files, reference, seed)
    synthesized, spread_slices = predict_with_spread(
        variants,
        prepared.images.transpose(1, 0, 2, 3),
        names,
        target,
        batch_size=batch_size,
        progress=progress,
    )
    mask = prepared.mask.astype(np.float32)
    synthesized *= mask
    spread_image = None
    if spread_slices is not None:
        spread_slices *= mask
        description = SPREAD_DESCRIPTION.format(target=target.upper(), count=len(variants))
        header = nib.load(files[reference]).header.copy()
        # Values in [0, 1] have a standard deviation of at most 0.5: the display range.
        spread_image = _as_float_image(
            _on_reference_grid(spread_slices, prepared, reference, header), description, 0.5
        )
    return SynthesisResult(
        image=synthesized_image(generator, synthesized, prepared, files, reference, target),
        prepared=prepared,
        synthesized=synthesized,
        reference=reference,
        inputs=names,
        target=target,
        input_files={name: files[name] for name in names},
        variants=variants,
        spread=spread_slices,
        spread_image=spread_image,
    )
