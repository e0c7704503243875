"""How well a segmenter draws the thyroid and the nodule: per view, at the frame's own pixels, and per site.

Per view and drawn structure (`overlap_scores`): Dice and IoU of the prediction (probability >= 0.5 on the frame's
pixels, `segmenter_training.predict_frames`; the nodule its largest component) against the drawn mask, and the
95th-percentile Hausdorff distance in mm where the frame is calibrated (MONAI's, with the pixel spacing). An empty
prediction scores Dice 0 and has no Hausdorff distance. The capsule-distance error needs the masks' geometry and is
added at the site (`sitedata.segmentation_inputs.score_view`).

`summarise` turns a site's views into aggregates that may leave the site: counts, means and medians per structure,
never a per-view value.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from shared_model.model.segmenter import STRUCTURES
from shared_model.model.segmenter_data import largest_component

__all__ = ["overlap_scores", "predicted_masks", "summarise"]


def predicted_masks(frame_probabilities: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The predicted masks (probability >= 0.5 on the frame's pixels); the nodule is its largest connected component
    only (one nodule per view, as the data contract has it)."""
    out = {name: frame_probabilities[name] >= 0.5 for name in STRUCTURES}
    out["nodule"] = largest_component(out["nodule"])
    return out


def _overlap(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    inter = float(np.logical_and(pred, truth).sum())
    total = float(pred.sum() + truth.sum())
    union = total - inter
    dice = 2.0 * inter / total if total else 1.0
    iou = inter / union if union else 1.0
    return dice, iou


def _hd95_mm(pred: np.ndarray, truth: np.ndarray, spacing_mm: tuple[float, float]) -> float | None:
    if not pred.any() or not truth.any():
        return None
    import torch
    from monai.metrics import compute_hausdorff_distance

    with warnings.catch_warnings():  # MONAI 1.6 warns about an argument its own code passes
        warnings.simplefilter("ignore", FutureWarning)
        value = compute_hausdorff_distance(torch.from_numpy(pred)[None, None].float(),
                                           torch.from_numpy(truth)[None, None].float(), include_background=True,
                                           percentile=95, spacing=list(spacing_mm))
    return float(value.reshape(-1)[0])


def overlap_scores(pred: dict[str, np.ndarray], drawn: dict[str, np.ndarray],
                   spacing_mm: tuple[float, float] | None) -> dict[str, Any]:
    """Per structure with a non-empty drawn mask: ``dice``, ``iou`` and ``hd95_mm`` (None when uncalibrated or
    either mask is empty) of the predicted mask against it."""
    out: dict[str, Any] = {}
    for name in STRUCTURES:
        truth = drawn.get(name)
        if truth is None or not truth.any():
            continue
        dice, iou = _overlap(pred[name], truth)
        out[name] = {"dice": dice, "iou": iou,
                     "hd95_mm": _hd95_mm(pred[name], truth, spacing_mm) if spacing_mm else None}
    return out


def summarise(scores: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """A site's aggregates over its scored views: per structure the count, mean and median Dice and IoU, the mean
    and median HD95 (mm, calibrated views only); the capsule-distance error's count, mean, mean absolute value and
    the share within 1 mm."""

    def stats(values: list[float]) -> dict[str, float | None]:
        return {"mean": float(np.mean(values)) if values else None,
                "median": float(np.median(values)) if values else None}

    out: dict[str, Any] = {}
    for name in STRUCTURES:
        rows = [s[name] for s in scores if name in s]
        hd = [r["hd95_mm"] for r in rows if r["hd95_mm"] is not None]
        out[name] = {"n": len(rows), "dice": stats([r["dice"] for r in rows]), "iou": stats([r["iou"] for r in rows]),
                     "hd95_mm": stats(hd) | {"n": len(hd)}}
    errors = [s["capsule_error_mm"] for s in scores if "capsule_error_mm" in s]
    out["capsule_error_mm"] = {"n": len(errors), "mean": float(np.mean(errors)) if errors else None,
                               "mean_abs": float(np.mean(np.abs(errors))) if errors else None,
                               "within_1mm": float(np.mean(np.abs(errors) <= 1.0)) if errors else None}
    return out
