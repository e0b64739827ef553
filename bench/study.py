"""The study: does the state-space generator beat the matched U-Net and its own scan-off ablation at equal
CPU time? Declared in docs/results.md before it ran; this script runs it and writes the tables there.

    python bench/study.py [--out runs/study] [--budget-minutes 6] [--seeds 0 1 2]
                          [--parts l1 gan pilot report] [--subjects 80] [--cores 0 1]
                          [--results docs/results.md]

Arms, all on one fixed task (t1 t1ce t2 -> flair) of a seeded BraTS-layout phantom (tumour and tumour-free
subjects), one process each on one pinned core (one torch thread), ``configs/demo.yaml``'s generator and
recipe with a constant learning rate:

- ``l1``: L1-only (``training.adversarial_weight 0``) U-Net (width matched to the SSM's parameter count),
  SSM and SSM with ``scan_off``, each seed of ``--seeds``, at 64 x 64 (the primary comparison);
- ``gan``: the SSM and the U-Net with the adversarial term (``adversarial_weight 1``), each seed;
- ``pilot``: one seed of the three L1-only arms at 128 x 128, the SSM stages at the encoder levels whose
  convolutional receptive field is smaller than the image (``receptive_fields``).

Every run stops when its training loop has used ``--budget-minutes`` of CPU time
(``training.cpu_budget_seconds``); validation on the whole val split every ``VAL_EVERY`` steps keeps the
best-PSNR checkpoint, which ``python -m medgan evaluate`` scores on the test split. Two runs go at once, one
per core of ``--cores``; a background thread samples the load average every 30 s into ``OUT/load.csv``.

Resumable: a run writes ``OUT/runs/NAME/train.json`` when it finishes and its evaluation
``OUT/eval/NAME/summary.json``; both are skipped when present, and a run stopped before its
``train.json`` starts again from scratch (its CPU time stays whole). ``report`` writes the tables between
``<!-- study:tables -->`` and ``<!-- study:end -->`` of ``--results`` and leaves the rest of that file (the
declaration and the reading) as it is.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# bench/data_prep.py would shadow the data_prep package that medgan imports: drop this script's folder.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from medgan.checkpointing import read_best_tag, read_run_record, step_of_tag  # noqa: E402
from medgan.scoring import holm_adjusted, paired_statistics  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/demo.yaml"
INPUTS, TARGET = ("t1", "t1ce", "t2"), "flair"
BATCH = 4
ALPHA = 0.05
PRIMARY = ("tumour", "psnr")
SECONDARY = (("brain", "ssim"), ("tumour", "ssim"), ("brain", "mae"), ("tumour", "mae"), ("brain", "psnr"))
DIGITS = {"psnr": 2, "ssim": 4, "mae": 4}
# Validation (the whole val split) every this many steps at each size: a few seconds each at 64 x 64.
VAL_EVERY = {64: 200, 128: 100}
PARTS = ("l1", "gan", "pilot", "report")
ARMS = {
    "unet": ["--model.generator.arch", "unet"],
    # demo.yaml's generator was the SSM generator when this study ran; the arms name it since the second
    # study moved demo.yaml to the U-Net
    "ssm": ["--model.generator.arch", "ssm"],
    "scanoff": ["--model.generator.arch", "ssm", "--model.generator.scan_off", "true"],
}
LABELS = {"unet": "U-Net", "ssm": "SSM", "scanoff": "SSM, scan off"}


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ------------------------------------------------------------------------------------------- the runs
@dataclass(frozen=True)
class Run:
    """One training: its recipe (``l1`` or ``gan``), arm, seed and image size."""

    recipe: str
    arm: str
    seed: int
    size: int

    @property
    def name(self) -> str:
        size = "" if self.size == 64 else f"_{self.size}"
        return f"{self.recipe}_{self.arm}{size}_seed{self.seed}"


def receptive_fields(depth: int) -> dict[str, int]:
    """Receptive field in input pixels of the features at each encoder level's SSM stage and at the
    bottleneck's: the 3x3 stem, two 3x3 convolutions per ConvBlock, a 4x4 stride-2 convolution down."""
    field, jump, fields = 3, 1, {}
    for level in range(depth):
        field += 2 * 2 * jump  # the level's ConvBlock
        fields[f"level {level}"] = field
        field += 3 * jump  # the 4x4 stride-2 downsampling
        jump *= 2
    fields["bottleneck"] = field + 2 * 2 * jump
    return fields


