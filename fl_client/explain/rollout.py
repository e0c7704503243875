"""Attention rollout over the fusion transformer (Abnar & Zuidema 2020), per patient and view.

Every block's attention (averaged over heads) is mixed with the identity for the residual path,
``0.5 A + 0.5 I``, and the blocks' matrices are multiplied in order. A bidirectional block's image queries
attend to image keys and, with weight ``alpha``, to the text stream's keys (and symmetrically), so its joint
matrix is ``[[A_ii, alpha A_it], [alpha A_ti, A_tt]] / (1 + alpha)``. The model pools by the mean over its
valid tokens, so a token's relevance is the mean of its rollout column over the valid query rows. The
relevances of a view sum to 1 over its tokens: image patches, report tokens (segments or word pieces), the
"no report" slot and one token per scalar.
"""

from __future__ import annotations

from typing import Any

import torch

from shared_model.model.modeling import LLNMNet
from shared_model.sitedata.tensors import SiteTensors

__all__ = ["attention_rollout"]


def _mix(a: torch.Tensor) -> torch.Tensor:
    eye = torch.eye(a.shape[-1], dtype=a.dtype)
    a = 0.5 * a + 0.5 * eye
    return a / a.sum(dim=-1, keepdim=True)


def _view_rollout(model: LLNMNet, bidi: list[dict[str, torch.Tensor]], selfs: list[dict[str, torch.Tensor]]
                  ) -> torch.Tensor:
    alpha = float(model.config.alpha)
    rollout: torch.Tensor | None = None
    for rec in bidi:
        top = torch.cat([rec["img_img"], alpha * rec["img_txt"]], dim=-1)
        bottom = torch.cat([alpha * rec["txt_img"], rec["txt_txt"]], dim=-1)
        a = _mix(torch.cat([top, bottom], dim=-2) / (1.0 + alpha))
        rollout = a if rollout is None else a @ rollout
    for rec in selfs:
        a = _mix(rec["self"])
        rollout = a if rollout is None else a @ rollout
    assert rollout is not None
    valid = selfs[-1]["valid"].to(rollout.dtype) if selfs else torch.ones(rollout.shape[:2])
    return (rollout * valid[..., None]).sum(dim=1) / valid.sum(dim=1, keepdim=True)


@torch.no_grad()
def attention_rollout(model: LLNMNet, tensors: SiteTensors, *, batch_size: int = 32) -> list[dict[str, Any]]:
    """Per patient: per view the relevance of the image patches ``[g, g]`` (None without images), of the
    report tokens ``[L]`` (None without reports) and of the scalar tokens ``[C]``."""
    c = model.config
    if not model.self_blocks:
        raise ValueError("attention rollout needs at least one self-attention block")
    model.eval()
    blocks = [*model.bidirectional, *model.self_blocks]
    for block in blocks:
        block.record = []
    g = c.image_size // c.patch_size if c.images else 0
    n_img = g * g
    out: list[dict[str, Any]] = []
    try:
        for start in range(0, len(tensors.patient_ids), batch_size):
            sl = slice(start, start + batch_size)
            for block in blocks:
                block.record.clear()
            model(tensors.image[sl], tensors.view_mask[sl], tensors.text[sl], tensors.text_mask[sl],
                  tensors.clinical[sl], tensors.clinical_mask[sl])
            views = tensors.image.shape[1] if c.images else 1
            per_view = []
            for v in range(views):
                bidi = [b.record[v] for b in model.bidirectional]
                selfs = [b.record[v] for b in model.self_blocks]
                per_view.append(_view_rollout(model, bidi, selfs))
            length = tensors.text.shape[1] if c.reports else 0
            for i in range(per_view[0].shape[0]):
                views_out = []
                for rel in per_view:
                    r = rel[i].numpy()
                    img = r[:n_img].reshape(g, g) if c.images else None
                    stream = r[n_img:]
                    views_out.append({"image": img, "report": stream[:length] if c.reports else None,
                                      "no_report": float(stream[length]) if c.reports else None,
                                      "scalars": stream[length + (1 if c.reports else 0):]})
                out.append({"views": views_out})
    finally:
        for block in blocks:
            block.record = None
    return out
