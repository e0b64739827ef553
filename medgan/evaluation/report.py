"""One self-contained HTML report of an evaluation folder (``python -m medgan evaluate --out DIR``).

Everything is inline (CSS, PNG images as base64 data URIs), so the file can be mailed or attached to a
paper's supplement: per task the summary table with the baselines and the paired statistics, box plots
of per-volume PSNR / SSIM / MAE, montages (inputs | synthesized | real | |error|) of the best, median and
worst subject in axial, sagittal and coronal views (2D synthesis shows through-plane stripes in the
last two), and how every number was computed.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import itertools
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from data_prep.errors import UserError
from medgan.scoring import COPY, METRICS, MODEL, UNET, VOLUME_METRICS

VIEWS = ("axial", "sagittal", "coronal")
METRIC_LABELS = {
    "psnr": "PSNR (dB) ↑",
    "ssim": "SSIM ↑",
    "mae": "MAE ↓",
    "through_plane_error": "through-plane error ↓",
    "ssim_sagittal": "sagittal SSIM ↑",
    "ssim_coronal": "coronal SSIM ↑",
}
METHOD_LABELS = {MODEL: "MedGAN-SSM", COPY: "best input copied", UNET: "baseline checkpoint"}
# The error panel's colour scale: |error| of 0.5 (half the [0, 1] range) and above is saturated.
ERROR_SCALE = 0.5


class ReportError(UserError):
    """The evaluation folder is missing or incomplete; the one-line message names it."""


def _png(figure) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(figure)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _figure(*args, **kwargs):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def _display(plane: np.ndarray, view: str) -> np.ndarray:
    """A plane as an image with anterior (axial) or superior (sagittal, coronal) up.

    axial planes are [x, y], sagittal [z, y], coronal [z, x] (canonical RAS indices)."""
    return plane.T if view == "axial" else plane


def _aspect(view: str, spacing: np.ndarray) -> float:
    z, x, y = (float(value) for value in spacing)
    return {"axial": y / x, "sagittal": z / y, "coronal": z / x}[view]


def montage(views: dict[str, np.ndarray], title: str) -> str:
    """PNG data URI: a row per view, columns inputs | synthesized | real | |synthesized - real|."""
    names = [str(name) for name in views["input_names"]]
    has_spread = f"{VIEWS[0]}_spread" in views
    columns = [*(name.upper() for name in names), "synthesized", "real", "|error|"]
    columns += ["spread"] if has_spread else []
    figure, axes = _figure(
        len(VIEWS), len(columns), figsize=(1.9 * len(columns), 2.0 * len(VIEWS)), squeeze=False
    )
    for row, view in enumerate(VIEWS):
        inputs = views[f"{view}_inputs"].astype(np.float32)
        synthesized = views[f"{view}_synthesized"].astype(np.float32)
        real = views[f"{view}_real"].astype(np.float32)
        panels = [*inputs, synthesized, real, np.abs(synthesized - real)]
        if has_spread:
            panels.append(views[f"{view}_spread"].astype(np.float32))
        for column, (panel, label) in enumerate(zip(panels, columns)):
            axis = axes[row, column]
            # the spread shares the error's colour scale, so the two can be compared by eye
            is_error = label in ("|error|", "spread")
            axis.imshow(
                _display(panel, view),
                cmap="inferno" if is_error else "gray",
                vmin=0.0,
                vmax=ERROR_SCALE if is_error else 1.0,
                origin="lower",
                aspect=_aspect(view, views["spacing"]),
                interpolation="nearest",
            )
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title(label, fontsize=9)
            if column == 0:
                axis.set_ylabel(view, fontsize=9)
    figure.suptitle(title, fontsize=10)
    return _png(figure)


def box_plots(rows: list[dict[str, Any]], task: str, methods: list[str]) -> str:
    """PNG data URI: per-volume brain PSNR, SSIM and MAE of each method, one box per method."""
    figure, axes = _figure(1, len(METRICS), figsize=(4.0 * len(METRICS), 3.2), squeeze=False)
    for axis, name in zip(axes[0], METRICS):
        data = []
        for method in methods:
            values = [
                float(r[name])
                for r in rows
                if r["task"] == task and r["method"] == method and r["region"] == "brain" and r[name] != "nan"
            ]
            data.append([v for v in values if math.isfinite(v)])
        axis.boxplot(data, showmeans=True)
        axis.set_xticks(
            range(1, len(methods) + 1), [METHOD_LABELS[m] for m in methods], fontsize=8, rotation=15
        )
        axis.set_title(METRIC_LABELS[name], fontsize=10)
        axis.grid(axis="y", alpha=0.3)
    figure.suptitle(f"{task}: per-volume values over the brain mask", fontsize=10)
    return _png(figure)


def subset_matrix(summary: dict[str, Any]) -> str:
    """PNG data URI: the any-subset matrix, input subset (rows) x target (columns), one panel each for
    PSNR and SSIM: colour and first number the model's mean per-volume brain value, in brackets the
    copied-input baseline's in the same cell."""
    tasks = list(summary["tasks"].values())
    targets = list(dict.fromkeys(task["target"] for task in tasks))
    subsets = sorted({tuple(task["inputs"]) for task in tasks}, key=lambda subset: (len(subset), subset))
    cell = {(tuple(task["inputs"]), task["target"]): task for task in tasks}
    figure, axes = _figure(
        1, 2, figsize=(2.2 + 1.45 * len(targets) * 2, 1.0 + 0.42 * len(subsets)), squeeze=False
    )
    for axis, name in zip(axes[0], ("psnr", "ssim")):
        values = np.full((len(subsets), len(targets)), np.nan)
        labels = {}
        for (row, subset), (column, target) in itertools.product(enumerate(subsets), enumerate(targets)):
            task = cell.get((subset, target))
            if task is None:
                continue
            model = task["methods"][MODEL]["brain"]["per_volume"][name]["mean"]
            copy = task["methods"][COPY]["brain"]["per_volume"][name]["mean"]
            values[row, column] = np.nan if model is None else model
            labels[row, column] = f"{_number(model, DIGITS[name] - 1)}\n({_number(copy, DIGITS[name] - 1)})"
        image = axis.imshow(np.ma.masked_invalid(values), cmap="viridis", aspect="auto")
        for (row, column), label in labels.items():
            # dark text on the light end of viridis, light text on the dark end
            light = np.isfinite(values[row, column]) and image.norm(values[row, column]) > 0.6
            axis.text(
                column, row, label, ha="center", va="center", fontsize=7, color="black" if light else "white"
            )
        figure.colorbar(image, ax=axis, fraction=0.04)
        axis.set_xticks(range(len(targets)), [t.upper() for t in targets], fontsize=8)
        axis.set_yticks(range(len(subsets)), ["+".join(s).upper() for s in subsets], fontsize=8)
        axis.set_xlabel("target", fontsize=9)
        axis.set_title(f"{METRIC_LABELS[name]}: model (best input copied)", fontsize=9)
    axes[0][0].set_ylabel("inputs", fontsize=9)
    figure.tight_layout()
    return _png(figure)