def ssm_levels_without_global_reach(size: int, depth: int) -> list[int]:
    """Encoder levels whose features see less than the whole image (receptive field < size); level 0
    (full-resolution sequences) is left out: its scans are the costliest and its features see 7 pixels."""
    fields = receptive_fields(depth)
    return [level for level in range(1, depth) if fields[f"level {level}"] < size]


def run_flags(run: Run, shards: Path, folder: Path, budget_seconds: float) -> list[str]:
    flags = [
        "--config", CONFIG, "--data_path", str(shards), "--checkpoint_dir", str(folder),
        "--input_modalities", *INPUTS, "--target_modality", TARGET, "--batch_size", str(BATCH),
        "--data.num_workers", "0", "--training.epochs", "10000", "--training.max_steps", "0",
        "--training.cpu_budget_seconds", str(budget_seconds), "--training.lr_schedule", "constant",
        "--training.seed", str(run.seed), "--training.val_every_steps", str(VAL_EVERY[run.size]),
        "--training.val_max_subjects", "0", "--checkpoint.every_steps", "1000000",
        "--checkpoint.keep_last", "1",
        "--training.adversarial_weight", "0" if run.recipe == "l1" else "1",
        "--deepspeed.zero_stage", "0", "--logging.wandb", "disabled", "--logging.progress_bar", "false",
        "--logging.log_every_steps", "50", "--logging.image_every_steps", "1000000",
        *ARMS[run.arm],
    ]  # fmt: skip
    if run.size != 64:
        levels = ssm_levels_without_global_reach(run.size, depth=3)
        flags += ["--model.generator.ssm_levels", *map(str, levels)]
    return flags


def pinned_to(core: int | None) -> list[str]:
    """The command prefix that pins a child to one core (so torch takes one thread: medgan.distributed);
    empty without a core or without ``taskset`` (util-linux)."""
    if core is None or shutil.which("taskset") is None:
        return []
    return ["taskset", "-c", str(core)]


# What a run's behaviour depends on: their git tree hashes go into every train.json.
CODE_PATHS = ("medgan", "data_prep", "launch", "configs")


def git(*arguments: str) -> str:
    """``git ARGUMENTS`` in the repository: its stripped output ("" outside a checkout)."""
    return subprocess.run(["git", *arguments], cwd=ROOT, capture_output=True, text=True).stdout.strip()


def code_state() -> dict[str, str | bool]:
    """HEAD, the git tree of each of CODE_PATHS at HEAD, and whether any of them differs from HEAD."""
    state: dict[str, str | bool] = {"commit": git("rev-parse", "HEAD") or "unknown"}
    state.update({path: git("rev-parse", f"HEAD:{path}") for path in CODE_PATHS})
    state["dirty"] = bool(git("status", "--porcelain", "--", *CODE_PATHS))
    return state


def run_logged(command: list[str], log: Path, core: int | None) -> float:
    """Run ``command`` from the repository root with its output in ``log``; its wall seconds."""
    started = time.perf_counter()
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    with open(log, "w") as stream:
        stream.write("$ " + shlex.join(command) + "\n")
        stream.flush()
        status = subprocess.run(
            [*pinned_to(core), *command], cwd=ROOT, stdout=stream, stderr=subprocess.STDOUT, env=environment
        ).returncode
    wall = time.perf_counter() - started
    if status != 0:
        raise RuntimeError(f"{shlex.join(command[:4])} ... failed ({status}); see {log}")
    return wall


