"""``medgan evaluate``: score a checkpoint (or a folder of predictions) on shards or NIfTI subjects."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

from data_prep.errors import DataError
from medgan.cli.common import CHECKPOINT_OR_EXPORT, add_checkpoint_options, choose_device, command_line, say


def add_parser(commands) -> None:
    evaluate = commands.add_parser("evaluate", help="PSNR/SSIM/MAE with baselines and paired statistics")
    add_checkpoint_options(evaluate, CHECKPOINT_OR_EXPORT, required=False)
    evaluate.add_argument(
        "--protocol",
        choices=["default", "brasyn"],
        default="default",
        help="brasyn: whole volumes of --subjects scored exactly as the BraSyn challenge does",
    )
    evaluate.add_argument(
        "--predictions", metavar="DIR", help="with --protocol brasyn: score these synthesized volumes"
    )
    source = evaluate.add_mutually_exclusive_group(required=True)
    source.add_argument("--data_path", metavar="SHARDS", help="a shard folder (python -m data_prep shard)")
    source.add_argument("--subjects", metavar="DIR", help="a folder of NIfTI subjects that have the target")
    evaluate.add_argument("--split", default="test", choices=["train", "val", "test"])
    evaluate.add_argument("--out", required=True, metavar="DIR")
    evaluate.add_argument("--baseline-checkpoint", metavar="C2", help="another generator (e.g. the U-Net)")
    evaluate.add_argument("--input_modalities", nargs="+", metavar="MOD")
    evaluate.add_argument("--target_modality", metavar="M")
    evaluate.add_argument("--report", metavar="HTML", help="also write the HTML report here")
    evaluate.add_argument(
        "--all-subsets",
        action="store_true",
        help="a model trained for target any: score every non-empty subset of the other contrasts for "
        "every target (the any-subset matrix)",
    )
    evaluate.add_argument(
        "--segmenter",
        metavar='"CMD {input} {output}"',
        help="with --subjects: run this tumour segmenter on the real and on the synthesized contrasts "
        "(BraTS 2023 names) and report Dice and HD95 per region and the drop",
    )
    evaluate.add_argument(
        "--spread",
        choices=["flip", "weights", "both"],
        help="also compute synthesize's test-time spread and report how well it predicts the error",
    )
    evaluate.add_argument(
        "--segmenter-labels",
        choices=["brats2021", "brats2023"],
        help="the segmenter's label convention (default: inferred from the labels it writes)",
    )
    evaluate.set_defaults(run=run)


@dataclass(kw_only=True, slots=True)
class EvaluationRequest:
    """What ``evaluate`` is asked to do, from its command line (`from_args`) or from the front door.

    checkpoint: a checkpoint folder or exported file (None only with ``protocol`` brasyn and
    ``predictions``). out: the evaluation folder. data_path + split or subjects_folder: what is scored.
    The rest are ``evaluate``'s flags of the same names; command: the command line, for the summary.
    """

    checkpoint: str | None
    out: Path
    protocol: str = "default"
    predictions: str | None = None
    data_path: str | None = None
    split: str = "test"
    subjects_folder: str | None = None
    baseline_checkpoint: str | None = None
    input_modalities: list[str] | None = None
    target_modality: str | None = None
    report: str | None = None
    all_subsets: bool = False
    segmenter: str | None = None
    segmenter_labels: str | None = None
    spread: str | None = None
    tag: str | None = None
    batch_size: int = 8
    device: str | None = None
    command: str = ""

    @classmethod
    def from_args(cls, args, argv: list[str]) -> EvaluationRequest:
        """The request of ``evaluate``'s parsed flags."""
        return cls(
            checkpoint=args.checkpoint,
            out=Path(args.out),
            protocol=args.protocol,
            predictions=args.predictions,
            data_path=args.data_path,
            split=args.split,
            subjects_folder=args.subjects,
            baseline_checkpoint=args.baseline_checkpoint,
            input_modalities=args.input_modalities,
            target_modality=args.target_modality,
            report=args.report,
            all_subsets=args.all_subsets,
            segmenter=args.segmenter,
            segmenter_labels=args.segmenter_labels,
            spread=args.spread,
            tag=args.tag,
            batch_size=args.batch_size,
            device=args.device,
            command=command_line(args.prog, argv),
        )