def segmentation_chart(segmentation: dict[str, Any]) -> str:
    """PNG data URI: mean Dice and HD95 per region with the real and with the synthesized contrast (bars
    with the sample SD)."""
    regions = list(segmentation["regions"])
    figure, axes = _figure(1, 2, figsize=(8.0, 3.0), squeeze=False)
    for axis, metric, label in zip(axes[0], ("dice", "hd95"), ("Dice ↑", "HD95 (mm) ↓")):
        for offset, run, colour in ((-0.18, "real", "#4c72b0"), (0.18, "synth", "#dd8452")):
            values = [segmentation["regions"][r][f"{metric}_{run}"] for r in regions]
            axis.bar(
                np.arange(len(regions)) + offset, [v["mean"] for v in values], width=0.34, color=colour,
                yerr=[0.0 if v["std"] is None or not math.isfinite(v["std"]) else v["std"] for v in values],
                label="real target" if run == "real" else "synthesized target", capsize=3,
            )  # fmt: skip
        axis.set_xticks(range(len(regions)), regions)
        axis.set_title(label, fontsize=10)
        axis.grid(axis="y", alpha=0.3)
    axes[0][1].legend(fontsize=8)
    figure.tight_layout()
    return _png(figure)


BRASYN_COLUMNS = ("ssim_tumour", "ssim_non_tumour", "ssim_whole", "psnr_whole")


