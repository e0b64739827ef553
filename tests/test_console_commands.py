"""The installed ``medgan`` and ``medgan-prep`` commands (pyproject's [project.scripts]) answer ``--help``
for every subcommand, as ``python -m medgan`` and ``python -m data_prep`` do."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
COMMANDS = [
    ("medgan", [], "evaluate,synthesize,export,report"),
    ("medgan", ["evaluate"], "--protocol"),
    ("medgan", ["synthesize"], "--spread"),
    ("medgan", ["export"], "G.safetensors"),
    ("medgan", ["report"], "--eval"),
    ("medgan-prep", [], "phantom,shard,verify"),
    ("medgan-prep", ["phantom"], "--missing-rate"),
    ("medgan-prep", ["shard"], "--split-file"),
    ("medgan-prep", ["verify"], "DIR"),
]


@pytest.mark.parametrize(("command", "subcommand", "expected"), COMMANDS)
def test_installed_command_answers_help(command, subcommand, expected):
    installed = shutil.which(command, path=str(BIN))
    assert installed, f"{command} is not installed in {BIN}: pip install -e . writes it"
    result = subprocess.run([installed, *subcommand, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    usage = result.stdout.splitlines()[0]
    assert usage.startswith(f"usage: {' '.join([command, *subcommand])} "), usage
    assert expected in result.stdout


def test_medgan_help_names_the_seed_front_door():
    result = subprocess.run([str(BIN / "medgan"), "--help"], capture_output=True, text=True, timeout=120)
    assert "--mode {train,test,both}" in result.stdout


def test_python_m_spelling_keeps_its_own_name():
    result = subprocess.run(
        [sys.executable, "-m", "medgan", "synthesize", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.stdout.startswith("usage: python -m medgan synthesize ")
