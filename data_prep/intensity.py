"""Intensity normalisation into ``[0, 1]``: percentiles within a mask and the linear map they define.

Two implementations of each step; tests/test_data_prep_intensity.py holds them equal.

- Reference, any dtype: ``np.percentile`` over the masked voxels, and `normalise` in float32.
- Fast, for volumes stored as 8- or 16-bit integers (BraTS and IXI files are int16): the percentiles from
  a histogram of the masked voxels (the same order statistics, found by counting instead of
  partitioning), and the normalisation as a lookup table with one entry per representable value. The
  table's entries are computed by the reference's own float32 operations and then cast, so normalising
  through it gives bit-identical output at a fraction of the cost (one gather instead of five passes and
  a float16 cast).

`volumes.py` re-exports the public names: this is part of data_prep's API for medgan.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from data_prep.errors import VolumeError

LOW_PERCENTILE, HIGH_PERCENTILE = 0.5, 99.5


@dataclass(frozen=True, slots=True)
class IntensityScaling:
    """Linear map of original intensities onto [0, 1]: `low` -> 0, `high` -> 1 (original units)."""

    low: float
    high: float

    def to_dict(self) -> dict:
        return {"low": self.low, "high": self.high}

    @classmethod
    def from_dict(cls, record: dict) -> IntensityScaling:
        return cls(low=float(record["low"]), high=float(record["high"]))


def uses_lookup(dtype) -> bool:
    """Whether values of `dtype` take the fast path: integers of at most 16 bits (a table of <= 65536)."""
    dtype = np.dtype(dtype)
    return dtype.kind in "iu" and dtype.itemsize <= 2


def _unsigned(values: np.ndarray) -> np.ndarray:
    """The same memory read as unsigned integers of the same width: a value's index into the tables."""
    return values.view(np.dtype(f"u{values.dtype.itemsize}"))


def _representable(dtype) -> np.ndarray:
    """Every value of an 8- or 16-bit integer dtype, indexed by its unsigned bit pattern."""
    dtype = np.dtype(dtype)
    return np.arange(1 << (8 * dtype.itemsize), dtype=f"u{dtype.itemsize}").view(dtype)


def _lerp(below: float, above: float, fraction: float) -> float:
    """Linear interpolation as ``np.percentile`` does it (from the nearer end, for symmetry)."""
    difference = above - below
    if fraction >= 0.5:
        return above - difference * (1.0 - fraction)
    return below + difference * fraction


def histogram_percentiles(values: np.ndarray, percentiles) -> list[float]:
    """``np.percentile(values.astype(np.float64), percentiles)`` (the default, linear method) for 8- or
    16-bit integers. (On the integers themselves numpy interpolates in their dtype, which can overflow.)

    Counts the values instead of sorting them: the k-th smallest is where the cumulative count passes k.
    """
    if not uses_lookup(values.dtype):
        raise TypeError(f"histogram_percentiles needs 8- or 16-bit integers, got {values.dtype}")
    if values.size == 0:
        raise ValueError("histogram_percentiles of no values")
    if not all(0.0 <= percentile <= 100.0 for percentile in percentiles):
        raise ValueError(f"percentiles must be within [0, 100], got {list(percentiles)}")
    table = _representable(values.dtype)
    in_value_order = np.argsort(table, kind="stable")
    counts = np.bincount(_unsigned(values).ravel(), minlength=table.size)
    cumulative = np.cumsum(counts[in_value_order])
    sorted_values = table[in_value_order].astype(np.float64)
    last = values.size - 1

    def kth(k: int) -> float:
        return float(sorted_values[np.searchsorted(cumulative, k, side="right")])

    results = []
    for percentile in percentiles:
        position = percentile / 100.0 * last
        below = math.floor(position)
        results.append(_lerp(kth(below), kth(min(below + 1, last)), position - below))
    return results