def brasyn_plot(rows: list[dict[str, Any]], methods: list[str]) -> str:
    """PNG data URI: per-subject BraSyn SSIM in and outside the tumour, one box per method."""
    figure, axes = _figure(1, 2, figsize=(8.0, 3.2), squeeze=False)
    for axis, name in zip(axes[0], ("ssim_tumour", "ssim_non_tumour")):
        data = [
            [float(r[name]) for r in rows if r["method"] == m and r[name] not in ("", "nan")] for m in methods
        ]
        axis.boxplot([[v for v in values if math.isfinite(v)] for values in data], showmeans=True)
        axis.set_xticks(
            range(1, len(methods) + 1), [METHOD_LABELS[m] for m in methods], fontsize=8, rotation=15
        )
        axis.set_title(f"BraSyn {name.replace('_', ' ')} ↑", fontsize=10)
        axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    return _png(figure)


def _brasyn_section(summary: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """The BraSyn protocol's table per method, paired differences and the box plots."""
    brasyn = summary["brasyn"]
    header = "".join(f"<th>{name}</th>" for name in BRASYN_COLUMNS)
    lines = [
        f"<h2>BraSyn protocol: {html.escape(brasyn['target'])}</h2>",
        f"<p>{summary['subjects_evaluated']} subjects; mean ± sample SD over subjects (NaN tumour scores of "
        "subjects without tumour are skipped and counted). The challenge ranks ssim_tumour and "
        f"ssim_non_tumour.</p><table><tr><th>method</th><th>n</th>{header}</tr>",
    ]
    for method, values in brasyn["methods"].items():
        label = METHOD_LABELS[method] + (f" ({brasyn['copy_input'].upper()})" if method == COPY else "")
        cells = "".join(
            f"<td>{_mean_sd(values, name, 4 if 'ssim' in name else 2)}</td>" for name in BRASYN_COLUMNS
        )
        lines.append(
            f"<tr><td>{html.escape(label)}</td><td>{values['ssim_non_tumour']['n']}</td>{cells}</tr>"
        )
    lines.append("</table><p>Paired over subjects: model minus baseline, mean [95% CI], Wilcoxon p.</p>")
    lines.append(f"<table><tr><th>MedGAN-SSM minus</th>{header}</tr>")
    for method, by_metric in brasyn["paired"].items():
        cells = "".join(
            f"<td>{_paired_cell(by_metric[name], 4 if 'ssim' in name else 2)}</td>" for name in BRASYN_COLUMNS
        )
        lines.append(f"<tr><td>{METHOD_LABELS[method]}</td>{cells}</tr>")
    lines.append("</table>")
    lines.append(f"<img alt='BraSyn scores' src='{brasyn_plot(rows, list(brasyn['methods']))}'>")
    return "\n".join(lines)


def spread_chart(spread: dict[str, Any]) -> str:
    """PNG data URI: mean |error| per decile of the test-time spread (pooled voxels)."""
    deciles = spread["error_by_decile"]
    figure, axes = _figure(1, 1, figsize=(4.6, 3.0), squeeze=False)
    axis = axes[0][0]
    axis.plot([d["decile"] for d in deciles], [d["mean_abs_error"] for d in deciles], marker="o")
    axis.set_xticks(range(1, 11))
    axis.set_xlabel(f"decile of the {spread['kind']} spread (low to high)", fontsize=9)
    axis.set_ylabel("mean |error|", fontsize=9)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    return _png(figure)


def _spread_section(spread: dict[str, Any]) -> str:
    rho = spread["spearman"]
    return (
        f"<p>Test-time spread ({spread['kind']}; a spread, not a calibrated uncertainty): Spearman "
        f"correlation of the voxelwise spread and |error| within the brain, per subject: median "
        f"{_number(rho['median'], 3)}, mean {_number(rho['mean'], 3)} ± {_number(rho['std'], 3)} over "
        f"{rho['n']} subjects. Mean |error| per spread decile:</p>"
        f"<img alt='error per spread decile' src='{spread_chart(spread)}'>"
    )


def _mean_sd(values: dict[str, Any], column: str, digits: int) -> str:
    return f"{_number(values[column]['mean'], digits)} ± {_number(values[column]['std'], digits)}"


def _paired_cell(stats: dict[str, Any], digits: int) -> str:
    low, high = (_number(bound, digits) for bound in stats["ci95"])
    return (
        f"{_number(stats['mean_difference'], digits)} [{low}, {high}]"
        f"<br><small>p = {_number(stats['wilcoxon_p'], 4)}</small>"
    )


def _segmentation_section(segmentation: dict[str, Any]) -> str:
    """Dice and HD95 of the user's segmenter with the real and the synthesized target, and the drop."""
    inferred = ", inferred" if segmentation["labels_inferred"] else ""
    lines = [
        f"<h2>Downstream segmentation: {html.escape(segmentation['task'])}</h2>",
        f"<p>The segmenter <code>{html.escape(segmentation['command'])}</code> ran on the four real "
        f"contrasts and again with the target replaced by the synthesized one, on {segmentation['subjects']} "
        f"subjects (labels {segmentation['label_convention']}{inferred}; HD95 penalty "
        f"{segmentation['hd95_max_penalty_mm']:g} mm where one side is empty). Drop: real minus synthesized, "
        "mean [95% CI], Wilcoxon p.</p>",
        "<table><tr><th>region</th><th>Dice real</th><th>Dice synthesized</th><th>Dice drop</th>"
        "<th>HD95 real (mm)</th><th>HD95 synthesized (mm)</th><th>HD95 increase (mm)</th></tr>",
    ]
    for region, values in segmentation["regions"].items():
        lines.append(
            f"<tr><td>{region}</td><td>{_mean_sd(values, 'dice_real', 3)}</td>"
            f"<td>{_mean_sd(values, 'dice_synth', 3)}</td>"
            f"<td>{_paired_cell(values['dice_drop_paired'], 3)}</td>"
            f"<td>{_mean_sd(values, 'hd95_real', 1)}</td><td>{_mean_sd(values, 'hd95_synth', 1)}</td>"
            f"<td>{_paired_cell(values['hd95_increase_paired'], 1)}</td></tr>"
        )
    lines.append("</table>")
    if segmentation.get("left_out"):
        lines.append(f"<p>Left out: {html.escape('; '.join(segmentation['left_out']))}</p>")
    lines.append(f"<img alt='segmentation scores' src='{segmentation_chart(segmentation)}'>")
    return "\n".join(lines)


def _number(value: Any, digits: int) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.{digits}f}"


