"""Calibration and decision curves: from patients' scores (`calibration_curve_data`, `decision_curve`) and from a
site's score histogram (`histogram_curves`, what the coordinator draws per site)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from sklearn.calibration import calibration_curve

from shared_model.evaluation.checks import _as_1d_float, _pair
from shared_model.evaluation.histograms import dense_counts


def calibration_curve_data(
    y: Sequence[float] | np.ndarray, score: Sequence[float] | np.ndarray, n_bins: int = 10
) -> dict[str, Any]:
    """Reliability-curve data on ``n_bins`` equal-width bins of [0, 1], plus the expected calibration error.

    Returns ``n_bins``, ``bin_edges`` (``n_bins + 1`` values), and per bin ``counts``, ``mean_predicted`` and
    ``observed_rate`` (None for empty bins, which scikit-learn's `calibration_curve` silently drops), and
    ``ece = sum_b (count_b / n) * |observed_rate_b - mean_predicted_b|`` (None when there is no patient).

    Binning follows scikit-learn's ``strategy="uniform"``: bin b holds ``edges[b] < score <= edges[b + 1]``,
    the first bin also holds 0. The per-bin means come from `sklearn.calibration.calibration_curve`; this
    function adds the counts and empty bins it does not return, and checks that the two binnings agree.
    """
    if isinstance(n_bins, bool) or not isinstance(n_bins, int | np.integer) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    y_arr, s_arr = _pair(y, score, unit_interval=True)
    edges = np.linspace(0.0, 1.0, int(n_bins) + 1)
    bin_ids = np.searchsorted(edges[1:-1], s_arr, side="left")
    counts = np.bincount(bin_ids, minlength=n_bins)
    mean_predicted: list[float | None] = [None] * n_bins
    observed_rate: list[float | None] = [None] * n_bins
    ece: float | None = None
    if y_arr.size:
        prob_true, prob_pred = calibration_curve(y_arr, s_arr, n_bins=n_bins, strategy="uniform")
        filled = np.flatnonzero(counts)
        if filled.size != prob_true.size:
            raise RuntimeError(
                "scikit-learn's calibration_curve binned the scores differently from this module "
                f"({prob_true.size} non-empty bins vs {filled.size}); the installed version changed its rule"
            )
        for b, p_true, p_pred in zip(filled, prob_true, prob_pred, strict=True):
            mean_predicted[b] = float(p_pred)
            observed_rate[b] = float(p_true)
        weights = counts[filled] / y_arr.size
        ece = float(np.sum(weights * np.abs(prob_true - prob_pred)))
    return {
        "n_bins": int(n_bins),
        "bin_edges": [float(e) for e in edges],
        "counts": [int(c) for c in counts],
        "mean_predicted": mean_predicted,
        "observed_rate": observed_rate,
        "ece": ece,
    }


def decision_curve(
    y: Sequence[float] | np.ndarray,
    score: Sequence[float] | np.ndarray,
    thresholds: Iterable[float] | np.ndarray | None = None,
) -> list[dict[str, Any]]:
    """Net benefit (Vickers & Elkin 2006) of the model, of treating everyone and of treating no one.

    At threshold probability ``pt`` the model treats patients with ``score >= pt``:
    ``NB_model = TP/n - FP/n * pt/(1 - pt)``, ``NB_all = prevalence - (1 - prevalence) * pt/(1 - pt)`` and
    ``NB_none = 0``. Default thresholds are 0.01, 0.02, ..., 0.98 (the values of
    ``np.arange(0.01, 0.99, 0.01)``, built as ``k / 100`` so that they carry no float drift).
    Scores must be probabilities in [0, 1]; thresholds must lie strictly between 0 and 1. With no patients the
    net benefits are None.
    """
    y_arr, s_arr = _pair(y, score, unit_interval=True)
    pts = np.arange(1, 99) / 100.0 if thresholds is None else _as_1d_float(list(thresholds), "thresholds")
    bad = np.flatnonzero(~((pts > 0.0) & (pts < 1.0)))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"thresholds[{i}] = {float(pts[i])!r}: thresholds must lie strictly in (0, 1)")

    n = y_arr.size
    n_pos = int(y_arr.sum())
    pos_scores = np.sort(s_arr[y_arr == 1])
    neg_scores = np.sort(s_arr[y_arr == 0])
    # number of scores >= pt in each class, for all thresholds at once
    tp = pos_scores.size - np.searchsorted(pos_scores, pts, side="left")
    fp = neg_scores.size - np.searchsorted(neg_scores, pts, side="left")
    rows: list[dict[str, Any]] = []
    for pt, tp_k, fp_k in zip(pts, tp, fp, strict=True):
        odds = pt / (1.0 - pt)
        rows.append(
            {
                "threshold": float(pt),
                "net_benefit_model": float(tp_k / n - fp_k / n * odds) if n else None,
                "net_benefit_treat_all": float(n_pos / n - (n - n_pos) / n * odds) if n else None,
                "net_benefit_treat_none": 0.0 if n else None,
                "tp": int(tp_k),
                "fp": int(fp_k),
            }
        )
    return rows


#: Calibration bins drawn from a histogram (its bins are merged into this many, when finer).
CALIBRATION_BINS = 10


def histogram_curves(hist: dict[str, Any]) -> dict[str, Any]:
    """ROC, calibration and decision-curve points of one site's score histogram."""
    k = int(hist["n_bins"])
    # A DP histogram's noisy counts may be negative: a curve shows them clipped at zero.
    pos = np.clip(dense_counts(hist, "pos", k, "score histogram").astype(float), 0, None)
    neg = np.clip(dense_counts(hist, "neg", k, "score histogram").astype(float), 0, None)
    n_pos, n_neg = pos.sum(), neg.sum()
    # Threshold at edge j/k: predicted positive when score >= j/k, i.e. bins j..k-1.
    tp = np.concatenate([np.cumsum(pos[::-1])[::-1], [0.0]])
    fp = np.concatenate([np.cumsum(neg[::-1])[::-1], [0.0]])
    thresholds = np.arange(k + 1) / k
    roc = {"fpr": (fp / n_neg).tolist() if n_neg else None, "tpr": (tp / n_pos).tolist() if n_pos else None}
    merge = k // CALIBRATION_BINS if k % CALIBRATION_BINS == 0 and k >= CALIBRATION_BINS else 1
    m = k // merge
    cal_pos = pos.reshape(m, merge).sum(axis=1)
    cal_all = cal_pos + neg.reshape(m, merge).sum(axis=1)
    calibration = {
        "mid_predicted": ((np.arange(m) + 0.5) / m).tolist(),
        "observed_rate": [float(p / a) if a else None for p, a in zip(cal_pos, cal_all, strict=True)],
        "counts": cal_all.astype(int).tolist(),
    }
    n = n_pos + n_neg
    decision = []
    for j in range(1, k):
        pt = thresholds[j]
        odds = pt / (1 - pt)
        decision.append({"threshold": float(pt),
                         "net_benefit_model": float(tp[j] / n - fp[j] / n * odds) if n else None,
                         "net_benefit_all": float(n_pos / n - n_neg / n * odds) if n else None})
    return {"roc": roc, "calibration": calibration, "decision": decision, "n": int(n), "n_pos": int(n_pos)}
