"""Tests of shared_model.evaluation.metrics and `llnm-server evaluate-predictions`.

The reference values come from three independent places: hand computation on small arrays, scikit-learn on the
same data (or the same bootstrap resamples), and the LLNM-Net paper's Fig. 3a table reproduced from its
published per-patient predictions in ../shared.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.calibration import calibration_curve
from sklearn.metrics import roc_auc_score

from fl_research import cmd_evaluate_predictions
from shared_model.evaluation.binary import _resample_stats
from shared_model.evaluation.metrics import (
    binary_metrics,
    calibration_curve_data,
    decision_curve,
    metrics_from_histograms,
    metrics_table,
    score_histogram,
)

SHARED = Path(os.environ.get("LLNM_SHARED_DIR") or Path(__file__).resolve().parents[1].parent / "shared")
PREDICTIONS = SHARED / "data" / "llnm_net_source" / "predictions.csv"

# Shen et al., Nat Commun 16:7052 (2025), Fig. 3a (threshold 0.5): point value and the published interval.
PAPER: dict[str, dict[str, tuple[float, float, float]]] = {
    "train": {
        "auc": (0.960, 0.959, 0.961),
        "specificity": (0.970, 0.967, 0.973),
        "sensitivity": (0.873, 0.866, 0.879),
        "accuracy": (0.921, 0.917, 0.924),
        "npv": (0.881, 0.875, 0.886),
        "ppv": (0.968, 0.965, 0.972),
    },
    "validation": {
        "auc": (0.948, 0.946, 0.950),
        "specificity": (0.946, 0.937, 0.955),
        "sensitivity": (0.841, 0.828, 0.854),
        "accuracy": (0.890, 0.882, 0.898),
        "npv": (0.839, 0.826, 0.852),
        "ppv": (0.947, 0.938, 0.955),
    },
    "external_test": {
        "auc": (0.944, 0.942, 0.945),
        "specificity": (0.947, 0.940, 0.954),
        "sensitivity": (0.768, 0.758, 0.779),
        "accuracy": (0.847, 0.840, 0.854),
        "npv": (0.764, 0.753, 0.775),
        "ppv": (0.948, 0.942, 0.955),
    },
}
PAPER_N = {"train": 23_692, "validation": 5_923, "external_test": 9_836}

# Small example computed by hand below: 4 positives, 4 negatives, one tied positive/negative pair (0.41).
Y_SMALL = np.array([1, 1, 1, 1, 0, 0, 0, 0])
S_SMALL = np.array([0.92, 0.63, 0.41, 0.84, 0.57, 0.41, 0.23, 0.52])


def _needs_shared() -> None:
    if not PREDICTIONS.is_file():
        pytest.skip(f"LLNM-Net published predictions not found at {PREDICTIONS} (../shared or LLNM_SHARED_DIR)")


def _cli(tmp_args: list[str]) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).parent / "llnm-server"
    assert exe.is_file(), f"{exe} is not installed: run `make venv` (pip install -e .)"
    return subprocess.run([str(exe), "evaluate-predictions", *tmp_args], capture_output=True, text=True)


# --------------------------------------------------------------------------------------------------------------
# the paper's table, from its published predictions, through the installed command
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def paper_runs() -> dict[str, object]:
    """Run the command twice on the published predictions: 95% intervals, and 50% (interquartile) intervals."""
    _needs_shared()
    base = [str(PREDICTIONS), "--label-col", "llnm_ground_truth", "--score-col", "llnm_net_prediction"]
    base += ["--group-col", "split", "--bootstrap", "1000", "--seed", "0"]
    start = time.perf_counter()
    run95 = _cli(base)
    wall = time.perf_counter() - start
    run50 = _cli([*base, "--ci", "0.5"])
    for run in (run95, run50):
        assert run.returncode == 0, run.stderr
    return {"ci95": json.loads(run95.stdout), "ci50": json.loads(run50.stdout), "stderr": run95.stderr, "wall": wall}


@pytest.mark.shared
def test_paper_table_point_values(paper_runs: dict) -> None:
    table = paper_runs["ci95"]
    assert list(table) == ["train", "validation", "external_test"]
    for split, metrics in PAPER.items():
        assert table[split]["n"] == PAPER_N[split]
        assert table[split]["threshold"] == 0.5
        for name, (value, _, _) in metrics.items():
            assert round(table[split][name], 3) == value, (split, name, table[split][name])


@pytest.mark.shared
def test_paper_threshold_metric_intervals_are_95pct_patient_bootstrap(paper_runs: dict) -> None:
    table = paper_runs["ci95"]
    for split, metrics in PAPER.items():
        for name, (_, low, high) in metrics.items():
            if name == "auc":
                continue
            assert abs(table[split][f"{name}_ci_low"] - low) <= 0.002, (split, name)
            assert abs(table[split][f"{name}_ci_high"] - high) <= 0.002, (split, name)


@pytest.mark.shared
def test_paper_auc_intervals(paper_runs: dict) -> None:
    """The paper's AUC intervals equal the bootstrap interquartile range, not the 95% percentile interval.

    Its threshold-metric intervals match the 95% interval (test above); its AUC intervals are 2.7-2.9 times
    narrower and match the 25th-75th percentiles of the same bootstrap. We reproduce them with ``--ci 0.5`` and
    check that the honest 95% interval strictly contains them.
    """
    for split, metrics in PAPER.items():
        _, low, high = metrics["auc"]
        iqr = paper_runs["ci50"][split]
        assert abs(iqr["auc_ci_low"] - low) <= 0.002, split
        assert abs(iqr["auc_ci_high"] - high) <= 0.002, split
        ci95 = paper_runs["ci95"][split]
        assert ci95["auc_ci_low"] < low - 0.001 and ci95["auc_ci_high"] > high + 0.001, split


@pytest.mark.shared
def test_paper_corrupted_score_is_reported(paper_runs: dict) -> None:
    """Train row 10151 has score 4971810103157930.0 in the Source Data: flagged, AUC kept, Brier/ECE null."""
    stderr = paper_runs["stderr"]
    assert "line 10152" in stderr and "outside [0, 1]" in stderr and "train" in stderr
    train, val = paper_runs["ci95"]["train"], paper_runs["ci95"]["validation"]
    assert train["n_scores_outside_0_1"] == 1 and train["brier"] is None and train["ece"] is None
    assert val["n_scores_outside_0_1"] == 0 and 0.0 < val["brier"] < 0.25 and 0.0 <= val["ece"] < 0.2


# --------------------------------------------------------------------------------------------------------------
# binary_metrics against hand-computed values
# --------------------------------------------------------------------------------------------------------------


def test_binary_metrics_hand_computed() -> None:
    m = binary_metrics(Y_SMALL, S_SMALL, n_bootstrap=0)
    # score >= 0.5: positives 0.92, 0.63, 0.84 (TP), 0.41 (FN); negatives 0.57, 0.52 (FP), 0.41, 0.23 (TN)
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (3, 2, 2, 1)
    assert (m["n"], m["n_pos"], m["prevalence"]) == (8, 4, 0.5)
    expected = {
        "accuracy": 5 / 8,
        "sensitivity": 3 / 4,
        "specificity": 2 / 4,
        "ppv": 3 / 5,
        "npv": 2 / 3,
        "f1": 6 / 9,
        "auc": 13.5 / 16,  # 16 pairs; 0.41 beats 0.23 and ties 0.41; every other positive beats all 4
        "brier": (0.08**2 + 0.37**2 + 0.59**2 + 0.16**2 + 0.57**2 + 0.41**2 + 0.23**2 + 0.52**2) / 8,
        # bins (0.9,1]: .92 vs 1; (0.8,.9]: .84 vs 1; (0.6,.7]: .63 vs 1; (0.5,.6]: mean .545 vs 0 (2 patients);
        # (0.4,.5]: mean .41 vs .5 (2 patients); (0.2,.3]: .23 vs 0
        "ece": (0.08 + 0.16 + 0.37 + 2 * 0.545 + 2 * 0.09 + 0.23) / 8,
    }
    for name, value in expected.items():
        assert m[name] == pytest.approx(value, abs=1e-12), name
    assert m["auc_ci_low"] is None and m["n_bootstrap"] == 0
    assert m["n_scores_outside_0_1"] == 0


def test_threshold_is_inclusive_and_configurable() -> None:
    assert binary_metrics([0, 1], [0.5, 0.7], n_bootstrap=0)["fp"] == 1
    assert binary_metrics([0, 1], [np.nextafter(0.5, 0), 0.7], n_bootstrap=0)["fp"] == 0
    m = binary_metrics(Y_SMALL, S_SMALL, threshold=0.6, n_bootstrap=0)
    assert (m["tp"], m["fp"], m["tn"], m["fn"], m["threshold"]) == (3, 0, 4, 1, 0.6)


def test_auc_matches_sklearn_with_many_ties() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 500)
    s = np.round(np.clip(rng.normal(0.4 + 0.2 * y, 0.2), 0, 1), 2)
    assert binary_metrics(y, s, n_bootstrap=0)["auc"] == pytest.approx(roc_auc_score(y, s), abs=1e-15)


def test_undefined_values_are_none_and_json_safe() -> None:
    one_class = binary_metrics([0, 0, 0], [0.1, 0.7, 0.2], n_bootstrap=50)
    assert one_class["auc"] is None and one_class["auc_ci_low"] is None and one_class["auc_ci_high"] is None
    assert one_class["sensitivity"] is None and one_class["sensitivity_ci_low"] is None
    assert one_class["specificity"] == pytest.approx(2 / 3) and one_class["npv"] == 1.0
    assert one_class["ppv"] == 0.0 and one_class["f1"] == 0.0
    no_positive_call = binary_metrics([0, 1, 1], [0.1, 0.2, 0.3], n_bootstrap=50)
    assert no_positive_call["ppv"] is None and no_positive_call["ppv_ci_low"] is None
    assert no_positive_call["auc"] == 1.0 and no_positive_call["f1"] == 0.0
    empty = binary_metrics([], [], n_bootstrap=50)
    assert empty["n"] == 0 and empty["auc"] is None and empty["accuracy"] is None and empty["brier"] is None
    assert empty["prevalence"] is None and empty["ece"] is None
    for result in (one_class, no_positive_call, empty):
        json.dumps(result, allow_nan=False)


def test_scores_outside_unit_interval_keep_auc_but_not_calibration() -> None:
    logits = np.log(S_SMALL / (1 - S_SMALL))
    m = binary_metrics(Y_SMALL, logits, threshold=0.0, n_bootstrap=0)
    assert m["auc"] == pytest.approx(13.5 / 16) and (m["tp"], m["fp"]) == (3, 2)
    # 5 of the 8 logits fall outside [0, 1] (those of 0.63, 0.57 and 0.52 fall inside)
    assert m["brier"] is None and m["ece"] is None and m["n_scores_outside_0_1"] == 5


@pytest.mark.parametrize(
    ("y", "s", "kwargs", "message"),
    [
        ([0, 2, 1], [0.1, 0.2, 0.3], {}, r"y_true\[1\] = 2\.0: labels must be 0 or 1"),
        ([0, -1], [0.1, 0.2], {}, r"y_true\[1\] = -1\.0"),
        ([0, float("nan")], [0.1, 0.2], {}, r"y_true\[1\] = nan"),
        (["0", "1"], [0.1, 0.2], {}, r"labels must be the numbers 0 or 1, got '0'"),
        ([0, 1], [0.1, float("nan")], {}, r"y_score\[1\] = nan: scores must be finite"),
        ([0, 1], [float("inf"), 0.2], {}, r"y_score\[0\] = inf"),
        ([0, 1], ["a", 0.2], {}, r"y_score: values must be numbers"),
        ([0, 1, 1], [0.1, 0.2], {}, r"y_true has 3 values but y_score has 2"),
        ([[0, 1]], [[0.1, 0.2]], {}, r"expected a 1-D sequence"),
        ([0, 1], [0.1, 0.2], {"ci": 1.0}, r"ci must be strictly between 0 and 1"),
        ([0, 1], [0.1, 0.2], {"n_bootstrap": -1}, r"n_bootstrap must be a non-negative integer"),
        ([0, 1], [0.1, 0.2], {"threshold": float("nan")}, r"threshold must be finite"),
    ],
)
def test_binary_metrics_rejects_bad_input(y: list, s: list, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        binary_metrics(y, s, **kwargs)


@pytest.mark.parametrize("func", [calibration_curve_data, decision_curve, score_histogram])
def test_probability_functions_reject_scores_outside_unit_interval(func) -> None:
    with pytest.raises(ValueError, match=r"y_score\[1\] = 1\.2: this needs probabilities"):
        func([0, 1], [0.3, 1.2])


# --------------------------------------------------------------------------------------------------------------
# bootstrap
# --------------------------------------------------------------------------------------------------------------


def test_vectorised_resamples_equal_sklearn_on_each_resample() -> None:
    """The count-matrix evaluation gives, for every resample, what scikit-learn gives on the resampled rows."""
    rng = np.random.default_rng(11)
    n, b = 80, 60
    y = rng.integers(0, 2, n)
    s = np.round(rng.beta(2, 2, n) * 0.5 + 0.5 * y * rng.random(n), 1)  # coarse scores: many ties
    order = np.argsort(s, kind="stable")
    s_sorted = s[order]
    starts = np.flatnonzero(np.r_[True, s_sorted[1:] != s_sorted[:-1]])
    idx = rng.integers(0, n, size=(b, n))
    counts = np.stack([np.bincount(row, minlength=n)[order] for row in idx])
    stats = _resample_stats(y[order], (s_sorted >= 0.5).astype(np.int64), starts, counts)
    for k in range(b):
        yk, sk = y[idx[k]], s[idx[k]]
        direct = binary_metrics(yk, sk, n_bootstrap=0)
        for name, values in stats.items():
            if direct[name] is None:
                assert np.isnan(values[k]), (k, name)
            else:
                assert values[k] == pytest.approx(direct[name], abs=1e-12), (k, name)
        if 0 < yk.sum() < n:
            assert stats["auc"][k] == pytest.approx(roc_auc_score(yk, sk), abs=1e-12)


def test_bootstrap_intervals_are_seeded_nested_and_cover_the_estimate() -> None:
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 3000)
    s = np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0, 1)
    a = binary_metrics(y, s, n_bootstrap=300, seed=1)
    assert a == binary_metrics(y, s, n_bootstrap=300, seed=1)
    assert a["auc_ci_low"] != binary_metrics(y, s, n_bootstrap=300, seed=2)["auc_ci_low"]
    narrow = binary_metrics(y, s, n_bootstrap=300, seed=1, ci=0.5)
    for name in ("auc", "accuracy", "sensitivity", "specificity", "ppv", "npv", "f1"):
        assert a[f"{name}_ci_low"] < narrow[f"{name}_ci_low"] < a[name] < narrow[f"{name}_ci_high"]
        assert narrow[f"{name}_ci_high"] < a[f"{name}_ci_high"]
    # standard error of the AUC from the bootstrap vs the Hanley-McNeil formula: same order, within 25%
    auc, n1, n0 = a["auc"], int(y.sum()), int((1 - y).sum())
    q1, q2 = auc / (2 - auc), 2 * auc**2 / (1 + auc)
    se = np.sqrt((auc * (1 - auc) + (n1 - 1) * (q1 - auc**2) + (n0 - 1) * (q2 - auc**2)) / (n1 * n0))
    assert (a["auc_ci_high"] - a["auc_ci_low"]) / (2 * 1.96) == pytest.approx(se, rel=0.25)


def test_bootstrap_skips_one_class_resamples() -> None:
    # 1 positive in 6: about a third of the resamples miss it and have no AUC; they must not break the interval
    m = binary_metrics([1, 0, 0, 0, 0, 0], [0.9, 0.1, 0.2, 0.95, 0.3, 0.4], n_bootstrap=400, seed=0)
    assert m["auc"] == pytest.approx(0.8)
    assert 0.0 <= m["auc_ci_low"] <= m["auc"] <= m["auc_ci_high"] <= 1.0


# --------------------------------------------------------------------------------------------------------------
# calibration and decision curves
# --------------------------------------------------------------------------------------------------------------


def test_calibration_curve_data_matches_sklearn() -> None:
    rng = np.random.default_rng(2)
    s = 0.75 * rng.beta(0.7, 2.0, 400)  # the two highest bins stay empty
    y = (rng.random(400) < s).astype(int)
    data = calibration_curve_data(y, s, n_bins=10)
    prob_true, prob_pred = calibration_curve(y, s, n_bins=10, strategy="uniform")
    filled = [b for b in range(10) if data["counts"][b]]
    assert sum(data["counts"]) == 400 and len(filled) == len(prob_true) < 10
    assert [data["observed_rate"][b] for b in filled] == pytest.approx(list(prob_true))
    assert [data["mean_predicted"][b] for b in filled] == pytest.approx(list(prob_pred))
    assert all(data["observed_rate"][b] is None for b in range(10) if b not in filled)
    assert data["bin_edges"] == pytest.approx(list(np.linspace(0, 1, 11)))
    weights = np.array([data["counts"][b] for b in filled]) / 400
    assert data["ece"] == pytest.approx(float(np.sum(weights * np.abs(prob_true - prob_pred))))
    assert binary_metrics(y, s, n_bootstrap=0)["ece"] == pytest.approx(data["ece"])
    assert calibration_curve_data([], [])["ece"] is None


def test_decision_curve_formulas() -> None:
    curve = decision_curve(Y_SMALL, S_SMALL)
    assert len(curve) == 98
    assert [r["threshold"] for r in curve] == list(np.round(np.arange(0.01, 0.99, 0.01), 10))
    for r in curve:
        pt = r["threshold"]
        assert r["net_benefit_treat_none"] == 0.0
        assert r["net_benefit_treat_all"] == pytest.approx(0.5 - 0.5 * pt / (1 - pt))
        assert r["net_benefit_model"] == pytest.approx(r["tp"] / 8 - r["fp"] / 8 * pt / (1 - pt))
    at_half = next(r for r in curve if r["threshold"] == 0.5)
    assert (at_half["tp"], at_half["fp"]) == (3, 2) and at_half["net_benefit_model"] == pytest.approx(1 / 8)
    at_quarter = decision_curve(Y_SMALL, S_SMALL, thresholds=[0.25])[0]
    # score >= 0.25: 4 TP, 3 FP (0.57, 0.52, 0.41) -> 4/8 - 3/8 * (1/3)
    assert at_quarter["net_benefit_model"] == pytest.approx(0.5 - 0.125)
    perfect = decision_curve([1, 0, 1, 0, 0], [1.0, 0.0, 1.0, 0.0, 0.0])
    assert all(r["net_benefit_model"] == pytest.approx(0.4) for r in perfect)
    with pytest.raises(ValueError, match=r"thresholds\[1\] = 1\.0: thresholds must lie strictly in \(0, 1\)"):
        decision_curve(Y_SMALL, S_SMALL, thresholds=[0.5, 1.0])


# --------------------------------------------------------------------------------------------------------------
# federated pooling from histograms
# --------------------------------------------------------------------------------------------------------------


def _seven_sites(y: np.ndarray, s: np.ndarray, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    perm = rng.permutation(y.size)
    cuts = np.sort(rng.choice(np.arange(1, y.size), size=6, replace=False))
    return [(y[part], s[part]) for part in np.split(perm, cuts)]


def _check_pooled(y: np.ndarray, s: np.ndarray, n_bins: int, thresholds: list[float]) -> list[float]:
    """Pool 7 sites' histograms (through JSON, as they would travel) and compare with the direct metrics."""
    hists = [json.loads(json.dumps(score_histogram(ys, ss, n_bins=n_bins))) for ys, ss in _seven_sites(y, s, 1)]
    errors = []
    for t in thresholds:
        pooled = metrics_from_histograms(hists, threshold=t)
        direct = binary_metrics(y, s, threshold=float(np.round(t, 9)), n_bootstrap=0)
        assert pooled["n_sites"] == 7 and pooled["n"] == y.size and pooled["n_pos"] == direct["n_pos"]
        for name in ("tp", "fp", "tn", "fn", "accuracy", "sensitivity", "specificity", "ppv", "npv", "f1"):
            assert pooled[name] == direct[name], (t, name)
        error = abs(pooled["auc"] - roc_auc_score(y, s))
        assert error <= pooled["auc_max_abs_error"] + 1e-12, (t, error, pooled["auc_max_abs_error"])
        errors.append(error)
    return errors


