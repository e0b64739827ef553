"""The generator's building blocks: S6 over 2D feature maps, multi-scale S6, dynamic gating, attention.

Every block maps ``[B, C, H, W] -> [B, C, H, W]`` (the gate also takes a condition vector) and imports only
torch and this package, so each can be switched off in the config for an ablation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from medgan.models.ssm import BACKENDS, selective_scan


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


# The scale each residual branch starts at (LayerScale, Touvron et al. 2021): small, so a block added to a
# working network starts close to the identity, but not zero, so every parameter inside gets a gradient.
LAYER_SCALE_INIT = 0.1

# The scan's step size at init, softplus(delta_bias), log-uniform in this range. Mamba's [1e-3, 1e-1] suits
# 1D sequences thousands of tokens long; on a 2D map a token's neighbours are 1 (along a row) to W (the
# next row) steps away, so the state should remember from about 2 to about 100 steps: 1 / dt.
DT_RANGE = (0.01, 0.5)


def init_linear_(module: nn.Module) -> None:
    """VMamba's init for the linear maps (1x1 convolutions and Linear): trunc normal std 0.02, bias 0."""
    for layer in module.modules():
        is_pointwise = isinstance(layer, nn.Conv2d) and layer.kernel_size == (1, 1) and layer.groups == 1
        if isinstance(layer, nn.Linear) or is_pointwise:
            nn.init.trunc_normal_(layer.weight, std=0.02)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


