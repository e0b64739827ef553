"""2.5D context: a generator with context_slices k draws on exactly k slices each side, the edge rule is
one function, and a 2.5D U-Net trains on slabs, synthesizes and evaluates from the command line."""

import json
import sys

import numpy as np
import pytest
import torch
from conftest import evaluated_model_rows, run_command, train_tiny

from data_prep.errors import ConfigError
from medgan.config import build_config, load_config
from medgan.models.conditioning import condition_stack, stack_channels
from medgan.models.context import context_windows, predict_stack
from medgan.models.generator import GeneratorConfig, build_generator

TINY_UNET = dict(
    arch="unet", unet_base_channels=8, depth=2, ssm_levels=[1], modalities=["t1", "t1ce", "t2", "flair"]
)


def _generator(context_slices: int, arch: str = "unet") -> torch.nn.Module:
    torch.manual_seed(0)
    config = GeneratorConfig(**{**TINY_UNET, "arch": arch, "context_slices": context_slices})
    if arch == "ssm":
        config = GeneratorConfig(
            arch="ssm", base_channels=8, depth=2, ssm_levels=[1], ssm_state=4, ssm_expand=1,
            attention_heads=2, condition_dim=8, modalities=TINY_UNET["modalities"],
            context_slices=context_slices,
        )  # fmt: skip
    return build_generator(config).eval()


def _predict(model, stack, context_slices):
    available = torch.tensor([True, True, True, False])
    with torch.no_grad():
        return predict_stack(model, stack, available, 3, context_slices, batch_size=4)[:, 0]


@pytest.mark.parametrize("arch", ["unet", "ssm"])
@pytest.mark.parametrize("k", [0, 1, 2])
def test_the_reach_across_slices_is_exactly_k(arch, k):
    model = _generator(k, arch)
    stack = torch.rand(14, 4, 32, 32, generator=torch.Generator().manual_seed(1))
    before = _predict(model, stack, k)
    i = 6
    far = stack.clone()
    far[i - k - 1] = torch.rand(4, 32, 32)
    far[i + k + 1] = torch.rand(4, 32, 32)
    assert torch.equal(_predict(model, far, k)[i], before[i]), "slices i +- (k + 1) changed slice i"
    near = stack.clone()
    near[i + k, :3] = torch.rand(3, 32, 32)  # an input contrast of slice i + k
    assert not torch.equal(_predict(model, near, k)[i], before[i]), "slice i + k did not reach slice i"


def test_context_beyond_the_stack_is_zero_and_the_centre_is_the_slice():
    stack = torch.arange(1, 6, dtype=torch.float32)[:, None, None, None].expand(5, 2, 3, 3)
    windows = context_windows(stack, torch.tensor([0, 2, 4]), 2)
    assert windows.shape == (3, 5, 2, 3, 3)
    assert windows[:, :, 0, 0, 0].tolist() == [[0, 0, 1, 2, 3], [1, 2, 3, 4, 5], [3, 4, 5, 0, 0]]


def test_a_non_input_contrast_is_hidden_on_every_slice_of_the_context():
    images = torch.rand(2, 5, 4, 8, 8)
    available = torch.tensor([[True, False, True, False]] * 2)
    stack = condition_stack(images, available, torch.tensor([3, 3]))
    assert stack.shape == (2, stack_channels(4, 2), 8, 8) == (2, 28, 8, 8)
    shown = stack[:, :20].reshape(2, 5, 4, 8, 8)
    assert not shown[:, :, [1, 3]].any() and torch.equal(shown[:, :, [0, 2]], images[:, :, [0, 2]])


def test_context_slices_is_part_of_the_model_config_and_checked():
    config = build_config({"model": {"generator": {"arch": "unet", "context_slices": 2}}})
    assert config.model.generator.context_slices == 2
    with pytest.raises(ConfigError, match="model.generator.context_slices"):
        build_config({"model": {"generator": {"context_slices": -1}}})
    with pytest.raises(
        ConfigError, match="data.batch_size: 6 slices per rank is not a whole number of slabs"
    ):
        build_config({"data": {"batch_size": 6, "slab_slices": 4}})


def test_a_config_saved_before_whole_volume_validation_still_loads(tmp_path):
    saved = tmp_path / "config.yaml"
    saved.write_text("training:\n  val_max_batches: 8\nmodel:\n  generator:\n    arch: unet\n")
    assert load_config(saved, saved=True).model.generator.context_slices == 0
    with pytest.raises(ConfigError, match="training.val_max_batches: retired.*val_max_subjects"):
        load_config(saved)


@pytest.mark.slow
def test_a_2_5d_unet_trains_on_slabs_synthesizes_and_evaluates(phantom_shards, phantom_subjects, tmp_path):
    run_dir = tmp_path / "run"
    result = train_tiny(
        phantom_shards, run_dir, "--model.generator.arch", "unet", "--model.generator.context_slices", "2",
        "--data.slab_slices", "4", "--data.batch_size", "4", "--training.val_every_steps", "2",
    )  # fmt: skip
    assert "through-plane error" in result.stdout and "volumes" in result.stdout
    record = json.loads((run_dir / "run_record.json").read_text())
    assert record["best_step"] in (2, 4)
    subject = sorted(p for p in phantom_subjects.iterdir() if p.is_dir())[0]
    out = tmp_path / "flair.nii.gz"
    inputs = [["--input", f"{m}={subject / f'{subject.name}_{m}.nii.gz'}"] for m in ("t1", "t1ce", "t2")]
    run_command([
        sys.executable, "-m", "medgan", "synthesize", "--checkpoint", str(run_dir), "--target", "flair",
        *(arg for pair in inputs for arg in pair), "--out", str(out),
    ])  # fmt: skip
    assert out.is_file()
    rows = evaluated_model_rows(run_dir, phantom_shards, tmp_path / "eval")
    assert rows and all(np.isfinite(float(row["through_plane_error"])) for row in rows)