DIGITS = {"psnr": 2, "ssim": 4, "mae": 4, "through_plane_error": 4, "ssim_sagittal": 4, "ssim_coronal": 4}


def _volume_metrics(task: dict[str, Any]) -> tuple[str, ...]:
    """The per-volume metrics an evaluation wrote: the through-plane ones too where it has them (an
    evaluation folder written before they existed has only PSNR, SSIM and MAE)."""
    model_brain = task["methods"][MODEL]["brain"]["per_volume"]
    return tuple(name for name in VOLUME_METRICS if name in model_brain)


def _summary_table(task: dict[str, Any]) -> str:
    names = _volume_metrics(task)
    header = "".join(f"<th>{METRIC_LABELS[name]}</th>" for name in names)
    lines = [f"<table><tr><th>method</th><th>region</th><th>n</th>{header}</tr>"]
    for method, regions in task["methods"].items():
        label = METHOD_LABELS[method]
        if method == COPY:
            label += f" ({task['best_input_copy']['input'].upper()})"
        for region, levels in regions.items():
            values = levels["per_volume"]
            cells = "".join(
                f"<td>{_number(values[n]['mean'], DIGITS[n])} ± {_number(values[n]['std'], DIGITS[n])}"
                f"<br><small>median {_number(values[n]['median'], DIGITS[n])}</small></td>"
                for n in names
            )
            lines.append(
                f"<tr><td>{html.escape(label)}</td><td>{region}</td><td>{values['psnr']['n']}</td>{cells}</tr>"
            )
    lines.append("</table>")
    return "\n".join(lines)


