"""Activation checkpointing of the generator's SSM stages: the same gradients, fewer kept activations,
and a 2-rank ZeRO-3 run that trains with it."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medgan.config import config_from_cli
from medgan.models.blocks import SSMStage
from medgan.models.generator import GeneratorConfig, SSMGenerator

REPO = Path(__file__).resolve().parent.parent
DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")
SMALL = dict(
    base_channels=8, depth=2, ssm_levels=[0, 1], ssm_state=4, ssm_expand=1, condition_dim=8, attention_heads=2
)


def make_batch(batch=2, size=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 5, size, size, generator=generator)
    available = torch.zeros(batch, 5, dtype=torch.bool)
    available[:, :3] = True
    return images, available, torch.full((batch,), 3, dtype=torch.long)


def gradients_and_stage_calls(checkpoint_stages: bool):
    """Output, every parameter's gradient and the number of SSM-stage forwards of one fwd+bwd."""
    torch.manual_seed(0)
    model = SSMGenerator(GeneratorConfig(**SMALL, checkpoint_stages=checkpoint_stages)).train()
    calls = []
    for module in model.modules():
        if isinstance(module, SSMStage):
            module.register_forward_pre_hook(lambda *_: calls.append(1))
    images, available, target = make_batch()
    upstream = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    out = model(images, available, target)
    (out * upstream).sum().backward()
    return out, {name: p.grad for name, p in model.named_parameters()}, len(calls)


def test_checkpointed_stages_give_the_same_gradients_and_are_recomputed():
    plain_out, plain_grads, plain_calls = gradients_and_stage_calls(False)
    out, grads, calls = gradients_and_stage_calls(True)
    torch.testing.assert_close(out, plain_out, rtol=0, atol=0)
    assert grads.keys() == plain_grads.keys()
    for name, grad in grads.items():
        assert grad is not None, name
        torch.testing.assert_close(grad, plain_grads[name], rtol=1e-6, atol=1e-9, msg=name)
    stages = 3  # encoder levels 0 and 1 and the bottleneck
    assert plain_calls == stages
    assert calls == 2 * stages, "each checkpointed stage runs again in the backward"


def test_no_recompute_without_gradients():
    torch.manual_seed(0)
    model = SSMGenerator(GeneratorConfig(**SMALL, checkpoint_stages=True)).eval()
    calls = []
    for module in model.modules():
        if isinstance(module, SSMStage):
            module.register_forward_pre_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        model(*make_batch())
    assert len(calls) == 3


def test_the_switch_is_a_config_key_and_a_flag():
    assert GeneratorConfig().checkpoint_stages is False
    config = config_from_cli(
        ["--config", "configs/brats.yaml", "--model.generator.checkpoint_stages", "true"]
    )
    assert config.model.generator.checkpoint_stages is True


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def losses(output: str) -> dict[int, str]:
    """step -> the logged loss values of that step, as printed (one line per step with log_every_steps 1)."""
    found = {}
    for line in output.splitlines():
        match = re.match(r"step (\d+)/\d+: (loss_g \S+, loss_d \S+)", line)
        if match:
            found[int(match.group(1))] = match.group(2)
    return found


@pytest.mark.slow
@pytest.mark.usefixtures("deepspeed_ops_built")
def test_two_ranks_zero3_train_the_same_with_checkpointed_stages(phantom_shards, tmp_path):
    def train(checkpoint_stages: str) -> dict[int, str]:
        command = [
            DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), "launch/train.py",
            "--config", "configs/demo.yaml", "--model.generator.arch", "ssm",
            "--model.generator.base_channels", "8", "--model.generator.depth", "2",
            "--model.generator.ssm_levels", "1", "--model.generator.ssm_state", "4",
            "--model.generator.condition_dim", "8", "--model.generator.attention_heads", "2",
            "--model.generator.checkpoint_stages", checkpoint_stages,
            "--model.discriminator.base_channels", "8", "--model.discriminator.layers", "2",
            "--data.batch_size", "2", "--training.val_max_subjects", "2", "--logging.progress_bar", "false",
            "--logging.log_every_steps", "1", "--logging.image_every_steps", "1000",
            "--training.max_steps", "2", "--deepspeed.zero_stage", "3", "--deepspeed.precision", "bf16",
            "--logging.wandb", "disabled", "--data_path", str(phantom_shards),
            "--checkpoint_dir", str(tmp_path / f"checkpointed_{checkpoint_stages}"),
        ]  # fmt: skip
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        return losses(result.stdout)

    checkpointed = train("true")
    assert sorted(checkpointed) == [1, 2]
    assert checkpointed == train("false")
