"""MR signal equations and the tissue relaxation parameters the phantom renders with.

Each contrast is a pulse sequence applied to per-tissue proton density (PD) and relaxation times
(T1, T2), so contrasts are physically related (one is learnable from the others) but none is a copy of
another. Times are in milliseconds, PD is relative (CSF = 1), signals are relative magnitudes >= 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, kw_only=True, slots=True)
class Tissue:
    """Relaxation parameters of one tissue at 1.5 T.

    t1_ms, t2_ms: relaxation times in ms (> 0). pd: relative proton density in [0, 1].
    gadolinium_t1_ms: T1 after contrast agent (ms); equal to t1_ms where the tissue does not enhance.
    """

    t1_ms: float
    t2_ms: float
    pd: float
    gadolinium_t1_ms: float | None = None

    @property
    def t1_post_contrast_ms(self) -> float:
        return self.t1_ms if self.gadolinium_t1_ms is None else self.gadolinium_t1_ms


def gadolinium_t1_ms(t1_ms: float, concentration_mm: float = 0.5, relaxivity_per_mm_s: float = 4.0) -> float:
    """T1 (ms) after gadolinium: 1/T1' = 1/T1 + r1 * C (r1 in 1/(mM s), C in mM)."""
    rate_per_s = 1000.0 / t1_ms + relaxivity_per_mm_s * concentration_mm
    return 1000.0 / rate_per_s


# Literature-typical 1.5 T values (rounded); tumour compartments follow the usual glioma appearance:
# oedema long T1/T2 (dark on T1, bright on T2 and FLAIR), necrosis fluid-like, and an enhancing rim
# that is dark on T1 until gadolinium shortens its T1.
TISSUES: dict[str, Tissue] = {
    "gm": Tissue(t1_ms=1300.0, t2_ms=100.0, pd=0.80),
    "wm": Tissue(t1_ms=800.0, t2_ms=80.0, pd=0.70),
    "csf": Tissue(t1_ms=4000.0, t2_ms=2000.0, pd=1.00),
    "oedema": Tissue(t1_ms=1800.0, t2_ms=250.0, pd=0.85),
    "necrosis": Tissue(t1_ms=3000.0, t2_ms=600.0, pd=0.95),
    "enhancing": Tissue(t1_ms=1400.0, t2_ms=120.0, pd=0.80, gadolinium_t1_ms=gadolinium_t1_ms(1400.0)),
    "skull": Tissue(t1_ms=300.0, t2_ms=2.0, pd=0.05),
    "scalp": Tissue(t1_ms=260.0, t2_ms=80.0, pd=0.90),
}


@dataclass(frozen=True, kw_only=True, slots=True)
class Sequence:
    """Sequence timing (ms). inversion_ms set: inversion recovery; None: spin echo."""

    repetition_ms: float
    echo_ms: float
    inversion_ms: float | None = None
    post_contrast: bool = False


def spin_echo(pd: np.ndarray, t1_ms: np.ndarray, t2_ms: np.ndarray, *, tr_ms: float, te_ms: float):
    """Spin-echo magnitude PD (1 - exp(-TR/T1)) exp(-TE/T2); arrays broadcast, result >= 0."""
    return pd * (1.0 - np.exp(-tr_ms / t1_ms)) * np.exp(-te_ms / t2_ms)


def inversion_recovery(pd, t1_ms, t2_ms, *, tr_ms: float, te_ms: float, ti_ms: float):
    """Inversion-recovery magnitude PD |1 - 2 exp(-TI/T1) + exp(-TR/T1)| exp(-TE/T2), >= 0."""
    return pd * np.abs(1.0 - 2.0 * np.exp(-ti_ms / t1_ms) + np.exp(-tr_ms / t1_ms)) * np.exp(-te_ms / t2_ms)


def null_inversion_ms(t1_ms: float, tr_ms: float) -> float:
    """Inversion time (ms) that nulls a tissue of the given T1: solves 1 - 2e^(-TI/T1) + e^(-TR/T1) = 0."""
    return float(t1_ms * np.log(2.0 / (1.0 + np.exp(-tr_ms / t1_ms))))


_FLAIR_TR_MS = 9000.0
SEQUENCES: dict[str, Sequence] = {
    "t1": Sequence(repetition_ms=500.0, echo_ms=15.0),
    "t1ce": Sequence(repetition_ms=500.0, echo_ms=15.0, post_contrast=True),
    "t2": Sequence(repetition_ms=4000.0, echo_ms=100.0),
    "pd": Sequence(repetition_ms=5000.0, echo_ms=15.0),
    # FLAIR nulls CSF, which is why it is dark there while oedema stays bright.
    "flair": Sequence(
        repetition_ms=_FLAIR_TR_MS,
        echo_ms=120.0,
        inversion_ms=null_inversion_ms(TISSUES["csf"].t1_ms, _FLAIR_TR_MS),
    ),
}


def tissue_signal(tissue: Tissue, sequence: Sequence) -> float:
    """Relative signal (>= 0) of a pure voxel of `tissue` under `sequence`."""
    t1_ms = tissue.t1_post_contrast_ms if sequence.post_contrast else tissue.t1_ms
    if sequence.inversion_ms is None:
        return float(
            spin_echo(tissue.pd, t1_ms, tissue.t2_ms, tr_ms=sequence.repetition_ms, te_ms=sequence.echo_ms)
        )
    return float(
        inversion_recovery(
            tissue.pd,
            t1_ms,
            tissue.t2_ms,
            tr_ms=sequence.repetition_ms,
            te_ms=sequence.echo_ms,
            ti_ms=sequence.inversion_ms,
        )
    )


def signal_table(tissue_names: list[str], modality_names: list[str]) -> np.ndarray:
    """float64 [len(modality_names), len(tissue_names)]: pure-tissue signal per contrast and tissue."""
    return np.array(
        [[tissue_signal(TISSUES[t], SEQUENCES[m]) for t in tissue_names] for m in modality_names],
        dtype=np.float64,
    )
