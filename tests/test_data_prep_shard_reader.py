"""data_prep's one shard reader (verify and medgan read through it): the manifest, each split's tar files,
the samples grouped by key as the tar holds them, their arrays decoded, and one-line errors."""

from __future__ import annotations

import json
import shutil
import tarfile

import numpy as np
import pytest

from data_prep.errors import DataError
from data_prep.shard_reader import ShardFolder, decode_sample, raw_samples
from data_prep.splits import SPLITS


def test_each_split_lists_the_manifests_tar_files(phantom_shards):
    folder = ShardFolder.open(phantom_shards)
    manifest = json.loads((phantom_shards / "manifest.json").read_text())
    for split in SPLITS:
        files = folder.shard_files(split)
        listed = manifest["splits"][split]
        assert [f.path.name for f in files] == [shard["file"] for shard in listed["shards"]]
        assert all(f.path.is_file() and len(f.sha256) == 64 for f in files)
        assert sum(f.samples for f in files) == folder.split_samples(split) == listed["samples"] > 0
        assert folder.split(split).shards == tuple(f.path for f in files)
    assert folder.shard_files("holdout") == () and folder.split_samples("holdout") == 0


def test_samples_are_grouped_by_key_in_tar_order(phantom_shards):
    shard = ShardFolder.open(phantom_shards).shard_files("val")[0]
    with tarfile.open(shard.path) as archive:
        members = [member.name.partition(".") for member in archive if member.isfile()]
    keys = list(dict.fromkeys(stem for stem, _, _ in members))
    samples = list(raw_samples([shard.path]))
    assert [sample["__key__"] for sample in samples] == keys and len(keys) == shard.samples
    for sample in samples:
        fields = {field for stem, _, field in members if stem == sample["__key__"]}
        assert fields == {name for name in sample if not name.startswith("__")}


def test_a_sample_decodes_to_the_stored_arrays(phantom_shards):
    folder = ShardFolder.open(phantom_shards)
    height, width = folder.manifest["in_plane_size"]
    raw = next(sample for sample in raw_samples(folder.split("val").shards) if "seg.npy" in sample)
    sample = decode_sample(raw)
    assert sample.key == raw["__key__"] and sample.info["subject"] in folder.records
    assert sample.images.dtype == np.float16
    assert sample.images.shape == (len(folder.modalities), height, width)
    assert sample.mask.dtype == np.uint8 and sample.mask.shape == (height, width)
    assert sample.seg is not None and sample.seg.shape == (height, width)
    assert decode_sample(raw, with_seg=False).seg is None


def test_an_unreadable_tar_file_is_one_line_naming_it(tmp_path):
    broken = tmp_path / "train-000000.tar"
    broken.write_bytes(b"not a tar file at all" * 100)
    with pytest.raises(DataError, match=r"^train-000000\.tar: not a readable tar file \(") as raised:
        list(raw_samples([broken]))
    assert "\n" not in str(raised.value)


def test_manifest_errors_name_the_folder_or_file(tmp_path, phantom_shards):
    with pytest.raises(DataError, match=f"^{tmp_path / 'absent'}: no such folder$"):
        ShardFolder.open(tmp_path / "absent")
    with pytest.raises(DataError, match=f"^{tmp_path}: no manifest.json \\(not a finished shard folder\\)"):
        ShardFolder.open(tmp_path)
    copy = tmp_path / "copy"
    shutil.copytree(phantom_shards, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["splits"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=f"^{copy / 'manifest.json'}: missing field 'splits'$"):
        ShardFolder.open(copy)
