"""The one reader of data_prep's shard folders in medgan: the manifest, read once, and the one decoder of a
sample into the generator's canonical channels. Training and evaluation both use it.

The format is DESIGN.md's (written by ``data_prep/shard.py``): per axial slice ``KEY.json`` (subject,
slice, ``present``: the names of the contrasts the subject has), ``KEY.img.npy`` (float16 ``[M, H, W]`` in
the manifest's modality order, absent ones zero), ``KEY.mask.npy`` (uint8 ``[H, W]``) and, with a
segmentation, ``KEY.seg.npy`` (uint8 ``[H, W]``).

It reads one format: data_prep's ``FORMAT_VERSION`` with data_prep's current normalisation (a model sees
intensities on one scale; shards or checkpoints of another are refused, see :func:`format_problem`).
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data_prep.errors import UserError
from data_prep.volumes import FORMAT_VERSION, canonical_modality, normalisation_method

MANIFEST = "manifest.json"
REPORT = "report.json"


class DataError(UserError):
    """The shard folder a user pointed at is missing, incomplete or inconsistent (one line, names it)."""


@dataclass(frozen=True, slots=True)
class ShardSplit:
    """One split of a shard folder, as ``manifest.json`` describes it."""

    directory: Path
    name: str
    modalities: tuple[str, ...]
    shards: tuple[Path, ...]
    samples: int
    subjects: tuple[str, ...]
    manifest_sha256: str


@dataclass(frozen=True, slots=True)
class ShardFolder:
    """A finished shard folder: its manifest (parsed once) and what medgan needs of it.

    dataset: ``brats`` or ``ixi`` (which data_prep preparation made it). modalities: the manifest's
    channel order, canonical names. records: per subject, the manifest's entry (split, geometry, ...).
    """

    directory: Path
    manifest: dict[str, Any]
    manifest_sha256: str

    @staticmethod
    def open(path: str | Path) -> ShardFolder:
        """Read ``path/manifest.json`` of the format this version reads; errors name the folder or file and
        what is wrong (for another format or normalisation: the command that re-shards it)."""
        folder = ShardFolder.read(path)
        problem = format_problem(folder.training_data())
        if problem:
            raise DataError(f"{folder.directory}: {problem}: re-shard with {folder.reshard_command()}")
        return folder

    @staticmethod
    def read(path: str | Path) -> ShardFolder:
        """``path/manifest.json`` of any format version (to describe an old folder, never to load it)."""
        directory = Path(path)
        manifest_path = directory / MANIFEST
        if not manifest_path.is_file():
            raise DataError(
                f"{directory}: no {MANIFEST} (not a finished shard folder; run python -m data_prep shard)"
            )
        raw = manifest_path.read_bytes()
        try:
            manifest = json.loads(raw)
        except json.JSONDecodeError as error:
            raise DataError(f"{manifest_path}: not valid JSON ({error.msg} at line {error.lineno})") from None
        return ShardFolder(directory, manifest, hashlib.sha256(raw).hexdigest())

    @property
    def dataset(self) -> str | None:
        return self.manifest.get("dataset")

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(canonical_modality(name) for name in self.manifest["modalities"])

    @property
    def records(self) -> dict[str, dict[str, Any]]:
        return self.manifest.get("subjects", {})

    def split(self, name: str) -> ShardSplit:
        """Describe split ``name``; a missing split, shard file or an empty split is a DataError."""
        manifest_path = self.directory / MANIFEST
        splits = self.manifest.get("splits", {})
        if name not in splits:
            raise DataError(f"{manifest_path}: no split {name!r} (has {', '.join(sorted(splits)) or 'none'})")
        entry = splits[name]
        shards = tuple(self.directory / shard["file"] for shard in entry["shards"])
        missing = [str(path) for path in shards if not path.is_file()]
        if missing:
            raise DataError(f"{manifest_path}: shard {missing[0]} is listed but missing")
        samples = int(entry["samples"])
        if samples == 0 or not shards:
            raise DataError(f"{manifest_path}: split {name!r} holds no samples")
        return ShardSplit(
            directory=self.directory,
            name=name,
            modalities=self.modalities,
            shards=shards,
            samples=samples,
            subjects=tuple(entry.get("subjects", [])),
            manifest_sha256=self.manifest_sha256,
        )

    def reshard_command(self) -> str:
        """The data_prep command that makes this folder again in the current format, into a new folder."""
        source = self.manifest.get("source")
        if not source:
            # Format 1 manifests did not record the source; its report.json did.
            try:
                source = json.loads((self.directory / REPORT).read_text()).get("source")
            except (OSError, json.JSONDecodeError, AttributeError):
                source = None
        return (
            f"python -m data_prep shard --format {self.dataset or 'brats'} --src {source or 'RAW'} "
            f"--out {self.directory.with_name(self.directory.name + f'-format{FORMAT_VERSION}')}"
        )

    def training_data(self) -> dict[str, Any]:
        """What a checkpoint records about the data it was trained on (see ``medgan.checkpointing``)."""
        normalisation = {k: v for k, v in self.manifest.get("normalisation", {}).items() if k != "parameters"}
        return {
            "dataset": self.dataset,
            "modalities": list(self.modalities),
            "format_version": self.manifest.get("format_version"),
            "normalisation": normalisation,
            "in_plane_size": self.manifest.get("in_plane_size"),
            "manifest_sha256": self.manifest_sha256,
            "shards": str(self.directory),
        }


def format_problem(training_data: dict[str, Any]) -> str | None:
    """None when ``training_data`` (a manifest's or a checkpoint's record, :meth:`ShardFolder.training_data`)
    describes data in the shard format and normalisation this version reads, else what it is instead,
    e.g. ``shard format 1 (percentile normalisation), but this version reads shard format 2 (...)``."""
    version = training_data.get("format_version")
    normalisation = training_data.get("normalisation") or {}
    current = normalisation_method()
    if version == FORMAT_VERSION and all(normalisation.get(key) == value for key, value in current.items()):
        return None
    reads = f"but this version reads shard format {FORMAT_VERSION} ({current['method']} normalisation)"
    if version is None:
        return f"unrecorded shards (older than format {FORMAT_VERSION}), {reads}"
    return f"shard format {version} ({normalisation.get('method', 'unrecorded')} normalisation), {reads}"


def read_split(data_path: str | Path, split: str) -> ShardSplit:
    """The split ``split`` of the shard folder at ``data_path``."""
    return ShardFolder.open(data_path).split(split)


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


def _npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


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

    def decode(self, raw: dict[str, Any], with_seg: bool = False) -> DecodedSample:
        """A webdataset sample (``json``, ``img.npy``, ``mask.npy``[, ``seg.npy``] bytes) decoded."""
        info = json.loads(raw["json"])
        stored = _npy(raw["img.npy"])
        images = np.zeros((len(self.canonical), *stored.shape[-2:]), dtype=np.float32)
        images[self.channels] = stored
        present = sorted(self.canonical.index(canonical_modality(m)) for m in info["present"])
        seg = _npy(raw["seg.npy"]) if with_seg and "seg.npy" in raw else None
        return DecodedSample(raw["__key__"], info, images, present, _npy(raw["mask.npy"]), seg)


def raw_samples(shards: list[Path] | tuple[Path, ...]) -> Iterator[dict[str, Any]]:
    """The samples of ``shards`` in order, undecoded (webdataset's tar reader)."""
    from webdataset.tariterators import tarfile_samples

    yield from tarfile_samples([{"url": str(path)} for path in shards])
