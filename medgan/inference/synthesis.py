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

Test-time spread (``spread=``): the voxelwise standard deviation over up to 4 variants of the same
prediction (the in-plane flip training augments with, and the checkpoint's EMA and raw weights). It
shows where the prediction is fragile; it is a spread, not a calibrated uncertainty.

`write_synthesized` writes a result with its BIDS-derivatives-style JSON sidecars (`provenance`);
`synthesize_folder` does a whole folder, by a given target or, without one, in BraSyn mode (each subject
misses exactly one of its dataset's contrasts, and that one is synthesized).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from tqdm import tqdm

from data_prep.errors import UserError
from data_prep.volumes import (
    CEILING_MULTIPLE,
    DATASET_MODALITIES,
    LEFT_RIGHT_AXIS,
    MODALITIES,
    MODALITY_ALIASES,
    REFERENCE_LEVEL,
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
from medgan import __version__
from medgan.inference import provenance
from medgan.inference.loading import LoadedGenerator, load_generator

# NIfTI's descrip field holds 80 bytes. The scale is data_prep's healthy-median normalisation.
DESCRIPTION = "MedGAN-SSM synthesized {target}: {level:g} = {region} median, clipped at 1, 0 outside"
# Which mask the median is over, by data_prep's preparation (BraTS: skull-stripped brain; IXI: head).
MEDIAN_REGION = {"brats": "brain", "ixi": "head"}
SPREAD_DESCRIPTION = "MedGAN-SSM spread of {target}: SD over {count} variants, not calibrated"
_NIFTI_SUFFIXES = (".nii.gz", ".nii")
SPREADS = ("flip", "weights", "both")
SPREAD_SUFFIX = "_spread"
# BraSyn mode's sidecars go to the sibling folder <OUT>-provenance: OUT itself is what a participant zips.
PROVENANCE_SUFFIX = "-provenance"
# The flip training augments with: left-right, the H axis of the [.., H, W] model slices.
FLIP_AXIS = LEFT_RIGHT_AXIS
# BraTS 2023+ file names of the canonical contrasts (data_prep's aliases, read backwards).
BRATS_2023_NAMES = {MODALITY_ALIASES[name]: name for name in ("t1n", "t1c", "t2w", "t2f")}


class SynthesisError(UserError):
    """An input a user gave cannot be synthesized from; the one-line message names it and why."""


@dataclass(frozen=True, slots=True)
class Variant:
    """One way of running the prediction for the spread: these weights, on flipped slices or not."""

    generator: LoadedGenerator
    flipped: bool = False

    def describe(self) -> dict[str, Any]:
        """What a sidecar says of this variant."""
        return {
            "Weights": self.generator.source,
            "WeightsSHA256": self.generator.weights_sha256,
            "Flipped": "left-right (canonical x, the slices' H axis), flipped back after"
            if self.flipped
            else None,
        }


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


def spread_variants(
    generator: LoadedGenerator, spread: str | None, other_weights: LoadedGenerator | None = None
) -> list[Variant]:
    """The predictions a spread takes: the generator itself first, then with ``spread`` "flip" its
    prediction on flipped slices, "weights" ``other_weights`` (the same checkpoint's other set: raw
    when ``generator`` has the EMA), "both" all four combinations. None: the generator alone."""
    if spread is None:
        return [Variant(generator)]
    if spread not in SPREADS:
        raise SynthesisError(f"--spread {spread}: expected one of {' '.join(SPREADS)}")
    if spread in ("weights", "both") and other_weights is None:
        raise SynthesisError(f"--spread {spread}: needs the checkpoint's EMA and raw weights, got one set")
    weight_sets = [generator] + ([other_weights] if spread in ("weights", "both") else [])
    flips = (False, True) if spread in ("flip", "both") else (False,)
    return [Variant(weights, flipped) for weights in weight_sets for flipped in flips]


def _predict_variant(
    variant: Variant,
    images: np.ndarray,
    inputs: list[str],
    target: str,
    batch_size: int,
    progress: str | None,
) -> np.ndarray:
    """[Z, H, W] in [0, 1] from slices [Z, M, H, W]; a flipped variant predicts on flipped slices and
    flips its prediction back, so every variant is on the same pixels."""
    if not variant.flipped:
        return variant.generator.predict(images, inputs, target, batch_size, progress)
    flipped = np.flip(images, axis=FLIP_AXIS)
    predicted = variant.generator.predict(flipped, inputs, target, batch_size, progress)
    return np.ascontiguousarray(np.flip(predicted, axis=FLIP_AXIS))


def predict_with_spread(
    variants: list[Variant],
    images: np.ndarray,
    inputs: list[str],
    target: str,
    *,
    batch_size: int = 8,
    progress: str | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """(the first variant's prediction, the voxelwise population standard deviation over all variants,
    or None for a single variant), both float32 [Z, H, W] from slices [Z, M, H, W] in [0, 1]."""
    predictions = []
    for index, variant in enumerate(variants):
        label = f"{progress} ({index + 1}/{len(variants)})" if progress and len(variants) > 1 else progress
        predictions.append(_predict_variant(variant, images, inputs, target, batch_size, label))
    if len(predictions) == 1:
        return predictions[0], None
    return predictions[0], np.std(np.stack(predictions), axis=0).astype(np.float32)


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
            dataset=_preparation(generator, files),
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
    header = nib.load(files[reference]).header.copy()
    image = _on_reference_grid(synthesized, prepared, reference, header)
    spread_image = None
    if spread_slices is not None:
        spread_slices *= mask
        description = SPREAD_DESCRIPTION.format(target=target.upper(), count=len(variants))
        # Values in [0, 1] have a standard deviation of at most 0.5: the display range.
        spread_image = _as_float_image(
            _on_reference_grid(spread_slices, prepared, reference, header), description, 0.5
        )
    return SynthesisResult(
        image=_as_synthesized_image(image, target, _preparation(generator, files)),
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


def load_for_synthesis(
    checkpoint: str | Path, tag: str | None = None, device: str = "cpu", spread: str | None = None
) -> tuple[LoadedGenerator, LoadedGenerator | None]:
    """(generator, other weights) for `synthesize_volume`: the checkpoint's default weights, or for a
    "weights"/"both" spread its EMA and its raw weights (a checkpoint folder with both; an exported
    file holds one set, a one-line SynthesisError)."""
    if spread not in ("weights", "both"):
        return load_generator(checkpoint, tag, device), None
    if Path(checkpoint).is_file():
        raise SynthesisError(
            f"--spread {spread}: {checkpoint} is an exported file, which holds one set of weights; "
            "give the checkpoint folder (it has the EMA and the raw weights)"
        )
    return load_generator(checkpoint, tag, device, "ema"), load_generator(checkpoint, tag, device, "raw")


def spread_path(path: Path) -> Path:
    """``y.nii.gz`` -> ``y_spread.nii.gz`` beside it."""
    stem, suffix = _split_nifti_name(Path(path))
    return Path(path).with_name(stem + SPREAD_SUFFIX + suffix)


def _weights_record(generator: LoadedGenerator) -> dict[str, Any]:
    return {
        "Source": generator.source,
        "WeightsSHA256": generator.weights_sha256,
        "Modalities": generator.modalities,
        "TrainedTask": {"Inputs": generator.trained_inputs, "Target": generator.trained_target},
    }


def synthesized_sidecar(result: SynthesisResult, command: str) -> dict[str, Any]:
    """The JSON sidecar of a synthesized volume: synthetic, from which files, by which weights (their
    sha256 as loaded), with which normalisation, by which command."""
    generator = result.variants[0].generator
    inputs = provenance.input_record(result.input_files)
    region = MEDIAN_REGION[_preparation(generator, result.input_files)]
    return {
        "Description": (
            f"Synthetic {result.target.upper()} MRI predicted by MedGAN-SSM from "
            f"{' '.join(name.upper() for name in result.inputs)}; not an acquired image."
        ),
        "Synthetic": True,
        "SynthesizedContrast": result.target,
        "Sources": [entry["Path"] for entry in inputs.values()],
        "Inputs": inputs,
        "ReferenceGrid": inputs[result.reference]["Path"],
        "Intensity": (
            f"the training data's healthy-median scale (not scanner units): {REFERENCE_LEVEL:g} = the "
            f"subject's median of this contrast within the {region} mask, 1 = {CEILING_MULTIPLE:g} x that "
            "median (brighter clipped at 1), 0 outside the mask"
        ),
        "Normalisation": {
            "Training": generator.training_data.get("normalisation"),
            "Inputs": {name: scaling.to_dict() for name, scaling in result.prepared.scaling.items()},
        },
        "Model": _weights_record(generator),
        "GeneratedBy": {"Name": provenance.GENERATOR_NAME, "Version": __version__},
        "Command": command or None,
    }


def spread_sidecar(result: SynthesisResult, synthesized: Path, command: str) -> dict[str, Any]:
    """The JSON sidecar of a spread volume: which variants, of which synthesized file."""
    return {
        "Description": (
            f"Voxelwise standard deviation over {len(result.variants)} test-time variants of the synthetic "
            f"{result.target.upper()} in {synthesized.name}. A spread, not a calibrated uncertainty."
        ),
        "Synthetic": True,
        "Sources": [str(synthesized.resolve())],
        "Intensity": "standard deviation in the normalised [0, 1] scale, 0 outside the mask",
        "Variants": [variant.describe() for variant in result.variants],
        "Command": command or None,
    }


def provenance_folder(out: Path) -> Path:
    """Where BraSyn mode keeps the sidecars of ``out``'s volumes: the sibling ``<out>-provenance``, so
    ``out`` holds the volumes alone and can be zipped and submitted as it is."""
    out = Path(out)
    return out.with_name(out.name + PROVENANCE_SUFFIX)


def write_synthesized(
    result: SynthesisResult, path: Path, command: str = "", sidecar_folder: Path | None = None
) -> list[Path]:
    """Write ``result.image`` to ``path`` (.nii.gz), its spread (if any) to `spread_path`, each with
    its JSON sidecar, and the folder's ``dataset_description.json`` unless it has one; the spread, the
    sidecars and the description go to ``sidecar_folder`` when given, else beside the volume. Returns
    the files written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sidecars = Path(sidecar_folder) if sidecar_folder is not None else path.parent
    sidecars.mkdir(parents=True, exist_ok=True)
    nib.save(result.image, path)
    written = [path, provenance.write_sidecar(path, synthesized_sidecar(result, command), sidecars)]
    if result.spread_image is not None:
        spread_file = sidecars / spread_path(path).name
        nib.save(result.spread_image, spread_file)
        record = spread_sidecar(result, path, command)
        written += [spread_file, provenance.write_sidecar(spread_file, record, sidecars)]
    description = provenance.write_dataset_description(sidecars)
    return written + ([description] if description else [])


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


def _split_nifti_name(path: Path) -> tuple[str, str]:
    """(stem, suffix) of a NIfTI file name: ``a_t1.nii.gz`` -> (``a_t1``, ``.nii.gz``); no suffix when
    the name has neither ``.nii.gz`` nor ``.nii``."""
    for suffix in _NIFTI_SUFFIXES:
        if path.name.lower().endswith(suffix):
            return path.name[: -len(suffix)], path.name[-len(suffix) :]
    return path.name, ""


def contrast_spelling(files: dict[str, Path]) -> dict[str, str]:
    """How a subject's files spell the contrasts: canonical name -> name. BraTS 2023+ names when the
    last word of one of its image files' names is t1n, t1c, t2w or t2f (``t2f`` for flair), else the
    canonical names themselves."""
    canonical = {name: name for name in MODALITIES}
    for name, path in files.items():
        word = re.split(r"[-_.]", _split_nifti_name(path)[0])[-1].lower()
        if name != SEGMENTATION and word in BRATS_2023_NAMES.values():
            return {**canonical, **BRATS_2023_NAMES}
    return canonical


def missing_contrast(generator: LoadedGenerator, files: dict[str, Path]) -> str:
    """BraSyn mode: the one contrast of the subject's dataset (BraTS: t1 t1ce t2 flair) that the
    subject has no file for and the generator can synthesize; a one-line SynthesisError when it misses
    none, several, or one the generator was not trained to fill."""
    style = contrast_spelling(files)
    expected = [
        name for name in DATASET_MODALITIES[_preparation(generator, files)] if name in generator.modalities
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
