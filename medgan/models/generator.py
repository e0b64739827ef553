"""Generators: the SSM encoder-decoder and a plain U-Net baseline of similar size, with one interface.

``generator(images [B, M, H, W], available [B, M], target_index [B]) -> [B, 1, H, W]``, for any non-empty
subset of inputs and any target, and any H, W (padded to a multiple of ``2 ** depth`` and cropped back).
With ``context_slices: k`` (2.5D) ``images`` is ``[B, 2k + 1, M, H, W]``, the slice to synthesize and its
k neighbours on each side (``medgan.models.context`` builds it from a stack of slices).

The head is linear (a 1x1 convolution, no sigmoid: a sigmoid saturates on the bright tumour under an L1
that pulls towards the median). In training mode the output is unclamped, so the loss sees and corrects
values outside ``[0, 1]``; in eval mode (``model.eval()``: validation, evaluation, synthesis) it is clamped
to ``[0, 1]``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from medgan.models.blocks import (
    ConvBlock,
    DynamicGate,
    MultiDirectionS6,
    NonLocalAttention,
    SSMStage,
    init_linear_,
)
from medgan.models.conditioning import MODALITIES, condition_stack, condition_vector, stack_channels
from medgan.models.config_checks import require
from medgan.models.context import check_generator_input
from medgan.models.slab_scan import SlabScanBranch
from medgan.models.ssm import BACKENDS

# ssm: the state-space encoder-decoder; unet: the plain convolutional baseline; hybrid: the U-Net trunk with
# state-space branches that scan across the slices of a slab.
ARCHS = ("ssm", "unet", "hybrid")


def _require(condition: bool, key: str, message: str) -> None:
    require(condition, f"model.generator.{key}", message)


@dataclass(kw_only=True, slots=True)
class GeneratorConfig:
    """The generator's architecture; each ``use_*`` switch removes one block for ablations.

    ``arch``: ``ssm`` (this project's model), ``unet`` (the plain convolutional baseline; with
    ``unet_base_channels: 0`` its width is chosen to match the SSM generator's parameter count) or
    ``hybrid`` (that U-Net as the trunk, with state-space branches at ``ssm_levels`` and the bottleneck
    that scan across the slices of a slab, ``data.slab_slices``; :class:`HybridGenerator`).
    ``ssm_levels``: encoder levels (0 = full resolution) that get an SSM stage; the bottleneck always does
    when ``use_ssm``. ``ssm_directions``: scan orders per S6 block (1 rows, 2 rows and columns, 4 both and
    reversed; ``use_multi_direction: false`` is 1). ``scan_off``: inside every S6 block the scan's
    contribution is removed (``y = D * u``), everything else unchanged (an ablation).
    ``scan_backend``: the path of every selective scan, one of ``medgan.models.ssm.BACKENDS``: ``auto``
    (mamba-ssm's CUDA kernel where installed and on a GPU, else ``chunked``, pure PyTorch), ``mamba``,
    ``chunked``, or ``triton``, the Triton kernels, never chosen by ``auto``: set it once
    ``bench/gpu.py`` has printed MATCH for them on your GPU. It changes speed, not the weights, so a
    checkpoint saved without it (older ones) loads with ``auto``.
    ``checkpoint_stages``: recompute each SSM stage's activations in the backward instead of keeping them
    (activation checkpointing): less memory for about one more forward of the stages; the same gradients.
    ``context_slices`` (k, 2.5D): the generator sees the k axial slices on each side of the one it
    synthesizes as extra input channels (0: one slice). A neighbour beyond either end of the stack of
    slices it is given (a subject's slices in the shards, or every slice with brain at inference) is zero
    in every contrast, in training and inference alike (``medgan.models.context``).
    """

    arch: str = "ssm"
    modalities: list[str] = field(default_factory=lambda: list(MODALITIES))
    base_channels: int = 32
    depth: int = 3
    ssm_levels: list[int] = field(default_factory=lambda: [1, 2])
    ssm_state: int = 16
    ssm_expand: int = 2
    ssm_directions: int = 4
    scales: list[int] = field(default_factory=lambda: [1, 2])
    attention_heads: int = 4
    condition_dim: int = 64
    use_ssm: bool = True
    use_multi_direction: bool = True
    use_multi_scale: bool = True
    use_dynamic_gating: bool = True
    use_attention: bool = True
    scan_off: bool = False
    unet_base_channels: int = 0
    checkpoint_stages: bool = False
    scan_backend: str = "auto"
    context_slices: int = 0

    def __post_init__(self) -> None:
        _require(self.arch in ARCHS, "arch", f"{self.arch!r} is not one of {', '.join(ARCHS)}")
        _require(len(self.modalities) >= 2, "modalities", f"{self.modalities} needs at least two contrasts")
        _require(
            len(set(self.modalities)) == len(self.modalities), "modalities", f"{self.modalities} repeats one"
        )
        _require(self.base_channels >= 8, "base_channels", f"{self.base_channels} must be >= 8")
        _require(
            self.base_channels % 8 == 0, "base_channels", f"{self.base_channels} must be a multiple of 8"
        )
        _require(1 <= self.depth <= 6, "depth", f"{self.depth} must be in 1..6")
        _require(
            all(0 <= level < self.depth for level in self.ssm_levels),
            "ssm_levels",
            f"{self.ssm_levels} must be encoder levels in 0..{self.depth - 1}",
        )
        _require(1 <= self.ssm_state <= 256, "ssm_state", f"{self.ssm_state} must be in 1..256")
        _require(1 <= self.ssm_expand <= 4, "ssm_expand", f"{self.ssm_expand} must be in 1..4")
        _require(
            self.ssm_directions in (1, 2, 4), "ssm_directions", f"{self.ssm_directions} must be 1, 2 or 4"
        )
        _require(
            bool(self.scales) and all(s >= 1 for s in self.scales) and self.scales[0] == 1,
            "scales",
            f"{self.scales} must start with 1 and hold positive integers",
        )
        bottleneck = self.base_channels * 2**self.depth
        _require(
            self.attention_heads >= 1 and bottleneck % self.attention_heads == 0,
            "attention_heads",
            f"{self.attention_heads} must divide the bottleneck width {bottleneck}",
        )
        _require(self.condition_dim >= 1, "condition_dim", f"{self.condition_dim} must be >= 1")
        _require(
            self.scan_backend in BACKENDS,
            "scan_backend",
            f"{self.scan_backend!r} is not one of {', '.join(BACKENDS)}",
        )
        _require(
            self.unet_base_channels >= 0, "unet_base_channels", f"{self.unet_base_channels} must be >= 0"
        )
        _require(0 <= self.context_slices <= 16, "context_slices", f"{self.context_slices} must be in 0..16")

    @property
    def pad_multiple(self) -> int:
        return 2**self.depth


def _pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Zero-pad H and W up to a multiple (zero is the background of a normalised MR slice)."""
    height, width = x.shape[-2:]
    pad_h, pad_w = (-height) % multiple, (-width) % multiple
    return F.pad(x, (0, pad_w, 0, pad_h)), (height, width)


def linear_head(channels: int) -> nn.Conv2d:
    """The output layer both generators share: a 1x1 convolution to one channel, trunc normal 0.02, bias 0."""
    head = nn.Conv2d(channels, 1, 1)
    init_linear_(head)
    return head


def head_output(x: torch.Tensor, training: bool) -> torch.Tensor:
    """The head's output as the generator returns it: unclamped in training, clamped to ``[0, 1]`` in eval."""
    return x if training else x.clamp(0.0, 1.0)


class SSMGenerator(nn.Module):
    """Encoder-decoder with skips; SSM stages in the encoder and bottleneck, task-conditioned gates."""

    def __init__(self, config: GeneratorConfig) -> None:
        super().__init__()
        self.config = config
        modalities = len(config.modalities)
        widths = [config.base_channels * 2**level for level in range(config.depth + 1)]
        directions = config.ssm_directions if config.use_multi_direction else 1
        scales = tuple(config.scales) if config.use_multi_scale else (1,)

        def ssm_stage(channels: int, stage_scales: tuple[int, ...]) -> nn.Module:
            return SSMStage(
                channels,
                stage_scales,
                config.ssm_state,
                config.ssm_expand,
                directions,
                scan_off=config.scan_off,
                scan_backend=config.scan_backend,
            )

        def gate(channels: int) -> DynamicGate | None:
            return DynamicGate(channels, config.condition_dim) if config.use_dynamic_gating else None

        self.condition_embedding = (
            nn.Sequential(nn.Linear(2 * modalities, config.condition_dim), nn.SiLU())
            if config.use_dynamic_gating
            else None
        )
        self.stem = nn.Conv2d(stack_channels(modalities, config.context_slices), widths[0], 3, padding=1)
        self.encoder = nn.ModuleList()
        self.encoder_ssm = nn.ModuleDict()
        self.encoder_gates = nn.ModuleList()
        self.downsample = nn.ModuleList()
        for level in range(config.depth):
            self.encoder.append(ConvBlock(widths[level], widths[level]))
            if config.use_ssm and level in config.ssm_levels:
                # full-resolution sequences are long: only the coarse-to-fine scales, not multi-scale, there
                self.encoder_ssm[str(level)] = ssm_stage(widths[level], (1,) if level == 0 else scales)
            self.encoder_gates.append(gate(widths[level]) or nn.Identity())
            self.downsample.append(nn.Conv2d(widths[level], widths[level + 1], 4, stride=2, padding=1))
        bottleneck = widths[-1]
        self.bottleneck = ConvBlock(bottleneck, bottleneck)
        self.bottleneck_ssm = ssm_stage(bottleneck, scales) if config.use_ssm else None
        self.attention = (
            NonLocalAttention(bottleneck, config.attention_heads) if config.use_attention else None
        )
        self.bottleneck_gate = gate(bottleneck)
        self.upsample = nn.ModuleList()
        self.decoder = nn.ModuleList()
        self.decoder_gates = nn.ModuleList()
        for level in reversed(range(config.depth)):
            self.upsample.append(nn.ConvTranspose2d(widths[level + 1], widths[level], 4, stride=2, padding=1))
            self.decoder.append(ConvBlock(2 * widths[level], widths[level]))
            self.decoder_gates.append(gate(widths[level]) or nn.Identity())
        self.head = linear_head(widths[0])

    def _gate(
        self, module: nn.Module | None, x: torch.Tensor, condition: torch.Tensor | None
    ) -> torch.Tensor:
        return x if module is None or isinstance(module, nn.Identity) else module(x, condition)

    def _ssm_stage(self, stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``stage(x)``, with its activations recomputed in the backward when ``checkpoint_stages``."""
        if self.config.checkpoint_stages and torch.is_grad_enabled():
            # non-reentrant: the reentrant form fails under ZeRO 3, which gathers parameters in forward hooks
            return checkpoint(stage, x, use_reentrant=False)
        return stage(x)

    def forward(
        self,
        images: torch.Tensor,
        available: torch.Tensor,
        target_index: torch.Tensor,
        slab_slices: int = 1,
    ) -> torch.Tensor:
        """``images [B, M, H, W]`` in ``[0, 1]`` (``[B, 2k + 1, M, H, W]`` with ``context_slices`` k),
        ``available [B, M]``, ``target_index [B]`` -> ``[B, 1, H, W]``: unclamped in training mode, in
        ``[0, 1]`` in eval mode. ``slab_slices``: how many consecutive slices of the batch form a slab; this
        generator sees each slice alone and ignores it (the hybrid scans across them)."""
        check_generator_input(images, len(self.config.modalities), self.config.context_slices)
        stack, (height, width) = _pad_to_multiple(
            condition_stack(images, available, target_index), self.config.pad_multiple
        )
        condition = (
            self.condition_embedding(condition_vector(available, target_index).to(stack.dtype))
            if self.condition_embedding is not None
            else None
        )
        x = self.stem(stack)
        skips = []
        for level, (block, gate, down) in enumerate(zip(self.encoder, self.encoder_gates, self.downsample)):
            x = block(x)
            if str(level) in self.encoder_ssm:
                x = self._ssm_stage(self.encoder_ssm[str(level)], x)
            x = self._gate(gate, x, condition)
            skips.append(x)
            x = down(x)
        x = self.bottleneck(x)
        if self.bottleneck_ssm is not None:
            x = self._ssm_stage(self.bottleneck_ssm, x)
        if self.attention is not None:
            x = self.attention(x)
        x = self._gate(self.bottleneck_gate, x, condition)
        for up, block, gate, skip in zip(self.upsample, self.decoder, self.decoder_gates, reversed(skips)):
            x = block(torch.cat([up(x), skip], dim=1))
            x = self._gate(gate, x, condition)
        return head_output(self.head(x)[..., :height, :width], self.training)


class UNetGenerator(nn.Module):
    """The plain convolutional U-Net baseline: same conditioning input, no SSM, gates or attention."""

    def __init__(self, config: GeneratorConfig, base_channels: int) -> None:
        super().__init__()
        self.config = config
        modalities = len(config.modalities)
        widths = [base_channels * 2**level for level in range(config.depth + 1)]
        self.stem = nn.Conv2d(stack_channels(modalities, config.context_slices), widths[0], 3, padding=1)
        self.encoder = nn.ModuleList(ConvBlock(widths[i], widths[i]) for i in range(config.depth))
        self.downsample = nn.ModuleList(
            nn.Conv2d(widths[i], widths[i + 1], 4, stride=2, padding=1) for i in range(config.depth)
        )
        self.bottleneck = nn.Sequential(ConvBlock(widths[-1], widths[-1]), ConvBlock(widths[-1], widths[-1]))
        self.upsample = nn.ModuleList(
            nn.ConvTranspose2d(widths[i + 1], widths[i], 4, stride=2, padding=1)
            for i in reversed(range(config.depth))
        )
        self.decoder = nn.ModuleList(
            ConvBlock(2 * widths[i], widths[i]) for i in reversed(range(config.depth))
        )
        self.head = linear_head(widths[0])

    def forward(
        self,
        images: torch.Tensor,
        available: torch.Tensor,
        target_index: torch.Tensor,
        slab_slices: int = 1,
    ) -> torch.Tensor:
        """Same contract as :meth:`SSMGenerator.forward` (``slab_slices`` matters to the hybrid only)."""
        check_generator_input(images, len(self.config.modalities), self.config.context_slices)
        stack, (height, width) = _pad_to_multiple(
            condition_stack(images, available, target_index), self.config.pad_multiple
        )
        x = self.stem(stack)
        skips = []
        for level, (block, down) in enumerate(zip(self.encoder, self.downsample)):
            x = self.beside_encoder(level, block(x), slab_slices)
            skips.append(x)
            x = down(x)
        x = self.beside_bottleneck(self.bottleneck(x), slab_slices)
        for up, block, skip in zip(self.upsample, self.decoder, reversed(skips)):
            x = block(torch.cat([up(x), skip], dim=1))
        return head_output(self.head(x)[..., :height, :width], self.training)

    def beside_encoder(self, level: int, x: torch.Tensor, slab_slices: int) -> torch.Tensor:
        """What joins encoder level ``level``'s output before its skip and downsampling (nothing here)."""
        return x

    def beside_bottleneck(self, x: torch.Tensor, slab_slices: int) -> torch.Tensor:
        """What joins the bottleneck's output (nothing here)."""
        return x


class HybridGenerator(UNetGenerator):
    """The U-Net trunk ``arch: unet`` builds from the same config, with a state-space branch
    (:class:`~medgan.models.slab_scan.SlabScanBranch`) beside the encoder levels ``ssm_levels`` and the
    bottleneck, each scanning every token of a slab of ``slab_slices`` consecutive slices. The branches
    join through per-channel scales that start at 0, so at initialisation it computes the U-Net's output
    exactly (its trunk parameters have the U-Net's names). In a batch ``[N, ...]`` each run of
    ``slab_slices`` slices is one slab, in slice order; 1 scans each slice alone (the 2D hybrid)."""

    scans_across_slices = True

    def __init__(self, config: GeneratorConfig, base_channels: int) -> None:
        super().__init__(config, base_channels)
        widths = [base_channels * 2**level for level in range(config.depth + 1)]

        def branch(channels: int) -> SlabScanBranch:
            return SlabScanBranch(channels, config.ssm_state, config.ssm_expand, config.scan_backend)

        self.encoder_branches = nn.ModuleDict(
            {str(level): branch(widths[level]) for level in config.ssm_levels}
        )
        self.bottleneck_branch = branch(widths[-1])

    def _branch(self, branch: SlabScanBranch, x: torch.Tensor, slab_slices: int) -> torch.Tensor:
        if self.config.checkpoint_stages and torch.is_grad_enabled():
            return checkpoint(branch, x, slab_slices, use_reentrant=False)
        return branch(x, slab_slices)

    def beside_encoder(self, level: int, x: torch.Tensor, slab_slices: int) -> torch.Tensor:
        if str(level) not in self.encoder_branches:
            return x
        return self._branch(self.encoder_branches[str(level)], x, slab_slices)

    def beside_bottleneck(self, x: torch.Tensor, slab_slices: int) -> torch.Tensor:
        return self._branch(self.bottleneck_branch, x, slab_slices)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def matched_unet_width(config: GeneratorConfig) -> int:
    """The U-Net base width (multiple of 8) whose parameter count is closest to the SSM generator's."""
    with torch.device("meta"):
        target = count_parameters(SSMGenerator(config))
        candidates = range(8, 8 * 33, 8)
        return min(candidates, key=lambda width: abs(count_parameters(UNetGenerator(config, width)) - target))


@contextmanager
def recording_scan_share(model: nn.Module) -> Iterator[dict[str, float]]:
    """Within the block, each S6 block of ``model`` records ``rms(scan term) / rms(D * u)`` of its latest
    forward; on exit the yielded dict holds ``{module path: share}`` (empty for a model without S6 blocks,
    and for ``scan_off``, where the scan term is absent by construction)."""
    blocks = {name: m for name, m in model.named_modules() if isinstance(m, MultiDirectionS6)}
    shares: dict[str, float] = {}
    for block in blocks.values():
        block.record_scan_share, block.scan_share = True, None
    try:
        yield shares
    finally:
        for name, block in blocks.items():
            if block.scan_share is not None:
                shares[name] = block.scan_share
            block.record_scan_share, block.scan_share = False, None


def build_generator(config: GeneratorConfig) -> nn.Module:
    """The generator ``config.arch`` names, ready to train (parameters on the CPU, float32)."""
    if config.arch == "ssm":
        return SSMGenerator(config)
    width = config.unet_base_channels or matched_unet_width(config)
    return HybridGenerator(config, width) if config.arch == "hybrid" else UNetGenerator(config, width)
