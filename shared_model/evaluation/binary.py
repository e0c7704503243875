"""`binary_metrics`: every metric of one set of patients with its bootstrap interval (docs/metrics.md)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import brier_score_loss, confusion_matrix, roc_auc_score

from shared_model.evaluation.checks import _binned_auc, _pair, _ratio, _threshold, _threshold_metrics
from shared_model.evaluation.curves import calibration_curve_data

#: Number of equal-width bins on [0, 1] used for the expected calibration error in `binary_metrics`.
ECE_BINS = 10
#: Metrics for which `binary_metrics` reports bootstrap confidence intervals (``<name>_ci_low``/``_ci_high``).
BOOTSTRAP_METRICS = ("auc", "accuracy", "sensitivity", "specificity", "ppv", "npv", "f1")

# Upper bound on the number of (resample x patient) cells held in memory at once during the bootstrap.
_BOOTSTRAP_CELLS_PER_CHUNK = 4_000_000


def _resample_stats(
    pos_sorted: np.ndarray, pred_sorted: np.ndarray, group_starts: np.ndarray | None, counts: np.ndarray
) -> dict[str, np.ndarray]:
    """Metrics of many weighted resamples at once.

    ``counts[b, i]`` is how often patient ``i`` (patients sorted by score) occurs in resample ``b``. Patients
    with equal scores form one group (``group_starts`` indexes the first of each group; None when all scores
    differ) so ties count 1/2 exactly as in `roc_auc_score`. Returns float arrays of length ``B`` with NaN
    where the metric is undefined for that resample (the caller skips those resamples).
    """
    cpos = counts * pos_sorted
    cneg = counts - cpos
    if group_starts is None:
        gpos, gneg = cpos, cneg
    else:
        gpos = np.add.reduceat(cpos, group_starts, axis=1)
        gneg = np.add.reduceat(cneg, group_starts, axis=1)
    twice_u, n_pos, n_neg = _binned_auc(gpos, gneg)
    tp = cpos @ pred_sorted
    fp = cneg @ pred_sorted
    fn = n_pos - tp
    tn = n_neg - fp
    with np.errstate(divide="ignore", invalid="ignore"):
        return {
            "auc": np.where((n_pos > 0) & (n_neg > 0), twice_u / (2.0 * n_pos * n_neg), np.nan),
            "accuracy": (tp + tn) / (n_pos + n_neg),
            "sensitivity": tp / n_pos,
            "specificity": tn / n_neg,
            "ppv": tp / (tp + fp),
            "npv": tn / (tn + fn),
            "f1": 2 * tp / (2 * tp + fp + fn),
        }


def _bootstrap_intervals(
    y: np.ndarray, score: np.ndarray, pred: np.ndarray, *, n_bootstrap: int, ci: float, seed: int
) -> dict[str, tuple[float | None, float | None]]:
    """Percentile bootstrap intervals of `BOOTSTRAP_METRICS`, n-out-of-n resampling of patients.

    All resamples are evaluated from count matrices (see `_resample_stats`) instead of re-sorting each
    resample, which is what makes 1000 resamples of tens of thousands of patients take about a second.
    Resamples in which a metric is undefined (e.g. only one class for the AUC) are skipped for that metric.
    """
    n = y.size
    order = np.argsort(score, kind="stable")
    s_sorted = score[order]
    pos_sorted = y[order]
    pred_sorted = pred[order].astype(np.int64)
    starts = np.flatnonzero(np.r_[True, s_sorted[1:] != s_sorted[:-1]])
    group_starts = starts if starts.size < n else None

    rng = np.random.default_rng(seed)
    chunk = max(1, min(n_bootstrap, _BOOTSTRAP_CELLS_PER_CHUNK // n))
    values: dict[str, list[np.ndarray]] = {k: [] for k in BOOTSTRAP_METRICS}
    done = 0
    while done < n_bootstrap:
        b = min(chunk, n_bootstrap - done)
        idx = rng.integers(0, n, size=(b, n))
        idx += (np.arange(b) * n)[:, None]
        counts = np.bincount(idx.ravel(), minlength=b * n).reshape(b, n)
        for k, v in _resample_stats(pos_sorted, pred_sorted, group_starts, counts).items():
            values[k].append(v)
        done += b

    lo_q, hi_q = 100.0 * (1.0 - ci) / 2.0, 100.0 * (1.0 + ci) / 2.0
    out: dict[str, tuple[float | None, float | None]] = {}
    for k in BOOTSTRAP_METRICS:
        v = np.concatenate(values[k])
        v = v[np.isfinite(v)]
        if v.size == 0:
            out[k] = (None, None)
        else:
            lo, hi = np.percentile(v, [lo_q, hi_q])
            out[k] = (float(lo), float(hi))
    return out



def binary_metrics(
    y_true: Sequence[float] | np.ndarray,
    y_score: Sequence[float] | np.ndarray,
    *,
    threshold: float = 0.5,
    n_bootstrap: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """All evaluation metrics of one set of patients, as a JSON-ready dict.

    Keys: ``n, n_pos, prevalence, threshold, auc, auc_ci_low, auc_ci_high, accuracy, sensitivity, specificity,
    ppv, npv, f1`` (each threshold metric also with ``_ci_low``/``_ci_high``), ``brier, ece, tp, fp, tn, fn,
    n_scores_outside_0_1, ci_level, n_bootstrap``. A patient is positive when ``score >= threshold``.

    Undefined values are None: e.g. the AUC (and its interval) with only one class, PPV without positive
    predictions, Brier/ECE when a score is outside [0, 1] (AUC and threshold metrics stay defined for any real
    score). ``ci`` is the central coverage of the percentile interval (0.95 -> 2.5th and 97.5th percentiles);
    ``n_bootstrap=0`` skips the bootstrap (intervals None). Labels must be 0/1 and scores finite, else
    ``ValueError`` naming the first offending position.
    """
    y, s = _pair(y_true, y_score)
    t = _threshold(threshold)
    if isinstance(n_bootstrap, bool) or not isinstance(n_bootstrap, int | np.integer) or n_bootstrap < 0:
        raise ValueError(f"n_bootstrap must be a non-negative integer, got {n_bootstrap!r}")
    ci = _threshold(ci, "ci")
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci must be strictly between 0 and 1 (e.g. 0.95), got {ci!r}")

    n = int(y.size)
    n_pos = int(y.sum())
    pred = s >= t
    if n:
        tn, fp, fn, tp = (int(c) for c in confusion_matrix(y, pred.astype(np.int64), labels=[0, 1]).ravel())
    else:
        tn = fp = fn = tp = 0
    n_outside = int(np.count_nonzero((s < 0.0) | (s > 1.0)))
    probabilities = n > 0 and n_outside == 0

    auc = float(roc_auc_score(y, s)) if 0 < n_pos < n else None
    threshold_part = _threshold_metrics(tp, fp, tn, fn)
    intervals = (
        _bootstrap_intervals(y, s, pred, n_bootstrap=int(n_bootstrap), ci=ci, seed=seed)
        if n and n_bootstrap
        else {k: (None, None) for k in BOOTSTRAP_METRICS}
    )

    result: dict[str, Any] = {
        "n": n,
        "n_pos": n_pos,
        "prevalence": _ratio(n_pos, n),
        "threshold": t,
        "auc": auc,
        "auc_ci_low": intervals["auc"][0] if auc is not None else None,
        "auc_ci_high": intervals["auc"][1] if auc is not None else None,
    }
    for name, value in threshold_part.items():
        result[name] = value
        result[f"{name}_ci_low"] = intervals[name][0] if value is not None else None
        result[f"{name}_ci_high"] = intervals[name][1] if value is not None else None
    result["brier"] = float(brier_score_loss(y, s, pos_label=1)) if probabilities else None
    result["ece"] = calibration_curve_data(y, s, n_bins=ECE_BINS)["ece"] if probabilities else None
    result.update(tp=tp, fp=fp, tn=tn, fn=fn)
    result["n_scores_outside_0_1"] = n_outside
    result["ci_level"] = ci
    result["n_bootstrap"] = int(n_bootstrap)
    return result
