"""Validation during training: the generator as evaluation sees it (EMA weights when kept), scored on the
val split through ``medgan.scoring`` as evaluation scores it, and the image grid of a training batch."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from medgan.distributed import all_gather_objects
from medgan.models.generator import GeneratorConfig, build_generator, recording_scan_share
from medgan.scoring import MODEL, SliceScore, per_subject_means, score_slices, summarize_scores
from medgan.training.ema import ExponentialMovingAverage, full_fp32_state
from medgan.training.tracking import image_grid

IMAGE_CAPTION = "inputs (max) | synthesized | real | |error|"


def evaluation_generator(
    config: GeneratorConfig, trained: torch.nn.Module, ema: ExponentialMovingAverage | None, device
) -> torch.nn.Module:
    """A fresh fp32 generator in eval mode holding the EMA weights, or ``trained``'s full weights without
    an EMA (gathered under ZeRO 3)."""
    model = build_generator(config).to(device)
    if ema is not None:
        ema.copy_to(model)
    else:
        model.load_state_dict(full_fp32_state(trained))
    return model.eval()


def score_batch(fake: torch.Tensor, batch: dict[str, Any], canonical: list[str]) -> list[SliceScore]:
    """Each slice's brain scores (``scoring.score_slices``, task ``->TARGET``) of ``fake [B, H, W]``
    (float32, CPU, in ``[0, 1]``) against the batch's target over its mask."""
    tasks = [f"->{canonical[int(index)]}" for index in batch["target_index"]]
    return score_slices(
        MODEL,
        tasks,
        list(batch["subject"]),
        batch["slice"].numpy(),
        fake,
        batch["target"][:, 0],
        batch["mask"][:, 0] > 0.5,
    )


@torch.no_grad()
def validate(
    model: torch.nn.Module, batches: Iterable[dict[str, Any]], canonical: list[str], device, max_batches: int
) -> tuple[dict[str, float], list[list[Any]]]:
    """(summary, per-subject table) of ``model`` on this rank's val ``batches`` (the first ``max_batches``,
    or all with 0) and every other rank's: ``val/slices``, the mean and std over slices of each metric
    (``val/psnr``, ``val/psnr_std``, ...), ``model/scan_share/<block>`` (each S6 block's
    ``rms(scan term) / rms(D * u)`` on this rank's first batch); the table is
    ``scoring.per_subject_means``. Collective (the ranks' rows are gathered)."""
    rows: list[SliceScore] = []
    shares: dict[str, float] = {}
    for index, batch in enumerate(batches):
        if max_batches and index >= max_batches:
            break
        # each S6 block's scan share, rms(scan term) / rms(D * u), on the first batch only (cheap)
        with recording_scan_share(model) if index == 0 else contextlib.nullcontext(shares) as recorded:
            fake = model(
                batch["images"].to(device), batch["available"].to(device), batch["target_index"].to(device)
            )
        shares = recorded
        rows.extend(score_batch(fake.float().cpu()[:, 0], batch, canonical))
    # every slice's row, in one order on any world size: the means then agree to the last bit
    all_rows = sorted(
        (row for rank_rows in all_gather_objects(rows) for row in rank_rows),
        key=lambda row: (row.subject, row.slice),
    )
    summary: dict[str, float] = {"val/slices": len(all_rows)}
    summary.update({f"model/scan_share/{name}": share for name, share in shares.items()})
    for name, values in summarize_scores(all_rows).items():
        summary[f"val/{name}"] = values["mean"]
        summary[f"val/{name}_std"] = values["std"]
    return summary, per_subject_means(all_rows)


def training_images(batch: dict[str, Any], fake: torch.Tensor, count: int = 4) -> np.ndarray:
    """uint8 grid of the first ``count`` samples of a training batch, one row each:
    the inputs' pixelwise max | synthesized | real | |error| (:data:`IMAGE_CAPTION`)."""
    count = min(count, fake.shape[0])
    available = batch["available"][:count].float()
    images = batch["images"][:count].float()
    first_input = (images * available[:, :, None, None]).amax(dim=1)
    real = batch["target"][:count, 0].float()
    synthesized = fake[:count, 0].float()
    columns = [first_input, synthesized, real, (synthesized - real).abs()]
    return image_grid([c.cpu().numpy() for c in columns])
