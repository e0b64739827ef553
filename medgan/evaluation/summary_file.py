"""``summary.json``: the evaluation folder's headline file, written by both protocols, read by the report."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

SUMMARY = "summary.json"


def json_safe(value: Any) -> Any:
    """NaN and infinities become null: JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def write_summary(out: Path, summary: dict[str, Any]) -> Path:
    """Write ``out/summary.json`` (NaN as null) and return its path."""
    path = Path(out) / SUMMARY
    path.write_text(json.dumps(json_safe(summary), indent=2) + "\n")
    return path
