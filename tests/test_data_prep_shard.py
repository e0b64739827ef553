"""shard -> verify: the shard contract of DESIGN.md, splits, bad input, interruption, tampering."""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import data_prep.shard as shard_module
from data_prep.__main__ import main
from data_prep.manifest import FORMAT_VERSION
from data_prep.phantom import PhantomConfig, make_phantom
from data_prep.splits import read_split_file, split_by_patient
from data_prep.volumes import IntensityScaling, SubjectGeometry, load_volume, normalise, restore_volume

SHAPE = (48, 48, 24)
SIZE = "48"
BRATS_2023_NAMES = {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f", "seg": "seg"}


def _shard(src, out, *extra) -> int:
    return main(["shard", "--format", "brats", "--src", str(src), "--out", str(out), "--size", SIZE, *extra])


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def _report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


@pytest.fixture(scope="module")
def brats_source(tmp_path_factory) -> Path:
    """6 BraTS-2021 phantom subjects (some lacking one contrast) plus one BraTS 2023 patient with two
    timepoints (copies of two phantom subjects under the 2023 names)."""
    root = tmp_path_factory.mktemp("brats_source")
    config = PhantomConfig(layout="brats", subjects=8, seed=11, shape=SHAPE, missing_rate=0.4)
    subjects = make_phantom(config, root)
    for timepoint, subject in enumerate(subjects[6:]):
        folder = root / f"BraTS-GLI-00042-00{timepoint}"
        folder.mkdir()
        for modality, path in subject.files.items():
            shutil.move(path, folder / f"{folder.name}-{BRATS_2023_NAMES[modality]}.nii.gz")
        shutil.rmtree(path.parent)
    return root


@pytest.fixture(scope="module")
def brats_shards(brats_source, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("brats_shards") / "shards"
    assert _shard(brats_source, out, "--split", "0.5", "0.25", "0.25", "--seed", "3") == 0
    return out


def test_verify_passes_and_samples_follow_the_contract(brats_shards):
    import webdataset as wds

    assert main(["verify", str(brats_shards)]) == 0
    manifest = _manifest(brats_shards)
    assert manifest["format_version"] == FORMAT_VERSION
    assert manifest["modalities"] == ["t1", "t1ce", "t2", "flair"]
    assert manifest["in_plane_size"] == [48, 48]
    assert set(manifest["subjects"]) >= {"BraTS-GLI-00042-000", "BraTS-GLI-00042-001", "BraTS2021_00000"}
    shards = sorted(brats_shards.glob("*.tar"))
    assert {shard.name.split("-")[0] for shard in shards} == {"train", "val", "test"}

    absent_seen = False
    for sample in wds.WebDataset([str(s) for s in shards], shardshuffle=False).decode():
        info, image, mask = sample["json"], sample["img.npy"], sample["mask.npy"]
        assert image.dtype == np.float16 and image.shape == (4, 48, 48)
        assert image.min() >= 0.0 and image.max() <= 1.0
        assert mask.dtype == np.uint8 and mask.shape == (48, 48) and mask.max() == 1
        assert sample["seg.npy"].dtype == np.uint8 and set(np.unique(sample["seg.npy"])) <= {0, 1, 2, 4}
        for channel, modality in enumerate(info["modalities"]):
            if modality not in info["present"]:
                absent_seen = True
                assert not np.any(image[channel])
        entry = manifest["subjects"][info["subject"]]
        assert entry["slice_range"][0] <= info["slice"] < entry["slice_range"][1]
    assert absent_seen, "the fixture should include a subject with a missing contrast"

    with tarfile.open(shards[0]) as archive:  # plain POSIX tar, one sample per key
        names = archive.getnames()
    assert names[0].endswith(".img.npy") and any(name.endswith(".json") for name in names)


def test_patients_never_cross_splits_and_timepoints_stay_together(brats_shards):
    manifest = _manifest(brats_shards)
    subjects = manifest["subjects"]
    assert subjects["BraTS-GLI-00042-000"]["split"] == subjects["BraTS-GLI-00042-001"]["split"]
    assert subjects["BraTS-GLI-00042-000"]["patient"] == "BraTS-GLI-00042"
    splits = manifest["splits"]
    seen = {}
    for split, record in splits.items():
        for subject in record["subjects"]:
            patient = subjects[subject]["patient"]
            assert seen.setdefault(patient, split) == split
        assert record["samples"] == sum(shard["samples"] for shard in record["shards"])


def test_split_is_reproducible_and_the_split_file_reuses_it(brats_source, brats_shards, tmp_path):
    written = read_split_file(brats_shards / "splits_final.json")
    assert written == {s: e["split"] for s, e in _manifest(brats_shards)["subjects"].items()}
    again = tmp_path / "again"
    assert _shard(brats_source, again, "--split-file", str(brats_shards / "splits_final.json")) == 0
    assert read_split_file(again / "splits_final.json") == written
    # Same input and split: byte-identical shards, whatever route the split came by.
    first = {s["file"]: s["sha256"] for r in _manifest(brats_shards)["splits"].values() for s in r["shards"]}
    second = {s["file"]: s["sha256"] for r in _manifest(again)["splits"].values() for s in r["shards"]}
    assert first == second


def test_split_by_patient_is_seeded_and_keeps_every_split_non_empty():
    patients = {f"s{i}": f"p{i // 2}" for i in range(20)}
    first = split_by_patient(patients, (0.7, 0.15, 0.15), seed=1)
    assert first == split_by_patient(patients, (0.7, 0.15, 0.15), seed=1)
    assert first != split_by_patient(patients, (0.7, 0.15, 0.15), seed=2)
    assert all(first[f"s{2 * p}"] == first[f"s{2 * p + 1}"] for p in range(10))
    tiny = split_by_patient({"a": "a", "b": "b", "c": "c"}, (0.8, 0.1, 0.1), seed=0)
    assert sorted(tiny.values()) == ["test", "train", "val"]


def test_a_slice_from_the_shard_goes_back_onto_the_original_grid(brats_source, brats_shards):
    import webdataset as wds

    manifest = _manifest(brats_shards)
    sample = next(iter(wds.WebDataset(str(brats_shards / "train-000000.tar"), shardshuffle=False).decode()))
    subject, index = sample["json"]["subject"], sample["json"]["slice"]
    entry = manifest["subjects"][subject]
    geometry = SubjectGeometry.from_dict(entry["geometry"])
    modality = entry["modalities_present"][0]
    channel = manifest["modalities"].index(modality)
    scaling = IntensityScaling.from_dict(entry["normalisation"][modality])
    first, last = entry["slice_range"]
    stack = np.zeros((last - first, 48, 48), np.float32)
    stack[index - first] = sample["img.npy"][channel]
    restored = restore_volume(stack, geometry)

    original = load_volume(Path(entry["files"][modality]))
    assert restored.shape == tuple(entry["original_shape"]) == original.data.shape
    assert np.array_equal(restored.affine, original.affine)
    mask = np.zeros(original.data.shape, bool)
    for m in entry["modalities_present"]:
        mask |= load_volume(Path(entry["files"][m])).data != 0
    expected = normalise(original.data, scaling, mask)
    written = np.asarray(restored.dataobj) != 0
    assert written.sum() > 100
    assert np.allclose(np.asarray(restored.dataobj)[written], expected[written], atol=1e-3)  # float16


def test_verify_detects_tampering(brats_shards, tmp_path, capsys):
    tampered = tmp_path / "tampered"
    shutil.copytree(brats_shards, tampered)
    shard = tampered / "val-000000.tar"
    data = bytearray(shard.read_bytes())
    data[2000] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert main(["verify", str(tampered)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("data_prep verify: error: val-000000.tar: sha256") and "\n" not in error

    manifest = _manifest(brats_shards)
    manifest["splits"]["train"]["shards"][0]["samples"] += 1
    shutil.copy(brats_shards / "val-000000.tar", shard)
    (tampered / "manifest.json").write_text(json.dumps(manifest))
    assert main(["verify", str(tampered)]) == 2
    assert "train-000000.tar: " in capsys.readouterr().err

    (tampered / "manifest.json").unlink()
    assert main(["verify", str(tampered)]) == 2
    assert "no manifest.json (not a finished shard folder)" in capsys.readouterr().err


def test_interrupted_run_leaves_no_manifest(brats_source, tmp_path, monkeypatch):
    calls = []
    original = shard_module._prepare_in_worker

    def interrupt_after_first(task):
        if calls:
            raise KeyboardInterrupt
        calls.append(task)
        return original(task)

    monkeypatch.setattr(shard_module, "_prepare_in_worker", interrupt_after_first)
    out = tmp_path / "out"
    assert _shard(brats_source, out) == 130
    assert not out.exists()
    assert os.listdir(tmp_path) == []  # the staging folder is cleaned up too


@pytest.mark.slow
def test_killed_run_leaves_no_manifest(brats_source, tmp_path):
    """SIGKILL (no clean-up possible) while shards are being written: still no manifest.json in --out."""
    out = tmp_path / "out"
    command = [sys.executable, "-m", "data_prep", "shard", "--format", "brats", "--src", str(brats_source)]
    process = subprocess.Popen([*command, "--out", str(out), "--size", SIZE], cwd=Path(__file__).parents[1])
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".out.incomplete-*/*.tar")) and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "manifest.json").exists()
    assert not any(tmp_path.rglob("manifest.json"))


def _write(path: Path, data, affine=None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data), np.eye(4) if affine is None else affine), path)


