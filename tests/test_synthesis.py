"""synthesize: NIfTI inputs -> a NIfTI on the reference input's grid, and one clear line per bad input."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest
from conftest import run_module, write_checkpoint

from data_prep.volumes import VolumeError, discover_nifti_subjects
from medgan.export import export_generator
from medgan.inference import load_generator
from medgan.synthesis import (
    SynthesisError,
    parse_input_flags,
    synthesize_folder,
    synthesize_volume,
)


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
    assert "normalised [0,1]" in description


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
    written, failures = synthesize_folder(generator, small, "flair", tmp_path / "out")
    assert [path.name for path in written] == ["BraTS2021_00002_flair.nii.gz"]
    assert len(failures) == 1 and failures[0].startswith("BraTS2021_00003: ") and "\n" not in failures[0]


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
    ]  # fmt: skip
    for call, expected in cases:
        with pytest.raises((SynthesisError, VolumeError)) as caught:
            call()
        message = str(caught.value)
        assert expected in message and "\n" not in message, message
