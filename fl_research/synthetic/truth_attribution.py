"""The generator's own feature attribution: integrated gradients of its risk function, per patient.

A learned model's explanation (`fl_client.explain`) is held against the paper's feature-group shares. That
comparison alone cannot say whether a gap is the model's or the data's: a consortium whose risk function puts
little weight on location cannot teach a model the paper's 48.8% location share. So the generator computes the
same quantity on its own risk function, the truth a model could recover at best:

* inputs are the risk model's features as numbers: capsule distance and size in mm, age in years, 0/1 flags
  (left lobe, microcalcifications, taller-than-wide, male, report-only node finding) and a one-hot code per
  categorical feature (third, margin, echogenicity, composition);
* the target is the patient's LLNM probability, ``expit(site intercept + sum of the feature terms)``;
* the baseline is the mean input of the patients attributed (every one-hot at its category frequencies), the
  "average patient" (a zero input has no meaning here: capsule distance 0 is extrathyroidal extension);
* integrated gradients along the straight path from the baseline, by the midpoint rule
  (:data:`IG_STEPS` points; the gradient is analytic);
* a feature's attribution is the sum over its inputs (a categorical's one-hot components together), and a
  group's total is the sum of its features' absolute attributions, as the sites sum absolute attributions of
  their inputs;
* a patient's shares are the group totals over their sum; the consortium's shares are the means over patients.

The groups are the paper's four: location (capsule distance, third, lobe side), morphology (size, margin,
echogenicity, composition, microcalcifications, shape), report (the report-only lymph-node finding, the one
risk feature that only the report carries) and demographics (age, sex).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import pandas as pd
from scipy import special

from shared_model.evaluation.explanation import PAPER_FEATURE_SHARES

from .profiles import SiteProfile
from .risk_model import (
    COMPOSITIONS,
    ECHOGENICITIES,
    FEATURES,
    MARGINS,
    THIRDS,
    RiskModel,
    _codes,
    site_intercept,
)

__all__ = ["IG_STEPS", "PAPER_GROUPS", "PAPER_GROUP_OF_FEATURE", "feature_attributions", "group_shares",
           "probability_at", "risk_inputs", "site_intercepts"]

#: Points of the midpoint rule along the path (the completeness error is below 1e-4 of a probability at 64).
IG_STEPS = 64
#: The paper's four feature groups, in the order the sites' explanations report them.
PAPER_GROUPS: tuple[str, ...] = tuple(PAPER_FEATURE_SHARES)
PAPER_GROUP_OF_FEATURE: dict[str, str] = {
    "capsule": "location", "third": "location", "lobe": "location",
    "size": "morphology", "margin": "morphology", "echogenicity": "morphology", "composition": "morphology",
    "microcalc": "morphology", "shape": "morphology",
    "node": "report",
    "age": "demographics", "sex": "demographics",
}


def _one_hot(values: pd.Series, categories: tuple[str, ...]) -> np.ndarray:
    return np.eye(len(categories))[_codes(values, categories)]


def risk_inputs(df: pd.DataFrame) -> dict[str, np.ndarray]:
    """The risk function's inputs as ``[n, k]`` arrays, one entry per feature of :data:`FEATURES`."""
    def col(name: str, kind: type) -> np.ndarray:
        return df[name].to_numpy(kind).astype(float)[:, None]

    sex = df["sex"].to_numpy()
    if not np.isin(sex, ("F", "M")).all():
        raise ValueError(f"sex must be F or M, got {sorted(set(sex.tolist()) - {'F', 'M'})}")
    return {
        "capsule": col("capsule_mm", float),
        "third": _one_hot(df["third"], THIRDS),
        "lobe": (df["lobe"].to_numpy() == "left").astype(float)[:, None],
        "size": col("size_mm", float),
        "margin": _one_hot(df["margin"], MARGINS),
        "echogenicity": _one_hot(df["echogenicity"], ECHOGENICITIES),
        "composition": _one_hot(df["composition"], COMPOSITIONS),
        "microcalc": col("microcalcifications", bool),
        "shape": col("taller_than_wide", bool),
        "age": col("age", float),
        "sex": (sex == "M").astype(float)[:, None],
        "node": col("node_finding", bool),
    }


