"""The subjects an evaluation scores: a shard split (the slices and mask data_prep kept for training) or a
folder of NIfTI subjects, prepared per task from its inputs alone as ``synthesize`` prepares them."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from data_prep.shard_reader import ShardFolder
from data_prep.volumes import PreparedSubject, discover_nifti_subjects
from medgan.evaluation.tasks import Task
from medgan.inference.loading import LoadedGenerator
from medgan.inference.synthesis import (
    SEGMENTATION,
    SynthesisError,
    default_reference,
    prepare_nifti_subject,
    synthesized_image,
)
from medgan.shards import ChannelMap, subject_stacks


@dataclass(slots=True)
class SubjectSlices:
    """One subject, ready to score.

    images: float32 [Z, M, H, W] in [0, 1] in the generator's channel order (absent contrasts zero).
    present: the contrasts the subject has. mask: bool [Z, H, W] brain (or head) mask.
    seg: uint8 [Z, H, W] BraTS labels, or None. slices: int [Z] axial slice index of each slice.
    spacing: voxel size in mm along (Z, H, W), for displaying sagittal and coronal views.
    prepared: the NIfTI preparation the slices come from (to put a prediction back on the subject's
    grid), None for a shard subject.
    """

    subject: str
    images: np.ndarray
    present: list[str]
    mask: np.ndarray
    seg: np.ndarray | None
    slices: np.ndarray
    spacing: tuple[float, float, float]
    prepared: PreparedSubject | None = None

    def for_task(self, task: Task) -> SubjectSlices | None:
        """The slices to score ``task`` on: a shard subject is the same for every task (the shards' own
        mask and slices)."""
        return self


def _spacing(geometry: dict[str, Any] | None) -> tuple[float, float, float]:
    """(z, x, y) mm of the canonical grid; slices are [Z, H = x, W = y]."""
    if not geometry:
        return (1.0, 1.0, 1.0)
    x, y, z = np.linalg.norm(np.asarray(geometry["canonical_affine"])[:3, :3], axis=0)
    return (float(z), float(x), float(y))


class ShardSubjects:
    """Subjects of one split of a shard folder, a whole subject at a time (shards keep subjects
    contiguous), in the generator's channel order."""

    def __init__(self, data_path: str | Path, split: str, modalities: list[str]) -> None:
        self.folder = ShardFolder.open(data_path)
        self.split = self.folder.split(split)
        self.channels = ChannelMap(self.split.modalities, list(modalities), self.folder.directory)
        self.subjects = list(self.split.subjects)
        self.scope = f"the axial slices in the {split!r} shards of {data_path}"

    @property
    def available_modalities(self) -> list[str]:
        return list(self.split.modalities)

    def __len__(self) -> int:
        return len(self.subjects)

    def __iter__(self) -> Iterator[SubjectSlices]:
        for stack in subject_stacks(self.split.shards, self.channels):
            yield SubjectSlices(
                subject=stack.subject,
                images=stack.images,
                present=[self.channels.canonical[i] for i in stack.present],
                mask=stack.mask,
                seg=stack.seg,
                slices=stack.slices,
                spacing=_spacing(self.folder.records.get(stack.subject, {}).get("geometry")),
            )


@dataclass(slots=True)
class NiftiSubject:
    """One subject of a NIfTI folder, prepared anew for each task from that task's inputs alone (their
    mask, crop and scales, every axial slice with brain), with the real target read only to score.

    files: contrast (or "seg") -> path. present: the contrasts it has. failures: where a task that
    cannot be prepared is noted (one line per subject and reason).
    """

    subject: str
    files: dict[str, Path]
    present: list[str]
    generator: LoadedGenerator
    failures: list[str]

    def for_task(self, task: Task) -> SubjectSlices | None:
        """The subject prepared from ``task.inputs`` (images [Z, M, H, W] in the generator's channel order:
        the inputs, and the real target on its own scale in its channel, to score), or None after noting
        why it cannot be."""
        from data_prep.volumes import VolumeError

        inputs = {m: self.files[m] for m in task.inputs}
        if SEGMENTATION in self.files:
            inputs[SEGMENTATION] = self.files[SEGMENTATION]
        try:
            prepared = prepare_nifti_subject(
                self.generator,
                inputs,
                default_reference(list(task.inputs)),
                scored={task.target: self.files[task.target]},
            )
        except (SynthesisError, VolumeError) as error:
            line = f"{self.subject}: {error}"
            if line not in self.failures:
                self.failures.append(line)
            return None
        images = prepared.images
        images[self.generator.modalities.index(task.target)] = prepared.scored[task.target]
        first = prepared.geometry.crop.z[0]
        return SubjectSlices(
            subject=self.subject,
            images=images.transpose(1, 0, 2, 3),
            present=list(task.inputs) + [task.target],
            mask=prepared.mask.astype(bool),
            seg=prepared.seg,
            slices=np.arange(first, first + prepared.mask.shape[0]),
            spacing=_spacing(prepared.geometry.to_dict()),
            prepared=prepared,
        )

    def synthesized_image(
        self, task: Task, subject: SubjectSlices, synthesized: np.ndarray
    ) -> nib.Nifti1Image:
        """``synthesized`` (float32 [Z, H, W] in [0, 1] on ``subject``'s slices for ``task``, zero outside
        the mask) on the grid of the task's reference input, the image ``synthesize_volume`` makes."""
        inputs = {m: self.files[m] for m in task.inputs}
        reference = default_reference(list(task.inputs))
        return synthesized_image(
            self.generator, synthesized, subject.prepared, inputs, reference, task.target
        )


class NiftiSubjects:
    """Subjects in a folder of NIfTI files (data_prep's `discover_nifti_subjects`), each prepared by
    data_prep like the shards, but per task from its inputs alone, keeping the whole in-plane extent and
    every axial slice with brain (`NiftiSubject`). Subjects or tasks that cannot be prepared are listed
    in `failures` with the reason."""

    def __init__(self, folder: str | Path, generator: LoadedGenerator) -> None:
        self.folder = Path(folder)
        self.found = {
            entry.subject: entry.files
            for entry in discover_nifti_subjects(folder, flag="--subjects").subjects
        }
        self.generator = generator
        self.failures: list[str] = []
        contrasts = {m for files in self.found.values() for m in files if m != SEGMENTATION}
        self._available = [m for m in generator.modalities if m in contrasts]
        self.subjects = list(self.found)
        self.scope = (
            f"the whole brain of each NIfTI subject in {folder}: every axial slice with any voxel of the "
            "mask of the task's inputs, which alone give the mask, crop and scales (the real target is "
            "read only to score)"
        )

    @property
    def available_modalities(self) -> list[str]:
        return self._available

    def __len__(self) -> int:
        return len(self.subjects)

    def __iter__(self) -> Iterator[NiftiSubject]:
        for subject, files in self.found.items():
            usable = {m: p for m, p in files.items() if m in self.generator.modalities or m == SEGMENTATION}
            contrasts = [m for m in usable if m != SEGMENTATION]
            if not contrasts:
                self.failures.append(f"{subject}: no contrast the checkpoint knows")
                continue
            yield NiftiSubject(subject, usable, contrasts, self.generator, self.failures)


def serves_task(subject: SubjectSlices | NiftiSubject, task: Task) -> bool:
    """Whether ``subject`` has the task's inputs and its target."""
    return task.target in subject.present and all(m in subject.present for m in task.inputs)
