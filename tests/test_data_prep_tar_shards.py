"""data_prep.tar_shards: byte for byte what webdataset's ShardWriter writes, with the sha256 on the way."""

from __future__ import annotations

import hashlib
import tarfile

import numpy as np
import pytest
import webdataset as wds

from data_prep.tar_shards import ShardSeries


def _samples(count: int, rng) -> list[dict]:
    samples = []
    for index in range(count):
        sample = {
            "__key__": f"BraTS-GLI-00042-001_z{index:04d}",
            "json": {"subject": "BraTS-GLI-00042-001", "slice": index, "present": ["t1", "t2"]},
            "img.npy": rng.random((3, 17, 13)).astype(np.float16),  # data not a multiple of 512 bytes
            "mask.npy": (rng.random((17, 13)) > 0.5).astype(np.uint8),
        }
        if index % 2:
            sample["seg.npy"] = rng.integers(0, 5, size=(17, 13)).astype(np.uint8)
        samples.append(sample)
    return samples


@pytest.mark.parametrize(
    ("max_samples", "max_bytes"),
    [(1000, 10**9), (3, 10**9), (1000, 5000)],  # one shard; rotation by count; rotation by size
)
def test_shard_series_writes_what_shard_writer_writes(tmp_path, max_samples, max_bytes):
    samples = _samples(10, np.random.default_rng(0))
    (tmp_path / "reference").mkdir()
    (tmp_path / "fast").mkdir()
    reference = wds.ShardWriter(
        str(tmp_path / "reference" / "train-%06d.tar"),
        maxcount=max_samples,
        maxsize=max_bytes,
        verbose=0,
        mtime=0,
    )
    for sample in samples:
        reference.write(sample)
    reference.close()

    series = ShardSeries(
        str(tmp_path / "fast" / "train-%06d.tar"), max_samples=max_samples, max_bytes=max_bytes
    )
    names = [series.write(sample) for sample in samples]
    written = series.close()

    expected = sorted(path.name for path in (tmp_path / "reference").iterdir())
    assert [shard.file for shard in written] == expected == sorted(set(names))
    assert (len(expected) > 1) == (max_samples < 10 or max_bytes < 10**9)
    assert sum(shard.samples for shard in written) == len(samples)
    for shard in written:
        data = (tmp_path / "fast" / shard.file).read_bytes()
        assert data == (tmp_path / "reference" / shard.file).read_bytes()
        assert shard.sha256 == hashlib.sha256(data).hexdigest() and shard.bytes == len(data)
        with tarfile.open(tmp_path / "fast" / shard.file) as archive:  # plain tar opens it
            assert len({member.name.split(".")[0] for member in archive}) == shard.samples


def test_shard_series_refuses_a_sample_without_a_key(tmp_path):
    series = ShardSeries(str(tmp_path / "x-%06d.tar"), max_samples=10, max_bytes=10**6)
    with pytest.raises(ValueError, match="__key__"):
        series.write({"json": {}})
    series.abandon()
