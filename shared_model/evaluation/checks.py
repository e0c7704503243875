"""The one validation of what evaluation takes (labels 0/1, finite scores, a threshold), and the confusion
counts every path (direct, bootstrap, histogram) turns into metrics; `none_if_nan` and `finite_or_none` for
values that travel as JSON."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def _as_1d_float(values: Any, name: str) -> np.ndarray:
    """Convert to a 1-D float64 array, with an error naming the argument when that is impossible."""
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}: values must be numbers ({exc})") from exc
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D sequence, got an array of shape {arr.shape}")
    return arr


def _labels(values: Any, name: str = "y_true") -> np.ndarray:
    """Validate binary labels (0/1, bool accepted) and return them as an int64 array."""
    raw = np.asarray(values)
    numeric = (int, float, np.number)
    if raw.dtype.kind in "USO" and any(not isinstance(v, numeric) for v in raw.flat):
        first = next(v for v in raw.flat if not isinstance(v, numeric))
        first = first.item() if isinstance(first, np.generic) else first
        raise ValueError(f"{name}: labels must be the numbers 0 or 1, got {first!r} ({type(first).__name__})")
    arr = _as_1d_float(raw, name)
    bad = np.flatnonzero(~np.isin(arr, (0.0, 1.0)))
    if bad.size:
        i = int(bad[0])
        more = f" (and {bad.size - 1} more)" if bad.size > 1 else ""
        raise ValueError(f"{name}[{i}] = {float(arr[i])!r}: labels must be 0 or 1{more}")
    return arr.astype(np.int64)


def _scores(values: Any, name: str = "y_score", *, unit_interval: bool = False) -> np.ndarray:
    """Validate scores: finite numbers, and within [0, 1] when the caller needs probabilities."""
    arr = _as_1d_float(values, name)
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        i = int(bad[0])
        more = f" (and {bad.size - 1} more)" if bad.size > 1 else ""
        raise ValueError(f"{name}[{i}] = {float(arr[i])!r}: scores must be finite numbers{more}")
    if unit_interval:
        bad = np.flatnonzero((arr < 0.0) | (arr > 1.0))
        if bad.size:
            i = int(bad[0])
            more = f" (and {bad.size - 1} more)" if bad.size > 1 else ""
            raise ValueError(
                f"{name}[{i}] = {float(arr[i])!r}: this needs probabilities, scores must lie in [0, 1]{more}"
            )
    return arr


def _pair(y: Any, score: Any, *, unit_interval: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Validate a (labels, scores) pair of equal length."""
    y_arr = _labels(y)
    s_arr = _scores(score, unit_interval=unit_interval)
    if y_arr.shape != s_arr.shape:
        raise ValueError(f"y_true has {y_arr.size} values but y_score has {s_arr.size}: they must be paired")
    return y_arr, s_arr


def _threshold(value: Any, name: str = "threshold") -> float:
    try:
        t = float(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a number, got {value!r}") from exc
    if not math.isfinite(t):
        raise ValueError(f"{name} must be finite, got {t!r}")
    return t


def _ratio(num: float, den: float) -> float | None:
    """num/den as a Python float, or None where the ratio is undefined (den == 0)."""
    return float(num) / float(den) if den else None



def _threshold_metrics(tp: int, fp: int, tn: int, fn: int) -> dict[str, float | None]:
    """Accuracy, sensitivity, specificity, PPV, NPV and F1 from confusion counts (None where undefined)."""
    n = tp + fp + tn + fn
    return {
        "accuracy": _ratio(tp + tn, n),
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "ppv": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
    }


def _binned_auc(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mann-Whitney AUC from per-bin (or per-distinct-score) counts sorted by score, ties counting 1/2.

    ``pos`` and ``neg`` are integer arrays of shape ``(..., n_bins)``. Returns ``(twice_u, n_pos, n_neg)``
    with ``AUC = twice_u / (2 n_pos n_neg)``; all stays in exact integer arithmetic until that division.
    """
    neg_below = np.cumsum(neg, axis=-1) - neg
    twice_u = (pos * (2 * neg_below + neg)).sum(axis=-1)
    return twice_u, pos.sum(axis=-1), neg.sum(axis=-1)
