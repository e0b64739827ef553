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


def _has_fp32_master(parameter: torch.Tensor) -> bool:
    """A bf16/fp16 parameter whose fp32 master DeepSpeed's optimizer keeps (ZeRO 3: ``ds_id``; ZeRO 0-2 and
    the bf16 optimizer: ``_hp_mapping``, set on every rank, None where another rank holds the master)."""
    return parameter.dtype != torch.float32 and (
        hasattr(parameter, "ds_id") or hasattr(parameter, "_hp_mapping")
    )


def full_fp32_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every entry of ``module.state_dict()``, whole and fp32 (integer buffers keep their dtype).

    Low-precision parameters come from the optimizer's fp32 masters, gathered from the ranks that hold
    them (a bf16 copy would round away updates smaller than its step, e.g. 1e-4 on a weight of 1.0);
    fp32 parameters and all buffers come from the module. Every rank must call it: it all-reduces.
    """
    masters: dict[str, torch.Tensor] = {}
    named = [(n, p) for n, p in module.named_parameters(remove_duplicate=False) if _has_fp32_master(p)]
    if named:
        from deepspeed.utils import safe_get_full_fp32_param

        for name, parameter in named:
            # a collective: every rank asks for the same parameters in the same order
            master = safe_get_full_fp32_param(parameter)
            if master is not None:
                masters[name] = master.detach().float()
    with gathered_parameters(module), torch.no_grad():
        # copies: ZeRO 3 frees the gathered parameters when the context ends
        return {
            name: masters.get(
                name, tensor.detach().to(torch.float32 if tensor.is_floating_point() else None, copy=True)
            )
            for name, tensor in module.state_dict().items()
        }


class ExponentialMovingAverage:
    """fp32 shadow copies of every parameter and buffer: ``shadow = decay * shadow + (1 - decay) * param``,
    where ``param`` is the optimizer's fp32 master under bf16/fp16 (:func:`full_fp32_state`).

    Kept whole on every rank (the generator is small next to the optimizer state ZeRO partitions), so any
    rank can validate with it and rank 0 can save it. Every rank must build and update it together.
    """

    def __init__(self, module: nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {name: t.float().clone() for name, t in full_fp32_state(module).items()}

    def decay_at(self, optimizer_step: int) -> float:
        """The decay used after optimizer step ``optimizer_step`` (1-based): warmed up as
        ``min(decay, (1 + step) / (10 + step))`` so the average forgets the random initial weights within
        the first steps instead of keeping ``decay ** step`` of them (60% after 50 steps at 0.99)."""
        return min(self.decay, (1 + optimizer_step) / (10 + optimizer_step))

    @torch.no_grad()
    def update(self, module: nn.Module, optimizer_step: int) -> None:
        weight = 1.0 - self.decay_at(optimizer_step)
        for name, tensor in full_fp32_state(module).items():
            shadow = self.shadow[name]
            if tensor.is_floating_point():
                shadow.lerp_(tensor.to(shadow.device), weight)
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
