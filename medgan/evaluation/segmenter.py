"""Downstream-segmentation score: how much a synthesized contrast costs a tumour segmenter.

The user's segmenter (any command line, ``"CMD {input} {output}"``) runs twice on a folder of subjects in
the BraTS 2023 layout: once on the four real contrasts, once with the target contrast replaced by the
synthesized volume. Each run's segmentation is scored against the reference segmentation per tumour
region, and the difference between the runs is the drop that synthesis causes.

Folder layout (what the segmenter reads and writes, as BraTS 2023 segmenters do)
    ``{input}/<id>/<id>-t1n.nii.gz``, ``-t1c``, ``-t2w``, ``-t2f``  (T1, T1ce, T2, FLAIR)
    ``{output}/<id>.nii.gz``  one label map per subject, on the grid of its input volumes

The label maps it writes are scored by ``medgan.evaluation.segmentation_metrics`` (Dice, HD95, BraTS
regions and label conventions).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError

from data_prep.volumes import canonical_modality, load_volume, same_grid
from medgan.evaluation.segmentation_metrics import (
    HD95_MAX_PENALTY_MM,
    LABEL_CONVENTIONS,
    SegmentationScore,
    SegmenterError,
    resolve_label_convention,
    score_segmentations,
    summarize_segmentation,
)

# Canonical contrast -> the BraTS 2023 file suffix a segmenter reads.
BRATS2023_SUFFIXES = {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f"}
INPUT_PLACEHOLDER, OUTPUT_PLACEHOLDER = "{input}", "{output}"
DEFAULT_TIMEOUT_S = 4 * 3600.0
# Run folders inside score_with_segmenter's work_dir, one per segmenter call.
REAL, SYNTHESIZED = "real", "synthesized"

Volume = str | os.PathLike | nib.Nifti1Image


def write_brats2023_folder(subjects: Mapping[str, Mapping[str, Volume]], out_dir: str | Path) -> Path:
    """Write ``out_dir/<id>/<id>-{t1n,t1c,t2w,t2f}.nii.gz`` for each subject; returns ``out_dir``.

    subjects: id -> contrast -> a NIfTI path or a ``nibabel.Nifti1Image``; contrast names are canonical
    (``t1 t1ce t2 flair``) or BraTS 2023 (``t1n t1c t2w t2f``), and each subject needs all four, on one
    grid (same shape, affines within 1e-3 mm). A ``.nii.gz`` file is copied, never linked: a segmenter
    that rewrites its inputs in place must not reach the user's files, and one in a container does not
    see a symlink's target outside the mounted folder; other files and images are written as ``.nii.gz``.
    Subject ids must be plain file names. Raises SegmenterError naming the subject and contrast or file on
    any problem.
    """
    out_dir = Path(out_dir)
    for subject, contrasts in subjects.items():
        _check_subject_id(subject)
        by_name = {canonical_modality(name): volume for name, volume in contrasts.items()}
        missing = [name for name in BRATS2023_SUFFIXES if name not in by_name]
        if missing:
            raise SegmenterError(
                f"subject {subject}: no {', '.join(missing)} for the segmenter (it needs t1 t1ce t2 flair)"
            )
        folder = out_dir / subject
        folder.mkdir(parents=True, exist_ok=True)
        grid = None
        for name, suffix in BRATS2023_SUFFIXES.items():
            volume = by_name[name]
            this_grid = _grid_of(volume, subject, name)
            if grid is None:
                grid = this_grid
            elif not same_grid(*grid, *this_grid):
                raise SegmenterError(
                    f"subject {subject}: {name} ({_describe(volume)}) has shape {this_grid[0]} and affine "
                    f"unlike the t1's {grid[0]}: the segmenter needs the four contrasts on one grid"
                )
            _place(volume, folder / f"{subject}-{suffix}.nii.gz")
    return out_dir


def _check_subject_id(subject: str) -> None:
    if not subject or subject in (".", "..") or "/" in subject or os.sep in subject or "\0" in subject:
        raise SegmenterError(f"subject id {subject!r} cannot name a folder for the segmenter")


def _describe(volume: Volume) -> str:
    return "an image in memory" if isinstance(volume, nib.Nifti1Image) else str(volume)


def _grid_of(volume: Volume, subject: str, name: str) -> tuple[tuple[int, ...], np.ndarray]:
    """(shape, affine) of a path or image, reading only the header of a file."""
    if not isinstance(volume, nib.Nifti1Image):
        try:
            volume = nib.load(volume)
        except (ImageFileError, OSError, ValueError) as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise SegmenterError(
                f"subject {subject}: {name} {volume}: not a readable NIfTI ({reason})"
            ) from None
    return tuple(int(size) for size in volume.shape), np.asarray(volume.affine, dtype=np.float64)


def _place(volume: Volume, destination: Path) -> None:
    destination.unlink(missing_ok=True)
    if isinstance(volume, nib.Nifti1Image):
        nib.save(volume, destination)
        return
    source = Path(volume)
    if source.name.endswith(".nii.gz"):
        shutil.copyfile(source, destination)
        return
    nib.save(nib.load(source), destination)


def format_segmenter_command(command_template: str, input_dir: str | Path, output_dir: str | Path) -> str:
    """The shell command: ``command_template`` with ``{input}`` and ``{output}`` replaced by the
    shell-quoted folders (so do not quote the placeholders in the template). Other braces are left as
    they are. Raises SegmenterError when the template lacks either placeholder."""
    for placeholder in (INPUT_PLACEHOLDER, OUTPUT_PLACEHOLDER):
        if placeholder not in command_template:
            raise SegmenterError(
                f'--segmenter {command_template!r}: no {placeholder} (expected "CMD {{input}} {{output}}")'
            )
    command = command_template.replace(INPUT_PLACEHOLDER, shlex.quote(str(input_dir)))
    return command.replace(OUTPUT_PLACEHOLDER, shlex.quote(str(output_dir)))


def run_segmenter(
    command_template: str,
    input_dir: str | Path,
    output_dir: str | Path,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> str:
    """Run the user's segmenter once on ``input_dir``, writing into ``output_dir`` (created); returns the
    command it ran.

    The command (`format_segmenter_command`) runs through ``/bin/sh`` in its own process group, with no
    stdin; its stdout and stderr go to ``<output_dir>.stdout.log`` and ``<output_dir>.stderr.log``
    beside ``output_dir``. Raises SegmenterError in one line naming the command: its exit status and the
    last line of its stderr when it fails; the timeout (s) when it runs longer (the whole group is killed).
    """
    output_dir = Path(output_dir)
    command = format_segmenter_command(command_template, input_dir, output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    stdout_log = output_dir.with_name(f"{output_dir.name}.stdout.log")
    stderr_log = output_dir.with_name(f"{output_dir.name}.stderr.log")
    with stdout_log.open("wb") as stdout, stderr_log.open("wb") as stderr:
        process = subprocess.Popen(
            command,
            shell=True,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            start_new_session=True,
        )
        try:
            status = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(process)
            raise SegmenterError(
                f"segmenter command {command!r} ran longer than {timeout_s:g} s and was stopped"
            ) from None
        except BaseException:  # Ctrl-C: its own session does not get the terminal's SIGINT
            _kill_group(process)
            raise
    if status != 0:
        last_line = _last_line(stderr_log)
        detail = f": {last_line}" if last_line else ""
        raise SegmenterError(
            f"segmenter command {command!r} exited with status {_describe_status(status)}{detail} "
            f"(full output: {stderr_log})"
        )
    return command


def _kill_group(process: subprocess.Popen) -> None:
    """Kill the shell and the segmenter it started: they share the new session's process group."""
    with contextlib.suppress(ProcessLookupError):  # the group has already gone
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _describe_status(status: int) -> str:
    if status < 0:
        try:
            return f"{status} (killed by {signal.Signals(-status).name})"
        except ValueError:
            return str(status)
    return str(status)


