"""``evaluate --protocol brasyn``: a folder of NIfTI subjects scored the way the BraSyn challenge scores
(``medgan.evaluation.brasyn_scores``), for the model and the baselines, with paired statistics.

Predictions come from ``--predictions DIR`` (volumes someone else synthesized, named as data_prep's
discovery reads them: ``<subject>-t2f.nii.gz``, ``<subject>_flair.nii.gz``, ...) or are synthesized here
from the checkpoint into ``OUT/predictions``. Baselines: one input contrast copied as it is (the one
whose copy has the highest mean brain PSNR against the real target, `choose_copy_input`), and
``--baseline-checkpoint`` synthesized into ``OUT/baseline_predictions``. Each subject's real target and
seg are loaded and normalised once and every method is scored against them. Outputs: ``brasyn.csv`` (a
row per subject and method), ``summary.json`` (``brasyn`` section) for the report.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from tqdm import tqdm

from data_prep.errors import UserError
from data_prep.volumes import (
    SEGMENTATION,
    VolumeError,
    brain_mask,
    canonical_modality,
    discover_nifti_subjects,
)
from medgan import metrics
from medgan.evaluation.brasyn_scores import (
    METRICS,
    RANKED_METRICS,
    brasyn_normalise,
    brasyn_provenance,
    check_on_reference_grid,
    load_for_scoring,
    score_brasyn_methods,
)
from medgan.evaluation.summary_file import write_summary
from medgan.inference.loading import LoadedGenerator
from medgan.inference.synthesis import SynthesisError, synthesize_volume
from medgan.scoring import COPY, MODEL, UNET, paired_statistics

PAIRED_METRICS = (*RANKED_METRICS, "ssim_whole", "psnr_whole")
# A NIfTI folder has no validation split: the copied input is chosen on the evaluated subjects, cheaply.
COPY_CHOICE = (
    "highest mean brain PSNR against the real {target} on the evaluated subjects, each volume normalised "
    "as BraSyn normalises"
)


class BrasynEvaluationError(UserError):
    """The folders or flags given to ``--protocol brasyn`` cannot be scored (one line naming them)."""


def reference_volumes(folder: str | Path, target: str) -> tuple[dict[str, dict[str, Path]], list[str]]:
    """Per subject of ``folder`` with the real ``target`` and a segmentation: all its files; and one line
    per subject left out, saying why."""
    usable, left_out = {}, []
    for entry in discover_nifti_subjects(folder, flag="--subjects").subjects:
        missing = [m for m in (target, SEGMENTATION) if m not in entry.files]
        if missing:
            left_out.append(f"{entry.subject}: no {' '.join(missing)} file")
        else:
            usable[entry.subject] = dict(entry.files)
    if not usable:
        raise BrasynEvaluationError(f"--subjects {folder}: no subject has both a {target} and a seg file")
    return usable, left_out


def prediction_files(folder: str | Path, target: str) -> dict[str, Path]:
    """Per subject, the synthesized ``target`` in ``folder`` (``--predictions``)."""
    found = discover_nifti_subjects(folder, flag="--predictions").subjects
    predictions = {entry.subject: entry.files[target] for entry in found if target in entry.files}
    if not predictions:
        raise BrasynEvaluationError(f"--predictions {folder}: no {target} volume (e.g. SUBJECT-t2f.nii.gz)")
    return predictions


def synthesize_predictions(
    generator: LoadedGenerator,
    subjects: dict[str, dict[str, Path]],
    inputs: list[str],
    target: str,
    out: Path,
    batch_size: int,
    left_out: list[str],
) -> dict[str, Path]:
    """Synthesize ``target`` for every subject into ``out/<subject>_<target>.nii.gz``; a subject that
    cannot be synthesized is added to ``left_out`` with the reason."""
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for subject, files in tqdm(
        subjects.items(), desc=f"synthesize into {out.name}", unit="subject", disable=None
    ):
        missing = [m for m in inputs if m not in files]
        if missing:
            left_out.append(f"{subject}: no {' '.join(missing)} file to synthesize from")
            continue
        try:
            result = synthesize_volume(
                generator, {m: files[m] for m in inputs}, target, batch_size=batch_size
            )
        except (SynthesisError, VolumeError) as error:
            left_out.append(f"{subject}: {error}")
            continue
        written[subject] = out / f"{subject}_{target}.nii.gz"
        nib.save(result.image, written[subject])
    return written


def copy_brain_psnr(copy: np.ndarray, real: np.ndarray) -> float:
    """PSNR (dB) of an input copied as it is against the real target, both ``[X, Y, Z]`` in scanner
    units and normalised as BraSyn normalises (`brasyn_normalise`), over the real target's brain (its
    nonzero voxels; BraTS volumes are skull-stripped). ``+inf`` for identical volumes."""
    return _psnr_against(copy, brasyn_normalise(real), brain_mask([real]))


def _psnr_against(copy: np.ndarray, normalised_real: np.ndarray, brain: np.ndarray) -> float:
    """:func:`copy_brain_psnr` with the real target already normalised and its brain found."""
    return float(metrics.psnr(brasyn_normalise(copy), normalised_real, mask=brain, spatial_dims=3))


def choose_copy_input(
    subjects: dict[str, dict[str, Path]], candidates: list[str], target: str
) -> tuple[str | None, dict[str, float]]:
    """(the candidate input whose copy has the highest mean `copy_brain_psnr` over ``subjects``, the
    mean per candidate); with one candidate or none, that one (or None) without reading a file. Costs a
    load and a percentile per volume, no SSIM. Inputs whose PSNRs are all NaN rank last; ties go to the
    earlier candidate."""
    if len(candidates) <= 1:
        return (candidates[0] if candidates else None), {}
    psnrs: dict[str, list[float]] = {name: [] for name in candidates}
    for files in tqdm(subjects.values(), desc="choose copied input", unit="subject", disable=None):
        real = load_for_scoring(files[target])
        # the real target's normalisation and brain once per subject, not once per candidate
        normalised_real, brain = brasyn_normalise(real.data), brain_mask([real.data])
        for name in candidates:
            copy = load_for_scoring(files[name])
            check_on_reference_grid(copy, real)
            psnrs[name].append(_psnr_against(copy.data, normalised_real, brain))
    means = {
        name: float(np.nanmean(values)) if not np.all(np.isnan(values)) else -math.inf
        for name, values in psnrs.items()
    }
    return max(means, key=means.__getitem__), means


def _model_predictions(
    subjects: dict[str, dict[str, Path]],
    target: str,
    inputs: list[str],
    out: Path,
    generator: LoadedGenerator | None,
    predictions_folder: str | Path | None,
    batch_size: int,
    left_out: list[str],
) -> tuple[dict[str, Path], str]:
    """(subject -> the model's volume of ``target`` to score, where they came from): the files of
    ``--predictions`` for subjects with references, else synthesized into ``out/predictions``; subjects
    left out are added to ``left_out``."""
    if predictions_folder is not None:
        predictions = prediction_files(predictions_folder, target)
        unknown = sorted(set(predictions) - set(subjects))
        left_out += [f"{s}: a prediction but no reference {target} and seg in --subjects" for s in unknown]
        return {s: p for s, p in predictions.items() if s in subjects}, f"the volumes in {predictions_folder}"
    if generator is not None:
        predictions = synthesize_predictions(
            generator, subjects, inputs, target, out / "predictions", batch_size, left_out
        )
        return predictions, generator.source
    raise BrasynEvaluationError("--protocol brasyn needs --checkpoint or --predictions DIR")


def score_methods(
    subjects: dict[str, dict[str, Path]],
    target: str,
    inputs: list[str],
    predictions: dict[str, Path],
    baseline: LoadedGenerator | None,
    out: Path,
    batch_size: int,
    left_out: list[str],
) -> tuple[list[dict[str, Any]], str | None, dict[str, float]]:
    """(a row per method and subject: the model's ``predictions``, the copied input (`choose_copy_input`)
    and the baseline synthesized into ``out/baseline_predictions``, each subject's references loaded once;
    the copied input; each candidate's mean brain PSNR)."""
    scored = sorted(predictions)
    candidates = [name for name in inputs if all(name in subjects[s] for s in scored)]
    copy_input, copy_psnrs = choose_copy_input({s: subjects[s] for s in scored}, candidates, target)
    to_score = {MODEL: predictions}
    if copy_input is not None:
        to_score[COPY] = {s: subjects[s][copy_input] for s in scored}
    if baseline is not None:
        to_score[UNET] = synthesize_predictions(
            baseline, {s: subjects[s] for s in scored}, inputs, target, out / "baseline_predictions",
            batch_size, left_out,
        )  # fmt: skip
    references = {s: (subjects[s][target], subjects[s][SEGMENTATION]) for s in scored}
    by_method = score_brasyn_methods(to_score, references)
    rows = [{"method": method, **row} for method, method_rows in by_method.items() for row in method_rows]
    return rows, copy_input, copy_psnrs


def _method_statistics(rows: list[dict[str, Any]], scored: list[str]) -> dict[str, Any]:
    """Per method the summary of each metric, and per baseline the paired statistics against the model."""
    methods = list(dict.fromkeys(row["method"] for row in rows))
    by_method = {
        method: {row["subject"]: row for row in rows if row["method"] == method} for method in methods
    }
    return {
        "methods": {
            method: {
                name: metrics.summarize([row[name] for row in by_method[method].values()]) for name in METRICS
            }
            for method in methods
        },
        "paired": {
            method: {
                name: paired_statistics(
                    [by_method[MODEL][s][name] for s in scored],
                    [by_method[method].get(s, {}).get(name, math.nan) for s in scored],
                )
                for name in PAIRED_METRICS
            }
            for method in methods[1:]
        },
    }


def evaluate_brasyn(
    subjects_folder: str | Path,
    target: str,
    inputs: list[str],
    out: Path,
    *,
    generator: LoadedGenerator | None = None,
    predictions_folder: str | Path | None = None,
    baseline: LoadedGenerator | None = None,
    batch_size: int = 8,
    description: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Score the model's (or the given) predictions of ``target`` and the baselines with BraSyn's
    protocol; write ``brasyn.csv`` and ``summary.json`` into ``out`` and return the summary."""
    target = canonical_modality(target)
    out.mkdir(parents=True, exist_ok=True)
    subjects, left_out = reference_volumes(subjects_folder, target)
    predictions, source = _model_predictions(
        subjects, target, inputs, out, generator, predictions_folder, batch_size, left_out
    )
    if not predictions:
        raise BrasynEvaluationError(
            f"no subject could be scored ({left_out[0] if left_out else 'none found'})"
        )
    rows, copy_input, copy_psnrs = score_methods(
        subjects, target, inputs, predictions, baseline, out, batch_size, left_out
    )
    copied = f"the input {copy_input} copied as it is ({COPY_CHOICE.format(target=target)})"
    summary = {
        **(description or {}),
        "protocol": "brasyn",
        "scope": f"whole NIfTI volumes of the subjects in {subjects_folder} that have {target} and a seg",
        "checkpoint": source,
        "baseline_checkpoint": baseline.source if baseline is not None else None,
        "subjects_evaluated": len(predictions),
        "failed_subjects": left_out,
        "methods": {
            MODEL: f"the synthesized {target}: {source}",
            **({COPY: copied} if copy_input else {}),
            **({UNET: "the generator of --baseline-checkpoint"} if baseline is not None else {}),
        },
        "definitions": brasyn_definitions(),
        "tasks": {},
        "brasyn": {
            "target": target,
            "inputs": inputs,
            "copy_input": copy_input,
            "copy_brain_psnr": copy_psnrs,
            "provenance": brasyn_provenance(),
            **_method_statistics(rows, sorted(predictions)),
        },
    }
    with open(out / "brasyn.csv", "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    write_summary(out, summary)
    return summary


def brasyn_definitions() -> dict[str, str]:
    """How the BraSyn numbers were computed, for summary.json and the report (docs/evaluation.md)."""
    upstream = brasyn_provenance()
    return {
        "protocol": f"BraSyn's ssim.py ({upstream['upstream_repository']} at {upstream['upstream_commit']})",
        "normalisation": "each volume by its own 0.5 / 99.5 percentiles over the whole volume, background "
        "included (a negative lower percentile becomes 0), clipped into [0, 1]",
        "regions": "tumour: seg > 0; non_tumour: everything else, background included; each region's "
        "score on the normalised volumes with the other region set to zero",
        "ssim": f"torchmetrics {upstream['torchmetrics']} StructuralSimilarityIndexMeasure, 3D, its defaults "
        "(Gaussian sigma 1.5, 11 taps); NaN for a subject without tumour (skipped and counted in means)",
        "psnr_mse": "over each region's voxels of the volumes normalised as for the SSIM (each by its own "
        "percentiles), data_range 1; not ranked by the challenge, and not comparable with the organisers' "
        "evaluation_utils.py, which scales both volumes by the reference's percentiles (docs/evaluation.md)",
        "paired": "over subjects, model minus baseline: mean with a 95% t interval, Wilcoxon signed-rank p",
    }
