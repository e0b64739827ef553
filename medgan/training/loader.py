"""Streaming slices from data_prep's webdataset shards into training and validation batches.

The order is a pure function of ``(seed, epoch, rank, world size, workers)``: per epoch the shards are
permuted, dealt to the ``world_size * num_workers`` reading slots (or, when there are fewer shards than
slots, every slot reads every shard and keeps every ``slots``-th sample), shuffled through a seeded buffer
and repeated as needed, so every rank runs the same number of steps and none waits at an epoch's end.
A resumed run asks for the same epoch with ``skip_batches`` and gets exactly the batches not yet consumed.
"""

from __future__ import annotations

import itertools
import signal
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_prep.errors import DataError
from data_prep.shard_reader import ShardSplit, raw_samples
from data_prep.volumes import LEFT_RIGHT_AXIS
from medgan.shards import ChannelMap


@dataclass(frozen=True, slots=True)
class TaskSpec:
    """Which inputs and target each sample trains: ``target is None`` means a random task per sample."""

    inputs: tuple[int, ...] = ()
    target: int | None = None

    @staticmethod
    def from_names(inputs: list[str], target: str, canonical: list[str]) -> TaskSpec:
        if target == "any":
            return TaskSpec()
        return TaskSpec(inputs=tuple(canonical.index(m) for m in inputs), target=canonical.index(target))


def choose_task(present: list[int], task: TaskSpec, rng: np.random.Generator) -> tuple[list[int], int] | None:
    """(inputs, target) for one sample, or None when the sample cannot serve the task."""
    if task.target is None:
        if len(present) < 2:
            return None
        target = int(rng.choice(present))
        others = [m for m in present if m != target]
        count = int(rng.integers(1, len(others) + 1))
        return sorted(int(m) for m in rng.choice(others, size=count, replace=False)), target
    if task.target not in present:
        return None
    inputs = list(task.inputs) or [m for m in present if m != task.target]
    if not inputs or any(m not in present for m in inputs):
        return None
    return inputs, task.target


def validation_task(present: list[int], task: TaskSpec, name: str) -> tuple[list[int], int] | None:
    """Deterministic task for validation, a function of the sample's ``name`` alone (``subject/slice`` for
    a slice, the subject for a whole volume; never of where a rank met it, so validation scores do not
    depend on the world size): the fixed task, or a target picked among the present contrasts by a hash
    of ``name``, with every other present one as input."""
    if task.target is not None:
        return choose_task(present, task, np.random.default_rng(0))
    if len(present) < 2:
        return None
    # crc32, not hash(): Python salts str hashes per process, so ranks would disagree
    target = present[zlib.crc32(name.encode()) % len(present)]
    return [m for m in present if m != target], target