@pytest.fixture(scope="module")
def messy_source(tmp_path_factory) -> Path:
    """Two good phantom subjects beside one subject for each kind of bad input."""
    root = tmp_path_factory.mktemp("messy")
    make_phantom(PhantomConfig(layout="brats", subjects=2, seed=5, shape=SHAPE), root)
    good = load_volume(root / "BraTS2021_00000" / "BraTS2021_00000_t1.nii.gz").data
    bad = root / "bad"
    truncated = bad / "BraTS2021_00100_t1.nii.gz"
    _write(truncated, good)
    truncated.write_bytes(truncated.read_bytes()[:400])
    (bad / "BraTS2021_00101_t1.nii.gz").write_bytes(gzip.compress(b"not an image at all"))
    (bad / "BraTS2021_00102_t1.nii.gz").touch()
    _write(bad / "BraTS2021_00103_t1.nii.gz", np.stack([good, good], -1))
    with_nan = good.copy()
    with_nan[10, 10, 10] = np.nan
    _write(bad / "BraTS2021_00104_t1.nii.gz", with_nan)
    _write(bad / "BraTS2021_00105_t1.nii.gz", np.zeros_like(good))
    _write(bad / "BraTS2021_00106_t1.nii.gz", good)
    _write(bad / "BraTS2021_00106_flair.nii.gz", good[:40])
    _write(bad / "BraTS2021_00107_t1.nii.gz", good)
    _write(bad / "copy" / "BraTS2021_00107_t1.nii", good)
    _write(bad / "BraTS2021_00108_t2.nii.gz", good)
    (bad / "mystery_scan.nii.gz").write_bytes((bad / "BraTS2021_00104_t1.nii.gz").read_bytes())
    return root


