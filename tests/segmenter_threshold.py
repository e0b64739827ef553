"""A small deterministic tumour segmenter for the tests, called as a user's segmenter would be:

    python tests/segmenter_threshold.py INPUT_DIR OUTPUT_DIR [--labels {brats2021,brats2023}]

INPUT_DIR holds BraTS-2023-named subjects, ``INPUT_DIR/<id>/<id>-t2f.nii.gz`` and ``<id>-t1c.nii.gz`` (the
other contrasts are ignored); for each it writes ``OUTPUT_DIR/<id>.nii.gz``, a uint8 label map on the FLAIR's
grid in BraTS 2023 labels (1 necrotic core, 2 oedema, 3 enhancing tumour), or BraTS 2021 labels (enhancing
tumour 4) with ``--labels brats2021``.

Rule, tuned on the phantom (``data_prep.phantom``): intensities are divided by the median of the brain
(nonzero voxels); enhancing tumour is T1c above ``ENHANCING_RATIO``, the whole tumour is FLAIR above
``OEDEMA_RATIO`` plus the enhancing tumour and the holes it encloses, and those holes are the necrotic core.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

ENHANCING_RATIO = 1.6
OEDEMA_RATIO = 1.3
ENHANCING_LABEL = {"brats2021": 4, "brats2023": 3}


def relative_intensity(path: Path) -> np.ndarray:
    """float64 [X, Y, Z]: the volume divided by the median of its nonzero (brain) voxels."""
    volume = np.asarray(nib.load(path).dataobj, dtype=np.float64)
    return volume / np.median(volume[volume > 0])


def segment(flair: np.ndarray, t1c: np.ndarray, enhancing_label: int) -> np.ndarray:
    """uint8 labels [X, Y, Z] from FLAIR and T1c relative intensities [X, Y, Z]."""
    enhancing = t1c > ENHANCING_RATIO
    necrotic = ndimage.binary_fill_holes(enhancing) & ~enhancing
    labels = np.zeros(flair.shape, dtype=np.uint8)
    labels[flair > OEDEMA_RATIO] = 2
    labels[necrotic] = 1
    labels[enhancing] = enhancing_label
    return labels


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--labels", choices=sorted(ENHANCING_LABEL), default="brats2023")
    args = parser.parse_args(argv)
    args.output.mkdir(parents=True, exist_ok=True)
    subjects = sorted(folder for folder in args.input.iterdir() if folder.is_dir())
    if not subjects:
        print(f"{args.input}: no subject folders", file=sys.stderr)
        return 2
    for folder in subjects:
        subject = folder.name
        flair_path = folder / f"{subject}-t2f.nii.gz"
        labels = segment(
            relative_intensity(flair_path),
            relative_intensity(folder / f"{subject}-t1c.nii.gz"),
            ENHANCING_LABEL[args.labels],
        )
        nib.save(nib.Nifti1Image(labels, nib.load(flair_path).affine), args.output / f"{subject}.nii.gz")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
