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

This module is the API; the definitions live in `checks` (validation, confusion counts), `binary`
(`binary_metrics` and its bootstrap), `curves`, `histograms` and `tables`.

Scores: AUC and the threshold metrics are defined for any finite real score (AUC only uses the order of the
scores), so a model emitting logits can still be ranked. Brier score, ECE, the calibration curve, the decision
curve and the histograms need probabilities: `binary_metrics` returns ``None`` for Brier/ECE when any score is
outside [0, 1] (and counts them in ``n_scores_outside_0_1``); the other functions raise ``ValueError``.
"""

from __future__ import annotations

from shared_model.evaluation.binary import BOOTSTRAP_METRICS, ECE_BINS, binary_metrics
from shared_model.evaluation.curves import calibration_curve_data, decision_curve, histogram_curves
from shared_model.evaluation.histograms import (
    DEFAULT_HISTOGRAM_BINS,
    dense_counts,
    metrics_from_histograms,
    score_histogram,
)
from shared_model.evaluation.tables import metrics_table

__all__ = [
    "BOOTSTRAP_METRICS",
    "DEFAULT_HISTOGRAM_BINS",
    "ECE_BINS",
    "binary_metrics",
    "calibration_curve_data",
    "decision_curve",
    "dense_counts",
    "histogram_curves",
    "metrics_from_histograms",
    "metrics_table",
    "score_histogram",
]
