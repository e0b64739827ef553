"""The DeepSpeed GAN engine: schedules, settings, checkpoints, and real runs (1 process and 2 ranks)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from conftest import write_checkpoint
from safetensors.torch import load_file
from tiny_run import free_master_port

from medgan.checkpointing import CheckpointManager, tag_for_step
from medgan.config import ConfigError, build_config, load_config
from medgan.distributed import DistributedContext
from medgan.inference.loading import load_generator
from medgan.models.generator import build_generator
from medgan.training.ema import ExponentialMovingAverage
from medgan.training.engines import deepspeed_settings, lr_factor

REPO = Path(__file__).resolve().parent.parent
DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")
TINY = [
    "--config", "configs/demo.yaml", "--model.generator.arch", "ssm",
    "--model.generator.base_channels", "8", "--model.generator.depth", "2",
    "--model.generator.ssm_levels", "1", "--model.generator.ssm_state", "4",
    "--model.generator.condition_dim", "8", "--model.generator.attention_heads", "2",
    "--model.discriminator.base_channels", "8", "--model.discriminator.layers", "2",
    "--data.batch_size", "2", "--training.val_max_subjects", "2", "--logging.progress_bar", "false",
    "--logging.log_every_steps", "1", "--logging.image_every_steps", "1000",
]  # fmt: skip


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def train_command(shards: Path, checkpoint_dir: Path, *extra: str, ranks: int = 1) -> list[str]:
    arguments = [
        "launch/train.py",
        *TINY,
        "--data_path",
        str(shards),
        "--checkpoint_dir",
        str(checkpoint_dir),
        *extra,
    ]
    if ranks == 1:
        return [sys.executable, *arguments]
    return [DEEPSPEED, "--num_gpus", str(ranks), "--master_port", str(free_port()), *arguments]


def run(command: list[str], timeout: float = 400) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (
        f"{' '.join(command)} exited {result.returncode}:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    )
    return result


# ------------------------------------------------------------------------------------------- unit tests
def test_lr_schedules():
    step = build_config({"training": {"epochs": 10, "lr_decay_epoch": 2, "lr_decay_factor": 0.5}})
    factor = lr_factor(step, batches_per_epoch=10)
    assert [factor(s) for s in (0, 19, 20, 39, 40, 60)] == [1.0, 1.0, 0.5, 0.5, 0.25, 0.125]
    linear = build_config({"training": {"epochs": 10, "lr_schedule": "linear", "lr_decay_epoch": 6}})
    factor = lr_factor(linear, batches_per_epoch=10)
    assert factor(59) == 1.0
    assert factor(80) == pytest.approx(0.5)
    assert factor(100) == 0.0
    accumulated = build_config(
        {"training": {"epochs": 10, "lr_decay_epoch": 1}, "deepspeed": {"gradient_accumulation_steps": 2}}
    )
    # one optimizer step consumes two batches: 5 optimizer steps make an epoch of 10 batches
    assert lr_factor(accumulated, batches_per_epoch=10)(5) == 0.5


def test_deepspeed_settings_come_from_the_config():
    config = build_config(
        {
            "data": {"batch_size": 3},
            "deepspeed": {"zero_stage": 3, "precision": "bf16", "gradient_accumulation_steps": 2},
        }
    )
    settings = deepspeed_settings(config, world_size=4)
    assert settings["train_batch_size"] == 3 * 2 * 4
    assert settings["zero_optimization"]["stage"] == 3
    assert settings["bf16"]["enabled"] and not settings["fp16"]["enabled"]


def test_fp16_needs_a_gpu_and_gets_dynamic_loss_scaling_there():
    fp16 = build_config({"deepspeed": {"precision": "fp16"}})
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="deepspeed.precision: fp16 needs a GPU"):
            deepspeed_settings(fp16, world_size=1)
        return
    settings = deepspeed_settings(fp16, world_size=1)
    assert settings["fp16"] == {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    assert not settings["bf16"]["enabled"]


def test_pruning_keeps_the_last_tags_and_the_best(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2, context=DistributedContext(0, 0, 1, 1))
    for folder in (manager.generator_dir, manager.discriminator_dir):
        for step in (10, 20, 30, 40, 50):
            (folder / tag_for_step(step)).mkdir(parents=True)
        (folder / "latest").write_text(tag_for_step(50))
    manager.mark_best(tag_for_step(20))
    manager._prune()
    for folder in (manager.generator_dir, manager.discriminator_dir):
        assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == [
            "step_000020",
            "step_000040",
            "step_000050",
        ]


class _SavingEngine:
    """Stands in for a DeepSpeed engine: writes a file into the tag folder, or dies half-way."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail

    def save_checkpoint(self, save_dir, tag, client_state=None, save_latest=True):
        assert save_latest is False, "DeepSpeed must not write its own latest"
        folder = Path(save_dir) / tag
        folder.mkdir(parents=True)
        (folder / "shard.pt").write_text("partial" if self.fail else "complete")
        if self.fail:
            raise KeyboardInterrupt("killed mid-save")


