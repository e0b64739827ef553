"""report: one self-contained HTML file with the tables, box plots and montages embedded."""

from __future__ import annotations

import base64
import json
import re

import pytest
from conftest import write_checkpoint

from medgan.evaluation.default_protocol import evaluate
from medgan.evaluation.report import ReportError, write_report
from medgan.evaluation.subjects import ShardSubjects
from medgan.evaluation.tasks import EvaluationError, tasks_to_evaluate
from medgan.inference.loading import load_generator


def test_report_is_self_contained_and_holds_every_part(phantom_shards, tmp_path):
    generator = load_generator(write_checkpoint(tmp_path / "model", arch="unet"))
    subjects = ShardSubjects(phantom_shards, "test", generator.modalities)
    tasks = tasks_to_evaluate(generator, subjects.available_modalities, target="flair")
    evaluate(
        generator, subjects, tasks, tmp_path / "eval", description={"command": "python -m medgan evaluate"}
    )

    page = write_report(tmp_path / "eval", tmp_path / "report.html").read_text()
    images = re.findall(r"src='data:image/png;base64,([^']+)'", page)
    # box plots, then best / median / worst montages (one test subject: the same one three times)
    assert len(images) == 4
    assert all(base64.b64decode(image).startswith(b"\x89PNG") for image in images)
    assert not re.search(r"src='(?!data:)", page), "every image is embedded"
    for part in ("t1+t1ce+t2-&gt;flair", "best input copied", "Wilcoxon", "How the numbers were computed"):
        assert part in page
    assert "the axial slices in the &#x27;test&#x27; shards" in page  # says what a volume is
    for label in ("through-plane error ↓", "sagittal SSIM ↑", "coronal SSIM ↑"):
        assert page.count(label) == 2  # the summary table and the paired one

    # an evaluation folder written before the through-plane metrics still makes its report, without them
    summary_file = tmp_path / "eval" / "summary.json"
    summary = json.loads(summary_file.read_text())
    for task in summary["tasks"].values():
        for regions in task["methods"].values():
            for levels in regions.values():
                for name in ("through_plane_error", "ssim_sagittal", "ssim_coronal"):
                    del levels["per_volume"][name]
        for by_metric in task["paired"].values():
            for name in ("through_plane_error", "ssim_sagittal", "ssim_coronal"):
                del by_metric[name]
    summary_file.write_text(json.dumps(summary))
    older = write_report(tmp_path / "eval", tmp_path / "older.html").read_text()
    assert "through-plane error" not in older.split("How the numbers were computed")[0]
    assert "PSNR (dB) ↑" in older


def test_missing_evaluation_is_one_line(tmp_path):
    with pytest.raises(ReportError, match="no summary.json"):
        write_report(tmp_path, tmp_path / "report.html")


@pytest.mark.slow
def test_all_subsets_scores_28_cells_and_draws_the_matrix(phantom_shards, tmp_path):
    generator = load_generator(write_checkpoint(tmp_path / "any", arch="unet"))  # trained for target any
    subjects = ShardSubjects(phantom_shards, "test", generator.modalities)
    tasks = tasks_to_evaluate(generator, subjects.available_modalities, all_subsets=True)
    assert len(tasks) == 28 and len({task.name for task in tasks}) == 28
    assert all(task.target not in task.inputs for task in tasks)
    assert sum(task.target == "flair" for task in tasks) == 7
    summary = evaluate(
        generator, subjects, tasks, tmp_path / "eval", description={"all_subsets": True}, batch_size=32
    )
    # a cell is the same number as evaluating its task alone
    alone = evaluate(generator, subjects, [tasks[0]], tmp_path / "alone")
    name = tasks[0].name
    assert summary["tasks"][name]["methods"]["model"] == alone["tasks"][name]["methods"]["model"]

    page = write_report(tmp_path / "eval", tmp_path / "report.html").read_text()
    assert "Every input subset" in page and "alt='any-subset matrix'" in page
    images = re.findall(r"src='data:image/png;base64,([^']+)'", page)
    # the matrix, then for each of the 4 targets its all-inputs task's box plots and 3 montages
    assert len(images) == 1 + 4 * 4
    assert page.count("<h2>") == 1 + 28 + 1  # the matrix, every cell's tables, how it was computed


def test_all_subsets_refuses_a_model_trained_for_one_task(tmp_path):
    fixed = {"input_modalities": ["t1", "t2"], "target_modality": "flair"}
    generator = load_generator(write_checkpoint(tmp_path / "fixed", arch="unet", data=fixed))
    with pytest.raises(
        EvaluationError, match="--all-subsets needs a model trained with target_modality: any"
    ):
        tasks_to_evaluate(generator, ["t1", "t1ce", "t2", "flair"], all_subsets=True)


def test_evaluation_does_not_import_the_report():
    """The report is drawn from evaluation's outputs: evaluating loads no report code."""
    import subprocess
    import sys

    from conftest import REPO

    probe = (
        "import sys, medgan.evaluation.default_protocol, medgan.cli.evaluate; "
        "print('medgan.evaluation.report' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"