def fit_scaling(volume: np.ndarray, mask: np.ndarray) -> IntensityScaling:
    """Percentiles (LOW_PERCENTILE, HIGH_PERCENTILE) of the volume within the mask.

    Raises VolumeError when the mask is empty or the intensity is constant within it.
    """
    # Selected in the volume's memory order (which voxels, not their order, decide the percentiles): a
    # reoriented or transposed view is otherwise walked across the grain, several times slower.
    inside = _in_memory_order(volume, volume)[_in_memory_order(mask, volume)]
    if inside.size == 0:
        raise VolumeError("empty mask: no voxel to normalise within")
    if uses_lookup(inside.dtype):
        low, high = histogram_percentiles(inside, [LOW_PERCENTILE, HIGH_PERCENTILE])
    else:
        # `inside` is already a copy: percentile may partition it in place instead of copying it again.
        low, high = np.percentile(inside, [LOW_PERCENTILE, HIGH_PERCENTILE], overwrite_input=True)
    if high <= low:
        raise VolumeError(f"constant intensity {low:g} within the mask")
    return IntensityScaling(low=float(low), high=float(high))


def _in_memory_order(array: np.ndarray, like: np.ndarray) -> np.ndarray:
    """A view of `array` with its axes flipped and permuted so that C order walks `like`'s memory forward."""
    flips = tuple(slice(None, None, -1) if stride < 0 else slice(None) for stride in like.strides)
    axes = sorted(range(like.ndim), key=lambda axis: -abs(like.strides[axis]))
    return array[flips].transpose(axes)


def scale_and_clip_in_place(scaled: np.ndarray, scaling: IntensityScaling) -> None:
    """float32 `scaled` mapped by `scaling` and clipped into [0, 1], in place (the reference's arithmetic)."""
    scaled -= np.float32(scaling.low)
    scaled *= np.float32(1.0 / (scaling.high - scaling.low))
    np.clip(scaled, 0.0, 1.0, out=scaled)


def normalise_in_place(scaled: np.ndarray, scaling: IntensityScaling, mask: np.ndarray) -> None:
    """`normalise` on a float32 array that may be overwritten (the same operations, in the same order)."""
    scale_and_clip_in_place(scaled, scaling)
    np.multiply(scaled, mask, out=scaled)


def normalise(volume: np.ndarray, scaling: IntensityScaling, mask: np.ndarray) -> np.ndarray:
    """float32 like `volume`, in [0, 1]: scaled, clipped, and zero outside the mask (the reference)."""
    # In place on one float32 copy: this runs on every full-size volume, temporaries cost more than maths.
    scaled = volume.astype(np.float32, copy=True)
    normalise_in_place(scaled, scaling, mask)
    return scaled


def normalisation_lookup(dtype, scaling: IntensityScaling, out_dtype=np.float32) -> np.ndarray:
    """`out_dtype` table: entry ``_unsigned(v)`` holds value v of `dtype` scaled and clipped as `normalise`
    does (in float32, then cast), before the mask. Only for `uses_lookup` dtypes."""
    if not uses_lookup(dtype):
        raise TypeError(f"no lookup table for {np.dtype(dtype)}: only 8- and 16-bit integers")
    table = _representable(dtype).astype(np.float32)
    scale_and_clip_in_place(table, scaling)
    return table.astype(out_dtype)


def normalise_by_lookup(volume: np.ndarray, lookup: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Every voxel of an 8- or 16-bit integer `volume` (any strides) through `normalisation_lookup`'s
    table: scaled and clipped, not yet masked. Writes into `out` (same shape, any strides) when given."""
    indices = _unsigned(volume)
    # mode="clip" never clips (the table has an entry for every bit pattern); unlike the default it lets
    # numpy write straight into a strided `out`, one plane at a time while the plane is in the cache.
    if out is None:
        return np.take(lookup, indices, mode="clip")
    if out.shape != indices.shape:
        raise ValueError(f"out of shape {out.shape} for a volume of shape {indices.shape}")
    planes = zip(indices, out) if indices.ndim == 3 else [(indices, out)]
    for plane, out_plane in planes:
        np.take(lookup, plane, out=out_plane, mode="clip")
    return out


def denormalise(normalised: np.ndarray, scaling: IntensityScaling) -> np.ndarray:
    """float32 in original intensity units: inverse of `normalise` (within [low, high])."""
    return (
        normalised.astype(np.float32) * np.float32(scaling.high - scaling.low) + np.float32(scaling.low)
    ).astype(np.float32)
