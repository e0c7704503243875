"""The explanation a site may send: aggregates over its patients, never a per-patient value.

Each labelled patient contributes to a few sums: its feature-group shares (non-negative, summing to 1) and a
count to the share sums, and to its capsule-distance bin and its lobe-third bin a count, its label, its
thresholded prediction and its probability. With ``sigma > 0`` every sum gets Gaussian noise of standard
deviation ``sigma * EXPLANATION_SENSITIVITY`` (one patient's contributions have at most that L2 norm), so the
aggregates are one release of the Gaussian mechanism at the noise of one evaluate reply
(`fl_client.privacy.evaluation`). Then, as post-processing, a cell whose (noisy) patient count is below the
site's ``min-cell-count`` is suppressed: its counts are sent as `protocol.SUPPRESSED_CELL` and its probability
sum as NaN, and shares over fewer patients are not sent. With ``sigma = 0`` (a site that evaluates exactly) the
same suppression applies to the exact counts.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from fl_client.explain.attribution import group_totals, shares
from fl_client.explain.location import capsule_bin, patient_locations
from fl_client.privacy.evaluation import EXPLANATION_SENSITIVITY, noisy_counts
from shared_model import protocol
from shared_model.config.inputs import InputsConfig
from shared_model.evaluation.explanation import (
    CAPSULE_BIN_EDGES_MM,
    LOBE_THIRDS,
    MIN_AGGREGATE_PATIENTS,
    feature_groups,
)
from shared_model.model.modeling import LLNMNet
from shared_model.sitedata.tensors import SiteTensors

__all__ = ["site_explanation"]


def site_explanation(model: LLNMNet, tensors: SiteTensors, inputs: InputsConfig, y: np.ndarray,
                     score: np.ndarray, *, steps: int = 32, totals: np.ndarray | None = None, sigma: float = 0.0,
                     min_cell: int = MIN_AGGREGATE_PATIENTS, threshold: float = 0.5) -> dict[str, Any]:
    """``{"n", "shares", "capsule", "third"}`` over the labelled patients (see the module docstring).

    `y` and `score` are the patients' labels (-1 unlabelled) and probabilities, in the order of `tensors`;
    `totals` the patients' `group_totals`, when already computed; `sigma` the noise of one sensitivity-1
    release (0: exact); `min_cell` the fewest patients a sent cell may hold."""
    groups = feature_groups(inputs)
    model = model.cpu()  # the site tensors are on the CPU
    if totals is None:
        totals = group_totals(model, tensors, steps=steps)
    if totals.shape[1] != len(groups):
        raise ValueError(f"attribution has {totals.shape[1]} groups, the inputs define {len(groups)}: {groups}")
    noise = float(sigma) * EXPLANATION_SENSITIVITY
    per_patient, ok = shares(totals)
    ok &= y >= 0
    share_sums = per_patient[ok].sum(axis=0)
    n_shares = float(ok.sum())
    if noise > 0:
        from fl_client.privacy.evaluation import gaussian_noise

        share_sums = share_sums + gaussian_noise(share_sums.shape, noise)
        n_shares = n_shares + float(gaussian_noise(1, noise)[0])
    n_sent = max(round(n_shares), 0)
    clipped = np.clip(share_sums, 0.0, None)
    shares_sent = (clipped / clipped.sum()).tolist() if n_sent >= min_cell and clipped.sum() > 0 else []
    out: dict[str, Any] = {"n": n_sent, "shares": shares_sent}
    if inputs.images:
        capsule, third = patient_locations(tensors, inputs)
        labelled = y >= 0
        out["capsule"] = _cells(capsule_bin(capsule), len(CAPSULE_BIN_EDGES_MM) - 1, labelled, y, score, threshold,
                                noise, min_cell)
        out["third"] = _cells(third, len(LOBE_THIRDS), labelled, y, score, threshold, noise, min_cell)
    return out


def _cells(bins: np.ndarray, k: int, labelled: np.ndarray, y: np.ndarray, score: np.ndarray, threshold: float,
           noise: float, min_cell: int) -> dict[str, list[Any]]:
    """Per bin: patients, observed and predicted positives (ints) and the probability sum, noisy and suppressed."""
    sel = [(bins == b) & labelled for b in range(k)]
    n = np.array([s.sum() for s in sel], dtype=np.float64)
    observed = np.array([(y[s] == 1).sum() for s in sel], dtype=np.float64)
    predicted = np.array([(score[s] >= threshold).sum() for s in sel], dtype=np.float64)
    expected = np.array([score[s].sum() for s in sel], dtype=np.float64)
    n_out, obs_out, pred_out = (noisy_counts(v, noise, clip=True) for v in (n, observed, predicted))
    if noise > 0:
        from fl_client.privacy.evaluation import gaussian_noise

        expected = expected + gaussian_noise(expected.shape, noise)
    out: dict[str, list[Any]] = {"n": [], "observed": [], "predicted": [], "expected": []}
    for b in range(k):
        if n_out[b] < min_cell:
            out["n"].append(protocol.SUPPRESSED_CELL)
            out["observed"].append(protocol.SUPPRESSED_CELL)
            out["predicted"].append(protocol.SUPPRESSED_CELL)
            out["expected"].append(math.nan)
            continue
        count = int(n_out[b])
        out["n"].append(count)
        out["observed"].append(int(min(obs_out[b], count)))
        out["predicted"].append(int(min(pred_out[b], count)))
        out["expected"].append(float(min(max(expected[b], 0.0), count)))
    return out
