"""Provenance of synthesized files, in the style of BIDS derivatives.

An output folder gets a ``dataset_description.json`` (``DatasetType: derivative``, ``GeneratedBy``
MedGAN-SSM), and every synthesized NIfTI ``X.nii.gz`` a sidecar ``X.json`` saying that it is synthetic
and how it was made: the input files (path and sha256), the sha256 of the weights actually loaded into
the network, where those weights came from, the normalisation, and the command line.

Sidecars are built by `sidecars` (from a synthesis result); this module holds the formats, the names,
the hashes and the writing, and imports nothing else from medgan but the version.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

import medgan

BIDS_VERSION = "1.10.0"
DATASET_DESCRIPTION = "dataset_description.json"
GENERATOR_NAME = "MedGAN-SSM"
_NIFTI_SUFFIXES = (".nii.gz", ".nii")
_READ_CHUNK = 1 << 20


def weights_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 (hex) of a state_dict: per tensor, in sorted name order, its name, dtype, shape and bytes.

    The same weights give the same hash whatever file or device they came from; any changed value,
    name, dtype or shape changes it.
    """
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """sha256 (hex) of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_READ_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def split_nifti_name(path: Path) -> tuple[str, str]:
    """(stem, suffix) of a NIfTI file name: ``a_t1.nii.gz`` -> (``a_t1``, ``.nii.gz``); no suffix when
    the name has neither ``.nii.gz`` nor ``.nii`` (in any case)."""
    for suffix in _NIFTI_SUFFIXES:
        if path.name.lower().endswith(suffix):
            return path.name[: -len(suffix)], path.name[-len(suffix) :]
    return path.name, ""


def sidecar_path(nifti: Path) -> Path:
    """``X.nii.gz`` or ``X.nii`` -> ``X.json`` beside it (BIDS: the sidecar shares the file's stem)."""
    nifti = Path(nifti)
    stem, suffix = split_nifti_name(nifti)
    return nifti.with_name(stem + ".json") if suffix else nifti.with_suffix(".json")


def dataset_description() -> dict[str, Any]:
    """BIDS derivatives' ``dataset_description.json`` for a folder of synthesized volumes."""
    return {
        "Name": "MedGAN-SSM synthetic MRI contrasts",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [
            {
                "Name": GENERATOR_NAME,
                "Version": medgan.__version__,
                "Description": (
                    "Synthetic MRI contrasts predicted by a conditional GAN from a subject's other "
                    "contrasts; not acquired images. Each file's JSON sidecar names its inputs, weights "
                    "and command."
                ),
            }
        ],
    }


def write_dataset_description(folder: Path) -> Path | None:
    """Write ``folder/dataset_description.json`` unless one is there already (then leave it and return
    None: the folder may be a larger derivatives dataset of its own)."""
    path = Path(folder) / DATASET_DESCRIPTION
    if path.exists():
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dataset_description(), indent=2) + "\n")
    return path


def input_record(files: Mapping[str, Path]) -> dict[str, dict[str, str]]:
    """contrast -> {"Path": absolute path, "SHA256": of the file's bytes}, for a sidecar."""
    return {
        name: {"Path": str(Path(path).resolve()), "SHA256": file_sha256(Path(path))}
        for name, path in files.items()
    }


def write_sidecar(nifti: Path, record: Mapping[str, Any], folder: Path | None = None) -> Path:
    """Write ``record`` as the JSON sidecar of ``nifti`` (`sidecar_path`), beside it or, with ``folder``,
    under the same name in ``folder``; returns its path."""
    path = sidecar_path(nifti)
    if folder is not None:
        path = Path(folder) / path.name
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path
