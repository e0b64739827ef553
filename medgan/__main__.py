"""``python -m medgan``: the seed project's front door and the evaluate / synthesize / export / report tools.

```
python -m medgan --mode {train,test,both} --data_path DIR [seed flags, --config X.yaml, --section.key value]
python -m medgan evaluate   --checkpoint C (--data_path SHARDS [--split test] | --subjects DIR) --out DIR
python -m medgan synthesize --checkpoint C --input t1=a.nii.gz --input t2=b.nii.gz --target flair --out y.nii
python -m medgan export     --checkpoint CKPT_DIR --out G.safetensors
python -m medgan report     --eval DIR --out report.html
```
Problems a user can fix (a missing file, a bad NIfTI, a wrong flag or value) print one line on stderr and
exit with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

from data_prep.errors import UserError
from medgan.shards import DataError
from medgan.synthesis import SynthesisError

EXIT_INPUT_ERROR = 2
EXIT_SOME_SUBJECTS_FAILED = 1
EXIT_INTERRUPTED = 130
SUBCOMMANDS = ("evaluate", "synthesize", "export", "report")
MODES = ("train", "test", "both")
# How long the other ranks wait for rank 0 to shard a raw folder: far longer than a BraTS shard takes.
SHARD_WAIT_SECONDS = 6 * 3600


def _device(name: str | None) -> str:
    import torch

    return name or ("cuda" if torch.cuda.is_available() else "cpu")


def _say(line: str) -> None:
    print(line, flush=True)


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
    from medgan.evaluation import EvaluationError, NiftiSubjects, ShardSubjects, evaluate, tasks_to_evaluate
    from medgan.inference import load_generator
    from medgan.report import write_report
    from medgan.synthesis import load_for_synthesis, spread_variants

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
    generator, other_weights = load_for_synthesis(checkpoint, tag, _device(device), spread)
    variants = (spread, spread_variants(generator, spread, other_weights)) if spread else None
    baseline = load_generator(baseline_checkpoint, None, _device(device)) if baseline_checkpoint else None
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
        _say(
            f"{name}: {task['subjects']} subjects, PSNR {brain['psnr']['mean']:.2f} dB, SSIM "
            f"{brain['ssim']['mean']:.4f}, MAE {brain['mae']['mean']:.4f} "
            f"(copied {task['best_input_copy']['input']}: PSNR {copy['psnr']['mean']:.2f} dB)"
        )
    for name, task in summary["tasks"].items():
        if "spread" in task:
            rho = task["spread"]["spearman"]
            _say(
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
        _say(f"segmenter, {subjects} subjects, real -> synthesized {segmentation['task']}: {drops}")
    if report:
        write_report(out, report)
        _say(f"report: {report}")
    _say(
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
    from medgan.brasyn_evaluation import BrasynEvaluationError, evaluate_brasyn
    from medgan.inference import load_generator
    from medgan.report import write_report

    if not subjects_folder:
        raise BrasynEvaluationError("--protocol brasyn needs --subjects DIR (whole volumes with a seg)")
    generator = load_generator(checkpoint, tag, _device(device)) if checkpoint and not predictions else None
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
    baseline = load_generator(baseline_checkpoint, None, _device(device)) if baseline_checkpoint else None
    summary = evaluate_brasyn(
        subjects_folder, target, inputs, out, generator=generator, predictions_folder=predictions,
        baseline=baseline, batch_size=batch_size, description={"command": command},
    )  # fmt: skip
    for method, values in summary["brasyn"]["methods"].items():
        scores = ", ".join(
            f"{name} {values[name]['mean']:.4f}" for name in ("ssim_tumour", "ssim_non_tumour")
        )
        _say(f"BraSyn {target}, {summary['subjects_evaluated']} subjects, {method}: {scores}")
    for line in summary["failed_subjects"]:
        print(f"medgan evaluate: left out {line}", file=sys.stderr)
    if report:
        write_report(out, report)
        _say(f"report: {report}")
    _say(f"wrote summary.json and brasyn.csv to {out}")


def _segmentation_scores(generator, subjects_folder, tasks, command, labels, out: Path, batch_size) -> dict:
    """``--segmenter``: one task, on a NIfTI folder (a segmenter needs whole volumes)."""
    from medgan.downstream import segmentation_scores
    from medgan.evaluation import EvaluationError

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


def _run_evaluate(args, argv: list[str]) -> int:
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
        command="python -m medgan " + shlex.join(argv),
    )
    return 0


def _run_synthesize(args, argv: list[str]) -> int:
    from medgan.synthesis import (
        load_for_synthesis,
        parse_input_flags,
        provenance_folder,
        spread_path,
        synthesize_folder,
        synthesize_volume,
        write_synthesized,
    )

    if bool(args.subjects) == bool(args.input):
        raise SynthesisError("give either --input MODALITY=FILE (one subject) or --subjects DIR (a folder)")
    if args.input and not args.target:
        raise SynthesisError(
            "--target: needed with --input (only --subjects DIR works without it: BraSyn mode)"
        )
    generator, other_weights = load_for_synthesis(
        args.checkpoint, args.tag, _device(args.device), args.spread
    )
    command = "python -m medgan " + shlex.join(argv)
    started = time.perf_counter()
    if args.subjects:
        written, failures = synthesize_folder(
            generator,
            Path(args.subjects),
            args.target,
            Path(args.out),
            reference=args.reference,
            batch_size=args.batch_size,
            spread=args.spread,
            other_weights=other_weights,
            command=command,
        )
        for line in failures:
            print(f"medgan synthesize: {line}", file=sys.stderr)
        mode = (
            f"{args.target} for every subject" if args.target else "each subject's missing contrast (BraSyn)"
        )
        spread = f", each with its spread ({args.spread})" if args.spread else ""
        sidecars = (
            "with JSON sidecars beside them"
            if args.target
            else f"(the folder to zip and submit; sidecars{' and spreads' if args.spread else ''} in "
            f"{provenance_folder(Path(args.out))})"
        )
        _say(
            f"wrote {len(written)} synthesized volumes ({mode}{spread}) to {args.out} {sidecars} "
            f"in {time.perf_counter() - started:.0f} s"
        )
        if not written:
            return EXIT_INPUT_ERROR
        return EXIT_SOME_SUBJECTS_FAILED if failures else 0
    inputs = parse_input_flags(args.input)
    result = synthesize_volume(
        generator,
        inputs,
        args.target,
        reference=args.reference,
        batch_size=args.batch_size,
        progress="synthesize",
        spread=args.spread,
        other_weights=other_weights,
    )
    out = Path(args.out)
    write_synthesized(result, out, command)
    _say(
        f"wrote {out}: {result.target} from {' '.join(result.inputs)}, shape {result.image.shape} on the "
        f"{result.reference} grid, {result.synthesized.shape[0]} slices in "
        f"{time.perf_counter() - started:.1f} s"
    )
    if result.spread is not None:
        _say(
            f"wrote {spread_path(out)}: SD over {len(result.variants)} variants ({args.spread}), "
            "a spread, not a calibrated uncertainty"
        )
    return 0


def _run_export(args, argv: list[str]) -> int:
    from medgan.export import export_generator

    weights, description, loaded = export_generator(args.checkpoint, args.out, args.tag)
    _say(f"wrote {weights} and {description}: {loaded.source}")
    return 0


def _run_report(args, argv: list[str]) -> int:
    from medgan.report import write_report

    _say(f"wrote {write_report(args.eval, args.out)}")
    return 0


def _add_common(parser: argparse.ArgumentParser, checkpoint_help: str, required: bool = True) -> None:
    parser.add_argument("--checkpoint", required=required, metavar="C", help=checkpoint_help)
    parser.add_argument(
        "--tag", metavar="T", help="checkpoint tag (default: best validation PSNR, else latest)"
    )
    parser.add_argument("--batch_size", type=int, default=8, metavar="N", help="slices per forward pass")
    parser.add_argument("--device", metavar="D", help="cpu, cuda, cuda:1 (default: cuda when available)")


def build_tool_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m medgan", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    either = "a checkpoint folder or an exported .safetensors file"

    evaluate = commands.add_parser("evaluate", help="PSNR/SSIM/MAE with baselines and paired statistics")
    _add_common(evaluate, either, required=False)
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
    evaluate.set_defaults(run=_run_evaluate)

    synthesize = commands.add_parser("synthesize", help="NIfTI inputs -> synthesized NIfTI on their grid")
    _add_common(synthesize, either)
    synthesize.add_argument("--input", action="append", default=[], metavar="MOD=FILE")
    synthesize.add_argument("--subjects", metavar="DIR", help="synthesize every subject in a folder")
    synthesize.add_argument(
        "--target",
        metavar="M",
        help="contrast to synthesize; without it, --subjects is BraSyn mode (each subject's missing one)",
    )
    synthesize.add_argument(
        "--out", required=True, metavar="FILE|DIR", help="a .nii.gz, or a folder with --subjects"
    )
    synthesize.add_argument("--reference", metavar="MOD", help="input whose grid the output takes")
    synthesize.add_argument(
        "--spread",
        choices=["flip", "weights", "both"],
        help="also write OUT_spread.nii.gz: the voxelwise SD over flipped inputs and/or EMA and raw weights "
        "(a spread, not a calibrated uncertainty)",
    )
    synthesize.set_defaults(run=_run_synthesize)

    export = commands.add_parser("export", help="checkpoint folder -> .safetensors + .json")
    export.add_argument("--checkpoint", required=True, metavar="CKPT_DIR")
    export.add_argument(
        "--tag", metavar="T", help="checkpoint tag (default: best validation PSNR, else latest)"
    )
    export.add_argument("--out", required=True, metavar="G.safetensors")
    export.set_defaults(run=_run_export)

    report = commands.add_parser("report", help="evaluation folder -> one self-contained HTML file")
    report.add_argument("--eval", required=True, metavar="DIR")
    report.add_argument("--out", required=True, metavar="report.html")
    report.set_defaults(run=_run_report)
    return parser


def _raw_format(folder: Path) -> str:
    """``ixi`` when data_prep's name rules find only IXI subjects in the folder, else ``brats``."""
    from data_prep.volumes import discover_nifti_subjects

    datasets = {subject.dataset for subject in discover_nifti_subjects(folder, flag="--data_path").subjects}
    return "ixi" if datasets == {"ixi"} else "brats"


