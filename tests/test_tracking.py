"""tracking: rank 0 logs to a real W&B run (offline, read back from its files), other ranks stay
silent, a resumed run keeps its id, and the progress lines and image grid are what the loop relies on."""

from __future__ import annotations

import json
import struct
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from wandb.proto import wandb_internal_pb2

from medgan.config import Config, load_config
from medgan.training.tracking import (
    RankZeroReporter,
    SilentReporter,
    image_grid,
    make_reporter,
    resolve_wandb_mode,
)

PROVENANCE = {"git_commit": "0123abc", "manifest_sha256": "feed"}


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch) -> Path:
    """W&B offline with every directory it writes to under ``tmp_path``, and no server it could reach."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    # nothing serves the discard port here: anything that tried the network would be refused at once
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    for name in ("WANDB_DIR", "WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb_home" / name.lower()))
    return tmp_path


def make_config(tmp_path: Path, wandb: str = "offline", progress_bar: bool = False) -> Config:
    return load_config(
        overrides={
            "logging": {
                "wandb": wandb,
                "project": "medgan-tests",
                "run_name": "tiny",
                "progress_bar": progress_bar,
            },
            "checkpoint": {"dir": str(tmp_path / "run")},
        }
    )


def read_records(path: Path) -> list[wandb_internal_pb2.Record]:
    """The complete records of a ``.wandb`` file: a ``:W&B`` header, then LevelDB-log chunks (CRC32 of type
    and data, length, type) in 32 KiB blocks, which carry protobuf ``Record``s; W&B 0.31 ships no reader."""
    data = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), f"{path} is not a W&B 0.x datastore"
    records, pending, position = [], b"", 7
    while position + 7 <= len(data):
        if 32768 - position % 32768 < 7:  # a block's tail too short for a chunk header is padding
            position += 32768 - position % 32768
            continue
        checksum, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if position + 7 + length > len(data):
            break  # a chunk still being written
        chunk = data[position + 7 : position + 7 + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == checksum, f"{path}: bad chunk at {position}"
        position += 7 + length
        pending += chunk
        if kind in (1, 4):  # a full record, or the last chunk of one
            records.append(wandb_internal_pb2.Record.FromString(pending))
            pending = b""
    return records


def finished_records(path: Path, timeout: float = 20.0) -> list[wandb_internal_pb2.Record]:
    """The records once the run's ``exit`` record is on disk: ``run.finish()`` returns when W&B's service
    has the exit, and a loaded machine may flush the file a second later."""
    deadline = time.monotonic() + timeout
    while True:
        records = read_records(path)
        if records and records[-1].WhichOneof("record_type") == "exit":
            return records
        assert time.monotonic() < deadline, f"{path} has no exit record {timeout} s after finish"
        time.sleep(0.05)


def nested(items) -> dict[str, Any]:
    """History or config items (``key`` or ``nested_key`` path, JSON value) as a nested dict."""
    out: dict[str, Any] = {}
    for item in items:
        *parents, last = list(item.nested_key) or [item.key]
        target = out
        for key in parents:
            target = target.setdefault(key, {})
        target[last] = json.loads(item.value_json)
    return out


def offline_runs(checkpoint_dir: Path, run_id: str) -> list[Path]:
    """The offline runs of ``run_id`` under ``checkpoint_dir``, oldest first (W&B adds ``-1`` to a folder
    name already taken within the same second)."""
    return sorted(p.parent for p in (checkpoint_dir / "wandb").glob(f"offline-run-*/run-{run_id}.wandb"))


def history_by_step(run_dir: Path, run_id: str) -> dict[int, dict[str, Any]]:
    rows: dict[int, dict[str, Any]] = {}
    for record in finished_records(run_dir / f"run-{run_id}.wandb"):
        if record.WhichOneof("record_type") == "history":
            row = nested(record.history.item)
            rows.setdefault(row["_step"], {}).update(row)
    return rows


def run_record(run_dir: Path, run_id: str) -> wandb_internal_pb2.RunRecord:
    (run,) = [r.run for r in finished_records(run_dir / f"run-{run_id}.wandb") if r.HasField("run")]
    return run


def test_other_ranks_get_a_silent_reporter_that_writes_nothing(offline_wandb, capsys):
    reporter = make_reporter(False, make_config(offline_wandb), "abc123", PROVENANCE)
    assert type(reporter) is SilentReporter and reporter.run_id is None
    reporter.print("rank 1 speaking")
    reporter.start_progress(100, 0)
    reporter.progress(10, {"loss_g": 1.0})
    reporter.log({"train/loss_g": 1.0}, step=10)
    reporter.log_images("train/images", np.zeros((4, 4), np.uint8), step=10)
    reporter.log_table("val/per_subject", ["subject"], [["s"]], step=10)
    reporter.finish()
    assert capsys.readouterr() == ("", "")
    assert not [p for p in offline_wandb.rglob("*") if p.is_file()]


def test_rank_zero_logs_scalars_images_and_tables_to_the_offline_run(offline_wandb):
    config = make_config(offline_wandb)
    reporter = make_reporter(True, config, None, PROVENANCE)
    assert isinstance(reporter, RankZeroReporter) and reporter.mode == "offline"
    run_id = reporter.run_id
    assert run_id and run_id == reporter.run.id
    grid = image_grid([np.linspace(0, 1, 2 * 3 * 4).reshape(2, 3, 4), np.zeros((2, 3, 4))])
    table = [["BraTS-001", 12, 21.5, 0.81, 0.04], ["BraTS-002", 9, 19.25, 0.77, 0.05]]
    reporter.log({"train/loss_g": 1.25, "perf/images_per_s": 40.0}, step=5)
    reporter.log_images("train/images", grid, step=10, caption="inputs | synthesized")
    reporter.log_table("val/per_subject", ["subject", "slices", "psnr", "ssim", "mae"], table, step=10)
    reporter.log({"val/psnr": 20.5}, step=10)
    reporter.finish()
    assert reporter.run is None

    # W&B's files sit beside the checkpoints, one offline run named by the id
    (run_dir,) = offline_runs(offline_wandb / "run", run_id)
    run = run_record(run_dir, run_id)
    assert (run.run_id, run.project, run.display_name) == (run_id, "medgan-tests", "tiny")
    assert run.telemetry.feature.offline
    logged_config = nested(run.config.update)
    assert logged_config["provenance"] == PROVENANCE
    assert logged_config["logging"]["project"] == "medgan-tests"
    assert logged_config["checkpoint"]["dir"] == str(offline_wandb / "run")

    history = history_by_step(run_dir, run_id)
    assert sorted(history) == [5, 10]
    assert history[5]["train/loss_g"] == 1.25 and history[5]["perf/images_per_s"] == 40.0
    assert history[10]["val/psnr"] == 20.5

    image = history[10]["train/images"]
    assert image["_type"] == "image-file" and image["caption"] == "inputs | synthesized"
    assert (image["height"], image["width"]) == grid.shape
    assert np.array_equal(np.asarray(Image.open(run_dir / "files" / image["path"])), grid)

    logged_table = history[10]["val/per_subject"]
    assert logged_table["_type"] == "table-file"
    table_file = json.loads((run_dir / "files" / logged_table["path"]).read_text())
    assert table_file["columns"] == ["subject", "slices", "psnr", "ssim", "mae"]
    assert table_file["data"] == table


def test_resumed_reporter_keeps_the_run_id(offline_wandb):
    config = make_config(offline_wandb)
    first = make_reporter(True, config, None, PROVENANCE)
    first.log({"train/loss_g": 2.0}, step=1)
    first.finish()
    # what fit() does on resume: the id saved in the checkpoint's client state
    resumed = make_reporter(True, config, first.run_id, PROVENANCE)
    assert resumed.run_id == first.run_id
    resumed.log({"train/loss_g": 1.0}, step=2)
    resumed.finish()
    runs = offline_runs(offline_wandb / "run", first.run_id)
    assert len(runs) == 2, f"expected the first and the resumed run, found {runs}"
    steps = [sorted(history_by_step(run_dir, first.run_id)) for run_dir in runs]
    assert sorted(steps) == [[1], [2]]
    assert all(run_record(run_dir, first.run_id).run_id == first.run_id for run_dir in runs)


def test_disabled_wandb_makes_no_files_and_keeps_the_run_id(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WANDB_MODE", raising=False)  # set by conftest, and it would win over the config
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_home"))
    reporter = make_reporter(True, make_config(tmp_path, wandb="disabled"), "abc123", PROVENANCE)
    assert reporter.mode == "disabled" and reporter.run is None
    # a run resumed with W&B off still carries the id into its next checkpoint
    assert reporter.run_id == "abc123"
    reporter.log({"train/loss_g": 1.0}, step=1)
    reporter.log_images("train/images", np.zeros((4, 4), np.uint8), step=1)
    reporter.log_table("val/per_subject", ["subject"], [["s"]], step=1)
    reporter.finish()
    assert not list(tmp_path.rglob("*"))
    assert capsys.readouterr() == ("", "")


def test_a_failing_wandb_is_reported_once_and_training_goes_on(offline_wandb, capsys):
    reporter = make_reporter(True, make_config(offline_wandb), None, PROVENANCE)
    reporter.run.finish()  # as when the launcher's SIGTERM took W&B's service down under the reporter
    capsys.readouterr()
    reporter.log({"train/loss_g": 1.0}, step=1)
    assert reporter.run is None
    out = capsys.readouterr().out
    assert out.startswith("W&B stopped logging (UsageError: ") and out.endswith("; training goes on\n")
    reporter.log({"train/loss_g": 1.0}, step=2)
    reporter.log_images("train/images", np.zeros((4, 4), np.uint8), step=2)
    reporter.finish()
    assert capsys.readouterr() == ("", "")


@pytest.mark.parametrize(
    "environment, requested, expected",
    [
        ({"WANDB_MODE": "disabled"}, "offline", "disabled"),
        ({"WANDB_MODE": "offline"}, "online", "offline"),
        ({}, "offline", "offline"),
        ({}, "disabled", "disabled"),
        ({}, "auto", "offline"),
        ({"WANDB_API_KEY": "0" * 40}, "auto", "online"),
    ],
)
def test_wandb_mode_env_wins_and_auto_is_online_only_with_a_key(
    tmp_path, monkeypatch, environment, requested, expected
):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    for name in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert resolve_wandb_mode(requested) == expected


def test_auto_is_online_with_a_netrc(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "0" * 40 + "\n")
    assert resolve_wandb_mode("auto") == "online"


def test_plain_progress_lines_without_a_bar(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    reporter = make_reporter(True, make_config(tmp_path, wandb="disabled"), None, PROVENANCE)
    reporter.print("generator 1,234 parameters")
    reporter.start_progress(100, 0)
    assert reporter.bar is None
    reporter.progress(10, {"loss_g": 1.234567, "loss_d": 0.5, "img/s": 12345.678})
    reporter.finish()
    assert capsys.readouterr() == (
        "generator 1,234 parameters\nstep 10/100: loss_g 1.235, loss_d 0.5, img/s 1.235e+04\n",
        "",
    )


def test_progress_bar_follows_the_step_and_keeps_messages_on_stdout(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    reporter = make_reporter(
        True, make_config(tmp_path, wandb="disabled", progress_bar=True), None, PROVENANCE
    )
    reporter.start_progress(100, 20)  # resumed at step 20
    assert (reporter.bar.total, reporter.bar.n) == (100, 20)
    reporter.progress(30, {"loss_g": 1.234567})
    assert reporter.bar.n == 30 and reporter.bar.postfix == "loss_g=1.23"
    reporter.print("saved checkpoint step-30")
    reporter.finish()
    assert reporter.bar is None
    reporter.print("done")
    out, err = capsys.readouterr()
    assert out == "saved checkpoint step-30\ndone\n"
    assert "train" in err and "30/100" in err  # the bar draws on stderr


def test_image_grid_lays_columns_side_by_side_and_rows_below():
    rng = np.random.default_rng(0)
    columns = [rng.integers(0, 256, size=(3, 5, 7)) / 255 for _ in range(4)]
    grid = image_grid(columns)
    assert grid.dtype == np.uint8 and grid.shape == (3 * 5, 4 * 7)
    for row in range(3):
        for index, column in enumerate(columns):
            tile = grid[row * 5 : (row + 1) * 5, index * 7 : (index + 1) * 7]
            assert np.array_equal(tile, np.round(column[row] * 255).astype(np.uint8))


def test_image_grid_maps_the_unit_range_to_bytes_and_clips_outside_it():
    values = np.array([[[-0.5, 0.0, 1 / 255, 128 / 255, 254 / 255, 1.0, 1.5]]], dtype=np.float32)
    assert image_grid([values]).tolist() == [[0, 0, 1, 128, 254, 255, 255]]
    every_level = (np.arange(256, dtype=np.float32) / 255).reshape(1, 16, 16)
    assert np.array_equal(image_grid([every_level]).ravel(), np.arange(256))
