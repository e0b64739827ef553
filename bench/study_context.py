"""The second study: does context across slices pay, and does the state-space branch carry it? Declared in
docs/results.md ("The second study") before its first run; this script runs it and writes its tables.

    python bench/study_context.py [--out runs/study_context] [--budget-minutes M] [--seeds 0 1 2]
                                  [--parts data calibration l1 gan report] [--subjects 80] [--cores 0 1]
                                  [--results docs/results.md]

Arms, on one fixed task (t1 t1ce t2 -> flair) of a seeded BraTS-layout phantom sampled close to isotropic
(``--shape 64 64 56``: 3.375 x 3.375 x 3.0 mm), one process each on one pinned core (one torch thread),
``configs/demo.yaml``'s recipe with a constant learning rate, the same U-Net trunk (width 16, depth 3) and
the same batch of 8 slices for every arm:

- ``l1`` (L1 only, each seed of ``--seeds``): the 2D U-Net; the 2.5D U-Net (``context_slices 2``); the 2D
  hybrid (``arch hybrid``, the branch beside the bottleneck, ``slab_slices 1``); the slab hybrid (the same
  with ``slab_slices 8``, one slab per step);
- ``gan`` (the adversarial term, each seed): the 2D U-Net and the L1 arm with the best mean primary endpoint
  (the runner-up when that is the 2D U-Net), with ``adversarial_weight 1``;
- ``calibration``: one 2D U-Net run (seed 100, not a result) with a long budget, whose validation curve
  chose ``--budget-minutes`` before the declaration.

Every run stops when its training loop has used ``--budget-minutes`` of CPU time; validation on the whole
volumes of the whole val split every ``VAL_EVERY`` steps keeps the best-PSNR checkpoint. That checkpoint is
scored on the test split three ways: ``medgan evaluate`` on the shards (per volume, whole volumes, as
``synthesize`` predicts them: the endpoints and the through-plane metrics), ``--protocol brasyn`` and the
segmenter score (``tests/segmenter_threshold.py``) on the test subjects' NIfTI files. Beside the arms the
floor: each test subject's FLAIR as the phantom renders it without the bias field and the noise
(``data_prep phantom --noise-free``), and with the noise's mean lift, sharded like the real one and scored
against it.

Resumable: a run writes ``OUT/runs/NAME/train.json`` when it finishes and each evaluation its
``summary.json``; both are skipped when present, and a run stopped before its ``train.json`` starts again
from scratch. ``report`` writes the tables between ``<!-- study-context:tables -->`` and
``<!-- study-context:end -->`` of ``--results`` and leaves the rest of that file as it is.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import shlex
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# bench/data_prep.py would shadow the data_prep package that medgan imports: drop this script's folder.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

ROOT = Path(__file__).resolve().parents[1]


def _first_study():
    """bench/study.py, whose run machinery (pinned cores, the code and load records, the run summary, the
    report markers) this study shares."""
    spec = importlib.util.spec_from_file_location("bench_study", ROOT / "bench" / "study.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


study = _first_study()

from medgan.scoring import score_volume  # noqa: E402

CONFIG = "configs/demo.yaml"
INPUTS, TARGET = ("t1", "t1ce", "t2"), "flair"
SHAPE = (64, 64, 56)
SPLIT = ("0.5", "0.15", "0.35")
BATCH = 8  # slices per step, every arm: one 8-slice slab for the slab hybrid
SHUFFLE_BUFFER = 512  # slices (about 10 subjects), every arm
TRUNK_WIDTH = 16  # demo.yaml's U-Net width (matched to its SSM generator), every arm's trunk
VAL_EVERY = 200
CALIBRATION_SEED, CALIBRATION_MINUTES = 100, 24.0
ALPHA = study.ALPHA
PARTS = ("data", "calibration", "l1", "gan", "report")
ARMS = {
    "unet2d": ["--model.generator.arch", "unet"],
    "unet25d": ["--model.generator.arch", "unet", "--model.generator.context_slices", "2"],
    "hybrid2d": ["--model.generator.arch", "hybrid", "--model.generator.ssm_levels", "[]"],
    "hybridslab": [
        "--model.generator.arch", "hybrid", "--model.generator.ssm_levels", "[]", "--data.slab_slices", "8",
    ],
}  # fmt: skip
LABELS = {"unet2d": "2D U-Net", "unet25d": "2.5D U-Net", "hybrid2d": "2D hybrid", "hybridslab": "slab hybrid"}
# The declared comparisons: the slab hybrid against each other arm.
PAIRS = [("hybridslab", "unet2d"), ("hybridslab", "unet25d"), ("hybridslab", "hybrid2d")]
PRIMARY = ("tumour", "psnr")
SECONDARY = (
    ("brain", "through_plane_error"), ("tumour", "through_plane_error"), ("brain", "ssim_sagittal"),
    ("brain", "ssim_coronal"), ("brain", "ssim"), ("tumour", "ssim"), ("brain", "mae"), ("tumour", "mae"),
    ("brain", "psnr"),
)  # fmt: skip
DIGITS = {"psnr": 2, "ssim": 4, "mae": 4, "through_plane_error": 5, "ssim_sagittal": 4, "ssim_coronal": 4}
FLOORS = {"noise_free": "floor: noise-free FLAIR", "expected": "floor: with the noise's mean lift"}


@dataclass(frozen=True)
class Run:
    """One training: its recipe (``l1``, ``gan`` or ``calibration``), arm and seed."""

    recipe: str
    arm: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.recipe}_{self.arm}_seed{self.seed}"


def run_flags(run: Run, shards: Path, folder: Path, budget_seconds: float) -> list[str]:
    return [
        "--config", CONFIG, "--data_path", str(shards), "--checkpoint_dir", str(folder),
        "--input_modalities", *INPUTS, "--target_modality", TARGET, "--batch_size", str(BATCH),
        "--data.shuffle_buffer", str(SHUFFLE_BUFFER), "--data.num_workers", "0",
        "--model.generator.unet_base_channels", str(TRUNK_WIDTH),
        "--training.epochs", "10000", "--training.max_steps", "0",
        "--training.cpu_budget_seconds", str(budget_seconds), "--training.lr_schedule", "constant",
        "--training.seed", str(run.seed), "--training.val_every_steps", str(VAL_EVERY),
        "--training.val_max_subjects", "0", "--checkpoint.every_steps", "1000000",
        "--checkpoint.keep_last", "1",
        "--training.adversarial_weight", "1" if run.recipe == "gan" else "0",
        "--deepspeed.zero_stage", "0", "--logging.wandb", "disabled", "--logging.progress_bar", "false",
        "--logging.log_every_steps", "50", "--logging.image_every_steps", "1000000",
        *ARMS[run.arm],
    ]  # fmt: skip


# ------------------------------------------------------------------------------------------- the data
def make_data(out: Path, subjects: int, shape: tuple[int, int, int] = SHAPE) -> None:
    """The phantom and its noise-free references, each sharded with the same split (made once), and the
    test subjects' NIfTI folder (copies) for the BraSyn and segmenter scores."""
    done = out / "data.json"
    if done.is_file():
        return
    out.mkdir(parents=True, exist_ok=True)
    phantom = ["phantom", "--layout", "brats", "--subjects", str(subjects), "--out", str(out / "phantom")]
    phantom += ["--seed", "0", "--shape", *map(str, shape), "--noise-free", str(out / "references")]
    sources = {"shards": out / "phantom", **{f"shards_{k}": out / "references" / k for k in FLOORS}}
    commands = [phantom] + [
        ["shard", "--format", "brats", "--src", str(source), "--out", str(out / name),
         "--size", str(shape[0]),
         "--split", *SPLIT, "--seed", "0"]
        for name, source in sources.items()
    ]  # fmt: skip
    for arguments in commands:
        study.say("python -m data_prep " + shlex.join(arguments))
        log = out / f"data_{arguments[0]}_{Path(arguments[arguments.index('--out') + 1]).name}.log"
        study.run_logged([sys.executable, "-m", "data_prep", *arguments], log, None)
    manifests = {name: json.loads((out / name / "manifest.json").read_text()) for name in sources}
    splits = {name: {k: v["subjects"] for k, v in m["splits"].items()} for name, m in manifests.items()}
    if any(split != splits["shards"] for split in splits.values()):
        raise SystemExit(f"{out}: the references' splits differ from the phantom's: {splits}")
    test = out / "test_subjects"
    shutil.rmtree(test, ignore_errors=True)
    test.mkdir()
    for subject in splits["shards"]["test"]:
        shutil.copytree(out / "phantom" / subject, test / subject)  # discovery does not follow links
    done.write_text(json.dumps({"subjects": subjects, "shape": shape, "splits": splits["shards"]}, indent=2))


