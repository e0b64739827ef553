"""The one reader of a shard folder (``python -m data_prep shard`` writes it): ``verify`` and medgan both read
through it.

It opens ``manifest.json`` (read once, refused in one line naming the re-shard command when it is of another
format or normalisation), lists each split's tar files as the manifest does, yields the raw samples of tar
files (webdataset's grouping of members by key) and decodes a sample's arrays. Mapping channels onto a
model's modality list is medgan's (``medgan.shards``).

The format is DESIGN.md's: per axial slice ``KEY.json`` (subject, slice, ``present``: the names of the
contrasts the subject has), ``KEY.img.npy`` (float16 ``[M, H, W]`` in the manifest's modality order, absent
ones zero), ``KEY.mask.npy`` (uint8 ``[H, W]``) and, with a segmentation, ``KEY.seg.npy`` (uint8 ``[H, W]``).
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data_prep.errors import DataError
from data_prep.intensity import normalisation_method
from data_prep.manifest import FORMAT_VERSION, LAYOUT_VERSION, MANIFEST_NAME, REPORT_NAME, SEG_FIELD
from data_prep.modalities import canonical_modality

# What every manifest this version reads holds (the rest is described in docs/data.md).
REQUIRED_FIELDS = ("modalities", "in_plane_size", "subjects", "splits")


@dataclass(frozen=True, slots=True)
class ShardFile:
    """One tar file of a split, as the manifest lists it (whether it exists is not checked here)."""

    path: Path
    samples: int
    sha256: str


@dataclass(frozen=True, slots=True)
class ShardSplit:
    """One split of a shard folder, as ``manifest.json`` describes it; every listed shard exists."""

    directory: Path
    name: str
    modalities: tuple[str, ...]
    shards: tuple[Path, ...]
    samples: int
    subjects: tuple[str, ...]
    manifest_sha256: str
    layout_version: int = 1

    def require_whole_subjects(self, why: str) -> None:
        """A DataError unless every subject of the split sits in one tar file (layout 2), naming ``why``
        the caller needs that (e.g. ``data.slab_slices 8``) and the command that re-shards the folder."""
        if self.layout_version < LAYOUT_VERSION:
            command = ShardFolder.read(self.directory).reshard_command(f"-layout{LAYOUT_VERSION}")
            raise DataError(
                f"{self.directory}: shard layout {self.layout_version} (a subject's slices may cross from "
                f"one tar file into the next); {why} needs layout {LAYOUT_VERSION} (each subject in one tar "
                f"file): re-shard with {command}"
            )


def format_mismatch(format_version: Any, normalisation: dict[str, Any] | None) -> str | None:
    """None when ``format_version`` and ``normalisation`` (a manifest's, or a record copied from one) are the
    shard format and normalisation this version reads, else what they are instead, e.g.
    ``shard format 1 (percentile normalisation), but this version reads shard format 2 (...)``."""
    normalisation = normalisation or {}
    current = normalisation_method()
    if format_version == FORMAT_VERSION and all(normalisation.get(k) == v for k, v in current.items()):
        return None
    reads = f"but this version reads shard format {FORMAT_VERSION} ({current['method']} normalisation)"
    if format_version is None:
        return f"unrecorded shards (older than format {FORMAT_VERSION}), {reads}"
    method = normalisation.get("method", "unrecorded")
    return f"shard format {format_version} ({method} normalisation), {reads}"


@dataclass(frozen=True, slots=True)
class ShardFolder:
    """A finished shard folder: its manifest, parsed once, and its sha256.

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
        problem = format_mismatch(folder.manifest.get("format_version"), folder.manifest.get("normalisation"))
        if problem:
            raise DataError(f"{folder.directory}: {problem}: re-shard with {folder.reshard_command()}")
        missing = [key for key in REQUIRED_FIELDS if key not in folder.manifest]
        if missing:
            raise DataError(f"{folder.directory / MANIFEST_NAME}: missing field {missing[0]!r}")
        return folder

    @staticmethod
    def read(path: str | Path) -> ShardFolder:
        """``path/manifest.json`` of any format version (to describe an old folder, never to load it)."""
        directory = Path(path)
        manifest_path = directory / MANIFEST_NAME
        if not directory.is_dir():
            raise DataError(f"{directory}: no such folder")
        if not manifest_path.is_file():
            raise DataError(
                f"{directory}: no {MANIFEST_NAME} (not a finished shard folder): "
                "run python -m data_prep shard"
            )
        try:
            raw = manifest_path.read_bytes()
            manifest = json.loads(raw)
        except OSError as error:
            raise DataError(f"{manifest_path}: unreadable ({error.strerror})") from None
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
    def layout_version(self) -> int:
        """How samples sit in the tar files (``data_prep.manifest.LAYOUT_VERSION``); 1 when unrecorded."""
        return int(self.manifest.get("layout_version", 1))

    @property
    def records(self) -> dict[str, dict[str, Any]]:
        return self.manifest.get("subjects", {})

    def shard_files(self, split: str) -> tuple[ShardFile, ...]:
        """The tar files the manifest lists for ``split``, in order; none for a split it does not have."""
        entry = self.manifest["splits"].get(split, {"shards": []})
        return tuple(
            ShardFile(self.directory / shard["file"], int(shard["samples"]), shard["sha256"])
            for shard in entry["shards"]
        )

    def split_samples(self, split: str) -> int:
        """The sample count the manifest gives for ``split`` (0 for a split it does not have)."""
        return int(self.manifest["splits"].get(split, {"samples": 0})["samples"])

    def split(self, name: str) -> ShardSplit:
        """Describe split ``name``; a missing split, shard file or an empty split is a DataError."""
        manifest_path = self.directory / MANIFEST_NAME
        splits = self.manifest.get("splits", {})
        if name not in splits:
            raise DataError(f"{manifest_path}: no split {name!r} (has {', '.join(sorted(splits)) or 'none'})")
        shards = tuple(shard.path for shard in self.shard_files(name))
        missing = [str(path) for path in shards if not path.is_file()]
        if missing:
            raise DataError(f"{manifest_path}: shard {missing[0]} is listed but missing")
        samples = self.split_samples(name)
        if samples == 0 or not shards:
            raise DataError(f"{manifest_path}: split {name!r} holds no samples")
        return ShardSplit(
            directory=self.directory,
            name=name,
            modalities=self.modalities,
            shards=shards,
            samples=samples,
            subjects=tuple(splits[name].get("subjects", [])),
            manifest_sha256=self.manifest_sha256,
            layout_version=self.layout_version,
        )

    def reshard_command(self, suffix: str | None = None) -> str:
        """The data_prep command that makes this folder again in the current format and layout, into a new
        folder (this one's name with ``suffix``, by default ``-format2``)."""
        source = self.manifest.get("source")
        if not source:
            # Format 1 manifests did not record the source; its report.json did.
            try:
                source = json.loads((self.directory / REPORT_NAME).read_text()).get("source")
            except (OSError, json.JSONDecodeError, AttributeError):
                source = None
        return (
            f"python -m data_prep shard --format {self.dataset or 'brats'} --src {source or 'RAW'} "
            f"--out {self.directory.with_name(self.directory.name + (suffix or f'-format{FORMAT_VERSION}'))}"
        )

    def training_data(self) -> dict[str, Any]:
        """What a model trained on this folder records about it (medgan's ``training_data.json``): dataset,
        modality order, format version, normalisation (less the per-subject parameters), in-plane size,
        manifest sha256 and the folder."""
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


def read_split(data_path: str | Path, split: str) -> ShardSplit:
    """The split ``split`` of the shard folder at ``data_path`` (of the format this version reads)."""
    return ShardFolder.open(data_path).split(split)


def raw_samples(shards: Iterable[Path]) -> Iterator[dict[str, Any]]:
    """The samples of ``shards`` in order, undecoded: per sample ``__key__`` and each member's bytes by field
    (``json``, ``img.npy``, ...), webdataset's grouping. A tar file that cannot be read is a DataError
    naming it."""
    from webdataset.tariterators import tarfile_samples

    for path in shards:
        try:
            yield from tarfile_samples([{"url": str(path)}])
        except (tarfile.TarError, OSError, EOFError) as error:
            raise DataError(f"{Path(path).name}: not a readable tar file ({error})") from None


@dataclass(slots=True)
class ShardSample:
    """One sample's arrays as the shard stores them.

    info: the sample's JSON. images: float16 ``[M, H, W]`` in ``[0, 1]``, the manifest's modality order.
    mask: uint8 ``[H, W]``. seg: uint8 ``[H, W]`` BraTS labels, or None (none stored, or not asked for).
    """

    key: str
    info: dict[str, Any]
    images: np.ndarray
    mask: np.ndarray
    seg: np.ndarray | None


def _npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def decode_sample(raw: dict[str, Any], with_seg: bool = True) -> ShardSample:
    """A raw sample of :func:`raw_samples` (``json``, ``img.npy``, ``mask.npy``[, ``seg.npy``]) decoded;
    arrays keep their stored dtypes and shapes."""
    seg = _npy(raw[SEG_FIELD]) if with_seg and SEG_FIELD in raw else None
    return ShardSample(
        raw["__key__"], json.loads(raw["json"]), _npy(raw["img.npy"]), _npy(raw["mask.npy"]), seg
    )


def is_shard_folder(path: str | Path) -> bool:
    """Whether ``path`` holds a manifest (a shard folder, finished or of another version), not raw NIfTI."""
    return (Path(path) / MANIFEST_NAME).is_file()
