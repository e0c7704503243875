"""Grad-CAM++ maps of each view (torchcam's `GradCAMpp`), for the site's own clinicians.

The hooked layer is the model's `image_tokens` (an identity the image tokens pass after the last
bidirectional block, before they mix with the report in the self-attention blocks), reshaped from
``[B, patches, H]`` to the patch grid ``[B, H, g, g]``. The target is the view's own LLNM logit: the model
runs one view at a time (views never interact before the per-view logits are averaged), so each map is
exactly that view's.
"""

from __future__ import annotations

import numpy as np
import torch

from shared_model.model.modeling import LLNMNet
from shared_model.sitedata.tensors import SiteTensors

__all__ = ["gradcam_pp"]


def gradcam_pp(model: LLNMNet, tensors: SiteTensors, view: int, *, batch_size: int = 16) -> np.ndarray:
    """``[N, g, g]`` Grad-CAM++ map of view `view` for every patient, each scaled to [0, 1] (0 where the view
    is missing)."""
    from torchcam.methods import GradCAMpp

    c = model.config
    if not c.images:
        raise ValueError("the model has no image pathway: there is nothing to draw a Grad-CAM++ map on")
    g = c.image_size // c.patch_size

    def to_grid(tokens: torch.Tensor) -> torch.Tensor:
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], g, g)

    model.eval()
    maps: list[np.ndarray] = []
    v = slice(view, view + 1)
    with GradCAMpp(model, target_layer="image_tokens", reshape_transform=to_grid) as cam:
        for start in range(0, len(tensors.patient_ids), batch_size):
            sl = slice(start, start + batch_size)
            out = model(tensors.image[sl, v], tensors.view_mask[sl, v], tensors.text[sl], tensors.text_mask[sl],
                        tensors.clinical[sl, v], tensors.clinical_mask[sl, v])
            grid = cam(class_idx=0, scores=out.llnm_logits)[0].detach()
            present = tensors.view_mask[sl, view] > 0.5
            grid = torch.nan_to_num(grid) * present[:, None, None]
            maps.append(grid.numpy())
    return np.concatenate(maps) if maps else np.zeros((0, g, g))
