"""Per-patient test scores of a finished run, and paired bootstrap intervals of AUC differences.

Shared by the benchmarks that compare models on the same test patients (`_privacy_scale.py`,
`bench_fidelity.py`): a run's selected checkpoint is scored in this process on every site's test split, so
two models' AUCs can be compared patient for patient, and the bootstrap resamples patients once for both.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import numpy as np


def score_test_split(exp: Any, rd: Any, metrics: dict[str, Any], sites: list[Path],
                     inputs: list[Any] | None = None) -> dict[str, Any]:
    """Per-patient test scores of the run's selected model at every site (ids are site/patient_id); ``inputs``
    are the sites' `load_site_inputs`, in the order of ``sites``, when the caller has them already."""
    from shared_model.model.architectures import build_model
    from shared_model.model.training import predict
    from shared_model.sitedata.model_inputs import load_site_inputs, make_dataset

    rnd = int((metrics.get("final") or {}).get("round") or metrics.get("best_round") or exp.federation.rounds)
    model = build_model(exp.architecture())
    model.load_state_dict(rd.load_checkpoint(rnd))
    ids, ys, ss = [], [], []
    if inputs is None:
        inputs = [load_site_inputs(site, exp.preprocess, exp.architecture(), cache_dir=exp.data.cache_dir)
                  for site in sites]
    for site, site_inputs in zip(sites, inputs, strict=True):
        test = site_inputs.subset("test")
        preds = predict(model, make_dataset(test), device="cpu")
        keep = preds["llnm"] >= 0
        ids += [f"{site.name}/{pid}" for pid, k in zip(test.patient_ids, keep, strict=True) if k]
        ys.append(preds["llnm"][keep].astype(int))
        ss.append(preds["score"][keep])
    return {"ids": np.array(ids), "y": np.concatenate(ys), "score": np.concatenate(ss), "round": rnd}


def auc(y: np.ndarray, s: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, s))


def paired_difference(y: np.ndarray, reference: np.ndarray, others: list[np.ndarray], n_boot: int,
                      seed: int = 0) -> dict[str, Any]:
    """Mean over ``others`` of AUC(reference) - AUC(other) on the same patients, with a 95% paired bootstrap CI
    (patients resampled once per draw for the reference and every other score)."""
    point = statistics.mean(auc(y, reference) - auc(y, s) for s in others)
    rng = np.random.default_rng(seed)
    draws = []
    n = len(y)
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        if y[idx].min() == y[idx].max():
            continue
        draws.append(statistics.mean(auc(y[idx], reference[idx]) - auc(y[idx], s[idx]) for s in others))
    lo, hi = np.percentile(draws, [2.5, 97.5]) if draws else (float("nan"), float("nan"))
    return {"mean": round(point, 4), "ci95": [round(float(lo), 4), round(float(hi), 4)],
            "bootstrap_draws": len(draws), "per_run": [round(auc(y, reference) - auc(y, s), 4) for s in others]}


def align(ref_ids: np.ndarray, ids: np.ndarray) -> None:
    """Refuse to pair scores of different test patients."""
    if not np.array_equal(ref_ids, ids):
        raise RuntimeError("runs were scored on different test patients; their AUCs cannot be paired")
