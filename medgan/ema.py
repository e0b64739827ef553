"""An exponential moving average of the generator's weights, used for validation and export."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn


def gathered_parameters(module: nn.Module):
    """Full parameters under ZeRO-3 (partitioned otherwise); a no-op for stages 0-2."""
    params = list(module.parameters())
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


class ExponentialMovingAverage:
    """fp32 shadow copies of every parameter and buffer: ``shadow = decay * shadow + (1 - decay) * param``.

    Kept whole on every rank (the generator is small next to the optimizer state ZeRO partitions), so any
    rank can validate with it and rank 0 can save it.
    """

    def __init__(self, module: nn.Module, decay: float) -> None:
        self.decay = decay
        with gathered_parameters(module), torch.no_grad():
            self.shadow = {name: t.detach().float().clone() for name, t in module.state_dict().items()}

    def decay_at(self, optimizer_step: int) -> float:
        """The decay used after optimizer step ``optimizer_step`` (1-based): warmed up as
        ``min(decay, (1 + step) / (10 + step))`` so the average forgets the random initial weights within
        the first steps instead of keeping ``decay ** step`` of them (60% after 50 steps at 0.99)."""
        return min(self.decay, (1 + optimizer_step) / (10 + optimizer_step))

    @torch.no_grad()
    def update(self, module: nn.Module, optimizer_step: int) -> None:
        weight = 1.0 - self.decay_at(optimizer_step)
        with gathered_parameters(module):
            for name, tensor in module.state_dict().items():
                shadow = self.shadow[name]
                if tensor.is_floating_point():
                    shadow.lerp_(tensor.detach().to(shadow.device, torch.float32), weight)
                else:
                    shadow.copy_(tensor)

    def copy_to(self, module: nn.Module) -> None:
        """Load the averaged weights into a plain (non-DeepSpeed) copy of the model."""
        module.load_state_dict(
            {name: t.to(dtype=module.state_dict()[name].dtype) for name, t in self.shadow.items()}
        )

    def save(self, path: str | Path) -> None:
        save_file({name: t.contiguous() for name, t in self.shadow.items()}, str(path))

    def load(self, path: str | Path) -> None:
        loaded = load_file(str(path))
        if loaded.keys() != self.shadow.keys():
            raise ValueError(f"{path}: EMA weights do not match the generator (different architecture?)")
        for name, tensor in loaded.items():
            self.shadow[name].copy_(tensor)