class SliceStream(IterableDataset):
    """Batches ``dict(images [B,M,H,W], available [B,M], target_index [B], target [B,1,H,W], mask [B,1,H,W],
    seg [B,1,H,W], key)`` in the canonical modality order (images float32 in ``[0, 1]``; ``seg`` uint8
    BraTS labels, all zero where a subject has no segmentation; flips flip it with the images).

    ``train=True``: seeded shuffling, random tasks and flips, endless (the caller counts steps).
    ``train=False``: one pass in shard order, every sample exactly once across ranks, each with a task that
    depends on the sample alone (the same on any world size).
    """

    def __init__(
        self,
        split: ShardSplit,
        canonical: list[str],
        task: TaskSpec,
        batch_size: int,
        *,
        seed: int,
        rank: int,
        world_size: int,
        train: bool,
        random_flips: bool = False,
        shuffle_buffer: int = 256,
        epoch: int = 0,
        skip_batches: int = 0,
    ) -> None:
        super().__init__()
        self.split = split
        self.canonical = list(canonical)
        self.task = task
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.train = train
        self.random_flips = random_flips
        self.shuffle_buffer = shuffle_buffer
        self.epoch = epoch
        self.skip_batches = skip_batches
        self.channels = ChannelMap(split.modalities, self.canonical, split.directory)

    def _slot(self) -> tuple[int, int, int, int]:
        """(reading slot, slot count, logical worker, workers of this rank).

        The DataLoader takes batch j from worker ``j % W``. Global batch k of the epoch belongs to logical
        worker ``k % W``; a loader resumed at batch k starts at its worker 0, so worker ids are rotated by k
        to keep each batch on the logical worker (and reading slot) that made it in the uninterrupted run.
        """
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        logical = (worker + (self.skip_batches if self.train else 0)) % workers
        return self.rank * workers + logical, self.world_size * workers, logical, workers

    def _raw_samples(self, shards: list[Path], keep: tuple[int, int] | None) -> Iterator[dict[str, Any]]:
        for index, sample in enumerate(raw_samples(shards)):
            if keep is None or index % keep[1] == keep[0]:
                yield sample

    def _cycle_shards(self, cycle: int) -> list[Path]:
        """The split's tar files in this cycle's order (training: a permutation per epoch and cycle)."""
        shards = list(self.split.shards)
        if self.train:
            order = np.random.default_rng([self.seed, self.epoch, cycle]).permutation(len(shards))
            shards = [shards[i] for i in order]
        return shards

    def _slot_samples(self, slot: int, slots: int, cycle: int) -> Iterator[dict[str, Any]]:
        shards = self._cycle_shards(cycle)
        if len(shards) >= slots:
            yield from self._raw_samples(shards[slot::slots], None)
        else:
            yield from self._raw_samples(shards, (slot, slots))

    def _shuffled(self, items: Iterator[Any], rng: np.random.Generator, capacity: int) -> Iterator[Any]:
        """``items`` through a seeded shuffle buffer of ``capacity`` items."""
        buffer: list[Any] = []
        for sample in items:
            buffer.append(sample)
            if len(buffer) >= capacity:
                yield buffer.pop(int(rng.integers(len(buffer))))
        while buffer:
            yield buffer.pop(int(rng.integers(len(buffer))))

    def _convert(self, raw: dict[str, Any], rng: np.random.Generator) -> dict[str, Any] | None:
        sample = self.channels.decode(raw, with_seg=True)
        choice = (
            choose_task(sample.present, self.task, rng)
            if self.train
            else validation_task(sample.present, self.task, f"{sample.subject}/{int(sample.info['slice'])}")
        )
        if choice is None:
            return None
        inputs, target = choice
        images, mask = sample.images, sample.mask.astype(np.float32)[None]
        seg = (np.zeros_like(sample.mask) if sample.seg is None else sample.seg).astype(np.uint8)[None]
        if self.train and self.random_flips and rng.random() < 0.5:
            # left-right flips keep anatomy plausible (the brain is roughly symmetric); front-back would not
            images = np.flip(images, LEFT_RIGHT_AXIS).copy()
            mask = np.flip(mask, LEFT_RIGHT_AXIS).copy()
            seg = np.flip(seg, LEFT_RIGHT_AXIS).copy()
        available = np.zeros(len(self.canonical), dtype=bool)
        available[inputs] = True
        return {
            "images": images,
            "available": available,
            "target_index": np.int64(target),
            "target": images[target : target + 1].copy(),
            "mask": mask,
            "seg": seg,
            "key": sample.key,
            "subject": sample.subject,
            "slice": np.int64(sample.info["slice"]),
        }

    def _samples(self) -> Iterator[dict[str, Any]]:
        slot, slots, _, _ = self._slot()
        cycles = itertools.count() if self.train else range(1)
        for cycle in cycles:
            rng = np.random.default_rng([self.seed, self.epoch, cycle, slot, 1])
            stream = self._slot_samples(slot, slots, cycle)
            if self.train:
                stream = self._shuffled(stream, rng, self.shuffle_buffer)
            produced = 0
            for raw in stream:
                sample = self._convert(raw, rng)
                if sample is not None:
                    produced += 1
                    yield sample
            if produced == 0 and self.train and cycle == 0:
                # an endless loop over an empty slot would hang this rank: stop with the reason instead
                raise DataError(
                    f"{self.split.directory}: reading slot {slot} of {slots} found no usable sample in split "
                    f"{self.split.name!r} (fewer samples than ranks x workers, or none serves the task)"
                )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        _, _, worker, workers = self._slot()
        # logical worker w produced ceil((k - w) / W) of the first k batches
        to_skip = max(0, (self.skip_batches - worker + workers - 1) // workers) if self.train else 0
        batch: list[dict[str, Any]] = []
        for sample in self._samples():
            batch.append(sample)
            if len(batch) == self.batch_size:
                if to_skip:
                    to_skip -= 1
                else:
                    yield collate(batch)
                batch = []
        if batch and not self.train:
            yield collate(batch)


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack numpy samples into torch tensors. numpy stacks: torch.stack on a busy machine waits on its
    intra-op thread pool (measured 57 ms against 1 ms a batch under load)."""
    names = ("key", "subject")
    batch: dict[str, Any] = {
        name: torch.from_numpy(np.stack([sample[name] for sample in samples]))
        for name in samples[0]
        if name not in names
    }
    for name in names:
        batch[name] = [s[name] for s in samples]
    return batch


def _ignore_termination_signals(worker_id: int) -> None:
    """DeepSpeed's launcher sends SIGTERM to every process under a rank, loader workers first; they must
    keep serving batches while their rank finishes its step and saves (they exit with the rank)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def make_loader(stream: SliceStream, num_workers: int) -> DataLoader:
    """A DataLoader over a batched stream (batch_size=None: the stream batches itself)."""
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=num_workers,
        worker_init_fn=_ignore_termination_signals if num_workers else None,
        persistent_workers=False,
        prefetch_factor=4 if num_workers else None,
        pin_memory=torch.cuda.is_available(),
    )