def test_histogram_pooling_is_exact_for_threshold_metrics_and_bounded_for_auc() -> None:
    rng = np.random.default_rng(7)
    y = rng.integers(0, 2, 6000)
    s = rng.beta(2 + 3 * y, 5 - 3 * y)
    # scores exactly on and just below bin edges and the ends of [0, 1], where binning could go wrong
    edge_cases = [0.5, np.nextafter(0.5, 0), 0.3, np.nextafter(0.3, 0), 0.06, 0.0, 1.0, 0.12345, 0.12345]
    s[: len(edge_cases)] = edge_cases
    drifted = float(np.arange(0.01, 0.99, 0.01)[5])  # 0.060000000000000005, snapped to the edge 0.06
    _check_pooled(y, s, 10_000, [0.5, 0.3, 0.0, drifted, 0.9999])
    coarse = _check_pooled(y, s, 20, [0.5, 0.25, 0.95])
    assert max(coarse) > 1e-4  # with 20 bins the binned AUC differs, and the bound still holds


@pytest.mark.shared
def test_histogram_pooling_on_published_predictions() -> None:
    _needs_shared()
    df = pd.read_csv(PREDICTIONS)
    df = df[df["split"] != "train"]  # the train split holds one corrupted score outside [0, 1]
    y, s = df["llnm_ground_truth"].to_numpy(), df["llnm_net_prediction"].to_numpy()
    errors = _check_pooled(y, s, 10_000, [0.5])
    assert errors[0] < 1e-4


