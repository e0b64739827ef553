"""The generator's building blocks: S6 over 2D feature maps, multi-scale S6, dynamic gating, attention.

Every block maps ``[B, C, H, W] -> [B, C, H, W]`` (the gate also takes a condition vector) and imports only
torch and this package, so each can be switched off in the config for an ablation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from medgan.models.ssm import selective_scan


def norm_layer(channels: int) -> nn.GroupNorm:
    """GroupNorm with up to 8 groups: batch-size independent, which matters for per-rank batches of 1-4."""
    groups = math.gcd(channels, 8)
    return nn.GroupNorm(groups, channels)


class ConvBlock(nn.Module):
    """Two 3x3 convolutions with norm and SiLU, and a residual (1x1 projected when channels change)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
            norm_layer(out_channels),
            nn.SiLU(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
            norm_layer(out_channels),
        )
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(self.body(x) + self.skip(x))


def _directional_sequences(x: torch.Tensor, directions: int) -> torch.Tensor:
    """``[B, D, H, W] -> [B, K, D, H*W]``: row-major, column-major, then both reversed (first K of them)."""
    rows = x.flatten(2)
    sequences = [rows]
    if directions >= 2:
        sequences.append(x.transpose(2, 3).flatten(2))
    if directions == 4:
        sequences += [s.flip(-1) for s in sequences[:2]]
    return torch.stack(sequences, dim=1)


