"""Patient-level train / val / test splits, written and read in nnU-Net's splits_final.json style.

The file is a list of folds, each a dict of split name -> subject ids; we write one fold with
"train", "val" and "test". Reading accepts our file or nnU-Net's own (5 folds of "train"/"val": fold 0
is used). Patients never cross splits: all timepoints of one BraTS 2023+ patient go together.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from data_prep.errors import UserError

SPLITS = ("train", "val", "test")
SPLIT_FILE_NAME = "splits_final.json"


def check_fractions(fractions) -> tuple[float, float, float]:
    """(train, val, test) fractions, each in [0, 1], summing to 1 (within 1e-6); UserError otherwise."""
    values = tuple(float(value) for value in fractions)
    shown = " ".join(f"{value:g}" for value in values)
    if len(values) != len(SPLITS):
        raise UserError(f"--split {shown}: expected three fractions (train val test)")
    if any(not 0.0 <= value <= 1.0 for value in values):
        raise UserError(f"--split {shown}: each fraction must be in [0, 1]")
    if abs(sum(values) - 1.0) > 1e-6:
        raise UserError(f"--split {shown}: fractions must sum to 1 (they sum to {sum(values):g})")
    if values[0] == 0.0:
        raise UserError(f"--split {shown}: the train fraction must be > 0")
    return values


def split_by_patient(patients: dict[str, str], fractions, seed: int) -> dict[str, str]:
    """Assign each subject a split so that no patient spans two splits.

    patients: subject id -> patient id. fractions: (train, val, test), see `check_fractions`.
    Patients are shuffled with `seed`; val and test get round(fraction * patients) patients, but at
    least one each when their fraction is > 0 and there are enough patients for train to keep one.
    Returns subject id -> "train" | "val" | "test"; the same inputs always give the same split.
    """
    train_fraction, val_fraction, test_fraction = check_fractions(fractions)
    unique = sorted(set(patients.values()))
    order = [unique[i] for i in np.random.default_rng(seed).permutation(len(unique))]
    count = len(order)
    n_val, n_test = round(val_fraction * count), round(test_fraction * count)
    if val_fraction > 0 and n_val == 0 and count - n_test >= 2:
        n_val = 1
    if test_fraction > 0 and n_test == 0 and count - n_val >= 2:
        n_test = 1
    while n_val + n_test > count - 1 and n_val + n_test > 0:
        if n_val >= n_test:
            n_val -= 1
        else:
            n_test -= 1
    split_of_patient = {}
    for index, patient in enumerate(order):
        split_of_patient[patient] = "test" if index < n_test else "val" if index < n_test + n_val else "train"
    return {subject: split_of_patient[patient] for subject, patient in patients.items()}


def check_patients_disjoint(assignment: dict[str, str], patients: dict[str, str]) -> None:
    """UserError naming the first patient whose subjects sit in more than one split."""
    seen: dict[str, tuple[str, str]] = {}
    for subject in sorted(assignment):
        patient = patients.get(subject, subject)
        split = assignment[subject]
        if patient in seen and seen[patient][1] != split:
            other, other_split = seen[patient]
            raise UserError(
                f"patient {patient} is in two splits: {other} in {other_split}, {subject} in {split} "
                "(timepoints of one patient must stay together)"
            )
        seen.setdefault(patient, (subject, split))


def write_split_file(path: Path, assignment: dict[str, str]) -> None:
    """Write `assignment` (subject -> split) as a one-fold splits_final.json (sorted ids)."""
    fold = {split: sorted(s for s, chosen in assignment.items() if chosen == split) for split in SPLITS}
    Path(path).write_text(json.dumps([fold], indent=2) + "\n")


def read_split_file(path: Path) -> dict[str, str]:
    """subject -> split from a splits_final.json (fold 0 of a list, or a single dict of split -> ids)."""
    path = Path(path)
    try:
        content = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"--split-file {path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"--split-file {path}: not a readable JSON file ({error})") from None
    fold = content[0] if isinstance(content, list) and content else content
    if not isinstance(fold, dict) or not fold:
        raise UserError(f"--split-file {path}: expected a list of folds, each a dict of split -> subject ids")
    unknown = set(fold) - set(SPLITS)
    if unknown:
        raise UserError(
            f"--split-file {path}: unknown split {sorted(unknown)[0]!r} (expected train, val, test)"
        )
    assignment: dict[str, str] = {}
    for split, subjects in fold.items():
        if not isinstance(subjects, list) or not all(isinstance(s, str) for s in subjects):
            raise UserError(f"--split-file {path}: {split!r} must be a list of subject ids")
        for subject in subjects:
            if subject in assignment and assignment[subject] != split:
                raise UserError(
                    f"--split-file {path}: {subject} is in both {assignment[subject]} and {split}"
                )
            assignment[subject] = split
    return assignment
