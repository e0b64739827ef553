"""The one table of modality names and their aliases, for data_prep and medgan (its models included).

Names are lower case ``t1 t1ce t2 flair pd``; BraTS 2023+ names (``t1n t1c t2w t2f``) and the common
``t1gd`` map onto them. This module imports nothing heavy (no nibabel, numpy or torch), so the torch-only
``medgan.models`` can use the very same table; ``data_prep.discovery`` and ``data_prep.volumes`` re-export it.
"""

from __future__ import annotations

from data_prep.errors import UserError

# The canonical, ordered modality list: a model's input channel i is MODALITIES[i] unless its config says
# otherwise.
MODALITIES: tuple[str, ...] = ("t1", "t1ce", "t2", "flair", "pd")
SEGMENTATION = "seg"
# BraTS 2023+ names, and the common "t1gd" (gadolinium) spelling of T1ce, for the canonical contrasts.
MODALITY_ALIASES: dict[str, str] = {"t1n": "t1", "t1c": "t1ce", "t1gd": "t1ce", "t2w": "t2", "t2f": "flair"}


def canonical_modality(name: str) -> str:
    """`name` stripped, lower-cased and mapped through MODALITY_ALIASES (``" T2F"`` -> ``"flair"``).

    Never raises: a name that is no modality comes back lower-cased (``"seg"``, ``"dwi"``), so callers can
    test it against MODALITIES; `normalise_modality` is the checking variant.
    """
    lowered = name.strip().lower()
    return MODALITY_ALIASES.get(lowered, lowered)


def normalise_modality(name: str) -> str:
    """`canonical_modality(name)`, one of MODALITIES; UserError naming `name` if it is none of them."""
    canonical = canonical_modality(name)
    if canonical not in MODALITIES:
        raise UserError(f"unknown modality {name!r}: expected one of {' '.join(MODALITIES)}")
    return canonical
