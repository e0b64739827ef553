"""A state-space branch that scans the tokens of a whole slab of slices, beside a convolutional trunk.

:class:`SlabS6` is :class:`~medgan.models.blocks.MultiDirectionS6` over a slab: the feature maps of S
consecutive slices ``[B * S, C, h, w]`` are one volume ``[B, C, S, h, w]``, and its ``S * h * w`` tokens are
scanned in six orders (docs/performance.md draws them):

- rows: slice by slice, each slice row by row (``x`` fastest, then ``y``, then ``z``);
- columns: slice by slice, each slice column by column (``y`` fastest, then ``x``, then ``z``);
- slices: through the slab first (``z`` fastest, then ``x``, then ``y``), so a token's neighbours on the
  adjacent slices are next to it in the sequence;
- and each of the three reversed.

With S = 1 the slices order is the rows order (the 2D hybrid). :class:`SlabScanBranch` joins the trunk
through a learned per-channel scale that starts at 0 (ReZero, arXiv 2003.04887): at initialisation the
branch adds exactly nothing, the scale gets a gradient at once and the branch's weights from the next step.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from medgan.models.blocks import ChannelLayerNorm, MultiDirectionS6

SLAB_ORDERS = ("rows", "columns", "slices", "rows reversed", "columns reversed", "slices reversed")


class SlabS6(MultiDirectionS6):
    """S6 over the tokens of each slab, in the six orders of :data:`SLAB_ORDERS`."""

    DIRECTIONS = (len(SLAB_ORDERS),)

    def __init__(self, channels: int, d_state: int = 16, expand: int = 2, **options) -> None:
        super().__init__(channels, d_state, expand, len(SLAB_ORDERS), **options)

    def sequences(self, u: torch.Tensor, slab_slices: int) -> torch.Tensor:
        count, channels, height, width = u.shape
        if count % slab_slices:
            raise ValueError(f"{count} slices are not whole slabs of {slab_slices}")
        volume = u.reshape(count // slab_slices, slab_slices, channels, height, width).transpose(1, 2)
        orders = [
            volume.flatten(2),  # [B, C, S, h, w]: x fastest
            volume.transpose(3, 4).flatten(2),  # y fastest
            volume.permute(0, 1, 3, 4, 2).flatten(2),  # z fastest
        ]
        return torch.stack(orders + [order.flip(-1) for order in orders], dim=1)

    def merge(self, y: torch.Tensor, shape: torch.Size, slab_slices: int) -> torch.Tensor:
        count, _, height, width = shape
        slabs, _, channels, _ = y.shape
        y = y[:, :3] + y[:, 3:].flip(-1)  # each order and its reverse, on the same tokens
        volume = (
            y[:, 0].reshape(slabs, channels, slab_slices, height, width)
            + y[:, 1].reshape(slabs, channels, slab_slices, width, height).transpose(3, 4)
            + y[:, 2].reshape(slabs, channels, height, width, slab_slices).permute(0, 1, 4, 2, 3)
        )
        return volume.transpose(1, 2).reshape(count, channels, height, width)


class SlabScanBranch(nn.Module):
    """``x + scale * SlabS6(LayerNorm(x))`` with a per-channel ``scale`` initialised at 0."""

    def __init__(self, channels: int, d_state: int, expand: int, scan_backend: str = "auto") -> None:
        super().__init__()
        self.norm = ChannelLayerNorm(channels)
        self.scan = SlabS6(channels, d_state, expand, scan_backend=scan_backend)
        # The zero scale already keeps the branch out at initialisation, so its own projections start at
        # unit gain (LeCun normal): with MultiDirectionS6's trunc normal 0.02 the scan's output was 0.026 x
        # its input, and after a demo run the branch still added 1e-4 of its level (docs/performance.md).
        for layer in (self.scan.in_proj, self.scan.out_proj):
            nn.init.normal_(layer.weight, std=layer.weight[0].numel() ** -0.5)
        self.scale = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor, slab_slices: int) -> torch.Tensor:
        return x + self.scale.to(x.dtype)[None, :, None, None] * self.scan(self.norm(x), slab_slices)


@contextmanager
def recording_branch_share(model: nn.Module) -> Iterator[dict[str, float]]:
    """Within the block, each :class:`SlabScanBranch` of ``model`` records how much it adds to the trunk,
    ``rms(scale * scan) / rms(x)``, of its latest forward; on exit the yielded dict holds ``{module path:
    share}`` (empty for a model without branches). Near 0 the hybrid computes its U-Net trunk's output."""
    shares: dict[str, float] = {}

    def recorder(name: str):
        def record(_module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            x = inputs[0].float()
            shares[name] = float((output.float() - x).square().mean().sqrt() / x.square().mean().sqrt())

        return record

    hooks = [
        module.register_forward_hook(recorder(name))
        for name, module in model.named_modules()
        if isinstance(module, SlabScanBranch)
    ]
    try:
        yield shares
    finally:
        for hook in hooks:
            hook.remove()