def _last_line(path: Path, tail_bytes: int = 4096) -> str:
    with path.open("rb") as file:
        file.seek(max(0, path.stat().st_size - tail_bytes))
        text = file.read().decode("utf-8", errors="replace")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def read_segmentations(
    output_dir: str | Path, reference_grids: Mapping[str, tuple[tuple[int, ...], np.ndarray]], command: str
) -> dict[str, np.ndarray]:
    """id -> int16 label map ``[X, Y, Z]`` read from ``output_dir/<id>.nii.gz`` for each id of
    ``reference_grids`` (id -> (shape, affine) it must match). Raises SegmenterError naming the command
    and the first missing file (and how many are missing), or the file that is off the grid, unreadable,
    or not integer labels."""
    output_dir = Path(output_dir)
    missing = [subject for subject in reference_grids if not (output_dir / f"{subject}.nii.gz").is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more subjects)" if len(missing) > 1 else ""
        raise SegmenterError(
            f"segmenter command {command!r} wrote no segmentation for subject {missing[0]}: expected "
            f"{output_dir / (missing[0] + '.nii.gz')}{more}"
        )
    labels = {}
    for subject, grid in reference_grids.items():
        path = output_dir / f"{subject}.nii.gz"
        volume = load_volume(path, is_label=True)
        if not same_grid(volume.data.shape, volume.affine, *grid):
            raise SegmenterError(
                f"{path}: segmentation of shape {volume.data.shape} is not on the grid of subject "
                f"{subject}'s inputs and reference {grid[0]} (shape and affine must match)"
            )
        labels[subject] = _integer_labels(volume.data, path)
    return labels


