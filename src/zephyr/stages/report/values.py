"""Values read from a run's JSON files, accessed without raising: any of them may be absent or of another
type than expected (a partial run, a file written by an older version)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _get(data: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(data, Mapping):
            return None
        data = data.get(key)
    return data
