"""The healthy-median normalisation end to end (issue #16): the healthy level a model sees does not depend
on whether the subject has a tumour, the manifest and report record the method and its per-subject
parameters, and the definition holds against an independent computation from the NIfTI files."""

from __future__ import annotations

import io
import json
import tarfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from data_prep.__main__ import main
from data_prep.intensity import CEILING_MULTIPLE, REFERENCE_LEVEL
from data_prep.manifest import FORMAT_VERSION
from data_prep.phantom import PhantomConfig, make_phantom
from data_prep.volumes import load_volume

MODALITIES = ("t1", "t1ce", "t2", "flair")
# The threshold: each contrast's healthy level within 5% between tumour and tumour-free subjects.
MAX_HEALTHY_LEVEL_GAP = 0.05


@pytest.fixture(scope="module")
def phantom_16(tmp_path_factory) -> tuple[Path, Path]:
    """16 BraTS-layout phantom subjects (tumour rate 0.75: both groups present) and their shards."""
    root = tmp_path_factory.mktemp("healthy")
    make_phantom(PhantomConfig(layout="brats", subjects=16, seed=0, shape=(64, 64, 32)), root / "raw")
    argv = ["shard", "--format", "brats", "--src", str(root / "raw"), "--out", str(root / "shards")]
    assert main([*argv, "--size", "64"]) == 0
    return root / "raw", root / "shards"


def _shard_slices(shards: Path):
    """(subject, present, img [M, H, W] float32, mask bool [H, W], seg uint8 [H, W]) per sample."""
    manifest = json.loads((shards / "manifest.json").read_text())
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            samples = defaultdict(dict)
            with tarfile.open(shards / shard["file"]) as tar:
                for member in tar.getmembers():
                    key, _, field = member.name.partition(".")
                    samples[key][field] = tar.extractfile(member).read()
            for sample in samples.values():
                info = json.loads(sample["json"])
                img = np.load(io.BytesIO(sample["img.npy"])).astype(np.float32)
                mask = np.load(io.BytesIO(sample["mask.npy"])).astype(bool)
                seg = np.load(io.BytesIO(sample["seg.npy"])) if "seg.npy" in sample else np.zeros_like(mask)
                yield info["subject"], info["present"], img, mask, seg.astype(np.uint8)


def _group_gaps(levels: dict[str, dict[str, float]], has_tumour: dict[str, bool]) -> dict[str, float]:
    """Per contrast: |mean over tumour subjects - mean over tumour-free ones| / the tumour-free mean."""
    gaps = {}
    for modality in MODALITIES:
        tumour = [level[modality] for subject, level in levels.items() if has_tumour[subject]]
        free = [level[modality] for subject, level in levels.items() if not has_tumour[subject]]
        assert len(tumour) >= 3 and len(free) >= 3, "the phantom needs both kinds of subject"
        with_tumour, without = np.mean(tumour), np.mean(free)
        gaps[modality] = abs(with_tumour - without) / without
    return gaps


def test_healthy_level_is_the_same_with_and_without_a_tumour(phantom_16):
    """The issue's definition: per subject, the median of brain voxels outside the tumour, in the shards."""
    _, shards = phantom_16
    healthy = defaultdict(lambda: defaultdict(list))
    has_tumour = defaultdict(bool)
    for subject, present, img, mask, seg in _shard_slices(shards):
        has_tumour[subject] |= bool(seg.any())
        for channel, modality in enumerate(MODALITIES):
            if modality in present:
                healthy[subject][modality].append(img[channel][mask & (seg == 0)])
    levels = {
        subject: {modality: float(np.median(np.concatenate(chunks))) for modality, chunks in per.items()}
        for subject, per in healthy.items()
    }
    gaps = _group_gaps(levels, has_tumour)
    assert all(gap < MAX_HEALTHY_LEVEL_GAP for gap in gaps.values()), gaps
    # And the level is the documented one: tumour-free subjects' healthy median is the reference level.
    free = [levels[s]["flair"] for s in levels if not has_tumour[s]]
    assert np.mean(free) == pytest.approx(REFERENCE_LEVEL, abs=0.01)


