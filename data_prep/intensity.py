"""Intensity normalisation into ``[0, 1]``: a healthy-tissue reference within a mask and the linear map it
defines.

The method (``healthy-median``): each contrast of each subject is divided by the median of its voxels
within the mask (BraTS: the brain, nonzero voxels; IXI: the head mask) so that the median lands on
`REFERENCE_LEVEL` (0.4) and `CEILING_MULTIPLE` (2.5) times the median on 1.0; values above are clipped to
1, below 0 to 0, and the share of mask voxels clipped at the top is recorded. As an `IntensityScaling`
that is ``low = 0``, ``high = 2.5 * median``. A tumour covers a minority of the brain, so it moves the
median little, where it moved the 99.5th percentile that the earlier ``percentile`` method scaled by
(docs/data.md has the measured figures): the scale a model sees is predictable from healthy tissue.

Two implementations of each step; tests/test_data_prep_intensity.py holds them equal.

- Reference, any dtype: ``np.percentile(..., 50)`` over the masked voxels, a comparison for the clipped
  share, and `normalise` in float32.
- Fast, for volumes stored as 8- or 16-bit integers (BraTS and IXI files are int16): the median and the
  clipped share from one histogram of the masked voxels (the same order statistic, found by counting
  instead of partitioning), and the normalisation as a lookup table with one entry per representable
  value. The table's entries are computed by the reference's own float32 operations and then cast, so
  normalising through it gives bit-identical output at a fraction of the cost (one gather instead of five
  passes and a float16 cast).

`volumes.py` re-exports the public names: this is part of data_prep's API for medgan.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from data_prep.errors import VolumeError

NORMALISATION_METHOD = "healthy-median"
# The median of the voxels within the mask maps onto REFERENCE_LEVEL; CEILING_MULTIPLE x median onto 1.
REFERENCE_LEVEL = 0.4
CEILING_MULTIPLE = 2.5
REFERENCE_PERCENTILE = 50.0


def normalisation_method() -> dict:
    """What defines the normalisation (equal records: equally scaled data); the manifest and every
    checkpoint carry it, and medgan refuses data or checkpoints whose record differs."""
    return {
        "method": NORMALISATION_METHOD,
        "reference": "median",
        "reference_level": REFERENCE_LEVEL,
        "ceiling_multiple": CEILING_MULTIPLE,
    }


@dataclass(frozen=True, slots=True)
class IntensityScaling:
    """Linear map of original intensities onto [0, 1]: `low` -> 0, `high` -> 1 (original units).

    As `fit_scaling` makes it: low = 0, high = CEILING_MULTIPLE x `median` (the median of the voxels
    within the mask, original units, > 0), and `clipped_fraction` in [0, 1] the share of those voxels
    above `high` (clipped to 1). Both are None in a map made by hand (`IntensityScaling(low, high)`).
    """

    low: float
    high: float
    median: float | None = None
    clipped_fraction: float | None = None

    def to_dict(self) -> dict:
        record = {"low": self.low, "high": self.high}
        if self.median is not None:
            record["median"] = self.median
        if self.clipped_fraction is not None:
            record["clipped_fraction"] = self.clipped_fraction
        return record

    @classmethod
    def from_dict(cls, record: dict) -> IntensityScaling:
        median, clipped = record.get("median"), record.get("clipped_fraction")
        return cls(
            low=float(record["low"]),
            high=float(record["high"]),
            median=None if median is None else float(median),
            clipped_fraction=None if clipped is None else float(clipped),
        )


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


def _value_histogram(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(every representable value in ascending order as float64, how many of `values` hold each)."""
    table = _representable(values.dtype)
    in_value_order = np.argsort(table, kind="stable")
    counts = np.bincount(_unsigned(values).ravel(), minlength=table.size)
    return table[in_value_order].astype(np.float64), counts[in_value_order]


