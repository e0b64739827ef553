"""Three orthogonal planes of each scored subject (inputs, synthesized, real, mask, spread), saved in
``views/`` for the report's montages."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medgan.evaluation.subjects import SubjectSlices
from medgan.evaluation.tasks import Task


def _plane_indices(mask: np.ndarray, seg: np.ndarray | None) -> tuple[int, int, int]:
    """(z, x, y) planes to show: through the tumour's centre when there is one, else the brain's."""
    focus = seg > 0 if seg is not None and np.any(seg > 0) else mask
    if not np.any(focus):
        return tuple(n // 2 for n in mask.shape)
    z = int(np.argmax(focus.sum(axis=(1, 2))))
    centre = np.argwhere(focus).mean(axis=0)
    return z, int(round(centre[1])), int(round(centre[2]))


def orthogonal_views(volumes: dict[str, np.ndarray], mask: np.ndarray, seg: np.ndarray | None) -> dict:
    """Axial [H, W], sagittal [Z, W] and coronal [Z, H] planes of each [..., Z, H, W] volume."""
    z, x, y = _plane_indices(mask, seg)
    views = {}
    for name, volume in volumes.items():
        views[f"axial_{name}"] = volume[..., z, :, :]
        views[f"sagittal_{name}"] = volume[..., :, x, :]
        views[f"coronal_{name}"] = volume[..., :, :, y]
    return views


def write_views(
    out: Path, task: Task, subject: SubjectSlices, modalities, pred, target, mask, spread=None
) -> None:
    """Three orthogonal planes of inputs, synthesized, real, mask (and spread), for the report's montages."""
    volumes = {
        "inputs": subject.images[:, [modalities.index(m) for m in task.inputs]].transpose(1, 0, 2, 3),
        "synthesized": pred,
        "real": target,
        "mask": mask,
    }
    if spread is not None:
        volumes["spread"] = spread
    views = orthogonal_views(volumes, subject.mask, subject.seg)
    view_dir = out / "views" / task.folder_name
    view_dir.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        view_dir / f"{subject.subject}.npz",
        **{key: value.astype(np.float16) for key, value in views.items()},
        input_names=np.array(task.inputs),
        spacing=np.array(subject.spacing),
    )