def test_histogram_auc_bound_hand_computed() -> None:
    # site A: positive at 0.55, negative at 0.52 (same 10-bin bin); site B: positive 0.9, negative 0.1
    hists = [score_histogram([1, 0], [0.55, 0.52], n_bins=10), score_histogram([1, 0], [0.9, 0.1], n_bins=10)]
    assert hists[0] == {"n_bins": 10, "pos_bins": [5], "pos_counts": [1], "neg_bins": [5], "neg_counts": [1]}
    pooled = metrics_from_histograms(hists)
    # 4 pairs, 1 shares a bin: binned AUC = 3.5/4, true AUC = 4/4, bound = 1 / (2 * 4)
    assert pooled["auc"] == 3.5 / 4 and pooled["auc_max_abs_error"] == 1 / 8
    assert roc_auc_score([1, 0, 1, 0], [0.55, 0.52, 0.9, 0.1]) - pooled["auc"] == pytest.approx(1 / 8)


def test_histograms_of_different_resolutions_merge_on_their_common_grid() -> None:
    # A site capped at 20 bins and one at 100 (node config max-histogram-bins): merged on 20 bins, exactly.
    rng = np.random.default_rng(3)
    y1, s1 = rng.integers(0, 2, 40), rng.random(40)
    y2, s2 = rng.integers(0, 2, 60), rng.random(60)
    mixed = metrics_from_histograms([score_histogram(y1, s1, n_bins=20), score_histogram(y2, s2, n_bins=100)])
    coarse = metrics_from_histograms([score_histogram(y1, s1, n_bins=20), score_histogram(y2, s2, n_bins=20)])
    assert mixed["n_bins"] == 20
    assert {k: mixed[k] for k in ("auc", "tp", "fp", "tn", "fn")} == {k: coarse[k] for k in ("auc", "tp", "fp",
                                                                                                 "tn", "fn")}


