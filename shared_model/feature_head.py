"""A small per-view head on frozen public features (`shared_model.public_features`): the model to train under DP.

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
from torch import Tensor, nn

from shared_model.config import ModelConfig
from shared_model.modeling import ModelOutput
from shared_model.public_features import IMAGE_DIM

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
        self.image_head = nn.Linear(IMAGE_DIM, 1)
        self.text_head = nn.Linear(config.text_dim, 1, bias=False)
        self.scalar_in = nn.Linear(2 * c, config.feature_hidden)
        self.scalar_out = nn.Linear(config.feature_hidden, 1, bias=False)
        for layer in (self.image_head, self.text_head, self.scalar_out):
            nn.init.zeros_(layer.weight)  # start at the prior: every patient scores 0.5
        nn.init.zeros_(self.image_head.bias)

    def forward(self, image: Tensor, view_mask: Tensor, text: Tensor, text_mask: Tensor, clinical: Tensor,
                clinical_mask: Tensor) -> ModelOutput:
        """`image` [B, 2, IMAGE_DIM] view features, `text` [B, 1, D] the pooled report (see module docstring)."""
        del view_mask  # missing views have zero features; the patient probability averages present views
        img = self.image_head(_normalise(image.float())).squeeze(-1)  # [B, 2]
        rep = self.text_head(_normalise(text[:, 0].float()) * text_mask[:, :1].float())  # [B, 1]
        mask = clinical_mask.float()
        scal = torch.cat([torch.nan_to_num(clinical.float()) * mask, mask], dim=-1)  # [B, 2, 2C]
        hidden = torch.tanh(self.scalar_in(scal))
        sc = self.scalar_out(hidden).squeeze(-1)  # [B, 2]
        return ModelOutput(llnm_logits=img + rep + sc, stage_logits=None)