def floor_scores(out: Path) -> None:
    """``OUT/eval/floor/per_volume.csv``: each test subject's reference FLAIRs (noise-free, and with the
    noise's mean lift) scored against its real FLAIR in the shards' space, over the real one's brain mask
    and tumour, as evaluation scores a model (``scoring.score_volume``)."""
    from data_prep.shard_reader import read_split
    from medgan.shards import ChannelMap, subject_stacks

    path = out / "eval" / "floor" / "per_volume.csv"
    if path.is_file():
        return
    canonical = ["t1", "t1ce", "t2", "flair", "pd"]

    def stacks(name: str) -> dict:
        split = read_split(out / name, "test")
        channels = ChannelMap(split.modalities, canonical, split.directory)
        return {stack.subject: stack for stack in subject_stacks(split.shards, channels)}

    real = stacks("shards")
    rows = []
    for kind in FLOORS:
        for subject, reference in stacks(f"shards_{kind}").items():
            truth = real[subject]
            if not np.array_equal(truth.slices, reference.slices):
                raise SystemExit(f"{subject}: the {kind} reference keeps other slices than the real one")
            target = canonical.index(TARGET)
            pred = reference.images[:, target] * truth.mask
            task = f"{'+'.join(INPUTS)}->{TARGET}"
            rows += score_volume(kind, task, subject, pred, truth.images[:, target], truth.mask, truth.seg)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(rows[0].to_dict()))
        writer.writeheader()
        writer.writerows(row.to_dict() for row in rows)


