"""synthesize: NIfTI inputs -> a NIfTI on the reference input's grid, and one clear line per bad input."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import (
    FORMAT_1_NORMALISATION,
    current_training_data,
    run_module,
    write_brats2023_subjects,
    write_checkpoint,
)
from torch import nn

from data_prep.volumes import VolumeError, discover_nifti_subjects, to_canonical
from medgan.checkpointing import MODEL_STATES_FILE, CheckpointError, CheckpointLayout, read_safetensors
from medgan.inference.errors import SynthesisError
from medgan.inference.export import export_generator
from medgan.inference.folder_mode import synthesize_folder
from medgan.inference.loading import load_generator
from medgan.inference.provenance import weights_sha256, write_dataset_description
from medgan.inference.sidecars import write_synthesized
from medgan.inference.spread import load_for_synthesis
from medgan.inference.synthesis import parse_input_flags, synthesize_volume


@pytest.fixture(scope="module")
def generator(tmp_path_factory):
    """The plain U-Net: the pipeline around the network is what is tested, and it runs fastest."""
    return load_generator(write_checkpoint(tmp_path_factory.mktemp("synthesis") / "run", arch="unet"))


@pytest.fixture(scope="module")
def ixi_subject(tmp_path_factory):
    """One IXI-layout phantom: T2 and PD axial on one grid, T1 sagittal on its own (moved) grid."""
    out = tmp_path_factory.mktemp("ixi") / "ixi"
    run_module(
        "data_prep", "phantom", "--layout", "ixi", "--subjects", "1", "--out", str(out),
        "--seed", "5", "--shape", "40", "40", "20",
    )  # fmt: skip
    return {name: next(out.glob(f"IXI-{name.upper()}/*.nii.gz")) for name in ("t1", "t2", "pd")}


def _brats_files(phantom_subjects, subject="BraTS2021_00002"):
    folder = phantom_subjects / subject
    return {name: folder / f"{subject}_{name}.nii.gz" for name in ("t1", "t1ce", "t2", "flair", "seg")}


def _check_on_grid_of(image: nib.Nifti1Image, reference_path, tmp_path):
    path = tmp_path / "written.nii.gz"
    nib.save(image, path)
    written, reference = nib.load(path), nib.load(reference_path)
    assert written.shape == reference.shape
    np.testing.assert_allclose(written.affine, reference.affine, atol=1e-5)
    assert nib.aff2axcodes(written.affine) == nib.aff2axcodes(reference.affine)
    data = written.get_fdata()
    assert np.all(np.isfinite(data)) and data.min() >= 0.0 and data.max() <= 1.0 and data.max() > 0.0
    assert written.get_data_dtype() == np.float32
    return data


def test_brats_subject_comes_back_on_the_reference_grid(phantom_subjects, tmp_path):
    files = _brats_files(phantom_subjects)
    ssm = load_generator(write_checkpoint(tmp_path / "ssm"))
    result = synthesize_volume(ssm, {"t1": files["t1"], "t2": files["t2"]}, "flair")
    assert result.reference == "t2"
    data = _check_on_grid_of(result.image, files["t2"], tmp_path)
    description = result.image.header["descrip"].tobytes().rstrip(b"\0").decode()
    assert description.startswith("MedGAN-SSM synthesized FLAIR")
    # zero outside the mask: the phantom is skull-stripped, so wherever every input is 0
    background = (nib.load(files["t1"]).get_fdata() == 0) & (nib.load(files["t2"]).get_fdata() == 0)
    assert np.all(data[background] == 0)
    # The scale it is on, in NIfTI's 80-byte descrip: 0.4 is the brain median, 1 the clipped ceiling.
    assert description == "MedGAN-SSM synthesized FLAIR: 0.4 = brain median, clipped at 1, 0 outside"
    assert len(description.encode()) <= 80
    assert (float(result.image.header["cal_min"]), float(result.image.header["cal_max"])) == (0.0, 1.0)


def test_every_axial_slice_with_brain_in_the_inputs_is_synthesized(generator, phantom_subjects):
    """Top and bottom slices included: inference keeps every slice with any voxel of the inputs' mask,
    not the shards' 10%-of-the-largest rule, and the output is the prediction there."""
    files = _brats_files(phantom_subjects)
    inputs = {name: files[name] for name in ("t1", "t1ce", "t2")}
    result = synthesize_volume(generator, inputs, "flair")
    volumes = [nib.load(path) for path in inputs.values()]
    mask = to_canonical(np.any([v.get_fdata() != 0 for v in volumes], axis=0), volumes[0].affine)[0]
    synthesized = to_canonical(np.asarray(result.image.dataobj), result.image.affine)[0]
    with_brain = np.flatnonzero(mask.any(axis=(0, 1)))
    area = mask.sum(axis=(0, 1))
    assert area[with_brain].min() < 0.1 * area.max()  # the phantom has slivers the shards drop
    assert result.synthesized.shape[0] == with_brain[-1] - with_brain[0] + 1
    blank = [int(z) for z in with_brain if not np.any(synthesized[:, :, z][mask[:, :, z]] != 0)]
    assert blank == [], f"axial slices {blank} are all zero inside the brain"
    assert np.all(synthesized[~mask] == 0)