def _term_and_gradient(feature: str, x: np.ndarray, model: RiskModel) -> tuple[np.ndarray, np.ndarray]:
    """The feature's logit term ``[n]`` at inputs ``x`` ``[n, k]`` and its gradient ``[n, k]``."""
    if feature == "capsule":
        term = model.capsule_beta * np.exp(-x[:, 0] / model.capsule_decay_mm)
        return term, (-term / model.capsule_decay_mm)[:, None]
    if feature == "size":
        size = np.maximum(x[:, 0], 1e-9)
        return (model.size_beta_per_doubling * np.log2(size / model.size_ref_mm),
                (model.size_beta_per_doubling / (size * np.log(2.0)))[:, None])
    weights = {
        "third": model.third_beta, "margin": model.margin_beta, "echogenicity": model.echo_beta,
        "composition": model.composition_beta, "lobe": (model.left_beta,), "microcalc": (model.microcalc_beta,),
        "shape": (model.ttw_beta,), "sex": (model.male_beta,), "node": (model.node_beta,),
        "age": (model.age_beta_per_year,),
    }[feature]
    w = np.asarray(weights, dtype=float)
    shift = -model.age_beta_per_year * model.age_ref if feature == "age" else 0.0
    return x @ w + shift, np.broadcast_to(w, x.shape)


def feature_attributions(
    patients: pd.DataFrame,
    intercepts: np.ndarray | float,
    model: RiskModel,
    *,
    baseline: Mapping[str, np.ndarray] | None = None,
    steps: int = IG_STEPS,
) -> pd.DataFrame:
    """Integrated-gradients attribution of each patient's LLNM probability to each feature (columns: FEATURES).

    ``intercepts`` is each patient's site intercept (or one for all). ``baseline`` maps each feature to its
    baseline input (``[k]``); by default the mean input of ``patients``. Rows sum to the probability minus the
    baseline's probability (completeness), up to the midpoint rule's error.
    """
    x = risk_inputs(patients)
    n = len(patients)
    base = {f: np.asarray(baseline[f], float) if baseline is not None else x[f].mean(axis=0) for f in FEATURES}
    intercept = np.broadcast_to(np.asarray(intercepts, float), (n,))
    alphas = (np.arange(steps) + 0.5) / steps
    total = {f: np.zeros(n) for f in FEATURES}
    for a in alphas:
        point = {f: base[f][None, :] + a * (x[f] - base[f][None, :]) for f in FEATURES}
        terms, grads = {}, {}
        for f in FEATURES:
            terms[f], grads[f] = _term_and_gradient(f, point[f], model)
        p = special.expit(intercept + np.sum([terms[f] for f in FEATURES], axis=0))
        slope = p * (1.0 - p)
        for f in FEATURES:
            total[f] += slope * ((x[f] - base[f][None, :]) * grads[f]).sum(axis=1)
    return pd.DataFrame({f: total[f] / steps for f in FEATURES}, index=patients.index)


def probability_at(inputs: Mapping[str, np.ndarray], intercepts: np.ndarray | float, model: RiskModel) -> np.ndarray:
    """The risk function itself: LLNM probability at ``inputs`` (as :func:`risk_inputs` gives them)."""
    logit = np.sum([_term_and_gradient(f, np.atleast_2d(inputs[f]), model)[0] for f in FEATURES], axis=0)
    return special.expit(np.asarray(intercepts, float) + logit)


def group_shares(attributions: pd.DataFrame, groups: Mapping[str, str] = PAPER_GROUP_OF_FEATURE,
                 order: Iterable[str] = PAPER_GROUPS) -> dict[str, float]:
    """Mean over patients of each group's share of the patient's total absolute attribution."""
    names = list(order)
    totals = np.stack([attributions[[f for f, g in groups.items() if g == name]].abs().sum(axis=1).to_numpy()
                       for name in names], axis=1)
    sums = totals.sum(axis=1)
    ok = sums > 0
    if not ok.any():
        return dict.fromkeys(names, 0.0)
    shares = totals[ok] / sums[ok, None]
    return {name: float(v) for name, v in zip(names, shares.mean(axis=0), strict=True)}


def site_intercepts(patients: pd.DataFrame, profiles: Mapping[str, SiteProfile], model: RiskModel) -> np.ndarray:
    """Each patient's site intercept, from a ``site`` column naming its profile (one solve per site)."""
    by_site = {name: site_intercept(profiles[name], model) for name in patients["site"].unique()}
    return patients["site"].map(by_site).to_numpy(float)
