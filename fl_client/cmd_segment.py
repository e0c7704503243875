"""`llnm-site segment --model MODEL --data SITE_DIR`: predicted nodule and thyroid masks for this site's views.

Runs inside the hospital. MODEL is a segmenter's checkpoint or the run directory of a segmentation run (an LLNM-Net's
is refused by name). Every view with an image is segmented at two scales (`segmenter_training.predict_frames`) and
its two masks are written as PNGs, each carrying the segmenter's SHA-256 in a text chunk, to a folder the site owns:
by default ``CACHE/predicted-masks/SITE-HASH12/`` (the site's cache folder, `--cache-dir` or ``$LLNM_CACHE_DIR`` or
``~/.cache/llnm-fl``), never the site folder. ``manifest.json`` there lists every view's masks, whether a nodule was
found, the segmenter (checkpoint, SHA-256, round) and every view that could not be read, by file and row. Nothing is
sent anywhere.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

#: Views segmented per batch of patients (bounds the memory a large site needs).
CHUNK_PATIENTS = 64


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a segmenter's checkpoint (.safetensors with its .json) or the run "
                                                  "directory of a segmentation run")
    p.add_argument("--data", required=True, help="this site's folder (only read)")
    p.add_argument("--out", help="folder for the predicted masks (default CACHE/predicted-masks/SITE-HASH12; never "
                                 "inside the site folder)")
    p.add_argument("--cache-dir", help="the site's cache folder (default $LLNM_CACHE_DIR or ~/.cache/llnm-fl)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--single-scale", action="store_true", help="no nodule window: the whole frame only")


def _save_mask(path: Path, mask: Any, sha256: str) -> None:
    import numpy as np
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("llnm-segmenter-sha256", sha256)
    tmp = path.with_suffix(".tmp")
    Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)).save(tmp, format="PNG", pnginfo=info)
    tmp.replace(path)


def segment_site(model_path: str, site_dir: str, *, out: str | None = None, cache_dir: str | None = None,
                 device: str = "auto", refine: bool = True) -> dict[str, Any]:
    """Segment every view of the site; write the masks and the manifest; return the manifest."""
    from shared_model.config import PreprocessConfig
    from shared_model.evaluation.segmentation import predicted_masks
    from shared_model.fileio import atomic_write_json
    from shared_model.model.checkpoint import resolve_checkpoint, segmenter_from_checkpoint
    from shared_model.model.segmenter import SegmenterConfig
    from shared_model.model.segmenter_training import predict_frames
    from shared_model.sitedata.cache import check_cache_dir, check_outside_site, default_cache_dir
    from shared_model.sitedata.contract import load_site
    from shared_model.sitedata.mask_source import MANIFEST, predicted_masks_dir
    from shared_model.sitedata.segmentation_inputs import load_segmentation_inputs

    checkpoint = resolve_checkpoint(model_path)
    model, meta = segmenter_from_checkpoint(checkpoint)
    cfg = SegmenterConfig.from_dict(meta["segmenter_config"])
    pre = PreprocessConfig.from_dict(meta["preprocess_config"])
    sha = str(meta["sha256"])
    site = load_site(site_dir)
    if out:
        resolved = check_outside_site(Path(out), site.root, what="", remedy="choose another --out")
    else:
        resolved = predicted_masks_dir(check_cache_dir(default_cache_dir(cache_dir), site.root), site.name, sha)
    (resolved / "masks").mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {
        "site": site.name, "data": str(site.root), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "segmenter": {"checkpoint": str(checkpoint), "sha256": sha, "round": meta.get("round"),
                      "config": cfg.to_dict(), "two_scales": refine},
        "views": {}, "problems": [p.format() for p in site.problems if p.level == "error"], "unreadable": []}
    for start in range(0, len(site.patients), CHUNK_PATIENTS):
        chunk = site.patients[start : start + CHUNK_PATIENTS]
        inputs = load_segmentation_inputs(site.root, cfg.image_size, pre, site=site, patients=chunk,
                                          for_prediction=True)
        manifest["unreadable"] += inputs.problems
        frames = predict_frames(model, inputs.views, refine=refine, device=device)
        for view, probs in zip(inputs.views, frames, strict=True):
            masks = predicted_masks(probs)
            entry = {"nodule_found": bool(masks["nodule"].any()), "thyroid_found": bool(masks["thyroid"].any())}
            for name, mask in masks.items():
                filename = f"masks/{view.patient_id}_{view.view}_{name}.png"
                _save_mask(resolved / filename, mask, sha)
                entry[name] = filename
            manifest["views"].setdefault(view.patient_id, {})[view.view] = entry
    entries = [e for views in manifest["views"].values() for e in views.values()]
    manifest["counts"] = {"patients": len(manifest["views"]), "views": len(entries),
                          "nodule_found": sum(e["nodule_found"] for e in entries),
                          "unreadable": len(manifest["unreadable"])}
    atomic_write_json(resolved / MANIFEST, manifest, indent=2)
    manifest["out"] = str(resolved)
    return manifest


def run(args: argparse.Namespace) -> int:
    from shared_model.model.checkpoint import CheckpointError

    try:
        manifest = segment_site(args.model, args.data, out=args.out, cache_dir=args.cache_dir, device=args.device,
                                refine=not args.single_scale)
    except (CheckpointError, ValueError, FileNotFoundError, NotADirectoryError) as exc:
        print(f"llnm-site segment: error: {exc}", file=sys.stderr)
        return 2
    counts = manifest["counts"]
    print(f"segmented {counts['views']} view(s) of {counts['patients']} patient(s) of {manifest['site']}: a nodule "
          f"found in {counts['nodule_found']}; masks and manifest.json in {manifest['out']}")
    for line in manifest["unreadable"]:
        print(f"  not segmented: {line}")
    print(json.dumps({"segmenter_sha256": manifest["segmenter"]["sha256"]}))
    return 0
