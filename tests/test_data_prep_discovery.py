"""Discovery finds every BraTS / IXI naming variant (empty files named like the real ones suffice)."""

from __future__ import annotations

from pathlib import Path

import pytest

import data_prep.discovery as discovery
import data_prep.volumes as volumes
from data_prep.discovery import (
    MODALITY_ALIASES,
    canonical_modality,
    discover,
    discover_nifti_subjects,
    normalise_modality,
    parse_name,
)
from data_prep.errors import UserError
from data_prep.phantom import PhantomConfig, make_phantom


def _touch(root: Path, *relative: str) -> None:
    for name in relative:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()


@pytest.mark.parametrize(
    ("name", "subject", "patient", "modality"),
    [
        ("Brats17_TCIA_105_1_t1ce.nii.gz", "Brats17_TCIA_105_1", "Brats17_TCIA_105_1", "t1ce"),
        ("Brats18_CBICA_AAB_1_flair.nii.gz", "Brats18_CBICA_AAB_1", "Brats18_CBICA_AAB_1", "flair"),
        ("BraTS19_2013_10_1_t1.nii.gz", "BraTS19_2013_10_1", "BraTS19_2013_10_1", "t1"),
        ("BraTS20_Training_001_seg.nii", "BraTS20_Training_001", "BraTS20_Training_001", "seg"),
        ("BraTS20_Validation_125_t2.nii.gz", "BraTS20_Validation_125", "BraTS20_Validation_125", "t2"),
        ("BraTS2021_00000_t1ce.nii.gz", "BraTS2021_00000", "BraTS2021_00000", "t1ce"),
        ("BRATS2021_01666_FLAIR.NII.GZ", "BRATS2021_01666", "BRATS2021_01666", "flair"),
        ("BraTS-GLI-00000-000-t1n.nii.gz", "BraTS-GLI-00000-000", "BraTS-GLI-00000", "t1"),
        ("BraTS-GLI-00000-001-t1c.nii.gz", "BraTS-GLI-00000-001", "BraTS-GLI-00000", "t1ce"),
        ("BraTS-MEN-00004-000-t2w.nii.gz", "BraTS-MEN-00004-000", "BraTS-MEN-00004", "t2"),
        ("BraTS-MET-00002-000-t2f.nii", "BraTS-MET-00002-000", "BraTS-MET-00002", "flair"),
        ("BraTS-PED-00010-000-seg.nii.gz", "BraTS-PED-00010-000", "BraTS-PED-00010", "seg"),
        ("BraTS-SSA-00002-000-T1N.nii.gz", "BraTS-SSA-00002-000", "BraTS-SSA-00002", "t1"),
        ("IXI002-Guys-0828-T1.nii.gz", "IXI002-Guys-0828", "IXI002-Guys-0828", "t1"),
        ("IXI012-HH-1211-PD.nii", "IXI012-HH-1211", "IXI012-HH-1211", "pd"),
        ("ixi035-iop-0873-t2.nii.gz", "ixi035-iop-0873", "ixi035-iop-0873", "t2"),
    ],
)
def test_every_naming_variant_parses(name, subject, patient, modality):
    match = parse_name(Path(name))
    assert (match.subject, match.patient, match.modality) == (subject, patient, modality)


@pytest.mark.parametrize(
    "name", ["notes.txt", "BraTS2021_00000_t1.mgz", "scan.nii.gz", "BraTS2021_00000_dwi.nii"]
)
def test_other_names_do_not_parse(name):
    assert parse_name(Path(name)) is None


