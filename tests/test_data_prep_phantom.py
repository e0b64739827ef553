"""The phantom: deterministic, brain-like, with MR-plausible contrast and BraTS tumour labels."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from data_prep.__main__ import main
from data_prep.errors import UserError
from data_prep.mr_signal import signal_table
from data_prep.phantom import LAYOUT_MODALITIES, TISSUE_NAMES, PhantomConfig, make_phantom

SMALL_SHAPE = (64, 64, 32)


def _load(path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


@pytest.fixture(scope="module")
def brats_subjects(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantom_brats")
    return make_phantom(PhantomConfig(layout="brats", subjects=3, seed=7, tumour_rate=1.0), out)


@pytest.fixture(scope="module")
def ixi_subjects(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantom_ixi")
    return make_phantom(PhantomConfig(layout="ixi", subjects=2, seed=7, shape=SMALL_SHAPE), out)


def test_same_seed_same_bytes_and_subjects_independent_of_count(tmp_path):
    first = make_phantom(PhantomConfig(layout="brats", subjects=2, seed=3, shape=SMALL_SHAPE), tmp_path / "a")
    again = make_phantom(PhantomConfig(layout="brats", subjects=1, seed=3, shape=SMALL_SHAPE), tmp_path / "b")
    other = make_phantom(PhantomConfig(layout="brats", subjects=1, seed=4, shape=SMALL_SHAPE), tmp_path / "c")
    for modality, path in again[0].files.items():
        assert path.read_bytes() == first[0].files[modality].read_bytes(), modality
    assert not np.array_equal(_load(other[0].files["t2"]), _load(again[0].files["t2"]))


def test_noise_free_references_leave_the_subjects_as_they_are_and_carry_the_noise_lift(tmp_path):
    config = PhantomConfig(layout="brats", subjects=2, seed=3, shape=SMALL_SHAPE, tumour_rate=1.0)
    plain = make_phantom(config, tmp_path / "plain")
    subjects = make_phantom(config, tmp_path / "with", noise_free=tmp_path / "references")
    for before, after in zip(plain, subjects):
        assert all(after.files[m].read_bytes() == path.read_bytes() for m, path in before.files.items())
    for subject in subjects:
        name = subject.subject
        real = _load(subject.files["flair"]).astype(float)
        noise_free, expected = (
            _load(tmp_path / "references" / kind / name / f"{name}_flair.nii.gz").astype(float)
            for kind in ("noise_free", "expected")
        )  # fmt: skip
        seg = _load(tmp_path / "references" / "expected" / name / f"{name}_seg.nii.gz")
        assert np.array_equal(seg, _load(subject.files["seg"]))
        brain = real > 0
        # the same skull stripping (a dark voxel may round to 0 without the noise's lift)
        assert not (noise_free[~brain].any() or expected[~brain].any())
        assert (expected[brain] > 0).mean() > 0.95
        # the noise lifts the mean magnitude (Jensen), most where the signal is low
        lift = (expected - noise_free)[brain]
        assert lift.min() >= -1, "below the noise-free rendering beyond int16 rounding"
        dark = noise_free[brain] <= np.percentile(noise_free[brain], 5)
        bright = noise_free[brain] >= np.percentile(noise_free[brain], 50)
        assert lift[dark].mean() > 2 * lift[bright].mean() + 1
    with pytest.raises(UserError, match="brats layout only"):
        make_phantom(
            PhantomConfig(layout="ixi", subjects=1, shape=SMALL_SHAPE), tmp_path / "i", noise_free=tmp_path
        )


def test_the_expected_magnitude_is_the_mean_of_the_noisy_ones():
    from data_prep.phantom import _imperfections, rician_mean

    rng = np.random.default_rng(0)
    points = rng.uniform(-60, 60, size=(3, 4000))
    amplitude = np.array([0.0, 0.5, 1.0, 2.0, 5.0, 50.0])
    clean, sigma = np.repeat(amplitude[:, None], 4000, axis=1), np.ones((6, 1))
    simulated = np.mean([_imperfections(rng, clean, sigma, points) for _ in range(32)], axis=0).mean(axis=1)
    assert rician_mean(np.array(0.0), 1.0) == pytest.approx(np.sqrt(np.pi / 2)), "no signal: Rayleigh's mean"
    assert rician_mean(np.array(1e4), 1.0) == pytest.approx(1e4, rel=1e-6), "a strong signal: no lift"
    # the simulation adds the bias field (a few percent either way at these points) to the noise
    np.testing.assert_allclose(simulated, rician_mean(amplitude, 1.0), rtol=0.04, atol=0.02)


def test_signal_equations_order_tissues_as_in_real_mri():
    table = dict(
        zip(
            ["t1", "t1ce", "t2", "flair", "pd"],
            signal_table(TISSUE_NAMES, ["t1", "t1ce", "t2", "flair", "pd"]),
        )
    )
    signal = {modality: dict(zip(TISSUE_NAMES, row)) for modality, row in table.items()}
    assert signal["t1"]["wm"] > signal["t1"]["gm"] > signal["t1"]["csf"]
    assert signal["t2"]["csf"] > signal["t2"]["gm"] > signal["t2"]["wm"]
    assert signal["flair"]["csf"] < 0.01 * signal["flair"]["gm"]  # inversion recovery nulls CSF
    assert signal["flair"]["oedema"] > signal["flair"]["gm"] > signal["flair"]["wm"]
    assert signal["t1ce"]["enhancing"] > 2 * signal["t1"]["enhancing"]  # gadolinium shortens T1
    assert signal["t1ce"]["wm"] == signal["t1"]["wm"]  # only the enhancing tissue takes up contrast


def test_csf_bright_on_t2_dark_on_flair_and_t1(brats_subjects):
    files = brats_subjects[0].files
    t1, t2, flair = (_load(files[m]).astype(float) for m in ("t1", "t2", "flair"))
    healthy_brain = (t2 > 0) & (_load(files["seg"]) == 0)
    fluid = healthy_brain & (t2 > np.percentile(t2[healthy_brain], 95))  # brightest T2 in healthy brain: CSF
    assert fluid.sum() > 100
    assert np.median(flair[fluid]) < 0.6 * np.median(flair[healthy_brain])
    assert np.median(t1[fluid]) < 0.8 * np.median(t1[healthy_brain])


def test_tumour_has_brats_labels_and_enhancing_rim(brats_subjects):
    for subject in brats_subjects:
        seg = _load(subject.files["seg"])
        assert seg.dtype == np.uint8
        assert set(np.unique(seg)) == {0, 1, 2, 4}, subject.subject
        t1, t1ce, flair = (_load(subject.files[m]).astype(float) for m in ("t1", "t1ce", "flair"))
        brain = (t1 > 0) & (seg == 0)
        rim_t1ce = np.median(t1ce[seg == 4]) / np.median(t1ce[brain])
        rim_t1 = np.median(t1[seg == 4]) / np.median(t1[brain])
        assert rim_t1ce > 1.5 * rim_t1
        assert np.median(flair[seg == 2]) > 1.2 * np.median(flair[brain])


def test_brats_layout_names_skull_stripped_lps(brats_subjects):
    subject = brats_subjects[0]
    assert subject.subject == "BraTS2021_00000"
    assert sorted(path.name for path in subject.files.values()) == sorted(
        f"BraTS2021_00000_{m}.nii.gz" for m in ("t1", "t1ce", "t2", "flair", "seg")
    )
    image = nib.load(subject.files["t1"])
    assert image.shape == (128, 128, 64)
    assert nib.aff2axcodes(image.affine) == ("L", "P", "S")
    volume = np.asarray(image.dataobj)
    assert volume[0].max() == 0 and volume[:, :, -1].max() == 0  # background outside the brain is zero


def test_ixi_layout_sagittal_t1_on_its_own_grid_with_head(ixi_subjects):
    subject = ixi_subjects[0]
    assert subject.subject.startswith("IXI002-")
    for modality, path in subject.files.items():
        assert path.parent.name == f"IXI-{modality.upper()}"
        assert path.name == f"{subject.subject}-{modality.upper()}.nii.gz"
    t1, t2, pd = (nib.load(subject.files[m]) for m in ("t1", "t2", "pd"))
    assert t2.shape == pd.shape == SMALL_SHAPE and np.allclose(t2.affine, pd.affine)
    assert t1.shape != t2.shape
    assert nib.aff2axcodes(t1.affine)[2] in ("L", "R")  # slices along left-right: sagittal
    assert nib.aff2axcodes(t2.affine)[2] in ("S", "I")
    # Not skull-stripped: the scalp puts bright signal outside the brain, noise fills the background.
    t2_data = np.asarray(t2.dataobj).astype(float)
    assert (t2_data[:, :, SMALL_SHAPE[2] // 2] > 0).mean() > 0.9


def test_missing_rate_drops_one_contrast(tmp_path):
    config = PhantomConfig(layout="brats", subjects=3, seed=1, shape=SMALL_SHAPE, missing_rate=1.0)
    for subject in make_phantom(config, tmp_path):
        present = set(subject.files) - {"seg"}
        assert len(present) == len(LAYOUT_MODALITIES["brats"]) - 1
        assert "seg" in subject.files


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"layout": "oasis"}, "--layout 'oasis'"),
        ({"subjects": 0}, "--subjects 0"),
        ({"shape": (8, 64, 64)}, "--shape 8 64 64"),
        ({"missing_rate": 1.5}, "--missing-rate 1.5"),
    ],
)
def test_bad_phantom_values_name_the_value(changes, message):
    arguments = {"layout": "brats", "subjects": 1} | changes
    with pytest.raises(UserError, match=message):
        PhantomConfig(**arguments)


def test_command_line_writes_subjects_and_reports_bad_values_in_one_line(tmp_path, capsys):
    out = tmp_path / "phantom"
    assert (
        main(
            ["phantom", "--layout", "ixi", "--subjects", "1", "--out", str(out), "--shape", "32", "32", "16"]
        )
        == 0
    )
    assert sorted(folder.name for folder in out.iterdir()) == ["IXI-PD", "IXI-T1", "IXI-T2"]
    assert (
        main(["phantom", "--layout", "brats", "--subjects", "2", "--out", str(out), "--missing-rate", "-1"])
        == 2
    )
    error = capsys.readouterr().err.strip().splitlines()
    assert error == ["data_prep phantom: error: --missing-rate -1.0: expected a probability in [0, 1]"]


def test_command_line_writes_the_noise_free_references_beside_the_subjects(tmp_path, capsys):
    out, references = tmp_path / "phantom", tmp_path / "references"
    command = [
        "phantom",
        "--layout",
        "brats",
        "--subjects",
        "1",
        "--out",
        str(out),
        "--shape",
        "32",
        "32",
        "16",
    ]
    assert main([*command, "--noise-free", str(references)]) == 0
    assert "and each without its bias field and noise to" in capsys.readouterr().out
    for kind in ("noise_free", "expected"):
        files = sorted(p.name for p in (references / kind / "BraTS2021_00000").iterdir())
        assert files == sorted(p.name for p in (out / "BraTS2021_00000").iterdir())
