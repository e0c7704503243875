"""Integrated gradients (captum) of the patient's LLNM probability, summed into feature groups.

The attributed inputs are the model's own: the three feature images of each view, the report token states and
the per-view scalars, each against a zero baseline (empty feature images, no report content, every scalar at
its centre). A group's total is the sum of the absolute attributions of its inputs over both views; a
patient's shares are the group totals over their sum. Two-level variables are 0/1 inputs and are attributed
like numbers; a categorical variable of more levels enters through a one-hot code of its level, which has no
gradient, so integrated gradients gives it nothing (its share is 0, and `llnm-site explain` says so).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from shared_model.model.modeling import LLNMNet
from shared_model.sitedata.tensors import SiteTensors

__all__ = ["group_totals"]


def _attributed(model: LLNMNet) -> tuple[str, ...]:
    c = model.config
    names = (("image",) if c.images else ()) + (("text",) if c.reports else ())
    return names + (("clinical",) if c.num_clinical else ())


def group_totals(model: LLNMNet, tensors: SiteTensors, *, steps: int = 32, batch_size: int = 16,
                 baseline: dict[str, torch.Tensor] | None = None, signed_groups: bool = False) -> np.ndarray:
    """``[N, G]`` absolute attribution per patient and feature group (`explanation.feature_groups` order).

    What a site sends uses the defaults: the zero baseline, which depends on no patient (so one patient's data
    moves only its own shares, as the noisy explanation's sensitivity assumes), and the sum of the absolute
    attributions of a group's inputs. A research comparison with the generator's own attribution
    (`fl_research.synthetic.truth_attribution`) uses its definition instead: ``baseline`` maps ``image``,
    ``text`` and ``clinical`` to one patient's worth of baseline input (the mean patient), and with
    ``signed_groups`` a group's attribution is the absolute value of the signed sum over its inputs (its
    contribution to the probability, by completeness), as the generator attributes a feature.
    """
    from captum.attr import IntegratedGradients

    model.eval()
    names = _attributed(model)

    def forward(*args: torch.Tensor) -> torch.Tensor:
        given = dict(zip(names, args[: len(names)], strict=True))
        image, view_mask, text, text_mask, clinical, clinical_mask = args[len(names):]
        out = model(given.get("image", image), view_mask, given.get("text", text), text_mask,
                    given.get("clinical", clinical), clinical_mask)
        return LLNMNet.patient_probability(out, view_mask)

    ig = IntegratedGradients(forward)
    rows: list[np.ndarray] = []
    n = len(tensors.patient_ids)
    for start in range(0, n, batch_size):
        sl = slice(start, min(n, start + batch_size))
        batch = {k: getattr(tensors, k)[sl] for k in ("image", "view_mask", "text", "text_mask", "clinical",
                                                     "clinical_mask")}
        inputs = tuple(batch[k] for k in names)
        extra = tuple(batch[k] for k in ("image", "view_mask", "text", "text_mask", "clinical", "clinical_mask"))
        bases = tuple(torch.zeros_like(x) if baseline is None else baseline[k].to(x.dtype).expand_as(x)
                      for k, x in zip(names, inputs, strict=True))
        attr = ig.attribute(inputs, baselines=bases,
                            additional_forward_args=extra, n_steps=steps, internal_batch_size=batch_size * 4)
        attr = dict(zip(names, attr, strict=True))
        if not signed_groups:
            attr = {k: v.abs() for k, v in attr.items()}
        parts: list[torch.Tensor] = []
        if "image" in attr:  # [B, V, 3, S, S] -> one column per channel
            parts.append(attr["image"].sum(dim=(1, 3, 4)))
        if "text" in attr:  # [B, L, D] -> one column
            parts.append(attr["text"].sum(dim=(1, 2))[:, None])
        if "clinical" in attr:  # [B, V, C] -> one column per scalar
            parts.append(attr["clinical"].sum(dim=1))
        if signed_groups:
            parts = [p.abs() for p in parts]
        rows.append(torch.cat(parts, dim=1).detach().double().numpy())
    width = sum(3 if k == "image" else 1 if k == "text" else model.config.num_clinical for k in names)
    return np.concatenate(rows) if rows else np.zeros((0, width))


def shares(totals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-patient shares (rows summing to 1) and which patients had any attribution at all."""
    sums = totals.sum(axis=1)
    ok = sums > 0
    out = np.zeros_like(totals)
    out[ok] = totals[ok] / sums[ok, None]
    return out, ok


def describe_method() -> dict[str, Any]:
    return {"method": "integrated gradients", "library": "captum", "baseline": "zero",
            "target": "patient LLNM probability (mean over present views)"}
