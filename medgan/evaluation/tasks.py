"""The (inputs -> target) tasks an evaluation scores: what the flags name, what the model was trained on,
or every subset of the other contrasts (``--all-subsets``)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from data_prep.errors import UserError
from data_prep.volumes import canonical_modality
from medgan.inference.loading import LoadedGenerator


class EvaluationError(UserError):
    """The data or flags a user gave cannot be evaluated; the one-line message names them."""


@dataclass(frozen=True, slots=True)
class Task:
    """One synthesis task: the contrasts shown to the model and the one it synthesizes."""

    inputs: tuple[str, ...]
    target: str

    @property
    def name(self) -> str:
        return f"{'+'.join(self.inputs)}->{self.target}"

    @property
    def folder_name(self) -> str:
        """The name without characters some file systems refuse (``>``)."""
        return f"{'+'.join(self.inputs)}_to_{self.target}"


def tasks_to_evaluate(
    generator: LoadedGenerator,
    available: list[str],
    inputs: list[str] | None = None,
    target: str | None = None,
    all_subsets: bool = False,
) -> list[Task]:
    """The tasks to score: the one the flags name; else the one the model was trained on; else (a model
    trained for every task) each contrast of the data as target from all the others.

    all_subsets: every non-empty subset of the other contrasts for every target (for BraTS's four
    contrasts 4 x 7 = 28 tasks); only for a model trained with ``target_modality: any``.
    """
    if all_subsets:
        return _every_subset_task(generator, available, target)
    inputs = [canonical_modality(m) for m in inputs or []]
    target = canonical_modality(target) if target and target != "any" else None
    if inputs and not target:
        raise EvaluationError("--input_modalities needs --target_modality")
    if target is None and generator.trained_target != "any":
        target = generator.trained_target
    targets = [target] if target else [m for m in available if m in generator.modalities]
    tasks = []
    for name in targets:
        chosen = inputs or generator.trained_inputs or [m for m in available if m != name]
        reason = generator.serves(chosen, name)
        if reason:
            raise EvaluationError(reason)
        if name not in available:
            raise EvaluationError(f"--target_modality {name}: the data has no {name} ({' '.join(available)})")
        missing = [m for m in chosen if m not in available]
        if missing:
            raise EvaluationError(f"input {' '.join(missing)}: the data has no such contrast")
        if chosen:
            tasks.append(Task(tuple(chosen), name))
    if not tasks:
        raise EvaluationError(
            f"no task to evaluate: the data has only {' '.join(available) or 'no contrast'}"
        )
    return tasks


def _every_subset_task(generator: LoadedGenerator, available: list[str], target: str | None) -> list[Task]:
    """Every (non-empty subset of the others -> target) task, targets in the data's order, subsets by
    size then in the data's order (``--target_modality`` keeps one target's row of the matrix)."""
    if generator.trained_target != "any" or generator.trained_inputs:
        trained = (
            f"{' '.join(generator.trained_inputs) or 'every other contrast'} -> {generator.trained_target}"
        )
        raise EvaluationError(
            f"--all-subsets needs a model trained with target_modality: any (this one: {trained})"
        )
    contrasts = [m for m in available if m in generator.modalities]
    targets = [canonical_modality(target)] if target and target != "any" else contrasts
    tasks = []
    for name in targets:
        if name not in contrasts:
            raise EvaluationError(f"--target_modality {name}: the data has no {name} ({' '.join(contrasts)})")
        others = [m for m in contrasts if m != name]
        for size in range(1, len(others) + 1):
            tasks.extend(Task(subset, name) for subset in itertools.combinations(others, size))
    if not tasks:
        raise EvaluationError(
            f"no task to evaluate: the data has only {' '.join(contrasts) or 'no contrast'}"
        )
    return tasks