@pytest.mark.parametrize("reference", [None, "t1"])
def test_ixi_with_t1_among_the_inputs_is_registered_and_written_on_the_reference_grid(
    generator, ixi_subject, tmp_path, reference
):
    result = synthesize_volume(
        generator, {"t1": ixi_subject["t1"], "t2": ixi_subject["t2"]}, "pd", reference=reference
    )
    expected = reference or "t2"
    assert result.reference == expected
    assert "t1" in result.prepared.geometry.registered
    _check_on_grid_of(result.image, ixi_subject[expected], tmp_path)
    description = result.image.header["descrip"].tobytes().rstrip(b"\0").decode()
    assert description == "MedGAN-SSM synthesized PD: 0.4 = head median, clipped at 1, 0 outside"


def test_export_then_synthesize_gives_the_same_volume(phantom_subjects, tmp_path):
    checkpoint = write_checkpoint(tmp_path / "run", arch="unet")
    weights, _, _ = export_generator(checkpoint, tmp_path / "G.safetensors")
    files = _brats_files(phantom_subjects)
    inputs = {"t1": files["t1"], "t2": files["t2"]}
    from_folder = synthesize_volume(load_generator(checkpoint), inputs, "flair")
    from_file = synthesize_volume(load_generator(weights), inputs, "flair")
    np.testing.assert_array_equal(from_folder.image.get_fdata(), from_file.image.get_fdata())


def test_folder_of_subjects(generator, phantom_subjects, tmp_path):
    found = {entry.subject: entry.files for entry in discover_nifti_subjects(phantom_subjects).subjects}
    assert len(found) == 8 and set(found["BraTS2021_00000"]) >= {"t1", "flair", "seg"}
    small = tmp_path / "two"
    for subject in ("BraTS2021_00002", "BraTS2021_00003"):
        (small / subject).mkdir(parents=True)
        for path in _brats_files(phantom_subjects, subject).values():
            (small / subject / path.name).symlink_to(path)
    (small / "BraTS2021_00003" / "BraTS2021_00003_t2.nii.gz").unlink()
    (small / "BraTS2021_00003" / "BraTS2021_00003_t2.nii.gz").write_bytes(b"broken")
    written, failures = synthesize_folder(generator, small, "flair", tmp_path / "out", reference="T2w")
    assert [path.name for path in written] == ["BraTS2021_00002_flair.nii.gz"]
    assert len(failures) == 1 and failures[0].startswith("BraTS2021_00003: ") and "\n" not in failures[0]
    # --reference is read as everywhere else (t2w is T2), not silently dropped for the default (t1ce)
    sidecar = json.loads((tmp_path / "out" / "BraTS2021_00002_flair.json").read_text())
    assert sidecar["ReferenceGrid"].endswith("BraTS2021_00002_t2.nii.gz")
    with pytest.raises(
        SynthesisError, match=r"^--reference t2x: unknown modality \(known: t1 t1ce t2 flair pd\)$"
    ):
        synthesize_folder(generator, small, "flair", tmp_path / "bad", reference="t2x")
    assert not (tmp_path / "bad").exists()


