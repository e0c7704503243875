"""Metrics of the 3-class risk-stage head (the paper's second task), per site.

One-vs-rest ROC AUC per class (scikit-learn), their macro mean over the classes where it is defined, accuracy
and the confusion matrix. A class that is absent from the labels, or the only one present, has no AUC (None);
the macro mean is then over the others, and None when no class has one.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["stage_metrics"]


def stage_metrics(stage: Any, stage_prob: Any) -> dict[str, Any]:
    """`stage` ``[N]`` integer labels (-1 unknown, left out), `stage_prob` ``[N, K]`` class probabilities."""
    from sklearn.metrics import confusion_matrix, roc_auc_score

    labels = np.asarray(stage).astype(int).ravel()
    probs = np.asarray(stage_prob, dtype=float)
    if probs.ndim != 2 or probs.shape[0] != labels.shape[0]:
        raise ValueError(f"stage_prob must be [N, K] with N={labels.shape[0]}, got {list(probs.shape)}")
    k = probs.shape[1]
    known = labels >= 0
    if (labels[known] >= k).any():
        raise ValueError(f"stage labels must be in 0..{k - 1} (or -1 for unknown), got {int(labels.max())}")
    y, p = labels[known], probs[known]
    aucs: list[float | None] = []
    for c in range(k):
        hit = y == c
        aucs.append(float(roc_auc_score(hit, p[:, c])) if 0 < hit.sum() < len(y) else None)
    defined = [a for a in aucs if a is not None]
    return {
        "n": int(known.sum()),
        "auc": aucs,
        "auc_macro": float(np.mean(defined)) if defined else None,
        "accuracy": float((p.argmax(axis=1) == y).mean()) if len(y) else None,
        "confusion": confusion_matrix(y, p.argmax(axis=1), labels=list(range(k))).tolist() if len(y) else None,
    }
