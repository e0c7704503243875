"""A site's patients as the model's inputs, for every architecture: the site's preprocessed tensors
(`shared_model.sitedata.cache`) for ``llnm-net`` on feature maps, the frozen public features computed from them
(`shared_model.sitedata.public_features`) for ``feature-head`` (pooled) and for ``llnm-net`` on public tokens;
and the dataset over them."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared_model.config import PreprocessConfig
from shared_model.model.configuration import ModelConfig

if TYPE_CHECKING:  # pragma: no cover - typing only
    from torch.utils.data import Dataset


def load_site_inputs(site_dir: str | Path, pre_cfg: PreprocessConfig, model_cfg: ModelConfig, *,
                     cache_dir: str | Path | None = None, progress: bool = False) -> Any:
    """A site's patients as the model's inputs: `SiteTensors`, or `PublicFeatures` for the feature head."""
    if model_cfg.architecture == "feature-head":
        from shared_model.sitedata.public_features import site_public_features

        feats = site_public_features(site_dir, pre_cfg, cache_dir=cache_dir, progress=progress)
        return feats.centred(model_cfg.feature_centring) if model_cfg.feature_centring != "none" else feats
    if model_cfg.image_features == "public-tokens":
        from shared_model.sitedata.public_features import site_public_features

        return site_public_features(site_dir, pre_cfg, cache_dir=cache_dir, progress=progress,
                                    token_grid=model_cfg.image_size)
    from shared_model.sitedata.cache import build_site_tensors

    return build_site_tensors(site_dir, pre_cfg, cache_dir=cache_dir, progress=progress)


def make_dataset(sources: Any) -> Dataset:
    """A dataset over one or several sites' inputs from `load_site_inputs` (or their `subset`s)."""
    from shared_model.sitedata.public_features import FeatureDataset, PublicFeatures

    parts = sources if isinstance(sources, list | tuple) else [sources]
    if parts and isinstance(parts[0], PublicFeatures):
        return FeatureDataset(list(parts))
    from shared_model.sitedata.tensors import LLNMDataset

    return LLNMDataset(parts if len(parts) > 1 else parts[0])
