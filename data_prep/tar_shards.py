"""Webdataset tar shards written byte for byte as webdataset's ShardWriter writes them, hashed on the way.

`ShardSeries(pattern, max_samples=N, max_bytes=B)` gives the same files as
``webdataset.ShardWriter(pattern, maxcount=N, maxsize=B, mtime=0)`` (same members, order, headers,
padding and rotation; tests/test_data_prep_tar_shards.py holds them equal) when every sample may start a
new file; ``data_prep shard`` lets only a subject's first slice start one (shard layout 2, so a file may
run over by the rest of a subject), and is otherwise the same. It costs a fraction of ShardWriter's on
full-size MRI slices: ShardWriter streams each member through tarfile's 10 KiB stream buffer (several
copies of every byte in Python), and the manifest's sha256 then had to read every shard back. Here each
member's header, data and padding go to the file in one write each, and the same bytes update the
sha256. Samples are encoded by webdataset's own default encoder (``.npy`` by numpy, ``.json`` as JSON).
"""

from __future__ import annotations

import hashlib
import tarfile
from dataclasses import dataclass
from pathlib import Path

# What ShardWriter's TarWriter puts in every member header, with mtime fixed for reproducible shards (an
# integer: a float mtime costs every member an extra PAX header block).
_MEMBER_MODE = 0o444
_MEMBER_OWNER = "bigdata"
_MEMBER_MTIME = 0


@dataclass(frozen=True, slots=True)
class WrittenShard:
    """One finished shard: file name, samples in it, size in bytes and the hex sha256 of its bytes."""

    file: str
    samples: int
    bytes: int
    sha256: str

    def to_dict(self) -> dict:
        return {"file": self.file, "samples": self.samples, "sha256": self.sha256, "bytes": self.bytes}


class _OpenShard:
    """A tar file being written: every byte goes to the file and into the running sha256."""

    def __init__(self, path: Path):
        self.path = path
        self._stream = open(path, "wb")  # noqa: SIM115 - closed by finish(), shards outlive one call
        self._digest = hashlib.sha256()
        self.offset = 0
        self.samples = 0
        self.member_bytes = 0

    def _put(self, data) -> None:
        self._stream.write(data)
        self._digest.update(data)
        self.offset += len(data)

    def add_member(self, name: str, data: bytes) -> None:
        """One member as tarfile's ``addfile`` writes it: header block(s), data, zero padding to 512."""
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = _MEMBER_MTIME
        info.mode = _MEMBER_MODE
        info.uname = info.gname = _MEMBER_OWNER
        self._put(info.tobuf(tarfile.DEFAULT_FORMAT, tarfile.ENCODING, "surrogateescape"))
        self._put(data)
        remainder = len(data) % tarfile.BLOCKSIZE
        if remainder:
            self._put(bytes(tarfile.BLOCKSIZE - remainder))
        self.member_bytes += len(data)

    def finish(self) -> WrittenShard:
        """The end-of-archive blocks and record padding of ``TarFile.close``; closes the file."""
        self._put(bytes(2 * tarfile.BLOCKSIZE))
        remainder = self.offset % tarfile.RECORDSIZE
        if remainder:
            self._put(bytes(tarfile.RECORDSIZE - remainder))
        self._stream.close()
        return WrittenShard(self.path.name, self.samples, self.offset, self._digest.hexdigest())

    def abandon(self) -> None:
        self._stream.close()


class ShardSeries:
    """Samples into ``pattern % 0``, ``% 1``, ... (e.g. ``train-%06d.tar``); a new shard starts once the
    current one holds `max_samples` samples or `max_bytes` bytes of member data, as ShardWriter does.

    A sample is a dict with ``__key__`` (str) and fields whose names end in a webdataset extension
    (``json``, ``npy``, ...); keys starting with ``_`` other than ``__key__`` are not written.
    """

    def __init__(self, pattern: str, *, max_samples: int, max_bytes: int):
        from webdataset.writer import make_encoder

        self._encode = make_encoder(True)
        self.pattern = pattern
        self.max_samples = max_samples
        self.max_bytes = max_bytes
        self._next_index = 0
        self._open: _OpenShard | None = None
        self.written: list[WrittenShard] = []

    def write(self, sample: dict, may_start_shard: bool = True) -> str:
        """Write one sample; returns the name of the shard file it went into. ``may_start_shard=False``
        keeps the sample in the open shard even when that one is full (the rest of a subject's slices:
        a subject never crosses a file); the next sample that may start one does."""
        if "__key__" not in sample:
            raise ValueError(f"sample without a __key__ (fields {sorted(sample)})")
        shard = self._open
        full = shard is not None and (
            shard.samples >= self.max_samples or shard.member_bytes >= self.max_bytes
        )
        if shard is None or (full and may_start_shard):
            shard = self._start_next()
        encoded = self._encode(sample)
        key = encoded["__key__"]
        for field in sorted(encoded):
            if field.startswith("_"):
                continue
            data = encoded[field]
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise ValueError(f"{key}.{field}: encoded to {type(data).__name__}, expected bytes")
            shard.add_member(f"{key}.{field}", data)
        shard.samples += 1
        return shard.path.name

    def _start_next(self) -> _OpenShard:
        if self._open is not None:
            self.written.append(self._open.finish())
        self._open = _OpenShard(Path(self.pattern % self._next_index))
        self._next_index += 1
        return self._open

    def close(self) -> list[WrittenShard]:
        """Finish the last shard; returns every shard written, in order."""
        if self._open is not None:
            self.written.append(self._open.finish())
            self._open = None
        return self.written

    def abandon(self) -> None:
        """Close the open file without finishing it (the run failed; its folder is thrown away)."""
        if self._open is not None:
            self._open.abandon()
            self._open = None