# ------------------------------------------------------------------------------------------- the runs
def evaluations(out: Path, run: Run) -> dict[str, list[str]]:
    """The three scores of a run's best checkpoint: folder name -> ``medgan evaluate`` arguments."""
    checkpoint = str(out / "runs" / run.name)
    common = [
        "--checkpoint",
        checkpoint,
        "--target_modality",
        TARGET,
        "--batch_size",
        "16",
        "--device",
        "cpu",
    ]
    segmenter = f"{shlex.quote(sys.executable)} {shlex.quote(str(ROOT / 'tests' / 'segmenter_threshold.py'))}"
    subjects = ["--subjects", str(out / "test_subjects")]
    return {
        run.name: [*common, "--data_path", str(out / "shards"), "--split", "test",
                   "--input_modalities", *INPUTS],
        f"{run.name}_brasyn": [*common, *subjects, "--protocol", "brasyn"],
        f"{run.name}_segmenter": [*common, *subjects, "--segmenter", f"{segmenter} {{input}} {{output}}"],
    }  # fmt: skip


def train_and_evaluate(out: Path, run: Run, budget_seconds: float, core: int | None) -> dict:
    """Train ``run`` (skipped when its train.json exists), then score its best checkpoint (each score
    skipped when its summary.json exists)."""
    folder = out / "runs" / run.name
    flags = run_flags(run, out / "shards", folder, budget_seconds)
    record = study.train_once(folder, run.name, flags, budget_seconds, core)
    if run.recipe == "calibration":
        return record
    for name, arguments in evaluations(out, run).items():
        evaluation = out / "eval" / name
        if (evaluation / "summary.json").is_file():
            continue
        shutil.rmtree(evaluation, ignore_errors=True)
        evaluation.mkdir(parents=True)
        command = [sys.executable, "-m", "medgan", "evaluate", *arguments, "--out", str(evaluation)]
        wall = study.run_logged(command, evaluation / "evaluate.log", core)
        study.say(f"{name}: evaluated in {wall:.0f} s")
    return record


