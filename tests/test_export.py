"""Checkpoint folder -> generator, export -> .safetensors + JSON, and back, with the same outputs."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_GENERATOR, write_checkpoint

from medgan.checkpointing import CheckpointError
from medgan.config import build_config
from medgan.export import export_generator
from medgan.inference import load_generator


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
