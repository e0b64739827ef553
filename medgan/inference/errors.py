"""The error a user can cause at inference, shared by synthesis, its spread and its folder mode."""

from __future__ import annotations

from data_prep.errors import UserError


class SynthesisError(UserError):
    """An input a user gave cannot be synthesized from; the one-line message names it and why."""
