"""The two rules for numbers that travel as JSON (which has no NaN or infinity): one owner for each."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["finite_or_none", "none_if_nan"]


def none_if_nan(value: Any) -> Any:
    """None for a float NaN, else the value unchanged."""
    return None if isinstance(value, float) and math.isnan(value) else value


def finite_or_none(value: Any) -> float | None:
    """A finite number as a float, else None (booleans are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None