# ------------------------------------------------------------------------------------------- the report
def volume_values(out: Path, name: str, method: str = "model") -> dict[tuple[str, str], dict[str, float]]:
    """(region, metric) -> subject -> value of this study's metrics (bench/study.py reads the file)."""
    return study.volume_values(out, name, method, tuple(DIGITS))


seed_averaged = study.seed_averaged  # subject -> the mean over seeds: subjects are the units


def extra_values(out: Path, name: str) -> dict[tuple[str, str], dict[str, float]]:
    """The BraSyn SSIMs (tumour, non-tumour) and the segmenter's whole-tumour Dice drop (real minus
    synthesized) per subject, in the shape of :func:`volume_values`."""
    values: dict[tuple[str, str], dict[str, float]] = {}
    with open(out / "eval" / f"{name}_brasyn" / "brasyn.csv") as stream:
        for row in csv.DictReader(stream):
            if row["method"] == "model":
                for region in ("tumour", "non_tumour"):
                    value = float(row[f"ssim_{region}"])
                    if np.isfinite(value):
                        values.setdefault((f"brasyn {region}", "ssim"), {})[row["subject"]] = value
    with open(out / "eval" / f"{name}_segmenter" / "segmentation.csv") as stream:
        for row in csv.DictReader(stream):
            value = float(row["dice_drop"])
            if row["region"] == "WT" and np.isfinite(value):
                values.setdefault(("segmenter WT", "dice_drop"), {})[row["subject"]] = value
    return values


better = study.better  # lower is better for MAE, the through-plane error and the Dice drop
comparison_rows = study.comparison_rows  # paired, Bonferroni interval, Holm, and each seed's difference


def won(row: dict, metric: str) -> bool:
    """The declared rule for one comparison: its corrected interval excludes 0 on the favourable side,
    Holm p < alpha, and every seed's own difference is favourable."""
    low, high = row["ci95"]
    return (
        better(metric, low) and better(metric, high) and row["holm_p"] < ALPHA
        and all(better(metric, d) for d in row["per_seed"])
    )  # fmt: skip


def claims(rows: list[dict]) -> tuple[bool, bool]:
    """(the branch earns its place: both U-Nets beaten; the scan across slices is what helps: the 2D
    hybrid beaten too), on the primary endpoint's rows in PAIRS order."""
    metric = PRIMARY[1]
    earns = won(rows[0], metric) and won(rows[1], metric)
    return earns, earns and won(rows[2], metric)


def digits(metric: str) -> int:
    return DIGITS.get(metric, 4)


def comparison_lines(values, pairs, endpoints, labels) -> tuple[list[str], dict]:
    lines = [
        "| endpoint | comparison | difference | corrected CI | t p | Holm p | per seed | subjects |",
        "|---|---|---|---|---|---|---|---|",
    ]
    by_endpoint = {}
    for endpoint in endpoints:
        by_endpoint[endpoint] = comparison_rows(values, pairs, endpoint)
        d = digits(endpoint[1])
        for row in by_endpoint[endpoint]:
            first, second = row["pair"]
            low, high = row["ci95"]
            mark = "**primary**: " if endpoint == PRIMARY else ""
            seeds = ", ".join(f"{x:+.{d}f}" for x in row["per_seed"])
            lines.append(
                f"| {mark}{endpoint[0]} {endpoint[1]} | {labels[first]} - {labels[second]} | "
                f"{row['mean_difference']:+.{d}f} | [{low:+.{d}f}, {high:+.{d}f}] | {row['ttest_p']:.3g} | "
                f"{row['holm_p']:.3g} | {seeds} | {row['n']} |"
            )
    return lines, by_endpoint


ARM_COLUMNS = (
    PRIMARY, ("brain", "psnr"), ("brain", "through_plane_error"), ("tumour", "through_plane_error"),
    ("brain", "ssim_sagittal"), ("brain", "ssim_coronal"), ("brain", "ssim"), ("tumour", "ssim"),
    ("brain", "mae"), ("tumour", "mae"),
)  # fmt: skip


