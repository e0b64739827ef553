"""`python -m data_prep verify DIR`: re-read a shard folder and check it against its manifest.

Checks every shard's sha256 and sample count, and decodes every sample: the fields present, dtypes
and shapes, values in [0, 1], absent modalities all zero, mask and seg labels, and that each sample's
subject belongs to its shard's split. Splits must be subject- and patient-disjoint. The first problem
stops the check with an UserError whose one line names the shard, sample or field.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections import defaultdict
from pathlib import Path

import numpy as np

from data_prep.errors import UserError
from data_prep.manifest import FORMAT_VERSION, MANIFEST_NAME, SAMPLE_FIELDS, SEG_FIELD, sha256_file
from data_prep.splits import SPLITS
from data_prep.volumes import SEG_LABELS


class VerificationError(UserError):
    """A shard folder that does not match its manifest (one line: where and what)."""


def _load_manifest(folder: Path) -> dict:
    if not folder.is_dir():
        raise VerificationError(f"{folder}: no such folder")
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise VerificationError(f"{folder}: no {MANIFEST_NAME} (not a finished shard folder)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise VerificationError(f"{path}: unreadable ({error})") from None
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise VerificationError(
            f"{path}: format_version {version!r}, this data_prep reads {FORMAT_VERSION} "
            "(re-shard with python -m data_prep shard)"
        )
    for key in ("modalities", "in_plane_size", "subjects", "splits"):
        if key not in manifest:
            raise VerificationError(f"{path}: missing field {key!r}")
    return manifest


def _samples_in(shard: Path):
    """Yield (key, {field: bytes}) per sample, in tar order (webdataset groups consecutive members)."""
    try:
        with tarfile.open(shard, "r:") as archive:
            key, fields = None, {}
            for member in archive:
                if not member.isfile():
                    continue
                name = member.name
                stem, _, field = name.partition(".")
                if stem != key:
                    if key is not None:
                        yield key, fields
                    key, fields = stem, {}
                fields[field] = archive.extractfile(member).read()
            if key is not None:
                yield key, fields
    except (tarfile.TarError, OSError, EOFError) as error:
        raise VerificationError(f"{shard.name}: not a readable tar file ({error})") from None


def _check_sample(where: str, fields: dict, manifest: dict, split: str) -> dict:
    modalities = manifest["modalities"]
    height, width = manifest["in_plane_size"]
    missing = [name for name in SAMPLE_FIELDS if name not in fields]
    if missing:
        raise VerificationError(f"{where}: missing field {missing[0]}")
    info = json.loads(fields["json"])
    subject = info.get("subject")
    entry = manifest["subjects"].get(subject)
    if entry is None:
        raise VerificationError(f"{where}: subject {subject!r} is not in the manifest")
    if entry["split"] != split:
        raise VerificationError(
            f"{where}: subject {subject} belongs to {entry['split']}, found in a {split} shard"
        )
    image = np.load(io.BytesIO(fields["img.npy"]), allow_pickle=False)
    if image.dtype != np.float16 or image.shape != (len(modalities), height, width):
        raise VerificationError(
            f"{where}: img.npy is {image.dtype} {image.shape}, "
            f"expected float16 {(len(modalities), height, width)}"
        )
    if not np.all(np.isfinite(image)) or image.min() < 0 or image.max() > 1:
        raise VerificationError(f"{where}: img.npy values outside [0, 1]")
    for channel, modality in enumerate(modalities):
        if modality not in info.get("present", []) and np.any(image[channel]):
            raise VerificationError(f"{where}: absent modality {modality} is not all zero")
    mask = np.load(io.BytesIO(fields["mask.npy"]), allow_pickle=False)
    if mask.dtype != np.uint8 or mask.shape != (height, width) or mask.max(initial=0) > 1:
        raise VerificationError(
            f"{where}: mask.npy is {mask.dtype} {mask.shape}, expected uint8 0/1 {(height, width)}"
        )
    if info.get("has_seg") != (SEG_FIELD in fields):
        raise VerificationError(
            f"{where}: has_seg is {info.get('has_seg')} "
            f"but seg.npy is {'present' if SEG_FIELD in fields else 'absent'}"
        )
    if SEG_FIELD in fields:
        seg = np.load(io.BytesIO(fields[SEG_FIELD]), allow_pickle=False)
        labels = set(np.unique(seg).tolist()) - {0, *SEG_LABELS}
        if seg.dtype != np.uint8 or seg.shape != (height, width) or labels:
            raise VerificationError(
                f"{where}: seg.npy is {seg.dtype} {seg.shape} with labels {sorted(labels)}"
            )
    return info


def verify_shards(folder: Path) -> str:
    """Check a shard folder; returns a one-line summary, raises VerificationError on the first problem."""
    folder = Path(folder)
    manifest = _load_manifest(folder)
    subjects_by_split: dict[str, set[str]] = defaultdict(set)
    total = 0
    for split in SPLITS:
        record = manifest["splits"].get(split, {"shards": [], "samples": 0})
        counted = 0
        for shard_record in record["shards"]:
            shard = folder / shard_record["file"]
            if not shard.is_file():
                raise VerificationError(f"{shard.name}: listed in the manifest but missing")
            digest = sha256_file(shard)
            if digest != shard_record["sha256"]:
                raise VerificationError(
                    f"{shard.name}: sha256 {digest[:12]}... does not match "
                    f"the manifest's {shard_record['sha256'][:12]}... (modified or corrupted)"
                )
            in_shard = 0
            for key, fields in _samples_in(shard):
                info = _check_sample(f"{shard.name}: {key}", fields, manifest, split)
                subjects_by_split[split].add(info["subject"])
                in_shard += 1
            if in_shard != shard_record["samples"]:
                raise VerificationError(
                    f"{shard.name}: {in_shard} samples, the manifest says {shard_record['samples']}"
                )
            counted += in_shard
        if counted != record["samples"]:
            raise VerificationError(
                f"split {split}: {counted} samples in its shards, the manifest says {record['samples']}"
            )
        total += counted
    patients = {subject: entry["patient"] for subject, entry in manifest["subjects"].items()}
    for index, first in enumerate(SPLITS):
        for second in SPLITS[index + 1 :]:
            shared = {patients[s] for s in subjects_by_split[first]} & {
                patients[s] for s in subjects_by_split[second]
            }
            if shared:
                raise VerificationError(f"patient {sorted(shared)[0]} appears in both {first} and {second}")
    counts = ", ".join(f"{split} {len(subjects_by_split[split])}" for split in SPLITS)
    return f"OK: {folder}: {total} samples, subjects per split: {counts}; every shard matches its sha256"