def test_each_bad_input_gets_one_line_and_good_subjects_go_through(messy_source, tmp_path, capsys):
    out = tmp_path / "out"
    assert _shard(messy_source, out, "--split", "0.6", "0.2", "0.2") == 0
    console = capsys.readouterr().err
    report = {entry["subject"]: entry for entry in _report(out)["subjects"]}
    expected = {
        "BraTS2021_00100": "truncated or corrupt",
        "BraTS2021_00101": "not a readable NIfTI file",
        "BraTS2021_00102": "empty file (0 bytes)",
        "BraTS2021_00103": "4D volume of shape",
        "BraTS2021_00105": "all-zero volume",
        "BraTS2021_00106": "modalities on different grids",
        "BraTS2021_00107": "duplicate subject id",
    }
    for subject, reason in expected.items():
        assert report[subject]["status"] == "failed", subject
        assert reason in report[subject]["reason"], (subject, report[subject]["reason"])
        assert "\n" not in report[subject]["reason"]
        lines = [line for line in console.splitlines() if line.startswith(f"{subject}: failed: ")]
        assert len(lines) == 1 and reason in lines[0]
    assert report["BraTS2021_00104"]["status"] == "ok"
    assert report["BraTS2021_00104"]["repairs"] == [
        "BraTS2021_00104_t1.nii.gz: replaced 1 NaN/Inf voxels with 0"
    ]
    assert report["BraTS2021_00108"]["status"] == "ok"  # only t2: kept, the others marked absent
    assert report["BraTS2021_00108"]["missing_modalities"] == ["t1", "t1ce", "flair"]
    assert "Traceback" not in console
    assert "ignored" in console and "mystery_scan.nii.gz" in console
    ignored = _report(out)["ignored_files"]
    assert [Path(entry["file"]).name for entry in ignored] == ["mystery_scan.nii.gz"]
    assert set(_manifest(out)["subjects"]) == {
        "BraTS2021_00000",
        "BraTS2021_00001",
        "BraTS2021_00104",
        "BraTS2021_00108",
    }
    assert main(["verify", str(out)]) == 0


