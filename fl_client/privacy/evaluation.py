"""Differentially private evaluation replies: noisy score histograms, charged to the site's evaluation budget.

Why: a coordinator chooses the model every evaluate message carries. With exact replies it can send a model
whose score encodes one input (age, say) and read every validation patient's value and label off the score
histogram, a few messages being enough whatever the histogram's resolution. So by default an evaluate reply
is a release of the Gaussian mechanism:

* **What is released.** The per-class counts of the patients' LLNM scores in ``DP_EVAL_BINS`` equal bins of
  [0, 1] (at most the site's ``max-histogram-bins``). Adding or removing one evaluated patient changes exactly
  one count by one, so the vector of counts has L2 sensitivity 1, whatever model the coordinator sent.
* **The noise.** Each count gets independent Gaussian noise of standard deviation ``sigma``, calibrated so
  that one reply is (``eval-epsilon``, ``patient-delta``)-DP (`shared_model.dp_accounting.gaussian_sigma`),
  drawn from the operating system's random source (`random.SystemRandom`), then rounded to an integer
  (post-processing). A count may come out negative and is sent so: clipping every cell at zero would add a
  positive bias to every empty bin, and to every pooled sum of them (`shared_model.evaluation.metrics` reads such a
  histogram as noisy).
* **Everything else is computed from the noisy histogram** (post-processing): the counts, AUC, threshold
  metrics, Brier score and ECE (at the bins' centres), and the AUC's interval by a parametric bootstrap that
  redraws the patients from the noisy histogram and the noise from ``sigma``. The risk-stage metrics and the
  population counts, which the histogram does not determine, are not sent.
* **Accounting.** Each reply is the accountant entry ``(sigma, 1.0, 1)`` in the site's record
  (`fl_client.privacy.site_record`), recorded *before* the reply is computed (a crash over-counts, never
  under-counts). Their composition by the RDP accountant, at the site's delta, is the lifetime evaluation
  epsilon of the site's validation and test patients, refused beyond ``max-eval-epsilon``. Which reply is
  refused depends only on how many were sent before, never on a patient.
* **Explanations** (the final model's, once per run) are one more release of the same kind: per-patient
  contributions to the feature-group share sums, the patient count and per location bin the count, observed
  and predicted positives and probability sum have L2 norm at most ``EXPLANATION_SENSITIVITY``, so the noise is
  ``sigma * EXPLANATION_SENSITIVITY`` (`fl_client.explain.aggregates`).

* **Segmentation** (a `task: segment` round): the release is the vector of sums over the scored views of
  `shared_model.protocol.segmentation_metrics`. One view adds a vector of ``len(SUM_KEYS)`` values, each at most
  1 in absolute value, and a patient has at most two views, so one patient changes it by at most
  ``SEGMENTATION_SENSITIVITY`` in L2 and each sum gets noise ``sigma * SEGMENTATION_SENSITIVITY``.

A site can opt out with ``exact-evaluation`` (its replies are then exact and its validation and test patients
unprotected; its record and `llnm-site privacy` say so).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

import numpy as np

from fl_client.privacy.site_record import locked_record
from fl_client.settings import EXACT_EVALUATION, MAX_EVAL_EPSILON, SiteSettings
from shared_model import protocol
from shared_model.dp_accounting import epsilon_for, gaussian_sigma
from shared_model.protocol import segmentation_metrics

#: Bins of a DP evaluate reply's histogram (at most the site's max-histogram-bins). Each bin's count carries
#: noise of the same size, so fewer bins mean less noise on every curve; 10 keeps 0.5 and every 0.1 an edge.
#: Chosen by measurement (benchmarks/bench_dp_evaluation.py): see docs/privacy.md.
DP_EVAL_BINS = 10
#: L2 bound of one patient's contribution to the explanation aggregates: sqrt(2) for the share sums with the
#: patient count (shares are non-negative and sum to 1), 2 for each location's bin (count, observed, predicted,
#: probability, each at most 1), for the capsule-distance and the lobe-third bins.
EXPLANATION_SENSITIVITY = math.sqrt(2.0 + 4.0 + 4.0)
#: L2 bound of one patient's contribution to a segmentation reply's sums: two views, each a vector of
#: `segmentation_metrics.SUM_KEYS` values bounded by 1 in absolute value.
SEGMENTATION_SENSITIVITY = 2.0 * math.sqrt(len(segmentation_metrics.SUM_KEYS))
#: Parametric-bootstrap draws for the AUC interval of a DP reply.
DP_BOOTSTRAP = 200

_SYSTEM_RANDOM = random.SystemRandom()


def gaussian_noise(shape: int | tuple[int, ...], sigma: float) -> np.ndarray:
    """Independent N(0, sigma^2) values from the operating system's random source (never the run's seed)."""
    size = int(np.prod(shape))
    values = np.array([_SYSTEM_RANDOM.gauss(0.0, sigma) for _ in range(size)], dtype=np.float64)
    return values.reshape(shape)


def noisy_counts(counts: np.ndarray, sigma: float, *, clip: bool = False) -> np.ndarray:
    """Counts plus Gaussian noise, rounded to integers (post-processing); clipped at zero where `clip`."""
    counts = np.asarray(counts, dtype=np.float64)
    if sigma > 0:
        counts = counts + gaussian_noise(counts.shape, sigma)
    out = np.rint(counts)
    return (np.clip(out, 0, None) if clip else out).astype(np.int64)


def noisy_segmentation_sums(scores: Sequence[dict[str, Any]], sigma: float) -> tuple[np.ndarray, float]:
    """(the noisy sums of a segmentation reply, the standard deviation of the noise on each): the views' sums plus
    Gaussian noise of ``sigma * SEGMENTATION_SENSITIVITY``, `sigma` being the site's noise for a sensitivity-1
    release at its evaluation epsilon."""
    noise_sd = float(sigma) * SEGMENTATION_SENSITIVITY
    return (segmentation_metrics.view_sums(scores) + gaussian_noise(len(segmentation_metrics.SUM_KEYS), noise_sd),
            noise_sd)


def dense_histogram(y: np.ndarray, score: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """(negative counts, positive counts) of the scores in `n_bins` equal bins of [0, 1] (the protocol's bins)."""
    edges = np.arange(n_bins + 1) / float(n_bins)
    bins = np.minimum(np.searchsorted(edges, np.clip(score, 0.0, 1.0), side="right") - 1, n_bins - 1)
    neg = np.bincount(bins[y == 0], minlength=n_bins)
    pos = np.bincount(bins[y == 1], minlength=n_bins)
    return neg.astype(np.int64), pos.astype(np.int64)


def as_histogram(neg: np.ndarray, pos: np.ndarray, *, noisy: bool = False) -> dict[str, Any]:
    """Dense counts in `shared_model.evaluation.metrics.score_histogram`'s (sparse) layout; `noisy` marks DP counts."""
    out: dict[str, Any] = {"n_bins": len(neg)}
    for name, dense in (("neg", neg), ("pos", pos)):
        occupied = [int(i) for i in np.flatnonzero(dense)]
        out[f"{name}_bins"], out[f"{name}_counts"] = occupied, [int(dense[i]) for i in occupied]
    if noisy:
        out["noisy"] = True
    return out


def histogram_metrics(neg: np.ndarray, pos: np.ndarray, *, sigma: float, n_bootstrap: int = DP_BOOTSTRAP,
                      ci: float = 0.95) -> dict[str, Any]:
    """Every `protocol.EVAL_METRIC_KEYS` value from a (noisy) histogram alone: post-processing of the release.

    One site's metrics are computed from its noisy counts clipped at zero: with one site's few patients the noisy
    class totals in the AUC's denominator make the unclipped estimate far more variable than the clipping biases
    it (benchmarks/results/dp_evaluation.json: RMSE 0.11 against 0.24 at a site of 60 validation patients). The
    coordinator pools the unclipped counts, where the clipping bias would add up over the sites. Brier score and
    ECE take each bin's centre as its patients' score. The AUC interval is a parametric bootstrap: patients
    redrawn from the histogram, then the same Gaussian noise (`sigma`) added, rounded and clipped as here, so it
    covers the sampling of patients and the noise.
    """
    from shared_model.evaluation.metrics import metrics_from_histograms

    n_bins = len(neg)
    c_neg, c_pos = np.clip(neg, 0, None), np.clip(pos, 0, None)
    pooled = metrics_from_histograms([as_histogram(c_neg, c_pos)])
    centres = (np.arange(n_bins) + 0.5) / n_bins
    n = int(c_neg.sum() + c_pos.sum())
    out = {k: pooled.get(k) for k in ("auc", "accuracy", "sensitivity", "specificity", "ppv", "npv", "f1")}
    if n:
        out["brier"] = float(((centres ** 2) * c_neg + ((1 - centres) ** 2) * c_pos).sum() / n)
        # ECE over the histogram's own bins: |observed rate - bin centre|, weighted by the bin's patients.
        totals = c_neg + c_pos
        occupied = totals > 0
        out["ece"] = float((np.abs(c_pos[occupied] / totals[occupied] - centres[occupied])
                            * totals[occupied]).sum() / n)
    else:
        out["brier"] = out["ece"] = None
    out["auc_ci_low"] = out["auc_ci_high"] = None
    if out["auc"] is not None and n_bootstrap:
        rng = np.random.default_rng(_SYSTEM_RANDOM.getrandbits(64))
        probs = np.concatenate([c_neg, c_pos]).astype(np.float64) / n
        draws = []
        for _ in range(n_bootstrap):
            counts = rng.multinomial(n, probs).astype(np.float64)
            if sigma > 0:
                counts = np.clip(np.rint(counts + rng.normal(0.0, sigma, counts.shape)), 0, None)
            auc = _binned_auc(counts[:n_bins], counts[n_bins:])
            if auc is not None:
                draws.append(auc)
        if draws:
            lo, hi = np.quantile(draws, [(1 - ci) / 2, (1 + ci) / 2])
            out["auc_ci_low"], out["auc_ci_high"] = float(lo), float(hi)
    return out


def _binned_auc(neg: np.ndarray, pos: np.ndarray) -> float | None:
    """The AUC of per-bin counts, ties counting 1/2, clipped to [0, 1]; None without both classes."""
    tot_pos, tot_neg = float(pos.sum()), float(neg.sum())
    if tot_pos <= 0 or tot_neg <= 0:
        return None
    below = np.concatenate([[0.0], np.cumsum(neg)[:-1]])
    return min(max(float((pos * (below + 0.5 * neg)).sum() / (tot_pos * tot_neg)), 0.0), 1.0)


class EvaluationBudgetSpent(RuntimeError):
    """The site's lifetime evaluation budget cannot pay for this reply; the text is the refusal."""


def reserve_releases(settings: SiteSettings, site_name: str, run_id: str, server_round: int, split: str,
                     kinds: Sequence[str]) -> tuple[float, list[str], dict[str, float]]:
    """Charge the site's evaluation budget for this reply's releases, before anything is computed.

    `kinds` are the releases the reply would make, in order of priority (``histogram``, then ``explanation``).
    Returns ``(sigma, granted kinds, {"epsilon": ..., "lifetime": ...})``: each granted release is recorded
    in the site's record (under the site's lock) before this returns. Raises `EvaluationBudgetSpent` when
    not even the first can be afforded.
    """
    delta = float(settings.patient_delta)
    sigma = gaussian_sigma(float(settings.eval_epsilon), delta)
    with locked_record(settings, site_name) as record:
        history = record.evaluation_history()
        granted: list[str] = []
        for kind in kinds:
            after = epsilon_for([*history, (sigma, 1.0, 1)], delta, "rdp")
            if after > settings.max_eval_epsilon * (1 + 1e-9):
                break
            history.append((sigma, 1.0, 1))
            record.add_evaluation(run_id, server_round, split, kind, sigma, float(settings.eval_epsilon), delta)
            granted.append(kind)
        if not granted:
            record.add_refusal({"run_id": run_id, "round": server_round, "rule": MAX_EVAL_EPSILON,
                                "budget": settings.max_eval_epsilon, "split": split})
    if not granted:
        raise EvaluationBudgetSpent(
            f"{protocol.POLICY_REFUSAL_MARKER}: site {site_name!r} refuses round {server_round} evaluation: its "
            f"rule {MAX_EVAL_EPSILON}={settings.max_eval_epsilon:g} bounds the lifetime epsilon of every "
            f"evaluation reply on its patients, and one more reply (epsilon {settings.eval_epsilon:g}) would pass "
            "it. The coordinator can evaluate less often (federation.eval_every) or only at the end; only the site "
            f"can raise --{MAX_EVAL_EPSILON}, or answer exactly (--{EXACT_EVALUATION}), leaving its validation and "
            "test patients unprotected.")
    lifetime = epsilon_for(history, delta, "rdp")
    return sigma, granted, {"epsilon": float(settings.eval_epsilon), "lifetime": lifetime}