def shards_for(data_path: str, checkpoint_dir: Path) -> Path:
    """A shard folder for ``data_path``: itself when it has a manifest, else a raw BraTS/IXI folder
    sharded into ``checkpoint_dir/shards`` with ``python -m data_prep shard`` (rank 0 runs it)."""
    source = Path(data_path)
    if not data_path or not source.is_dir():
        raise DataError(f"--data_path {data_path or '(empty)'}: no such folder")
    if (source / "manifest.json").is_file():
        return source
    shards = checkpoint_dir / "shards"
    if (shards / "manifest.json").is_file():
        _say(f"reusing the shards of {source} in {shards}")
        return shards
    command = [
        sys.executable, "-m", "data_prep", "shard", "--format", _raw_format(source),
        "--src", str(source), "--out", str(shards),
    ]  # fmt: skip
    _say(f"{source} is a raw folder: {shlex.join(command)}")
    if subprocess.run(command).returncode != 0:
        raise DataError(f"--data_path {source}: python -m data_prep shard failed (see above)")
    return shards


def run_front_door(argv: list[str]) -> int:
    """The seed's ``--mode train|test|both``: shard a raw folder once (rank 0, the others wait, in every
    mode), train on every rank with medgan.train, then evaluate the test split and write the report on
    rank 0 (the other ranks return 0)."""
    from medgan.config import config_from_cli
    from medgan.distributed import init_distributed, read_context, run_on_main, set_thread_share

    mode_parser = argparse.ArgumentParser(prog="python -m medgan", add_help=False)
    mode_parser.add_argument("--mode", choices=MODES, required=True)
    known, rest = mode_parser.parse_known_args(argv)
    config = config_from_cli(rest)
    checkpoint_dir = Path(config.checkpoint.dir)
    trains = known.mode in ("train", "both")
    context = read_context()
    if trains or context.world_size > 1:
        # the other ranks need a process group to wait on rank 0's sharding
        context = init_distributed()
        set_thread_share(context)
    shards = run_on_main(
        lambda: shards_for(config.data.data_path, checkpoint_dir),
        timedelta(seconds=SHARD_WAIT_SECONDS),
        f"shard {config.data.data_path}",
    )
    if trains:
        from medgan.train import train

        config.data.data_path = str(shards)
        train(config, context)
    if known.mode == "train" or not context.is_main:
        return 0
    evaluation = checkpoint_dir / "eval"
    evaluate_checkpoint(
        config.checkpoint.file or str(checkpoint_dir),
        evaluation,
        data_path=str(shards),
        split="test",
        input_modalities=config.data.input_modalities or None,
        target_modality=None if config.data.target_modality == "any" else config.data.target_modality,
        report=str(evaluation / "report.html"),
        batch_size=config.data.batch_size,
        command="python -m medgan " + shlex.join(argv),
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv and argv[0] in SUBCOMMANDS else "--mode"
    try:
        if command == "--mode":
            if not any(token == "--mode" or token.startswith("--mode=") for token in argv):
                commands = ", ".join(SUBCOMMANDS)
                print(
                    f"python -m medgan: error: give a command ({commands}) or --mode train|test|both",
                    file=sys.stderr,
                )
                return EXIT_INPUT_ERROR
            return run_front_door(argv)
        args = build_tool_parser().parse_args(argv)
        return args.run(args, argv)
    except UserError as error:
        print(f"medgan {command.lstrip('-')}: error: {error}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    except KeyboardInterrupt:
        print(f"medgan {command.lstrip('-')}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