def test_strict_exits_non_zero_without_manifest(messy_source, tmp_path):
    out = tmp_path / "strict"
    assert _shard(messy_source, out, "--strict") == 1
    assert not (out / "manifest.json").exists()
    assert _report(out)["summary"]["failed"] == 7


def test_subject_folders_without_images_are_failed_subjects_not_lost(tmp_path, capsys):
    """An empty subject folder and one holding only a .txt file: failed in report.json and on the console,
    --strict fails the run, and the other subjects' shards are exactly those written without the folders."""
    source = tmp_path / "src"
    make_phantom(PhantomConfig(layout="brats", subjects=3, seed=5, shape=SHAPE), source)
    assert _shard(source, tmp_path / "plain") == 0
    (source / "BraTS2021_00042").mkdir()
    (source / "pending").mkdir()
    (source / "pending" / "notes.txt").write_text("scans to follow")
    capsys.readouterr()

    assert _shard(source, tmp_path / "out") == 0
    console = capsys.readouterr().err.splitlines()
    report = _report(tmp_path / "out")
    assert report["summary"] == {
        "subjects_found": 5,
        "ok": 3,
        "failed": 2,
        "ignored_files": 0,
        "repaired_subjects": 0,
    }
    failed = [entry for entry in report["subjects"] if entry["status"] == "failed"]
    common = {"status": "failed", "split": None, "files": {}, "repairs": [], "samples": 0}
    missing = {"missing_modalities": ["t1", "t1ce", "t2", "flair"]}
    assert failed == [
        {
            "subject": "BraTS2021_00042",
            "patient": "BraTS2021_00042",
            **common,
            "reason": f"{source}/BraTS2021_00042: empty folder",
            **missing,
        },
        {
            "subject": "pending",
            "patient": "pending",
            **common,
            "reason": f"{source}/pending: no NIfTI file (1 other file)",
            **missing,
        },
    ]
    assert f"BraTS2021_00042: failed: {source}/BraTS2021_00042: empty folder" in console
    assert f"pending: failed: {source}/pending: no NIfTI file (1 other file)" in console
    assert _manifest(tmp_path / "out")["splits"] == _manifest(tmp_path / "plain")["splits"]

    assert _shard(source, tmp_path / "strict", "--strict") == 1
    assert "2 of 5 subjects failed and --strict is set: no shards written" in capsys.readouterr().err
    assert sorted(path.name for path in (tmp_path / "strict").iterdir()) == ["report.json"]
    assert _report(tmp_path / "strict")["subjects"] == report["subjects"]