def make_data(out: Path, subjects: int, size: int) -> Path:
    """The phantom at ``size`` x ``size`` x 32, sharded 50/15/35 by subject (made once)."""
    shards = out / f"shards{size}"
    if (shards / "manifest.json").is_file():
        return shards
    raw = out / f"phantom{size}"
    shutil.rmtree(raw, ignore_errors=True)
    shutil.rmtree(shards, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    phantom = ["phantom", "--layout", "brats", "--subjects", str(subjects), "--out", str(raw), "--seed", "0"]
    phantom += ["--shape", str(size), str(size), "32"]
    shard = ["shard", "--format", "brats", "--src", str(raw), "--out", str(shards)]
    shard += ["--size", str(size), "--split", "0.5", "0.15", "0.35"]
    for arguments in (phantom, shard):
        say("python -m data_prep " + shlex.join(arguments))
        run_logged(
            [sys.executable, "-m", "data_prep", *arguments], out / f"data{size}_{arguments[0]}.log", None
        )
    return shards


def train_once(folder: Path, name: str, flags: list[str], budget_seconds: float, core: int | None) -> dict:
    """``launch/train.py FLAGS`` into ``folder``, recorded in ``folder/train.json`` with its summary,
    command, load and code; a finished run (its train.json) is read back instead, and an unfinished one
    starts again from scratch."""
    record_path = folder / "train.json"
    if record_path.is_file():
        return json.loads(record_path.read_text())
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    command = [sys.executable, "launch/train.py", *flags]
    say(f"{name}: training on core {core} (load {load_average()})")
    load_before = load_average()
    wall = run_logged(command, folder / "train.log", core)
    record = {
        **training_summary(folder),
        "name": name,
        "budget_seconds": budget_seconds,
        "process_wall_seconds": wall,
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "command": "python " + shlex.join(command[1:]),
        "code": code_state(),
    }
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    say(f"{name}: {record['steps']} steps in {record['train_cpu_seconds']} s CPU, {wall:.0f} s wall")
    return record


def train_and_evaluate(out: Path, run: Run, budget_seconds: float, core: int | None) -> dict:
    """Train ``run`` (skipped when its train.json exists), then score its best checkpoint on test."""
    folder = out / "runs" / run.name
    shards = out / f"shards{run.size}"
    flags = run_flags(run, shards, folder, budget_seconds)
    record = train_once(folder, run.name, flags, budget_seconds, core)
    evaluation = out / "eval" / run.name
    if not (evaluation / "summary.json").is_file():
        shutil.rmtree(evaluation, ignore_errors=True)
        evaluation.mkdir(parents=True)
        command = [
            sys.executable, "-m", "medgan", "evaluate", "--checkpoint", str(folder),
            "--data_path", str(shards), "--split", "test", "--input_modalities", *INPUTS,
            "--target_modality", TARGET, "--out", str(evaluation), "--batch_size", "16", "--device", "cpu",
        ]  # fmt: skip
        wall = run_logged(command, evaluation / "evaluate.log", core)
        say(f"{run.name}: evaluated in {wall:.0f} s")
    return record


def training_summary(folder: Path) -> dict:
    """Steps, CPU seconds, parameters and the validations (full precision) from the trainer's record of the
    run in checkpoint folder ``folder``, and the best tag it kept (the one ``evaluate`` scores)."""
    record = read_run_record(folder)
    if record["stopped_by"] != "cpu_budget":
        raise RuntimeError(f"{folder}: stopped by {record['stopped_by']}, not by its CPU budget")
    best_tag = read_best_tag(folder)
    if best_tag is None:
        raise RuntimeError(f"{folder}: no best tag; the run never validated")
    best_step = step_of_tag(best_tag)
    return {
        "steps": record["steps"],
        # whole seconds, as the study's records have always held them
        "train_cpu_seconds": round(record["train_cpu_seconds"]),
        "parameters": record["generator_parameters"],
        "validations": record["validations"],
        "best_step": best_step,
        "best_val_psnr": dict(map(tuple, record["validations"]))[best_step],
    }


def load_average() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


def sample_load(path: Path, stop: threading.Event, every: float = 30.0) -> None:
    """Append (unix time, 1-minute load average) to ``path`` until ``stop`` is set."""
    while not stop.is_set():
        with open(path, "a") as stream:
            stream.write(f"{time.time():.0f},{os.getloadavg()[0]:.2f}\n")
        stop.wait(every)


def run_all(out: Path, runs: list, budget_seconds: float, cores: list[int], train=None) -> None:
    """Every run, ``len(cores)`` at a time, each worker on its own core; ``train(out, run, budget_seconds,
    core)`` trains and scores one (default :func:`train_and_evaluate`; bench/study_context.py passes its
    own)."""
    free = list(cores)
    lock = threading.Lock()
    train = train or train_and_evaluate

    def work(run) -> None:
        with lock:
            core = free.pop()
        try:
            train(out, run, budget_seconds, core)
        finally:
            with lock:
                free.append(core)

    with ThreadPoolExecutor(max_workers=len(cores)) as pool:
        futures = [pool.submit(work, run) for run in runs]
        for future in as_completed(futures):
            if future.exception() is not None:
                # stop at the first failure instead of after every queued run
                pool.shutdown(wait=True, cancel_futures=True)
                raise future.exception()


# ------------------------------------------------------------------------------------------- the report
def volume_values(
    out: Path, name: str, method: str = "model", metrics=tuple(DIGITS)
) -> dict[tuple[str, str], dict[str, float]]:
    """(region, metric) -> subject -> value of each of ``metrics`` from an evaluation's per_volume.csv
    (NaN-free)."""
    values: dict[tuple[str, str], dict[str, float]] = {}
    with open(out / "eval" / name / "per_volume.csv") as stream:
        for row in csv.DictReader(stream):
            if row["method"] != method:
                continue
            for metric in metrics:
                value = float(row[metric])
                if np.isfinite(value):
                    values.setdefault((row["region"], metric), {})[row["subject"]] = value
    return values


def seed_averaged(per_seed: list[dict], endpoint: tuple[str, str]) -> dict[str, float]:
    """Subject -> the mean over seeds (subjects scored in every seed): subjects are the units."""
    common = set.intersection(*(set(seed[endpoint]) for seed in per_seed))
    return {s: float(np.mean([seed[endpoint][s] for seed in per_seed])) for s in sorted(common)}


def comparison_rows(
    arms: dict[str, list[dict]], pairs: list[tuple[str, str]], endpoint: tuple[str, str]
) -> list[dict]:
    """Paired over subjects (seed-averaged), per pair: difference, Bonferroni interval (1 - alpha/m), t p,
    Holm p over the pairs, and each seed's own mean difference over the same subjects (``per_seed``).
    A pair without a p-value (every difference 0) counts as p = 1 in Holm's correction and keeps NaN."""
    m = len(pairs)
    rows = []
    for first, second in pairs:
        a, b = seed_averaged(arms[first], endpoint), seed_averaged(arms[second], endpoint)
        subjects = sorted(set(a) & set(b))
        stats = paired_statistics(
            np.array([a[s] for s in subjects]), np.array([b[s] for s in subjects]), confidence=1 - ALPHA / m
        )
        per_seed = [
            float(np.mean([x[endpoint][s] - y[endpoint][s] for s in subjects]))
            for x, y in zip(arms[first], arms[second])
        ]
        rows.append({"pair": (first, second), **stats, "per_seed": per_seed})
    p_values = [row["ttest_p"] if np.isfinite(row["ttest_p"]) else 1.0 for row in rows]
    for row, adjusted in zip(rows, holm_adjusted(p_values)):
        row["holm_p"] = adjusted if np.isfinite(row["ttest_p"]) else float("nan")
    return rows


# Metrics where a lower value is the better one (the second study adds the through-plane error and the
# segmenter's Dice drop to the first study's MAE).
LOWER_IS_BETTER = ("mae", "through_plane_error", "dice_drop")


def better(metric: str, difference: float) -> bool:
    return difference < 0 if metric in LOWER_IS_BETTER else difference > 0


def claim_met(rows: list[dict], metric: str) -> bool:
    """The declared rule: the SSM beats every comparator, its corrected interval excluding 0 on the
    favourable side and Holm p < ALPHA."""
    return bool(rows) and all(
        better(metric, row["ci95"][0]) and better(metric, row["ci95"][1]) and row["holm_p"] < ALPHA
        for row in rows
    )


def format_row(row: dict, metric: str) -> str:
    d = DIGITS[metric]
    low, high = row["ci95"]
    return (
        f"{row['mean_difference']:+.{d}f} | [{low:+.{d}f}, {high:+.{d}f}] | {row['ttest_p']:.3g} | "
        f"{row['holm_p']:.3g} | {row['wilcoxon_p']:.3g} | {row['n']}"
    )


COLUMNS = (
    PRIMARY,
    ("brain", "psnr"),
    ("brain", "ssim"),
    ("tumour", "ssim"),
    ("brain", "mae"),
    ("tumour", "mae"),
)
COMPARISON_HEADER = [
    "| endpoint | comparison | difference | corrected 95% CI | t p | Holm p | Wilcoxon p | subjects |",
    "|---|---|---|---|---|---|---|---|",
]


def arm_table(per_arm: dict[str, list[dict]]) -> list[str]:
    """Label -> per-seed values: mean ± SD over subjects of the seed-averaged values, one row each."""
    lines = [
        "| arm | tumour PSNR (dB) | brain PSNR (dB) | brain SSIM | tumour SSIM | brain MAE | tumour MAE |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, per_seed in per_arm.items():
        cells = [mean_sd(list(seed_averaged(per_seed, c).values()), DIGITS[c[1]]) for c in COLUMNS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def equal_step_lines(records: dict[str, dict], runs: dict[str, list], labels: dict = LABELS) -> list[str]:
    """Descriptive, not an endpoint: each arm's val PSNR at the last validated step every run reached,
    so per step rather than per CPU second."""
    reached = [{step for step, _ in records[r.name]["validations"]} for group in runs.values() for r in group]
    common = set.intersection(*reached)
    if not common:
        return ["(No validated step is common to every L1 run: no per-step view.)"]
    step = max(common)
    lines = [
        f"Per step rather than per CPU second (descriptive, not an endpoint): val PSNR (dB) at step {step}, "
        "the last validated step every L1 run reached, mean over seeds (per seed in brackets):",
        "",
        "| " + " | ".join(labels[arm] for arm in runs) + " |",
        "|---" * len(runs) + "|",
    ]
    cells = []
    for group in runs.values():
        values = [dict(map(tuple, records[r.name]["validations"]))[step] for r in group]
        cells.append(f"{np.mean(values):.2f} ({', '.join(f'{v:.2f}' for v in values)})")
    return [*lines, "| " + " | ".join(cells) + " |"]


def comparison_table(
    values: dict[str, list[dict]],
    pairs: list[tuple[str, str]],
    endpoints: list[tuple[str, str]],
    labels: dict[str, str],
    declared: bool = False,
) -> tuple[list[str], dict[tuple[str, str], list[dict]]]:
    """The comparison rows of each endpoint (Holm within it), as table lines and as rows by endpoint;
    ``declared``: the declared comparisons, whose primary endpoint is marked."""
    lines, by_endpoint = list(COMPARISON_HEADER), {}
    for endpoint in endpoints:
        by_endpoint[endpoint] = comparison_rows(values, pairs, endpoint)
        for row in by_endpoint[endpoint]:
            first, second = row["pair"]
            kind = "**primary**: " if declared and endpoint == PRIMARY else ""
            lines.append(
                f"| {kind}{endpoint[0]} {endpoint[1].upper()} | {labels[first]} - {labels[second]} | "
                + format_row(row, endpoint[1])
                + " |"
            )
    return lines, by_endpoint


def mean_sd(values: list[float], digits: int) -> str:
    array = np.asarray(values, dtype=np.float64)
    spread = array.std(ddof=1) if array.size > 1 else float("nan")
    return f"{array.mean():.{digits}f} ± {spread:.{digits}f}"


def scan_shares(out: Path, name: str, size: int, batches: int = 8) -> dict[str, float]:
    """Each S6 block's rms(scan term) / rms(D * u) at the scored (best) checkpoint, the mean over the
    first ``batches`` batches of 16 slices of the test split's subjects in order, each slice given as the
    generator takes it (with its 2.5D context from its own subject when it has one)."""
    import torch

    from data_prep.shard_reader import ShardFolder
    from medgan.inference.loading import load_generator
    from medgan.models.context import generator_input
    from medgan.models.generator import recording_scan_share
    from medgan.shards import ChannelMap, subject_stacks

    generator = load_generator(out / "runs" / name)
    canonical = list(generator.modalities)
    split = ShardFolder.open(out / f"shards{size}").split("test")
    context = generator.generator_config.context_slices
    available = torch.tensor([m in INPUTS for m in canonical])
    collected: dict[str, list[float]] = {}
    done = 0
    with torch.no_grad():
        for subject in subject_stacks(split.shards, ChannelMap(split.modalities, canonical, split.directory)):
            stack = torch.from_numpy(subject.images)
            for start in range(0, len(stack), 16):
                if done >= batches:
                    break
                centres = torch.arange(start, min(start + 16, len(stack)))
                with recording_scan_share(generator.module) as shares:
                    generator.module(
                        generator_input(stack, centres, context),
                        available.expand(len(centres), -1),
                        torch.full((len(centres),), canonical.index(TARGET)),
                    )
                for block, share in shares.items():
                    collected.setdefault(block, []).append(share)
                done += 1
            if done >= batches:
                break
    return {block: float(np.mean(values)) for block, values in collected.items()}


def plot_curves(panels: dict[str, list[tuple[dict, str, str, str]]], path: Path, ylabel: str) -> None:
    """Val PSNR against training-loop CPU minutes, a panel per title and a line per ``(record, label,
    colour, line style)`` (a run's CPU time at a step taken as its mean CPU time per step times the step)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), sharey=True, squeeze=False)
    for axis, (title, lines) in zip(axes[0], panels.items()):
        for record, label, colour, style in lines:
            per_step = record["train_cpu_seconds"] / record["steps"] / 60
            steps, psnr = zip(*record["validations"])
            axis.plot([st * per_step for st in steps], psnr, style, marker=".", color=colour, alpha=0.8,
                      label=label)  # fmt: skip
        handles, labels = axis.get_legend_handles_labels()
        unique = dict(zip(labels, handles))
        axis.legend(unique.values(), unique.keys(), fontsize=8)
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("training-loop CPU minutes")
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_validation(records: dict[str, dict], groups: dict[str, list[str]], path: Path) -> None:
    """The first study's curves: one panel per group of run names, coloured by arm, GAN runs dashed."""
    colours = {"unet": "tab:blue", "ssm": "tab:red", "scanoff": "tab:orange"}
    panels = {}
    for title, names in groups.items():
        panels[title] = []
        for name in names:
            arm = name.split("_")[1]  # Run.name: recipe_arm[_size]_seedN
            gan = name.startswith("gan_")
            label = ("GAN " if gan else "") + LABELS[arm]
            panels[title].append((records[name], label, colours[arm], "--" if gan else "-"))
    plot_curves(panels, path, "val PSNR (dB, brain, per slice)")


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
        f"Python {platform.python_version()}, torch {torch.__version__}"
    )


def code_line(records: dict[str, dict]) -> str:
    """Which code the runs trained with: the git trees of CODE_PATHS, grouped."""
    groups: dict[str, list[str]] = {}
    for name, record in records.items():
        code = record.get("code")
        key = (
            "not recorded"
            if code is None
            else " ".join(f"{p} {str(code[p])[:10]}" for p in CODE_PATHS)
            + (", uncommitted changes" if code["dirty"] else ", clean")
            + f" (commit {str(code['commit'])[:7]})"
        )
        groups.setdefault(key, []).append(name)
    if len(groups) == 1:
        return f"- **Code**: {next(iter(groups))}, for every run."
    return (
        "- **Code** (differs between runs): "
        + "; ".join(f"{key}: {', '.join(names)}" for key, names in groups.items())
        + "."
    )


def git_commit() -> str:
    return git("rev-parse", "--short", "HEAD") or "unknown"


def study_command(args: argparse.Namespace) -> str:
    """The command that runs (or continues) this study and writes its tables: every part."""
    command = ["python", "bench/study.py", "--budget-minutes", f"{args.budget_minutes:g}"]
    command += ["--seeds", *map(str, args.seeds), "--subjects", str(args.subjects)]
    return shlex.join(command)


def write_report(args: argparse.Namespace, invocation: str) -> str:
    """The tables (markdown) from every finished run and evaluation; raises on a missing one."""
    out, seeds = args.out, args.seeds
    records = {p.parent.name: json.loads(p.read_text()) for p in sorted((out / "runs").glob("*/train.json"))}
    l1 = {arm: [Run("l1", arm, s, 64) for s in seeds] for arm in ARMS}
    gan = {arm: [Run("gan", arm, s, 64) for s in seeds] for arm in ("unet", "ssm")}
    pilot = {arm: [Run("l1", arm, seeds[0], 128)] for arm in ARMS}
    needed = [r for group in (l1, gan, pilot) for runs in group.values() for r in runs]
    missing = [r.name for r in needed if not (out / "eval" / r.name / "summary.json").is_file()]
    if missing:
        raise SystemExit(f"bench/study.py: report needs {' '.join(missing)} (run the other parts first)")
    values = {r.name: volume_values(out, r.name) for r in needed}
    copied = volume_values(out, l1["ssm"][0].name, "best_input_copy")
    manifest = json.loads((out / "shards64" / "manifest.json").read_text())
    splits = {k: (v["samples"], len(v.get("subjects", []))) for k, v in manifest["splits"].items()}
    test_tumour = len(seed_averaged([values[l1["ssm"][0].name]], PRIMARY))
    loads = [float(line.split(",")[1]) for line in (out / "load.csv").read_text().splitlines() if line]
    budget_minutes = records[l1["ssm"][0].name]["budget_seconds"] / 60

    lines = [
        "Made by (it runs what is missing, then writes these tables; stopped, it continues):",
        "",
        "```",
        study_command(args),
        "```",
        "",
        f"These tables: `{invocation}`, `bench/study.py` at commit `{git_commit()}`; each run's command "
        "is in `runs/study/runs/NAME/train.json`, each evaluation's in `runs/study/eval/NAME/summary.json`.",
        "",
        "### Setup as run",
        "",
        code_line(records),
        f"- **Machine**: {machine()}; two runs at a time, each pinned to one core (one torch thread). Load "
        f"average (1 min) sampled every 30 s during the study: median {np.median(loads):.2f}, "
        f"range {min(loads):.2f}-{max(loads):.2f} ({len(loads)} samples), on 2 cores.",
        f"- **Data** (64 x 64): {args.subjects} phantom subjects; train {splits['train'][1]} subjects "
        f"({splits['train'][0]} slices), val {splits['val'][1]} ({splits['val'][0]}), test "
        f"{splits['test'][1]} ({splits['test'][0]}), of which {test_tumour} have a tumour (the primary "
        "endpoint's subjects).",
        f"- **Budget**: {budget_minutes:g} min of training-loop CPU time per run "
        f"(`training.cpu_budget_seconds {budget_minutes * 60:g}`), validation every {VAL_EVERY[64]} steps "
        f"({VAL_EVERY[128]} at 128) on the whole val split, the best-val-PSNR checkpoint scored.",
        "",
        "### Steps reached and compute",
        "",
        "| run | parameters | steps | epochs | CPU s (loop) | best-val step | process wall s |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in needed:
        record = records[run.name]
        samples = splits["train"][0] if run.size == 64 else None
        epochs = f"{record['steps'] * BATCH / samples:.1f}" if samples else "-"
        lines.append(
            f"| {run.name} | {record['parameters']:,} | {record['steps']} | {epochs} | "
            f"{record['train_cpu_seconds']} | {record['best_step']} | {record['process_wall_seconds']:.0f} |"
        )

    # primary and secondary endpoints, L1 arms
    arm_values = {arm: [values[r.name] for r in runs] for arm, runs in l1.items()}
    lines += [
        "",
        "### Arms (L1-only, 64 x 64)",
        "",
        "Mean ± SD over test subjects of each subject's value averaged over seeds "
        f"({' '.join(map(str, seeds))}); tumour-region rows over the {test_tumour} subjects with a tumour.",
        "",
        *arm_table({**{LABELS[a]: v for a, v in arm_values.items()}, "Best copied input": [copied]}),
        "",
        "Per seed, mean tumour PSNR (dB) over test subjects:",
        "",
        "| seed | " + " | ".join(LABELS[a] for a in ARMS) + " |",
        "|---" * (len(ARMS) + 1) + "|",
    ]
    for index, seed in enumerate(seeds):
        cells = [f"{np.mean(list(arm_values[a][index][PRIMARY].values())):.2f}" for a in ARMS]
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    lines += ["", *equal_step_lines(records, l1)]
    pairs = [("ssm", "unet"), ("ssm", "scanoff")]
    table, by_endpoint = comparison_table(arm_values, pairs, [PRIMARY, *SECONDARY], LABELS, declared=True)
    claim = claim_met(by_endpoint[PRIMARY], PRIMARY[1])
    lines += [
        "",
        "### The declared comparisons",
        "",
        "Paired over test subjects (seed-averaged). Corrected 95% CI: the paired t interval at "
        f"1 - 0.05/{len(pairs)} (Bonferroni); Holm p over the {len(pairs)} comparisons of each endpoint. "
        "Positive favours the first arm for PSNR and SSIM, negative for MAE.",
        "",
        *table,
        "",
        f"**Declared rule**: an SSM advantage is claimed only if it beats both comparators on the primary "
        f"endpoint with the corrected interval excluding 0 and Holm p < {ALPHA}. **Met: "
        f"{'yes' if claim else 'no'}.**",
    ]

    # the adversarial term
    gan_values = {f"gan_{a}": [values[r.name] for r in runs] for a, runs in gan.items()}
    everything = {**{f"l1_{a}": v for a, v in arm_values.items()}, **gan_values}
    gan_pairs = [("gan_ssm", "l1_ssm"), ("gan_unet", "l1_unet"), ("gan_ssm", "gan_unet")]
    names = {"gan_ssm": "SSM + GAN", "gan_unet": "U-Net + GAN", "l1_ssm": "SSM, L1", "l1_unet": "U-Net, L1"}
    table, _ = comparison_table(everything, gan_pairs, [PRIMARY, ("brain", "ssim"), ("brain", "mae")], names)
    lines += [
        "",
        "### The adversarial term (64 x 64)",
        "",
        *arm_table({names[key]: per_seed for key, per_seed in gan_values.items()}),
        "",
        f"Holm over these {len(gan_pairs)} comparisons per endpoint, intervals at 1 - 0.05/{len(gan_pairs)}.",
        "",
        *table,
    ]

    # the 128 x 128 pilot
    pilot_values = {arm: [values[r.name] for r in runs] for arm, runs in pilot.items()}
    fields = receptive_fields(3)
    levels = ssm_levels_without_global_reach(128, 3)
    table, _ = comparison_table(pilot_values, pairs, [PRIMARY, ("brain", "ssim")], LABELS)
    lines += [
        "",
        f"### Pilot: 128 x 128, one seed ({seeds[0]}), L1-only",
        "",
        "Receptive field (input pixels) of the features at each SSM position, depth 3: "
        + ", ".join(f"{k} {v}" for k, v in fields.items())
        + f"; the pilot's SSM stages at encoder levels {levels} (and the bottleneck), the 64 x 64 arms' at "
        "[2] (configs/demo.yaml). One seed: the paired test sees subjects, not training runs.",
        "",
        *arm_table({LABELS[arm]: per_seed for arm, per_seed in pilot_values.items()}),
        "",
        *table,
    ]

    # scan share
    lines += [
        "",
        "### Scan share after training",
        "",
        "Each S6 block's rms(scan term) / rms(D * u) at the scored checkpoint, mean over the first 8 test "
        "batches: 0 would mean the scan adds nothing to the block's output, 1 as much as its skip term "
        "D * u.",
        "",
    ]
    share_runs = [*l1["ssm"], *gan["ssm"], *pilot["ssm"]]
    shares = {r.name: scan_shares(out, r.name, r.size) for r in share_runs}
    blocks = sorted({b for s in shares.values() for b in s})
    lines += ["| run | " + " | ".join(f"`{b}`" for b in blocks) + " |", "|---" * (len(blocks) + 1) + "|"]
    for name, share in shares.items():
        lines.append(
            f"| {name} | " + " | ".join(f"{share[b]:.3f}" if b in share else "-" for b in blocks) + " |"
        )
    figure = args.results.parent / "images" / "study_validation.png"
    plot_validation(
        records,
        {
            "64 x 64, L1-only": [r.name for runs in l1.values() for r in runs],
            "64 x 64, with the adversarial term": [r.name for runs in gan.values() for r in runs],
            "128 x 128 pilot, L1-only": [r.name for runs in pilot.values() for r in runs],
        },
        figure,
    )
    lines += [
        "",
        "Val PSNR (whole val split, brain mask, mean over slices) through each run, against its "
        "training-loop CPU time:",
        "",
        f"![validation PSNR against CPU time]({figure.relative_to(args.results.parent)})",
    ]
    total_wall = sum(r["process_wall_seconds"] for r in records.values())
    lines += [
        "",
        f"Compute: {len(records)} trainings, {total_wall / 3600:.2f} h of process wall time (start-up and "
        "validation included) over 2 cores.",
    ]
    return "\n".join(lines) + "\n"


def insert_tables(results: Path, tables: str, marker: str = "study") -> None:
    """``tables`` between ``<!-- MARKER:tables -->`` and ``<!-- MARKER:end -->`` of ``results``."""
    start, end = f"<!-- {marker}:tables -->", f"<!-- {marker}:end -->"
    text = results.read_text()
    if start not in text or end not in text:
        raise SystemExit(f"{results}: needs the markers {start} and {end} where the tables go")
    before, rest = text.split(start, 1)
    after = rest.split(end, 1)[1]
    results.write_text(before + start + "\n\n" + tables + "\n" + end + after)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("runs/study"), help="data, runs and evaluations")
    parser.add_argument("--budget-minutes", type=float, default=6.0, help="training-loop CPU time per run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--subjects", type=int, default=80, help="phantom subjects")
    parser.add_argument("--cores", type=int, nargs="+", default=[0, 1], help="one run at a time on each")
    parser.add_argument("--results", type=Path, default=Path("docs/results.md"))
    args = parser.parse_args()
    args.out = args.out if args.out.is_absolute() else ROOT / args.out
    args.results = args.results if args.results.is_absolute() else ROOT / args.results
    invocation = "python bench/study.py " + shlex.join(sys.argv[1:])
    budget = args.budget_minutes * 60

    runs: list[Run] = []
    if "l1" in args.parts:
        runs += [Run("l1", arm, seed, 64) for seed in args.seeds for arm in ARMS]
    if "gan" in args.parts:
        runs += [Run("gan", arm, seed, 64) for seed in args.seeds for arm in ("ssm", "unet")]
    if "pilot" in args.parts:
        runs += [Run("l1", arm, args.seeds[0], 128) for arm in ARMS]
    for size in sorted({run.size for run in runs} | ({64, 128} if "report" in args.parts else set())):
        make_data(args.out, args.subjects, size)
    stop = threading.Event()
    if runs:  # the load while runs train (or are checked as done), not while a report is written
        threading.Thread(target=sample_load, args=(args.out / "load.csv", stop), daemon=True).start()
    try:
        run_all(args.out, runs, budget, args.cores)
    except RuntimeError as error:
        raise SystemExit(f"bench/study.py: {error}") from None
    finally:
        stop.set()
    if "report" in args.parts:
        tables = write_report(args, invocation)
        print(tables)
        insert_tables(args.results, tables)
        say(f"wrote the tables into {args.results}")


if __name__ == "__main__":
    main()
