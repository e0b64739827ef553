"""The two DeepSpeed engines (generator, discriminator) from the config: DeepSpeed's settings, each
network's Adam and the LR schedule both share."""

from __future__ import annotations

from typing import Any

import torch

from medgan.config import Config, ConfigError
from medgan.models.discriminator import PatchDiscriminator
from medgan.models.generator import build_generator, count_parameters

PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def deepspeed_settings(config: Config, world_size: int) -> dict[str, Any]:
    """The one place our config becomes DeepSpeed's config dict."""
    settings = config.deepspeed
    if settings.precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("deepspeed.precision: fp16 needs a GPU (use bf16 or fp32 on the CPU)")
    zero: dict[str, Any] = {"stage": settings.zero_stage}
    if settings.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": config.data.batch_size,
        "gradient_accumulation_steps": settings.gradient_accumulation_steps,
        "train_batch_size": config.data.batch_size * settings.gradient_accumulation_steps * world_size,
        "gradient_clipping": settings.gradient_clipping,
        "zero_optimization": zero,
        "bf16": {"enabled": settings.precision == "bf16"},
        "fp16": {"enabled": settings.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        # our optimizers are plain torch Adam (no JIT-built fused kernels needed on the CPU)
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }


def lr_factor(config: Config, batches_per_epoch: int):
    """The LR multiplier per optimizer step: the seed's constant-then-step decay, linear, or constant."""
    training = config.training
    accumulation = config.deepspeed.gradient_accumulation_steps

    def factor(optimizer_step: int) -> float:
        epoch = optimizer_step * accumulation / batches_per_epoch
        if training.lr_schedule == "step":
            return training.lr_decay_factor ** int(epoch // training.lr_decay_epoch)
        if training.lr_schedule == "linear":
            if epoch < training.lr_decay_epoch:
                return 1.0
            span = max(1.0, training.epochs - training.lr_decay_epoch)
            return max(0.0, 1.0 - (epoch - training.lr_decay_epoch) / span)
        return 1.0

    return factor


def _cast_floating_buffers(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """ZeRO 3 casts parameters but not buffers to bf16/fp16; spectral norm's power-iteration vectors are
    buffers and must match the weights' dtype."""
    for buffer in module.buffers():
        if buffer.is_floating_point():
            buffer.data = buffer.data.to(dtype)


def build_engines(config: Config, world_size: int, batches_per_epoch: int):
    """((generator engine, discriminator engine), their parameter counts): both networks from the config,
    each with its Adam and LR schedule, wrapped by DeepSpeed with :func:`deepspeed_settings` (counted
    before ZeRO 3 partitions them)."""
    import deepspeed

    dtype = PRECISION_DTYPES[config.deepspeed.precision]
    modalities = len(config.model.generator.modalities)
    settings = deepspeed_settings(config, world_size)
    factor = lr_factor(config, batches_per_epoch)
    engines, counts = [], []
    for module, lr in (
        (build_generator(config.model.generator), config.training.lr_g),
        (PatchDiscriminator(config.model.discriminator, modalities), config.training.lr_d),
    ):
        counts.append(count_parameters(module))
        _cast_floating_buffers(module, dtype)
        optimizer = torch.optim.Adam(module.parameters(), lr=lr, betas=tuple(config.training.betas))
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        engine, _, _, _ = deepspeed.initialize(
            model=module, optimizer=optimizer, lr_scheduler=schedule, config=settings
        )
        engines.append(engine)
    return tuple(engines), tuple(counts)