def test_brats_2023_nested_folders_timepoints_and_ignored_files(tmp_path):
    _touch(
        tmp_path,
        *(
            f"train/BraTS-GLI-00001-000/BraTS-GLI-00001-000-{m}.nii.gz"
            for m in ("t1n", "t1c", "t2w", "t2f", "seg")
        ),
        *(f"train/BraTS-GLI-00001-001/BraTS-GLI-00001-001-{m}.nii.gz" for m in ("t1n", "t2w")),
        "val/deeper/BraTS-MEN-00002-000/BraTS-MEN-00002-000-t2f.nii",
        "val/README.txt",
        "val/BraTS-GLI-00001-000/scan_0001.nii.gz",
        "elsewhere/IXI002-Guys-0828-T1.nii.gz",
    )
    found = discover(tmp_path, "brats")
    assert [s.subject for s in found.subjects] == [
        "BraTS-GLI-00001-000",
        "BraTS-GLI-00001-001",
        "BraTS-MEN-00002-000",
    ]
    assert [s.patient for s in found.subjects] == ["BraTS-GLI-00001", "BraTS-GLI-00001", "BraTS-MEN-00002"]
    assert set(found.subjects[0].files) == {"t1", "t1ce", "t2", "flair", "seg"}
    assert found.subjects[1].modalities == ["t1", "t2"]
    reasons = {path.name: reason for path, reason in found.ignored}
    assert set(reasons) == {"scan_0001.nii.gz", "IXI002-Guys-0828-T1.nii.gz"}
    assert "unknown file name" in reasons["scan_0001.nii.gz"]
    assert "named like IXI" in reasons["IXI002-Guys-0828-T1.nii.gz"]


def test_ixi_per_contrast_folders(tmp_path):
    _touch(
        tmp_path,
        "IXI-T1/IXI002-Guys-0828-T1.nii.gz",
        "IXI-T2/IXI002-Guys-0828-T2.nii.gz",
        "IXI-PD/IXI002-Guys-0828-PD.nii.gz",
        "IXI-T2/IXI012-HH-1211-T2.nii.gz",
        "IXI-MRA/IXI002-Guys-0828-MRA.nii.gz",
        "IXI-DTI/IXI002-Guys-0828-DTI-00.nii.gz",
    )
    found = discover(tmp_path, "ixi")
    assert [(s.subject, s.modalities) for s in found.subjects] == [
        ("IXI002-Guys-0828", ["t1", "t2", "pd"]),
        ("IXI012-HH-1211", ["t2"]),
    ]
    assert len(found.ignored) == 2


def test_duplicate_subject_is_flagged_with_both_files(tmp_path):
    _touch(tmp_path, "a/BraTS2021_00001_t1.nii.gz", "b/BraTS2021_00001_t1.nii", "a/BraTS2021_00001_t2.nii.gz")
    (subject,) = discover(tmp_path, "brats").subjects
    assert subject.problem.startswith("duplicate subject id: 2 t1 files")
    assert "a/BraTS2021_00001_t1.nii.gz" in subject.problem and "b/BraTS2021_00001_t1.nii" in subject.problem


def test_missing_empty_and_unnamed_sources_give_one_clear_line(tmp_path):
    with pytest.raises(UserError, match="no such folder"):
        discover(tmp_path / "absent", "brats")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"no NIfTI files \(.nii or .nii.gz\) found \(0 other files\)"):
        discover(tmp_path / "empty", "brats")
    _touch(tmp_path, "odd/scan.nii.gz")
    with pytest.raises(UserError, match="none of the 1 NIfTI files is named like a brats subject"):
        discover(tmp_path / "odd", "brats")


def test_modality_names_normalise_to_lower_case_and_reject_unknown():
    assert [normalise_modality(m) for m in ("T1", "t1n", "T1C", "t2w", "t2f", "PD", "FLAIR")] == [
        "t1",
        "t1",
        "t1ce",
        "t2",
        "flair",
        "pd",
        "flair",
    ]
    with pytest.raises(UserError, match="unknown modality 'dwi'"):
        normalise_modality("dwi")


@pytest.mark.parametrize(
    ("name", "canonical"),
    [
        ("t1", "t1"),
        (" T1CE ", "t1ce"),
        ("t1n", "t1"),
        ("T1C", "t1ce"),
        ("t1gd", "t1ce"),
        ("T1Gd\n", "t1ce"),
        ("t2w", "t2"),
        ("T2F", "flair"),
        ("FLAIR", "flair"),
        ("pd", "pd"),
        ("SEG", "seg"),
        ("dwi", "dwi"),
    ],
)
def test_canonical_modality_strips_lowers_and_maps_aliases(name, canonical):
    assert canonical_modality(name) == canonical


def test_aliases_are_exactly_the_brats_2023_names_and_t1gd():
    assert MODALITY_ALIASES == {"t1n": "t1", "t1c": "t1ce", "t1gd": "t1ce", "t2w": "t2", "t2f": "flair"}
    assert normalise_modality(" t1gd") == "t1ce"


