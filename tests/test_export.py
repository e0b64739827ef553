"""Checkpoint folder -> generator, export -> .safetensors + JSON, and back, with the same outputs."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import FORMAT_1_NORMALISATION, TINY_GENERATOR, current_training_data, write_checkpoint
from safetensors import safe_open

from medgan.checkpointing import CheckpointError
from medgan.config import build_config
from medgan.inference.export import export_generator
from medgan.inference.loading import load_generator


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
    # The shard format and normalisation travel with the weights, in the JSON and the file's metadata.
    assert described["training_data"] == current_training_data() == from_file.training_data
    with safe_open(str(weights), framework="pt") as handle:
        assert json.loads(handle.metadata()["training_data"]) == current_training_data()


OLD_RECORDS = {
    "format 1": {"dataset": "brats", "format_version": 1, "normalisation": FORMAT_1_NORMALISATION},
    "exported before the record": {"dataset": "brats"},
    "no record": None,
}
FORMAT_1_LINE = (
    "trained on shard format 1 (percentile normalisation), but this version reads shard format 2 "
    "(healthy-median normalisation): retrain on shards made by python -m data_prep shard, "
    "or use the medgan version it was trained with"
)
UNRECORDED_LINE = (
    "trained on unrecorded shards (older than format 2), but this version reads shard format 2 "
    "(healthy-median normalisation): retrain on shards made by python -m data_prep shard, "
    "or use the medgan version it was trained with"
)


@pytest.mark.parametrize("old", OLD_RECORDS)
def test_generators_trained_on_another_normalisation_are_refused(tmp_path, old):
    """Its inputs would arrive scaled otherwise: a checkpoint folder or an exported file of another shard
    format, or with no record of one (all such were trained on format 1), is refused in one line."""
    expected = FORMAT_1_LINE if old == "format 1" else UNRECORDED_LINE
    checkpoint = write_checkpoint(tmp_path / "run", training_data=OLD_RECORDS[old])
    with pytest.raises(CheckpointError) as raised:
        load_generator(checkpoint)
    assert str(raised.value) == f"{checkpoint}: {expected}"
    # An exported file carrying the old record (as export wrote it from such a run) is refused alike.
    current = load_generator(write_checkpoint(tmp_path / "current"))
    exported, _ = dataclasses.replace(current, training_data=OLD_RECORDS[old] or {}).save(
        tmp_path / "G.safetensors"
    )
    with pytest.raises(CheckpointError) as raised:
        load_generator(exported)
    assert str(raised.value) == f"{exported}: {expected}"
    with pytest.raises(CheckpointError, match="retrain on shards"):
        export_generator(checkpoint, tmp_path / "again.safetensors")


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


def test_a_run_from_before_the_record_is_refused_even_if_its_shards_are_current_now(tmp_path, phantom_shards):
    """Without training_data.json the run predates format 2; its data_path may have been re-sharded since,
    so the manifest found there says nothing of what the run trained on."""
    checkpoint = write_checkpoint(
        tmp_path / "run", data={"data_path": str(phantom_shards)}, training_data=None
    )
    with pytest.raises(CheckpointError) as raised:
        load_generator(checkpoint)
    assert str(raised.value) == f"{checkpoint}: {UNRECORDED_LINE}"


@pytest.mark.parametrize("backend", ["triton", "mamba"])
def test_a_run_trained_with_a_gpu_scan_predicts_on_the_cpu(tmp_path, backend):
    """scan_backend is how a GPU run chose to scan, not part of the model: loaded off a GPU, the same
    weights give the chunked path's outputs instead of failing inside a CUDA kernel."""
    import yaml

    from medgan.checkpointing import CheckpointLayout

    checkpoint = write_checkpoint(tmp_path / "run")
    config_file = CheckpointLayout(checkpoint).config_file
    config = yaml.safe_load(config_file.read_text())
    expected = _outputs(load_generator(checkpoint))
    config["model"]["generator"]["scan_backend"] = backend
    config_file.write_text(yaml.safe_dump(config))
    loaded = load_generator(checkpoint, device="cpu")
    assert loaded.config.model.generator.scan_backend == backend  # the run's record is kept as it was
    assert torch.equal(_outputs(loaded), expected)
