"""Validation during training: the generator as evaluation sees it (EMA weights when kept), run on the whole
volumes of the val subjects (with its 2.5D context, as inference runs it) and scored per volume through
``medgan.scoring`` as evaluation scores it, and the image grid of a training batch."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from medgan.distributed import all_gather_objects
from medgan.models.context import predict_stack
from medgan.models.generator import GeneratorConfig, build_generator, recording_scan_share
from medgan.models.slab_scan import recording_branch_share
from medgan.scoring import METRICS, MODEL, VOLUME_METRICS, VolumeScore, score_volume, summarize_scores
from medgan.shards import SubjectStack
from medgan.training.ema import ExponentialMovingAverage, full_fp32_state
from medgan.training.loader import TaskSpec, validation_task
from medgan.training.tracking import image_grid

IMAGE_CAPTION = "inputs (max) | synthesized | real | |error|"
VOLUME_CAPTION = f"first val volume, rows axial | coronal | sagittal (superior up), columns {IMAGE_CAPTION}"


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


@torch.no_grad()
def validate(
    model: torch.nn.Module,
    subjects: Iterable[SubjectStack],
    canonical: list[str],
    task: TaskSpec,
    context_slices: int,
    device,
    batch_size: int,
) -> tuple[dict[str, float], list[list[Any]], np.ndarray | None]:
    """(summary, per-subject table, views) of ``model`` on this rank's whole val volumes ``subjects`` and
    every other rank's, scored per volume as evaluation scores them (``scoring.score_volume``, prediction
    masked to the brain), each subject with the task :func:`loader.validation_task` gives it.

    summary: ``val/volumes``, ``val/slices``, the mean and std over volumes of each brain metric
    (``val/psnr``, ``val/psnr_std``, ..., ``val/through_plane_error``), the mean tumour PSNR over the
    volumes with a tumour (``val/tumour_psnr``), ``model/scan_share/<block>`` (each S6 block's
    ``rms(scan term) / rms(D * u)``) and ``model/branch_share/<branch>`` (each hybrid branch's
    ``rms(scale * scan) / rms(x)``), both on the last batch of this rank's first scored volume. table:
    ``[subject, slices, psnr, ssim, mae]`` per volume, sorted by subject. views: :func:`volume_views` of
    this rank's first scored volume (None when it scored none). Collective (the ranks' rows are gathered).
    """
    rows: list[VolumeScore] = []
    shares: dict[str, float] = {}
    views = None
    for subject in subjects:
        choice = validation_task(subject.present, task, subject.subject)
        if choice is None:
            continue
        inputs, target = choice
        available = torch.zeros(len(canonical), dtype=torch.bool, device=device)
        available[inputs] = True
        stack = torch.from_numpy(subject.images).to(device)
        # each S6 block's scan share, rms(scan term) / rms(D * u), and each hybrid branch's share of its
        # level, rms(scale * scan) / rms(x), as of the first subject's last batch
        with contextlib.ExitStack() as recording:
            if not rows:
                scan_shares = recording.enter_context(recording_scan_share(model))
                branch_shares = recording.enter_context(recording_branch_share(model))
            fake = predict_stack(model, stack, available, target, context_slices, batch_size)
        if not rows:
            shares = {f"model/scan_share/{name}": share for name, share in scan_shares.items()}
            shares.update({f"model/branch_share/{name}": share for name, share in branch_shares.items()})
        pred = fake[:, 0].float().cpu().numpy() * subject.mask
        if views is None:
            shown = (subject.images * available.cpu().numpy()[None, :, None, None]).max(axis=1)
            views = volume_views([shown, pred, subject.images[:, target]])
        volume_rows = score_volume(
            MODEL,
            f"->{canonical[target]}",
            subject.subject,
            pred,
            subject.images[:, target],
            subject.mask,
            subject.seg,
        )
        rows.extend(volume_rows)
    # every volume's rows, in one order on any world size: the means then agree to the last bit
    all_rows = sorted(
        (row for rank_rows in all_gather_objects(rows) for row in rank_rows),
        key=lambda row: (row.subject, row.region),
    )
    brain = [row for row in all_rows if row.region == "brain"]
    summary: dict[str, float] = {"val/volumes": len(brain), "val/slices": sum(row.slices for row in brain)}
    summary.update(shares)
    for name, values in summarize_scores(brain, VOLUME_METRICS).items():
        summary[f"val/{name}"] = values["mean"]
        summary[f"val/{name}_std"] = values["std"]
    tumour = [row.psnr for row in all_rows if row.region == "tumour" and row.voxels]
    if tumour:
        summary["val/tumour_psnr"] = float(np.nanmean(tumour))
    table = [[row.subject, row.slices, *(getattr(row, name) for name in METRICS)] for row in brain]
    return summary, table, views


def volume_views(volumes: list[np.ndarray]) -> np.ndarray:
    """uint8 grid of one volume in three planes, a row each (axial, coronal, sagittal through the middle,
    superior up in the last two) and a column per volume ``[Z, H, W]`` in ``[0, 1]`` (inputs' max,
    synthesized, real) plus ``|synthesized - real|`` (:data:`VOLUME_CAPTION`): slice-to-slice flicker
    shows in the lower two rows. A row narrower than the widest is padded with black on the right."""
    volumes = [*volumes, np.abs(volumes[1] - volumes[2])]
    depth, height, width = volumes[0].shape
    planes = [
        [volume[depth // 2] for volume in volumes],
        [volume[::-1, :, width // 2] for volume in volumes],
        [volume[::-1, height // 2, :] for volume in volumes],
    ]
    rows = [image_grid([tile[None] for tile in plane]) for plane in planes]
    widest = max(row.shape[1] for row in rows)
    return np.concatenate([np.pad(row, ((0, 0), (0, widest - row.shape[1]))) for row in rows], axis=0)


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