def _merge_directions(y: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`_directional_sequences`, summed over directions: ``[B, K, D, L] -> [B, D, H, W]``."""
    batch, directions, channels, _ = y.shape
    if directions == 4:
        y = torch.cat([y[:, :2], y[:, 2:].flip(-1)], dim=1)
    merged = y[:, 0].reshape(batch, channels, height, width)
    for k in range(1, directions):
        column_major = y[:, k].reshape(batch, channels, width, height).transpose(2, 3)
        merged = merged + (column_major if k % 2 else y[:, k].reshape(batch, channels, height, width))
    return merged


class MultiDirectionS6(nn.Module):
    """An S6 (Mamba) block over a 2D feature map, scanned in ``directions`` raster orders and merged.

    Input projection to (u, z), depthwise 3x3 conv on u, input-dependent delta/B/C per direction, the
    selective scan, sum over directions, norm, gated by SiLU(z), output projection. ``directions``: 1 (rows),
    2 (rows, columns) or 4 (rows, columns and both reversed). The state decay A, skip D and delta bias are
    shared across directions (so all directions run as one batched scan); delta/B/C projections are not.
    """

    def __init__(self, channels: int, d_state: int = 16, expand: int = 2, directions: int = 4) -> None:
        super().__init__()
        if directions not in (1, 2, 4):
            raise ValueError(f"directions={directions} must be 1, 2 or 4")
        inner = expand * channels
        self.directions = directions
        self.d_state = d_state
        self.dt_rank = max(1, math.ceil(channels / 16))
        self.in_proj = nn.Conv2d(channels, 2 * inner, 1)
        self.depthwise = nn.Conv2d(inner, inner, 3, padding=1, groups=inner)
        scale = inner**-0.5
        self.x_proj = nn.Parameter(torch.randn(directions, self.dt_rank + 2 * d_state, inner) * scale)
        self.dt_proj = nn.Parameter(torch.randn(directions, inner, self.dt_rank) * self.dt_rank**-0.5)
        # Mamba's init: softplus(delta_bias) log-uniform in [1e-3, 1e-1], A = -(1..N) per channel, D = 1.
        dt = torch.exp(torch.rand(inner) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        self.delta_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.A_log = nn.Parameter(
            torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(inner, 1)
        )
        self.D = nn.Parameter(torch.ones(inner))
        self.out_norm = norm_layer(inner)
        self.out_proj = nn.Conv2d(inner, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = x.shape
        u, z = self.in_proj(x).chunk(2, dim=1)
        u = F.silu(self.depthwise(u))
        sequences = _directional_sequences(u, self.directions)  # [B, K, D, L]
        projected = torch.einsum("bkdl,kcd->bkcl", sequences, self.x_proj)
        dt, B, C = projected.split([self.dt_rank, self.d_state, self.d_state], dim=2)
        delta = torch.einsum("bkrl,kdr->bkdl", dt, self.dt_proj)
        length = height * width
        flat = batch * self.directions
        y = selective_scan(
            sequences.reshape(flat, -1, length),
            delta.reshape(flat, -1, length),
            -torch.exp(self.A_log.float()),
            B.reshape(flat, self.d_state, length),
            C.reshape(flat, self.d_state, length),
            D=self.D.float(),
            delta_bias=self.delta_bias.float(),
            delta_softplus=True,
        )
        y = _merge_directions(y.view(batch, self.directions, -1, length), height, width)
        return self.out_proj(self.out_norm(y) * F.silu(z))


class MultiScaleS6(nn.Module):
    """S6 at several resolutions (average-pooled by each factor), upsampled back and fused by a 1x1 conv.

    Coarse scales see long-range context in shorter sequences; scale 1 keeps detail. ``scales=(1,)`` is
    a single-scale block with the same interface.
    """

    def __init__(self, channels: int, scales: tuple[int, ...], d_state: int, expand: int, directions: int):
        super().__init__()
        if not scales or any(s < 1 for s in scales):
            raise ValueError(f"scales={scales} must be positive integers")
        self.scales = tuple(scales)
        self.branches = nn.ModuleList(
            MultiDirectionS6(channels, d_state=d_state, expand=expand, directions=directions) for _ in scales
        )
        self.fuse = nn.Conv2d(channels * len(scales), channels, 1) if len(scales) > 1 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        outputs = []
        for scale, branch in zip(self.scales, self.branches):
            if scale == 1:
                outputs.append(branch(x))
                continue
            # ceil_mode keeps sizes that are not multiples of the scale
            coarse = F.avg_pool2d(x, scale, ceil_mode=True)
            outputs.append(
                F.interpolate(branch(coarse), size=(height, width), mode="bilinear", align_corners=False)
            )
        return self.fuse(torch.cat(outputs, dim=1))


class SSMStage(nn.Module):
    """Pre-norm residual S6 mixing followed by a pre-norm residual convolutional feed-forward."""

    def __init__(self, channels: int, scales: tuple[int, ...], d_state: int, expand: int, directions: int):
        super().__init__()
        self.norm_mix = norm_layer(channels)
        self.mix = MultiScaleS6(channels, scales, d_state, expand, directions)
        self.norm_ffn = norm_layer(channels)
        self.ffn = nn.Sequential(
            nn.Conv2d(channels, 2 * channels, 1),
            nn.SiLU(),
            nn.Conv2d(2 * channels, 2 * channels, 3, padding=1, groups=2 * channels),
            nn.SiLU(),
            nn.Conv2d(2 * channels, channels, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mix(self.norm_mix(x))
        return x + self.ffn(self.norm_ffn(x))


class DynamicGate(nn.Module):
    """Channel gates and shifts computed from the task (which contrasts are present, which is the target).

    ``x * 2 * sigmoid(g(c)) + b(c)``: with a small initial projection the gate starts near 1 and the shift
    near 0, so an untrained gate is almost the identity and the network learns per-task feature selection
    (not exactly zero: the condition embedding below it would then get no gradient).
    """

    def __init__(self, channels: int, condition_dim: int) -> None:
        super().__init__()
        self.project = nn.Linear(condition_dim, 2 * channels)
        nn.init.normal_(self.project.weight, std=0.01)
        nn.init.zeros_(self.project.bias)

    def forward(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        gate, shift = self.project(condition).to(x.dtype)[:, :, None, None].chunk(2, dim=1)
        return x * (2 * torch.sigmoid(gate)) + shift


class NonLocalAttention(nn.Module):
    """Multi-head self-attention over all ``H * W`` positions (Wang et al. 2018), pre-norm and residual."""

    def __init__(self, channels: int, heads: int = 4) -> None:
        super().__init__()
        if channels % heads:
            raise ValueError(f"channels={channels} is not divisible by heads={heads}")
        self.heads = heads
        self.norm = norm_layer(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(batch, 3, self.heads, channels // self.heads, -1).unbind(1)
        attended = F.scaled_dot_product_attention(
            q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2)
        )
        attended = attended.transpose(-1, -2).reshape(batch, channels, height, width)
        return x + self.proj(attended)