def test_require_drops_subjects_lacking_a_modality(messy_source, tmp_path):
    out = tmp_path / "required"
    assert _shard(messy_source, out, "--require", "t2") == 0
    report = {entry["subject"]: entry for entry in _report(out)["subjects"]}
    assert report["BraTS2021_00104"]["reason"] == "missing required modality t2 (--require)"
    assert set(_manifest(out)["subjects"]) == {"BraTS2021_00000", "BraTS2021_00001", "BraTS2021_00108"}


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--src", "{tmp}/absent"], "--src {tmp}/absent: no such folder"),
        (["--src", "{tmp}/empty"], "--src {tmp}/empty: no NIfTI files"),
        (["--split", "0.8", "0.1", "0.2"], "--split 0.8 0.1 0.2: fractions must sum to 1 (they sum to 1.1)"),
        (["--modalities", "t1", "dwi"], "unknown modality 'dwi'"),
        (["--modalities", "t1", "pd"], "--modalities pd: brats has only t1 t1ce t2 flair"),
        (["--out", "{src}"], "is the source folder"),
        (["--split-file", "{tmp}/nothing.json"], "--split-file {tmp}/nothing.json: no such file"),
    ],
)
def test_user_errors_are_one_line_naming_the_value(brats_source, tmp_path, capsys, arguments, message):
    (tmp_path / "empty").mkdir()
    arguments = [a.format(tmp=tmp_path, src=brats_source) for a in arguments]
    command = ["shard", "--format", "brats", "--src", str(brats_source), "--out", str(tmp_path / "out")]
    assert main(command + arguments) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "Traceback" not in error
    assert message.format(tmp=tmp_path, src=brats_source) in error


@pytest.mark.slow
def test_ixi_workers_give_the_same_shards_as_one_process(tmp_path, monkeypatch):
    """Worker processes hand their arrays over through temporary files: same shards, nothing left behind."""
    handoff_root = tmp_path / "tmp"
    handoff_root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(handoff_root))
    source = tmp_path / "ixi"
    make_phantom(
        PhantomConfig(layout="ixi", subjects=3, seed=2, shape=(64, 64, 32), missing_rate=0.3), source
    )
    handed_over = []
    take_over = shard_module._take_over

    def counting_take_over(arrays):
        handed_over.extend(name for name, value in arrays.items() if isinstance(value, Path))
        return take_over(arrays)

    monkeypatch.setattr(shard_module, "_take_over", counting_take_over)
    outputs = {}
    for workers in ("1", "2"):
        out = tmp_path / f"shards{workers}"
        command = ["shard", "--format", "ixi", "--src", str(source), "--out", str(out), "--size", "64"]
        assert main([*command, "--workers", workers, "--split", "0.34", "0.33", "0.33"]) == 0
        assert main(["verify", str(out)]) == 0
        outputs[workers] = _manifest(out)
    assert outputs["1"]["splits"] == outputs["2"]["splits"]
    assert list(handoff_root.iterdir()) == []
    assert handed_over.count("images") == len(outputs["2"]["subjects"])  # through files, not the pipe
    # The phantom writes IXI T1 sagittal on its own grid and T2/PD axial on the reference grid, so T1 is
    # registered (onto T2, the reference) exactly when a subject has it; seed 2 drops T1 from the third.
    subjects = outputs["1"]["subjects"]
    registered = {subject: list(entry["geometry"]["registration"]) for subject, entry in subjects.items()}
    assert registered == {"IXI002-HH-2031": ["t1"], "IXI003-HH-6674": ["t1"], "IXI004-Guys-4760": []}
    assert subjects["IXI004-Guys-4760"]["modalities_present"] == ["t2", "pd"]
    assert {
        entry["geometry"]["registration"]["t1"]["fixed"] for s, entry in subjects.items() if registered[s]
    } == {"t2"}


