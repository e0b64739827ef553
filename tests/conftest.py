"""Shared fixtures: a small phantom dataset sharded once per test session, through the real command lines."""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Tests never talk to W&B's servers.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

# Without a GPU, Triton's interpreter runs the Triton scan on CPU tensors (tests/test_ssm_triton.py). Triton
# reads the switch when a kernel is defined, so it is set here, before any test module can import Triton.
if "triton" not in sys.modules and "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


def run_module(*args: str, cwd: Path = REPO, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``python -m ...`` as a user would, failing the test with its output when it fails."""
    result = subprocess.run(
        [sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
    if result.returncode != 0:
        command = " ".join(args)
        pytest.fail(f"python -m {command} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


# A tiny generator and a 4-step single-process run on configs/demo.yaml, for command-line tests of an arch.
TINY_TRAIN_FLAGS = [
    "--config", "configs/demo.yaml",
    "--model.generator.unet_base_channels", "8", "--model.generator.depth", "2",
    "--model.generator.ssm_levels", "1", "--model.generator.ssm_state", "4",
    "--model.discriminator.base_channels", "8", "--training.max_steps", "4",
    "--deepspeed.zero_stage", "0", "--logging.wandb", "disabled", "--logging.progress_bar", "false",
    "--data.num_workers", "0",
]  # fmt: skip


def run_command(command: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a command line from the repository root; a non-zero exit fails the test with its output."""
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def train_tiny(shards: Path, run_dir: Path, *flags: str) -> subprocess.CompletedProcess:
    """``launch/train.py`` with :data:`TINY_TRAIN_FLAGS` and ``flags`` on ``shards`` into ``run_dir``."""
    command = [sys.executable, "launch/train.py", *TINY_TRAIN_FLAGS, "--data_path", str(shards)]
    return run_command([*command, "--checkpoint_dir", str(run_dir), *flags])


def evaluated_model_rows(run_dir: Path, shards: Path, out: Path) -> list[dict]:
    """``python -m medgan evaluate`` of ``run_dir`` on the test split; the model's brain rows of
    per_volume.csv."""
    import csv

    run_command([
        sys.executable, "-m", "medgan", "evaluate", "--checkpoint", str(run_dir), "--data_path", str(shards),
        "--split", "test", "--out", str(out),
    ])  # fmt: skip
    with open(out / "per_volume.csv") as stream:
        return [r for r in csv.DictReader(stream) if r["method"] == "model" and r["region"] == "brain"]


def take_batches(loader, count: int) -> list:
    """The first ``count`` batches of a loader (an endless training stream included)."""
    return list(itertools.islice(loader, count))


def load_script(path: Path, name: str):
    """Import a script that is not in a package (a benchmark, a fixture maker) as module ``name``
    (registered in ``sys.modules`` first, as an import does, so its dataclasses can find it)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def phantom_subjects(tmp_path_factory) -> Path:
    """8 BraTS-layout phantom subjects, 64 x 64 x 24 voxels."""
    out = tmp_path_factory.mktemp("phantom") / "brats"
    run_module(
        "data_prep", "phantom", "--layout", "brats", "--subjects", "8", "--out", str(out),
        "--seed", "3", "--shape", "64", "64", "24",
    )  # fmt: skip
    return out


@pytest.fixture(scope="session")
def phantom_shards(phantom_subjects, tmp_path_factory) -> Path:
    """The phantom sharded at 64 x 64 pixels, split 6 / 1 / 1 subjects."""
    out = tmp_path_factory.mktemp("shards") / "brats64"
    run_module(
        "data_prep", "shard", "--format", "brats", "--src", str(phantom_subjects), "--out", str(out),
        "--size", "64", "--split", "0.75", "0.125", "0.125", "--seed", "0",
    )  # fmt: skip
    return out


@pytest.fixture(scope="session")
def deepspeed_ops_built() -> None:
    """DeepSpeed's CPU all-reduce op, JIT-built once (about 80 s on a fresh machine) in a process nobody
    kills. Tests that signal or kill launched ranks use it: a rank killed while building leaves torch's
    build lock behind, and every later launch then waits on it forever."""
    code = "from deepspeed.comm.torch import build_shm_op; build_shm_op()"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        pytest.fail(f"building DeepSpeed's CPU communication op failed:\n{result.stdout}\n{result.stderr}")


TINY_GENERATOR = {
    "base_channels": 8,
    "depth": 2,
    "ssm_levels": [1],
    "ssm_state": 4,
    "ssm_expand": 1,
    "attention_heads": 2,
    "condition_dim": 8,
}


def current_training_data(**extra) -> dict:
    """A training-data record of shards as data_prep makes them now (format version and normalisation, as
    ``ShardFolder.training_data`` records them), plus ``extra`` fields (e.g. ``dataset="brats"``)."""
    from data_prep.volumes import FORMAT_VERSION, normalisation_method

    return {"format_version": FORMAT_VERSION, "normalisation": normalisation_method(), **extra}


# A format 1 manifest's normalisation record, as data_prep wrote it before the healthy-median method.
FORMAT_1_NORMALISATION = {
    "method": "percentile",
    "low_percentile": 0.5,
    "high_percentile": 99.5,
    "within": "brain mask (BraTS: nonzero) or head mask (IXI: Otsu)",
    "outside_mask": 0.0,
    "formula": "clip((x - low) / (high - low), 0, 1); inverse x = low + y * (high - low)",
}


def write_format_1_shards(shards: Path, out: Path) -> Path:
    """A copy of ``shards`` (links to its tar files) whose manifest says format 1, percentile normalisation
    and no source, as data_prep wrote it before issue #16; its report.json still names the source."""
    out.mkdir(parents=True)
    for path in shards.iterdir():
        if path.name != "manifest.json":
            (out / path.name).symlink_to(path)
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest.pop("source")
    manifest["format_version"] = 1
    manifest["normalisation"] = {**FORMAT_1_NORMALISATION, "parameters": {}}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


_CURRENT = object()


def write_checkpoint(
    directory: Path,
    *,
    data: dict | None = None,
    ema: bool = True,
    seed: int = 0,
    arch: str = "ssm",
    training_data: dict | None = _CURRENT,
) -> Path:
    """A checkpoint folder in the trainer's layout holding a freshly initialised tiny generator.

    ema=True writes ``generator/step_000002/ema.safetensors``; False writes only DeepSpeed's
    ``mp_rank_00_model_states.pt`` (the ZeRO-0 layout) so the consolidation path is used.
    training_data: the run's training-data record (``training_data.json``); by default
    `current_training_data()` (no dataset: inference guesses it from file names), or None for a
    checkpoint written before the record existed. Paths come from ``medgan.checkpointing``, the layout's
    owner.
    """
    import torch
    from safetensors.torch import save_file

    from medgan.checkpointing import MODEL_STATES_FILE, CheckpointLayout, tag_for_step
    from medgan.config import build_config
    from medgan.models.generator import build_generator

    config = build_config({"model": {"generator": {**TINY_GENERATOR, "arch": arch}}, "data": data or {}})
    torch.manual_seed(seed)
    generator = build_generator(config.model.generator)
    layout, tag = CheckpointLayout(directory), tag_for_step(2)
    layout.tag_dir(tag).mkdir(parents=True)
    state = {name: tensor.contiguous() for name, tensor in generator.state_dict().items()}
    if ema:
        save_file(state, str(layout.ema_file(tag)))
    else:
        torch.save({"module": state}, layout.tag_dir(tag) / MODEL_STATES_FILE)
    layout.latest_file().write_text(tag)
    layout.best_file.write_text(tag)
    config.save(layout.config_file)
    if training_data is _CURRENT:
        training_data = current_training_data()
    if training_data is not None:
        layout.training_data_file.write_text(json.dumps(training_data))
    return directory


# BraTS 2023+ file names of the phantom's BraTS 2021 ones (data_prep reads them back as t1 t1ce t2 flair).
BRATS_2023_NAMES = {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f", "seg": "seg"}


def write_brats2023_subjects(
    phantom_subjects: Path, out: Path, numbers=range(8), leave_out: dict[int, tuple[str, ...]] | None = None
) -> Path:
    """Phantom subjects ``BraTS2021_0000N`` under BraTS 2023+ names, as symbolic links:
    ``out/BraTS-GLI-0000N-000/BraTS-GLI-0000N-000-{t1n,t1c,t2w,t2f,seg}.nii.gz`` for each N in
    ``numbers``, without the files whose 2023 names ``leave_out[N]`` lists (e.g. ``{2: ("t2f",)}``)."""
    leave_out = leave_out or {}
    for number in numbers:
        old, new = f"BraTS2021_{number:05d}", f"BraTS-GLI-{number:05d}-000"
        (out / new).mkdir(parents=True)
        for name, name_2023 in BRATS_2023_NAMES.items():
            if name_2023 not in leave_out.get(number, ()):
                target = phantom_subjects / old / f"{old}_{name}.nii.gz"
                (out / new / f"{new}-{name_2023}.nii.gz").symlink_to(target)
    return out


@pytest.fixture(scope="session")
def phantom_subjects_2023(phantom_subjects, tmp_path_factory) -> Path:
    """The 8 phantom subjects of `phantom_subjects` under BraTS 2023+ names (`write_brats2023_subjects`)."""
    return write_brats2023_subjects(phantom_subjects, tmp_path_factory.mktemp("phantom2023") / "brats2023")