def arm_table(per_arm: dict[str, list[dict]]) -> list[str]:
    """Label -> per-seed values: mean ± SD over subjects of the seed-averaged values, one row each."""
    header = " | ".join(f"{region} {metric.replace('_', ' ')}" for region, metric in ARM_COLUMNS)
    lines = [f"| arm | {header} |", "|---" * (len(ARM_COLUMNS) + 1) + "|"]
    for label, per_seed in per_arm.items():
        cells = [study.mean_sd(list(seed_averaged(per_seed, c).values()), digits(c[1])) for c in ARM_COLUMNS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def calibration_lines(out: Path, args: argparse.Namespace) -> list[str]:
    """The calibration run's validation curve: a table by CPU minutes and a figure."""
    record = json.loads(
        (out / "runs" / Run("calibration", "unet2d", CALIBRATION_SEED).name / "train.json").read_text()
    )
    per_step = record["train_cpu_seconds"] / record["steps"] / 60
    figure = args.results.parent / "images" / "study_context_calibration.png"
    plot_curves({"calibration: 2D U-Net, seed 100": [record]}, figure)
    rows = ["| step | CPU min | val PSNR (dB) |", "|---|---|---|"]
    rows += [f"| {step} | {step * per_step:.1f} | {psnr:.2f} |" for step, psnr in record["validations"]]
    return [
        f"Calibration run (not a result): `{record['command']}`; {record['steps']} steps in "
        f"{record['train_cpu_seconds']} s of training-loop CPU time, best at step {record['best_step']}.",
        "",
        *rows,
        "",
        f"![the calibration run's validation curve]({figure.relative_to(args.results.parent)})",
    ]


COLOURS = {"unet2d": "tab:blue", "unet25d": "tab:green", "hybrid2d": "tab:orange", "hybridslab": "tab:red"}


def plot_curves(groups: dict[str, list[dict]], path: Path) -> None:
    """Val PSNR against training-loop CPU minutes, a panel per group and a line per run, coloured by arm."""
    panels = {
        title: [(r, LABELS[r["name"].split("_")[1]], COLOURS[r["name"].split("_")[1]], "-") for r in records]
        for title, records in groups.items()
    }
    study.plot_curves(panels, path, "val PSNR (dB, brain, per volume)")


def gan_arms(out: Path, seeds: list[int]) -> list[str]:
    """The 2D U-Net and the L1 winner on the primary endpoint (the runner-up when that is the 2D U-Net)."""
    values = {arm: [volume_values(out, Run("l1", arm, s).name) for s in seeds] for arm in ARMS}
    ranked = sorted(values, key=lambda arm: -np.mean(list(seed_averaged(values[arm], PRIMARY).values())))
    return ["unet2d", next(arm for arm in ranked if arm != "unet2d")]


def study_command(args: argparse.Namespace) -> str:
    command = ["python", "bench/study_context.py", "--budget-minutes", f"{args.budget_minutes:g}"]
    command += ["--seeds", *map(str, args.seeds), "--subjects", str(args.subjects)]
    return shlex.join(command)


def write_report(args: argparse.Namespace, invocation: str) -> str:
    """The tables (markdown) from every finished run and evaluation; raises on a missing L1 one. Until
    every adversarial run has been scored, its section says so instead of its tables (the L1 arms carry
    the declared comparisons)."""
    out, seeds = args.out, args.seeds
    records = {p.parent.name: json.loads(p.read_text()) for p in sorted((out / "runs").glob("*/train.json"))}
    l1 = {arm: [Run("l1", arm, s) for s in seeds] for arm in ARMS}

    def unscored(runs: list[Run]) -> list[str]:
        return [
            n for r in runs for n in evaluations(out, r) if not (out / "eval" / n / "summary.json").is_file()
        ]

    missing = unscored([r for runs in l1.values() for r in runs])
    if missing:
        raise SystemExit(
            f"bench/study_context.py: report needs {' '.join(missing)} (run the other parts first)"
        )
    gan = {arm: [Run("gan", arm, s) for s in seeds] for arm in gan_arms(out, seeds)}
    gan_done = not unscored([r for runs in gan.values() for r in runs])
    if not gan_done:
        gan = {}
    needed = [r for group in (l1, gan) for runs in group.values() for r in runs]
    floor_scores(out)
    values = {r.name: {**volume_values(out, r.name), **extra_values(out, r.name)} for r in needed}
    floors = {kind: [volume_values(out, "floor", kind)] for kind in FLOORS}
    copied = volume_values(out, l1["unet2d"][0].name, "best_input_copy")
    data = json.loads((out / "data.json").read_text())
    manifest = json.loads((out / "shards" / "manifest.json").read_text())
    splits = {k: (v["samples"], len(v.get("subjects", []))) for k, v in manifest["splits"].items()}
    test_tumour = len(seed_averaged([values[l1["unet2d"][0].name]], PRIMARY))
    loads = [float(line.split(",")[1]) for line in (out / "load.csv").read_text().splitlines() if line]
    budget_minutes = records[l1["unet2d"][0].name]["budget_seconds"] / 60
    lines = [
        "Made by (it runs what is missing, then writes these tables; stopped, it continues):",
        "",
        "```",
        study_command(args),
        "```",
        "",
        f"These tables: `{invocation}`, `bench/study_context.py` at commit `{study.git_commit()}`; each "
        "run's "
        "command is in `runs/study_context/runs/NAME/train.json`, each evaluation's log beside its summary.",
        "",
        "### Setup as run",
        "",
        study.code_line(records),
        f"- **Machine**: {study.machine()}; two runs at a time, each pinned to one core (one torch thread). "
        f"Load average (1 min) every 30 s during the runs: median {np.median(loads):.2f}, range "
        f"{min(loads):.2f}-{max(loads):.2f} ({len(loads)} samples), on 2 cores.",
        f"- **Data**: {data['subjects']} phantom subjects, {' x '.join(map(str, data['shape']))} voxels of "
        f"3.375 x 3.375 x 3.0 mm; train {splits['train'][1]} subjects ({splits['train'][0]} slices), val "
        f"{splits['val'][1]} ({splits['val'][0]}), test {splits['test'][1]} ({splits['test'][0]}), of which "
        f"{test_tumour} have a tumour (the primary endpoint's subjects).",
        f"- **Budget**: {budget_minutes:g} min of training-loop CPU time per run, validation every "
        f"{VAL_EVERY} "
        "steps on the whole val volumes, the best-val-PSNR checkpoint scored on whole test volumes.",
        "",
        "### Steps reached and compute",
        "",
        "| run | parameters | steps | epochs | CPU s (loop) | s per step | best-val step | process wall s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in needed:
        record = records[run.name]
        lines.append(
            f"| {run.name} | {record['parameters']:,} | {record['steps']} | "
            f"{record['steps'] * BATCH / splits['train'][0]:.1f} | {record['train_cpu_seconds']} | "
            f"{record['train_cpu_seconds'] / record['steps']:.3f} | {record['best_step']} | "
            f"{record['process_wall_seconds']:.0f} |"
        )

    arm_values = {arm: [values[r.name] for r in runs] for arm, runs in l1.items()}
    floor_table = {FLOORS[kind]: per_seed for kind, per_seed in floors.items()}
    lines += [
        "",
        "### Arms (L1 only) and the floor",
        "",
        "Mean ± SD over test subjects of each subject's value averaged over seeds "
        f"({' '.join(map(str, seeds))}); tumour rows over the {test_tumour} subjects with a tumour. The "
        "floor rows are the phantom's own FLAIR without its imperfections, scored against the real one.",
        "",
        *arm_table(
            {**{LABELS[a]: v for a, v in arm_values.items()}, **floor_table, "best copied input": [copied]}
        ),
        "",
        "Per seed, mean tumour PSNR (dB) over the test subjects with a tumour, and each arm's distance below "
        "the noise-free floor:",
        "",
        "| seed | " + " | ".join(LABELS[a] for a in ARMS) + " |",
        "|---" * (len(ARMS) + 1) + "|",
    ]
    floor_primary = np.mean(list(seed_averaged(floors["noise_free"], PRIMARY).values()))
    for index, seed in enumerate(seeds):
        cells = []
        for arm in ARMS:
            mean = np.mean(list(arm_values[arm][index][PRIMARY].values()))
            cells.append(f"{mean:.2f} ({mean - floor_primary:+.2f})")
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    lines += ["", *study.equal_step_lines(records, l1, LABELS)]

    endpoints = [PRIMARY, *SECONDARY, ("brasyn tumour", "ssim"), ("brasyn non_tumour", "ssim"),
                 ("segmenter WT", "dice_drop")]  # fmt: skip
    table, by_endpoint = comparison_lines(arm_values, PAIRS, endpoints, LABELS)
    earns, scan = claims(by_endpoint[PRIMARY])
    lines += [
        "",
        "### The declared comparisons",
        "",
        "Paired over test subjects (seed-averaged). Corrected CI: the paired t interval at 1 - 0.05/3 "
        "(Bonferroni); Holm p over the 3 comparisons of each endpoint; per seed: each seed's own mean "
        "difference over the same subjects. Positive favours the slab hybrid for PSNR and SSIM, negative for "
        "MAE, the through-plane error and the Dice drop.",
        "",
        *table,
        "",
        "**Context across slices through the state-space branch earns its place** (the slab hybrid beats "
        f"both U-Nets on the primary endpoint, corrected interval excluding 0, Holm p < {ALPHA}, every seed "
        f"the same way): **{'yes' if earns else 'no'}**. **The scan across slices is what helps** (and it "
        "beats the 2D "
        f"hybrid the same way): **{'yes' if scan else 'no'}**.",
        "",
        *defaults_lines(arm_values, {arm: [records[r.name] for r in runs] for arm, runs in l1.items()}),
    ]

    if gan_done:
        lines += ["", *adversarial_lines(values, arm_values, gan)]
    else:
        pending = ", ".join(LABELS[a] for a in gan_arms(out, seeds))
        lines += ["", ADVERSARIAL_TITLE, "", f"Not run yet ({pending}): `{study_command(args)}` runs it."]
    figure = args.results.parent / "images" / "study_context_validation.png"
    panels = {"L1 only": [records[r.name] for runs in l1.values() for r in runs]}
    if gan_done:
        panels["with the adversarial term"] = [records[r.name] for runs in gan.values() for r in runs]
    plot_curves(panels, figure)
    total_wall = sum(r["process_wall_seconds"] for r in records.values())
    lines += [
        "",
        "Val PSNR (whole val volumes, brain) through each run, against its training-loop CPU time:",
        "",
        f"![validation PSNR against CPU time]({figure.relative_to(args.results.parent)})",
        "",
        f"Compute: {len(records)} trainings, {total_wall / 3600:.2f} h of process wall time over 2 cores.",
        "",
        "### The calibration run",
        "",
        *calibration_lines(out, args),
    ]
    return "\n".join(lines) + "\n"


def defaults_lines(arm_values: dict[str, list[dict]], arm_records: dict[str, list[dict]]) -> list[str]:
    """The declared rule for configs/demo.yaml: the arm with the best mean primary endpoint, or the
    cheapest arm (by median CPU seconds per step) whose difference to it has a corrected interval (1 -
    0.05/m over the m cheaper arms) that includes 0."""
    seconds = {arm: float(np.median([r["train_cpu_seconds"] / r["steps"] for r in records]))
               for arm, records in arm_records.items()}  # fmt: skip
    means = {
        arm: np.mean(list(seed_averaged(values, PRIMARY).values())) for arm, values in arm_values.items()
    }
    best = max(means, key=means.get)
    cheaper = sorted((arm for arm in ARMS if seconds[arm] < seconds[best]), key=seconds.get)
    lines = [
        "**What sets the defaults** (declared): the arm with the best mean primary endpoint is the "
        f"**{LABELS[best]}** ({means[best]:.2f} dB, {seconds[best]:.3f} CPU s a step). CPU seconds a step "
        "(median over seeds): " + ", ".join(f"{LABELS[a]} {seconds[a]:.3f}" for a in ARMS) + ".",
    ]
    choice = best
    if cheaper:
        rows = comparison_rows(arm_values, [(best, arm) for arm in cheaper], PRIMARY)
        lines += ["", "| best - cheaper arm | difference | corrected CI |", "|---|---|---|"]
        for row in rows:
            low, high = row["ci95"]
            lines.append(f"| {LABELS[row['pair'][0]]} - {LABELS[row['pair'][1]]} | "
                         f"{row['mean_difference']:+.2f} | [{low:+.2f}, {high:+.2f}] |")  # fmt: skip
        tied = [row["pair"][1] for row in rows if row["ci95"][0] <= 0 <= row["ci95"][1]]
        choice = tied[0] if tied else best  # the cheapest of the tied arms
    lines += ["", f"So configs/demo.yaml's generator follows the **{LABELS[choice]}**."]
    return lines


ADVERSARIAL_TITLE = "### The adversarial term (secondary: does it change the ranking?)"


def adversarial_lines(values: dict, arm_values: dict, gan: dict[str, list[Run]]) -> list[str]:
    """The adversarial section: its arms and its three comparisons (Holm over them)."""
    gan_values = {f"gan_{a}": [values[r.name] for r in runs] for a, runs in gan.items()}
    everything = {**{f"l1_{a}": v for a, v in arm_values.items()}, **gan_values}
    winner = next(a for a in gan if a != "unet2d")
    gan_pairs = [
        (f"gan_{winner}", f"l1_{winner}"),
        ("gan_unet2d", "l1_unet2d"),
        (f"gan_{winner}", "gan_unet2d"),
    ]
    names = {f"l1_{a}": f"{LABELS[a]}, L1" for a in ARMS} | {f"gan_{a}": f"{LABELS[a]} + GAN" for a in ARMS}
    gan_endpoints = [PRIMARY, ("brain", "ssim"), ("brain", "through_plane_error")]
    table, _ = comparison_lines(everything, gan_pairs, gan_endpoints, names)
    return [
        ADVERSARIAL_TITLE,
        "",
        *arm_table({names[key]: per_seed for key, per_seed in gan_values.items()}),
        "",
        f"Holm over these {len(gan_pairs)} comparisons per endpoint, intervals at 1 - 0.05/{len(gan_pairs)}.",
        "",
        *table,
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", type=Path, default=Path("runs/study_context"), help="data, runs, evaluations"
    )
    parser.add_argument(
        "--budget-minutes",
        type=float,
        default=None,
        help="training-loop CPU time per run (the declared budget; needed by l1 and gan)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=["data", "l1", "gan", "report"])
    parser.add_argument("--subjects", type=int, default=80, help="phantom subjects")
    parser.add_argument("--cores", type=int, nargs="+", default=[0, 1], help="one run at a time on each")
    parser.add_argument("--results", type=Path, default=Path("docs/results.md"))
    args = parser.parse_args(argv)
    args.out = args.out if args.out.is_absolute() else ROOT / args.out
    args.results = args.results if args.results.is_absolute() else ROOT / args.results
    invocation = "python bench/study_context.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    if args.budget_minutes is None and {"l1", "gan"} & set(args.parts):
        parser.error("--budget-minutes: needed by the l1 and gan parts (docs/results.md declares it)")

    make_data(args.out, args.subjects)
    stop = threading.Event()
    if {"calibration", "l1", "gan"} & set(args.parts):  # the load while runs train, not while reporting
        threading.Thread(target=study.sample_load, args=(args.out / "load.csv", stop), daemon=True).start()
    try:
        if "calibration" in args.parts:
            study.run_all(
                args.out,
                [Run("calibration", "unet2d", CALIBRATION_SEED)],
                CALIBRATION_MINUTES * 60,
                args.cores,
                train_and_evaluate,
            )
        if "l1" in args.parts:
            runs = [Run("l1", arm, seed) for seed in args.seeds for arm in ARMS]
            study.run_all(args.out, runs, args.budget_minutes * 60, args.cores, train_and_evaluate)
        if "gan" in args.parts:
            runs = [Run("gan", arm, seed) for seed in args.seeds for arm in gan_arms(args.out, args.seeds)]
            study.run_all(args.out, runs, args.budget_minutes * 60, args.cores, train_and_evaluate)
    except (RuntimeError, subprocess.CalledProcessError) as error:
        raise SystemExit(f"bench/study_context.py: {error}") from None
    finally:
        stop.set()
    if "report" in args.parts:
        tables = write_report(args, invocation)
        print(tables)
        study.insert_tables(args.results, tables, "study-context")
        study.say(f"wrote the tables into {args.results}")


if __name__ == "__main__":
    main()
