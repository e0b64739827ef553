"""report: one self-contained HTML file with the tables, box plots and montages embedded."""

from __future__ import annotations

import base64
import re

import pytest
from conftest import write_checkpoint

from medgan.evaluation import ShardSubjects, evaluate, tasks_to_evaluate
from medgan.inference import load_generator
from medgan.report import ReportError, write_report


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


def test_missing_evaluation_is_one_line(tmp_path):
    with pytest.raises(ReportError, match="no summary.json"):
        write_report(tmp_path, tmp_path / "report.html")