def test_volumes_re_exports_the_one_modality_table_and_discovery():
    """medgan imports these from data_prep.volumes: they must be discovery's own objects, not copies."""
    names = [
        "MODALITIES",
        "MODALITY_ALIASES",
        "SEGMENTATION",
        "DATASET_MODALITIES",
        "canonical_modality",
        "normalise_modality",
        "discover",
        "discover_nifti_subjects",
        "Discovery",
        "SubjectFiles",
    ]
    for name in names:
        assert getattr(volumes, name) is getattr(discovery, name), name
        assert name in volumes.__all__, name
    assert volumes.MODALITIES == ("t1", "t1ce", "t2", "flair", "pd") and volumes.SEGMENTATION == "seg"


def test_brats_subject_folders_without_images_come_back_as_failed_subjects(tmp_path):
    """The rule: a leaf folder (no sub-folder) below --src, not hidden, named like a BraTS subject or lying
    beside a folder that holds a subject's files, whose name is no found subject's id."""
    source = tmp_path / "src"
    _touch(
        source,
        *(f"train/BraTS-GLI-00001-000/BraTS-GLI-00001-000-{m}.nii.gz" for m in ("t1n", "t1c", "t2w", "t2f")),
        "train/case_7/notes.txt",
        "train/case_8/scan.nii.gz",
        "train/IXI-T1/IXI002-Guys-0828-T1.nii.gz",  # another dataset's contrast folder, not a lost subject
        "train/shards/report.json",  # an earlier shard run's --out, inside --src
        "docs/README.txt",
        "val/BraTS-GLI-00001-000/scan_0001.nii.gz",
    )
    for empty in (
        "train/BraTS-GLI-00002-000",  # named like a subject: reported
        "BraTS2021_00007",  # named like a subject, at the top: reported
        "train/.cache",  # hidden
        "train/nested/deeper",  # neither named like a subject nor beside one
        "BraTS2021_Training_Data",  # a download's folder name, not a subject id
        "val/BraTS-GLI-00001-000-extra",  # not a BraTS subject id
    ):
        (source / empty).mkdir(parents=True)
    _touch(tmp_path, "outside/BraTS-GLI-00004-000-t1n.nii.gz")
    (source / "train" / "BraTS-GLI-00004-000").symlink_to(tmp_path / "outside", target_is_directory=True)

    found = discover(source, "brats")
    assert [s.subject for s in found.subjects] == [
        "BraTS-GLI-00001-000",
        "BraTS-GLI-00002-000",
        "BraTS-GLI-00004-000",
        "BraTS2021_00007",
        "case_7",
        "case_8",
    ]
    without = {s.subject: (s.patient, s.dataset, s.files, s.problem) for s in found.subjects if not s.files}
    train = source / "train"
    assert without == {
        "BraTS-GLI-00002-000": ("BraTS-GLI-00002", "brats", {}, f"{train}/BraTS-GLI-00002-000: empty folder"),
        "BraTS-GLI-00004-000": (
            "BraTS-GLI-00004",
            "brats",
            {},
            f"{train}/BraTS-GLI-00004-000: a symbolic link to a folder (not followed; link the files "
            "instead)",
        ),
        "BraTS2021_00007": ("BraTS2021_00007", "brats", {}, f"{source}/BraTS2021_00007: empty folder"),
        "case_7": ("case_7", "brats", {}, f"{train}/case_7: no NIfTI file (1 other file)"),
        "case_8": (
            "case_8",
            "brats",
            {},
            f"{train}/case_8: no usable NIfTI file (1 NIfTI file, none with a name we recognise; see the "
            "ignored files)",
        ),
    }
    assert found.subjects[0].problem is None and len(found.subjects[0].files) == 4
    assert {path.name for path, _ in found.ignored} == {
        "scan.nii.gz",
        "scan_0001.nii.gz",
        "IXI002-Guys-0828-T1.nii.gz",
    }


