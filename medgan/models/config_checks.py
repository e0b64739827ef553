"""The one error type for bad config values, shared by the model configs and the config tree."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A config value or key a user wrote is wrong; the message is one line that names it."""


def require(condition: bool, key: str, message: str) -> None:
    """Raise ``ConfigError("key: message")`` unless ``condition``."""
    if not condition:
        raise ConfigError(f"{key}: {message}")


def require_choice(value: Any, key: str, choices: tuple[str, ...]) -> None:
    require(value in choices, key, f"{value!r} is not one of {', '.join(choices)}")