def test_a_crash_mid_save_leaves_latest_on_the_previous_tag(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=3, context=DistributedContext(0, 0, 1, 1))
    manager.save(10, _SavingEngine(), _SavingEngine(), None, {"step": 10})
    assert manager.latest_tag() == "step_000010"
    with pytest.raises(KeyboardInterrupt):
        manager.save(20, _SavingEngine(), _SavingEngine(fail=True), None, {"step": 20})
    assert manager.latest_tag() == "step_000010"
    assert (manager.discriminator_dir / "latest").read_text() == "step_000010"
    assert not list(tmp_path.rglob(".*.tmp")), "no temporary latest left behind"


# ----------------------------------------------------------------------------------------- real runs
@pytest.mark.slow
@pytest.mark.usefixtures("deepspeed_ops_built")
def test_single_process_training_writes_the_checkpoint_layout(phantom_shards, tmp_path):
    checkpoint_dir = tmp_path / "run"
    result = run(
        train_command(
            phantom_shards, checkpoint_dir, "--training.max_steps", "3", "--deepspeed.zero_stage", "0",
            "--logging.wandb", "disabled", "--input_modalities", "t1", "t2", "--target_modality", "flair",
        )
    )  # fmt: skip
    assert "step 3/3" in result.stdout and "data_wait_%" in result.stdout
    assert (checkpoint_dir / "generator" / "latest").read_text() == "step_000003"
    assert (checkpoint_dir / "discriminator" / "latest").read_text() == "step_000003"
    assert (checkpoint_dir / "best").read_text() == "step_000003"
    assert (checkpoint_dir / "config.yaml").is_file()
    weights = load_file(checkpoint_dir / "generator" / "step_000003" / "ema.safetensors")
    build_generator(load_config(checkpoint_dir / "config.yaml").model.generator).load_state_dict(weights)
    # the run records what it trained on, so inference needs neither the shards nor a guess later
    record = json.loads((checkpoint_dir / "training_data.json").read_text())
    manifest = json.loads((phantom_shards / "manifest.json").read_text())
    assert record["dataset"] == "brats" and record["modalities"] == manifest["modalities"]
    assert record["normalisation"]["method"] == manifest["normalisation"]["method"]
    assert (
        record["manifest_sha256"]
        == hashlib.sha256((phantom_shards / "manifest.json").read_bytes()).hexdigest()
    )
    moved = tmp_path / "moved"
    checkpoint_dir.rename(moved)
    assert load_generator(moved).dataset == "brats"