def _paired_table(task: dict[str, Any]) -> str:
    names = _volume_metrics(task)
    header = "".join(f"<th>{METRIC_LABELS[name]}</th>" for name in names)
    lines = [f"<table><tr><th>MedGAN-SSM minus</th><th>n</th>{header}</tr>"]
    for method, by_metric in task["paired"].items():
        cells = "".join(
            f"<td>{_number(by_metric[n]['mean_difference'], DIGITS[n])} "
            f"[{_number(by_metric[n]['ci95'][0], DIGITS[n])}, {_number(by_metric[n]['ci95'][1], DIGITS[n])}]"
            f"<br><small>Wilcoxon p = {_number(by_metric[n]['wilcoxon_p'], 4)}</small></td>"
            for n in names
        )
        lines.append(f"<tr><td>{METHOD_LABELS[method]}</td><td>{by_metric['psnr']['n']}</td>{cells}</tr>")
    lines.append("</table>")
    return "\n".join(lines)


STYLE = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px}
th{background:#f3f3f3}img{max-width:100%}dt{font-weight:600;margin-top:.5em}code{background:#f3f3f3}"""


def write_report(eval_dir: str | Path, out: str | Path) -> Path:
    """Write the HTML report of ``eval_dir`` to ``out`` and return its path."""
    eval_dir, out = Path(eval_dir), Path(out)
    summary, rows = _read_evaluation(eval_dir)
    brasyn = summary.get("protocol") == "brasyn"
    parts = [_provenance(summary)]
    if brasyn:
        parts.append(_brasyn_section(summary, rows))
    matrix = bool(summary.get("all_subsets"))
    if matrix:
        parts.append(_subset_matrix_section(summary))
    parts.extend(_task_sections(summary, rows, eval_dir, matrix))
    if summary.get("segmentation"):
        parts.append(_segmentation_section(summary["segmentation"]))
    parts.append(_definitions_section(summary, brasyn))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(parts))
    return out


def _read_evaluation(eval_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(summary.json, the rows of brasyn.csv or of per_volume.csv with PSNR / SSIM / MAE as floats, NaN
    where empty). Raises ReportError naming the folder when either file is missing."""
    summary_path = eval_dir / "summary.json"
    if not summary_path.is_file():
        raise ReportError(
            f"--eval {eval_dir}: no summary.json (run python -m medgan evaluate --out {eval_dir})"
        )
    summary = json.loads(summary_path.read_text())
    brasyn = summary.get("protocol") == "brasyn"
    table = eval_dir / ("brasyn.csv" if brasyn else "per_volume.csv")
    if not table.is_file():
        raise ReportError(f"--eval {eval_dir}: no {table.name}")
    with open(table, newline="") as stream:
        rows = list(csv.DictReader(stream))
    for row in rows:
        for name in METRICS if not brasyn else ():
            row[name] = float(row[name]) if row[name] not in ("", "nan") else math.nan
    return summary, rows


def _provenance(summary: dict[str, Any]) -> str:
    """The page's head, title and what was evaluated: checkpoint, data, baseline, command, left out."""
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>MedGAN-SSM evaluation</title>",
        f"<style>{STYLE}</style></head><body><h1>MedGAN-SSM evaluation</h1>",
        "<dl>",
        f"<dt>checkpoint</dt><dd>{html.escape(str(summary['checkpoint']))}</dd>",
        f"<dt>data</dt><dd>{html.escape(summary['scope'])}; {summary['subjects_evaluated']} subjects</dd>",
    ]
    if summary.get("baseline_checkpoint"):
        parts.append(f"<dt>baseline checkpoint</dt><dd>{html.escape(summary['baseline_checkpoint'])}</dd>")
    if summary.get("command"):
        parts.append(f"<dt>command</dt><dd><code>{html.escape(summary['command'])}</code></dd>")
    if summary.get("failed_subjects"):
        failed = "<br>".join(html.escape(line) for line in summary["failed_subjects"])
        parts.append(f"<dt>subjects left out</dt><dd>{failed}</dd>")
    parts.append("</dl>")
    return "\n".join(parts)