@pytest.mark.parametrize(
    ("hists", "threshold", "message"),
    [
        ([], 0.5, "at least one site histogram"),
        (
            [{"n_bins": 10, "pos_bins": [1], "pos_counts": [1], "neg_bins": [], "neg_counts": []},
             {"n_bins": 15, "pos_bins": [], "pos_counts": [], "neg_bins": [], "neg_counts": []}],
            0.5,
            r"threshold 0\.5 is not a bin edge below 1 of a 5-bin histogram",
        ),
        ([{"n_bins": 10, "pos_bins": [1], "pos_counts": [1]}], 0.5, r"histogram 0: missing field 'neg_bins'"),
        (
            [{"n_bins": 10, "pos_bins": [10], "pos_counts": [1], "neg_bins": [], "neg_counts": []}],
            0.5,
            r"pos_bins must lie in 0\.\.9",
        ),
        (
            [{"n_bins": 10, "pos_bins": [1], "pos_counts": [-1], "neg_bins": [], "neg_counts": []}],
            0.5,
            "must not be negative",
        ),
        (
            [{"n_bins": 10, "pos_bins": [1], "pos_counts": [1.5], "neg_bins": [], "neg_counts": []}],
            0.5,
            "integers only",
        ),
        (
            [{"n_bins": 10, "pos_bins": [1, 2], "pos_counts": [1], "neg_bins": [], "neg_counts": []}],
            0.5,
            "pos_bins has 2 entries but pos_counts has 1",
        ),
        (
            [{"n_bins": 10, "pos_bins": [1], "pos_counts": [1], "neg_bins": [], "neg_counts": []}],
            0.55,
            "not a bin edge",
        ),
        (
            [{"n_bins": 10, "pos_bins": [1], "pos_counts": [1], "neg_bins": [], "neg_counts": []}],
            1.0,
            "not a bin edge below 1",
        ),
    ],
)
def test_metrics_from_histograms_rejects_bad_input(hists: list, threshold: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        metrics_from_histograms(hists, threshold=threshold)


# --------------------------------------------------------------------------------------------------------------
# metrics_table and the command (in-process parser for speed; the paper tests above run the installed command)
# --------------------------------------------------------------------------------------------------------------


def test_metrics_table_groups_and_all() -> None:
    df = pd.DataFrame({"y": Y_SMALL, "p": S_SMALL, "site": ["b", "a", "b", "c", "b", "a", "c", "a"]})
    table = metrics_table(df, "y", "p", "site", n_bootstrap=0)
    assert list(table) == ["b", "a", "c"]
    assert table["b"] == binary_metrics(Y_SMALL[[0, 2, 4]], S_SMALL[[0, 2, 4]], n_bootstrap=0)
    assert table["c"]["auc"] == 1.0
    assert metrics_table(df, "y", "p", n_bootstrap=0)["all"] == binary_metrics(Y_SMALL, S_SMALL, n_bootstrap=0)
    with pytest.raises(ValueError, match=r"column\(s\) 'score' not in the table; available: y, p, site"):
        metrics_table(df, "y", "score")
    df.loc[5, "y"] = 3
    with pytest.raises(ValueError, match=r"group 'a': y_true\[1\] = 3\.0"):
        metrics_table(df, "y", "p", "site")


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="llnm-server evaluate-predictions")
    cmd_evaluate_predictions.add_arguments(parser)
    rc = cmd_evaluate_predictions.run(parser.parse_args(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_command_output_decision_curve_and_out_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = "\n".join(f"{g},{y},{s}" for g, y, s in zip("xxxxyyyy", Y_SMALL, S_SMALL, strict=True))
    csv_path = _write(tmp_path / "p.csv", "site,label,score\n" + rows + "\n")
    rc, out, err = _run([str(csv_path), "--label-col", "label", "--score-col", "score", "--bootstrap", "0"], capsys)
    assert rc == 0 and err == ""
    assert json.loads(out)["all"] == binary_metrics(Y_SMALL, S_SMALL, n_bootstrap=0)
    assert out.startswith('{\n  "all": {\n    "n": 8,')  # pretty-printed, indent 2
    out_file = tmp_path / "metrics.json"
    argv = [str(csv_path), "--label-col", "label", "--score-col", "score", "--group-col", "site"]
    argv += ["--threshold", "0.6", "--bootstrap", "50", "--seed", "3", "--decision-curve", "--out", str(out_file)]
    rc, out, err = _run(argv, capsys)
    assert rc == 0 and out == "" and str(out_file) in err
    result = json.loads(out_file.read_text())
    assert list(result) == ["x", "y"]
    assert result["x"]["threshold"] == 0.6 and result["x"]["n_bootstrap"] == 50
    assert result["y"]["decision_curve"] == decision_curve(Y_SMALL[4:], S_SMALL[4:])


@pytest.mark.parametrize(
    ("content", "extra", "expected"),
    [
        (
            "label,score\n1,0.3\n",
            ["--group-col", "site"],
            "column(s) 'site' not found; available columns: label, score",
        ),
        ("label,prob\n1,0.3\n", [], "column(s) 'score' not found; available columns: label, prob"),
        ("label,score\n1,0.3\n\n0,abc\n", [], "line 4: score column 'score' has 'abc', which is not a number"),
        ("label,score\n1,0.3\n0,\n", [], "line 3: score column 'score' is empty"),
        ("label,score\n1,inf\n", [], "line 2: score column 'score' has 'inf': not finite"),
        ("label,score\n1,0.3\n2,0.4\n", [], "line 3: label column 'label' has '2', not 0 or 1"),
        ("label,score\nyes,0.3\n", [], "line 2: label column 'label' has 'yes', not 0 or 1"),
        ("label,score\n1,0.3\n0,0.2,9\n", [], "line 3: 3 fields, the header has 2"),
        ("", [], "the file is empty"),
        ("label,score\n", [], "no data rows after the header"),
        ("label,score,score\n1,0.3,0.3\n", [], "column 'score' appears 2 times"),
    ],
)
def test_command_bad_input_exits_2_naming_file_line_column(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, extra: list[str], expected: str
) -> None:
    csv_path = _write(tmp_path / "bad.csv", content)
    rc, out, err = _run([str(csv_path), "--label-col", "label", "--score-col", "score", *extra], capsys)
    assert rc == 2 and out == ""
    assert str(csv_path) in err and expected in err, err


def test_command_many_bad_rows_are_summarised(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    csv_path = _write(tmp_path / "bad.csv", "label,score\n" + "1,x\n" * 8)
    rc, _, err = _run([str(csv_path), "--label-col", "label", "--score-col", "score"], capsys)
    assert rc == 2 and "line 2:" in err and "line 6:" in err and "line 7:" not in err and "3 more bad row" in err


def test_command_missing_file_and_bad_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = _run([str(tmp_path / "none.csv"), "--label-col", "a", "--score-col", "b"], capsys)
    assert rc == 2 and "none.csv: no such file" in err
    rc, _, err = _run([str(tmp_path), "--label-col", "a", "--score-col", "b"], capsys)
    assert rc == 2 and "is a directory" in err
    for option in (["--ci", "1.5"], ["--bootstrap", "-2"], ["--threshold", "nan"]):
        with pytest.raises(SystemExit) as exc:
            _run([str(tmp_path / "x.csv"), "--label-col", "a", "--score-col", "b", *option], capsys)
        assert exc.value.code == 2
        assert option[0] in capsys.readouterr().err


def test_command_warns_about_scores_outside_unit_interval(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    csv_path = _write(tmp_path / "logits.csv", "label,score\n1,2.5\n0,-1.0\n1,0.7\n0,0.2\n")
    rc, out, err = _run(
        [str(csv_path), "--label-col", "label", "--score-col", "score", "--bootstrap", "0", "--decision-curve"],
        capsys,
    )
    assert rc == 0 and "2 score(s)" in err and "line 2: 2.5" in err and "line 3: -1.0" in err
    result = json.loads(out)["all"]
    assert result["auc"] == 1.0 and result["brier"] is None and result["decision_curve"] is None


def test_an_evaluate_reply_carries_the_histogram_dense_whatever_the_site_size() -> None:
    """The histogram travels as one count per bin and class: a site of 5 patients and one of 500 send lists of
    the same lengths, and the server reads back exactly the sparse histogram the site computed (replies of
    earlier versions, sparse, are still read)."""
    from shared_model import protocol
    from shared_model.evaluation.metrics import score_histogram

    rng = np.random.default_rng(0)
    lengths = set()
    for n in (5, 500):
        y, s = rng.integers(0, 2, n), rng.random(n)
        hist = score_histogram(y, s, n_bins=20)
        record = protocol.encode_eval_metrics({}, n=n, n_pos=int(y.sum()), histogram=hist)
        lengths.add((len(record[protocol.HIST_NEG_COUNTS]), len(record[protocol.HIST_POS_COUNTS])))
        assert protocol.HIST_POS_BINS not in record
        assert protocol.decode_eval_metrics(record)[1] == hist
        legacy = {**record, protocol.HIST_POS_BINS: hist["pos_bins"], protocol.HIST_POS_COUNTS: hist["pos_counts"],
                  protocol.HIST_NEG_BINS: hist["neg_bins"], protocol.HIST_NEG_COUNTS: hist["neg_counts"]}
        assert protocol.decode_eval_metrics(legacy)[1] == hist
    assert lengths == {(20, 20)}
    bad = {**record, protocol.HIST_POS_COUNTS: [1, 2]}
    with pytest.raises(protocol.ProtocolError, match="hist-pos-counts has 2 counts for 20 bins"):
        protocol.decode_eval_metrics(bad)


def test_noisy_histograms_pool_unbiased_and_keep_negative_cells() -> None:
    """DP evaluation replies carry noisy counts, negative ones included (clipping each cell at zero would add a
    positive bias to every empty bin and every pooled sum): pooled over many draws the noisy AUC centres on the
    exact one, and a histogram not marked noisy still refuses a negative count."""
    from fl_client.privacy.evaluation import as_histogram, dense_histogram, histogram_metrics, noisy_counts

    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 4000)
    s = np.clip(rng.normal(0.35 + 0.3 * y, 0.18), 0, 1)
    neg, pos = dense_histogram(y, s, 10)
    exact = metrics_from_histograms([as_histogram(neg, pos)])["auc"]
    aucs = []
    for _ in range(60):
        hists = [as_histogram(noisy_counts(n, 4.0), noisy_counts(p, 4.0), noisy=True)
                 for n, p in ((neg // 4, pos // 4),) * 4]
        pooled = metrics_from_histograms(hists)
        assert pooled["noisy"] is True and pooled["auc_max_abs_error"] is None
        aucs.append(pooled["auc"])
    assert abs(np.mean(aucs) - exact) < 0.01 and np.std(aucs) < 0.03
    one = histogram_metrics(noisy_counts(neg, 4.0), noisy_counts(pos, 4.0), sigma=4.0, n_bootstrap=100)
    assert one["auc_ci_low"] <= one["auc"] <= one["auc_ci_high"]
    with pytest.raises(ValueError, match="must not be negative"):
        metrics_from_histograms([{"n_bins": 2, "pos_bins": [0], "pos_counts": [-1], "neg_bins": [1],
                                  "neg_counts": [3]}])
