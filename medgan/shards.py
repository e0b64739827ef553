"""What medgan makes of data_prep's shards, which it reads through ``data_prep.shard_reader`` (data_prep
owns the format): each sample's channels mapped onto the generator's canonical modality list, a split's
subjects as whole stacks of slices (validation and evaluation score whole volumes), and the check that a
checkpoint's training data is in the format and normalisation this version reads.

It reads one format: data_prep's ``FORMAT_VERSION`` with data_prep's current normalisation (a model sees
intensities on one scale; shards or checkpoints of another are refused, see :func:`format_problem`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data_prep.errors import DataError
from data_prep.shard_reader import decode_sample, format_mismatch, raw_samples
from data_prep.volumes import canonical_modality


def format_problem(training_data: dict[str, Any]) -> str | None:
    """None when ``training_data`` (a checkpoint's record, ``ShardFolder.training_data``) describes data in
    the shard format and normalisation this version reads, else what it is instead, e.g.
    ``shard format 1 (percentile normalisation), but this version reads shard format 2 (...)``."""
    return format_mismatch(training_data.get("format_version"), training_data.get("normalisation"))


@dataclass(slots=True)
class DecodedSample:
    """One axial slice in the generator's channel order.

    images: float32 ``[M, H, W]`` in ``[0, 1]`` (``canonical`` order; absent contrasts zero).
    present: indices into ``canonical`` of the contrasts the subject has, ascending.
    mask: uint8 ``[H, W]``. seg: uint8 ``[H, W]`` BraTS labels or None. info: the sample's JSON.
    """

    key: str
    info: dict[str, Any]
    images: np.ndarray
    present: list[int]
    mask: np.ndarray
    seg: np.ndarray | None

    @property
    def subject(self) -> str:
        return str(self.info["subject"])


class ChannelMap:
    """Maps a split's manifest channel order onto the generator's ``canonical`` order, by name."""

    def __init__(self, manifest_modalities: tuple[str, ...], canonical: list[str], where: Path) -> None:
        unknown = [m for m in manifest_modalities if m not in canonical]
        if unknown:
            raise DataError(
                f"{where}: contrasts {' '.join(unknown)} are not among the model's {' '.join(canonical)}"
            )
        self.canonical = list(canonical)
        self.channels = [self.canonical.index(m) for m in manifest_modalities]

    def place(self, images: np.ndarray) -> np.ndarray:
        """float32 ``[..., M', H, W]`` in the canonical order from ``images [..., M, H, W]`` in the
        manifest's order; a canonical contrast the manifest lacks is all zero."""
        placed = np.zeros((*images.shape[:-3], len(self.canonical), *images.shape[-2:]), dtype=np.float32)
        placed[..., self.channels, :, :] = images
        return placed

    def decode(self, raw: dict[str, Any], with_seg: bool = False) -> DecodedSample:
        """A raw sample (``data_prep.shard_reader.raw_samples``) decoded into the canonical channels."""
        stored = decode_sample(raw, with_seg)
        images = self.place(stored.images)
        present = sorted(self.canonical.index(canonical_modality(m)) for m in stored.info["present"])
        return DecodedSample(stored.key, stored.info, images, present, stored.mask, stored.seg)


@dataclass(slots=True)
class SubjectStack:
    """Consecutive slices of one subject of a shard split, stacked in slice order, in the generator's
    channel order (a whole subject, or a slab of one).

    images: float32 ``[Z, M, H, W]`` in ``[0, 1]`` (absent contrasts zero). present: indices into the
    canonical list of the contrasts the subject has. mask: bool ``[Z, H, W]``. seg: uint8 ``[Z, H, W]``
    BraTS labels, or None. slices: int ``[Z]``, each slice's axial index. keys: each slice's sample key.
    """

    subject: str
    images: np.ndarray
    present: list[int]
    mask: np.ndarray
    seg: np.ndarray | None
    slices: np.ndarray
    keys: list[str]


def subject_runs(raws: Iterable[dict[str, Any]]) -> Iterator[tuple[str, list[int], list[dict[str, Any]]]]:
    """(subject, slice indices, raw samples) of each run of consecutive samples of one subject in
    ``raws`` (undecoded, as ``data_prep.shard_reader.raw_samples`` yields them)."""
    run: list[dict[str, Any]] = []
    slices: list[int] = []
    current = ""
    for raw in raws:
        info = json.loads(raw["json"])
        subject = str(info["subject"])
        if run and subject != current:
            yield current, slices, run
            run, slices = [], []
        current = subject
        run.append(raw)
        slices.append(int(info["slice"]))
    if run:
        yield current, slices, run


def stack_samples(raws: list[dict[str, Any]], channels: ChannelMap) -> SubjectStack:
    """Raw samples of one subject decoded into the canonical channels and stacked in slice order."""
    samples = sorted((channels.decode(raw, with_seg=True) for raw in raws), key=lambda s: s.info["slice"])
    has_seg = all(sample.seg is not None for sample in samples)
    return SubjectStack(
        subject=samples[0].subject,
        images=np.stack([sample.images for sample in samples]),
        present=samples[0].present,
        mask=np.stack([sample.mask for sample in samples]).astype(bool),
        seg=np.stack([sample.seg for sample in samples]) if has_seg else None,
        slices=np.array([sample.info["slice"] for sample in samples]),
        keys=[sample.key for sample in samples],
    )


def subject_stacks(
    shards: Iterable[Path],
    channels: ChannelMap,
    keep: Callable[[int], bool] = lambda ordinal: True,
    limit: int = 0,
) -> Iterator[SubjectStack]:
    """The subjects of ``shards`` (read in order; a subject's slices are consecutive in every shard layout),
    whole; ``keep(ordinal)`` picks which to decode (the n-th subject met has ordinal n), and reading stops
    after the first ``limit`` subjects (0: all)."""
    for ordinal, (_, _, run) in enumerate(subject_runs(raw_samples(shards))):
        if keep(ordinal):
            yield stack_samples(run, channels)
        if limit and ordinal + 1 >= limit:
            return
