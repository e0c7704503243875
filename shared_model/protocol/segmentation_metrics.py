"""The evaluate reply of a segmentation round (`task: segment`): a site's sums over its scored views, and how the
coordinator reads and pools them.

A site scores every view of the evaluated split that has a drawn mask (`shared_model.evaluation.segmentation`) and
sends, per structure, the views scored and the sums of their Dice, IoU and (calibrated views) 95th-percentile
Hausdorff distance, and for the capsule distance (views with both structures drawn and found) the count and the sums
of the signed and absolute errors and of the views within 1 mm. Sums and counts, not means, so that the coordinator
pools the sites exactly (or, for differentially private replies, adds the noisy sums as they are) and never sees a
view's own score. Every value a view adds lies in [0, 1] after the bounds below (`view_vector`): that bounds what one
patient can change, which is what a DP reply's noise is calibrated to (`fl_client.privacy.evaluation`).

An exact reply adds each structure's median Dice (not poolable, shown per site). Every key is always present (NaN
where undefined), as Flower needs the same keys from every site.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from shared_model import protocol
from shared_model.model.segmenter import STRUCTURES
from shared_model.numbers import none_if_nan

__all__ = ["CAPSULE_CAP_MM", "HD95_CAP_MM", "SUM_KEYS", "decode", "encode", "pool", "view_sums", "view_vector"]

#: A view's 95th-percentile Hausdorff distance counts at most this much: one grossly wrong mask must not decide a
#: site's mean, and a DP reply needs every value bounded.
HD95_CAP_MM = 20.0
#: A view's capsule-distance error counts at most this much either way (the paper's finding is a 2.5 mm step).
CAPSULE_CAP_MM = 5.0

#: The reply's summed values, in the order of `view_vector`: per structure its count, Dice, IoU, calibrated count
#: and HD95 / HD95_CAP_MM; then the capsule count, signed and absolute error / CAPSULE_CAP_MM and views within 1 mm.
SUM_KEYS: tuple[str, ...] = tuple(
    [f"seg-{s}-{k}" for s in STRUCTURES for k in ("n", "dice-sum", "iou-sum", "hd95-n", "hd95-sum")]
    + ["seg-capsule-n", "seg-capsule-sum", "seg-capsule-abs-sum", "seg-capsule-within-1mm"])
#: Exact replies only (NaN in a DP reply): the median Dice of each structure.
MEDIAN_KEYS: tuple[str, ...] = tuple(f"seg-{s}-dice-median" for s in STRUCTURES)
#: A DP reply's epsilon and the standard deviation of the noise on each sum; absent from an exact reply.
DP_EPSILON = "seg-dp-epsilon"
DP_DELTA = "seg-dp-delta"
DP_SIGMA = "seg-dp-sigma"
#: The views the reply scored (exact replies; a DP reply sends the noisy count of its first structure's views).
VIEWS = "seg-views"


def view_vector(score: Mapping[str, Any]) -> np.ndarray:
    """One view's contribution to the sums (`SUM_KEYS` order), each value in [0, 1] or, for the signed capsule
    error, in [-1, 1]: the input is `shared_model.sitedata.segmentation_inputs.score_view`'s result."""
    out: list[float] = []
    for s in STRUCTURES:
        row = score.get(s)
        if row is None:
            out += [0.0] * 5
            continue
        hd = row.get("hd95_mm")
        out += [1.0, float(np.clip(row["dice"], 0, 1)), float(np.clip(row["iou"], 0, 1)),
                0.0 if hd is None else 1.0, 0.0 if hd is None else float(min(hd, HD95_CAP_MM) / HD95_CAP_MM)]
    error = score.get("capsule_error_mm")
    if error is None:
        out += [0.0] * 4
    else:
        bounded = float(np.clip(error, -CAPSULE_CAP_MM, CAPSULE_CAP_MM))
        out += [1.0, bounded / CAPSULE_CAP_MM, abs(bounded) / CAPSULE_CAP_MM, float(abs(error) <= 1.0)]
    return np.asarray(out, dtype=np.float64)


