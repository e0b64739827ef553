"""How a synthesized result is written: the volume, its spread beside it (`spread_path`), and a JSON
sidecar for each saying that it is synthetic and how it was made (BIDS derivatives style; the formats,
hashes and writing belong to `provenance`). BraSyn mode keeps the sidecars in `provenance_folder`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nibabel as nib

from data_prep.volumes import CEILING_MULTIPLE, REFERENCE_LEVEL
from medgan import __version__
from medgan.inference import provenance
from medgan.inference.loading import LoadedGenerator
from medgan.inference.synthesis import MEDIAN_REGION, SynthesisResult, data_preparation

SPREAD_SUFFIX = "_spread"
# BraSyn mode's sidecars go to the sibling folder <OUT>-provenance: OUT itself is what a participant zips.
PROVENANCE_SUFFIX = "-provenance"


def spread_path(path: Path) -> Path:
    """``y.nii.gz`` -> ``y_spread.nii.gz`` beside it."""
    stem, suffix = provenance.split_nifti_name(Path(path))
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
    region = MEDIAN_REGION[data_preparation(generator, result.input_files)]
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
