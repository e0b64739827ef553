"""Test-time spread: the voxelwise standard deviation over up to 4 variants of the same prediction (the
in-plane flip training augments with, and the checkpoint's EMA and raw weights).

It shows where the prediction is fragile; it is a spread, not a calibrated uncertainty
(docs/synthesis.md). `synthesize_volume` and the default evaluation protocol run it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data_prep.volumes import LEFT_RIGHT_AXIS
from medgan.inference.errors import SynthesisError
from medgan.inference.loading import LoadedGenerator, load_generator

SPREADS = ("flip", "weights", "both")
# The flip training augments with: left-right, the H axis of the [.., H, W] model slices.
FLIP_AXIS = LEFT_RIGHT_AXIS


@dataclass(frozen=True, slots=True)
class Variant:
    """One way of running the prediction for the spread: these weights, on flipped slices or not."""

    generator: LoadedGenerator
    flipped: bool = False

    def describe(self) -> dict[str, Any]:
        """What a sidecar says of this variant."""
        return {
            "Weights": self.generator.source,
            "WeightsSHA256": self.generator.weights_sha256,
            "Flipped": "left-right (canonical x, the slices' H axis), flipped back after"
            if self.flipped
            else None,
        }


def spread_variants(
    generator: LoadedGenerator, spread: str | None, other_weights: LoadedGenerator | None = None
) -> list[Variant]:
    """The predictions a spread takes: the generator itself first, then with ``spread`` "flip" its
    prediction on flipped slices, "weights" ``other_weights`` (the same checkpoint's other set: raw
    when ``generator`` has the EMA), "both" all four combinations. None: the generator alone."""
    if spread is None:
        return [Variant(generator)]
    if spread not in SPREADS:
        raise SynthesisError(f"--spread {spread}: expected one of {' '.join(SPREADS)}")
    if spread in ("weights", "both") and other_weights is None:
        raise SynthesisError(f"--spread {spread}: needs the checkpoint's EMA and raw weights, got one set")
    weight_sets = [generator] + ([other_weights] if spread in ("weights", "both") else [])
    flips = (False, True) if spread in ("flip", "both") else (False,)
    return [Variant(weights, flipped) for weights in weight_sets for flipped in flips]


def _predict_variant(
    variant: Variant,
    images: np.ndarray,
    inputs: list[str],
    target: str,
    batch_size: int,
    progress: str | None,
) -> np.ndarray:
    """[Z, H, W] in [0, 1] from slices [Z, M, H, W]; a flipped variant predicts on flipped slices and
    flips its prediction back, so every variant is on the same pixels."""
    if not variant.flipped:
        return variant.generator.predict(images, inputs, target, batch_size, progress)
    flipped = np.flip(images, axis=FLIP_AXIS)
    predicted = variant.generator.predict(flipped, inputs, target, batch_size, progress)
    return np.ascontiguousarray(np.flip(predicted, axis=FLIP_AXIS))


def predict_with_spread(
    variants: list[Variant],
    images: np.ndarray,
    inputs: list[str],
    target: str,
    *,
    batch_size: int = 8,
    progress: str | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """(the first variant's prediction, the voxelwise population standard deviation over all variants,
    or None for a single variant), both float32 [Z, H, W] from slices [Z, M, H, W] in [0, 1]."""
    predictions = []
    for index, variant in enumerate(variants):
        label = f"{progress} ({index + 1}/{len(variants)})" if progress and len(variants) > 1 else progress
        predictions.append(_predict_variant(variant, images, inputs, target, batch_size, label))
    if len(predictions) == 1:
        return predictions[0], None
    return predictions[0], np.std(np.stack(predictions), axis=0).astype(np.float32)


def load_for_synthesis(
    checkpoint: str | Path, tag: str | None = None, device: str = "cpu", spread: str | None = None
) -> tuple[LoadedGenerator, LoadedGenerator | None]:
    """(generator, other weights) for `synthesize_volume`: the checkpoint's default weights, or for a
    "weights"/"both" spread its EMA and its raw weights (a checkpoint folder with both; an exported
    file holds one set, a one-line SynthesisError)."""
    if spread not in ("weights", "both"):
        return load_generator(checkpoint, tag, device), None
    if Path(checkpoint).is_file():
        raise SynthesisError(
            f"--spread {spread}: {checkpoint} is an exported file, which holds one set of weights; "
            "give the checkpoint folder (it has the EMA and the raw weights)"
        )
    return load_generator(checkpoint, tag, device, "ema"), load_generator(checkpoint, tag, device, "raw")
