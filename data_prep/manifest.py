"""Names and fixed facts of a shard folder, shared by the writer (`shard`) and the checker (`verify`).

A shard folder holds ``{train,val,test}-%06d.tar`` (webdataset layout, one sample per axial slice),
``splits_final.json``, ``report.json`` and, written last, ``manifest.json``. docs/data.md describes
every field.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

# 2: healthy-median normalisation (1: each volume's own 0.5-99.5 percentiles, moved by tumours).
FORMAT_VERSION = 2
# How samples sit in the tar files, versioned apart from the intensity scale (FORMAT_VERSION): a model
# depends on the scale, only the loader on the layout. 1 (manifests without the field): a subject's
# slices are consecutive, in slice order, across the split's tar files, and may cross from one file into
# the next. 2: the same, and a subject never crosses a file, so dealing tar files deals whole subjects
# (slabs and 2.5D training need that: docs/data.md).
LAYOUT_VERSION = 2
MANIFEST_NAME = "manifest.json"
REPORT_NAME = "report.json"
SHARD_PATTERN = "{split}-%06d.tar"
# Per sample: KEY.json, KEY.img.npy (float16 [M, H, W]), KEY.mask.npy (uint8 [H, W]), KEY.seg.npy.
SAMPLE_FIELDS = ("json", "img.npy", "mask.npy")
SEG_FIELD = "seg.npy"
SAMPLES_PER_SHARD = 1000
MAX_SHARD_BYTES = 1_000_000_000


def sample_key(subject: str, slice_index: int) -> str:
    """Webdataset key of one slice; dots would split the key from the field name, so they go."""
    return f"{subject.replace('.', '_')}_z{slice_index:04d}"


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def write_json(path: Path, content) -> None:
    """Write JSON and flush it to disk (the manifest's presence must mean its bytes are there)."""
    with open(path, "w") as stream:
        json.dump(content, stream, indent=2)
        stream.write("\n")
        stream.flush()
        os.fsync(stream.fileno())
