"""``medgan evaluate``: score a checkpoint (or a folder of predictions) on shards or NIfTI subjects."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from medgan.cli.common import CHECKPOINT_OR_EXPORT, add_checkpoint_options, choose_device, command_line, say
from medgan.shards import DataError


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


def evaluate_checkpoint(
    checkpoint: str | None,
    out: Path,
    *,
    protocol: str = "default",
    predictions: str | None = None,
    data_path: str | None = None,
    split: str = "test",
    subjects_folder: str | None = None,
    baseline_checkpoint: str | None = None,
    input_modalities: list[str] | None = None,
    target_modality: str | None = None,
    report: str | None = None,
    all_subsets: bool = False,
    segmenter: str | None = None,
    segmenter_labels: str | None = None,
    spread: str | None = None,
    tag: str | None = None,
    batch_size: int = 8,
    device: str | None = None,
    command: str = "",
) -> None:
    """``evaluate``: score a checkpoint on a shard split or a NIfTI folder, print the headline and write
    the evaluation folder (and the HTML report when asked)."""
    from medgan.evaluation.default_protocol import (
        EvaluationError,
        NiftiSubjects,
        ShardSubjects,
        evaluate,
        tasks_to_evaluate,
    )
    from medgan.evaluation.report import write_report
    from medgan.inference.loading import load_generator
    from medgan.inference.spread import load_for_synthesis, spread_variants

    started = time.perf_counter()
    if protocol == "brasyn":
        return _evaluate_brasyn(
            checkpoint, Path(out), subjects_folder, predictions, baseline_checkpoint, input_modalities,
            target_modality, report, tag, batch_size, device, command,
        )  # fmt: skip
    if predictions:
        raise EvaluationError("--predictions goes with --protocol brasyn")
    if not checkpoint:
        raise EvaluationError("give --checkpoint (or --protocol brasyn with --predictions DIR)")
    generator, other_weights = load_for_synthesis(checkpoint, tag, choose_device(device), spread)
    variants = (spread, spread_variants(generator, spread, other_weights)) if spread else None
    baseline = (
        load_generator(baseline_checkpoint, None, choose_device(device)) if baseline_checkpoint else None
    )
    selection = None
    if subjects_folder:
        subjects = NiftiSubjects(subjects_folder, generator)
    else:
        subjects = ShardSubjects(data_path, split, generator.modalities)
        if split != "val":
            try:
                selection = ShardSubjects(data_path, "val", generator.modalities)
            except DataError:
                selection = None
    tasks = tasks_to_evaluate(
        generator, subjects.available_modalities, input_modalities, target_modality, all_subsets
    )
    description: dict = {"command": command, "all_subsets": all_subsets}
    if segmenter:
        description["segmentation"] = _segmentation_scores(
            generator, subjects_folder, tasks, segmenter, segmenter_labels, Path(out), batch_size
        )
    summary = evaluate(
        generator,
        subjects,
        tasks,
        Path(out),
        baseline=baseline,
        selection_subjects=selection,
        batch_size=batch_size,
        description=description,
        spread=variants,
    )
    for name, task in summary["tasks"].items():
        brain = task["methods"]["model"]["brain"]["per_volume"]
        copy = task["methods"]["best_input_copy"]["brain"]["per_volume"]
        say(
            f"{name}: {task['subjects']} subjects, PSNR {brain['psnr']['mean']:.2f} dB, SSIM "
            f"{brain['ssim']['mean']:.4f}, MAE {brain['mae']['mean']:.4f} "
            f"(copied {task['best_input_copy']['input']}: PSNR {copy['psnr']['mean']:.2f} dB)"
        )
    for name, task in summary["tasks"].items():
        if "spread" in task:
            rho = task["spread"]["spearman"]
            say(
                f"{name}: {spread} spread vs |error|, Spearman rho median {rho['median']:.3f} over {rho['n']}"
            )
    for line in summary["failed_subjects"]:
        print(f"medgan evaluate: left out {line}", file=sys.stderr)
    if segmenter:
        segmentation = summary["segmentation"]
        drops = ", ".join(
            f"{region} Dice {values['dice_real']['mean']:.3f} -> {values['dice_synth']['mean']:.3f}"
            for region, values in segmentation["regions"].items()
        )
        subjects = segmentation["subjects"]
        say(f"segmenter, {subjects} subjects, real -> synthesized {segmentation['task']}: {drops}")
    if report:
        write_report(out, report)
        say(f"report: {report}")
    say(
        f"wrote summary.json, per_volume.csv, per_slice.csv to {out} in {time.perf_counter() - started:.0f} s"
    )


def _evaluate_brasyn(
    checkpoint,
    out: Path,
    subjects_folder,
    predictions,
    baseline_checkpoint,
    inputs,
    target,
    report,
    tag,
    batch_size,
    device,
    command,
) -> None:
    """``--protocol brasyn``: whole NIfTI volumes of ``--subjects`` scored as the challenge scores them."""
    from data_prep.volumes import canonical_modality
    from medgan.evaluation.brasyn_protocol import BrasynEvaluationError, evaluate_brasyn
    from medgan.evaluation.report import write_report
    from medgan.inference.loading import load_generator

    if not subjects_folder:
        raise BrasynEvaluationError("--protocol brasyn needs --subjects DIR (whole volumes with a seg)")
    generator = (
        load_generator(checkpoint, tag, choose_device(device)) if checkpoint and not predictions else None
    )
    if target is None and generator is not None and generator.trained_target != "any":
        target = generator.trained_target
    if not target or target == "any":
        raise BrasynEvaluationError("--protocol brasyn needs --target_modality M (the contrast to score)")
    target = canonical_modality(target)
    if inputs:
        inputs = [canonical_modality(name) for name in inputs]
    elif generator is not None and generator.trained_inputs:
        inputs = list(generator.trained_inputs)
    else:
        inputs = [m for m in ("t1", "t1ce", "t2", "flair") if m != target]
    if generator is not None and (reason := generator.serves(inputs, target)):
        raise BrasynEvaluationError(reason)
    baseline = (
        load_generator(baseline_checkpoint, None, choose_device(device)) if baseline_checkpoint else None
    )
    summary = evaluate_brasyn(
        subjects_folder, target, inputs, out, generator=generator, predictions_folder=predictions,
        baseline=baseline, batch_size=batch_size, description={"command": command},
    )  # fmt: skip
    for method, values in summary["brasyn"]["methods"].items():
        scores = ", ".join(
            f"{name} {values[name]['mean']:.4f}" for name in ("ssim_tumour", "ssim_non_tumour")
        )
        say(f"BraSyn {target}, {summary['subjects_evaluated']} subjects, {method}: {scores}")
    for line in summary["failed_subjects"]:
        print(f"medgan evaluate: left out {line}", file=sys.stderr)
    if report:
        write_report(out, report)
        say(f"report: {report}")
    say(f"wrote summary.json and brasyn.csv to {out}")


def _segmentation_scores(generator, subjects_folder, tasks, command, labels, out: Path, batch_size) -> dict:
    """``--segmenter``: one task, on a NIfTI folder (a segmenter needs whole volumes)."""
    from medgan.evaluation.default_protocol import EvaluationError
    from medgan.evaluation.downstream import segmentation_scores

    if not subjects_folder:
        raise EvaluationError("--segmenter needs --subjects DIR (a segmenter reads whole NIfTI volumes)")
    if len(tasks) != 1:
        names = " ".join(task.name for task in tasks)
        raise EvaluationError(
            f"--segmenter scores one task; this model serves {names}: give --target_modality"
        )
    (task,) = tasks
    out.mkdir(parents=True, exist_ok=True)
    return segmentation_scores(
        generator, subjects_folder, list(task.inputs), task.target, command, labels, out, batch_size
    )


def run(args, argv: list[str]) -> int:
    evaluate_checkpoint(
        args.checkpoint,
        Path(args.out),
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
    return 0
