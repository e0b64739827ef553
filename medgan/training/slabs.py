"""Training batches of slabs: S consecutive axial slices of one subject (``data.slab_slices``), each with its
2.5D context (``model.generator.context_slices``) when the generator takes one.

The slabs are cut from the per-slice samples of data_prep's shards as they are read; no slice is stored
twice. Whole subjects are dealt to the reading slots: with at least as many tar files as slots, the
files (shard layout 2 keeps each subject in one file); with fewer, every slot reads every file and keeps
every ``slots``-th subject. Per subject and epoch the slabs start at a random offset below S and do not
overlap. The shuffle buffer holds ``data.shuffle_buffer // S`` slabs, still undecoded: about
``data.shuffle_buffer`` slices, since a slab's context margins are the very samples of its neighbouring
slabs (shared, not copied), so margins add at most 2k slices per subject in the buffer. Each slab gets
one task and one left-right flip.

Everything else is :class:`~medgan.training.loader.SliceStream`'s: the order is a pure function of
``(seed, epoch, rank, world size, workers)``, ``skip_batches`` resumes exactly, and ``batch_size`` counts
slices (a multiple of S, so a batch holds whole slabs, consecutive in it, in slice order).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch

from data_prep.errors import DataError
from data_prep.shard_reader import ShardSplit, raw_samples
from data_prep.volumes import LEFT_RIGHT_AXIS
from medgan.models.context import context_windows
from medgan.shards import stack_samples, subject_runs
from medgan.training.loader import SliceStream, TaskSpec, choose_task


def _subjects(raws: Iterable[dict[str, Any]], where: str) -> Iterator[list[dict[str, Any]]]:
    """The raw samples of ``raws`` grouped by subject (``medgan.shards.subject_runs``), each group in slice
    order; a subject that comes back after another, or slices out of order, break the layout: a
    DataError."""
    seen: set[str] = set()
    for subject, slices, run in subject_runs(raws):
        if subject in seen:
            raise DataError(
                f"{where}: {run[0]['__key__']}: subject {subject} is split within its split's files"
            )
        for index in range(1, len(slices)):
            if slices[index] != slices[index - 1] + 1:
                raise DataError(
                    f"{where}: {run[index]['__key__']}: slice {slices[index]} follows slice "
                    f"{slices[index - 1]} of {subject}"
                )
        seen.add(subject)
        yield run


class SlabStream(SliceStream):
    """Endless training batches of slabs, as :class:`SliceStream`'s training batches (same fields; per
    sample ``images [M, H, W]`` is the slice itself) plus, with ``context_slices`` k > 0, ``context
    [B, 2k + 1, M, H, W]``: each slice's neighbours within its subject (``medgan.models.context``)."""

    def __init__(
        self,
        split: ShardSplit,
        canonical: list[str],
        task: TaskSpec,
        batch_size: int,
        *,
        slab_slices: int,
        context_slices: int,
        **options: Any,
    ) -> None:
        super().__init__(split, canonical, task, batch_size, train=True, **options)
        if batch_size % slab_slices:
            raise ValueError(f"batch_size {batch_size} is not a multiple of slab_slices {slab_slices}")
        needs = [
            *([f"data.slab_slices {slab_slices}"] if slab_slices > 1 else []),
            *([f"model.generator.context_slices {context_slices}"] if context_slices else []),
        ]
        split.require_whole_subjects(" and ".join(needs) or "a slab stream")
        self.slab_slices = slab_slices
        self.context_slices = context_slices
        self.slabs_in_buffer = max(1, self.shuffle_buffer // slab_slices)

    def _slot_subjects(self, slot: int, slots: int, cycle: int) -> Iterator[list[dict[str, Any]]]:
        shards = self._cycle_shards(cycle)
        where = f"{self.split.directory} ({self.split.name})"
        if len(shards) >= slots:
            yield from _subjects(raw_samples(shards[slot::slots]), where)
            return
        for ordinal, subject in enumerate(_subjects(raw_samples(shards), where)):
            if ordinal % slots == slot:
                yield subject

    def _slabs(
        self, subject: list[dict[str, Any]], rng: np.random.Generator
    ) -> Iterator[tuple[list[dict[str, Any]], int]]:
        """(raw samples of the slab and its context margins within the subject, the slab's first index in
        them) for each slab of one subject, from a random offset below S."""
        count, slab, margin = len(subject), self.slab_slices, self.context_slices
        if count < slab:
            return
        offset = int(rng.integers(min(slab, count - slab + 1)))
        for start in range(offset, count - slab + 1, slab):
            low, high = max(0, start - margin), min(count, start + slab + margin)
            yield subject[low:high], start - low

    def _convert_slab(
        self, raws: list[dict[str, Any]], first: int, rng: np.random.Generator
    ) -> list[dict[str, Any]] | None:
        """The slab's S samples, in slice order, with one task and one flip; None when the subject cannot
        serve the task."""
        stack = stack_samples(raws, self.channels)
        choice = choose_task(stack.present, self.task, rng)
        if choice is None:
            return None
        inputs, target = choice
        images = stack.images
        mask = stack.mask.astype(np.float32)[:, None]
        seg = (np.zeros(stack.mask.shape, np.uint8) if stack.seg is None else stack.seg).astype(np.uint8)[
            :, None
        ]
        if self.random_flips and rng.random() < 0.5:
            images = np.flip(images, LEFT_RIGHT_AXIS).copy()
            mask = np.flip(mask, LEFT_RIGHT_AXIS).copy()
            seg = np.flip(seg, LEFT_RIGHT_AXIS).copy()
        available = np.zeros(len(self.canonical), dtype=bool)
        available[inputs] = True
        centres = range(first, first + self.slab_slices)
        windows = (
            context_windows(
                torch.from_numpy(images), torch.tensor(list(centres)), self.context_slices
            ).numpy()
            if self.context_slices
            else None
        )
        samples = []
        for position, index in enumerate(centres):
            sample = {
                "images": images[index],
                "available": available,
                "target_index": np.int64(target),
                "target": images[index, target : target + 1].copy(),
                "mask": mask[index],
                "seg": seg[index],
                "key": stack.keys[index],
                "subject": stack.subject,
                "slice": np.int64(stack.slices[index]),
            }
            if windows is not None:
                sample["context"] = windows[position]
            samples.append(sample)
        return samples

    def _samples(self) -> Iterator[dict[str, Any]]:
        slot, slots, _, _ = self._slot()
        for cycle in itertools.count():
            rng = np.random.default_rng([self.seed, self.epoch, cycle, slot, 1])
            slabs = (
                slab
                for subject in self._slot_subjects(slot, slots, cycle)
                for slab in self._slabs(subject, rng)
            )
            produced = 0
            for raws, first in self._shuffled(slabs, rng, self.slabs_in_buffer):
                samples = self._convert_slab(raws, first, rng)
                if samples is not None:
                    produced += 1
                    yield from samples
            if produced == 0 and cycle == 0:
                # an endless loop over an empty slot would hang this rank: stop with the reason instead
                raise DataError(
                    f"{self.split.directory}: reading slot {slot} of {slots} found no slab of "
                    f"{self.slab_slices} slices in split {self.split.name!r} (fewer subjects than ranks x "
                    "workers, subjects with fewer slices than a slab, or none serves the task)"
                )
