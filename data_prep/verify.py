"""`python -m data_prep verify DIR`: re-read a shard folder and check it against its manifest.

Checks every shard's sha256 and sample count, and decodes every sample: the fields present, dtypes
and shapes, values in [0, 1], absent modalities all zero, mask and seg labels, and that each sample's
subject belongs to its shard's split. Splits must be subject- and patient-disjoint. The first problem
stops the check with an UserError whose one line names the shard, sample or field.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from data_prep.errors import DataError
from data_prep.manifest import SAMPLE_FIELDS, sha256_file
from data_prep.shard_reader import ShardFile, ShardFolder, decode_sample, raw_samples
from data_prep.splits import SPLITS
from data_prep.volumes import SEG_LABELS


class VerificationError(DataError):
    """A shard folder that does not match its manifest (one line: where and what)."""


def _check_sample(where: str, fields: dict, manifest: dict, split: str) -> dict:
    """The sample's JSON, once its fields, subject and arrays are as the manifest says."""
    missing = [name for name in SAMPLE_FIELDS if name not in fields]
    if missing:
        raise VerificationError(f"{where}: missing field {missing[0]}")
    sample = decode_sample(fields)
    info = sample.info
    subject = info.get("subject")
    entry = manifest["subjects"].get(subject)
    if entry is None:
        raise VerificationError(f"{where}: subject {subject!r} is not in the manifest")
    if entry["split"] != split:
        raise VerificationError(
            f"{where}: subject {subject} belongs to {entry['split']}, found in a {split} shard"
        )
    _check_images(where, sample.images, info, manifest)
    _check_labels(where, sample.mask, sample.seg, info, tuple(manifest["in_plane_size"]))
    return info


def _check_images(where: str, image: np.ndarray, info: dict, manifest: dict) -> None:
    modalities = manifest["modalities"]
    height, width = manifest["in_plane_size"]
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


def _check_labels(where: str, mask: np.ndarray, seg: np.ndarray | None, info: dict, size: tuple) -> None:
    if mask.dtype != np.uint8 or mask.shape != size or mask.max(initial=0) > 1:
        raise VerificationError(f"{where}: mask.npy is {mask.dtype} {mask.shape}, expected uint8 0/1 {size}")
    if info.get("has_seg") != (seg is not None):
        raise VerificationError(
            f"{where}: has_seg is {info.get('has_seg')} "
            f"but seg.npy is {'present' if seg is not None else 'absent'}"
        )
    if seg is not None:
        labels = set(np.unique(seg).tolist()) - {0, *SEG_LABELS}
        if seg.dtype != np.uint8 or seg.shape != size or labels:
            raise VerificationError(
                f"{where}: seg.npy is {seg.dtype} {seg.shape} with labels {sorted(labels)}"
            )


def _verify_shard(shard: ShardFile, manifest: dict, split: str, subjects: dict[str, str]) -> int:
    """Check one tar file against its manifest entry; returns its sample count, adds its subjects (subject
    -> the first tar file holding it). From layout 2 on, a subject seen in an earlier file is an error."""
    name = shard.path.name
    if not shard.path.is_file():
        raise VerificationError(f"{name}: listed in the manifest but missing")
    digest = sha256_file(shard.path)
    if digest != shard.sha256:
        raise VerificationError(
            f"{name}: sha256 {digest[:12]}... does not match "
            f"the manifest's {shard.sha256[:12]}... (modified or corrupted)"
        )
    count = 0
    whole_subjects = int(manifest.get("layout_version", 1)) >= 2
    previous: tuple[str, int] | None = None
    in_this_file: set[str] = set()
    for fields in raw_samples([shard.path]):
        where = f"{name}: {fields['__key__']}"
        info = _check_sample(where, fields, manifest, split)
        subject, index = info["subject"], int(info["slice"])
        first_file = subjects.setdefault(subject, name)
        if whole_subjects and first_file != name:
            raise VerificationError(
                f"{where}: subject {subject} also in {first_file} (shard layout 2 keeps each subject in one "
                "tar file)"
            )
        # every layout: a subject's slices follow each other in slice order
        if previous is not None and previous[0] == subject and index != previous[1] + 1:
            raise VerificationError(f"{where}: slice {index} follows slice {previous[1]} of {subject}")
        if subject in in_this_file and previous is not None and previous[0] != subject:
            raise VerificationError(f"{where}: subject {subject} comes back after other subjects")
        in_this_file.add(subject)
        previous = (subject, index)
        count += 1
    if count != shard.samples:
        raise VerificationError(f"{name}: {count} samples, the manifest says {shard.samples}")
    return count


def _check_patients_disjoint(manifest: dict, subjects_by_split: dict[str, dict[str, str]]) -> None:
    patients = {subject: entry["patient"] for subject, entry in manifest["subjects"].items()}
    for index, first in enumerate(SPLITS):
        for second in SPLITS[index + 1 :]:
            shared = {patients[s] for s in subjects_by_split[first]} & {
                patients[s] for s in subjects_by_split[second]
            }
            if shared:
                raise VerificationError(f"patient {sorted(shared)[0]} appears in both {first} and {second}")


def verify_shards(folder: Path) -> str:
    """Check a shard folder; returns a one-line summary. Raises DataError on the first problem (the reader's
    for an unreadable manifest or tar file, VerificationError for a mismatch)."""
    shards = ShardFolder.open(folder)
    subjects_by_split: dict[str, dict[str, str]] = defaultdict(dict)
    total = 0
    for split in SPLITS:
        counted = sum(
            _verify_shard(shard, shards.manifest, split, subjects_by_split[split])
            for shard in shards.shard_files(split)
        )
        listed = shards.split_samples(split)
        if counted != listed:
            raise VerificationError(
                f"split {split}: {counted} samples in its shards, the manifest says {listed}"
            )
        total += counted
    _check_patients_disjoint(shards.manifest, subjects_by_split)
    counts = ", ".join(f"{split} {len(subjects_by_split[split])}" for split in SPLITS)
    summary = f"{total} samples, subjects per split: {counts}; every shard matches its sha256"
    return f"OK: {shards.directory}: {summary}"
