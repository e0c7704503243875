"""`llnm-site segment`: a segmenter's masks for every view, written outside the site folder, each with its hash."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shared_model.config import PreprocessConfig, TrainConfig
from shared_model.model.checkpoint import CheckpointError, model_from_checkpoint, save_checkpoint
from shared_model.model.segmenter import SegmenterConfig, build_segmenter
from shared_model.model.segmenter_training import train_segmenter
from shared_model.sitedata.segmentation_inputs import load_segmentation_inputs

BIN = Path(sys.executable).parent


def _tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def segmenter_checkpoint(small_consortium: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small segmenter trained for one epoch on site-a, saved as a segmentation run would save it."""
    torch.manual_seed(0)
    cfg = SegmenterConfig.from_dict({"image_size": 32, "features": [4, 4, 8, 8, 16, 4]})
    model = build_segmenter(cfg)
    views = load_segmentation_inputs(small_consortium / "site-a", cfg.image_size).subset("train")
    train_segmenter(model, views, TrainConfig(lr=1e-2, batch_size=16, device="cpu"))
    path = tmp_path_factory.mktemp("segmenter") / "round-0001.safetensors"
    save_checkpoint(path, model.state_dict(), {"task": "segment", "round": 1, "segmenter_config": cfg.to_dict(),
                                              "preprocess_config": PreprocessConfig().to_dict()})
    return path


def _segment(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "llnm-site"), "segment", *args], capture_output=True, text=True, timeout=300)


def test_every_view_gets_masks_outside_the_site_folder_with_the_segmenter_hash(
        small_consortium: Path, segmenter_checkpoint: Path, tmp_path: Path) -> None:
    from PIL import Image

    site = tmp_path / "site-b"
    shutil.copytree(small_consortium / "site-b", site)
    broken = sorted((site / "images").glob("*.dcm"))[0]
    broken.write_bytes(broken.read_bytes()[:200])  # one truncated DICOM: reported, the rest segmented
    before = _tree(site)
    cache = tmp_path / "cache"
    done = _segment("--model", str(segmenter_checkpoint), "--data", str(site), "--cache-dir", str(cache),
                    "--device", "cpu")
    assert done.returncode == 0, done.stderr
    sha = json.loads(segmenter_checkpoint.with_suffix(".json").read_text())["sha256"]
    out = cache / "predicted-masks" / f"site-b-{sha[:12]}"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["segmenter"]["sha256"] == sha and manifest["segmenter"]["round"] == 1
    images = [p for p in (site / "images").glob("*.dcm") if p != broken]
    assert manifest["counts"]["views"] == len(images)
    assert len(manifest["unreadable"]) == 1 and broken.name in manifest["unreadable"][0]
    assert "row " in manifest["unreadable"][0] and broken.name in done.stdout
    some_view = next(iter(next(iter(manifest["views"].values())).values()))
    for name in ("nodule", "thyroid"):
        with Image.open(out / some_view[name]) as png:
            assert png.text["llnm-segmenter-sha256"] == sha
    assert _tree(site) == before  # nothing written into the site folder

    inside = _segment("--model", str(segmenter_checkpoint), "--data", str(site), "--out", str(site / "predicted"))
    assert inside.returncode == 2 and "inside the site folder" in inside.stderr
    assert not (site / "predicted").exists()


def test_a_checkpoint_of_the_other_task_is_refused_by_name(small_consortium: Path, segmenter_checkpoint: Path,
                                                           tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=re.escape("a segmenter's checkpoint (task: segment), not an LLNM-Net's")):
        model_from_checkpoint(segmenter_checkpoint)

    from shared_model.model.configuration import ModelConfig
    from shared_model.model.modeling import LLNMNet

    cfg = ModelConfig.preset("tiny", image_size=32)
    llnm = tmp_path / "round-0002.safetensors"
    save_checkpoint(llnm, LLNMNet(cfg).state_dict(), {"model_config": cfg.to_dict(),
                                                      "preprocess_config": PreprocessConfig().to_dict()})
    done = _segment("--model", str(llnm), "--data", str(small_consortium / "site-a"), "--out", str(tmp_path / "o"))
    assert done.returncode == 2
    assert "an LLNM-Net's checkpoint (task: llnm), not a segmenter's" in done.stderr
