"""2.5D context: a slice to synthesize together with its neighbours, and a generator run over a whole stack.

A generator with ``context_slices: k`` synthesizes slice ``z`` of a stack of axial slices from slices
``z - k .. z + k``. The stack is what the caller has of the subject: in training a subject's slices in the
shards (data_prep keeps the slices with brain), at validation and inference every slice the prediction
covers. A neighbour beyond either end of the stack is zero in every contrast, the background of a
normalised MR slice; the rule is this module's, so training and inference cannot disagree on it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn


def context_windows(stack: torch.Tensor, centres: torch.Tensor, context_slices: int) -> torch.Tensor:
    """``[n, 2k + 1, M, H, W]``: for each index in ``centres [n]`` the slices ``centre - k .. centre + k``
    of ``stack [Z, M, H, W]``, zero where the index falls outside ``0 .. Z - 1``."""
    offsets = torch.arange(-context_slices, context_slices + 1, device=centres.device)
    indices = centres.long()[:, None] + offsets[None, :]
    inside = (indices >= 0) & (indices < stack.shape[0])
    windows = stack[indices.clamp(0, stack.shape[0] - 1)]
    return windows * inside[:, :, None, None, None].to(windows.dtype)


def input_shape(batch: int, modalities: int, height: int, width: int, context_slices: int) -> tuple[int, ...]:
    """The shape of ``images`` a generator with ``context_slices`` takes (for benchmarks' random inputs)."""
    return (batch, *([2 * context_slices + 1] if context_slices else []), modalities, height, width)


def check_generator_input(images: torch.Tensor, modalities: int, context_slices: int) -> None:
    """A ValueError naming the shape a generator with ``context_slices`` takes, unless ``images`` has it."""
    expected = (modalities,) if context_slices == 0 else (2 * context_slices + 1, modalities)
    if images.dim() != len(expected) + 3 or tuple(images.shape[1:-2]) != expected:
        wanted = "[B, M, H, W]" if context_slices == 0 else f"[B, {2 * context_slices + 1}, M, H, W]"
        raise ValueError(
            f"images of shape {tuple(images.shape)}: a generator with context_slices {context_slices} and "
            f"M = {modalities} contrasts takes {wanted} (medgan.models.context.generator_input builds it)"
        )


def generator_input(stack: torch.Tensor, centres: torch.Tensor, context_slices: int) -> torch.Tensor:
    """What a generator with ``context_slices`` takes for the slices ``centres`` of ``stack``: the slices
    themselves ``[n, M, H, W]`` for 0, their context windows ``[n, 2k + 1, M, H, W]`` otherwise."""
    if context_slices == 0:
        return stack[centres.long()]
    return context_windows(stack, centres, context_slices)


def predict_stack(
    generator: nn.Module,
    stack: torch.Tensor,
    available: torch.Tensor,
    target_index: int,
    context_slices: int,
    batch_size: int,
    batches: Callable[[Iterable[int]], Iterable[int]] = lambda starts: starts,
) -> torch.Tensor:
    """Every slice of ``stack [Z, M, H, W]`` (on the generator's device) synthesized: ``[Z, 1, H, W]``.

    available: ``[M]`` bool, the inputs; target_index: the channel to synthesize. The slices go through in
    batches of ``batch_size``, each with its context windows built from the whole stack, so a slice's
    prediction does not depend on the batching. ``batches`` wraps the batch starts (a progress bar). A
    generator that scans across slices (``scans_across_slices``: the hybrid) takes the whole stack as one
    slab in one forward.
    """
    if getattr(generator, "scans_across_slices", False):
        # the whole volume's token sequence at once: every slice reaches every other
        count = stack.shape[0]
        return generator(
            generator_input(stack, torch.arange(count, device=stack.device), context_slices),
            available.expand(count, -1),
            torch.full((count,), target_index, dtype=torch.long, device=stack.device),
            slab_slices=count,
        )
    outputs = []
    for start in batches(range(0, stack.shape[0], batch_size)):
        centres = torch.arange(start, min(start + batch_size, stack.shape[0]), device=stack.device)
        count = len(centres)
        outputs.append(
            generator(
                generator_input(stack, centres, context_slices),
                available.expand(count, -1),
                torch.full((count,), target_index, dtype=torch.long, device=stack.device),
            )
        )
    return torch.cat(outputs, dim=0)