def test_a_percent_sign_in_the_output_name_is_just_a_character(brats_source, tmp_path):
    out = tmp_path / "shards 100%d%s"
    assert _shard(brats_source, out) == 0
    assert main(["verify", str(out)]) == 0
    assert sorted(p.name for p in out.glob("*.tar"))[0] == "test-000000.tar"


def test_arrays_a_worker_cannot_hand_off_through_a_file_go_through_the_pipe(tmp_path):
    arrays = {"images": np.ones((2, 3, 4, 4), np.float16), "mask": np.ones((3, 4, 4), np.uint8), "seg": None}
    handed = shard_module._hand_off(arrays, tmp_path / "0001")
    assert handed["seg"] is None and all(isinstance(handed[name], Path) for name in ("images", "mask"))
    taken = shard_module._take_over(handed)
    assert np.array_equal(taken["images"], arrays["images"]) and taken["images"].dtype == np.float16
    assert list(tmp_path.iterdir()) == []  # the reader removes the files (its memory map stays valid)
    unwritable = shard_module._hand_off(arrays, tmp_path / "no such folder" / "0001")
    assert unwritable is arrays


def _samples(out: Path):
    """Every sample in every shard of `out`: (KEY.json as a dict, KEY.img.npy as an array)."""
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as archive:
            members = {member.name: member for member in archive.getmembers()}
            for name in sorted(members):
                if name.endswith(".json"):
                    info = json.load(io.TextIOWrapper(archive.extractfile(members[name])))
                    image = np.load(
                        io.BytesIO(archive.extractfile(members[name[: -len("json")] + "img.npy"]).read())
                    )
                    yield info, image


def test_absent_modalities_in_sample_json(brats_shards):
    """`present` is written in one encoding only: a list of the present modality names, in the manifest's
    modality order (e.g. ``["t1", "t2", "flair"]``); never a dict of name -> bool nor a list of bools, the
    other two encodings medgan's loader accepts. Absent channels of img.npy are all zero."""
    manifest = _manifest(brats_shards)
    modalities = manifest["modalities"]
    missing = {entry["subject"]: entry["missing_modalities"] for entry in _report(brats_shards)["subjects"]}
    lacking = {subject: missing[subject] for subject in manifest["subjects"] if missing[subject]}
    # The fixture's phantom (seed 11, missing rate 0.4) drops these contrasts.
    assert lacking == {
        "BraTS2021_00000": ["t1ce"],
        "BraTS2021_00003": ["t2"],
        "BraTS2021_00005": ["t2"],
        "BraTS-GLI-00042-000": ["t1"],
    }
    seen, bright = set(), {}
    for info, image in _samples(brats_shards):
        subject = info["subject"]
        if subject == "BraTS2021_00000":
            assert info["present"] == ["t1", "t2", "flair"] and info["modalities"] == [
                "t1",
                "t1ce",
                "t2",
                "flair",
            ]
        expected = [m for m in modalities if m not in missing[subject]]
        assert info["modalities"] == modalities
        assert isinstance(info["present"], list) and all(isinstance(name, str) for name in info["present"])
        assert info["present"] == expected == manifest["subjects"][subject]["modalities_present"], subject
        for channel, modality in enumerate(modalities):
            if modality in missing[subject]:
                assert not np.any(image[channel]), (subject, info["slice"], modality)
            else:
                bright[subject, modality] = bright.get((subject, modality), False) or bool(
                    np.any(image[channel])
                )
        seen.add(subject)
    assert seen == set(manifest["subjects"])
    assert all(bright.values())  # a present contrast is not all zero over its subject
