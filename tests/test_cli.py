"""python -m medgan: the tools' command lines, one line and exit 2 for each user error, and --mode both."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from conftest import REPO, write_checkpoint

from medgan.__main__ import main
from medgan.inference.export import export_generator


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
        "--target: needed with --input": [
            "synthesize", "--checkpoint", checkpoint, "--input", f"t1={t1}", "--out", str(tmp_path / "y.nii")
        ],
        "holds no DeepSpeed model states": [*synthesize, "--input", f"t1={t1}", "--spread", "weights"],
        "exported file, which holds one set of weights": [
            *synthesize[:2], str(export_generator(checkpoint, tmp_path / "G.safetensors")[0]),
            *synthesize[3:], "--input", f"t1={t1}", "--spread", "both",
        ],
    }  # fmt: skip
    for expected, argv in cases.items():
        assert expected in _error_line(capsys, argv)
    assert main([*synthesize, "--input", f"t1={t1}"]) == 0
    assert nib.load(tmp_path / "y.nii.gz").shape == nib.load(t1).shape
    assert json.loads((tmp_path / "y.json").read_text())["Synthetic"] is True
    assert json.loads((tmp_path / "dataset_description.json").read_text())["DatasetType"] == "derivative"


def test_synthesize_brasyn_folder_one_line_per_bad_subject_with_spread_and_sidecars(
    capsys, tmp_path, phantom_subjects
):
    checkpoint = str(write_checkpoint(tmp_path / "run", arch="unet"))
    folder = tmp_path / "in"
    for number, leave_out in ((2, ("flair",)), (3, ()), (4, ("t1ce", "t2"))):
        subject = f"BraTS2021_{number:05d}"
        (folder / subject).mkdir(parents=True)
        for name in ("t1", "t1ce", "t2", "flair", "seg"):
            if name not in leave_out:
                link = folder / subject / f"{subject}_{name}.nii.gz"
                link.symlink_to(phantom_subjects / subject / link.name)
    out = tmp_path / "out"
    argv = ["synthesize", "--checkpoint", checkpoint, "--subjects", str(folder), "--out", str(out)]
    argv += ["--spread", "flip"]
    assert main(argv) == 1  # as in folder mode: some subjects failed, the others were written
    captured = capsys.readouterr()
    errors = captured.err.strip().splitlines()
    assert len(errors) == 2, errors
    assert errors[0].startswith("medgan synthesize: BraTS2021_00003: has all of t1 t1ce t2 flair: ")
    assert errors[1].startswith("medgan synthesize: BraTS2021_00004: misses 2 of t1 t1ce t2 flair (t1ce t2)")
    # OUT is the folder to zip and submit: volumes alone; spreads and provenance go to OUT-provenance
    provenance = tmp_path / "out-provenance"
    assert sorted(path.name for path in out.iterdir()) == ["BraTS2021_00002-flair.nii.gz"]
    assert sorted(path.name for path in provenance.iterdir()) == [
        "BraTS2021_00002-flair.json", "BraTS2021_00002-flair_spread.json",
        "BraTS2021_00002-flair_spread.nii.gz", "dataset_description.json",
    ]  # fmt: skip
    reference = nib.load(folder / "BraTS2021_00002" / "BraTS2021_00002_t2.nii.gz")
    for written_file in (
        out / "BraTS2021_00002-flair.nii.gz",
        provenance / "BraTS2021_00002-flair_spread.nii.gz",
    ):
        written = nib.load(written_file)
        assert written.shape == reference.shape and written.get_data_dtype() == np.float32
        np.testing.assert_allclose(written.affine, reference.affine, atol=1e-5)
    sidecar = json.loads((provenance / "BraTS2021_00002-flair.json").read_text())
    assert sidecar["Command"] == "python -m medgan " + shlex.join(argv)
    assert f"sidecars and spreads in {provenance}" in captured.out


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
        "--training.max_steps", "2", "--training.val_max_subjects", "1", "--logging.wandb", "disabled",
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


def test_mode_test_on_rank_1_of_2_waits_for_rank_0_to_shard(monkeypatch, tmp_path):
    import medgan.distributed as distributed

    rank_1 = distributed.DistributedContext(rank=1, local_rank=1, world_size=2, local_world_size=2)
    monkeypatch.setattr(distributed, "read_context", lambda: rank_1)
    monkeypatch.setattr(distributed, "init_distributed", lambda: rank_1)
    monkeypatch.setattr(distributed, "set_thread_share", lambda context: 1)
    waited = []
    monkeypatch.setattr(distributed, "run_on_main", lambda work, timeout, what: waited.append(what))
    monkeypatch.setattr("medgan.cli.front_door.shards_for", lambda *args: pytest.fail("rank 1 sharded"))
    argv = ["--mode", "test", "--data_path", str(tmp_path), "--checkpoint_dir", str(tmp_path / "run")]
    assert main(argv) == 0
    assert waited == [f"shard {tmp_path}"]
