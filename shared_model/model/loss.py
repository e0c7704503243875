"""The LLNM-Net training loss, and which views stand for a patient (shared by the loss and the model's score).

`llnm_loss` is the per-patient loss Opacus needs (``loss_reduction="mean"`` over the batch, every parameter kept in
the graph); `view_weights` says which views a patient's loss and probability average over, and
`patient_probability` / `patient_stage_probability` make the patient's prediction from the views'.

How views combine (``ModelOutput.view_fusion``, set from ``ModelConfig.view_fusion``):

* ``probability`` (the paper's per-orientation average): every view is trained on its own to predict the label and
  the patient's probability is the mean of the views' probabilities. Each view then learns what it alone shows,
  and the mean of two such predictions is not the prediction from both: a transverse view shows the capsule
  distance, a longitudinal one the lobe third, and averaging their probabilities dilutes each.
* ``logit``: the patient's logit is the mean of the views' logits, and the loss is on it, so the views are trained
  together and their evidence adds up on the log-odds scale, as independent findings do.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from shared_model.model.outputs import ModelOutput

__all__ = ["llnm_loss", "patient_probability", "patient_stage_probability", "view_weights"]


def view_weights(view_mask: Tensor) -> Tensor:
    """Per-view weights ``[B, V]``: the present views, or view 0 alone when a patient has no view.

    Without any image the network still sees the report and clinical tokens (and the "no image"
    placeholder), so view 0's output is the text-and-clinical-only prediction.
    """
    w = (view_mask > 0.5).to(torch.float32)
    none = w.sum(dim=1, keepdim=True) == 0
    first = torch.zeros_like(w)
    first[:, 0] = 1.0
    return torch.where(none, first, w)


def _normalised_weights(view_mask: Tensor, device: torch.device) -> Tensor:
    w = view_weights(view_mask).to(device)
    return w / w.sum(dim=1, keepdim=True)


def patient_probability(out: ModelOutput, view_mask: Tensor) -> Tensor:
    """Patient LLNM probability ``[B]`` over the present views (view 0 if none), fused as ``out.view_fusion`` says."""
    logits = out.llnm_logits.float()
    w = _normalised_weights(view_mask, logits.device)
    if out.view_fusion == "logit":
        return torch.sigmoid((logits * w).sum(dim=1))
    return (torch.sigmoid(logits) * w).sum(dim=1)


def patient_stage_probability(out: ModelOutput, view_mask: Tensor) -> Tensor | None:
    """Patient risk-stage probabilities ``[B, num_stages]`` (None without the head), fused like the LLNM score."""
    if out.stage_logits is None:
        return None
    logits = out.stage_logits.float()
    w = _normalised_weights(view_mask, logits.device).unsqueeze(-1)
    if out.view_fusion == "logit":
        return torch.softmax((logits * w).sum(dim=1), dim=-1)
    return (torch.softmax(logits, dim=-1) * w).sum(dim=1)


def llnm_loss(
    out: ModelOutput,
    llnm: Tensor,
    stage: Tensor,
    view_mask: Tensor,
    stage_weight: float = 0.5,
    normalize: Literal["batch", "labelled"] = "batch",
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-patient loss averaged over the batch.

    Patient i's loss is ``bce_i + stage_weight * ce_i``, counted only if ``llnm_i >= 0`` (``stage_i >= 0``). With
    ``out.view_fusion == "probability"`` they are the BCE-with-logits and the stage cross-entropy of each view,
    averaged over the patient's present views (the paper's per-orientation average); with ``"logit"`` they are
    the BCE and cross-entropy of the patient's fused logits (the mean of the present views' logits).

    ``normalize="batch"`` (default) divides the sum by B, the number of patients in the batch: this is the
    ``loss_reduction="mean"`` Opacus assumes, so each per-sample gradient is exactly the gradient of that
    patient's own loss. ``"labelled"`` divides by the number of LLNM-labelled patients instead (non-private
    training on partly unlabelled data; not for DP-SGD).

    A ``0 * logits.sum()`` term keeps every parameter in the graph when a batch has no labels, so Opacus
    still receives (zero) per-sample gradients.

    Returns:
        ``(loss, parts)`` with detached tensors ``bce`` (mean over labelled patients), ``stage_ce`` (mean
        over staged patients), ``labelled`` and ``staged`` (counts).
    """
    logits = out.llnm_logits.float()
    b = logits.shape[0]
    if tuple(view_mask.shape) != tuple(logits.shape):
        raise ValueError(f"view_mask must be {list(logits.shape)}, got {list(view_mask.shape)}")
    if llnm.shape != (b,) or stage.shape != (b,):
        raise ValueError(
            f"llnm and stage must be [B] = [{b}], got {list(llnm.shape)} and {list(stage.shape)}"
        )
    w = _normalised_weights(view_mask, logits.device)
    fused = out.view_fusion == "logit"

    labelled = llnm >= 0
    target = torch.where(labelled, llnm.float(), torch.zeros_like(llnm, dtype=torch.float32))
    if fused:
        bce = F.binary_cross_entropy_with_logits((logits * w).sum(dim=1), target, reduction="none")
    else:
        bce_view = F.binary_cross_entropy_with_logits(logits, target[:, None].expand_as(logits), reduction="none")
        bce = (bce_view * w).sum(dim=1)
    bce = bce * labelled.float()
    per_patient = bce
    keep_in_graph = 0.0 * logits.sum()

    staged = stage >= 0
    ce = torch.zeros_like(bce)
    if out.stage_logits is not None:
        s_logits = out.stage_logits.float()
        k = s_logits.shape[-1]
        s_target = torch.where(staged, stage, torch.zeros_like(stage)).long()
        if fused:
            ce = F.cross_entropy((s_logits * w.unsqueeze(-1)).sum(dim=1), s_target, reduction="none")
        else:
            ce_view = F.cross_entropy(
                s_logits.reshape(-1, k),
                s_target[:, None].expand(b, s_logits.shape[1]).reshape(-1),
                reduction="none",
            ).view(b, s_logits.shape[1])
            ce = (ce_view * w).sum(dim=1)
        ce = ce * staged.float()
        per_patient = per_patient + stage_weight * ce
        keep_in_graph = keep_in_graph + 0.0 * s_logits.sum()
    else:
        staged = torch.zeros_like(staged)

    n_lab = labelled.sum()
    n_staged = staged.sum()
    if normalize == "batch":
        denom = max(b, 1)
    elif normalize == "labelled":
        denom = n_lab.clamp(min=1).float()
    else:
        raise ValueError(f"normalize must be 'batch' or 'labelled', got {normalize!r}")
    loss = per_patient.sum() / denom + keep_in_graph
    parts = {
        "bce": (bce.sum() / n_lab.clamp(min=1)).detach(),
        "stage_ce": (ce.sum() / n_staged.clamp(min=1)).detach(),
        "labelled": n_lab.detach(),
        "staged": n_staged.detach(),
    }
    return loss, parts