def test_each_bad_input_is_one_line(generator, phantom_subjects, ixi_subject, tmp_path):
    files = _brats_files(phantom_subjects)
    corrupt = tmp_path / "corrupt_t2.nii.gz"
    corrupt.write_bytes(gzip.compress(b"this is not a NIfTI header" * 20))
    truncated = tmp_path / "truncated_t2.nii.gz"
    truncated.write_bytes(files["t2"].read_bytes()[:2000])
    tiny = tmp_path / "tiny_t1.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((3, 3, 3), dtype=np.float32), np.eye(4)), tiny)
    fixed = load_generator(
        write_checkpoint(
            tmp_path / "fixed", data={"input_modalities": ["t1", "t2"], "target_modality": "flair"}
        )
    )
    t1, t2 = files["t1"], files["t2"]
    synthesize = synthesize_volume
    cases = [
        (lambda: parse_input_flags(["dwi=x.nii.gz"]), "unknown modality 'dwi'"),
        (lambda: parse_input_flags(["t1"]), "expected MODALITY=FILE"),
        (lambda: synthesize(fixed, {"t1": t1, "t2": t2}, "t1ce"), "flair only"),
        (lambda: synthesize(generator, {"t1": t1}, "dwi"), "not one of the checkpoint"),
        (lambda: synthesize(generator, {"t1": t1, "t2": tmp_path / "gone.nii.gz"}, "flair"), "not found"),
        (lambda: synthesize(generator, {"t1": t1, "t2": corrupt}, "flair"), "not a readable NIfTI"),
        (lambda: synthesize(generator, {"t1": t1, "t2": truncated}, "flair"), "corrupt"),
        (lambda: synthesize(generator, {"t1": tiny, "t2": ixi_subject["t2"]}, "pd"), "could not register"),
        (lambda: synthesize(generator, {"t1": t1}, "flair", reference="t2"), "not among the inputs"),
        (lambda: synthesize(generator, {"t1": t1, "flair": t2}, "flair"), "is also an input"),
        (lambda: synthesize(generator, {"t1": t1}, "flair", spread="dropout"), "expected one of flip"),
        (lambda: synthesize(generator, {"t1": t1}, "flair", spread="weights"), "EMA and raw weights"),
    ]  # fmt: skip
    for call, expected in cases:
        with pytest.raises((SynthesisError, VolumeError)) as caught:
            call()
        message = str(caught.value)
        assert expected in message and "\n" not in message, message


def test_phantom_2023_fixture_is_read_with_brats_2023_names(phantom_subjects_2023):
    found = discover_nifti_subjects(phantom_subjects_2023).subjects
    assert [entry.subject for entry in found][:2] == ["BraTS-GLI-00000-000", "BraTS-GLI-00001-000"]
    assert len(found) == 8 and all(entry.dataset == "brats" for entry in found)
    assert list(found[0].files) == ["t1", "t1ce", "t2", "flair", "seg"]
    assert found[0].files["flair"].name == "BraTS-GLI-00000-000-t2f.nii.gz"


