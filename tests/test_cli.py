"""python -m medgan: the tools' command lines, one line and exit 2 for each user error, and --mode both."""

from __future__ import annotations

import subprocess
import sys

import nibabel as nib
import pytest
from conftest import REPO, write_checkpoint

from medgan.__main__ import main


def _error_line(capsys, argv) -> str:
    assert main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "Traceback" not in error, error
    return error


def test_user_errors_are_one_line_with_exit_2(capsys, tmp_path, phantom_subjects):
    checkpoint = str(write_checkpoint(tmp_path / "run", arch="unet"))
    t1 = str(phantom_subjects / "BraTS2021_00002" / "BraTS2021_00002_t1.nii.gz")
    synthesize = [
        "synthesize",
        "--checkpoint",
        checkpoint,
        "--target",
        "flair",
        "--out",
        str(tmp_path / "y.nii.gz"),
    ]
    cases = {
        "unknown modality 'dwi'": [*synthesize, "--input", "dwi=x.nii.gz"],
        "missing.nii.gz: file not found": [*synthesize, "--input", f"t1={tmp_path}/missing.nii.gz"],
        "either --input": synthesize,
        "no such checkpoint": ["export", "--checkpoint", str(tmp_path / "nothing"), "--out", "G.safetensors"],
        "no manifest.json": [
            "evaluate",
            "--checkpoint",
            checkpoint,
            "--data_path",
            str(tmp_path),
            "--out",
            "e",
        ],
        "no summary.json": ["report", "--eval", str(tmp_path), "--out", str(tmp_path / "r.html")],
        "data.batch_size": ["--mode", "test", "--data_path", str(tmp_path), "--batch_size", "zero"],
        "give a command": ["--data_path", str(tmp_path)],
    }
    for expected, argv in cases.items():
        assert expected in _error_line(capsys, argv)
    assert main([*synthesize, "--input", f"t1={t1}"]) == 0
    assert nib.load(tmp_path / "y.nii.gz").shape == nib.load(t1).shape


def test_export_from_the_command_line(tmp_path):
    checkpoint = write_checkpoint(tmp_path / "run", arch="unet")
    result = subprocess.run(
        [sys.executable, "-m", "medgan", "export", "--checkpoint", str(checkpoint),
         "--out", str(tmp_path / "G.safetensors")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "G.safetensors").is_file() and (tmp_path / "G.json").is_file()


@pytest.mark.slow
def test_mode_both_shards_a_raw_folder_trains_evaluates_and_reports(phantom_subjects, tmp_path):
    checkpoint_dir = tmp_path / "run"
    command = [
        sys.executable, "-m", "medgan", "--mode", "both", "--data_path", str(phantom_subjects),
        "--checkpoint_dir", str(checkpoint_dir), "--batch_size", "2", "--num_workers", "0",
        "--target_modality", "flair", "--input_modalities", "t1", "t2",
        "--training.max_steps", "2", "--training.val_max_batches", "1", "--logging.wandb", "disabled",
        "--logging.progress_bar", "false", "--deepspeed.zero_stage", "0",
        "--model.generator.arch", "unet", "--model.generator.base_channels", "8",
        "--model.generator.depth", "2", "--model.generator.ssm_levels", "1",
        "--model.discriminator.base_channels", "8",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (checkpoint_dir / "shards" / "manifest.json").is_file()
    assert (checkpoint_dir / "generator" / "latest").is_file()
    assert (checkpoint_dir / "eval" / "summary.json").is_file()
    assert (checkpoint_dir / "eval" / "report.html").is_file()
    assert "t1+t2->flair" in result.stdout