def evaluate_checkpoint(request: EvaluationRequest) -> None:
    """``evaluate``: score a checkpoint on a shard split or a NIfTI folder (or, with the BraSyn protocol,
    a folder of predictions), print the headline and write the evaluation folder (and the HTML report
    when asked)."""
    if request.protocol == "brasyn":
        _evaluate_brasyn(request)
    else:
        _evaluate_default(request)


def _load_baseline(request: EvaluationRequest):
    """The ``--baseline-checkpoint`` generator, or None."""
    from medgan.inference.loading import load_generator

    if not request.baseline_checkpoint:
        return None
    return load_generator(request.baseline_checkpoint, None, choose_device(request.device))


def _write_report(request: EvaluationRequest) -> None:
    from medgan.evaluation.report import write_report

    if request.report:
        write_report(request.out, request.report)
        say(f"report: {request.report}")


def _print_left_out(summary: dict) -> None:
    for line in summary["failed_subjects"]:
        print(f"medgan evaluate: left out {line}", file=sys.stderr)


def _evaluate_default(request: EvaluationRequest) -> None:
    """The default protocol: PSNR / SSIM / MAE beside the baselines, on shards or NIfTI subjects."""
    from medgan.evaluation.default_protocol import evaluate
    from medgan.evaluation.tasks import EvaluationError, tasks_to_evaluate
    from medgan.inference.spread import load_for_synthesis, spread_variants

    started = time.perf_counter()
    if request.predictions:
        raise EvaluationError("--predictions goes with --protocol brasyn")
    if not request.checkpoint:
        raise EvaluationError("give --checkpoint (or --protocol brasyn with --predictions DIR)")
    device = choose_device(request.device)
    generator, other_weights = load_for_synthesis(request.checkpoint, request.tag, device, request.spread)
    variants = (
        (request.spread, spread_variants(generator, request.spread, other_weights))
        if request.spread
        else None
    )
    baseline = _load_baseline(request)
    subjects, selection = _subjects(request, generator)
    tasks = tasks_to_evaluate(
        generator,
        subjects.available_modalities,
        request.input_modalities,
        request.target_modality,
        request.all_subsets,
    )
    summary = evaluate(
        generator,
        subjects,
        tasks,
        request.out,
        baseline=baseline,
        selection_subjects=selection,
        batch_size=request.batch_size,
        description={"command": request.command, "all_subsets": request.all_subsets},
        spread=variants,
        segmentation=_downstream_segmentation(request, subjects, tasks),
    )
    _print_default(summary, request.spread)
    _write_report(request)
    say(
        f"wrote summary.json, per_volume.csv, per_slice.csv to {request.out} in "
        f"{time.perf_counter() - started:.0f} s"
    )


def _subjects(request: EvaluationRequest, generator):
    """(the subjects to score, the validation split to choose the copied input on or None)."""
    from medgan.evaluation.subjects import NiftiSubjects, ShardSubjects

    if request.subjects_folder:
        return NiftiSubjects(request.subjects_folder, generator), None
    subjects = ShardSubjects(request.data_path, request.split, generator.modalities)
    if request.split == "val":
        return subjects, None
    try:
        return subjects, ShardSubjects(request.data_path, "val", generator.modalities)
    except DataError:
        return subjects, None


def _downstream_segmentation(request: EvaluationRequest, subjects, tasks):
    """``--segmenter``: one task, on a NIfTI folder (a segmenter needs whole volumes); None without it."""
    from medgan.evaluation.downstream import DownstreamSegmentation
    from medgan.evaluation.tasks import EvaluationError

    if not request.segmenter:
        return None
    if not request.subjects_folder:
        raise EvaluationError("--segmenter needs --subjects DIR (a segmenter reads whole NIfTI volumes)")
    if len(tasks) != 1:
        names = " ".join(task.name for task in tasks)
        raise EvaluationError(
            f"--segmenter scores one task; this model serves {names}: give --target_modality"
        )
    return DownstreamSegmentation(
        subjects, tasks[0], request.segmenter, request.segmenter_labels, request.out
    )