def test_brasyn_mode_fills_each_subjects_one_missing_contrast_in_its_naming_style(
    generator, phantom_subjects, tmp_path
):
    folder = write_brats2023_subjects(
        phantom_subjects,
        tmp_path / "in",
        numbers=(2, 3, 4, 5, 6),
        leave_out={2: ("t2f",), 3: ("t1c", "seg"), 5: ("t1n", "t2w"), 6: ("t2f",)},
    )
    broken = folder / "BraTS-GLI-00006-000" / "BraTS-GLI-00006-000-t1c.nii.gz"
    broken.unlink()
    broken.write_bytes(b"not a NIfTI")
    (folder / "BraTS-GLI-00007-000").mkdir()  # a subject folder left empty: named, not lost
    written, failures = synthesize_folder(generator, folder, None, tmp_path / "out")
    assert [path.name for path in written] == [
        "BraTS-GLI-00002-000-t2f.nii.gz",
        "BraTS-GLI-00003-000-t1c.nii.gz",
    ]
    assert len(failures) == 4 and failures[3].startswith(f"BraTS-GLI-00006-000: {broken}: ")
    assert all("\n" not in line for line in failures)
    assert failures[:3] == [
        "BraTS-GLI-00007-000: empty folder",
        "BraTS-GLI-00004-000: has all of t1n t1c t2w t2f: BraSyn mode fills exactly one missing contrast "
        "(--target picks one)",
        "BraTS-GLI-00005-000: misses 2 of t1n t1c t2w t2f (t1n t2w): BraSyn mode fills exactly one missing "
        "contrast",
    ]
    for path in written:
        subject = path.name[: len("BraTS-GLI-00002-000")]
        _check_on_grid_of(nib.load(path), folder / subject / f"{subject}-t2w.nii.gz", tmp_path)
    # the folder a participant zips holds the volumes alone; the provenance sits beside it
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == [path.name for path in written]
    assert sorted(path.name for path in (tmp_path / "out-provenance").iterdir()) == [
        "BraTS-GLI-00002-000-t2f.json",
        "BraTS-GLI-00003-000-t1c.json",
        "dataset_description.json",
    ]
    sidecar = json.loads((tmp_path / "out-provenance" / "BraTS-GLI-00003-000-t1c.json").read_text())
    assert sidecar["SynthesizedContrast"] == "t1ce" and sorted(sidecar["Inputs"]) == ["flair", "t1", "t2"]
    # what evaluate --predictions reads back: subject and contrast, the sidecars left aside
    back = {entry.subject: list(entry.files) for entry in discover_nifti_subjects(tmp_path / "out").subjects}
    assert back == {"BraTS-GLI-00002-000": ["flair"], "BraTS-GLI-00003-000": ["t1ce"]}

    flair_only = load_generator(
        write_checkpoint(tmp_path / "flair_only", arch="unet", data={"target_modality": "flair"})
    )
    written, failures = synthesize_folder(flair_only, folder, None, tmp_path / "flair_only_out")
    assert [path.name for path in written] == ["BraTS-GLI-00002-000-t2f.nii.gz"]
    assert (
        "BraTS-GLI-00003-000: misses t1c, but the checkpoint was trained to synthesize t2f only" in failures
    )


class _FlipSymmetrised(nn.Module):
    """A generator made exactly equivariant to the spread's flip: the mean of it and its flipped twin."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, images, available, target_index):
        flipped = self.module(images.flip(-2), available, target_index).flip(-2)
        return (self.module(images, available, target_index) + flipped) / 2


def _symmetric_subject(folder, rng) -> dict:
    """t1 and t2 NIfTI (RAS, 40 x 40 x 12 voxels) mirror-symmetric left-right (x), the flip's axis."""
    folder.mkdir()
    x, y, z = np.meshgrid(np.arange(40), np.arange(40), np.arange(12), indexing="ij")
    inside = ((x - 19.5) / 14) ** 2 + ((y - 19.5) / 16) ** 2 + ((z - 5.5) / 7) ** 2 < 1
    files = {}
    for name in ("t1", "t2"):
        data = (rng.integers(100, 1000, (40, 40, 12)) * inside).astype(np.int16)
        data = np.maximum(data, data[::-1, :, :])
        files[name] = folder / f"sym_{name}.nii.gz"
        nib.save(nib.Nifti1Image(data, np.diag([1.0, 1.0, 1.0, 1.0])), files[name])
    return files


