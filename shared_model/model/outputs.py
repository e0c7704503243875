"""What the networks return (LLNM-Net and the feature head alike), and what the loss takes."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

__all__ = ["ModelOutput"]


class ModelOutput(NamedTuple):
    """Per-view outputs: ``llnm_logits [B, V]``, ``stage_logits [B, V, num_stages]`` (None without head), and how
    the views make the patient's prediction (``ModelConfig.view_fusion``: ``probability`` or ``logit``)."""

    llnm_logits: Tensor
    stage_logits: Tensor | None
    view_fusion: str = "probability"
