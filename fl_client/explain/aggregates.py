"""The explanation a site may send: aggregates over its patients, never a per-patient value."""

from __future__ import annotations

from typing import Any

import numpy as np

from fl_client.explain.attribution import group_totals, shares
from fl_client.explain.location import location_counts
from shared_model.data import SiteTensors
from shared_model.explanation import MIN_AGGREGATE_PATIENTS, feature_groups
from shared_model.inputs import InputsConfig
from shared_model.modeling import LLNMNet

__all__ = ["site_explanation"]


def site_explanation(model: LLNMNet, tensors: SiteTensors, inputs: InputsConfig, y: np.ndarray,
                     score: np.ndarray, *, steps: int = 32, totals: np.ndarray | None = None) -> dict[str, Any]:
    """``{"n", "shares", "capsule", "third"}``: the mean feature-group shares over the labelled patients with
    any attribution (an empty list when they are fewer than `MIN_AGGREGATE_PATIENTS`), and the location
    counts (`fl_client.explain.location`). `y` and `score` are the patients' labels (-1 unlabelled) and
    probabilities, in the order of `tensors`; `totals` the patients' `group_totals`, when already computed."""
    groups = feature_groups(inputs)
    model = model.cpu()  # the site tensors are on the CPU
    if totals is None:
        totals = group_totals(model, tensors, steps=steps)
    if totals.shape[1] != len(groups):
        raise ValueError(f"attribution has {totals.shape[1]} groups, the inputs define {len(groups)}: {groups}")
    per_patient, ok = shares(totals)
    ok &= y >= 0
    shares_sent = per_patient[ok].mean(axis=0).tolist() if ok.sum() >= MIN_AGGREGATE_PATIENTS else []
    return {"n": int(ok.sum()), "shares": shares_sent, **location_counts(tensors, inputs, y, score)}