def test_flip_spread_is_the_asymmetry_of_the_prediction_and_zero_for_a_flip_equivariant_model(
    generator, phantom_subjects, tmp_path
):
    files = _symmetric_subject(tmp_path / "sym", np.random.default_rng(0))
    result = synthesize_volume(generator, files, "flair", spread="flip")
    images = result.prepared.images
    assert np.array_equal(images, images[..., ::-1, :])  # the model sees an exactly symmetric input
    # two variants, the prediction and its mirror: their SD is half their difference
    synthesized, mask = result.synthesized, result.prepared.mask
    expected = np.abs(synthesized - synthesized[..., ::-1, :]) / 2 * mask
    assert result.spread.dtype == np.float32 and result.spread.shape == synthesized.shape
    np.testing.assert_allclose(result.spread, expected, atol=1e-6)
    assert result.spread.max() > 1e-4  # an untrained network is not symmetric

    brats = _brats_files(phantom_subjects)
    inputs = {"t1": brats["t1"], "t2": brats["t2"]}
    equivariant = dataclasses.replace(generator, module=_FlipSymmetrised(generator.module).eval())
    assert synthesize_volume(equivariant, inputs, "flair", spread="flip").spread.max() < 1e-5
    plain = synthesize_volume(generator, inputs, "flair", spread="flip")
    assert plain.spread.max() > 1e-3
    np.testing.assert_array_equal(
        plain.synthesized, synthesize_volume(generator, inputs, "flair").synthesized
    )
    spread_image = plain.spread_image
    assert spread_image.shape == plain.image.shape and spread_image.get_data_dtype() == np.float32
    np.testing.assert_array_equal(spread_image.affine, plain.image.affine)


def _add_raw_weights(checkpoint, noise: float):
    """Give an EMA-only checkpoint DeepSpeed raw weights too: the EMA's plus seeded noise (0: the same)."""
    layout = CheckpointLayout(checkpoint)
    state = read_safetensors(layout.ema_file("step_000002"))
    torch.manual_seed(1)
    raw = {name: t + noise * torch.randn_like(t) if t.is_floating_point() else t for name, t in state.items()}
    torch.save({"module": raw}, layout.tag_dir("step_000002") / MODEL_STATES_FILE)


def test_weights_spread_over_ema_and_raw_weights(phantom_subjects, tmp_path):
    inputs = {name: path for name, path in _brats_files(phantom_subjects).items() if name in ("t1", "t2")}
    checkpoint = write_checkpoint(tmp_path / "run", arch="unet")
    with pytest.raises(CheckpointError, match="no DeepSpeed model states"):
        load_for_synthesis(checkpoint, spread="weights")
    exported, _, _ = export_generator(checkpoint, tmp_path / "G.safetensors")
    with pytest.raises(SynthesisError, match="exported file, which holds one set of weights"):
        load_for_synthesis(exported, spread="weights")

    _add_raw_weights(checkpoint, 0.0)
    ema, raw = load_for_synthesis(checkpoint, spread="weights")
    assert ema.source.startswith("EMA") and raw.source.startswith("raw")
    assert synthesize_volume(ema, inputs, "flair", spread="weights", other_weights=raw).spread.max() == 0.0

    _add_raw_weights(checkpoint, 0.05)
    ema, raw = load_for_synthesis(checkpoint, spread="both")
    assert ema.weights_sha256 != raw.weights_sha256
    assert load_generator(checkpoint).weights_sha256 == ema.weights_sha256  # the default stays the EMA
    result = synthesize_volume(ema, inputs, "flair", spread="both", other_weights=raw)
    assert len(result.variants) == 4 and result.spread.max() > 1e-3
    assert [(v.generator is raw, v.flipped) for v in result.variants] == [
        (False, False), (False, True), (True, False), (True, True)
    ]  # fmt: skip