def _integer_labels(data: np.ndarray, path: Path) -> np.ndarray:
    rounded = np.rint(data)
    if not np.array_equal(rounded, data) or rounded.min() < 0 or rounded.max() > np.iinfo(np.int16).max:
        raise SegmenterError(f"{path}: label map holds values that are not non-negative integers")
    return rounded.astype(np.int16)


def read_reference(path: str | Path) -> tuple[np.ndarray, tuple[tuple[int, ...], np.ndarray]]:
    """(labels int16 ``[X, Y, Z]`` in BraTS 2021 labels, (shape, affine)) of a reference segmentation.

    As data_prep reads a BraTS seg: labels 0 1 2 4, or BraTS 2023's 3 for enhancing tumour (mapped to 4).
    Raises a UserError naming the file when it is unreadable or holds other labels.
    """
    volume = load_volume(Path(path), is_label=True)
    labels = _integer_labels(volume.data, Path(path))
    unexpected = sorted(set(np.unique(labels).tolist()) - {0, 1, 2, 3, 4})
    if unexpected:
        raise SegmenterError(
            f"{path}: reference segmentation has labels {unexpected}, expected BraTS labels 0 1 2 4 (or 3)"
        )
    labels[labels == 3] = 4
    return labels, (labels.shape, volume.affine)


