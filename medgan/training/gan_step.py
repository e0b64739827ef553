"""One GAN training step: the losses, the discriminator's step, the generator's step and the EMA.

The networks train as the seed did: D on real against the detached fake (LSGAN or hinge), then G on
``training.l1_weight`` x the (tumour-weighted) L1 plus ``training.adversarial_weight`` x its adversarial
term; with ``adversarial_weight 0`` D never runs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from medgan.config import TrainingConfig
from medgan.models.conditioning import condition_stack
from medgan.training.ema import ExponentialMovingAverage
from medgan.training.step_logging import PhaseTimer


def discriminator_loss(kind: str, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    real_logits, fake_logits = real_logits.float(), fake_logits.float()
    if kind == "hinge":
        return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()
    return 0.5 * (((real_logits - 1) ** 2).mean() + (fake_logits**2).mean())


def generator_adversarial_loss(kind: str, fake_logits: torch.Tensor) -> torch.Tensor:
    fake_logits = fake_logits.float()
    if kind == "hinge":
        return -fake_logits.mean()
    return ((fake_logits - 1) ** 2).mean()


def weighted_l1(fake: torch.Tensor, real: torch.Tensor, seg: torch.Tensor | None, tumour_weight: float):
    """``mean(weight * |fake - real|)`` over all pixels, ``weight = 1 + tumour_weight`` where ``seg > 0``
    and 1 elsewhere (``training.tumour_l1_weight``); ``tumour_weight = 0`` or no ``seg`` is the plain mean.
    ``fake, real [B, 1, H, W]``, ``seg [B, 1, H, W]`` (any integer labels) or None; computed in fp32."""
    error = (fake.float() - real.float()).abs()
    if tumour_weight == 0 or seg is None:
        return error.mean()
    return (error * (1 + tumour_weight * (seg > 0).float())).mean()


def discriminator_step(d_engine, condition, real, fake, kind: str, timer: PhaseTimer) -> float:
    """D's forward on real and on the (detached) fake, backward and optimizer step; its loss."""
    with timer("d_forward"):
        d_loss = discriminator_loss(kind, d_engine(condition, real), d_engine(condition, fake))
    with timer("d_backward"):
        d_engine.backward(d_loss)
    with timer("d_optimizer"):
        d_engine.step()
    return d_loss.item()


def generator_step(
    g_engine, discriminator: torch.nn.Module, condition, fake, real, seg, training: TrainingConfig, timer
) -> dict[str, float]:
    """G's loss on ``fake`` (its graph still attached), backward and optimizer step; its loss terms."""
    losses: dict[str, float] = {}
    # The adversarial term goes through D's module, not its engine, with D frozen: a second engine
    # forward would make ZeRO 2 reduce D's gradients twice ("already been reduced") and ZeRO 0 refuse.
    for parameter in discriminator.parameters():
        parameter.requires_grad_(False)
    with timer("g_adversarial_forward"):
        # the L1 sees the unclamped output, so values outside [0, 1] are pulled back; D sees it too
        # (a fake outside the real's range is then an easy tell, a second pull back into range)
        l1 = weighted_l1(fake, real, seg, training.tumour_l1_weight)
        g_loss = training.l1_weight * l1
        if training.adversarial_weight > 0:
            adversarial = generator_adversarial_loss(training.gan_loss, discriminator(condition, fake))
            g_loss = g_loss + training.adversarial_weight * adversarial
            losses["loss_adv"] = adversarial.item()
    with timer("g_backward"):
        g_engine.backward(g_loss)
    with timer("g_optimizer"):
        g_engine.step()
    for parameter in discriminator.parameters():
        parameter.requires_grad_(True)
    return {**losses, "loss_g": g_loss.item(), "loss_l1": l1.item()}


def train_step(
    g_engine,
    d_engine,
    ema: ExponentialMovingAverage | None,
    batch: dict[str, Any],
    training: TrainingConfig,
    timer: PhaseTimer,
    slab_slices: int = 1,
) -> tuple[dict[str, float], torch.Tensor]:
    """One step on ``batch`` (on the device, floats in the engines' dtype): D's step when the adversarial
    term is on, G's step, then the EMA at an accumulation boundary. Returns (losses, the detached fake
    ``[B, 1, H, W]``); ``loss_d`` and ``loss_adv`` only when D trains (``adversarial_weight > 0``).
    ``slab_slices``: the batch's slabs (``data.slab_slices``), for a generator that scans across them."""
    images, available, target_index, real = (
        batch["images"],
        batch["available"],
        batch["target_index"],
        batch["target"],
    )
    condition = condition_stack(images, available, target_index)
    with timer("g_forward"):
        # a 2.5D generator takes each slice with its neighbours (the loader's "context"); D judges the slice
        fake = g_engine(batch.get("context", images), available, target_index, slab_slices=slab_slices)
    losses: dict[str, float] = {}
    if training.adversarial_weight > 0:
        detached = fake.detach()
        losses["loss_d"] = discriminator_step(d_engine, condition, real, detached, training.gan_loss, timer)
    losses.update(
        generator_step(g_engine, d_engine.module, condition, fake, real, batch.get("seg"), training, timer)
    )
    with timer("ema"):
        if ema is not None and g_engine.is_gradient_accumulation_boundary():
            ema.update(g_engine.module, g_engine.global_steps)
    return losses, fake.detach()