def test_sidecars_say_synthetic_and_name_inputs_weights_normalisation_and_command(phantom_subjects, tmp_path):
    training_data = current_training_data(dataset="brats")
    normalisation = training_data["normalisation"]
    checkpoint = write_checkpoint(tmp_path / "run", arch="unet", training_data=training_data)
    generator = load_generator(checkpoint)
    files = _brats_files(phantom_subjects)
    result = synthesize_volume(generator, {"t1": files["t1"], "t2": files["t2"]}, "flair", spread="flip")
    out = tmp_path / "out" / "y.nii.gz"
    written = write_synthesized(result, out, "python -m medgan synthesize --spread flip")
    assert [path.name for path in written] == [
        "y.nii.gz", "y.json", "y_spread.nii.gz", "y_spread.json", "dataset_description.json"
    ]  # fmt: skip
    sidecar = json.loads((tmp_path / "out" / "y.json").read_text())
    assert sidecar["Synthetic"] is True and sidecar["Description"].startswith("Synthetic FLAIR")
    assert sidecar["Sources"] == [str(files["t1"].resolve()), str(files["t2"].resolve())]
    assert sidecar["Inputs"]["t2"]["SHA256"] == hashlib.sha256(files["t2"].read_bytes()).hexdigest()
    assert sidecar["ReferenceGrid"] == str(files["t2"].resolve())
    assert sidecar["Model"]["WeightsSHA256"] == weights_sha256(generator.module.state_dict())
    assert sidecar["Model"]["Source"] == generator.source
    assert sidecar["Normalisation"]["Training"] == normalisation
    assert set(sidecar["Normalisation"]["Inputs"]) == {"t1", "t2"}
    t2 = sidecar["Normalisation"]["Inputs"]["t2"]
    assert t2["low"] == 0 and t2["high"] == 2.5 * t2["median"] and 0 <= t2["clipped_fraction"] <= 1
    assert sidecar["Intensity"].startswith("the training data's healthy-median scale")
    assert "0.4 = the subject's median of this contrast within the brain mask" in sidecar["Intensity"]
    assert sidecar["Command"] == "python -m medgan synthesize --spread flip"
    spread = json.loads((tmp_path / "out" / "y_spread.json").read_text())
    assert "not a calibrated uncertainty" in spread["Description"] and len(spread["Variants"]) == 2
    description = json.loads((tmp_path / "out" / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative" and description["BIDSVersion"]
    assert description["GeneratedBy"][0]["Name"] == "MedGAN-SSM"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "dataset_description.json").write_text("{}")
    assert write_dataset_description(tmp_path / "other") is None
    assert (tmp_path / "other" / "dataset_description.json").read_text() == "{}"


def test_weights_hash_follows_the_weights_not_the_file(tmp_path):
    checkpoint = write_checkpoint(tmp_path / "a", arch="unet", seed=0)
    loaded = load_generator(checkpoint)
    exported, _, _ = export_generator(checkpoint, tmp_path / "G.safetensors")
    assert load_generator(exported).weights_sha256 == loaded.weights_sha256
    assert load_generator(write_checkpoint(tmp_path / "b", arch="unet", seed=1)).weights_sha256 != (
        loaded.weights_sha256
    )
    state = dict(loaded.module.state_dict())
    name = next(iter(state))
    changed = {**state, name: state[name].clone()}
    changed[name].view(-1)[0] += 1e-3
    assert weights_sha256(changed) != weights_sha256(state) == loaded.weights_sha256
    assert weights_sha256({"w": torch.zeros(2, 3)}) != weights_sha256({"w": torch.zeros(3, 2)})


def test_synthesize_refuses_a_checkpoint_trained_on_another_normalisation(capsys, phantom_subjects, tmp_path):
    """Inputs would be scaled as data_prep scales them now, not as the checkpoint learned: one line."""
    from medgan.__main__ import main

    old_record = {"dataset": "brats", "format_version": 1, "normalisation": FORMAT_1_NORMALISATION}
    old = write_checkpoint(tmp_path / "old", arch="unet", training_data=old_record)
    files = _brats_files(phantom_subjects)
    out = tmp_path / "y.nii.gz"
    argv = ["synthesize", "--checkpoint", str(old), "--input", f"t1={files['t1']}", "--target", "flair"]
    assert main([*argv, "--out", str(out)]) == 2
    error = capsys.readouterr().err.strip()
    assert error == (
        f"medgan synthesize: error: {old}: trained on shard format 1 (percentile normalisation), but this "
        "version reads shard format 2 (healthy-median normalisation): retrain on shards made by "
        "python -m data_prep shard, or use the medgan version it was trained with"
    )
    assert not out.exists()