class LayerScale(nn.Module):
    """A learned per-channel scale ``gamma [C]`` on ``[B, C, H, W]``, starting at ``init``."""

    def __init__(self, channels: int, init: float = LAYER_SCALE_INIT) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((channels,), float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma.to(x.dtype)[:, None, None]


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of each position (per token) of a ``[B, C, H, W]`` map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


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


def _rms(x: torch.Tensor) -> float:
    return float(x.detach().float().pow(2).mean().sqrt())


def _rms_normalized(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``[b, K, n, L]`` scaled so that each token's ``n`` values have root mean square 1."""
    return x * torch.rsqrt(x.pow(2).mean(2, keepdim=True) + eps)


class MultiDirectionS6(nn.Module):
    """An S6 (Mamba) block over a 2D feature map, scanned in ``directions`` raster orders and merged (as
    VMamba's ``SS2D``).

    Input projection to (u, z), depthwise 3x3 conv on u, input-dependent delta/B/C per direction, the
    selective scan, sum over directions, per-token LayerNorm, gated by SiLU(z), output projection.
    ``directions``: 1 (rows), 2 (rows, columns) or 4 (rows, columns and both reversed). Each direction has
    its own state decay A, skip D and step bias: the directions are folded into the channels (``K * inner``)
    and B/C grouped one group per direction, so all directions still run as one scan.

    ``scan_off``: the scan's contribution is removed, ``y = D * u``, everything else unchanged (an
    ablation). ``scan_backend``: the ``selective_scan`` path, one of ``medgan.models.ssm.BACKENDS``
    (``auto``: mamba-ssm's kernel on a GPU where installed, else pure PyTorch).
    ``record_scan_share``: each forward stores ``scan_share = rms(scan term) / rms(D * u)``.
    Subclasses scan other token orders by overriding :meth:`sequences` and :meth:`merge`.
    """

    DIRECTIONS: tuple[int, ...] = (1, 2, 4)

    def __init__(
        self,
        channels: int,
        d_state: int = 16,
        expand: int = 2,
        directions: int = 4,
        *,
        dt_range: tuple[float, float] = DT_RANGE,
        scan_off: bool = False,
        scan_backend: str = "auto",
    ) -> None:
        super().__init__()
        if directions not in self.DIRECTIONS:
            raise ValueError(f"directions={directions} must be one of {self.DIRECTIONS}")
        if scan_backend not in BACKENDS:
            raise ValueError(f"scan_backend={scan_backend!r} must be one of {', '.join(BACKENDS)}")
        if not 0 < dt_range[0] <= dt_range[1]:
            raise ValueError(f"dt_range={dt_range} must be 0 < min <= max")
        inner = expand * channels
        self.directions = directions
        self.d_state = d_state
        self.scan_off = scan_off
        self.scan_backend = scan_backend
        self.record_scan_share = False
        self.scan_share: float | None = None
        self.dt_rank = max(1, math.ceil(channels / 16))
        self.in_proj = nn.Conv2d(channels, 2 * inner, 1)
        self.depthwise = nn.Conv2d(inner, inner, 3, padding=1, groups=inner)
        scale = inner**-0.5
        self.x_proj = nn.Parameter(
            torch.empty(directions, self.dt_rank + 2 * d_state, inner).uniform_(-scale, scale)
        )
        dt_scale = self.dt_rank**-0.5
        self.dt_proj = nn.Parameter(
            torch.empty(directions, inner, self.dt_rank).uniform_(-dt_scale, dt_scale)
        )
        # one row per (direction, channel): softplus(delta_bias) log-uniform in dt_range, A = -(1..N), D = 1
        folded = directions * inner
        low, high = math.log(dt_range[0]), math.log(dt_range[1])
        dt = torch.exp(torch.rand(folded) * (high - low) + low)
        self.delta_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.A_log = nn.Parameter(
            torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(folded, 1)
        )
        self.D = nn.Parameter(torch.ones(folded))
        self.out_norm = ChannelLayerNorm(inner)
        self.out_proj = nn.Conv2d(inner, channels, 1)
        init_linear_(self)

    def sequences(self, u: torch.Tensor, slab_slices: int) -> torch.Tensor:
        """``[N, D, H, W] -> [b, K, D, L]``: the token sequences to scan (here each slice on its own)."""
        return _directional_sequences(u, self.directions)

    def merge(self, y: torch.Tensor, shape: torch.Size, slab_slices: int) -> torch.Tensor:
        """Inverse of :meth:`sequences`, summed over directions: ``[b, K, D, L] -> [N, D, H, W]``."""
        return _merge_directions(y, shape[-2], shape[-1])

    def forward(self, x: torch.Tensor, slab_slices: int = 1) -> torch.Tensor:
        """``x [N, C, H, W] -> [N, C, H, W]``; ``slab_slices``: consecutive slices scanned together (a
        subclass's business; this block scans each slice on its own)."""
        u, z = self.in_proj(x).chunk(2, dim=1)
        u = F.silu(self.depthwise(u))
        sequences = self.sequences(u, slab_slices)  # [b, K, D, L]
        batch, _, _, length = sequences.shape
        folded = sequences.reshape(batch, -1, length)  # [b, K * D, L]: direction k is channel group k
        if self.scan_off:
            y = folded * self.D.to(folded.dtype)[:, None]
        else:
            projected = torch.einsum("bkdl,kcd->bkcl", sequences, self.x_proj)
            dt, B, C = projected.split([self.dt_rank, self.d_state, self.d_state], dim=2)
            # per-token RMS norm of B and C over the state: the scan term is quadratic in u's scale (u, B and
            # C all project from it), so a small u would make it vanish against D * u
            B, C = _rms_normalized(B), _rms_normalized(C)
            delta = torch.einsum("bkrl,kdr->bkdl", dt, self.dt_proj)
            scan = selective_scan(
                folded,
                delta.reshape(batch, -1, length),
                -torch.exp(self.A_log.float()),
                B.contiguous(),
                C.contiguous(),
                D=None if self.record_scan_share else self.D.float(),
                delta_bias=self.delta_bias.float(),
                delta_softplus=True,
                backend=self.scan_backend,
            )
            if self.record_scan_share:
                skip = folded * self.D.to(folded.dtype)[:, None]
                self.scan_share = _rms(scan) / max(_rms(skip), 1e-12)
                scan = scan + skip
            y = scan
        y = self.merge(y.view(batch, self.directions, -1, length), u.shape, slab_slices)
        return self.out_proj(self.out_norm(y) * F.silu(z))


class MultiScaleS6(nn.Module):
    """S6 at several resolutions (average-pooled by each factor), upsampled back and fused by a 1x1 conv.

    Coarse scales see long-range context in shorter sequences; scale 1 keeps detail. ``scales=(1,)`` is
    a single-scale block with the same interface.
    """

    def __init__(
        self,
        channels: int,
        scales: tuple[int, ...],
        d_state: int,
        expand: int,
        directions: int,
        *,
        scan_off: bool = False,
        scan_backend: str = "auto",
    ):
        super().__init__()
        if not scales or any(s < 1 for s in scales):
            raise ValueError(f"scales={scales} must be positive integers")
        self.scales = tuple(scales)
        self.branches = nn.ModuleList(
            MultiDirectionS6(
                channels,
                d_state=d_state,
                expand=expand,
                directions=directions,
                scan_off=scan_off,
                scan_backend=scan_backend,
            )
            for _ in scales
        )
        self.fuse = nn.Conv2d(channels * len(scales), channels, 1) if len(scales) > 1 else nn.Identity()
        init_linear_(self.fuse)

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
    """Pre-norm residual S6 mixing followed by a pre-norm residual convolutional feed-forward (per-token
    LayerNorm, as VMamba's and MambaIR's blocks), each branch scaled by a learned per-channel
    :class:`LayerScale` (the stage starts close to the identity)."""

    def __init__(
        self,
        channels: int,
        scales: tuple[int, ...],
        d_state: int,
        expand: int,
        directions: int,
        *,
        scan_off: bool = False,
        scan_backend: str = "auto",
    ):
        super().__init__()
        self.norm_mix = ChannelLayerNorm(channels)
        self.mix = MultiScaleS6(
            channels, scales, d_state, expand, directions, scan_off=scan_off, scan_backend=scan_backend
        )
        self.scale_mix = LayerScale(channels)
        self.norm_ffn = ChannelLayerNorm(channels)
        self.ffn = nn.Sequential(
            nn.Conv2d(channels, 2 * channels, 1),
            nn.SiLU(),
            nn.Conv2d(2 * channels, 2 * channels, 3, padding=1, groups=2 * channels),
            nn.SiLU(),
            nn.Conv2d(2 * channels, channels, 1),
        )
        init_linear_(self.ffn)
        self.scale_ffn = LayerScale(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.scale_mix(self.mix(self.norm_mix(x)))
        return x + self.scale_ffn(self.ffn(self.norm_ffn(x)))


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


def sinusoidal_positions(channels: int, height: int, width: int, dtype: torch.dtype, device) -> torch.Tensor:
    """``[channels, height, width]`` fixed 2D sine-cosine positions (half the channels for each axis), any
    size, values in ``[-1, 1]``; ``channels`` a multiple of 4."""
    quarter = channels // 4
    frequencies = 1.0 / (10000 ** (torch.arange(quarter, device=device, dtype=torch.float32) / quarter))
    rows = torch.arange(height, device=device, dtype=torch.float32)[:, None] * frequencies  # [H, C/4]
    columns = torch.arange(width, device=device, dtype=torch.float32)[:, None] * frequencies  # [W, C/4]
    rows = torch.cat([rows.sin(), rows.cos()], dim=1).T[:, :, None].expand(-1, height, width)
    columns = torch.cat([columns.sin(), columns.cos()], dim=1).T[:, None, :].expand(-1, height, width)
    return torch.cat([rows, columns], dim=0).to(dtype)


class NonLocalAttention(nn.Module):
    """Multi-head self-attention over all ``H * W`` positions (Wang et al. 2018), pre-norm (per-token
    LayerNorm) and residual.

    Fixed 2D sine-cosine positions are added to the normalised input of the projections (as ViT adds its
    position embedding to the tokens), so the output depends on where a token is: without them the block
    is permutation-equivariant and gives every position of a uniform map the same output;
    the projection back is scaled by a :class:`LayerScale` so the block starts close to the identity.
    """

    def __init__(self, channels: int, heads: int = 4) -> None:
        super().__init__()
        if channels % heads:
            raise ValueError(f"channels={channels} is not divisible by heads={heads}")
        if channels % 4:
            raise ValueError(f"channels={channels} must be a multiple of 4 (2D sine-cosine positions)")
        self.heads = heads
        self.norm = ChannelLayerNorm(channels)
        # default (width-independent) init for q, k and v: trunc normal 0.02 would make a narrow block's
        # attention uniform at init; the projection back starts small instead
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        init_linear_(self.proj)
        self.scale = LayerScale(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        normed = self.norm(x)
        positions = sinusoidal_positions(channels, height, width, normed.dtype, normed.device)
        qkv = self.qkv(normed + positions)
        q, k, v = qkv.reshape(batch, 3, self.heads, channels // self.heads, -1).unbind(1)
        attended = F.scaled_dot_product_attention(
            q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2)
        )
        attended = attended.transpose(-1, -2).reshape(batch, channels, height, width)
        return x + self.scale(self.proj(attended))
