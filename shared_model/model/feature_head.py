"""A small per-view head on frozen public features (`shared_model.sitedata.public_features`): the model to train
under DP.

Why: DP-SGD's noise grows with the number of trained parameters (docs/privacy.md). The `tiny` LLNM-Net trains
about 356k; this head trains about 900, on features from public networks that never saw a site's patients.

Per view v: ``logit_v = w_img . n(image_v) + w_txt . n(report) + mlp(scalars_v, their masks) + b``, where
``n`` standardises each feature vector across its own coordinates and scales it to norm ``FEATURE_NORM``
(a per-patient operation: no statistic of other patients enters, so DP-SGD's per-patient analysis holds and
per-patient gradient norms sit near the usual clipping norm of 1). It has the batch interface and outputs of
`LLNMNet` (``forward(image, view_mask, text, text_mask, clinical, clinical_mask) -> ModelOutput``), so
training, evaluation, FedAvg and Opacus use it unchanged; it has no risk-stage head.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shared_model.model.backbone import IMAGE_DIM
from shared_model.model.configuration import ModelConfig
from shared_model.model.outputs import ModelOutput

#: L2 norm of each normalised feature block (image, report).
FEATURE_NORM = 4.0


def _normalise(x: Tensor) -> Tensor:
    """Standardise each vector across its coordinates, then scale it to norm FEATURE_NORM (zeros stay zero)."""
    d = x.shape[-1]
    centred = x - x.mean(dim=-1, keepdim=True)
    std = centred.pow(2).mean(dim=-1, keepdim=True).add(1e-12).sqrt()
    present = (x.abs().sum(dim=-1, keepdim=True) > 0).to(x.dtype)
    return centred / std * (FEATURE_NORM / math.sqrt(d)) * present


class FeatureHeadNet(nn.Module):
    """Per-view linear head on public image and report features plus a small MLP on the scalars."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        c = config.num_clinical
        # Only the pathways of the inputs that exist (every parameter must take part in the loss under Opacus);
        # one bias, on the first part present, is the head's intercept.
        self.image_head = nn.Linear(IMAGE_DIM, 1) if config.images else None
        self.text_head = nn.Linear(config.text_dim, 1, bias=not config.images) if config.reports else None
        # Each scalar enters as its value (or its one-hot level code, for a categorical variable with more than
        # two levels) followed by its known/missing flag.
        self.levels = config.token_levels
        width = sum(max(k, 1) for k in self.levels) + c
        self.scalar_in = nn.Linear(width, config.feature_hidden) if c else None
        self.scalar_out = (nn.Linear(config.feature_hidden, 1, bias=not (config.images or config.reports))
                           if c else None)
        for layer in (self.image_head, self.text_head, self.scalar_out):
            if layer is not None:
                nn.init.zeros_(layer.weight)  # start at the prior: every patient scores 0.5
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)

    def forward(self, image: Tensor, view_mask: Tensor, text: Tensor, text_mask: Tensor, clinical: Tensor,
                clinical_mask: Tensor) -> ModelOutput:
        """`image` [B, 2, IMAGE_DIM] view features, `text` [B, 1, D] the pooled report (see module docstring)."""
        # Missing views have zero features; the patient probability averages present views.
        logits = torch.zeros(view_mask.shape, dtype=torch.float32, device=view_mask.device)  # [B, 2]
        if self.image_head is not None:
            logits = logits + self.image_head(_normalise(image.float())).squeeze(-1)
        if self.text_head is not None:
            logits = logits + self.text_head(_normalise(text[:, 0].float()) * text_mask[:, :1].float())  # [B, 1]
        if self.scalar_in is not None and self.scalar_out is not None:
            mask = clinical_mask.float()
            values = torch.nan_to_num(clinical.float()) * mask
            parts = [values[..., j : j + 1] if not k else
                     F.one_hot(values[..., j].round().long().clamp(0, k - 1), k).float() * mask[..., j : j + 1]
                     for j, k in enumerate(self.levels)]
            scal = torch.cat([*parts, mask], dim=-1)  # [B, 2, width]
            logits = logits + self.scalar_out(torch.tanh(self.scalar_in(scal))).squeeze(-1)
        return ModelOutput(llnm_logits=logits, stage_logits=None, view_fusion=self.config.view_fusion)