def _subset_matrix_section(summary: dict[str, Any]) -> str:
    """The any-subset matrix (``--all-subsets``) and what its cells hold."""
    return (
        "<h2>Every input subset</h2><p>Mean per-volume brain values of the model over the subjects "
        "that have the contrasts; in brackets the best single input copied as it is, in the same cell. "
        "Below, every cell's tables; plots and examples for the task with all other contrasts as input."
        f"</p><img alt='any-subset matrix' src='{subset_matrix(summary)}'>"
    )


def _task_sections(
    summary: dict[str, Any], rows: list[dict[str, Any]], eval_dir: Path, matrix: bool
) -> list[str]:
    """Every task's tables; its figures too, except (with the matrix) where another task of the same
    target has more inputs."""
    widest = {}
    for task in summary["tasks"].values():
        widest[task["target"]] = max(widest.get(task["target"], 0), len(task["inputs"]))
    parts = []
    for name, task in summary["tasks"].items():
        parts.extend(_task_tables(name, task))
        if matrix and len(task["inputs"]) < widest[task["target"]]:
            continue
        parts.extend(_task_figures(name, task, rows, eval_dir))
    return parts


def _task_tables(name: str, task: dict[str, Any]) -> list[str]:
    """A task's heading, its summary and paired tables, and its spread when it has one."""
    skipped = (
        f"; skipped (missing a contrast): {', '.join(task['skipped_subjects'])}"
        if task["skipped_subjects"]
        else ""
    )
    parts = [
        f"<h2>{html.escape(name)}</h2>",
        f"<p>{task['subjects']} subjects; mean ± sample SD and median of per-volume values{skipped}</p>",
        _summary_table(task),
        "<p>Paired over subjects (per-volume, brain): mean difference [95% CI], Wilcoxon p.</p>",
        _paired_table(task),
    ]
    if task.get("spread"):
        parts.append(_spread_section(task["spread"]))
    return parts


def _task_figures(name: str, task: dict[str, Any], rows: list[dict[str, Any]], eval_dir: Path) -> list[str]:
    """A task's box plots and the montage of each example subject (best, median, worst) whose views
    were saved."""
    parts = [
        f"<img alt='box plots {html.escape(name)}' src='{box_plots(rows, name, list(task['methods']))}'>"
    ]
    for rank, subject in task["examples"].items():
        view_file = eval_dir / task["views"] / f"{subject}.npz"
        if not view_file.is_file():
            continue
        with np.load(view_file) as views:
            title = f"{rank} subject: {subject} (PSNR {_number(_brain_psnr(rows, name, subject), 2)} dB)"
            parts.append(
                f"<h3>{html.escape(title)}</h3><img alt='{html.escape(title)}' src='{montage(views, title)}'>"
            )
    return parts


def _brain_psnr(rows: list[dict[str, Any]], task: str, subject: str) -> float:
    """The model's per-volume brain PSNR (dB) of ``subject`` in ``task``, NaN when it has no row."""
    return next(
        (r["psnr"] for r in rows if r["task"] == task and r["subject"] == subject
         and r["method"] == MODEL and r["region"] == "brain"),
        math.nan,
    )  # fmt: skip


def _definitions_section(summary: dict[str, Any], brasyn: bool) -> str:
    """How every number was computed, each method, the tables that hold every subject's values, and the
    page's end."""
    definitions = "".join(
        f"<dt>{html.escape(key)}</dt><dd>{html.escape(str(value))}</dd>"
        for key, value in summary["definitions"].items()
    )
    methods = "".join(
        f"<dt>{METHOD_LABELS.get(key, key)}</dt><dd>{html.escape(value)}</dd>"
        for key, value in summary["methods"].items()
    )
    tables = (
        "<code>brasyn.csv</code>" if brasyn else "<code>per_slice.csv</code> and <code>per_volume.csv</code>"
    )
    return "\n".join(
        (
            f"<h2>How the numbers were computed</h2><dl>{definitions}</dl><h3>Methods</h3><dl>{methods}</dl>",
            f"<p>Every subject's values are in {tables} beside <code>summary.json</code>.</p></body></html>",
        )
    )
