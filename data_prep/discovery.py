"""Find the subjects in a BraTS or IXI download, whatever naming variant and folder nesting it uses.

Recognised file names (any case, `.nii` or `.nii.gz`, at any folder depth):

- BraTS 2017-2020: ``Brats18_CBICA_AAB_1_t1.nii.gz``, ``BraTS19_2013_10_1_flair.nii``,
  ``BraTS20_Training_001_t1ce.nii.gz``, ... with ``t1 t1ce t2 flair seg``
- BraTS 2021: ``BraTS2021_00000_t1ce.nii.gz``
- BraTS 2023-2025: ``BraTS-GLI-00000-000-t1n.nii.gz`` with ``t1n t1c t2w t2f seg`` and any cohort
  prefix (GLI, MEN, MET, PED, SSA, ...); ``-000``, ``-001`` are timepoints of one patient
- IXI: ``IXI002-Guys-0828-T1.nii.gz`` (usually in IXI-T1/, IXI-T2/, IXI-PD/); MRA and DTI are skipped

Modality names are normalised to lower case ``t1 t1ce t2 flair pd`` (t1n->t1, t1c->t1ce, t1gd->t1ce,
t2w->t2, t2f->flair) and ``seg`` for a segmentation. The names and aliases are `data_prep.modalities`' one
table (DESIGN.md: one owner per contract), re-exported here and by `data_prep.volumes` for medgan.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from data_prep.errors import UserError
from data_prep.manifest import MANIFEST_NAME, REPORT_NAME
from data_prep.modalities import (
    MODALITIES,
    MODALITY_ALIASES,
    SEGMENTATION,
    canonical_modality,
    normalise_modality,
)

__all__ = [
    "DATASET_MODALITIES",
    "MODALITIES",
    "MODALITY_ALIASES",
    "SEGMENTATION",
    "Discovery",
    "NameMatch",
    "SubjectFiles",
    "canonical_modality",
    "discover",
    "discover_nifti_subjects",
    "nifti_stem",
    "normalise_modality",
    "parse_name",
]

DATASET_MODALITIES: dict[str, tuple[str, ...]] = {
    "brats": ("t1", "t1ce", "t2", "flair"),
    "ixi": ("t1", "t2", "pd"),
}

_BRATS_2023 = re.compile(
    r"^(?P<patient>brats-[a-z]+(?:-[a-z]+)*-\d+)(?:-(?P<timepoint>\d+))?[-_](?P<modality>t1n|t1c|t2w|t2f|seg)$",
    re.IGNORECASE,
)
_BRATS_LEGACY = re.compile(r"^(?P<subject>brats\d*_.+)_(?P<modality>t1ce|t1|t2|flair|seg)$", re.IGNORECASE)
_IXI = re.compile(r"^(?P<subject>ixi\d+-[a-z]+-\d+)-(?P<modality>t1|t2|pd|mra|dti-\d+)$", re.IGNORECASE)
_IXI_UNUSED = ("mra", "dti")
_LOOSE_SEPARATOR = re.compile(r"[_\-.]")
_BRATS_2023_SUBJECT = re.compile(r"^(?P<patient>brats-[a-z]+(?:-[a-z]+)*-\d+)(?:-\d+)?$", re.IGNORECASE)
# Ends in a digit, as every legacy subject id does, so "BraTS2021_Training_Data/" is not one.
_BRATS_LEGACY_SUBJECT = re.compile(r"^brats\d+_\w*\d$", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class SubjectFiles:
    """One subject's files.

    subject: id as spelled in the file names. patient: the person (BraTS 2023+ timepoints share it).
    dataset: "brats" or "ixi"; None for a subject found only by `discover_nifti_subjects`' loose rule.
    files: modality (``t1 t1ce t2 flair pd`` or ``seg``) -> path. problem: why the subject cannot be
    used (e.g. duplicate files), or None.
    """

    subject: str
    patient: str
    dataset: str | None
    files: dict[str, Path]
    problem: str | None = None

    @property
    def modalities(self) -> list[str]:
        return [modality for modality in MODALITIES if modality in self.files]


@dataclass(slots=True)
class Discovery:
    """What a source folder holds: subjects sorted by id, and files left out with the reason why."""

    subjects: list[SubjectFiles] = field(default_factory=list)
    ignored: list[tuple[Path, str]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class NameMatch:
    """What a file name says: dataset ("brats" / "ixi", None under the loose rule), subject, patient and
    normalised modality."""

    dataset: str | None
    subject: str
    patient: str
    modality: str


def nifti_stem(path: Path) -> str | None:
    """The name without `.nii` / `.nii.gz` (any case), or None when it is not a NIfTI file name."""
    lower = path.name.lower()
    for suffix in (".nii.gz", ".nii"):
        if lower.endswith(suffix):
            return path.name[: -len(suffix)]
    return None


def parse_name(path: Path) -> NameMatch | None:
    """Read dataset, subject, patient and modality from a file name; None when it follows no convention."""
    stem = nifti_stem(path)
    if stem is None:
        return None
    if match := _BRATS_2023.match(stem):
        patient = match["patient"]
        subject = f"{patient}-{match['timepoint']}" if match["timepoint"] else patient
        modality = match["modality"].lower()
        return NameMatch("brats", subject, patient, MODALITY_ALIASES.get(modality, modality))
    if match := _BRATS_LEGACY.match(stem):
        return NameMatch("brats", match["subject"], match["subject"], match["modality"].lower())
    if match := _IXI.match(stem):
        return NameMatch("ixi", match["subject"], match["subject"], match["modality"].lower())
    return None


def _walk(source: Path) -> tuple[list[Path], list[Path]]:
    """(files, folders) under `source`, each sorted by path. Symbolic links to folders are listed as
    folders but not entered (pathlib's rglob does not follow them)."""
    entries = sorted(source.rglob("*"))
    return [p for p in entries if p.is_file()], [p for p in entries if p.is_dir()]


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _looks_like_brats_subject(name: str) -> str | None:
    """The patient id when a folder name is a BraTS subject id (``BraTS2021_00001``,
    ``BraTS-GLI-00001-000``, ``Brats18_CBICA_AAB_1``), else None."""
    if match := _BRATS_2023_SUBJECT.match(name):
        return match["patient"]
    return name if _BRATS_LEGACY_SUBJECT.match(name) else None


def _subject_folders_without_images(
    source: Path,
    files: list[Path],
    folders: list[Path],
    used: set[Path],
    recognised: set[Path],
    subject_ids: set[str],
) -> list[tuple[Path, str]]:
    """Folders under `source` that look like a subject's but hold no file whose name discovery could read
    (`recognised`: the files subjects were made of, `used`, and those left out for another reason, such
    as IXI files in a BraTS run or IXI MRA), each with the reason; sorted by path.

    A subject folder is a folder strictly below `source`, not hidden (``.name``), holding no sub-folder
    (a symbolic link to a folder counts, as it is never entered), that either

    - is named like a BraTS subject (``BraTS2021_00001``, ``BraTS-GLI-00001-000``, ``Brats18_..._1``), or
    - sits directly in a folder of subject folders: a folder with a sub-folder that directly holds one
      of the `used` files (``src/BraTS2021_00000/BraTS2021_00000_t1.nii.gz`` makes ``src`` one).

    A folder named like one of `subject_ids` (any case) is left out: that subject's files are elsewhere;
    so is one holding a recognised file (``IXI-T1/`` beside BraTS subjects: IXI files, not a lost subject)
    and an earlier `shard` output (holds manifest.json or report.json; --out may lie inside --src).
    Reasons: ``empty folder``, ``no NIfTI file (N other files)``, ``no usable NIfTI file (N NIfTI files,
    none with a name we recognise; see the ignored files)``, ``a symbolic link to a folder (not
    followed; ...)``.
    """
    by_folder: dict[Path, list[Path]] = {}
    for path in files:
        by_folder.setdefault(path.parent, []).append(path)
    holders = {path.parent for path in used}
    parents_of_folders = {folder.parent for folder in folders if not folder.is_symlink()}
    of_subject_folders = {holder.parent for holder in holders if holder != source}
    known = {subject.lower() for subject in subject_ids}
    found = []
    for folder in folders:
        if (
            folder in holders
            or folder in parents_of_folders
            or folder.name.startswith(".")
            or folder.name.lower() in known
            or not (_looks_like_brats_subject(folder.name) or folder.parent in of_subject_folders)
        ):
            continue
        if folder.is_symlink():
            found.append((folder, "a symbolic link to a folder (not followed; link the files instead)"))
            continue
        inside = by_folder.get(folder, [])
        if any(path in recognised or path.name in (MANIFEST_NAME, REPORT_NAME) for path in inside):
            continue
        nifti = [path for path in inside if nifti_stem(path) is not None]
        if not inside:
            found.append((folder, "empty folder"))
        elif not nifti:
            found.append((folder, f"no NIfTI file ({_plural(len(inside), 'other file')})"))
        else:
            unknown = _plural(len(nifti), "NIfTI file")
            reason = f"no usable NIfTI file ({unknown}, none with a name we recognise; see the ignored files)"
            found.append((folder, reason))
    return found


def discover(source: Path, dataset: str) -> Discovery:
    """All `dataset` ("brats" or "ixi") subjects under `source`, searched recursively.

    Raises UserError when the folder is missing, holds no NIfTI file, or no file is named like a
    `dataset` subject. Subjects with two files for one modality come back with `problem` set.
    For "brats", each subject folder without usable images (`_subject_folders_without_images`) comes back
    as a subject with no files, named after its folder, with `problem` saying why (so `shard` reports it
    as failed instead of losing it). IXI keeps one folder per contrast (``IXI-T1/``), not per subject.
    """
    source = Path(source)
    if not source.exists():
        raise UserError(f"--src {source}: no such folder")
    if not source.is_dir():
        raise UserError(f"--src {source}: not a folder")
    found = Discovery()
    by_subject: dict[str, dict[str, list[Path]]] = {}
    names: dict[str, tuple[str, str]] = {}
    nifti_count = other_count = 0
    every_file, folders = _walk(source)
    for path in every_file:
        if nifti_stem(path) is None:
            other_count += 1
            continue
        nifti_count += 1
        match = parse_name(path)
        if match is None:
            found.ignored.append((path, "unknown file name (not a BraTS or IXI naming convention)"))
        elif match.dataset != dataset:
            found.ignored.append((path, f"named like {match.dataset.upper()}, but --format is {dataset}"))
        elif match.modality.startswith(_IXI_UNUSED):
            found.ignored.append((path, f"IXI {match.modality.upper()} is not an anatomical contrast we use"))
        else:
            # Case-insensitive grouping: one download may mix "_T1.nii" and "_flair.nii.gz".
            key = match.subject.lower()
            names.setdefault(key, (match.subject, match.patient))
            by_subject.setdefault(key, {}).setdefault(match.modality, []).append(path)
    if nifti_count == 0:
        raise UserError(f"--src {source}: no NIfTI files (.nii or .nii.gz) found ({other_count} other files)")
    if not by_subject:
        example = found.ignored[0][0]
        raise UserError(
            f"--src {source}: none of the {nifti_count} NIfTI files is named like a {dataset} subject "
            f"(first: {example.relative_to(source)}; see docs/data.md for the names we recognise)"
        )
    for key in sorted(by_subject):
        subject, patient = names[key]
        paths = by_subject[key]
        duplicates = {modality: files for modality, files in paths.items() if len(files) > 1}
        problem = None
        if duplicates:
            modality, files = next(iter(duplicates.items()))
            listed = ", ".join(str(path) for path in files)
            problem = f"duplicate subject id: {len(files)} {modality} files ({listed})"
        files = {modality: files[0] for modality, files in paths.items()}
        found.subjects.append(SubjectFiles(subject, patient, dataset, files, problem))
    if dataset == "brats":
        used = {path for modalities in by_subject.values() for paths in modalities.values() for path in paths}
        subject_ids = {subject for subject, _ in names.values()}
        recognised = {path for path in every_file if parse_name(path) is not None}
        lacking = _subject_folders_without_images(source, every_file, folders, used, recognised, subject_ids)
        for folder, reason in lacking:
            patient = _looks_like_brats_subject(folder.name) or folder.name
            found.subjects.append(SubjectFiles(folder.name, patient, dataset, {}, f"{folder}: {reason}"))
        # Stable: the subjects with files keep their order (it is the order shards are written in).
        found.subjects.sort(key=lambda subject: subject.subject.lower())
    return found


def _loose_name(path: Path, stem: str) -> NameMatch | None:
    """The loose rule: the contrast is the last ``_``/``-``/``.``-separated word of the name (through
    `canonical_modality`), the rest is the subject (the parent folder's name when nothing is left) and
    its own patient; None when that word is no contrast nor ``seg``."""
    last = _LOOSE_SEPARATOR.split(stem)[-1]
    modality = canonical_modality(last)
    if modality not in (*MODALITIES, SEGMENTATION):
        return None
    subject = stem[: -len(last)].rstrip("_-.") or path.parent.name
    return NameMatch(None, subject, subject, modality)


def discover_nifti_subjects(folder: str | Path, *, flag: str | None = None) -> Discovery:
    """The subjects in a folder of NIfTI files (searched recursively) that need not be a whole BraTS or
    IXI download: what ``medgan synthesize --subjects`` and ``evaluate --subjects`` read.

    Names: a file named by a BraTS or IXI convention (`parse_name`) is read exactly as `shard` reads it
    (subject id, patient, dataset "brats"/"ixi"). Any other NIfTI file is read loosely: its contrast is
    the last ``_``/``-``/``.``-separated word of its name (``sub01_T1gd.nii.gz`` -> t1ce), the rest of
    the name is the subject, or the parent folder's name when nothing is left (``sub01/t2.nii.gz``); its
    patient is the subject and its dataset None. Files are grouped by subject id ignoring case, so a
    loosely named file joins a subject named by a convention and takes its spelling, patient and dataset.

    `ignored` (sorted by path), each with the reason: a NIfTI file whose last word is no contrast nor
    ``seg``; IXI MRA and DTI; a second file for one subject and contrast (a file named by a convention
    is kept over a loosely named one, else the first by path); and subject folders without usable
    images, by the rule `shard` applies to BraTS (see `_subject_folders_without_images`). Files that are
    not NIfTI are skipped without a word. Subjects come sorted by id ignoring case, files in the order
    ``t1 t1ce t2 flair pd seg``, `problem` None.

    flag: the command-line option that named `folder` (e.g. "--subjects"), to start error messages with.
    Raises UserError naming the folder when it is missing, is not a folder, or holds no usable NIfTI file.
    """
    folder = Path(folder)
    where = f"{flag} {folder}" if flag else str(folder)
    if not folder.exists():
        raise UserError(f"{where}: no such folder")
    if not folder.is_dir():
        raise UserError(f"{where}: not a folder")
    every_file, folders = _walk(folder)
    ignored: list[tuple[Path, str]] = []
    named: list[tuple[Path, NameMatch, bool]] = []
    recognised: set[Path] = set()
    for path in every_file:
        stem = nifti_stem(path)
        if stem is None:
            continue
        match = parse_name(path)
        if match is not None:
            recognised.add(path)
        if match is not None and match.modality.startswith(_IXI_UNUSED):
            ignored.append((path, f"IXI {match.modality.upper()} is not an anatomical contrast we use"))
            continue
        by_convention = match is not None
        match = match or _loose_name(path, stem)
        if match is None:
            contrasts = " ".join((*MODALITIES, SEGMENTATION))
            ignored.append(
                (path, f"no contrast name ({contrasts}, or an alias) as the last word of the name")
            )
            continue
        named.append((path, match, by_convention))
        recognised.add(path)
    # Convention-named files first (a stable sort keeps path order within each kind): they set a subject's
    # spelling, patient and dataset, and win a contrast over a loosely named file.
    named.sort(key=lambda item: not item[2])
    groups: dict[str, tuple[NameMatch, dict[str, Path]]] = {}
    for path, match, _ in named:
        first, files = groups.setdefault(match.subject.lower(), (match, {}))
        if match.modality in files:
            kept = files[match.modality]
            ignored.append(
                (path, f"a second {match.modality} file for subject {first.subject} (kept {kept})")
            )
        else:
            files[match.modality] = path
    found = Discovery(ignored=ignored)
    for key in sorted(groups):
        first, files = groups[key]
        ordered = {m: files[m] for m in (*MODALITIES, SEGMENTATION) if m in files}
        found.subjects.append(SubjectFiles(first.subject, first.patient, first.dataset, ordered))
    if not found.subjects:
        detail = f"first: {ignored[0][0]}: {ignored[0][1]}" if ignored else "none at all"
        raise UserError(f"{where}: no NIfTI file named like SUBJECT_CONTRAST.nii.gz found ({detail})")
    used = {path for subject in found.subjects for path in subject.files.values()}
    subject_ids = {subject.subject for subject in found.subjects}
    lacking = _subject_folders_without_images(folder, every_file, folders, used, recognised, subject_ids)
    found.ignored.extend(lacking)
    found.ignored.sort(key=lambda item: item[0])
    return found
