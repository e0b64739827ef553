"""Checkpoint folder -> generator, export -> .safetensors + JSON, and back, with the same outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from medgan.checkpointing import CheckpointError
from medgan.config import build_config
from medgan.export import export_generator
from medgan.inference import load_generator
from medgan.models.generator import build_generator

TINY_GENERATOR = {
    "base_channels": 8,
    "depth": 2,
    "ssm_levels": [1],
    "ssm_state": 4,
    "ssm_expand": 1,
    "attention_heads": 2,
    "condition_dim": 8,
}


def write_checkpoint(
    directory: Path, *, data: dict | None = None, ema: bool = True, seed: int = 0, arch: str = "ssm"
) -> Path:
    """A checkpoint folder in the trainer's layout holding a freshly initialised tiny generator.

    ema=True writes ``generator/step_000002/ema.safetensors``; False writes only DeepSpeed's
    ``mp_rank_00_model_states.pt`` (the ZeRO-0 layout) so the consolidation path is used.
    """
    config = build_config({"model": {"generator": {**TINY_GENERATOR, "arch": arch}}, "data": data or {}})
    torch.manual_seed(seed)
    generator = build_generator(config.model.generator)
    tag_dir = directory / "generator" / "step_000002"
    tag_dir.mkdir(parents=True)
    state = {name: tensor.contiguous() for name, tensor in generator.state_dict().items()}
    if ema:
        save_file(state, str(tag_dir / "ema.safetensors"))
    else:
        torch.save({"module": state}, tag_dir / "mp_rank_00_model_states.pt")
    (directory / "generator" / "latest").write_text("step_000002")
    (directory / "best").write_text("step_000002")
    config.save(directory / "config.yaml")
    return directory


def _outputs(generator) -> torch.Tensor:
    torch.manual_seed(1)
    images = torch.rand(2, 5, 32, 32)
    available = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 0, 0]], dtype=torch.bool)
    with torch.no_grad():
        return generator.module(images, available, torch.tensor([3, 0]))


@pytest.mark.parametrize("ema", [True, False])
def test_export_round_trip_gives_the_same_generator(tmp_path, ema):
    checkpoint = write_checkpoint(tmp_path / "run", ema=ema)
    weights, description, _ = export_generator(checkpoint, tmp_path / "G.safetensors")

    from_folder = load_generator(checkpoint)
    from_file = load_generator(weights)
    assert torch.equal(_outputs(from_folder), _outputs(from_file))
    assert from_file.modalities == ["t1", "t1ce", "t2", "flair", "pd"]
    assert from_file.generator_config == from_folder.generator_config
    assert ("EMA" in from_folder.source) is ema
    described = json.loads(description.read_text())
    assert described["modalities"] == from_file.modalities
    assert described["config"]["model"]["generator"]["base_channels"] == 8


def test_served_tasks_follow_the_training_task(tmp_path):
    fixed = load_generator(
        write_checkpoint(
            tmp_path / "fixed", data={"input_modalities": ["t1", "t2"], "target_modality": "flair"}
        )
    )
    assert fixed.serves(["t2", "t1"], "flair") is None
    assert "flair only" in fixed.serves(["t1", "t2"], "t1ce")
    assert "inputs t1 t2 only" in fixed.serves(["t1"], "flair")
    every = load_generator(write_checkpoint(tmp_path / "any"))
    assert every.serves(["t1"], "pd") is None
    assert "not one of the checkpoint's contrasts" in every.serves(["t1"], "dwi")


def test_bad_checkpoints_are_one_line_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_generator(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.yaml"):
        load_generator(tmp_path / "empty")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_generator(junk)
    checkpoint = write_checkpoint(tmp_path / "run")
    with pytest.raises(CheckpointError, match="must end in .safetensors"):
        export_generator(checkpoint, tmp_path / "G.pt")
    wider = build_config({"model": {"generator": {**TINY_GENERATOR, "base_channels": 16}}})
    wider.save(checkpoint / "config.yaml")
    with pytest.raises(CheckpointError, match="do not fit"):
        load_generator(checkpoint)