def score_with_segmenter(
    command: str,
    subjects: Mapping[str, Mapping[str, Volume]],
    target: str,
    synthesized: Mapping[str, Volume],
    reference_segs: Mapping[str, str | os.PathLike],
    labels: str | None,
    work_dir: str | Path,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> tuple[list[SegmentationScore], dict[str, Any]]:
    """Run the segmenter on the real and on the synthesized inputs and score both against the references.

    command: ``"CMD {input} {output}"`` (`format_segmenter_command`). subjects: id -> the four real
    contrasts (see `write_brats2023_folder`). target: the synthesized contrast (``flair`` or ``t2f``, ...).
    synthesized: id -> the synthesized target volume, on the subject's grid. reference_segs: id -> the
    reference segmentation file (BraTS 2021 or 2023 labels), on the same grid. labels: the segmenter's
    label convention (``LABEL_CONVENTIONS``), or None to infer it from everything it wrote in both runs.
    work_dir: ``work_dir/real`` and ``work_dir/synthesized`` (each ``input/``, ``output/`` and the
    output's ``.stdout.log`` / ``.stderr.log``) are replaced and kept for inspection.

    Returns (rows: `score_segmentations`, summary: {"target", "label_convention", "labels_inferred",
    "hd95_max_penalty_mm", "subjects", "command", "regions": `summarize_segmentation`}). Raises
    SegmenterError (a UserError) in one line for anything the user can fix.
    """
    target = _check_request(command, subjects, target, synthesized, reference_segs, labels)
    references, grids = _read_references(subjects, reference_segs)
    work_dir = Path(work_dir)
    outputs = {
        run: _segment(command, inputs, work_dir / run, grids, timeout_s)
        for run, inputs in _run_inputs(subjects, target, synthesized).items()
    }
    rows, convention = _score_runs(outputs, references, grids, labels, work_dir)
    summary = {
        "target": target,
        "command": command,
        "label_convention": convention,
        "labels_inferred": labels is None,
        "hd95_max_penalty_mm": HD95_MAX_PENALTY_MM,
        "subjects": len(references),
        "regions": summarize_segmentation(rows),
    }
    return rows, summary


def _check_request(
    command: str,
    subjects: Mapping[str, Mapping[str, Volume]],
    target: str,
    synthesized: Mapping[str, Volume],
    reference_segs: Mapping[str, str | os.PathLike],
    labels: str | None,
) -> str:
    """The canonical target, once the label convention, the target, the subjects' synthesized volumes
    and references, and the command template are usable; SegmenterError naming the first that is not."""
    if labels is not None and labels not in LABEL_CONVENTIONS:
        raise SegmenterError(f"--segmenter-labels {labels}: expected one of {', '.join(LABEL_CONVENTIONS)}")
    target = canonical_modality(target)
    if target not in BRATS2023_SUFFIXES:
        raise SegmenterError(
            f"target {target!r}: a BraTS segmenter reads only {' '.join(BRATS2023_SUFFIXES)}, so it cannot "
            "score that contrast"
        )
    if not subjects:
        raise SegmenterError("no subjects to segment")
    for subject in subjects:
        for name, given in (("synthesized volume", synthesized), ("reference segmentation", reference_segs)):
            if subject not in given:
                raise SegmenterError(f"subject {subject}: no {name} for the segmentation score")
    format_segmenter_command(command, "input", "output")  # a bad template fails before any work
    return target


def _read_references(
    subjects: Mapping[str, Mapping[str, Volume]], reference_segs: Mapping[str, str | os.PathLike]
) -> tuple[dict[str, np.ndarray], dict[str, tuple[tuple[int, ...], np.ndarray]]]:
    """(id -> reference labels, id -> (shape, affine) of the reference), each reference on the grid of
    its subject's first contrast; SegmenterError naming the reference file that is not."""
    references, grids = {}, {}
    for subject in subjects:
        references[subject], grids[subject] = read_reference(reference_segs[subject])
        # Its contrasts' own grids (and any missing one) are checked as they are written.
        for name, volume in list(subjects[subject].items())[:1]:
            if not same_grid(*grids[subject], *_grid_of(volume, subject, name)):
                raise SegmenterError(
                    f"{reference_segs[subject]}: reference segmentation of shape {grids[subject][0]} is not "
                    f"on the grid of subject {subject}'s {name} (shape and affine must match)"
                )
    return references, grids


def _run_inputs(
    subjects: Mapping[str, Mapping[str, Volume]], target: str, synthesized: Mapping[str, Volume]
) -> dict[str, dict[str, dict[str, Volume]]]:
    """run (``REAL``, ``SYNTHESIZED``) -> id -> contrast -> volume: the real contrasts, and the same
    with the target replaced by the synthesized volume."""
    return {
        REAL: {subject: dict(contrasts) for subject, contrasts in subjects.items()},
        SYNTHESIZED: {
            subject: {
                **{name: v for name, v in contrasts.items() if canonical_modality(name) != target},
                target: synthesized[subject],
            }
            for subject, contrasts in subjects.items()
        },
    }


def _segment(
    command: str,
    inputs: Mapping[str, Mapping[str, Volume]],
    run_dir: Path,
    grids: Mapping[str, tuple[tuple[int, ...], np.ndarray]],
    timeout_s: float,
) -> dict[str, np.ndarray]:
    """One segmenter run: replace ``run_dir``, write ``inputs`` into ``run_dir/input``, run the command
    into ``run_dir/output`` and return its label maps (`read_segmentations`)."""
    if run_dir.exists():
        shutil.rmtree(run_dir)
    write_brats2023_folder(inputs, run_dir / "input")
    formatted = run_segmenter(command, run_dir / "input", run_dir / "output", timeout_s=timeout_s)
    return read_segmentations(run_dir / "output", grids, formatted)


def _score_runs(
    outputs: Mapping[str, Mapping[str, np.ndarray]],
    references: Mapping[str, np.ndarray],
    grids: Mapping[str, tuple[tuple[int, ...], np.ndarray]],
    labels: str | None,
    work_dir: Path,
) -> tuple[list[SegmentationScore], str]:
    """(`score_segmentations` rows of both runs against the references, the label convention: ``labels``
    checked against, or inferred from, every label either run wrote)."""
    found = set()
    for run_labels in outputs.values():
        for label_map in run_labels.values():
            found.update(np.unique(label_map).tolist())
    convention = resolve_label_convention(found, labels, f"the segmentations in {work_dir}/*/output")
    spacings = {subject: nib.affines.voxel_sizes(grid[1]) for subject, grid in grids.items()}
    rows = score_segmentations(outputs[REAL], outputs[SYNTHESIZED], references, spacings, convention)
    return rows, convention