def test_bad_input_is_one_line_not_a_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "launch/train.py", "--config", "configs/demo.yaml", "--data_path", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert f"error: {tmp_path}: no manifest.json" in result.stderr
    assert "Traceback" not in result.stderr
    result = subprocess.run(
        [sys.executable, "launch/train.py", "--deepspeed.zero_stage", "7"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "deepspeed.zero_stage: 7 must be 0, 1, 2 or 3" in result.stderr


def _launcher_child(process: subprocess.Popen) -> psutil.Process:
    """The deepspeed.launcher.launch process under the `deepspeed` runner: the one that signals the ranks."""
    for _ in range(100):
        for child in psutil.Process(process.pid).children():
            if "deepspeed.launcher.launch" in " ".join(child.cmdline()):
                return child
        time.sleep(0.1)
    raise AssertionError("no deepspeed.launcher.launch process found")


def _offline_run_ids(checkpoint_dir: Path) -> set[str]:
    return {p.name.rsplit("-", 1)[-1] for p in (checkpoint_dir / "wandb").glob("offline-run-*")}


def _losses(output: str) -> dict[int, str]:
    """step -> the logged loss values of that step, as printed (one line per step with log_every_steps 1)."""
    losses = {}
    for line in output.splitlines():
        match = re.match(r"step (\d+)/\d+: (loss_g \S+, loss_d \S+)", line)
        if match:
            losses[int(match.group(1))] = match.group(2)
    return losses


@pytest.mark.slow
@pytest.mark.usefixtures("deepspeed_ops_built")
def test_sigterm_then_the_same_command_reproduces_the_uninterrupted_run(phantom_shards, tmp_path):
    # one shard, 2 ranks x 2 workers: four reading slots share it
    extra = ("--training.max_steps", "8", "--data.num_workers", "2", "--logging.wandb", "offline")
    reference_dir, interrupted_dir = tmp_path / "reference", tmp_path / "interrupted"
    reference = run(train_command(phantom_shards, reference_dir, *extra, ranks=2))

    command = train_command(phantom_shards, interrupted_dir, *extra, ranks=2)
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = []
    for line in process.stdout:
        output.append(line)
        if line.startswith("step 3/8"):
            break
    signalled = time.monotonic()
    _launcher_child(process).send_signal(signal.SIGTERM)
    output += process.stdout.readlines()
    process.wait(timeout=60)
    elapsed = time.monotonic() - signalled
    text = "".join(output)
    assert "SIGTERM: stopping at step" in text, text[-3000:]
    assert elapsed < 30, f"the ranks took {elapsed:.0f} s to save and exit (the launcher kills at 30 s)"
    stopped_at = (interrupted_dir / "generator" / "latest").read_text()
    assert stopped_at != "step_000008"
    first_ids = _offline_run_ids(interrupted_dir)
    assert len(first_ids) == 1, "an offline W&B run was written"

    resumed = run(command)
    assert f"resuming from {stopped_at}" in resumed.stdout
    assert _offline_run_ids(interrupted_dir) == first_ids, "the resumed run continues the same W&B run id"

    # the losses after resuming are those of the uninterrupted run at the same steps (printed to 4 digits)
    stopped_step = int(stopped_at.split("_")[1])
    expected, actual = _losses(reference.stdout), _losses(resumed.stdout)
    assert sorted(actual) == list(range(stopped_step + 1, 9))
    assert {step: expected[step] for step in actual} == actual

    final = "step_000008"
    expected = load_file(reference_dir / "generator" / final / "ema.safetensors")
    actual = load_file(interrupted_dir / "generator" / final / "ema.safetensors")
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)
    states = "mp_rank_00_model_states.pt"
    expected = torch.load(reference_dir / "generator" / final / states, weights_only=False)["module"]
    actual = torch.load(interrupted_dir / "generator" / final / states, weights_only=False)["module"]
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.slow
@pytest.mark.usefixtures("deepspeed_ops_built")
def test_sigterm_in_a_single_process_saves_and_exits_0(phantom_shards, tmp_path):
    checkpoint_dir = tmp_path / "single"
    command = train_command(
        phantom_shards, checkpoint_dir, "--training.max_steps", "50", "--logging.wandb", "disabled"
    )
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in process.stdout:
        if line.startswith("step 2/"):
            break
    process.send_signal(signal.SIGTERM)
    rest = process.stdout.read()
    assert process.wait(timeout=30) == 0, rest[-3000:]
    tag = (checkpoint_dir / "generator" / "latest").read_text()
    assert f"saved checkpoint {checkpoint_dir / 'generator' / tag}" in rest
    load_file(checkpoint_dir / "generator" / tag / "ema.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("stage, precision", [(0, "fp32"), (3, "bf16")])
@pytest.mark.usefixtures("deepspeed_ops_built")
def test_two_ranks_train_and_checkpoint(phantom_shards, tmp_path, stage, precision):
    checkpoint_dir = tmp_path / f"zero{stage}"
    command = train_command(
        phantom_shards, checkpoint_dir, "--training.max_steps", "2", "--deepspeed.zero_stage", str(stage),
        "--deepspeed.precision", precision, "--logging.wandb", "disabled", ranks=2,
    )  # fmt: skip
    run(command)
    port = command[command.index("--master_port") + 1]
    leftovers = list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    assert not leftovers, "DeepSpeed's shared-memory buffers must not outlive the run"
    generator_dir = checkpoint_dir / "generator"
    tag_dir = generator_dir / "step_000002"
    model = build_generator(load_config(checkpoint_dir / "config.yaml").model.generator)
    if stage == 0:
        # ZeRO 0 writes one model file holding the whole generator
        model.load_state_dict(
            torch.load(tag_dir / "mp_rank_00_model_states.pt", weights_only=False)["module"]
        )
        return
    assert len(list(tag_dir.glob("zero_pp_rank_*_model_states.pt"))) == 2, "one shard per rank"
    out = tmp_path / "consolidated"
    subprocess.run(
        [sys.executable, str(generator_dir / "zero_to_fp32.py"), str(generator_dir), str(out)],
        check=True, capture_output=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    state = torch.load(out / "pytorch_model.bin", weights_only=False)
    model.load_state_dict(state)
    assert all(t.dtype == torch.float32 for t in state.values())


def test_ema_warms_up_and_then_averages():
    model = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    ema = ExponentialMovingAverage(model, decay=0.99)
    assert ema.decay_at(1) == pytest.approx(2 / 11)
    assert ema.decay_at(10_000) == 0.99
    with torch.no_grad():
        model.weight.fill_(1.0)
    for step in range(1, 51):
        ema.update(model, step)
    # without warm-up 0.99 ** 50 = 60% of the initial zeros would remain; with it, under 1%
    remaining = 1.0 - ema.shadow["weight"]
    assert torch.all(remaining < 0.01)
    expected = 1.0
    for step in range(1, 51):
        expected *= ema.decay_at(step)
    torch.testing.assert_close(remaining, torch.full((2, 2), expected))


@pytest.mark.slow
@pytest.mark.usefixtures("deepspeed_ops_built")
def test_two_ranks_validate_as_one_keep_an_fp32_ema_and_shard_a_test_folder_once(
    phantom_shards, phantom_subjects, tmp_path
):
    """tests/multi_rank_checks.py on 1 rank (validation only) and on 2 (all three checks)."""
    checkpoint = write_checkpoint(tmp_path / "model")
    script = [
        "tests/multi_rank_checks.py", "--shards", str(phantom_shards), "--raw", str(phantom_subjects),
        "--checkpoint", str(checkpoint),
    ]  # fmt: skip
    one, two = tmp_path / "one", tmp_path / "two"
    run([sys.executable, *script, "--out", str(one), "--validation-only"])
    launched = run(
        [DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_master_port()), *script, "--out", str(two)]
    )
    ranks = [json.loads((two / f"rank{rank}.json").read_text()) for rank in (0, 1)]

    # the whole val split scores the same on 1 and 2 ranks (each volume keeps its task; rank 1 of 2 may
    # hold none of the val subjects); the scan shares are a diagnostic of each rank's first volume, left
    # out; a std over one volume is NaN on both
    def scores(results: dict) -> dict[str, float]:
        return {k: v for k, v in results["validation"].items() if k.startswith("val/")}

    reference = scores(json.loads((one / "rank0.json").read_text()))
    assert reference["val/volumes"] >= 1 and reference["val/slices"] > 4
    assert np.isfinite(reference["val/psnr"])
    for rank in ranks:
        assert scores(rank) == pytest.approx(reference, rel=1e-6, abs=1e-9, nan_ok=True)

    # one Adam step of 1e-4 on a weight of 1.0: the bf16 weight stays, the fp32 master and the EMA move
    for ema in (rank["ema"] for rank in ranks):
        assert ema["weight_min"] == ema["weight_max"] == 1.0, "the bf16 copy kept the weight"
        assert ema["master_max"] < 1.0, "the fp32 master took the step"
        assert ema["ema_max"] < 1.0 and ema["ema_error"] < 1e-7, ema

    # --mode test on 2 ranks: rank 0 shards the raw folder while the other waits, then evaluates alone
    output = launched.stdout + launched.stderr
    assert output.count("is a raw folder") == 1, output[-4000:]
    assert "reusing the shards" not in output
    assert [rank["front_door_exit"] for rank in ranks] == [0, 0]
    assert (two / "front" / "eval" / "report.html").is_file()