def test_ixi_contrast_folders_are_not_subject_folders(tmp_path):
    _touch(
        tmp_path,
        "IXI-T1/IXI002-Guys-0828-T1.nii.gz",
        "IXI-T2/IXI002-Guys-0828-T2.nii.gz",
        "IXI-MRA/IXI002-Guys-0828-MRA.nii.gz",
        "IXI-PD/README.txt",
    )
    (tmp_path / "IXI-DTI").mkdir()
    found = discover(tmp_path, "ixi")
    assert [(s.subject, s.problem) for s in found.subjects] == [("IXI002-Guys-0828", None)]


# discover_nifti_subjects: the one subject discovery for folders medgan reads (synthesize / evaluate
# --subjects): data_prep's BraTS / IXI names first, then the loose SUBJECT_CONTRAST rule.


@pytest.mark.parametrize("layout", ["brats", "ixi"])
def test_nifti_subjects_of_a_phantom_are_the_phantom_subjects(layout, tmp_path):
    written = make_phantom(
        PhantomConfig(layout=layout, subjects=3, seed=3, shape=(24, 24, 16), missing_rate=0.5), tmp_path
    )
    found = discover_nifti_subjects(tmp_path)
    assert [(s.subject, s.patient, s.dataset, s.files, s.problem) for s in found.subjects] == [
        (subject.subject, subject.subject, layout, subject.files, None) for subject in written
    ]
    assert found.ignored == []


def test_nifti_subjects_named_by_a_convention_are_those_shard_sees(tmp_path):
    """Subject ids and patients exactly as `discover` (and so `shard`) reads them, dataset from the name."""
    _touch(
        tmp_path,
        *(f"BraTS-GLI-00001-000/BraTS-GLI-00001-000-{m}.nii.gz" for m in ("t1n", "t1c", "t2w", "t2f", "seg")),
        *(f"BraTS-GLI-00001-001/BraTS-GLI-00001-001-{m}.nii.gz" for m in ("t1n", "t2w")),
        "Brats18_CBICA_AAB_1/Brats18_CBICA_AAB_1_flair.nii",
        "IXI-T1/IXI002-Guys-0828-T1.nii.gz",
        "IXI-T2/IXI002-Guys-0828-T2.nii.gz",
    )
    found = discover_nifti_subjects(tmp_path)
    brats = [s for s in found.subjects if s.dataset == "brats"]
    assert brats == discover(tmp_path, "brats").subjects
    assert [(s.subject, s.patient) for s in brats] == [
        ("BraTS-GLI-00001-000", "BraTS-GLI-00001"),
        ("BraTS-GLI-00001-001", "BraTS-GLI-00001"),
        ("Brats18_CBICA_AAB_1", "Brats18_CBICA_AAB_1"),
    ]
    assert [s for s in found.subjects if s.dataset == "ixi"] == discover(tmp_path, "ixi").subjects
    assert len(found.subjects) == 4


@pytest.mark.parametrize(
    ("name", "subject", "modality"),
    [
        ("sub01/sub01_T1.nii.gz", "sub01", "t1"),
        ("sub01/t2.nii.gz", "sub01", "t2"),
        ("sub01/FLAIR.nii", "sub01", "flair"),
        ("cases/patient-7-t1gd.nii.gz", "patient-7", "t1ce"),
        ("cases/patient.7.T2F.nii.gz", "patient.7", "flair"),
        ("cases/scan_2_PD.nii.gz", "scan_2", "pd"),
        ("cases/scan_2_seg.nii.gz", "scan_2", "seg"),
        ("BraTS2021_00000_t1gd.nii.gz", "BraTS2021_00000", "t1ce"),
    ],
)
def test_loosely_named_files(tmp_path, name, subject, modality):
    _touch(tmp_path, name)
    (found,) = discover_nifti_subjects(tmp_path).subjects
    assert (found.subject, found.patient, found.dataset, list(found.files)) == (
        subject,
        subject,
        None,
        [modality],
    )


