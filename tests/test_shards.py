"""data_prep's one shard reader as medgan uses it: the manifest read once, samples decoded into the model's
channel order, other formats refused (by medgan and by verify in the same words)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import FORMAT_1_NORMALISATION, REPO, write_format_1_shards

from data_prep.__main__ import main as data_prep_main
from data_prep.errors import DataError
from data_prep.shard_reader import ShardFolder, raw_samples, read_split
from data_prep.volumes import FORMAT_VERSION, normalisation_method
from medgan.shards import ChannelMap, format_problem

CANONICAL = ["t1", "t1ce", "t2", "flair", "pd"]


def test_samples_decode_into_the_canonical_channels(phantom_shards):
    folder = ShardFolder.open(phantom_shards)
    split = folder.split("train")
    assert folder.dataset == "brats" and split.modalities == ("t1", "t1ce", "t2", "flair")
    assert split.subjects and set(split.subjects) <= set(folder.records)
    channels = ChannelMap(split.modalities, CANONICAL, folder.directory)
    raw = next(iter(raw_samples(split.shards)))
    sample = channels.decode(raw, with_seg=True)
    stored = np.load(__import__("io").BytesIO(raw["img.npy"]))
    assert sample.images.shape == (5, *stored.shape[1:]) and sample.images.dtype == np.float32
    np.testing.assert_array_equal(sample.images[:4], stored.astype(np.float32))
    assert not sample.images[4].any(), "pd is absent from BraTS: all zero"
    present = json.loads(raw["json"])["present"]
    assert sample.present == sorted(CANONICAL.index(name) for name in present)
    assert sample.seg is None or sample.seg.shape == sample.mask.shape


def test_training_data_record_comes_from_the_manifest(phantom_shards):
    record = ShardFolder.open(phantom_shards).training_data()
    assert record["dataset"] == "brats"
    assert record["modalities"] == ["t1", "t1ce", "t2", "flair"]
    assert "parameters" not in record["normalisation"], "per-subject parameters stay in the manifest"
    assert len(record["manifest_sha256"]) == 64
    # What a checkpoint needs to refuse inputs scaled otherwise: the format and the method's parameters.
    assert record["format_version"] == FORMAT_VERSION == 2
    assert {key: record["normalisation"][key] for key in normalisation_method()} == normalisation_method()
    assert format_problem(record) is None


def test_shards_of_another_format_are_refused_with_the_command_that_re_shards(tmp_path, phantom_shards):
    old = write_format_1_shards(phantom_shards, tmp_path / "old")
    source = json.loads((phantom_shards / "report.json").read_text())["source"]
    with pytest.raises(DataError) as raised:
        ShardFolder.open(old)
    assert str(raised.value) == (
        f"{old}: shard format 1 (percentile normalisation), but this version reads shard format 2 "
        f"(healthy-median normalisation): re-shard with python -m data_prep shard --format brats "
        f"--src {source} --out {tmp_path / 'old-format2'}"
    )
    # Still readable to describe it (an old checkpoint's record), never to load it.
    assert ShardFolder.read(old).training_data()["normalisation"] == FORMAT_1_NORMALISATION


@pytest.mark.parametrize(
    "change",
    [{"format_version": 3}, {"reference_level": 0.5}, {"ceiling_multiple": 3.0}, {"method": "zscore"}],
)
def test_a_changed_normalisation_parameter_is_refused_too(tmp_path, phantom_shards, change):
    manifest = json.loads((phantom_shards / "manifest.json").read_text())
    if "format_version" in change:
        manifest.update(change)
    else:
        manifest["normalisation"].update(change)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"but this version reads shard format 2 .*: re-shard with python -m"):
        ShardFolder.open(tmp_path)


def test_errors_name_the_folder_and_what_is_wrong(tmp_path, phantom_shards):
    with pytest.raises(DataError, match=f"{tmp_path}: no manifest.json"):
        ShardFolder.open(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="manifest.json: not valid JSON"):
        ShardFolder.open(tmp_path)
    with pytest.raises(DataError, match="no split 'holdout'"):
        ShardFolder.open(phantom_shards).split("holdout")
    with pytest.raises(DataError, match="contrasts t1ce flair are not among the model's t1 t2"):
        ChannelMap(("t1", "t1ce", "t2", "flair"), ["t1", "t2"], phantom_shards)


def _foreign_manifest(phantom_shards, out, kind):
    """A copy of ``phantom_shards`` (links to its files) whose manifest is of another format, or damaged."""
    if kind == "format 1":
        return write_format_1_shards(phantom_shards, out)
    out.mkdir()
    for path in phantom_shards.iterdir():
        if path.name != "manifest.json":
            (out / path.name).symlink_to(path)
    text = (phantom_shards / "manifest.json").read_text()
    if kind == "format 3":
        text = json.dumps({**json.loads(text), "format_version": 3})
    (out / "manifest.json").write_text(text[: len(text) // 2] if kind == "damaged" else text)
    return out


@pytest.mark.parametrize("kind", ["format 1", "format 3", "damaged"])
def test_verify_and_training_refuse_a_foreign_manifest_alike(tmp_path, phantom_shards, capsys, kind):
    """Both read the folder through data_prep's one reader: one message for one problem."""
    from medgan.cli.train import main as train_main

    folder = _foreign_manifest(phantom_shards, tmp_path / "foreign", kind)
    with pytest.raises(DataError) as raised:
        read_split(folder, "train")
    message = str(raised.value)
    assert message.startswith(f"{folder}") and "\n" not in message
    assert ("re-shard with python -m data_prep shard" in message) == (kind != "damaged")
    assert data_prep_main(["verify", str(folder)]) == 2
    assert capsys.readouterr().err.strip() == f"data_prep verify: error: {message}"
    assert train_main(["--config", str(REPO / "configs" / "demo.yaml"), "--data_path", str(folder)]) == 2
    assert capsys.readouterr().err.strip() == f"launch/train.py: error: {message}"
