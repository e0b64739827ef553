"""Test-split quality of the SSM generator against the copied-input baseline and the plain U-Net.

    python bench/quality.py [--out runs/quality] [--steps 50] [--seeds 0 1 2] [--ablation-seeds 0]
                            [--parts main wall ablation report] [--ablations no_ssm no_attention ...]
                            [--subjects 32] [--shape 64 64 32] [--results docs/results.md]

One fixed task (t1 t1ce t2 -> flair) on a seeded BraTS-layout phantom (made and sharded into ``OUT`` when
missing), one process, batch 4, the engine of ``launch/train.py`` with ``configs/demo.yaml``. Per seed: the
SSM generator and the parameter-matched U-Net for ``--steps`` steps; then (``wall``) the U-Net for as many
steps as fit in the SSM's mean training time (equal wall-clock); per ablation seed: the SSM with each block
of ``--ablations`` switched off, ``--steps`` steps. Each checkpoint is scored on the test split with
``python -m medgan evaluate`` (which also scores the copied input chosen on the val split), and
``report`` writes the tables to ``--results`` with the paired statistics over test subjects.

Each run writes ``OUT/runs/NAME/train.json`` when it finishes and each evaluation
``OUT/eval/NAME/summary.json``; a finished run or evaluation is skipped, so the same command continues an
interrupted study (a run without ``train.json`` is started again from scratch, so its time is whole).
Text below a ``<!-- reading -->`` line of ``--results`` is kept when the file is written again.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import re
import resource
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

# bench/data_prep.py would shadow the data_prep package that medgan imports: drop this script's folder.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from medgan.scoring import paired_statistics  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/demo.yaml"
INPUTS, TARGET = ("t1", "t1ce", "t2"), "flair"
BATCH = 4
METRICS = ("psnr", "ssim", "mae")
# Without warm-up the EMA keeps decay**steps of the random initial weights: 0.99 (the demo's) leaves 60%
# after 50 steps, 0.9 leaves 0.5%.
EMA_DECAY = 0.9
# Pinned rather than read from configs/demo.yaml, so the study does not move when the demo does.
SSM_LEVELS = "2"
# In the order they run: the SSM stages themselves first, the claim the project rests on.
ABLATIONS = {
    "no_ssm": "use_ssm",
    "no_attention": "use_attention",
    "no_dynamic_gating": "use_dynamic_gating",
    "no_multi_scale": "use_multi_scale",
    "no_multi_direction": "use_multi_direction",
}
PARTS = ("main", "wall", "ablation", "report")
PROGRESS = re.compile(r"^step (\d+)/\d+: .*img/s ([0-9.eE+-]+)")
PARAMETERS = re.compile(r"^generator ([\d,]+) parameters")


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def load_average() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


def run_logged(command: list[str], log: Path) -> tuple[float, float]:
    """Run ``command`` from the repository root with its output in ``log``; (wall s, CPU s of children)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    with open(log, "w") as stream:
        stream.write("$ " + shlex.join(command) + "\n")
        stream.flush()
        status = subprocess.run(command, cwd=ROOT, stdout=stream, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if status != 0:
        sys.exit(f"bench/quality.py: {shlex.join(command[:4])} ... failed ({status}); see {log}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def make_data(out: Path, subjects: int, shape: list[int]) -> Path:
    shards = out / "shards"
    if (shards / "manifest.json").is_file():
        return shards
    raw = out / "phantom"
    shutil.rmtree(raw, ignore_errors=True)
    shutil.rmtree(shards, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    phantom = ["phantom", "--layout", "brats", "--subjects", str(subjects), "--out", str(raw), "--seed", "0"]
    phantom += ["--shape", *map(str, shape)]
    shard = ["shard", "--format", "brats", "--src", str(raw), "--out", str(shards)]
    shard += ["--size", str(shape[0]), "--split", "0.6", "0.15", "0.25"]
    for arguments in (phantom, shard):
        say("python -m data_prep " + shlex.join(arguments))
        run_logged([sys.executable, "-m", "data_prep", *arguments], out / f"data_{arguments[0]}.log")
    return shards


def train_overrides(shards: Path, checkpoint: Path, steps: int, seed: int, model: list[str]) -> list[str]:
    """The flags of one run; validation and the saved checkpoint only at the last step."""
    return [
        "--config", CONFIG, "--data_path", str(shards), "--checkpoint_dir", str(checkpoint),
        "--input_modalities", *INPUTS, "--target_modality", TARGET, "--batch_size", str(BATCH),
        "--training.max_steps", str(steps), "--training.epochs", "1000", "--training.seed", str(seed),
        "--training.ema_decay", str(EMA_DECAY), "--training.val_every_steps", str(steps),
        "--checkpoint.every_steps", str(steps), "--deepspeed.zero_stage", "0",
        "--logging.wandb", "disabled", "--logging.progress_bar", "false", "--logging.log_every_steps", "5",
        "--model.generator.ssm_levels", SSM_LEVELS, *model,
    ]  # fmt: skip


def loop_seconds(folder: Path) -> tuple[float, float]:
    """(the training loop's seconds, its fastest s/step) from a run's train.log.

    The progress lines give images/s per window of 5 steps: their sum is the loop's own time, without
    start-up, validation and saving. The fastest window after the first (warm-up) is the least disturbed
    by other jobs, as ``timeit`` takes the best of its repeats."""
    total, previous, windows = 0.0, 0, []
    for line in (folder / "train.log").read_text().splitlines():
        match = PROGRESS.match(line)
        if match:
            step, rate = int(match.group(1)), float(match.group(2))
            total += (step - previous) * BATCH / rate
            if previous:
                windows.append(BATCH / rate)
            previous = step
    return total, min(windows, default=total / max(previous, 1))


def train(out: Path, shards: Path, name: str, steps: int, seed: int, model: list[str]) -> dict:
    """Train one run (or read its record when it already finished)."""
    folder = out / "runs" / name
    record_path = folder / "train.json"
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        say(f"{name}: done before ({record['steps']} steps, {record['train_seconds']:.0f} s), skipped")
        return record
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    command = [sys.executable, "launch/train.py", *train_overrides(shards, folder, steps, seed, model)]
    say(f"{name}: training {steps} steps (load {load_average()})")
    load_before = load_average()
    wall, cpu = run_logged(command, folder / "train.log")
    log = (folder / "train.log").read_text().splitlines()
    train_seconds, _ = loop_seconds(folder)
    parameters = next(int(m.group(1).replace(",", "")) for m in map(PARAMETERS.match, log) if m)
    record = {
        "name": name,
        "steps": steps,
        "seed": seed,
        "model_flags": model,
        "parameters": parameters,
        "train_seconds": train_seconds,
        "process_wall_seconds": wall,
        "process_cpu_seconds": cpu,
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "command": "python " + shlex.join(command[1:]),
    }
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    say(
        f"{name}: {train_seconds:.0f} s training loop ({train_seconds / steps:.2f} s/step), {wall:.0f} s wall"
    )
    return record


def equal_wall_clock_steps(out: Path, seeds: list[int], steps: int) -> int:
    """U-Net steps in the SSM's training time for ``steps`` steps, undisturbed: ``steps`` times the ratio
    of the two generators' fastest s/step (median over seeds). Other jobs' load moves a whole run's mean
    s/step by 2-10x on this shared machine, the fastest 5-step window far less."""
    fastest = {
        name: np.median([loop_seconds(out / "runs" / f"{name}_seed{s}")[1] for s in seeds])
        for name in ("ssm", "unet")
    }
    return max(1, round(float(steps * fastest["ssm"] / fastest["unet"])))


def evaluate(out: Path, shards: Path, name: str, baseline: str | None = None) -> Path:
    folder = out / "eval" / name
    if (folder / "summary.json").is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    command = [
        sys.executable, "-m", "medgan", "evaluate", "--checkpoint", str(out / "runs" / name),
        "--data_path", str(shards), "--split", "test", "--input_modalities", *INPUTS,
        "--target_modality", TARGET, "--out", str(folder), "--batch_size", "16", "--device", "cpu",
    ]  # fmt: skip
    if baseline:
        command += ["--baseline-checkpoint", str(out / "runs" / baseline)]
    say(f"{name}: evaluating on the test split" + (f" beside {baseline}" if baseline else ""))
    wall, _ = run_logged(command, folder / "evaluate.log")
    say(f"{name}: evaluated in {wall:.0f} s")
    return folder


def brain_volumes(folder: Path, method: str) -> dict[str, dict[str, float]]:
    """subject -> metric -> per-volume brain value of ``method`` in an evaluation's per_volume.csv."""
    with open(folder / "per_volume.csv") as stream:
        rows = [row for row in csv.DictReader(stream) if row["region"] == "brain" and row["method"] == method]
    return {row["subject"]: {name: float(row[name]) for name in METRICS} for row in rows}


def mean_sd(values: list[float], digits: int) -> str:
    values = np.asarray(values, dtype=np.float64)
    return f"{values.mean():.{digits}f} ± {values.std(ddof=1):.{digits}f}"


DIGITS = {"psnr": 2, "ssim": 4, "mae": 4}


def paired_cells(model: dict[str, dict], baseline: dict[str, dict], subjects: list[str]) -> list[str]:
    cells = []
    for name in METRICS:
        stats = paired_statistics(
            np.array([model[s][name] for s in subjects]), np.array([baseline[s][name] for s in subjects])
        )
        d = DIGITS[name]
        low, high = stats["ci95"]
        cells.append(
            f"{stats['mean_difference']:+.{d}f} [{low:+.{d}f}, {high:+.{d}f}], p={stats['wilcoxon_p']:.3g}"
        )
    return cells


def seed_mean(per_seed: list[dict[str, dict]], subjects: list[str]) -> dict[str, dict[str, float]]:
    """Per subject, the mean over seeds of each metric: subjects are the independent units."""
    return {s: {n: float(np.mean([seed[s][n] for seed in per_seed])) for n in METRICS} for s in subjects}


def machine() -> str:
    model = "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    import torch

    return (
        f"{os.cpu_count()} CPU cores ({model}), no GPU, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )


def git_commit() -> str:
    result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return result.stdout.strip() or "unknown"


def write_results(args: argparse.Namespace, shards: Path, invocation: str) -> None:
    out = args.out
    runs = {p.parent.name: json.loads(p.read_text()) for p in sorted((out / "runs").glob("*/train.json"))}
    ssm = [f"ssm_seed{s}" for s in args.seeds]
    unet = [f"unet_seed{s}" for s in args.seeds]
    wall = [f"unet_wall_seed{s}" for s in args.seeds]
    missing = [n for n in ssm + unet + wall if n not in runs]
    if missing:
        sys.exit(f"bench/quality.py: report needs the runs {' '.join(missing)} (run --parts main wall)")
    per = {
        "SSM": [brain_volumes(out / "eval" / n, "model") for n in ssm],
        "U-Net, equal steps": [brain_volumes(out / "eval" / n, "baseline_checkpoint") for n in ssm],
        "U-Net, equal wall-clock": [brain_volumes(out / "eval" / n, "model") for n in wall],
        "Best copied input": [brain_volumes(out / "eval" / ssm[0], "best_input_copy")],
    }
    subjects = sorted(per["SSM"][0])
    first = json.loads((out / "eval" / ssm[0] / "summary.json").read_text())
    task = next(iter(first["tasks"].values()))
    copied = task["best_input_copy"]["input"]
    manifest = json.loads((shards / "manifest.json").read_text())
    splits = {k: (v["samples"], len(v.get("subjects", []))) for k, v in manifest["splits"].items()}

    lines = [
        "# Results: FLAIR from T1, T1ce and T2 on the phantom",
        "",
        "Made by:",
        "",
        "```",
        invocation,
        "```",
        "",
        f"`bench/quality.py` at commit `{git_commit()}`; every run's own command line is in "
        f"`{out}/runs/NAME/train.json`, every evaluation's in `{out}/eval/NAME/summary.json`.",
        "",
        "## Setup",
        "",
        f"- **Machine**: {machine()}. Shared: other jobs kept the load average at "
        f"{min(min(r['load_average_before']) for r in runs.values()):.1f} to "
        f"{max(max(r['load_average_after']) for r in runs.values()):.1f} on 2 cores during the runs, so "
        "times are slow and noisy; one training at a time.",
        f"- **Data**: `python -m data_prep phantom --layout brats --subjects {args.subjects} --shape "
        f"{' '.join(map(str, args.shape))} --seed 0`, sharded with `--size {args.shape[0]} --split 0.6 0.15 "
        f"0.25`: train {splits['train'][1]} subjects ({splits['train'][0]} slices), val {splits['val'][1]} "
        f"({splits['val'][0]}), test {splits['test'][1]} ({splits['test'][0]}).",
        f"- **Task**: {' '.join(INPUTS)} -> {TARGET}, fixed; batch {BATCH}, one process, ZeRO 0, fp32; "
        f"`{CONFIG}` with `model.generator.ssm_levels: [{SSM_LEVELS}]` (pinned), `training.ema_decay: "
        f"{EMA_DECAY}` (the demo's 0.99 would leave most of the random initialisation in the EMA weights "
        "this early), validation and the one checkpoint at the last step, so the scored weights are the "
        "last EMA weights (no selection).",
    ]
    ssm_runs = [runs[n] for n in ssm]
    unet_runs = [runs[n] for n in unet]
    wall_runs = [runs[n] for n in wall]
    ssm_rate = np.mean([r["train_seconds"] / r["steps"] for r in ssm_runs])
    unet_rate = np.mean([r["train_seconds"] / r["steps"] for r in unet_runs])
    fastest = {
        name: float(np.median([loop_seconds(out / "runs" / f"{name}_seed{s}")[1] for s in args.seeds]))
        for name in ("ssm", "unet")
    }
    lines += [
        f"- **Steps**: {args.steps} per SSM run = {args.steps * BATCH} images, "
        f"{args.steps * BATCH / splits['train'][0]:.2f} epochs. Seeds {' '.join(map(str, args.seeds))} "
        f"for the main table, {' '.join(map(str, args.ablation_seeds))} for the ablations.",
        f"- **Wall-clock**: the training loop's own time (start-up, validation and saving excluded), from "
        f"the engine's images/s lines. Mean over a run: SSM {ssm_rate:.2f} s/step, U-Net {unet_rate:.2f} "
        f"s/step (means over seeds), moved by other jobs' load. Fastest 5-step window (median over seeds): "
        f"SSM {fastest['ssm']:.3f} s/step, U-Net {fastest['unet']:.3f} s/step, a ratio of "
        f"{fastest['ssm'] / fastest['unet']:.2f}, so this script allots the equal-wall-clock U-Net "
        f"{round(args.steps * fastest['ssm'] / fastest['unet'])} steps; the runs in the table had "
        + ", ".join(f"{r['steps']} steps" for r in wall_runs)
        + " (their loops took "
        + ", ".join(f"{r['train_seconds']:.0f} s" for r in wall_runs)
        + " against the SSM's "
        + ", ".join(f"{r['train_seconds']:.0f} s" for r in ssm_runs)
        + ", under whatever load there was).",
        f"- **Parameters**: SSM generator {ssm_runs[0]['parameters']:,}, U-Net "
        f"{unet_runs[0]['parameters']:,} (width matched automatically).",
        f"- **Copied input**: {copied}, chosen by the highest mean per-volume PSNR on the val split.",
        "- **Metrics**: per volume over the brain mask (3D SSIM), `[0, 1]` intensities, data range 1; "
        "definitions in each `summary.json`. Mean ± SD over test subjects and seeds.",
        "",
        "## Test split",
        "",
        "| method | steps | PSNR (dB) | SSIM | MAE |",
        "|---|---|---|---|---|",
    ]
    steps_of = {
        "SSM": str(args.steps),
        "U-Net, equal steps": str(args.steps),
        "U-Net, equal wall-clock": "/".join(str(r["steps"]) for r in wall_runs),
        "Best copied input": "-",
    }
    for method, seeds in per.items():
        cells = [mean_sd([seed[s][n] for seed in seeds for s in subjects], DIGITS[n]) for n in METRICS]
        lines.append(f"| {method} | {steps_of[method]} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Paired over the {len(subjects)} test subjects (each subject's value averaged over the seeds "
        "first): SSM minus baseline, mean difference [95% t interval], two-sided Wilcoxon signed-rank p "
        f"(`medgan.scoring.paired_statistics`). Positive favours the SSM for PSNR and SSIM, negative for "
        f"MAE. With {len(subjects)} pairs the smallest possible Wilcoxon p is "
        f"{2 / 2 ** len(subjects):.3g}.",
        "",
        "| SSM minus | PSNR (dB) | SSIM | MAE |",
        "|---|---|---|---|",
    ]
    ssm_mean = seed_mean(per["SSM"], subjects)
    for method in ("U-Net, equal steps", "U-Net, equal wall-clock", "Best copied input"):
        cells = paired_cells(ssm_mean, seed_mean(per[method], subjects), subjects)
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += ["", "Per seed (mean PSNR dB / SSIM over test subjects):", ""]
    lines += ["| seed | SSM | U-Net, equal steps | U-Net, equal wall-clock |", "|---|---|---|---|"]
    for index, seed in enumerate(args.seeds):
        cells = [
            f"{np.mean([per[m][index][s]['psnr'] for s in subjects]):.2f} / "
            f"{np.mean([per[m][index][s]['ssim'] for s in subjects]):.4f}"
            for m in ("SSM", "U-Net, equal steps", "U-Net, equal wall-clock")
        ]
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")

    ablation_names = [
        (block, f"{block}_seed{s}", f"ssm_seed{s}")
        for s in args.ablation_seeds
        for block in ABLATIONS
        if (out / "eval" / f"{block}_seed{s}" / "summary.json").is_file()
    ]
    if ablation_names:
        lines += [
            "",
            "## Ablation: each block off",
            "",
            f"The full SSM with one block switched off, {args.steps} steps, seed(s) "
            f"{' '.join(map(str, args.ablation_seeds))}; the difference is ablated minus full SSM of the "
            f"same seed, paired over the {len(subjects)} test subjects (negative PSNR/SSIM or positive "
            "MAE: the block helps).",
            "",
            "| block off | parameters | fastest s/step | PSNR (dB) | SSIM | MAE | ΔPSNR | ΔSSIM | ΔMAE |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for block, name, reference in ablation_names:
            ablated = brain_volumes(out / "eval" / name, "model")
            full = brain_volumes(out / "eval" / reference, "model")
            run = runs[name]
            values = [mean_sd([ablated[s][n] for s in subjects], DIGITS[n]) for n in METRICS]
            deltas = paired_cells(ablated, full, subjects)
            lines.append(
                f"| {block.removeprefix('no_')} | {run['parameters']:,} | "
                f"{loop_seconds(out / 'runs' / name)[1]:.3f} | " + " | ".join(values + deltas) + " |"
            )
    total = sum(r["process_wall_seconds"] for r in runs.values())
    # evaluate's own last line: "wrote summary.json, ... in N s"
    evaluated = [
        float(match.group(1))
        for log in (out / "eval").glob("*/evaluate.log")
        for match in re.finditer(r" in (\d+) s$", log.read_text(), re.MULTILINE)
    ]
    lines += [
        "",
        "## Compute",
        "",
        f"{len(runs)} trainings, {total / 60:.1f} min of process wall time (start-up included); "
        f"{len(evaluated)} evaluations, {sum(evaluated) / 60:.1f} min (as each reported it).",
        "",
    ]
    args.results.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(lines)
    marker = "<!-- reading -->"
    if args.results.is_file() and marker in args.results.read_text():
        # the hand-written reading of the numbers below the marker survives a regeneration
        text += "\n" + marker + args.results.read_text().split(marker, 1)[1]
    args.results.write_text(text)
    say(f"wrote {args.results}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("runs/quality"), help="data, runs and evaluations")
    parser.add_argument("--steps", type=int, default=50, help="training steps of the SSM and equal-step runs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--ablation-seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument(
        "--ablations",
        nargs="+",
        choices=list(ABLATIONS),
        default=list(ABLATIONS),
        help="blocks to switch off",
    )
    parser.add_argument("--subjects", type=int, default=32, help="phantom subjects")
    parser.add_argument("--shape", type=int, nargs=3, default=[64, 64, 32], metavar=("X", "Y", "Z"))
    parser.add_argument("--results", type=Path, default=Path("docs/results.md"))
    args = parser.parse_args()
    args.out = args.out if args.out.is_absolute() else ROOT / args.out
    args.results = args.results if args.results.is_absolute() else ROOT / args.results
    invocation = "python bench/quality.py " + shlex.join(sys.argv[1:])

    shards = make_data(args.out, args.subjects, args.shape)
    unet = ["--model.generator.arch", "unet"]
    if "main" in args.parts or "wall" in args.parts:
        for seed in args.seeds:
            train(args.out, shards, f"ssm_seed{seed}", args.steps, seed, [])
            train(args.out, shards, f"unet_seed{seed}", args.steps, seed, unet)
            evaluate(args.out, shards, f"ssm_seed{seed}", baseline=f"unet_seed{seed}")
    if "wall" in args.parts:
        steps = equal_wall_clock_steps(args.out, args.seeds, args.steps)
        for seed in args.seeds:
            train(args.out, shards, f"unet_wall_seed{seed}", steps, seed, unet)
            evaluate(args.out, shards, f"unet_wall_seed{seed}")
    if "ablation" in args.parts:
        for seed in args.ablation_seeds:
            train(args.out, shards, f"ssm_seed{seed}", args.steps, seed, [])
            evaluate(args.out, shards, f"ssm_seed{seed}")
            for block in args.ablations:
                flag = ABLATIONS[block]
                train(
                    args.out,
                    shards,
                    f"{block}_seed{seed}",
                    args.steps,
                    seed,
                    [f"--model.generator.{flag}", "false"],
                )
                evaluate(args.out, shards, f"{block}_seed{seed}")
    if "report" in args.parts:
        write_results(args, shards, invocation)


if __name__ == "__main__":
    main()