def test_names_without_a_contrast_and_second_files_are_ignored_with_the_reason(tmp_path):
    _touch(
        tmp_path,
        "a/sub01_t1.nii.gz",
        "a/sub01_dwi.nii.gz",
        "a/sub01_t2.nii.gz",
        "a/sub01_T2.nii",
        "a/notes.txt",
        "IXI-MRA/IXI002-Guys-0828-MRA.nii.gz",
    )
    found = discover_nifti_subjects(tmp_path)
    assert [(s.subject, s.files) for s in found.subjects] == [
        ("sub01", {"t1": tmp_path / "a/sub01_t1.nii.gz", "t2": tmp_path / "a/sub01_T2.nii"})
    ]
    assert found.ignored == [
        (tmp_path / "IXI-MRA/IXI002-Guys-0828-MRA.nii.gz", "IXI MRA is not an anatomical contrast we use"),
        (
            tmp_path / "a/sub01_dwi.nii.gz",
            "no contrast name (t1 t1ce t2 flair pd seg, or an alias) as the last word of the name",
        ),
        (
            tmp_path / "a/sub01_t2.nii.gz",
            f"a second t2 file for subject sub01 (kept {tmp_path / 'a/sub01_T2.nii'})",
        ),
    ]


def test_a_conventional_name_wins_over_a_loose_one(tmp_path):
    """Grouping ignores case; the BraTS-named file sets the subject's spelling and dataset and keeps its
    contrast even when the loosely named file comes first by path."""
    _touch(
        tmp_path,
        "a/brats2021_00001_t1gd.nii.gz",
        "a/brats2021_00001_pd.nii.gz",
        "b/BraTS2021_00001_t1ce.nii.gz",
        "b/BraTS2021_00001_t2.nii.gz",
    )
    found = discover_nifti_subjects(tmp_path)
    assert [(s.subject, s.patient, s.dataset, s.files) for s in found.subjects] == [
        (
            "BraTS2021_00001",
            "BraTS2021_00001",
            "brats",
            {
                "t1ce": tmp_path / "b/BraTS2021_00001_t1ce.nii.gz",
                "t2": tmp_path / "b/BraTS2021_00001_t2.nii.gz",
                "pd": tmp_path / "a/brats2021_00001_pd.nii.gz",
            },
        )
    ]
    assert found.ignored == [
        (
            tmp_path / "a/brats2021_00001_t1gd.nii.gz",
            "a second t1ce file for subject BraTS2021_00001 "
            f"(kept {tmp_path / 'b/BraTS2021_00001_t1ce.nii.gz'})",
        )
    ]


def test_symlinked_files_count_and_subject_folders_without_images_are_listed(tmp_path):
    """evaluate --subjects on a folder of links into a phantom (medgan's test does this)."""
    (subject,) = make_phantom(
        PhantomConfig(layout="brats", subjects=1, seed=3, shape=(24, 24, 16)), tmp_path / "src"
    )
    folder = tmp_path / "subjects"
    (folder / subject.subject).mkdir(parents=True)
    for path in subject.files.values():
        (folder / subject.subject / path.name).symlink_to(path)
    (folder / "BraTS2021_00001").mkdir()
    found = discover_nifti_subjects(folder, flag="--subjects")
    assert [(s.subject, s.files) for s in found.subjects] == [
        (subject.subject, {m: folder / subject.subject / p.name for m, p in subject.files.items()})
    ]
    assert found.ignored == [(folder / "BraTS2021_00001", "empty folder")]


def test_nifti_subjects_errors_name_the_folder(tmp_path):
    with pytest.raises(UserError, match=f"^--subjects {tmp_path}/absent: no such folder$"):
        discover_nifti_subjects(tmp_path / "absent", flag="--subjects")
    _touch(tmp_path, "file.nii.gz", "texts/notes.txt", "odd/scan_0001.nii.gz")
    with pytest.raises(UserError, match=f"^{tmp_path}/file.nii.gz: not a folder$"):
        discover_nifti_subjects(tmp_path / "file.nii.gz")
    with pytest.raises(
        UserError,
        match=f"^{tmp_path}/texts: no NIfTI file named like SUBJECT_CONTRAST.nii.gz found \\(none at all\\)$",
    ):
        discover_nifti_subjects(tmp_path / "texts")
    with pytest.raises(UserError) as error:
        discover_nifti_subjects(tmp_path / "odd", flag="--subjects")
    assert str(error.value) == (
        f"--subjects {tmp_path}/odd: no NIfTI file named like SUBJECT_CONTRAST.nii.gz found (first: "
        f"{tmp_path}/odd/scan_0001.nii.gz: no contrast name (t1 t1ce t2 flair pd seg, or an alias) as the "
        "last word of the name)"
    )
