"""The packages by stage import only the stages before them (DESIGN.md's layout), lazy imports included:
data_prep <- medgan.models <- the shared modules <- training, inference <- evaluation <- cli."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import REPO

STAGES = ("training", "inference", "evaluation", "cli")
# what each part may import of medgan besides the shared top-level modules and medgan.models
ALLOWED_STAGES = {
    "models": set(),
    "shared": set(),
    "training": set(),
    "inference": set(),
    "evaluation": {"inference"},
    "cli": set(STAGES),
}


def part_of(module: str) -> str:
    """``data_prep``, ``models``, a stage's name, or ``shared`` for medgan's top-level modules."""
    names = module.split(".")
    if names[0] == "data_prep":
        return "data_prep"
    if len(names) > 1 and names[1] in ("models", *STAGES):
        return names[1]
    return "__main__" if names[-1] == "__main__" else "shared"


def imported_modules(path: Path) -> set[str]:
    """Every medgan or data_prep module ``path`` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name.split(".")[0] in ("medgan", "data_prep")}


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts)


def sources() -> list[Path]:
    return sorted([*(REPO / "medgan").rglob("*.py"), *(REPO / "data_prep").rglob("*.py")])


def crossing(path: Path) -> list[str]:
    """The imports of ``path`` that reach a later stage, each as 'importer -> imported'."""
    importer = module_name(path)
    part = part_of(importer)
    wrong = []
    for imported in sorted(imported_modules(path)):
        target = part_of(imported)
        if part == "data_prep":
            allowed = target == "data_prep"
        elif part == "__main__" or target in ("data_prep", "models", part):
            allowed = True
        elif target == "shared":
            allowed = part != "models"
        else:
            allowed = target in ALLOWED_STAGES[part]
        if part == "evaluation" and imported.startswith("medgan.evaluation.report"):
            allowed = importer == "medgan.evaluation.report"
        if not allowed:
            wrong.append(f"{importer} -> {imported}")
    return wrong


def test_no_module_imports_a_stage_after_its_own():
    wrong = [line for path in sources() for line in crossing(path)]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize(
    ("importer", "imported", "allowed"),
    [
        ("medgan/training/trainer.py", "medgan.inference.loading", False),
        ("medgan/inference/synthesis.py", "medgan.training.loader", False),
        ("medgan/evaluation/default_protocol.py", "medgan.evaluation.report", False),
        ("medgan/evaluation/default_protocol.py", "medgan.inference.synthesis", True),
        ("medgan/checkpointing.py", "medgan.training.trainer", False),
        ("medgan/models/generator.py", "medgan.config", False),
        ("data_prep/verify.py", "medgan.shards", False),
        ("medgan/cli/evaluate.py", "medgan.evaluation.report", True),
    ],
)
def test_the_rule_catches_an_import_against_the_order(importer, imported, allowed, monkeypatch):
    fake = REPO / importer
    monkeypatch.setattr(Path, "read_text", lambda self: f"import {imported}\n" if self == fake else "")
    assert (crossing(fake) == []) == allowed
