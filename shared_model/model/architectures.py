"""One place that maps a `ModelConfig` to its network, and what DP-SGD trains of it.

``llnm-net`` (the paper's model) and ``feature-head`` (a head on frozen public features); everything else
(training, prediction, FedAvg, Opacus, checkpoints) treats the two alike. What each reads at a site is
`shared_model.sitedata.model_inputs`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from shared_model.model.configuration import ModelConfig

if TYPE_CHECKING:  # pragma: no cover - typing only
    from torch import nn

#: What DP-SGD trains (`privacy.patient.trainable`): every parameter, the MLP heads, or the heads plus every
#: normalisation layer and bias (BitFit). The rest stays at the global model's values (public to the site).
Trainable = Literal["all", "heads", "heads-norms-biases"]


def build_model(cfg: ModelConfig) -> nn.Module:
    """The network `cfg` describes, freshly initialised."""
    if cfg.architecture == "feature-head":
        from shared_model.model.feature_head import FeatureHeadNet

        return FeatureHeadNet(cfg)
    from shared_model.model.modeling import LLNMNet

    return LLNMNet(cfg)


def restrict_trainable(model: nn.Module, trainable: Trainable) -> int:
    """Freeze every parameter outside `trainable`; returns how many parameter values remain trainable.

    ``heads``: the LLNM and stage MLP heads (for the feature head: all of it, it is a head). ``heads-norms-
    biases`` adds every LayerNorm and every bias. Frozen parameters keep the global model's values, so what a
    site sends back for them is what it received.
    """
    if trainable not in ("all", "heads", "heads-norms-biases"):
        raise ValueError(f"privacy.patient.trainable={trainable!r}: expected all, heads or heads-norms-biases")
    from torch import nn

    from shared_model.model.modeling import LLNMNet

    if trainable == "all" or not isinstance(model, LLNMNet):
        return sum(p.numel() for p in model.parameters() if p.requires_grad)
    keep: set[int] = set()
    for name, module in model.named_modules():
        is_head = name.startswith(("llnm_head", "stage_head"))
        if is_head or (trainable == "heads-norms-biases" and isinstance(module, nn.LayerNorm)):
            keep.update(id(p) for p in module.parameters())
    if trainable == "heads-norms-biases":
        keep.update(id(p) for n, p in model.named_parameters() if n.endswith(".bias"))
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
