"""`python -m data_prep shard`: a BraTS or IXI folder into webdataset shards, manifest.json, report.json.

Subjects are prepared by `data_prep.volumes.prepare_subject` (in `--workers` processes) and written in
subject order by the main process (`data_prep.tar_shards`: webdataset ShardWriter's bytes, hashed as
they are written), so the output does not depend on the worker count. Everything goes into a hidden
temporary folder beside `--out`; `manifest.json` is written last and the folder is renamed into place
only when complete, so an interrupted run never leaves something that looks finished.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data_prep.discovery import DATASET_MODALITIES, SubjectFiles, discover, normalise_modality
from data_prep.errors import UserError
from data_prep.manifest import (
    FORMAT_VERSION,
    LAYOUT_VERSION,
    MANIFEST_NAME,
    MAX_SHARD_BYTES,
    REPORT_NAME,
    SAMPLES_PER_SHARD,
    SHARD_PATTERN,
    sample_key,
    write_json,
)
from data_prep.parallel import ordered_map
from data_prep.splits import (
    SPLIT_FILE_NAME,
    SPLITS,
    check_fractions,
    check_patients_disjoint,
    read_split_file,
    split_by_patient,
    write_split_file,
)
from data_prep.tar_shards import ShardSeries
from data_prep.volumes import (
    MIN_SLICE_BRAIN_SHARE,
    SEG_LABELS,
    VolumeError,
    normalisation_method,
    prepare_subject,
)

EXIT_SUBJECTS_FAILED = 1
_CONSOLE_LINES_PER_KIND = 20


@dataclass(kw_only=True, slots=True)
class ShardConfig:
    """What `python -m data_prep shard` does; checked on creation (UserError names the bad value).

    dataset: "brats" or "ixi". size: in-plane pixels of every slice (crop or pad), >= 16.
    split_fractions: (train, val, test) summing to 1, used unless split_file is given.
    modalities: channel order (default: the dataset's); required: subjects lacking one of these fail.
    """

    dataset: str
    source: Path
    out: Path
    size: int = 256
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    split_file: Path | None = None
    seed: int = 0
    workers: int = 1
    strict: bool = False
    modalities: tuple[str, ...] | None = None
    required: tuple[str, ...] = ()

    def __post_init__(self):
        if self.dataset not in DATASET_MODALITIES:
            raise UserError(f"--format {self.dataset!r}: expected one of {', '.join(DATASET_MODALITIES)}")
        available = DATASET_MODALITIES[self.dataset]
        self.source, self.out = Path(self.source), Path(self.out)
        if self.size < 16:
            raise UserError(f"--size {self.size}: expected at least 16 pixels")
        if self.workers < 1:
            raise UserError(f"--workers {self.workers}: expected at least 1")
        if self.split_file is None:
            self.split_fractions = check_fractions(self.split_fractions)
        modalities = tuple(normalise_modality(m) for m in (self.modalities or available))
        for modality in modalities:
            if modality not in available:
                raise UserError(f"--modalities {modality}: {self.dataset} has only {' '.join(available)}")
        if len(set(modalities)) != len(modalities):
            raise UserError(f"--modalities {' '.join(modalities)}: a modality is listed twice")
        self.modalities = modalities
        self.required = tuple(normalise_modality(m) for m in self.required)
        for modality in self.required:
            if modality not in modalities:
                raise UserError(f"--require {modality}: not among --modalities {' '.join(modalities)}")


@dataclass(slots=True)
class SubjectOutcome:
    """One subject's line in report.json (and, when ok, its entry in the manifest)."""

    subject: SubjectFiles
    split: str | None
    reason: str | None = None
    repairs: list[str] = field(default_factory=list)
    manifest_entry: dict | None = None
    traceback: str | None = None

    def report_entry(self, modalities) -> dict:
        entry = {
            "subject": self.subject.subject,
            "patient": self.subject.patient,
            "status": "failed" if self.reason else "ok",
            "reason": self.reason,
            "split": self.split,
            "files": {modality: str(path) for modality, path in self.subject.files.items()},
            "missing_modalities": [m for m in modalities if m not in self.subject.files],
            "repairs": self.repairs,
            "samples": self.manifest_entry["samples"] if self.manifest_entry else 0,
        }
        if self.manifest_entry:
            # How much of each contrast the normalisation's ceiling cut (a bright lesion, or an odd file).
            entry["clipped_fraction"] = {
                modality: scaling["clipped_fraction"]
                for modality, scaling in self.manifest_entry["normalisation"].items()
            }
        if self.traceback:
            entry["traceback"] = self.traceback
        return entry


@dataclass(frozen=True, slots=True)
class _SubjectTask:
    """One subject for a worker. handoff: a file stem under which a worker process leaves the arrays (None
    when preparing in the writing process itself)."""

    subject: SubjectFiles
    dataset: str
    modalities: tuple[str, ...]
    size: int
    seed: int
    handoff: Path | None


def _prepare_in_worker(task: _SubjectTask):
    """Prepare one subject; returns (arrays or None, manifest fields or failure). In a worker process the
    arrays are left in `task.handoff` files and the paths returned (see `_hand_off`)."""
    try:
        prepared = prepare_subject(
            task.subject.files,
            dataset=task.dataset,
            modalities=task.modalities,
            size=task.size,
            seed=task.seed,
            dtype=np.float16,
        )
    except VolumeError as error:
        return None, {"reason": str(error)}
    except Exception as error:  # noqa: BLE001 - one odd file must not stop a thousand-subject run
        return None, {
            "reason": f"unexpected {type(error).__name__}: {error} (a bug? the traceback is in report.json)",
            "traceback": traceback.format_exc(),
        }
    arrays = {
        "images": prepared.images,
        "mask": prepared.mask,
        "seg": prepared.seg,
    }
    fields = {
        "present": prepared.present,
        "geometry": prepared.geometry.to_dict(),
        "scaling": {m: s.to_dict() for m, s in prepared.scaling.items()},
        "repairs": prepared.repairs,
    }
    return (_hand_off(arrays, task.handoff) if task.handoff else arrays), fields


def _hand_off(arrays: dict, stem: Path) -> dict:
    """Save a worker's arrays as .npy files beside `stem` and return their paths in place of the arrays.

    A full-size subject is about 85 MB: pickled through the pool's pipe it cost about 0.3 s of CPU on
    each side, and the writing process is the one that cannot be parallelised. A file in a local
    temporary folder is written once and memory-mapped by the reader. If it cannot be written (a full
    disk), the arrays go through the pipe as before.
    """
    paths = {}
    try:
        for name, array in arrays.items():
            if array is not None:
                paths[name] = stem.with_name(f"{stem.name}.{name}.npy")
                np.save(paths[name], array, allow_pickle=False)
    except OSError:
        for path in paths.values():
            path.unlink(missing_ok=True)
        return arrays
    return {name: paths.get(name) for name in arrays}


def _take_over(arrays: dict) -> dict:
    """The writer's side of `_hand_off`: memory-map handed-off files (and remove them; the map stays)."""
    taken = {}
    for name, value in arrays.items():
        if isinstance(value, Path):
            taken[name] = np.load(value, mmap_mode="r", allow_pickle=False)
            value.unlink()
        else:
            taken[name] = value
    return taken


class _SplitWriters:
    """One shard series per split, opened on first use (no empty shard for an empty split)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.series: dict[str, ShardSeries] = {}

    def write(self, split: str, sample: dict, may_start_shard: bool = True) -> None:
        if split not in self.series:
            # The folder's own "%" (a user's --out name) must not be read as the shard number's format.
            pattern = str(self.folder).replace("%", "%%") + os.sep + SHARD_PATTERN.format(split=split)
            self.series[split] = ShardSeries(
                pattern, max_samples=SAMPLES_PER_SHARD, max_bytes=MAX_SHARD_BYTES
            )
        self.series[split].write(sample, may_start_shard)

    def close(self) -> dict:
        """Finish every shard; per split, the manifest's list of shards (file, samples, sha256, bytes)."""
        return {
            split: [shard.to_dict() for shard in self.series[split].close()] if split in self.series else []
            for split in SPLITS
        }

    def abandon(self) -> None:
        for series in self.series.values():
            series.abandon()


def _check_output_folder(config: ShardConfig) -> None:
    source, out = config.source.resolve(), config.out.resolve()
    if out == source:
        raise UserError(f"--out {config.out}: is the source folder; choose a new folder for the shards")
    if source.is_relative_to(out):
        raise UserError(
            f"--out {config.out}: contains the source folder {config.source}; choose another folder"
        )
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {config.out}: exists and is not a folder")
    if (
        out.is_dir()
        and any(out.iterdir())
        and not (out / MANIFEST_NAME).exists()
        and not (out / REPORT_NAME).exists()
    ):
        raise UserError(
            f"--out {config.out}: exists, is not empty and is not a data_prep output; choose a new folder"
        )
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"--out {config.out}: cannot create its parent folder ({error.strerror})") from None
    if not os.access(out.parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise UserError(f"--out {config.out}: not writable")


def _say(line: str) -> None:
    tqdm.write(line, file=sys.stderr)


def _assign_splits(config: ShardConfig, subjects: list[SubjectFiles]):
    """(subject -> split, subjects in the split file that were not found)."""
    patients = {s.subject: s.patient for s in subjects}
    if config.split_file is None:
        return split_by_patient(patients, config.split_fractions, config.seed), []
    listed = read_split_file(config.split_file)
    by_lower = {subject.lower(): split for subject, split in listed.items()}
    assignment = {}
    for subject in patients:
        split = listed.get(subject, by_lower.get(subject.lower()))
        if split is not None:
            assignment[subject] = split
    check_patients_disjoint(assignment, patients)
    found = {s.lower() for s in patients}
    return assignment, sorted(s for s in listed if s.lower() not in found)


def _initial_problem(config: ShardConfig, subject: SubjectFiles, split: str | None) -> str | None:
    if subject.problem:
        return subject.problem
    if split is None:
        return f"not listed in --split-file {config.split_file}"
    missing = [m for m in config.required if m not in subject.files]
    if missing:
        return f"missing required modality {' '.join(missing)} (--require)"
    if not any(m in subject.files for m in config.modalities):
        return f"no image among the modalities {' '.join(config.modalities)}"
    return None


def _samples(config: ShardConfig, subject: SubjectFiles, split: str, arrays: dict, fields: dict):
    first_slice = fields["geometry"]["crop_box"]["z"][0]
    for index in range(arrays["images"].shape[1]):
        slice_index = first_slice + index
        sample = {
            "__key__": sample_key(subject.subject, slice_index),
            "json": {
                "subject": subject.subject,
                "patient": subject.patient,
                "dataset": config.dataset,
                "split": split,
                "slice": slice_index,
                "modalities": list(config.modalities),
                "present": fields["present"],
                "has_seg": arrays["seg"] is not None,
            },
            "img.npy": np.ascontiguousarray(arrays["images"][:, index]),
            "mask.npy": np.ascontiguousarray(arrays["mask"][index]),
        }
        if arrays["seg"] is not None:
            sample["seg.npy"] = np.ascontiguousarray(arrays["seg"][index])
        yield sample


def _report(config: ShardConfig, outcomes, ignored, not_found) -> dict:
    ok = sum(outcome.reason is None for outcome in outcomes)
    return {
        "format_version": FORMAT_VERSION,
        "dataset": config.dataset,
        "source": str(config.source),
        "modalities": list(config.modalities),
        "summary": {
            "subjects_found": len(outcomes),
            "ok": ok,
            "failed": len(outcomes) - ok,
            "ignored_files": len(ignored),
            "repaired_subjects": sum(bool(outcome.repairs) for outcome in outcomes),
        },
        "subjects": [outcome.report_entry(config.modalities) for outcome in outcomes],
        "ignored_files": [{"file": str(path), "reason": reason} for path, reason in ignored],
        "split_file_subjects_not_found": not_found,
    }


def _manifest(config: ShardConfig, outcomes, shards: dict) -> dict:
    entries = {o.subject.subject: o.manifest_entry for o in outcomes if o.reason is None}
    return {
        "format_version": FORMAT_VERSION,
        "layout_version": LAYOUT_VERSION,
        "created_by": "python -m data_prep shard",
        "dataset": config.dataset,
        "source": str(config.source),
        "modalities": list(config.modalities),
        "in_plane_size": [config.size, config.size],
        "sample": {
            "img.npy": "float16 [M, H, W] in [0, 1], modalities in manifest order, absent ones all zero",
            "mask.npy": "uint8 [H, W], 1 inside the brain (BraTS) or head (IXI) mask",
            "seg.npy": "uint8 [H, W], BraTS 2021 labels, only when the subject has a segmentation",
            "axes": "H = canonical x (towards Right), W = canonical y (towards Anterior), one axial z slice",
        },
        "seg_labels": {str(label): name for label, name in SEG_LABELS.items()},
        "slice_selection": {
            "axis": "axial (canonical RAS z)",
            "min_brain_share_of_largest_slice": MIN_SLICE_BRAIN_SHARE,
        },
        "normalisation": {
            **normalisation_method(),
            "within": "brain mask (BraTS: nonzero) or head mask (IXI: Otsu)",
            "outside_mask": 0.0,
            "formula": (
                "low = 0, high = ceiling_multiple * median (median of the voxels within the mask); "
                "clip((x - low) / (high - low), 0, 1): median -> reference_level; "
                "inverse x = low + y * (high - low)"
            ),
            "clipped": "clipped_fraction: share of the voxels within the mask above high (set to 1)",
            "parameters": {subject: entry["normalisation"] for subject, entry in entries.items()},
        },
        "split": {
            "seed": config.seed,
            "fractions": None if config.split_file else list(config.split_fractions),
            "from_file": str(config.split_file) if config.split_file else None,
            "written_to": SPLIT_FILE_NAME,
        },
        "subjects": entries,
        "splits": {
            split: {
                "subjects": sorted(s for s, entry in entries.items() if entry["split"] == split),
                "samples": sum(shard["samples"] for shard in shards[split]),
                "shards": shards[split],
            }
            for split in SPLITS
        },
    }


def _print_ignored(ignored) -> None:
    for path, reason in ignored[:_CONSOLE_LINES_PER_KIND]:
        _say(f"ignored {path}: {reason}")
    if len(ignored) > _CONSOLE_LINES_PER_KIND:
        _say(f"... and {len(ignored) - _CONSOLE_LINES_PER_KIND} more ignored files (see {REPORT_NAME})")


def _prepared_results(config: ShardConfig, subjects: list[SubjectFiles]):
    """Yield (arrays or None, fields) per subject in order (`--workers` processes, at most 2 subjects each
    in flight, arrays handed over through files in a local temporary folder)."""
    workers = min(config.workers, max(len(subjects), 1))
    with contextlib.ExitStack() as stack:
        handoff = None
        if workers > 1:
            handoff = stack.enter_context(tempfile.TemporaryDirectory(prefix="data_prep-handoff-"))
        tasks = [
            _SubjectTask(
                subject=subject,
                dataset=config.dataset,
                modalities=config.modalities,
                size=config.size,
                seed=config.seed,
                handoff=Path(handoff) / f"{index:06d}" if handoff else None,
            )
            for index, subject in enumerate(subjects)
        ]
        for arrays, fields in ordered_map(
            _prepare_in_worker, tasks, workers, describe=lambda task: task.subject.subject
        ):
            yield (None if arrays is None else _take_over(arrays)), fields


def _move_into_place(staging: Path, out: Path) -> None:
    """Replace `out` (absent, empty, or an earlier data_prep output) with `staging` by renaming."""
    if out.exists():
        retired = out.with_name(f".{out.name}.replaced-{os.getpid()}")
        out.rename(retired)
        staging.rename(out)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        staging.rename(out)


def _write_report_only(config: ShardConfig, report: dict) -> None:
    """On a failed run: leave only report.json in --out (no shards, no manifest)."""
    if config.out.exists():
        shutil.rmtree(config.out)
    config.out.mkdir(parents=True)
    write_json(config.out / REPORT_NAME, report)


def shard_dataset(config: ShardConfig) -> int:
    """Run the whole shard command; returns the exit status (0, or 1 when --strict and a subject failed).

    Raises UserError for problems that stop the run before any subject is prepared.
    """
    _check_output_folder(config)
    found = discover(config.source, config.dataset)
    _print_ignored(found.ignored)
    outcomes, not_found = _subject_outcomes(config, found.subjects)
    out = config.out.resolve()
    with _staging(out) as (staging, writers):
        _shard_subjects(config, outcomes, writers)
        shards = writers.close()
        failed = [o for o in outcomes if o.reason is not None]
        _print_failed(failed)
        report = _report(config, outcomes, found.ignored, not_found)
        if _failures_stop_the_run(config, report, failed, len(outcomes)):
            return EXIT_SUBJECTS_FAILED
        manifest = _write_outputs(config, staging, outcomes, report, shards)
        _move_into_place(staging, out)
    counts = ", ".join(f"{split} {manifest['splits'][split]['samples']}" for split in SPLITS)
    print(
        f"wrote {len(outcomes) - len(failed)} subjects ({counts} slices) to {config.out}"
        + (f"; {len(failed)} failed (see {REPORT_NAME})" if failed else "")
    )
    return 0


def _subject_outcomes(config: ShardConfig, subjects: list[SubjectFiles]):
    """(one SubjectOutcome per discovered subject, in order, with its split and the problem that rules it
    out before preparing, if any; the subjects --split-file lists that are not in --src)."""
    # A subject folder without images (a subject with no files) takes no part in the split: the other
    # subjects' splits are the same as without that folder.
    assignment, not_found = _assign_splits(config, [s for s in subjects if s.files])
    for subject in not_found[:_CONSOLE_LINES_PER_KIND]:
        _say(f"--split-file lists {subject}, which is not in --src")
    outcomes = [SubjectOutcome(subject=s, split=assignment.get(s.subject)) for s in subjects]
    for outcome in outcomes:
        outcome.reason = _initial_problem(config, outcome.subject, outcome.split)
    return outcomes, not_found


@contextlib.contextmanager
def _staging(out: Path):
    """Yield (a fresh hidden folder beside `out`, its per-split shard writers); on leaving, by return or
    error, unfinished shards and whatever is still in the folder are removed."""
    staging = out.with_name(f".{out.name}.incomplete-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    writers = _SplitWriters(staging)
    try:
        yield staging, writers
    finally:
        writers.abandon()
        shutil.rmtree(staging, ignore_errors=True)


def _shard_subjects(config: ShardConfig, outcomes: list[SubjectOutcome], writers: _SplitWriters) -> None:
    """Prepare the subjects with no problem yet (`--workers` processes) and write their slices in subject
    order; each outcome gets its failure (reason, traceback) or its repairs and manifest entry."""
    runnable = [o for o in outcomes if o.reason is None]
    bar = tqdm(total=len(outcomes), desc="shard", unit="subject", disable=None)
    bar.update(len(outcomes) - len(runnable))
    # closing(): the worker pool and its hand-off folder go as soon as the last subject is written
    # (or the run fails), not whenever the generator happens to be collected.
    subjects = [outcome.subject for outcome in runnable]
    with contextlib.closing(_prepared_results(config, subjects)) as results:
        for outcome, (arrays, fields) in zip(runnable, results):
            bar.update(1)
            if arrays is None:
                outcome.reason = fields["reason"]
                outcome.traceback = fields.get("traceback")
                continue
            outcome.repairs = fields["repairs"]
            # a new tar file starts only with a subject's first slice (LAYOUT_VERSION 2)
            for index, sample in enumerate(_samples(config, outcome.subject, outcome.split, arrays, fields)):
                writers.write(outcome.split, sample, may_start_shard=index == 0)
            outcome.manifest_entry = _manifest_entry(outcome, arrays, fields)
    bar.close()


def _manifest_entry(outcome: SubjectOutcome, arrays: dict, fields: dict) -> dict:
    """A prepared subject's entry in manifest.json: where its slices came from and how to put them back.
    arrays: images [M, Z, H, W], mask [Z, H, W], seg [Z, H, W] or None; fields: `_prepare_in_worker`'s."""
    geometry = fields["geometry"]
    return {
        "patient": outcome.subject.patient,
        "split": outcome.split,
        "modalities_present": fields["present"],
        "has_seg": arrays["seg"] is not None,
        "slice_range": geometry["crop_box"]["z"],
        "samples": int(arrays["images"].shape[1]),
        "original_shape": geometry["reorientation"]["original_shape"],
        "affine": geometry["reorientation"]["original_affine"],
        "geometry": geometry,
        "normalisation": fields["scaling"],
        "files": {m: str(p) for m, p in outcome.subject.files.items()},
    }


def _print_failed(failed: list[SubjectOutcome]) -> None:
    for outcome in failed[:_CONSOLE_LINES_PER_KIND]:
        _say(f"{outcome.subject.subject}: failed: {outcome.reason}")
    if len(failed) > _CONSOLE_LINES_PER_KIND:
        _say(f"... and {len(failed) - _CONSOLE_LINES_PER_KIND} more failed subjects (see {REPORT_NAME})")


def _failures_stop_the_run(config: ShardConfig, report: dict, failed: list, total: int) -> bool:
    """Whether failed subjects stop the run before any shard reaches --out: then only report.json is left
    there. Raises UserError when every subject failed; True when any did and --strict is set."""
    if len(failed) == total:
        _write_report_only(config, report)
        raise UserError(
            f"no subject could be prepared ({len(failed)} failed; reasons in {config.out / REPORT_NAME})"
        )
    if failed and config.strict:
        _write_report_only(config, report)
        _say(f"{len(failed)} of {total} subjects failed and --strict is set: no shards written")
        return True
    return False


def _write_outputs(config: ShardConfig, staging: Path, outcomes: list, report: dict, shards: dict) -> dict:
    """Write report.json, the split file and, last, manifest.json into `staging`; returns the manifest."""
    write_json(staging / REPORT_NAME, report)
    write_split_file(staging / SPLIT_FILE_NAME, {o.subject.subject: o.split for o in outcomes if o.split})
    manifest = _manifest(config, outcomes, shards)
    write_json(staging / MANIFEST_NAME, manifest)
    return manifest
