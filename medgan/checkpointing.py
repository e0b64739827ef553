"""Crash-safe checkpoints in DESIGN.md's layout, written and read through DeepSpeed's own engine API.

```
CKPT_DIR/generator/step_000500/   DeepSpeed's per-rank shards + ema.safetensors
CKPT_DIR/generator/latest         the newest complete tag
CKPT_DIR/discriminator/...        the same for D
CKPT_DIR/best                     the tag with the best validation PSNR (never pruned)
CKPT_DIR/config.yaml              the run's full config
CKPT_DIR/training_data.json       what the run trained on: dataset kind, modality order, normalisation
CKPT_DIR/run_record.json          the trainer's record: steps, CPU seconds, parameters, best step, validations
```
This module is the only one that knows these names: it writes them during training, and
:class:`CheckpointLayout`, :func:`resolve_tag`, :func:`read_generator_weights`, :func:`read_run`,
:func:`read_run_record` and :func:`read_best_tag` are how inference, export, benchmarks and the tests read
them.
DeepSpeed would write ``latest`` from rank 0 before the other ranks finish their shards; here it is turned
off and written after a barrier by atomic rename, so a crash mid-save leaves ``latest`` on the last
complete tag.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from data_prep.errors import UserError
from medgan.config import Config, ConfigError, load_config
from medgan.distributed import DistributedContext, barrier

TAG_PATTERN = re.compile(r"^step_(\d+)$")
EMA_FILE = "ema.safetensors"
# DeepSpeed's own file name for the (unpartitioned) module state under ZeRO 0-2.
MODEL_STATES_FILE = "mp_rank_00_model_states.pt"


class CheckpointError(UserError):
    """A checkpoint path a user gave cannot be used; the one-line message names the path and why."""


@dataclass(frozen=True, slots=True)
class CheckpointLayout:
    """The paths of DESIGN.md's checkpoint layout under ``directory``."""

    directory: Path

    @property
    def generator_dir(self) -> Path:
        return self.directory / "generator"

    @property
    def discriminator_dir(self) -> Path:
        return self.directory / "discriminator"

    @property
    def best_file(self) -> Path:
        return self.directory / "best"

    @property
    def config_file(self) -> Path:
        return self.directory / "config.yaml"

    @property
    def training_data_file(self) -> Path:
        return self.directory / "training_data.json"

    @property
    def run_record_file(self) -> Path:
        return self.directory / "run_record.json"

    def latest_file(self, network: str = "generator") -> Path:
        return self.directory / network / "latest"

    def tag_dir(self, tag: str, network: str = "generator") -> Path:
        return self.directory / network / tag

    def ema_file(self, tag: str) -> Path:
        return self.tag_dir(tag) / EMA_FILE


def tag_for_step(step: int) -> str:
    return f"step_{step:06d}"


def step_of_tag(tag: str) -> int:
    """The optimizer step a ``step_NNNNNN`` tag was saved at; a CheckpointError for another name."""
    match = TAG_PATTERN.match(tag)
    if match is None:
        raise CheckpointError(f"{tag!r}: not a checkpoint tag (expected step_NNNNNN)")
    return int(match.group(1))


def write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def read_tag(path: Path) -> str | None:
    return path.read_text().strip() if path.is_file() else None


