"""One place that maps a `ModelConfig` to its network, its site inputs and its dataset.

``llnm-net`` (the paper's model) trains on a site's preprocessed tensors (`shared_model.site_cache`);
``feature-head`` trains on the frozen public features computed from them (`shared_model.public_features`).
Everything else (training, prediction, FedAvg, Opacus, checkpoints) treats the two alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from shared_model.config import ModelConfig, PreprocessConfig

if TYPE_CHECKING:  # pragma: no cover - typing only
    from torch import nn
    from torch.utils.data import Dataset

#: What DP-SGD trains (`privacy.patient.trainable`): every parameter, the MLP heads, or the heads plus every
#: normalisation layer and bias (BitFit). The rest stays at the global model's values (public to the site).
Trainable = Literal["all", "heads", "heads-norms-biases"]


def build_model(cfg: ModelConfig) -> nn.Module:
    """The network `cfg` describes, freshly initialised."""
    if cfg.architecture == "feature-head":
        from shared_model.feature_head import FeatureHeadNet

        return FeatureHeadNet(cfg)
    from shared_model.modeling import LLNMNet

    return LLNMNet(cfg)


def load_site_inputs(site_dir: str | Path, pre_cfg: PreprocessConfig, model_cfg: ModelConfig, *,
                     cache_dir: str | Path | None = None, progress: bool = False) -> Any:
    """A site's patients as the model's inputs: `SiteTensors`, or `PublicFeatures` for the feature head."""
    if model_cfg.architecture == "feature-head":
        from shared_model.public_features import site_public_features

        feats = site_public_features(site_dir, pre_cfg, cache_dir=cache_dir, progress=progress)
        return feats.centred(model_cfg.feature_centring) if model_cfg.feature_centring != "none" else feats
    from shared_model.site_cache import build_site_tensors

    return build_site_tensors(site_dir, pre_cfg, cache_dir=cache_dir, progress=progress)


def make_dataset(sources: Any) -> Dataset:
    """A dataset over one or several sites' inputs from `load_site_inputs` (or their `subset`s)."""
    from shared_model.public_features import FeatureDataset, PublicFeatures

    parts = sources if isinstance(sources, list | tuple) else [sources]
    if parts and isinstance(parts[0], PublicFeatures):
        return FeatureDataset(list(parts))
    from shared_model.data import LLNMDataset

    return LLNMDataset(parts if len(parts) > 1 else parts[0])


def restrict_trainable(model: nn.Module, trainable: Trainable) -> int:
    """Freeze every parameter outside `trainable`; returns how many parameter values remain trainable.

    ``heads``: the LLNM and stage MLP heads (for the feature head: all of it, it is a head). ``heads-norms-
    biases`` adds every LayerNorm and every bias. Frozen parameters keep the global model's values, so what a
    site sends back for them is what it received.
    """
    if trainable not in ("all", "heads", "heads-norms-biases"):
        raise ValueError(f"privacy.patient.trainable={trainable!r}: expected all, heads or heads-norms-biases")
    from torch import nn

    from shared_model.modeling import LLNMNet

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