def test_the_phantom_tells_the_methods_apart(phantom_16):
    """The test above can fail: on the same files, each volume's own 0.5-99.5 percentiles (format 1's
    method, computed here from the NIfTI files) put FLAIR's healthy level far apart between the groups."""
    raw, _ = phantom_16
    levels, has_tumour = {}, {}
    for folder in sorted(p for p in raw.iterdir() if p.is_dir()):
        volumes = {m: load_volume(folder / f"{folder.name}_{m}.nii.gz").data for m in MODALITIES}
        seg = load_volume(folder / f"{folder.name}_seg.nii.gz", is_label=True).data
        brain = np.any([v != 0 for v in volumes.values()], axis=0)
        has_tumour[folder.name] = bool(seg.any())
        levels[folder.name] = {}
        for modality, volume in volumes.items():
            low, high = np.percentile(volume[brain], [0.5, 99.5])
            unit = np.clip((volume[brain & (seg == 0)] - low) / (high - low), 0, 1)
            levels[folder.name][modality] = float(np.median(unit))
    assert _group_gaps(levels, has_tumour)["flair"] > 2 * MAX_HEALTHY_LEVEL_GAP


def test_manifest_and_report_record_the_method_and_each_subjects_parameters(phantom_16):
    raw, shards = phantom_16
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["format_version"] == FORMAT_VERSION == 2
    assert manifest["source"] == str(raw)
    record = manifest["normalisation"]
    assert (record["method"], record["reference"]) == ("healthy-median", "median")
    assert (record["reference_level"], record["ceiling_multiple"]) == (REFERENCE_LEVEL, CEILING_MULTIPLE)
    report = json.loads((shards / "report.json").read_text())
    report = {entry["subject"]: entry for entry in report["subjects"]}
    assert set(record["parameters"]) == set(manifest["subjects"]) == set(report)
    for subject, entry in manifest["subjects"].items():
        assert entry["normalisation"] == record["parameters"][subject]
        files = {m: load_volume(Path(path)).data for m, path in entry["files"].items() if m in MODALITIES}
        brain = np.any([v != 0 for v in files.values()], axis=0)  # BraTS: the brain is the nonzero voxels
        for modality, volume in files.items():
            scaling = entry["normalisation"][modality]
            inside = volume[brain].astype(np.float64)
            median = float(np.median(inside))
            assert (scaling["low"], scaling["median"], scaling["high"]) == (0.0, median, 2.5 * median)
            assert scaling["clipped_fraction"] == np.count_nonzero(inside > 2.5 * median) / inside.size
            assert report[subject]["clipped_fraction"][modality] == scaling["clipped_fraction"]


def test_ixi_median_is_over_the_head_mask(tmp_path):
    """IXI has no skull stripping: the median is taken over the head mask the values are kept in, so
    inside it each contrast's median lands on the reference level."""
    make_phantom(PhantomConfig(layout="ixi", subjects=2, seed=1, shape=(48, 48, 24)), tmp_path / "raw")
    out = tmp_path / "shards"
    argv = ["shard", "--format", "ixi", "--src", str(tmp_path / "raw"), "--out", str(out), "--size", "48"]
    assert main([*argv, "--split", "1", "0", "0"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert "head mask" in manifest["normalisation"]["within"]
    values = defaultdict(lambda: defaultdict(list))
    for subject, present, img, mask, _ in _shard_slices(out):
        for channel, modality in enumerate(manifest["modalities"]):
            if modality in present:
                values[subject][modality].append(img[channel][mask])
    assert len(values) == 2
    for per in values.values():
        for modality, chunks in per.items():
            # Slices at the head's ends are left out of the shards: close to, not exactly, the median.
            level = float(np.median(np.concatenate(chunks)))
            assert level == pytest.approx(REFERENCE_LEVEL, abs=0.03), modality
