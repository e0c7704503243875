"""Where a site's thyroid and nodule masks come from: drawn (the site table's) or predicted by a segmenter.

`llnm-site segment` writes the masks a segmenter predicts for every view to a folder the site owns, by default
``CACHE/predicted-masks/SITE-HASH12/`` (`predicted_masks_dir`), with a ``manifest.json`` naming the segmenter's
SHA-256. `PreprocessConfig.masks` chooses per experiment: ``drawn``, ``predicted`` (every view's predicted masks) or
``drawn-else-predicted`` (a drawn mask where the table has one, else the predicted one). `with_mask_source` returns the
site with each view's mask paths chosen so; the preprocessing reads them like drawn masks, and since the chosen files
are among the files the cache key hashes, and the segmenter's hash is in the config fingerprint, a cache never mixes
masks of two segmenters. A predicted mask in which the segmenter found nothing counts as missing, never as an empty
structure. Nothing is written.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from shared_model.config import PreprocessConfig
from shared_model.sitedata.records import VIEWS, Site

__all__ = ["MANIFEST", "mask_sources", "predicted_masks_dir", "read_manifest", "with_mask_source"]

MANIFEST = "manifest.json"
STRUCTURE_FIELDS = {"thyroid": "thyroid_mask", "nodule": "nodule_mask"}


def predicted_masks_dir(cache_root: Path, site_name: str, segmenter_sha256: str) -> Path:
    """Where a site's masks predicted by one segmenter live by default (under the site's cache folder)."""
    return cache_root / "predicted-masks" / f"{site_name}-{segmenter_sha256[:12]}"


def read_manifest(folder: Path, segmenter_sha256: str, site_name: str) -> dict[str, Any]:
    """The manifest of the predicted masks in `folder`, checked to be the segmenter's; a clear error otherwise."""
    path = folder / MANIFEST
    if not path.is_file():
        raise ValueError(
            f"site {site_name}: preprocess.masks asks for the masks predicted by segmenter {segmenter_sha256[:12]}..., "
            f"but {path} does not exist: run `llnm-site segment --model SEGMENTER --data SITE_DIR` with that "
            "segmenter first (the same --cache-dir)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        found = str(manifest["segmenter"]["sha256"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a manifest of llnm-site segment ({exc}); run llnm-site segment again") from None
    if found != segmenter_sha256:
        raise ValueError(f"{path}: masks of segmenter {found[:12]}..., not of {segmenter_sha256[:12]}... that "
                         "preprocess.segmenter_sha256 names")
    return manifest


def _predicted(manifest: dict[str, Any], folder: Path, patient_id: str, view: str, structure: str) -> Path | None:
    entry = (manifest.get("views") or {}).get(patient_id, {}).get(view)
    if not entry or not entry.get(f"{structure}_found") or not entry.get(structure):
        return None
    return folder / str(entry[structure])


def mask_sources(site: Site, cfg: PreprocessConfig, cache_root: Path) -> dict[str, dict[str, dict[str, str]]]:
    """Per patient and view, where each structure's mask comes from under `cfg.masks`: ``drawn``, ``predicted`` or
    ``missing``."""
    chosen = with_mask_source(site, cfg, cache_root)
    out: dict[str, dict[str, dict[str, str]]] = {}
    for before, after in zip(site.patients, chosen.patients, strict=True):
        for view in VIEWS:
            if before.views[view].image is None:
                continue
            row = {}
            for structure, field in STRUCTURE_FIELDS.items():
                path = getattr(after.views[view], field)
                row[structure] = ("missing" if path is None
                                  else "drawn" if path == getattr(before.views[view], field) else "predicted")
            out.setdefault(before.patient_id, {})[view] = row
    return out


def with_mask_source(site: Site, cfg: PreprocessConfig, cache_root: Path) -> Site:
    """The site with each view's mask paths chosen by `cfg.masks` (the site itself for ``drawn``)."""
    if cfg.masks == "drawn":
        return site
    assert cfg.segmenter_sha256 is not None  # PreprocessConfig's own rule
    folder = predicted_masks_dir(cache_root, site.name, cfg.segmenter_sha256)
    manifest = read_manifest(folder, cfg.segmenter_sha256, site.name)
    patients = []
    for patient in site.patients:
        views = {}
        for view, files in patient.views.items():
            changes = {}
            for structure, field in STRUCTURE_FIELDS.items():
                drawn = getattr(files, field)
                if cfg.masks == "drawn-else-predicted" and drawn is not None:
                    continue
                changes[field] = (_predicted(manifest, folder, patient.patient_id, view, structure)
                                  if files.image is not None else None)
            views[view] = dataclasses.replace(files, **changes)
        patients.append(dataclasses.replace(patient, views=views))
    return dataclasses.replace(site, patients=patients)
