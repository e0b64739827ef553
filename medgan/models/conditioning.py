"""What the networks are told about a sample: which contrasts are present and which one to synthesize.

Both the generator and the discriminator see the same conditioning stack, so a single model can serve every
(inputs -> target) task: the images (absent ones zero), the availability mask and the target's one-hot code,
each broadcast to planes.
"""

from __future__ import annotations

import torch

# The canonical, ordered modality list is data_prep's one table (input channel i is MODALITIES[i] unless the
# config says otherwise); data_prep.modalities imports nothing heavy, so this package stays torch-only.
from data_prep.modalities import MODALITIES

__all__ = ["MODALITIES", "condition_stack", "condition_vector", "stack_channels"]


def stack_channels(modalities: int, context_slices: int = 0) -> int:
    """Channels of :func:`condition_stack` for ``modalities`` contrasts and ``context_slices`` neighbours on
    each side: ``(2k + 1) * M`` image planes, then ``M`` availability and ``M`` target planes."""
    return (2 * context_slices + 3) * modalities


def condition_stack(
    images: torch.Tensor, available: torch.Tensor, target_index: torch.Tensor
) -> torch.Tensor:
    """Stack images, availability planes and target one-hot planes.

    Args:
        images: ``[B, M, H, W]`` input contrasts in ``[0, 1]``, or with 2.5D context ``[B, 2k + 1, M, H, W]``
            (slices ``z - k .. z + k`` around the slice to synthesize, ``medgan.models.context``); channels
            that are not inputs are zeroed here, on every slice (so a caller cannot leak the target
            through the image stack).
        available: ``[B, M]`` bool or 0/1: which channels are inputs for this sample.
        target_index: ``[B]`` long: the channel to synthesize.

    Returns:
        ``[B, stack_channels(M, k), H, W]`` in the images' dtype: the slices' images slice by slice
        (``z - k`` first), then the planes.
    """
    if images.dim() == 4:
        images = images[:, None]
    batch, _, modalities, height, width = images.shape
    if available.shape != (batch, modalities):
        raise ValueError(f"available has shape {tuple(available.shape)}, expected {(batch, modalities)}")
    if target_index.shape != (batch,):
        raise ValueError(f"target_index has shape {tuple(target_index.shape)}, expected {(batch,)}")
    available = available.to(images.dtype)
    target = torch.nn.functional.one_hot(target_index.long(), modalities).to(images.dtype)
    planes = torch.cat([available, target], dim=1)[:, :, None, None].expand(-1, -1, height, width)
    shown = (images * available[:, None, :, None, None]).flatten(1, 2)
    return torch.cat([shown, planes], dim=1)


def condition_vector(available: torch.Tensor, target_index: torch.Tensor) -> torch.Tensor:
    """``[B, 2 * M]``: the availability mask followed by the target's one-hot code (float)."""
    modalities = available.shape[1]
    target = torch.nn.functional.one_hot(target_index.long(), modalities)
    return torch.cat([available.float(), target.float()], dim=1)