def provenance(manifest_sha256: str) -> dict[str, Any]:
    """Enough to reproduce a run: code commit, package versions, the exact data."""
    import deepspeed
    import torch

    import medgan

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(medgan.__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {
        "git_commit": commit or "unknown",
        "medgan": medgan.__version__,
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "python": platform.python_version(),
        "manifest_sha256": manifest_sha256,
    }


class CheckpointManager:
    """Save and resume both engines and the EMA; prune all but the last ``keep_last`` tags and the best."""

    def __init__(self, directory: str | Path, keep_last: int, context: DistributedContext) -> None:
        self.layout = CheckpointLayout(Path(directory))
        self.directory = self.layout.directory
        self.generator_dir = self.layout.generator_dir
        self.discriminator_dir = self.layout.discriminator_dir
        self.keep_last = keep_last
        self.context = context

    def latest_tag(self) -> str | None:
        return read_tag(self.layout.latest_file())

    def best_tag(self) -> str | None:
        return read_tag(self.layout.best_file)

    def write_run(self, config: Config, training_data: dict[str, Any]) -> None:
        """Rank 0: the run's config and what it trains on, beside the tags (rewritten on every start)."""
        if self.context.is_main:
            self.directory.mkdir(parents=True, exist_ok=True)
            write_atomically(self.layout.config_file, config.to_yaml())
            write_atomically(self.layout.training_data_file, json.dumps(training_data, indent=2) + "\n")

    def write_run_record(self, record: dict[str, Any]) -> None:
        """Rank 0: the trainer's record of the run (``TrainState.run_record``), replacing the last one
        atomically, so a reader never sees half a file."""
        if self.context.is_main:
            self.directory.mkdir(parents=True, exist_ok=True)
            write_atomically(self.layout.run_record_file, json.dumps(record, indent=2) + "\n")

    def save(self, step: int, g_engine, d_engine, ema, client_state: dict[str, Any]) -> str:
        """Write tag ``step_NNNNNN`` on every rank, then point ``latest`` at it. Collective."""
        tag = tag_for_step(step)
        g_engine.save_checkpoint(
            str(self.generator_dir), tag=tag, client_state=client_state, save_latest=False
        )
        d_engine.save_checkpoint(str(self.discriminator_dir), tag=tag, save_latest=False)
        if self.context.is_main and ema is not None:
            ema.save(self.layout.ema_file(tag))
        barrier()
        if self.context.is_main:
            write_atomically(self.layout.latest_file("generator"), tag)
            write_atomically(self.layout.latest_file("discriminator"), tag)
            self._prune()
        barrier()
        return tag

    def mark_best(self, tag: str) -> None:
        if self.context.is_main:
            write_atomically(self.layout.best_file, tag)

    def load(self, g_engine, d_engine, ema) -> dict[str, Any] | None:
        """Restore the latest complete tag into both engines and the EMA; None when there is none."""
        tag = self.latest_tag()
        if tag is None:
            return None
        path, client_state = g_engine.load_checkpoint(str(self.generator_dir), tag=tag)
        if path is None:
            raise RuntimeError(f"{self.generator_dir / tag}: DeepSpeed could not load this checkpoint")
        d_path, _ = d_engine.load_checkpoint(str(self.discriminator_dir), tag=tag)
        if d_path is None:
            raise RuntimeError(f"{self.discriminator_dir / tag}: DeepSpeed could not load this checkpoint")
        ema_path = self.layout.ema_file(tag)
        if ema is not None and ema_path.is_file():
            ema.load(ema_path)
        return {**client_state, "tag": tag}

    def _prune(self) -> None:
        keep = {self.best_tag(), self.latest_tag()}
        for folder in (self.generator_dir, self.discriminator_dir):
            tags = sorted(
                (int(m.group(1)), p.name)
                for p in folder.iterdir()
                if p.is_dir() and (m := TAG_PATTERN.match(p.name))
            )
            for _, name in tags[: max(0, len(tags) - self.keep_last)]:
                if name not in keep:
                    shutil.rmtree(folder / name, ignore_errors=True)


def resolve_tag(checkpoint_dir: Path, tag: str | None = None) -> tuple[str, str]:
    """(tag, why this one): the given tag, else ``best`` (best validation PSNR), else ``latest``."""
    layout = CheckpointLayout(Path(checkpoint_dir))
    if tag:
        if not layout.tag_dir(tag).is_dir():
            raise CheckpointError(f"{layout.tag_dir(tag)}: no such checkpoint tag")
        return tag, "as requested"
    for pointer, why in ((layout.best_file, "best validation PSNR"), (layout.latest_file(), "latest")):
        named = read_tag(pointer)
        if named and layout.tag_dir(named).is_dir():
            return named, why
    raise CheckpointError(
        f"{checkpoint_dir}: not a checkpoint folder (no generator/latest; expected the layout of DESIGN.md)"
    )


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors; an unreadable file is a CheckpointError naming it."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{path}: not a readable safetensors file ({error})") from None


