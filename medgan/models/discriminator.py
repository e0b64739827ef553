"""The conditional PatchGAN discriminator (Isola et al. 2017): condition stack + an image -> patch logits."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from medgan.models.config_checks import require, require_choice


@dataclass(kw_only=True, slots=True)
class DiscriminatorConfig:
    """``layers`` stride-2 convolutions after the first (receptive field 70x70 at 3); ``norm`` is applied
    between them unless spectral norm, which already bounds each layer's Lipschitz constant, is on."""

    base_channels: int = 64
    layers: int = 3
    spectral_norm: bool = True
    norm: str = "instance"

    def __post_init__(self) -> None:
        require(
            self.base_channels >= 8, "model.discriminator.base_channels", f"{self.base_channels} must be >= 8"
        )
        require(1 <= self.layers <= 6, "model.discriminator.layers", f"{self.layers} must be in 1..6")
        require_choice(self.norm, "model.discriminator.norm", ("instance", "group", "none"))


class PatchDiscriminator(nn.Module):
    """``forward(condition [B, 3M, H, W], image [B, 1, H, W]) -> logits [B, 1, h, w]`` (one per patch).

    ``condition`` is :func:`medgan.models.conditioning.condition_stack` of the sample, so the discriminator
    judges the synthesized contrast given the same inputs and task the generator saw.
    """

    def __init__(self, config: DiscriminatorConfig, modalities: int) -> None:
        super().__init__()
        self.config = config

        def conv(in_channels: int, out_channels: int, stride: int) -> nn.Module:
            layer = nn.Conv2d(in_channels, out_channels, 4, stride=stride, padding=1)
            return spectral_norm(layer) if config.spectral_norm else layer

        def norm(channels: int) -> nn.Module:
            if config.spectral_norm or config.norm == "none":
                return nn.Identity()
            if config.norm == "instance":
                return nn.InstanceNorm2d(channels, affine=True)
            return nn.GroupNorm(8, channels)

        channels = config.base_channels
        body: list[nn.Module] = [conv(3 * modalities + 1, channels, 2), nn.LeakyReLU(0.2)]
        for index in range(1, config.layers + 1):
            out_channels = config.base_channels * min(2**index, 8)
            # the last feature layer keeps resolution, as in pix2pix's 70x70 PatchGAN
            stride = 1 if index == config.layers else 2
            body += [conv(channels, out_channels, stride), norm(out_channels), nn.LeakyReLU(0.2)]
            channels = out_channels
        body.append(conv(channels, 1, 1))
        self.body = nn.Sequential(*body)

    def forward(self, condition: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        if condition.shape[0] != image.shape[0] or condition.shape[-2:] != image.shape[-2:]:
            raise ValueError(
                f"condition {tuple(condition.shape)} and image {tuple(image.shape)} differ in batch or size"
            )
        return self.body(torch.cat([condition, image], dim=1))