def _print_default(summary: dict, spread: str | None) -> None:
    """The headline of each task, the spread's, the subjects left out and the segmenter's drop."""
    for name, task in summary["tasks"].items():
        brain = task["methods"]["model"]["brain"]["per_volume"]
        copy = task["methods"]["best_input_copy"]["brain"]["per_volume"]
        say(
            f"{name}: {task['subjects']} subjects, PSNR {brain['psnr']['mean']:.2f} dB, SSIM "
            f"{brain['ssim']['mean']:.4f}, MAE {brain['mae']['mean']:.4f}, through-plane error "
            f"{brain['through_plane_error']['mean']:.4f} (copied {task['best_input_copy']['input']}: PSNR "
            f"{copy['psnr']['mean']:.2f} dB)"
        )
    for name, task in summary["tasks"].items():
        if "spread" in task:
            rho = task["spread"]["spearman"]
            say(
                f"{name}: {spread} spread vs |error|, Spearman rho median {rho['median']:.3f} over {rho['n']}"
            )
    _print_left_out(summary)
    if "segmentation" in summary:
        segmentation = summary["segmentation"]
        drops = ", ".join(
            f"{region} Dice {values['dice_real']['mean']:.3f} -> {values['dice_synth']['mean']:.3f}"
            for region, values in segmentation["regions"].items()
        )
        subjects = segmentation["subjects"]
        say(f"segmenter, {subjects} subjects, real -> synthesized {segmentation['task']}: {drops}")


def _evaluate_brasyn(request: EvaluationRequest) -> None:
    """``--protocol brasyn``: whole NIfTI volumes of ``--subjects`` scored as the challenge scores them."""
    from medgan.evaluation.brasyn_protocol import BrasynEvaluationError, evaluate_brasyn
    from medgan.inference.loading import load_generator

    if not request.subjects_folder:
        raise BrasynEvaluationError("--protocol brasyn needs --subjects DIR (whole volumes with a seg)")
    generator = (
        load_generator(request.checkpoint, request.tag, choose_device(request.device))
        if request.checkpoint and not request.predictions
        else None
    )
    inputs, target = _brasyn_task(request, generator)
    summary = evaluate_brasyn(
        request.subjects_folder, target, inputs, request.out, generator=generator,
        predictions_folder=request.predictions, baseline=_load_baseline(request),
        batch_size=request.batch_size, description={"command": request.command},
    )  # fmt: skip
    for method, values in summary["brasyn"]["methods"].items():
        scores = ", ".join(
            f"{name} {values[name]['mean']:.4f}" for name in ("ssim_tumour", "ssim_non_tumour")
        )
        say(f"BraSyn {target}, {summary['subjects_evaluated']} subjects, {method}: {scores}")
    _print_left_out(summary)
    _write_report(request)
    say(f"wrote summary.json and brasyn.csv to {request.out}")


def _brasyn_task(request: EvaluationRequest, generator) -> tuple[list[str], str]:
    """(inputs, target) to score with the BraSyn protocol: the flags', else the model's, else the other
    BraTS contrasts; checked against the model when there is one."""
    from data_prep.volumes import canonical_modality
    from medgan.evaluation.brasyn_protocol import BrasynEvaluationError

    target = request.target_modality
    if target is None and generator is not None and generator.trained_target != "any":
        target = generator.trained_target
    if not target or target == "any":
        raise BrasynEvaluationError("--protocol brasyn needs --target_modality M (the contrast to score)")
    target = canonical_modality(target)
    if request.input_modalities:
        inputs = [canonical_modality(name) for name in request.input_modalities]
    elif generator is not None and generator.trained_inputs:
        inputs = list(generator.trained_inputs)
    else:
        inputs = [m for m in ("t1", "t1ce", "t2", "flair") if m != target]
    if generator is not None and (reason := generator.serves(inputs, target)):
        raise BrasynEvaluationError(reason)
    return inputs, target


def run(args, argv: list[str]) -> int:
    evaluate_checkpoint(EvaluationRequest.from_args(args, argv))
    return 0