def read_generator_weights(
    checkpoint_dir: Path, tag: str, weights: str | None = None
) -> tuple[dict[str, torch.Tensor], str]:
    """The generator's full fp32 state_dict at ``tag`` and which weights they are (``ema`` or ``raw``).

    weights: None for the EMA when the tag has one, else DeepSpeed's shards (consolidated by
    ``zero_to_fp32`` under ZeRO); ``"ema"`` or ``"raw"`` for that set, a CheckpointError when the tag
    does not hold it."""
    layout = CheckpointLayout(Path(checkpoint_dir))
    tag_dir = layout.tag_dir(tag)
    has_ema = layout.ema_file(tag).is_file()
    if weights == "ema" and not has_ema:
        raise CheckpointError(f"{tag_dir}: no {EMA_FILE}, so it holds raw weights only")
    if has_ema and weights != "raw":
        return read_safetensors(layout.ema_file(tag)), "ema"
    if any(tag_dir.glob("*zero_pp_rank_*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(layout.generator_dir), tag=tag)
        return {name: tensor.float() for name, tensor in state.items()}, "raw"
    model_states = tag_dir / MODEL_STATES_FILE
    if not model_states.is_file():
        held = (
            f"no DeepSpeed model states (raw weights), only {EMA_FILE}"
            if has_ema
            else (f"neither {EMA_FILE} nor DeepSpeed model states")
        )
        raise CheckpointError(f"{tag_dir}: holds {held}")
    # DeepSpeed's own file: it pickles optimizer and RNG state, so weights_only loading cannot read it.
    state = torch.load(model_states, map_location="cpu", weights_only=False)["module"]
    return {name: tensor.float() for name, tensor in state.items()}, "raw"


def read_run(checkpoint_dir: Path) -> tuple[Config, dict[str, Any]]:
    """The run's config and its training-data record (for checkpoints written before the record existed:
    ``{}``, or what the training shards' manifest still says of the dataset, without a format)."""
    layout = CheckpointLayout(Path(checkpoint_dir))
    if not layout.config_file.is_file():
        raise CheckpointError(f"{checkpoint_dir}: no config.yaml (not a checkpoint folder written by medgan)")
    try:
        config = load_config(layout.config_file, saved=True)
    except ConfigError as error:
        raise CheckpointError(f"{layout.config_file}: {error}") from None
    if layout.training_data_file.is_file():
        try:
            return config, json.loads(layout.training_data_file.read_text())
        except json.JSONDecodeError as error:
            raise CheckpointError(f"{layout.training_data_file}: not valid JSON ({error.msg})") from None
    return config, _training_data_from_old_run(config)


def read_run_record(checkpoint_dir: Path) -> dict[str, Any]:
    """The trainer's record of the run in ``checkpoint_dir`` (steps, epochs, ``train_cpu_seconds``,
    ``generator_parameters``, ``best_step``, ``validations`` ``[[step, val PSNR], ...]``, ``stopped_by``:
    ``medgan.training.state.TrainState.run_record``); a CheckpointError when it is missing or unreadable."""
    path = CheckpointLayout(Path(checkpoint_dir)).run_record_file
    if not path.is_file():
        raise CheckpointError(f"{path}: no run record (the run has not validated or saved yet, or is older)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: not valid JSON ({error.msg})") from None


def read_best_tag(checkpoint_dir: Path) -> str | None:
    """The tag with the best validation PSNR in ``checkpoint_dir``, or None before the first validation."""
    return read_tag(CheckpointLayout(Path(checkpoint_dir)).best_file)


def _training_data_from_old_run(config: Config) -> dict[str, Any]:
    """Checkpoints from before training_data.json: the manifest the run read, if it is still there, less
    its format and normalisation. Such runs predate shard format 2, whatever the folder holds now (it
    may have been re-sharded since), so their record says nothing of the scale and inference refuses
    them (`medgan.inference.loading.check_training_data`)."""
    from data_prep.errors import DataError
    from data_prep.shard_reader import ShardFolder

    try:
        record = ShardFolder.read(config.data.data_path).training_data()
    except (DataError, OSError, KeyError):
        return {}
    return {key: value for key, value in record.items() if key not in ("format_version", "normalisation")}