def view_sums(scores: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """The sums of the views' `view_vector`s (`SUM_KEYS` order): what a reply releases."""
    return np.sum([view_vector(s) for s in scores], axis=0) if scores else np.zeros(len(SUM_KEYS))


def encode(scores: Sequence[Mapping[str, Any]], *, sums: np.ndarray | None = None,
           dp: Mapping[str, float] | None = None) -> dict[str, Any]:
    """An evaluate reply's MetricRecord values. Exact: from the views' `scores`. DP: `sums` are the noisy sums
    (the site's release) and `dp` its ``epsilon``, ``delta`` and ``sigma``; no median and no exact count is sent."""
    exact = sums is None
    total = view_sums(scores) if exact else np.asarray(sums, dtype=np.float64)
    out: dict[str, Any] = {k: float(v) for k, v in zip(SUM_KEYS, total, strict=True)}
    for s, key in zip(STRUCTURES, MEDIAN_KEYS, strict=True):
        dice = [float(v[s]["dice"]) for v in scores if s in v] if exact else []
        out[key] = float(np.median(dice)) if dice else math.nan
    views = len(scores) if exact else max(round(out[SUM_KEYS[0]]), 0)
    out[VIEWS] = views
    out[protocol.NUM_EXAMPLES] = views
    if dp is not None:
        out.update({DP_EPSILON: float(dp["epsilon"]), DP_DELTA: float(dp["delta"]), DP_SIGMA: float(dp["sigma"])})
    return out


def _ratio(num: float, den: float, scale: float = 1.0) -> float | None:
    # A noisy count can be near zero or negative: no mean is defined from under one view.
    if den < 1.0:
        return None
    return float(num / den * scale)


def _summary(sums: Mapping[str, float], *, noisy: bool) -> dict[str, Any]:
    """Means from sums. Noisy means are clipped to each value's range (post-processing)."""

    def bounded(value: float | None, lo: float, hi: float) -> float | None:
        return None if value is None else (float(np.clip(value, lo, hi)) if noisy else value)

    out: dict[str, Any] = {}
    for s in STRUCTURES:
        n, hd_n = sums[f"seg-{s}-n"], sums[f"seg-{s}-hd95-n"]
        out[s] = {"n": max(round(n), 0),
                  "dice": bounded(_ratio(sums[f"seg-{s}-dice-sum"], n), 0, 1),
                  "iou": bounded(_ratio(sums[f"seg-{s}-iou-sum"], n), 0, 1),
                  "hd95_mm": bounded(_ratio(sums[f"seg-{s}-hd95-sum"], hd_n, HD95_CAP_MM), 0, HD95_CAP_MM),
                  "hd95_n": max(round(hd_n), 0)}
    n = sums["seg-capsule-n"]
    out["capsule_error_mm"] = {
        "n": max(round(n), 0),
        "mean": bounded(_ratio(sums["seg-capsule-sum"], n, CAPSULE_CAP_MM), -CAPSULE_CAP_MM, CAPSULE_CAP_MM),
        "mean_abs": bounded(_ratio(sums["seg-capsule-abs-sum"], n, CAPSULE_CAP_MM), 0, CAPSULE_CAP_MM),
        "within_1mm": bounded(_ratio(sums["seg-capsule-within-1mm"], n), 0, 1)}
    dice = [out[s]["dice"] for s in STRUCTURES if out[s]["dice"] is not None]
    # The model-selection criterion: the mean of the measured structures' mean Dice (a data set may outline the
    # nodule only).
    out["dice"] = float(np.mean(dice)) if dice else None
    return out


def decode(record: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, float]]:
    """(the site's summary, its sums) from an evaluate reply's metrics record."""
    try:
        sums = {k: float(record[k]) for k in SUM_KEYS}
        noisy = DP_SIGMA in record
        site = _summary(sums, noisy=noisy)
        for s, key in zip(STRUCTURES, MEDIAN_KEYS, strict=True):
            site[s]["dice_median"] = none_if_nan(float(record[key]))
        site["n"] = int(record[VIEWS])
        if noisy:
            site["dp"] = {"epsilon": float(record[DP_EPSILON]), "delta": float(record[DP_DELTA]),
                          "sigma": float(record[DP_SIGMA])}
    except KeyError as exc:
        raise protocol.ProtocolError(f"segmentation evaluate reply: metrics record lacks {exc.args[0]!r}") from None
    return site, sums


def pool(site_sums: Iterable[Mapping[str, float]], *, noisy: bool) -> dict[str, Any]:
    """The pooled summary: the sites' sums added (noisy sums as they are: clipping each would bias the total)."""
    rows = list(site_sums)
    if not rows:
        return {}
    return _summary({k: float(sum(r[k] for r in rows)) for k in SUM_KEYS}, noisy=noisy)
