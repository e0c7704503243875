"""Score histograms: what a site shares so that the coordinator pools metrics exactly (`score_histogram`,
`dense_counts`, `metrics_from_histograms`; docs/metrics.md proves how exact)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from shared_model.evaluation.checks import _binned_auc, _pair, _ratio, _threshold, _threshold_metrics

#: Default resolution of `score_histogram`: 1e-4 wide bins, so 0.5 and every multiple of 0.01 is a bin edge.
DEFAULT_HISTOGRAM_BINS = 10_000
# A histogram threshold closer than this to a bin edge is taken to be that edge (absorbs float drift such
# as np.arange(0.01, 0.99, 0.01)[5] == 0.060000000000000005).
_EDGE_TOLERANCE = 1e-9


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