def _check_percentile_arguments(values: np.ndarray, percentiles) -> None:
    if not uses_lookup(values.dtype):
        raise TypeError(f"histogram_percentiles needs 8- or 16-bit integers, got {values.dtype}")
    if values.size == 0:
        raise ValueError("histogram_percentiles of no values")
    if not all(0.0 <= percentile <= 100.0 for percentile in percentiles):
        raise ValueError(f"percentiles must be within [0, 100], got {list(percentiles)}")


def _percentiles_from_histogram(sorted_values: np.ndarray, counts: np.ndarray, percentiles) -> list[float]:
    """np.percentile's linear method on the values that `_value_histogram` counted."""
    cumulative = np.cumsum(counts)
    last = int(cumulative[-1]) - 1

    def kth(k: int) -> float:
        return float(sorted_values[np.searchsorted(cumulative, k, side="right")])

    results = []
    for percentile in percentiles:
        position = percentile / 100.0 * last
        below = math.floor(position)
        results.append(_lerp(kth(below), kth(min(below + 1, last)), position - below))
    return results


def histogram_percentiles(values: np.ndarray, percentiles) -> list[float]:
    """``np.percentile(values.astype(np.float64), percentiles)`` (the default, linear method) for 8- or
    16-bit integers. (On the integers themselves numpy interpolates in their dtype, which can overflow.)

    Counts the values instead of sorting them: the k-th smallest is where the cumulative count passes k.
    """
    _check_percentile_arguments(values, percentiles)
    return _percentiles_from_histogram(*_value_histogram(values), percentiles)


def _scaling_from_median(median: float, clipped_count, count: int) -> IntensityScaling:
    return IntensityScaling(
        low=0.0,
        high=CEILING_MULTIPLE * median,
        median=median,
        clipped_fraction=float(clipped_count) / count,
    )


def _check_median(median: float) -> None:
    if not median > 0:
        raise VolumeError(
            f"median intensity {median:g} within the mask is not positive: the healthy-median "
            "normalisation needs positive magnitudes (is the file offset or signed?)"
        )


def fit_scaling(volume: np.ndarray, mask: np.ndarray) -> IntensityScaling:
    """The healthy-median scaling of the volume within the mask (original units): low 0, high
    CEILING_MULTIPLE x the median of the masked voxels, and the share of them above high.

    Raises VolumeError when the mask is empty, the intensity is constant within it, or the median is not
    positive.
    """
    # Selected in the volume's memory order (which voxels, not their order, decide the statistics): a
    # reoriented or transposed view is otherwise walked across the grain, several times slower.
    inside = _in_memory_order(volume, volume)[_in_memory_order(mask, volume)]
    if inside.size == 0:
        raise VolumeError("empty mask: no voxel to normalise within")
    if uses_lookup(inside.dtype):
        sorted_values, counts = _value_histogram(inside)
        occupied = np.flatnonzero(counts)
        if sorted_values[occupied[0]] == sorted_values[occupied[-1]]:
            raise VolumeError(f"constant intensity {sorted_values[occupied[0]]:g} within the mask")
        (median,) = _percentiles_from_histogram(sorted_values, counts, [REFERENCE_PERCENTILE])
        _check_median(median)
        clipped = counts[sorted_values > CEILING_MULTIPLE * median].sum()
        return _scaling_from_median(median, clipped, inside.size)
    if inside.min() == inside.max():
        raise VolumeError(f"constant intensity {float(inside.min()):g} within the mask")
    # `inside` is already a copy: percentile may partition it in place (the count needs no order).
    median = float(np.percentile(inside, REFERENCE_PERCENTILE, overwrite_input=True))
    _check_median(median)
    # A float64 ceiling: compared in float64 whatever `inside`'s dtype, as the histogram path compares.
    clipped = np.count_nonzero(inside > np.float64(CEILING_MULTIPLE * median))
    return _scaling_from_median(median, clipped, inside.size)


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
