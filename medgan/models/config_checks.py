"""The checks of config values, shared by the model configs and the config tree; both raise the project's one
``ConfigError`` (``data_prep.errors``, a UserError the command lines catch)."""

from __future__ import annotations

from typing import Any

from data_prep.errors import ConfigError


def require(condition: bool, key: str, message: str) -> None:
    """Raise ``ConfigError("key: message")`` unless ``condition``."""
    if not condition:
        raise ConfigError(f"{key}: {message}")


def require_choice(value: Any, key: str, choices: tuple[str, ...]) -> None:
    require(value in choices, key, f"{value!r} is not one of {', '.join(choices)}")
