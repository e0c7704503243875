"""Evaluation metrics for the LLNM task: one implementation for every site, every round and every baseline.

Why one module: the consortium compares federated, pooled and local-only models against each other and
against the LLNM-Net paper (Shen et al. 2025, Fig. 3a). Those comparisons are only meaningful when every
number comes from the same definitions, the same threshold convention and the same bootstrap. The definitions
are written out in `docs/metrics.md`; in short:

* A patient is predicted positive when ``score >= threshold`` (0.5 by default, as in the paper).
* Values that are undefined for the data at hand (AUC with one class, PPV with no positive prediction,
  anything with no patient) are ``None`` so that results serialise to JSON ``null``; they are never NaN.
* Confidence intervals are bootstrap percentile intervals over patients (n-out-of-n resampling), computed for
  all resamples at once from resample counts, so 1000 resamples of 24k patients take about a second.
* Federated pooled metrics are computed from per-site score histograms (`score_histogram`), never from
  per-patient rows; `metrics_from_histograms` states how exact that is.

Scores: AUC and the threshold metrics are defined for any finite real score (AUC only uses the order of the
scores), so a model emitting logits can still be ranked. Brier score, ECE, the calibration curve, the decision
curve and the histograms need probabilities: `binary_metrics` returns ``None`` for Brier/ECE when any score is
outside [0, 1] (and counts them in ``n_scores_outside_0_1``); the other functions raise ``ValueError``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from sklearn.calibration import calibration_curve
from sklearn.metrics import brier_score_loss, confusion_matrix, roc_auc_score

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "BOOTSTRAP_METRICS",
    "DEFAULT_HISTOGRAM_BINS",
    "ECE_BINS",
    "binary_metrics",
    "calibration_curve_data",
    "decision_curve",
    "dense_counts",
    "metrics_from_histograms",
    "metrics_table",
    "score_histogram",
]

#: Number of equal-width bins on [0, 1] used for the expected calibration error in `binary_metrics`.
ECE_BINS = 10
#: Default resolution of `score_histogram`: 1e-4 wide bins, so 0.5 and every multiple of 0.01 is a bin edge.
DEFAULT_HISTOGRAM_BINS = 10_000
#: Metrics for which `binary_metrics` reports bootstrap confidence intervals (``<name>_ci_low``/``_ci_high``).
BOOTSTRAP_METRICS = ("auc", "accuracy", "sensitivity", "specificity", "ppv", "npv", "f1")

# Upper bound on the number of (resample x patient) cells held in memory at once during the bootstrap.
_BOOTSTRAP_CELLS_PER_CHUNK = 4_000_000
# A histogram threshold closer than this to a bin edge is taken to be that edge (absorbs float drift such
# as np.arange(0.01, 0.99, 0.01)[5] == 0.060000000000000005).
_EDGE_TOLERANCE = 1e-9


# ----------------------------------------------------------------------------------------------------
# input validation
# ----------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------
# threshold metrics shared by the direct, bootstrap and histogram paths
# ----------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------------


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


def score_histogram(
    y: Sequence[float] | np.ndarray, score: Sequence[float] | np.ndarray, n_bins: int = DEFAULT_HISTOGRAM_BINS
) -> dict[str, Any]:
    """Per-class counts of scores quantised to ``n_bins`` equal bins of [0, 1]: what a site shares to pool.

    Bin k holds ``k/n_bins <= score < (k+1)/n_bins`` (the last bin also holds 1.0), the same ``>=`` convention
    as the decision threshold, so thresholds on bin edges give exact threshold metrics after pooling. The
    result is sparse and holds only ints and lists of ints (``n_bins``, ``pos_bins``, ``pos_counts``,
    ``neg_bins``, ``neg_counts``): it is valid JSON and a valid Flower ``MetricRecord`` as is.

    Privacy: no patient identifier or input leaves the site, but with fine bins and small sites the histogram
    is close to the list of (score, label) pairs; it is not differentially private (see docs/metrics.md).
    """
    if isinstance(n_bins, bool) or not isinstance(n_bins, int | np.integer) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    y_arr, s_arr = _pair(y, score, unit_interval=True)
    edges = np.arange(int(n_bins) + 1) / float(n_bins)
    bins = np.minimum(np.searchsorted(edges, s_arr, side="right") - 1, int(n_bins) - 1)
    out: dict[str, Any] = {"n_bins": int(n_bins)}
    for label, name in ((1, "pos"), (0, "neg")):
        idx, cnt = np.unique(bins[y_arr == label], return_counts=True)
        out[f"{name}_bins"] = [int(i) for i in idx]
        out[f"{name}_counts"] = [int(c) for c in cnt]
    return out


def dense_counts(hist: Mapping[str, Any], name: str, n_bins: int, where: str) -> np.ndarray:
    """Dense per-bin counts of one class (``name``: ``pos`` or ``neg``) of one site's `score_histogram`, validating
    what the site sent; ``where`` names the histogram in errors.

    A differentially private histogram (``"noisy": True``) holds each count plus Gaussian noise, rounded: a count
    may then be negative, and is kept so (clipping every cell at zero would add a positive bias to every empty
    bin, and to every sum of them)."""
    try:
        bins = np.asarray(hist[f"{name}_bins"])
        counts = np.asarray(hist[f"{name}_counts"])
    except KeyError as exc:
        raise ValueError(f"{where}: missing field {exc.args[0]!r}") from exc
    for field, arr in ((f"{name}_bins", bins), (f"{name}_counts", counts)):
        if arr.ndim != 1:
            raise ValueError(f"{where}: {field} must be a flat list of integers")
        integral = arr.dtype.kind in "iu" or (
            arr.dtype.kind == "f" and bool(np.all(np.isfinite(arr))) and bool(np.all(arr == np.round(arr)))
        )
        if arr.size and not integral:
            raise ValueError(f"{where}: {field} must contain integers only")
    if bins.size != counts.size:
        raise ValueError(f"{where}: {name}_bins has {bins.size} entries but {name}_counts has {counts.size}")
    bins = bins.astype(np.int64)
    counts = counts.astype(np.int64)
    if bins.size and (bins.min() < 0 or bins.max() >= n_bins):
        raise ValueError(f"{where}: {name}_bins must lie in 0..{n_bins - 1}")
    if counts.size and counts.min() < 0 and not hist.get("noisy"):
        raise ValueError(f"{where}: {name}_counts must not be negative")
    dense = np.zeros(n_bins, dtype=np.int64)
    np.add.at(dense, bins, counts)
    return dense


def metrics_from_histograms(hists: Sequence[Mapping[str, Any]], threshold: float = 0.5) -> dict[str, Any]:
    """Pooled metrics of several sites from their `score_histogram` outputs, without per-patient data.

    How exact it is (proved in docs/metrics.md, checked in tests):

    Histograms of different resolutions are merged on the greatest common divisor of their bin counts.

    Differentially private histograms (``"noisy": True``, `fl_client.privacy.evaluation`) are summed as they are,
    negative cells included, so the pooled counts are unbiased; the metrics are then estimates: the confusion
    counts are clipped at zero, the AUC to [0, 1], and ``auc_max_abs_error`` is None (``noisy`` says so).

    * Threshold metrics (accuracy, sensitivity, specificity, PPV, NPV, F1, tp/fp/tn/fn) are **exactly** those
      of the pooled patients, because the threshold must be a bin edge (0.5 and every multiple of 0.01 are
      edges with the default 10,000 bins; a threshold within 1e-9 of an edge is taken as that edge, anything
      else is a ``ValueError``). The threshold must be below 1: the last bin is closed at 1.0.
    * The AUC is the exact Mann-Whitney statistic of the binned scores, ties within a bin counting 1/2. Pairs
      in different bins are ordered as by the raw scores, so only positive-negative pairs sharing a bin can
      differ, each by at most 1/2: ``|AUC_binned - AUC_raw| <= auc_max_abs_error =
      (sum_b pos_b * neg_b) / (2 * n_pos * n_neg)``, which is returned with the result.
    """
    if not hists:
        raise ValueError("metrics_from_histograms needs at least one site histogram")
    resolutions: list[int] = []
    for i, h in enumerate(hists):
        if not isinstance(h, Mapping) or "n_bins" not in h:
            raise ValueError(f"histogram {i}: not a score_histogram result (no 'n_bins')")
        resolutions.append(int(h["n_bins"]))
    if min(resolutions) < 1:
        raise ValueError(f"n_bins must be a positive integer, got {min(resolutions)}")
    # Sites may cap their resolution differently (node config max-histogram-bins): merge on the finest grid
    # all of them refine, whose bins are exact unions of every site's bins.
    n_bins = math.gcd(*resolutions)

    pos = np.zeros(n_bins, dtype=np.int64)
    neg = np.zeros(n_bins, dtype=np.int64)
    for i, (h, own) in enumerate(zip(hists, resolutions, strict=True)):
        pos += dense_counts(h, "pos", own, f"histogram {i}").reshape(n_bins, own // n_bins).sum(axis=1)
        neg += dense_counts(h, "neg", own, f"histogram {i}").reshape(n_bins, own // n_bins).sum(axis=1)

    t = _threshold(threshold)
    edges = np.arange(n_bins + 1) / float(n_bins)
    m = int(np.argmin(np.abs(edges - t)))
    if abs(edges[m] - t) > _EDGE_TOLERANCE or m == n_bins:
        raise ValueError(
            f"threshold {t!r} is not a bin edge below 1 of a {n_bins}-bin histogram (edges are k/{n_bins}); "
            "threshold metrics would not be exact"
        )
    noisy = any(bool(h.get("noisy")) for h in hists)
    tp, fn = max(int(pos[m:].sum()), 0), max(int(pos[:m].sum()), 0)
    fp, tn = max(int(neg[m:].sum()), 0), max(int(neg[:m].sum()), 0)
    n_pos, n_neg = tp + fn, fp + tn
    n = n_pos + n_neg

    auc = auc_err = None
    if n_pos and n_neg:
        twice_u, _, _ = _binned_auc(pos, neg)
        if noisy:
            # With noise, the AUC's own denominator is the product of the noisy class totals.
            tot_pos, tot_neg = float(pos.sum()), float(neg.sum())
            if tot_pos > 0 and tot_neg > 0:
                auc = min(max(float(twice_u) / (2.0 * tot_pos * tot_neg), 0.0), 1.0)
        else:
            auc = float(twice_u) / (2.0 * n_pos * n_neg)
            auc_err = float(np.dot(pos, neg)) / (2.0 * n_pos * n_neg)
    result: dict[str, Any] = {
        "n": n,
        "n_pos": n_pos,
        "prevalence": _ratio(n_pos, n),
        "threshold": float(edges[m]),
        "auc": auc,
        "auc_max_abs_error": auc_err,
    }
    result.update(_threshold_metrics(tp, fp, tn, fn))
    result.update(tp=tp, fp=fp, tn=tn, fn=fn, n_sites=len(hists), n_bins=n_bins)
    if noisy:
        result["noisy"] = True
    return result


def metrics_table(
    df: pd.DataFrame,
    label_col: str,
    score_col: str,
    group_col: str | None = None,
    threshold: float = 0.5,
    n_bootstrap: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
) -> dict[str, dict[str, Any]]:
    """`binary_metrics` per group of a table (all rows under ``"all"`` when ``group_col`` is None).

    Groups keep their order of first appearance; keys are ``str(group value)``. Every group is bootstrapped
    with the same ``seed``, so a group's result does not depend on which other groups are in the table.
    """
    needed = [c for c in (label_col, score_col, group_col) if c is not None]
    missing = [c for c in needed if c not in df.columns]
    if missing:
        available = ", ".join(map(str, df.columns))
        names = ", ".join(map(repr, missing))
        raise ValueError(f"column(s) {names} not in the table; available: {available}")

    def one(part: pd.DataFrame, where: str) -> dict[str, Any]:
        try:
            return binary_metrics(
                part[label_col].to_numpy(),
                part[score_col].to_numpy(),
                threshold=threshold,
                n_bootstrap=n_bootstrap,
                ci=ci,
                seed=seed,
            )
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from exc

    if group_col is None:
        return {"all": one(df, "all rows")}
    if df[group_col].isna().any():
        first = df.index[df[group_col].isna()][0]
        raise ValueError(f"group column {group_col!r} is empty at index {first!r}")
    return {str(key): one(part, f"group {key!r}") for key, part in df.groupby(group_col, sort=False, dropna=False)}
